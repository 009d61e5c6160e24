"""What a pool's backend can run, checked at submission.

Why at submission: a job that asks for more than its pool's backend can ever give (two nodes
on a pool of single-host workers, 8 GPUs per node on nodes with 4, a Slurm partition that
does not exist) would otherwise wait in the queue forever. The pool's live workers registered
what their backend offers (``workers.backend``, ``max_nodes``, ``gpus_per_node``,
``backend_info``; `worker.backends`), so the API answers 422 naming the field at once.

A pool no worker serves is still not an error for a single-node job (workers may join later;
its ``queue_reason`` says why it waits), but a multi-node job needs a pool that is known to
span nodes.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from service.errors import InvalidRequestError
from service.models import utcnow
from service.repositories import WorkerRepository
from sharp_core.spec import ResourcesSpec


def job_gpus(resources: ResourcesSpec) -> int:
    """GPUs the job holds, as quotas and fair share count them: nodes × GPUs per node."""
    return resources.nodes * resources.gpus


def procs_per_node(resources: ResourcesSpec) -> int:
    """Training processes per node: one per GPU, one on a CPU node (gloo)."""
    return max(1, resources.gpus)


def check_resources(
    session: Session, resources: ResourcesSpec, *, heartbeat_timeout_s: float, prefix: str = "spec"
) -> None:
    """Raise a 422 naming ``{prefix}.resources.nodes|gpus|queue`` where the pool's live
    workers cannot run `resources`."""
    cutoff = utcnow() - dt.timedelta(seconds=heartbeat_timeout_s)
    workers = WorkerRepository(session).live_in_pool(resources.queue, cutoff)
    field = f"{prefix}.resources" if prefix else "resources"
    multi = [w for w in workers if w.backend != "local"]
    if resources.nodes > 1 and not multi:
        raise InvalidRequestError(
            f"{field}.nodes: {resources.nodes} nodes, but pool '{resources.queue}' has no "
            "multi-node backend (its workers run on one host; ask a pool backed by Slurm)",
            param=f"{field}.nodes",
        )
    if not multi:
        return
    missing = [w for w in multi if not (w.backend_info or {}).get("partition_exists", True)]
    if len(missing) == len(multi):
        part = (missing[0].backend_info or {}).get("partition")
        raise InvalidRequestError(
            f"{field}.queue: pool '{resources.queue}' submits to Slurm partition '{part}', "
            "which does not exist on its cluster",
            param=f"{field}.queue",
        )
    largest = max(w.max_nodes for w in multi)
    if resources.nodes > largest:
        raise InvalidRequestError(
            f"{field}.nodes: {resources.nodes} nodes, but pool '{resources.queue}' has {largest}",
            param=f"{field}.nodes",
        )
    per_node = max(_per_node_limit(w) for w in multi)
    if resources.gpus > per_node:
        what = "GPUs" if any(w.gpus_per_node for w in multi) else "processes (CPU nodes)"
        raise InvalidRequestError(
            f"{field}.gpus: {resources.gpus} per node, but the nodes of pool "
            f"'{resources.queue}' have {per_node} {what}",
            param=f"{field}.gpus",
        )


def _per_node_limit(w: object) -> int:
    gpus = getattr(w, "gpus_per_node", None)
    if gpus:
        return int(gpus)
    # CPU nodes: `gpus` counts gloo processes per node, at most one per CPU.
    return int((getattr(w, "backend_info", None) or {}).get("cpus_per_node") or 1)
