"""Find jobs nobody is running any more, and give them back to the queue.

Why it exists: Celery can lose a job (a worker killed with SIGKILL acks nothing, but its
message may already be redelivered to a worker that, seeing the job ``running``, rightly does
nothing). The job row's heartbeat is the truth: a ``running``/``cancelling`` job whose
heartbeat is older than ``heartbeat_timeout_s`` has no supervisor. It goes back to
``queued`` (attempt budget permitting) without its admission, so it goes back through the
scheduler (`service.scheduler`) and resumes from its last checkpoint; or it becomes
``cancelled`` if a cancel was pending, or ``failed`` with ``worker_lost``. A pass that
changed anything ends with a scheduling pass: slots were freed.

Admitted jobs whose message was sent more than ``requeue_queued_after_s`` ago and that no
worker claimed get their message sent again (the process may have died between the commit
and the send); duplicates are harmless. Jobs waiting for admission need no message.

`redispatch_deliveries` does the same for webhook deliveries whose message was lost, and
each pass advances unfinished sweeps (`service.sweeps.advance_unfinished`), in case the
advance that a cell's end triggers was lost.

Every update re-checks the stale condition in its WHERE clause, so several reapers (one per
worker) and a heartbeat arriving at the same moment cannot double-handle a job.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

import service.reactions  # noqa: F401  (registers the lifecycle's job-ended reactions)
from service import lifecycle, scheduler
from service.db import Database
from service.dispatch import DeliveryDispatch, Dispatch
from service.lifecycle import JobStatus
from service.live import LivePublisher
from service.models import Job, utcnow
from service.repositories import JobRepository, WebhookRepository
from service.settings import Settings
from service.sweeps import advance_unfinished
from service.txn import after_commit
from service.webhooks import send_each

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    sweeps_advanced: list[str] = field(default_factory=list)
    adopting: list[str] = field(default_factory=list)


def reap(
    settings: Settings,
    db: Database,
    live: LivePublisher | None,
    dispatch: Dispatch,
    *,
    dead_worker: str | None = None,
    deliver: DeliveryDispatch | None = None,
    adopt: Callable[[Job], bool] | None = None,
) -> ReapReport:
    """One pass. `dead_worker`: a worker name known to be dead (this worker restarting under
    a stable name); its jobs are taken back without waiting for the heartbeat timeout.
    `adopt`: for a lost job whose backend job may still run (a Slurm job outlives its
    worker), True when it was handed to a supervisor to adopt (`Supervisor.adopt`) instead
    of being queued again."""
    report = ReapReport()
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=settings.heartbeat_timeout_s)
    with db.session() as s:
        repo = JobRepository(s, live, deliver)
        stale = list(repo.stale_active(cutoff))
        if dead_worker:
            seen = {x.id for x in stale}
            stale += [j for j in repo.active_on_worker(dead_worker) if j.id not in seen]
        for job in stale:
            if adopt is not None and job.backend_job_id and adopt(job):
                report.adopting.append(job.id)
                continue
            # Only if still stale when written: a heartbeat may arrive meanwhile.
            on_dead = dead_worker if dead_worker and job.worker == dead_worker else None
            lost = {
                "code": "worker_lost",
                "message": f"no heartbeat from worker {job.worker!r} for "
                f"{settings.heartbeat_timeout_s:.0f}s",
                "param": None,
            }
            outcome = lifecycle.requeue_or_fail(
                repo,
                job,
                reason="worker_lost",
                error=lost,
                values={"heartbeat_at": None, "worker": None},
                stale_before=None if on_dead else cutoff,
                on_worker=on_dead,
            )
            if outcome == JobStatus.QUEUED:
                report.requeued.append(job.id)
            elif outcome == JobStatus.CANCELLED:
                report.cancelled.append(job.id)
            elif outcome == JobStatus.FAILED:
                report.failed.append(job.id)

        queued_cutoff = now - dt.timedelta(seconds=settings.requeue_queued_after_s)
        for job in repo.stale_queued(queued_cutoff):
            if repo.mark_redispatched(job.id, now, sent_before=queued_cutoff):
                report.redispatched.append(job.id)
                _dispatch_later(s, dispatch, job)
    if any(
        (report.requeued, report.cancelled, report.failed, report.redispatched, report.adopting)
    ):
        log.warning("reaper: %s", report)
    # Sweeps whose advance was lost (a crash between a cell's end and its after-commit
    # hook): idempotent, so running it on every pass is safe.
    report.sweeps_advanced = advance_unfinished(
        db.sessionmaker, settings, dispatch=dispatch, deliver=deliver
    )
    if any((report.requeued, report.cancelled, report.failed)):
        scheduler.run_pass(
            db.sessionmaker, dispatch, heartbeat_timeout_s=settings.heartbeat_timeout_s
        )
    return report


def _dispatch_later(session: Session, dispatch: Dispatch, job: Job) -> None:
    job_id, queue = job.id, job.queue
    after_commit(session, lambda: dispatch(job_id, queue))


@dataclass
class DeliverySweep:
    redispatched: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)


def redispatch_deliveries(
    settings: Settings, db: Database, deliver: DeliveryDispatch, *, limit: int = 500
) -> DeliverySweep:
    """Webhook deliveries still pending more than ``webhook_sweep_interval_s`` after they
    were due lost their Celery message (a send that failed after the commit, a delivery
    worker killed mid-attempt): send it again, or settle as failed one that has used all
    its attempts. The delivery worker runs this on a timer; a duplicate message is harmless
    (`service.webhooks.attempt_delivery` claims each attempt with a conditional UPDATE)."""
    report = DeliverySweep()
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=settings.webhook_sweep_interval_s)
    with db.session() as s:
        repo = WebhookRepository(s)
        for delivery_id, attempts in repo.overdue(cutoff, limit):
            give_up = attempts >= settings.webhook_max_attempts
            if repo.touch_overdue(delivery_id, now, cutoff=cutoff, give_up=give_up):
                (report.given_up if give_up else report.redispatched).append(delivery_id)
        ids = list(report.redispatched)
        after_commit(s, lambda: send_each(deliver, ids))
    if report.redispatched or report.given_up:
        log.warning("webhook sweep: %s", report)
    return report
