"""A job's life: its statuses and the transitions between them, in one place.

Why one module: the API (submit, cancel, retry), the worker's supervisor (claim, finish,
requeue), the reaper (jobs whose worker died) and the scheduler (admission) all move the same
row from different processes. Each move is a function here, and these functions are the only
code that writes ``jobs.status`` (``tests/test_layout.py`` checks it); they decide *what* the
move is, and `service.repositories.JobRepository` runs it as one conditional UPDATE (``WHERE
status IN (…) AND attempt = …``) plus its status event, so a move that lost a race writes
nothing and returns None/False.

The table (`TRANSITIONS`)::

    start            (new row)             → queued
    claim            queued                → running        attempt + 1
    request_cancel   queued                → cancelled
                     running               → cancelling
    finish           running, cancelling   → succeeded | failed | cancelled
    requeue_or_fail  running, cancelling   → queued | failed | cancelled
    retry            failed, cancelled     → queued         budget: attempt + max_attempts

A transition that ends a job (to succeeded, failed or cancelled) runs the registered
reactions (`on_job_ended`) in the same transaction: the webhook outbox row
(`service.webhooks.enqueue_job_event`), so it exists exactly when the status does, and a sweep
cell's advance once that transaction commits (`service.sweeps.cell_ended`). Those modules sit
above this one (they import the models, which import these statuses), so they register with
it (`service.reactions`, imported by every process that runs transitions) instead of being
imported here: no import circle.

``admit`` (the scheduler) and ``heartbeat`` (the supervisor) write a queued or active row
without changing its status.

A backend with its own queue (Slurm) may hold a claimed job before it runs (PENDING): the job
stays ``running`` here, since a worker slot, an attempt and the pool's GPUs are its (quotas,
fencing, cancel and adoption all rely on that), and `backend_holds` records Slurm's reason in
``queue_reason``. `shown_status` is what the API shows for it: ``queued`` while held, with
that reason, ``running`` once the backend starts it. Nothing leaves ``succeeded``, and only ``retry`` leaves
``failed``/``cancelled``; ``attempt`` only grows (`plan` is the pure model the tests check
against the database).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.models import Job
    from service.repositories import JobRepository


class JobStatus(str, Enum):
    """The values stored in ``jobs.status`` and shown by the API (the CHECK constraint lists
    them, so they never change)."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


QUEUED, RUNNING, CANCELLING = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

#: Every status, in the order the API documents them.
JOB_STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)
#: A supervisor owns the job (it heartbeats; fenced writes need one of these).
ACTIVE_STATUSES: tuple[str, ...] = (RUNNING.value, CANCELLING.value)
#: Nothing more happens to the job unless someone retries it.
TERMINAL_STATUSES: frozenset[str] = frozenset({SUCCEEDED.value, FAILED.value, CANCELLED.value})

_ACTIVE = frozenset({RUNNING, CANCELLING})
_TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

#: transition -> {from status: the statuses it may lead to}
TRANSITIONS: Mapping[str, Mapping[JobStatus, frozenset[JobStatus]]] = {
    "claim": {QUEUED: frozenset({RUNNING})},
    "request_cancel": {QUEUED: frozenset({CANCELLED}), RUNNING: frozenset({CANCELLING})},
    "finish": {s: _TERMINAL for s in _ACTIVE},
    "requeue_or_fail": {s: frozenset({QUEUED, FAILED, CANCELLED}) for s in _ACTIVE},
    "retry": {FAILED: frozenset({QUEUED}), CANCELLED: frozenset({QUEUED})},
}


def sources(transition: str, to: JobStatus | None = None) -> tuple[str, ...]:
    """The statuses `transition` may start from (leading to `to`, if given), as stored."""
    return tuple(
        s.value for s, targets in TRANSITIONS[transition].items() if to is None or to in targets
    )


# --------------------------------------------------------------------------- the pure model
@dataclass(frozen=True)
class Snapshot:
    """The part of a job row the transitions read and write."""

    status: JobStatus
    attempt: int = 0
    max_attempts: int = 3
    cancel_requested: bool = False
    admitted: bool = False


def plan(
    transition: str,
    job: Snapshot,
    *,
    final: JobStatus | None = None,
    budget: int = 1,
) -> Snapshot | None:
    """What `transition` does to `job`, or None where it is refused (the database functions
    below make the same decisions; ``tests/test_lifecycle.py`` checks they agree).

    `final`: the status `finish` writes; `budget`: the attempts `retry` grants.
    """
    if job.status not in TRANSITIONS[transition]:
        return None
    if transition == "claim":
        if not job.admitted or job.cancel_requested:
            return None
        return replace(job, status=RUNNING, attempt=job.attempt + 1)
    if transition == "request_cancel":
        to = CANCELLED if job.status == QUEUED else CANCELLING
        return replace(job, status=to, cancel_requested=True)
    if transition == "finish":
        if final not in _TERMINAL:
            raise ValueError(f"finish needs a terminal status, not {final!r}")
        return replace(job, status=final)
    if transition == "requeue_or_fail":
        if job.cancel_requested:
            return replace(job, status=CANCELLED)
        if job.attempt < job.max_attempts:
            return replace(job, status=QUEUED, admitted=False)
        return replace(job, status=FAILED)
    if transition == "retry":
        return replace(
            job,
            status=QUEUED,
            cancel_requested=False,
            admitted=False,
            max_attempts=job.attempt + budget,
        )
    raise KeyError(transition)  # pragma: no cover - TRANSITIONS lists them


# --------------------------------------------------------------------------- the database
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


#: A reaction to a job's end: (repo, job id, its terminal status), in the ending transaction.
JobEndedReaction = Callable[["JobRepository", str, JobStatus], None]

_reactions: dict[str, JobEndedReaction] = {}


def on_job_ended(name: str, reaction: JobEndedReaction) -> None:
    """Register `reaction` under `name` (registering a name again replaces it, so a reimport
    does not run it twice). Reactions run in registration order, inside the transaction that
    ended the job; one that needs the commit defers itself (`service.txn.after_commit`)."""
    _reactions[name] = reaction


def job_ended_reactions() -> tuple[str, ...]:
    """The registered reactions' names, in the order they run."""
    return tuple(_reactions)


def _ended(repo: JobRepository, job_id: str, status: JobStatus) -> None:
    """`job_id` has just become `status` (terminal) in this transaction: run the reactions.
    None registered means this process never imported `service.reactions`; ending the job
    anyway would silently lose its webhooks and stall its sweep, so the transition fails."""
    if not _reactions:
        raise RuntimeError(
            "no job-ended reactions are registered: import service.reactions in the process "
            "that runs lifecycle transitions"
        )
    for reaction in list(_reactions.values()):
        reaction(repo, job_id, status)


def start(repo: JobRepository, job: Job) -> dict[str, Any]:
    """Insert a new job as ``queued`` at attempt 0 with its first status event (seq 1).
    Returns the event's data (the caller publishes it after the commit)."""
    job.status = QUEUED.value
    job.attempt = 0
    job.event_seq = 1
    event = {"status": QUEUED.value, "attempt": 0}
    repo.add(job)
    repo.add_event(job.id, 1, "status", event)
    return event


def admit(repo: JobRepository, job_id: str, now: dt.datetime) -> bool:
    """The scheduler's admission: a queued, unadmitted, not cancelled job may now be claimed
    (its status stays ``queued``). False: it changed meanwhile."""
    return repo.mark_admitted(job_id, now, statuses=(QUEUED.value,))


def claim(repo: JobRepository, job_id: str, worker: str) -> Job | None:
    """admitted queued → running with attempt + 1. None: not queued and admitted (a duplicate
    or stale delivery, cancelled meanwhile, another worker was faster)."""
    now = _now()
    seq = repo.transition(
        job_id,
        RUNNING.value,
        from_statuses=sources("claim"),
        cancel_requested=False,
        admitted=True,
        bump_attempt=True,
        started_at=now,
        # (the queue's place and reason are a waiting job's; a backend with its own queue
        # writes its reason while it holds the job, `worker.supervisor`)
        values={
            "worker": worker,
            "heartbeat_at": now,
            "error": None,
            "queue_position": None,
            "queue_reason": None,
        },
        data={"worker": worker},
    )
    return None if seq is None else repo.get(job_id)


def shown_status(status: str, queue_reason: str | None) -> JobStatus:
    """The status the API shows: a ``running`` job its backend still holds in its own queue
    (`backend_holds` wrote the reason) is ``queued``; every other status as stored.
    (`service.repositories.JobRepository.list_for_team` filters by the same rule in SQL.)"""
    if status == RUNNING.value and queue_reason is not None:
        return QUEUED
    return JobStatus(status)


def backend_holds(
    repo: JobRepository, job_id: str, attempt: int, reason: str | None, data: dict[str, Any]
) -> bool:
    """Our active attempt waits in its backend's own queue for `reason` (Slurm PENDING), or
    no longer (None: the backend started it). Writes ``queue_reason`` (what `shown_status`
    reads) and a ``backend`` event with `data`. False: fenced (not our attempt any more)."""
    seq = repo.update_fenced(
        job_id,
        statuses=ACTIVE_STATUSES,
        attempt=attempt,
        values={"queue_reason": reason},
        events=1,
    )
    if seq is None:
        return False
    repo.add_event(
        job_id,
        seq,
        "backend",
        {
            **data,
            "attempt": attempt,
            "state": "pending" if reason else "running",
            "queue_reason": reason,
        },
    )
    return True


def heartbeat(repo: JobRepository, job_id: str, attempt: int) -> bool | None:
    """Touch our attempt's heartbeat. Returns whether a cancel was requested, or None when
    the job is no longer ours (another attempt, or not active any more)."""
    return repo.heartbeat(job_id, attempt, statuses=ACTIVE_STATUSES)


def request_cancel(repo: JobRepository, job: Job) -> bool:
    """queued → cancelled at once; running → cancelling (its supervisor finishes it).
    False: the job was not in the status `job` shows (re-read and decide again)."""
    current = JobStatus(job.status)
    if current not in TRANSITIONS["request_cancel"]:
        raise ValueError(f"cannot cancel a {current.value} job")
    if current == QUEUED:
        values: dict[str, Any] = {"cancel_requested": True, "finished_at": _now()}
        to = CANCELLED
    else:
        values = {"cancel_requested": True}
        to = CANCELLING
    seq = repo.transition(job.id, to.value, from_statuses=(current.value,), values=values)
    if seq is not None and to == CANCELLED:
        _ended(repo, job.id, CANCELLED)
    return seq is not None


def finish(
    repo: JobRepository,
    job_id: str,
    attempt: int,
    status: JobStatus,
    *,
    error: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    stale_before: dt.datetime | None = None,
    on_worker: str | None = None,
) -> bool:
    """An active attempt ends as `status` (succeeded, failed or cancelled). False: fenced
    (another attempt owns the job, or it is no longer active).

    `stale_before` / `on_worker` (the reaper): only if the heartbeat is still older than
    that, or the job is still on that dead worker."""
    if status not in TRANSITIONS["finish"][RUNNING]:
        raise ValueError(f"finish needs a terminal status, not {status!r}")
    seq = repo.transition(
        job_id,
        status.value,
        from_statuses=sources("finish", status),
        attempt=attempt,
        values={**(values or {}), "finished_at": _now(), "error": error},
        data=data,
        heartbeat_before=stale_before,
        on_worker=on_worker,
    )
    if seq is not None:
        _ended(repo, job_id, status)
    return seq is not None


def requeue_or_fail(
    repo: JobRepository,
    job: Job,
    *,
    reason: str,
    error: dict[str, Any],
    values: dict[str, Any] | None = None,
    stale_before: dt.datetime | None = None,
    on_worker: str | None = None,
) -> JobStatus | None:
    """An active attempt was lost (crash, preemption, retryable error, dead worker): the job
    is ``cancelled`` if a cancel was pending, ``queued`` again without its admission while
    ``attempt < max_attempts`` (the scheduler admits it again; the trainer resumes from its
    checkpoint), else ``failed`` with `error`. Returns the status written, None if fenced."""
    vals = dict(values or {})
    common = {"attempt": job.attempt, "heartbeat_before": stale_before, "on_worker": on_worker}
    if job.cancel_requested:
        seq = repo.transition(
            job.id,
            CANCELLED.value,
            from_statuses=sources("requeue_or_fail", CANCELLED),
            values={**vals, "finished_at": _now()},
            data={"reason": reason},
            **common,
        )
        if seq is None:
            return None
        _ended(repo, job.id, CANCELLED)
        return CANCELLED
    if job.attempt < job.max_attempts:
        seq = repo.transition(
            job.id,
            QUEUED.value,
            from_statuses=sources("requeue_or_fail", QUEUED),
            cancel_requested=False,
            values={**vals, "worker": None, "enqueued_at": _now(), "admitted_at": None},
            data={"reason": reason, "error": error},
            **common,
        )
        return QUEUED if seq is not None else None
    seq = repo.transition(
        job.id,
        FAILED.value,
        from_statuses=sources("requeue_or_fail", FAILED),
        values={**vals, "finished_at": _now(), "error": error},
        data={"reason": reason},
        **common,
    )
    if seq is None:
        return None
    _ended(repo, job.id, FAILED)
    return FAILED


def retry(repo: JobRepository, job: Job, budget: int) -> bool:
    """failed/cancelled → queued with `budget` more attempts (the spec's
    ``resources.max_attempts``), waiting for the scheduler again. False: it was not failed
    or cancelled any more."""
    seq = repo.transition(
        job.id,
        QUEUED.value,
        from_statuses=sources("retry"),
        values={
            "cancel_requested": False,
            "error": None,
            "finished_at": None,
            "enqueued_at": _now(),
            "admitted_at": None,
            "max_attempts": job.attempt + budget,
        },
        data={"reason": "retry"},
    )
    return seq is not None
