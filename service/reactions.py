"""What happens when a job ends, wired into the lifecycle.

`service.lifecycle` writes the statuses and sits below the models; the webhook outbox and the
sweeps sit above them. So the lifecycle imports neither: they register here, in this order,
and every process that runs transitions imports this module (`api.app`, `worker.supervisor`,
`worker.reaper`; the tests through `api.app`). ``tests/test_layout.py`` forbids the circle.
"""

from __future__ import annotations

from service import lifecycle, plans, sweeps, webhooks
from service.lifecycle import JobStatus
from service.repositories import JobRepository


def enqueue_webhooks(repo: JobRepository, job_id: str, status: JobStatus) -> None:
    """The job's webhook deliveries, in the transaction that ended it (an outbox)."""
    webhooks.enqueue_job_event(repo, job_id, status.value)


def advance_sweep(repo: JobRepository, job_id: str, status: JobStatus) -> None:
    """A sweep cell's sweep advances once that transaction commits."""
    sweeps.cell_ended(repo, job_id)


def record_step_cost(repo: JobRepository, job_id: str, status: JobStatus) -> None:
    """A succeeded job's measured speed joins the step-cost table job plans read."""
    if status == JobStatus.SUCCEEDED:
        plans.record_step_cost(repo, job_id)


#: name -> reaction, in the order they run (the outbox row first, as before the registry).
REACTIONS = {
    "webhooks": enqueue_webhooks,
    "sweeps": advance_sweep,
    "step_costs": record_step_cost,
}

for _name, _reaction in REACTIONS.items():
    lifecycle.on_job_ended(_name, _reaction)
