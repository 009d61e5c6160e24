"""All SQL lives here (routes call services, services call repositories); ``tests/test_layout.py``
fails on a query anywhere else outside migrations/.

Job statuses are written only through `service.lifecycle`, which passes them to
`JobRepository.transition`; this module decides nothing about them.

Why the job writes are conditional UPDATEs with RETURNING instead of read-modify-write:
the API (cancel), the worker supervisor (claim, heartbeat, final status), the training
process (metrics, checkpoints) and the reaper all write the same row from different
processes. ``UPDATE … WHERE status IN (…) AND attempt = :a`` makes each transition atomic
and fences a stale attempt's writes; the ``event_seq = event_seq + 1`` in the same statement
takes the row lock, so event sequence numbers are handed out one transaction at a time and
commit in order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service import redact
from service.lifecycle import ACTIVE_STATUSES, FAILED, QUEUED, RUNNING, TERMINAL_STATUSES
from service.live import LivePublisher
from service.models import (
    ApiKey,
    CacheRecord,
    CacheRecordUse,
    Checkpoint,
    Job,
    JobEvent,
    Metric,
    StepCost,
    Sweep,
    SweepCell,
    TeacherCache,
    TeacherCacheUse,
    TeacherScore,
    Team,
    Upload,
    UploadSession,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    Worker,
    utcnow,
)
from service.txn import after_commit

_QUEUED = QUEUED.value
#: Job columns holding text a failure wrote (`service.redact` scrubs them when written).
_TEXT_COLUMNS = frozenset({"error", "evaluation_error", "queue_reason"})
#: What the scheduler reads of a waiting job (`SchedulerRepository.waiting` and
#: `waiting_heads`), in the order `service.scheduler` unpacks.
_WAITING_COLUMNS = (
    Job.id,
    Job.team_id,
    Job.queue,
    Job.gpus,
    Job.priority,
    Job.created_at,
    Job.queue_position,
    Job.queue_reason,
)


# --------------------------------------------------------------------------- connections
def sqlite_on_connect(dbapi_conn: Any) -> None:
    """What every SQLite connection runs first (`service.db`): WAL, foreign keys, a busy
    timeout, and transaction control handed to SQLAlchemy instead of pysqlite."""
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def sqlite_begin(conn: Connection) -> None:
    """Every SQLite transaction takes the write lock at once (serialises writers)."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def ping(conn: Connection) -> None:
    """The readiness probe's round trip."""
    conn.execute(text("SELECT 1"))


def _insert(session: Session, model: Any) -> Any:
    """A dialect-specific INSERT that supports ON CONFLICT (Postgres and SQLite share the API)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(model)
    if name == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"unsupported database {name}")


class TeamRepository:
    def __init__(self, session: Session):
        self.session = session

    def get(self, team_id: str) -> Team | None:
        return self.session.get(Team, team_id)

    def get_by_name(self, name: str) -> Team | None:
        return self.session.scalar(select(Team).where(Team.name == name))

    def add(self, team: Team) -> Team:
        self.session.add(team)
        self.session.flush()
        return team

    def list(self) -> Sequence[Team]:
        return self.session.scalars(select(Team).order_by(Team.name)).all()

    def refresh(self, team_id: str) -> Team | None:
        return self.session.get(Team, team_id, populate_existing=True)

    def lock_queued_quota(self, team_id: str) -> int | None:
        """The team's ``max_queued_jobs``, with its row locked until the transaction ends, so
        concurrent submissions count one after the other (SQLite serialises them anyway)."""
        return self.session.scalar(
            select(Team.max_queued_jobs).where(Team.id == team_id).with_for_update()
        )


class ApiKeyRepository:
    def __init__(self, session: Session):
        self.session = session

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def active_team_for_hash(self, key_hash: str) -> Team | None:
        return self.session.scalar(
            select(Team)
            .join(ApiKey, ApiKey.team_id == Team.id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )

    def get_by_prefix(self, prefix: str) -> ApiKey | None:
        return self.session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))

    def list(self, team_id: str | None = None) -> Sequence[ApiKey]:
        q = select(ApiKey).order_by(ApiKey.team_id, ApiKey.id)
        if team_id is not None:
            q = q.where(ApiKey.team_id == team_id)
        return self.session.scalars(q).all()


class JobRepository:
    """Jobs and their event log. Pass `live` to publish appended events after commit, and
    `deliver` to send the Celery message of each webhook delivery a transition enqueues
    (`service.webhooks`; without it the delivery worker's sweep finds them)."""

    def __init__(
        self,
        session: Session,
        live: LivePublisher | None = None,
        deliver: Callable[[str], None] | None = None,
    ):
        self.session = session
        self.live = live
        self.deliver = deliver

    # -- reads -----------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self.session.get(Job, job_id, populate_existing=True)

    def get_for_team(self, team_id: str, job_id: str) -> Job | None:
        return self.session.scalar(
            select(Job)
            .where(Job.id == job_id, Job.team_id == team_id)
            .execution_options(populate_existing=True)
        )

    def get_by_idempotency_key(self, team_id: str, key: str) -> Job | None:
        return self.session.scalar(
            select(Job).where(Job.team_id == team_id, Job.idempotency_key == key)
        )

    def list_for_team(
        self, team_id: str, *, statuses: Sequence[str] | None, limit: int, before_id: str | None
    ) -> Sequence[Job]:
        """Newest first (ids are ULIDs); `before_id` is the keyset cursor. `statuses` are as
        the API shows them (`service.lifecycle.shown_status`: a running job its backend still
        holds is queued)."""
        q = select(Job).where(Job.team_id == team_id)
        if statuses:
            held = and_(Job.status == RUNNING.value, Job.queue_reason.is_not(None))
            shown = case((held, QUEUED.value), else_=Job.status)
            q = q.where(shown.in_(statuses))
        if before_id is not None:
            q = q.where(Job.id < before_id)
        return self.session.scalars(q.order_by(Job.id.desc()).limit(limit)).all()

    def stale_active(self, cutoff: dt.datetime, limit: int = 100) -> Sequence[Job]:
        return self.session.scalars(
            select(Job)
            .where(
                Job.status.in_(ACTIVE_STATUSES),
                (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < cutoff),
            )
            .order_by(Job.id)
            .limit(limit)
        ).all()

    def stale_queued(self, cutoff: dt.datetime, limit: int = 100) -> Sequence[Job]:
        return self.session.scalars(
            select(Job)
            .where(Job.status == _QUEUED, Job.admitted_at.is_not(None), Job.enqueued_at < cutoff)
            .order_by(Job.id)
            .limit(limit)
        ).all()

    def active_on_worker(self, worker: str) -> Sequence[Job]:
        """Active jobs a (dead) worker of this name holds."""
        return self.session.scalars(
            select(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.worker == worker)
        ).all()

    def fence_state(self, job_id: str) -> Any:
        """(attempt, status, cancel_requested) of a job, or None: what a training process
        polls to learn that it was cancelled or fenced off."""
        return self.session.execute(
            select(Job.attempt, Job.status, Job.cancel_requested).where(Job.id == job_id)
        ).one_or_none()

    def count_queued(self, team_id: str) -> int:
        return int(
            self.session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.team_id == team_id, Job.status == _QUEUED)
            )
            or 0
        )

    def gpus_in_use(self, team_id: str) -> int:
        """GPUs of the team's jobs that hold a slot (admitted or running)."""
        return int(
            self.session.scalar(
                select(func.coalesce(func.sum(Job.gpus), 0)).where(
                    Job.team_id == team_id, busy_condition()
                )
            )
            or 0
        )

    # -- writes ----------------------------------------------------------------------------
    def add(self, job: Job) -> Job:
        self.session.add(job)
        self.session.flush()
        return job

    def insert_many(self, rows: Sequence[dict[str, Any]], batch: int = 2000) -> None:
        """Bulk-insert job rows (benchmarks pre-filling a queue; the API adds one at a time)."""
        for i in range(0, len(rows), batch):
            self.session.execute(insert(Job), list(rows[i : i + batch]))

    def update_fenced(
        self,
        job_id: str,
        *,
        statuses: Iterable[str] | None = None,
        attempt: int | None = None,
        cancel_requested: bool | None = None,
        admitted: bool | None = None,
        heartbeat_before: dt.datetime | None = None,
        on_worker: str | None = None,
        enqueued_before: dt.datetime | None = None,
        bump_attempt: bool = False,
        started_at: dt.datetime | None = None,
        values: dict[str, Any] | None = None,
        events: int = 0,
    ) -> int | None:
        """Conditionally update a job; return its new ``event_seq`` or None if nothing matched.

        Conditions: the job is in `statuses`, at `attempt`, has `cancel_requested`, is
        (not) `admitted`, its heartbeat is older than `heartbeat_before` (or never came), it
        is held by `on_worker`, its message was sent before `enqueued_before`.
        `bump_attempt` writes ``attempt + 1``; `started_at` is written only if still unset.
        ``events`` sequence numbers are reserved (``event_seq - events + 1 … event_seq``).
        """
        conds: list[Any] = [Job.id == job_id]
        if statuses is not None:
            conds.append(Job.status.in_(tuple(statuses)))
        if attempt is not None:
            conds.append(Job.attempt == attempt)
        if cancel_requested is not None:
            conds.append(Job.cancel_requested.is_(cancel_requested))
        if admitted is not None:
            conds.append(Job.admitted_at.is_not(None) if admitted else Job.admitted_at.is_(None))
        if on_worker is not None:
            conds.append(Job.worker == on_worker)
        elif heartbeat_before is not None:
            conds.append(Job.heartbeat_at.is_(None) | (Job.heartbeat_at < heartbeat_before))
        if enqueued_before is not None:
            conds.append(Job.enqueued_at < enqueued_before)
        vals: dict[str, Any] = {"updated_at": utcnow(), **(values or {})}
        for column in _TEXT_COLUMNS.intersection(vals):  # what the API serves as written
            vals[column] = redact.scrub_data(vals[column])
        if bump_attempt:
            vals["attempt"] = Job.attempt + 1
        if started_at is not None:
            vals["started_at"] = func.coalesce(Job.started_at, started_at)
        if events:
            vals["event_seq"] = Job.event_seq + events
        stmt = (
            update(Job)
            .where(and_(*conds))
            .values(**vals)
            .returning(Job.event_seq)
            .execution_options(synchronize_session=False)
        )
        seq = self.session.execute(stmt).scalar_one_or_none()
        return seq

    def mark_admitted(self, job_id: str, now: dt.datetime, *, statuses: Iterable[str]) -> bool:
        """Admission (`service.lifecycle.admit`): only an unadmitted, not cancelled job."""
        seq = self.update_fenced(
            job_id,
            statuses=statuses,
            admitted=False,
            cancel_requested=False,
            values={"admitted_at": now, "enqueued_at": now, "updated_at": now},
        )
        return seq is not None

    def mark_redispatched(self, job_id: str, now: dt.datetime, *, sent_before: dt.datetime) -> bool:
        """An admitted queued job whose message went out before `sent_before` gets a new
        send time (the reaper sends the message again after the commit)."""
        seq = self.update_fenced(
            job_id,
            statuses=(_QUEUED,),
            admitted=True,
            enqueued_before=sent_before,
            values={"enqueued_at": now},
        )
        return seq is not None

    def heartbeat(self, job_id: str, attempt: int, *, statuses: Iterable[str]) -> bool | None:
        """Touch the heartbeat of our attempt; returns cancel_requested, or None if fenced off."""
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(tuple(statuses)))
            .values(heartbeat_at=utcnow())
            .returning(Job.cancel_requested)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none()

    def add_event(self, job_id: str, seq: int, kind: str, data: dict[str, Any]) -> JobEvent:
        data = redact.scrub_data(data)  # no secret is stored, published or served
        ev = JobEvent(job_id=job_id, seq=seq, kind=kind, data=data, created_at=utcnow())
        self.session.add(ev)
        self.session.flush()
        if self.live is not None:
            after_commit(self.session, partial(self.live.publish, job_id, seq, kind, data))
        return ev

    def append_event(
        self,
        job_id: str,
        kind: str,
        data: dict[str, Any],
        *,
        statuses: Iterable[str] | None = None,
        attempt: int | None = None,
        values: dict[str, Any] | None = None,
    ) -> int | None:
        """Fenced write of `values` plus one event; None (nothing written) if fenced off."""
        seq = self.update_fenced(
            job_id, statuses=statuses, attempt=attempt, values=values, events=1
        )
        if seq is None:
            return None
        self.add_event(job_id, seq, kind, data)
        return seq

    def transition(
        self,
        job_id: str,
        to_status: str,
        *,
        from_statuses: Iterable[str],
        values: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        **conditions: Any,
    ) -> int | None:
        """Move a job to `to_status` if it is in one of `from_statuses` and matches
        `conditions` (those of `update_fenced`). Only `service.lifecycle` calls this.

        Writes the status event in the same transaction. Returns the event seq, or None when
        the job was not in an allowed state (someone else moved it first).
        """
        vals = {"status": to_status, **(values or {})}
        if to_status == _QUEUED:  # back in line: the next scheduling pass places it again
            vals.update(queue_position=None, queue_reason=None)
        seq = self.update_fenced(
            job_id, statuses=from_statuses, values=vals, events=1, **conditions
        )
        if seq is None:
            return None
        row = self.session.execute(select(Job.attempt, Job.error).where(Job.id == job_id)).one()
        event = {"status": to_status, "attempt": row.attempt, **(data or {})}
        if to_status == FAILED.value and row.error is not None:
            event.setdefault("error", row.error)
        self.add_event(job_id, seq, "status", event)
        return seq


class EventRepository:
    def __init__(self, session: Session):
        self.session = session

    def list_after(self, job_id: str, after: int, limit: int) -> Sequence[JobEvent]:
        return self.session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit)
        ).all()

    def latest_of_kind(self, job_id: str, kind: str) -> JobEvent | None:
        """The job's newest event of `kind` (a later attempt's report replaces an earlier one).

        There is no index on kind: this walks the job's (job_id, seq) key from the newest event
        back to the match, so a long job's early report costs a scan of its event log. Callers
        ask only for the jobs that have such an event (`JobService.pruning`)."""
        return self.session.scalar(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.kind == kind)
            .order_by(JobEvent.seq.desc())
            .limit(1)
        )


class MetricRepository:
    def __init__(self, session: Session):
        self.session = session

    def insert_ignore(self, rows: list[dict[str, Any]]) -> None:
        """Insert (job_id, step, name, value, attempt) rows; existing (job, step, name) win."""
        if not rows:
            return
        stmt = _insert(self.session, Metric).on_conflict_do_nothing(
            index_elements=["job_id", "step", "name"]
        )
        now = utcnow()
        self.session.execute(stmt, [{**r, "created_at": now} for r in rows])

    def replay(
        self, job_id: str, *, after_step: int, limit_steps: int, names: Sequence[str] | None
    ) -> list[tuple[int, dict[str, float]]]:
        """Metrics grouped by step, steps > `after_step` in order, at most `limit_steps` steps."""
        steps_q = (
            select(Metric.step)
            .where(Metric.job_id == job_id, Metric.step > after_step)
            .group_by(Metric.step)
            .order_by(Metric.step)
            .limit(limit_steps)
        )
        if names:
            steps_q = steps_q.where(Metric.name.in_(names))
        steps = list(self.session.scalars(steps_q))
        if not steps:
            return []
        q = select(Metric.step, Metric.name, Metric.value).where(
            Metric.job_id == job_id, Metric.step >= steps[0], Metric.step <= steps[-1]
        )
        if names:
            q = q.where(Metric.name.in_(names))
        grouped: dict[int, dict[str, float]] = {s: {} for s in steps}
        for step, name, value in self.session.execute(q.order_by(Metric.step, Metric.name)):
            grouped[step][name] = value
        return list(grouped.items())

    def at_step(self, job_id: str, step: int, names: Sequence[str]) -> dict[str, float]:
        """The values of `names` recorded at `step` (those recorded; one primary-key range)."""
        rows = self.session.execute(
            select(Metric.name, Metric.value).where(
                Metric.job_id == job_id, Metric.step == step, Metric.name.in_(names)
            )
        )
        return {name: value for name, value in rows}

    def count(self, job_id: str) -> int:
        return (
            self.session.scalar(
                select(func.count()).select_from(Metric).where(Metric.job_id == job_id)
            )
            or 0
        )


class CheckpointRepository:
    def __init__(self, session: Session):
        self.session = session

    def upsert(
        self,
        *,
        job_id: str,
        step: int,
        path: str,
        manifest: dict[str, Any],
        metrics: dict[str, Any],
        attempt: int,
    ) -> None:
        """A resumed attempt may save the same step again: the newest folder wins."""
        values = {
            "job_id": job_id,
            "step": step,
            "path": path,
            "manifest": manifest,
            "metrics": metrics,
            "attempt": attempt,
            "created_at": utcnow(),
        }
        stmt = _insert(self.session, Checkpoint).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={k: stmt.excluded[k] for k in ("path", "manifest", "metrics", "attempt")},
        )
        self.session.execute(stmt)

    def list(self, job_id: str) -> Sequence[Checkpoint]:
        return self.session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        ).all()

    def get(self, job_id: str, step: int) -> Checkpoint | None:
        return self.session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
        )

    def delete(self, job_id: str, step: int) -> None:
        self.session.execute(
            delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
        )


class UploadRepository:
    def __init__(self, session: Session):
        self.session = session

    def get_for_team(self, team_id: str, upload_id: str) -> Upload | None:
        return self.session.scalar(
            select(Upload).where(Upload.id == upload_id, Upload.team_id == team_id)
        )

    def get_by_sha256(self, team_id: str, sha256: str) -> Upload | None:
        return self.session.scalar(
            select(Upload).where(Upload.team_id == team_id, Upload.sha256 == sha256)
        )

    def add(self, upload: Upload) -> Upload:
        self.session.add(upload)
        self.session.flush()
        return upload


class UploadSessionRepository:
    """Resumable upload sessions (`service.upload_sessions`). Progress (``received``) is
    changed under the row lock `get_for_team(lock=True)` takes."""

    def __init__(self, session: Session):
        self.session = session

    def add(self, s: UploadSession) -> UploadSession:
        self.session.add(s)
        self.session.flush()
        return s

    def get_for_team(
        self, team_id: str, session_id: str, *, lock: bool = False
    ) -> UploadSession | None:
        q = select(UploadSession).where(
            UploadSession.id == session_id, UploadSession.team_id == team_id
        )
        return self.session.scalar(q.with_for_update() if lock else q)

    def open_for_sha256(self, team_id: str, sha256: str) -> Sequence[UploadSession]:
        return self.session.scalars(
            select(UploadSession)
            .where(
                UploadSession.team_id == team_id,
                UploadSession.sha256 == sha256,
                UploadSession.status == "open",
            )
            .order_by(UploadSession.created_at.desc())
        ).all()

    def expired(
        self, team_id: str | None, now: dt.datetime, limit: int = 100
    ) -> Sequence[UploadSession]:
        q = select(UploadSession).where(
            UploadSession.status == "open", UploadSession.expires_at <= now
        )
        if team_id is not None:
            q = q.where(UploadSession.team_id == team_id)
        return self.session.scalars(q.order_by(UploadSession.expires_at).limit(limit)).all()

    def set_state(self, s: UploadSession, status: str, **values: Any) -> None:
        """The one writer of a session's status (open → completed | aborted)."""
        s.status = status
        for name, value in values.items():
            setattr(s, name, value)
        s.updated_at = utcnow()
        self.session.flush()


class CacheRecordRepository:
    """The caches' rows (`service.caches`): last use per entry, the jobs that used each, the
    row lock that readers and eviction share, and the teams' budgets."""

    def __init__(self, session: Session):
        self.session = session

    def ensure(self, team_id: str, kind: str, key: str, *, nbytes: int, used: dt.datetime) -> None:
        """The entry's row, created if missing (an entry from before rows were kept)."""
        stmt = _insert(self.session, CacheRecord).values(
            team_id=team_id, kind=kind, key=key, bytes=nbytes, created_at=used, last_used_at=used
        )
        self.session.execute(stmt.on_conflict_do_nothing(index_elements=["team_id", "kind", "key"]))

    def lock(self, team_id: str, kind: str, key: str) -> CacheRecord | None:
        """The row, locked until the transaction ends (SELECT … FOR UPDATE on Postgres)."""
        return self.session.scalar(
            select(CacheRecord)
            .where(CacheRecord.team_id == team_id, CacheRecord.kind == kind, CacheRecord.key == key)
            .with_for_update()
        )

    def use(self, record: CacheRecord, job_id: str, now: dt.datetime) -> None:
        record.last_used_at = now
        stmt = _insert(self.session, CacheRecordUse).values(
            entry_id=record.id, job_id=job_id, used_at=now
        )
        self.session.execute(
            stmt.on_conflict_do_update(index_elements=["entry_id", "job_id"], set_={"used_at": now})
        )
        self.session.flush()

    def for_team(self, team_id: str | None = None) -> Sequence[CacheRecord]:
        q = select(CacheRecord).order_by(CacheRecord.last_used_at, CacheRecord.id)
        if team_id is not None:
            q = q.where(CacheRecord.team_id == team_id)
        return self.session.scalars(q).all()

    def users(self, record_ids: Iterable[int]) -> dict[int, list[str]]:
        """Per entry, the jobs that used it and have not ended (queued again, running,
        cancelling): they are reading it or will when they resume."""
        ids = list(record_ids)
        if not ids:
            return {}
        rows = self.session.execute(
            select(CacheRecordUse.entry_id, Job.id)
            .join(Job, Job.id == CacheRecordUse.job_id)
            .where(CacheRecordUse.entry_id.in_(ids), Job.status.not_in(TERMINAL_STATUSES))
            .order_by(Job.id)
        ).all()
        out: dict[int, list[str]] = {}
        for entry_id, job_id in rows:
            out.setdefault(entry_id, []).append(job_id)
        return out

    def remove(self, record: CacheRecord) -> None:
        self.session.delete(record)
        self.session.flush()

    def budget(self, team_id: str) -> int | None:
        return self.session.scalar(select(Team.cache_budget_bytes).where(Team.id == team_id))


class WebhookRepository:
    """Webhook endpoints, their delivery outbox and the attempt log (`service.webhooks`).

    A delivery attempt is claimed by a conditional UPDATE (pending, due, attempts left) that
    bumps ``attempts`` and pushes ``next_attempt_at`` out by a lease, so a duplicate Celery
    message, or the sweeper re-sending one, never runs an attempt twice; its outcome is
    written only while the row is still at that attempt.
    """

    def __init__(self, session: Session):
        self.session = session

    # -- endpoints -------------------------------------------------------------------------
    def add_endpoint(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        self.session.add(endpoint)
        self.session.flush()
        return endpoint

    def count_endpoints(self, team_id: str) -> int:
        return int(
            self.session.scalar(
                select(func.count())
                .select_from(WebhookEndpoint)
                .where(WebhookEndpoint.team_id == team_id)
            )
            or 0
        )

    def list_endpoints(self, team_id: str) -> Sequence[WebhookEndpoint]:
        return self.session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.team_id == team_id)
            .order_by(WebhookEndpoint.id.desc())
        ).all()

    def get_endpoint_for_team(self, team_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        return self.session.scalar(
            select(WebhookEndpoint).where(
                WebhookEndpoint.id == endpoint_id, WebhookEndpoint.team_id == team_id
            )
        )

    def get_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        return self.session.get(WebhookEndpoint, endpoint_id)

    def delete_endpoint(self, endpoint_id: str) -> None:
        self.session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))

    def endpoints_for_job(self, job_id: str) -> Sequence[WebhookEndpoint]:
        """The endpoints of the team that owns `job_id` (one indexed join)."""
        return self.session.scalars(
            select(WebhookEndpoint)
            .join(Job, Job.team_id == WebhookEndpoint.team_id)
            .where(Job.id == job_id)
            .order_by(WebhookEndpoint.id)
        ).all()

    # -- deliveries ------------------------------------------------------------------------
    def add_deliveries(self, rows: Sequence[WebhookDelivery]) -> None:
        self.session.add_all(rows)
        self.session.flush()

    def get_delivery(self, delivery_id: str) -> WebhookDelivery | None:
        return self.session.get(WebhookDelivery, delivery_id, populate_existing=True)

    def list_deliveries(
        self, endpoint_id: str, *, limit: int, before_id: str | None
    ) -> Sequence[WebhookDelivery]:
        """Newest first (ids are ULIDs); `before_id` is the keyset cursor."""
        q = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
        if before_id is not None:
            q = q.where(WebhookDelivery.id < before_id)
        return self.session.scalars(q.order_by(WebhookDelivery.id.desc()).limit(limit)).all()

    def attempts_of(self, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
        out: dict[str, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
        if not delivery_ids:
            return out
        rows = self.session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(delivery_ids))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
        )
        for a in rows:
            out[a.delivery_id].append(a)
        return out

    def claim_attempt(
        self, delivery_id: str, now: dt.datetime, lease_until: dt.datetime, max_attempts: int
    ) -> int | None:
        """The attempt number now ours, or None: not pending, not due yet (another message
        holds it, or it waits for its backoff), or out of attempts."""
        stmt = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
                WebhookDelivery.attempts < max_attempts,
            )
            .values(
                attempts=WebhookDelivery.attempts + 1, next_attempt_at=lease_until, updated_at=now
            )
            .returning(WebhookDelivery.attempts)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none()

    def add_attempt(self, attempt: WebhookAttempt) -> None:
        self.session.add(attempt)
        self.session.flush()

    def settle(
        self,
        delivery_id: str,
        attempt: int,
        *,
        status: str,
        next_attempt_at: dt.datetime | None,
        status_code: int | None,
        now: dt.datetime,
    ) -> bool:
        """Write an attempt's outcome, if the delivery is still pending at that attempt."""
        stmt = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == attempt,
            )
            .values(
                status=status,
                next_attempt_at=next_attempt_at,
                last_status_code=status_code,
                updated_at=now,
            )
            .returning(WebhookDelivery.id)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none() is not None

    def overdue(self, cutoff: dt.datetime, limit: int = 100) -> Sequence[Any]:
        """(id, attempts) of pending deliveries due before `cutoff`: their message is lost."""
        return self.session.execute(
            select(WebhookDelivery.id, WebhookDelivery.attempts)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at < cutoff)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()

    def touch_overdue(
        self, delivery_id: str, now: dt.datetime, *, cutoff: dt.datetime, give_up: bool
    ) -> bool:
        """Mark an overdue delivery re-sent (due now) or, out of attempts, failed; only if it
        is still overdue (another sweeper may have been first)."""
        values: dict[str, Any] = {"updated_at": now}
        if give_up:
            values.update(status="failed", next_attempt_at=None)
        else:
            values["next_attempt_at"] = now
        stmt = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at < cutoff,
            )
            .values(**values)
            .returning(WebhookDelivery.id)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none() is not None


class SweepRepository:
    """Sweeps and their cells (`service.sweeps`). The two facts a sweep writes once —
    its final stage started, it finished — are conditional UPDATEs (``… IS NULL``), so
    concurrent callers (the job lifecycle's hook, a GET, the reaper) agree on one winner."""

    def __init__(self, session: Session):
        self.session = session

    def add(self, sweep: Sweep) -> None:
        self.session.add(sweep)
        self.session.flush()

    def get_by_idempotency_key(self, team_id: str, key: str) -> Sweep | None:
        return self.session.scalar(
            select(Sweep).where(Sweep.team_id == team_id, Sweep.idempotency_key == key)
        )

    def add_cells(self, cells: Sequence[SweepCell]) -> None:
        self.session.add_all(cells)
        self.session.flush()

    def get(self, sweep_id: str) -> Sweep | None:
        return self.session.get(Sweep, sweep_id, populate_existing=True)

    def get_for_team(self, team_id: str, sweep_id: str) -> Sweep | None:
        return self.session.scalar(
            select(Sweep)
            .where(Sweep.id == sweep_id, Sweep.team_id == team_id)
            .execution_options(populate_existing=True)
        )

    def list_for_team(self, team_id: str, *, limit: int, before_id: str | None) -> Sequence[Sweep]:
        """Newest first (ids are ULIDs); `before_id` is the keyset cursor."""
        q = select(Sweep).where(Sweep.team_id == team_id)
        if before_id is not None:
            q = q.where(Sweep.id < before_id)
        return self.session.scalars(q.order_by(Sweep.id.desc()).limit(limit)).all()

    def sweep_of_job(self, job_id: str) -> str | None:
        """The sweep `job_id` is a cell of (the unique index on ``sweep_cells.job_id``)."""
        return self.session.scalar(select(SweepCell.sweep_id).where(SweepCell.job_id == job_id))

    def cells(self, sweep_ids: Sequence[str]) -> list[tuple[SweepCell, Job]]:
        """Every cell of `sweep_ids` with its job, in cell order (one query)."""
        if not sweep_ids:
            return []
        rows = self.session.execute(
            select(SweepCell, Job)
            .join(Job, Job.id == SweepCell.job_id)
            .where(SweepCell.sweep_id.in_(sweep_ids))
            .order_by(SweepCell.sweep_id, SweepCell.index)
            .execution_options(populate_existing=True)
        ).all()
        return [(c, j) for c, j in rows]

    def counts(self, sweep_ids: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
        """sweep → stage → job status → cells (one grouped query, for the list)."""
        out: dict[str, dict[str, dict[str, int]]] = {s: {} for s in sweep_ids}
        if not sweep_ids:
            return out
        rows = self.session.execute(
            select(SweepCell.sweep_id, SweepCell.stage, Job.status, func.count())
            .join(Job, Job.id == SweepCell.job_id)
            .where(SweepCell.sweep_id.in_(sweep_ids))
            .group_by(SweepCell.sweep_id, SweepCell.stage, Job.status)
        )
        for sweep_id, stage, status, n in rows:
            out[sweep_id].setdefault(stage, {})[status] = int(n)
        return out

    def last_values(
        self, job_ids: Sequence[str], names: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """job → metric name → its value at the highest step recorded (the end-of-training
        evaluation), for `names` (one query over the metrics' primary key)."""
        out: dict[str, dict[str, float]] = {j: {} for j in job_ids}
        if not job_ids or not names:
            return out
        last = (
            select(Metric.job_id, Metric.name, func.max(Metric.step).label("step"))
            .where(Metric.job_id.in_(job_ids), Metric.name.in_(names))
            .group_by(Metric.job_id, Metric.name)
            .subquery()
        )
        rows = self.session.execute(
            select(Metric.job_id, Metric.name, Metric.value).join(
                last,
                and_(
                    Metric.job_id == last.c.job_id,
                    Metric.name == last.c.name,
                    Metric.step == last.c.step,
                ),
            )
        )
        for job_id, name, value in rows:
            out[job_id][name] = value
        return out

    def series(self, job_ids: Sequence[str], name: str) -> dict[str, list[tuple[int, float]]]:
        """job → [(step, value)] of metric `name`, by step (one query for every job)."""
        out: dict[str, list[tuple[int, float]]] = {j: [] for j in job_ids}
        if not job_ids:
            return out
        rows = self.session.execute(
            select(Metric.job_id, Metric.step, Metric.value)
            .where(Metric.job_id.in_(job_ids), Metric.name == name)
            .order_by(Metric.job_id, Metric.step)
        )
        for job_id, step, value in rows:
            out[job_id].append((step, value))
        return out

    def mark_cancel_requested(self, sweep_id: str, now: dt.datetime) -> None:
        self.session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.cancel_requested_at.is_(None))
            .values(cancel_requested_at=now)
            .execution_options(synchronize_session=False)
        )

    def start_final(self, sweep_id: str, now: dt.datetime, chosen: dict[str, Any]) -> bool:
        """Claim the final stage: True for exactly one caller (not cancelled, not started)."""
        stmt = (
            update(Sweep)
            .where(
                Sweep.id == sweep_id,
                Sweep.final_started_at.is_(None),
                Sweep.cancel_requested_at.is_(None),
            )
            .values(final_started_at=now, chosen=chosen)
            .returning(Sweep.id)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none() is not None

    def mark_finished(self, sweep_id: str, now: dt.datetime) -> bool:
        """True for exactly one caller: the sweep had not finished before."""
        stmt = (
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.finished_at.is_(None))
            .values(finished_at=now)
            .returning(Sweep.id)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none() is not None

    def stalled(self, terminal: Iterable[str], limit: int = 100) -> Sequence[str]:
        """Unfinished sweeps none of whose cells' jobs is still going (status not in
        `terminal`), oldest first: those an advance has something to do for (the reaper's
        periodic pass skips the running ones without reading their cells)."""
        going = (
            select(SweepCell.sweep_id)
            .join(Job, Job.id == SweepCell.job_id)
            .where(SweepCell.sweep_id == Sweep.id, Job.status.not_in(tuple(terminal)))
            .exists()
        )
        return self.session.scalars(
            select(Sweep.id)
            .where(Sweep.finished_at.is_(None), ~going)
            .order_by(Sweep.id)
            .limit(limit)
        ).all()


class TeacherCacheRepository:
    """Teacher-logit caches of a team and the jobs that built or read them."""

    def __init__(self, session: Session):
        self.session = session

    def record(
        self, *, team_id: str, job_id: str, attempt: int, role: str, values: dict[str, Any]
    ) -> int:
        """Upsert the (team, key) row with what the job found on disk, and the job's use of it.

        A rebuild (role 'built' of an existing key, after a corrupt or mismatched cache was
        discarded) updates the row's size and builder."""
        now = utcnow()
        row = {**values, "team_id": team_id, "created_at": now, "updated_at": now}
        if role == "built":
            row["built_by_job_id"] = job_id
        stmt = _insert(self.session, TeacherCache).values(**row)
        update_cols = ["kind", "k", "parts", "size_bytes", "shards", "positions", "updated_at"]
        if role == "built":
            update_cols += ["built_by_job_id", "created_at"]
        stmt = stmt.on_conflict_do_update(
            index_elements=["team_id", "key"],
            set_={c: stmt.excluded[c] for c in update_cols},
        ).returning(TeacherCache.id)
        cache_id = int(self.session.execute(stmt).scalar_one())
        use = _insert(self.session, TeacherCacheUse).values(
            cache_id=cache_id, job_id=job_id, role=role, attempt=attempt, created_at=now
        )
        use = use.on_conflict_do_update(
            index_elements=["cache_id", "job_id", "role"],
            set_={"attempt": use.excluded.attempt, "created_at": use.excluded.created_at},
        )
        self.session.execute(use)
        return cache_id

    def list_for_team(self, team_id: str, limit: int) -> Sequence[TeacherCache]:
        return self.session.scalars(
            select(TeacherCache)
            .where(TeacherCache.team_id == team_id)
            .order_by(TeacherCache.created_at.desc(), TeacherCache.id.desc())
            .limit(limit)
        ).all()

    def uses(self, cache_ids: Sequence[int]) -> Sequence[TeacherCacheUse]:
        if not cache_ids:
            return []
        return self.session.scalars(
            select(TeacherCacheUse)
            .where(TeacherCacheUse.cache_id.in_(cache_ids))
            .order_by(TeacherCacheUse.created_at, TeacherCacheUse.job_id)
        ).all()

    def of_job(self, job_id: str) -> Sequence[tuple[TeacherCache, TeacherCacheUse]]:
        """The caches a job built or read, its latest use first."""
        rows = self.session.execute(
            select(TeacherCache, TeacherCacheUse)
            .join(TeacherCacheUse, TeacherCacheUse.cache_id == TeacherCache.id)
            .where(TeacherCacheUse.job_id == job_id)
            .order_by(TeacherCacheUse.created_at.desc())
        ).all()
        return [(c, u) for c, u in rows]


class TeacherScoreRepository:
    """A team's teacher harness scores (one row per key) and the students of a teacher."""

    def __init__(self, session: Session):
        self.session = session

    def get(self, team_id: str, key: str) -> TeacherScore | None:
        return self.session.scalars(
            select(TeacherScore).where(TeacherScore.team_id == team_id, TeacherScore.key == key)
        ).first()

    def put(
        self,
        *,
        team_id: str,
        key: str,
        teacher_digest: str,
        scores: dict[str, float],
        meta: dict[str, Any],
        job_id: str | None,
    ) -> None:
        """Insert once: two jobs that computed the same key concurrently keep the first."""
        stmt = _insert(self.session, TeacherScore).values(
            team_id=team_id,
            key=key,
            teacher_digest=teacher_digest,
            scores=scores,
            meta=meta,
            computed_by_job_id=job_id,
            created_at=utcnow(),
        )
        self.session.execute(stmt.on_conflict_do_nothing(index_elements=["team_id", "key"]))

    def for_teacher(self, team_id: str, teacher_digest: str) -> Sequence[TeacherScore]:
        return self.session.scalars(
            select(TeacherScore)
            .where(TeacherScore.team_id == team_id, TeacherScore.teacher_digest == teacher_digest)
            .order_by(TeacherScore.created_at, TeacherScore.id)
        ).all()

    def students(self, team_id: str, teacher_digest: str, limit: int) -> Sequence[Job]:
        """This team's jobs distilled from the teacher with this digest, newest first."""
        return self.session.scalars(
            select(Job)
            .where(Job.team_id == team_id, Job.teacher_digest == teacher_digest)
            .order_by(Job.id.desc())
            .limit(limit)
        ).all()

    def latest_events(self, job_ids: Sequence[str], kind: str) -> dict[str, dict[str, Any]]:
        """job → the data of its newest event of `kind` (one query for all jobs)."""
        if not job_ids:
            return {}
        newest = (
            select(JobEvent.job_id, func.max(JobEvent.seq).label("seq"))
            .where(JobEvent.job_id.in_(job_ids), JobEvent.kind == kind)
            .group_by(JobEvent.job_id)
            .subquery()
        )
        rows = self.session.execute(
            select(JobEvent.job_id, JobEvent.data).join(
                newest, and_(JobEvent.job_id == newest.c.job_id, JobEvent.seq == newest.c.seq)
            )
        ).all()
        return {j: dict(d or {}) for j, d in rows}

    def teachers(self, team_id: str, limit: int) -> list[tuple[str, int]]:
        """(digest, number of students) of every teacher this team distilled from."""
        rows = self.session.execute(
            select(Job.teacher_digest, func.count())
            .where(Job.team_id == team_id, Job.teacher_digest.is_not(None))
            .group_by(Job.teacher_digest)
            .order_by(func.count().desc())
            .limit(limit)
        ).all()
        return [(str(d), int(n)) for d, n in rows]


# --------------------------------------------------------------------------- scheduling
def busy_condition() -> Any:
    """Jobs that hold a slot: admitted (message sent, not claimed yet) or running."""
    return or_(
        Job.status.in_(ACTIVE_STATUSES),
        (Job.status == _QUEUED) & Job.admitted_at.is_not(None),
    )


class SchedulerRepository:
    """The reads behind `service.scheduler.load_state`, grouped so a snapshot costs a handful
    of queries, and the lock that serialises scheduling passes."""

    def __init__(self, session: Session):
        self.session = session

    def lock(self, key: int, *, wait: bool = True) -> bool:
        """A Postgres transaction-level advisory lock on `key` (``wait=False``: only try).
        SQLite: the transaction's BEGIN IMMEDIATE already serialises, so always True."""
        if self.session.get_bind().dialect.name != "postgresql":
            return True
        if wait:
            self.session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            return True
        got = self.session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key})
        return bool(got.scalar_one())

    def live_pools(self, cutoff: dt.datetime) -> list[tuple[str, int, int]]:
        """(pool, live workers, largest worker's GPUs) over workers heard from since `cutoff`."""
        rows = self.session.execute(
            select(Worker.pool, func.count(), func.max(Worker.gpus))
            .where(Worker.heartbeat_at >= cutoff)
            .group_by(Worker.pool)
        )
        return [(name, int(n), int(max_gpus or 0)) for name, n, max_gpus in rows]

    def busy(self) -> list[tuple[str, str, int, int, int]]:
        """(pool, team, jobs, GPUs, share units) of the jobs holding a slot; a job counts as
        ``max(gpus, 1)`` share units (`service.scheduler.share_units`)."""
        units = case((Job.gpus > 1, Job.gpus), else_=1)
        rows = self.session.execute(
            select(Job.queue, Job.team_id, func.count(), func.sum(Job.gpus), func.sum(units))
            .where(busy_condition())
            .group_by(Job.queue, Job.team_id)
        )
        return [(q, t, int(n), int(g or 0), int(u or 0)) for q, t, n, g, u in rows]

    def last_admitted(self) -> list[tuple[str, str, Any]]:
        """(pool, team, the team's latest admission in that pool)."""
        return [
            (q, t, last)
            for q, t, last in self.session.execute(
                select(Job.queue, Job.team_id, func.max(Job.admitted_at))
                .where(Job.admitted_at.is_not(None))
                .group_by(Job.queue, Job.team_id)
            )
        ]

    def waiting(self) -> Sequence[Any]:
        """Queued jobs not admitted yet: (id, team_id, queue, gpus, priority, created_at,
        queue_position, queue_reason), the last two as the latest pass stored them."""
        return self.session.execute(
            select(*_WAITING_COLUMNS).where(Job.status == _QUEUED, Job.admitted_at.is_(None))
        ).all()

    def waiting_heads(self, pools: dict[str, tuple[int, int]]) -> Sequence[Any]:
        """Per pool and team, the first ``n`` waiting jobs in the team's order (priority
        first, then age) among those that fit the pool: ``pools`` maps a pool to (n, largest
        worker's GPUs). What an admission needs (it admits at most ``n`` = free slots per
        pool), so it does not read the whole queue. Same columns as `waiting`."""
        if not pools:
            return []
        rows: list[Any] = []
        for pool, (n, max_gpus) in pools.items():
            rank = (
                func.row_number()
                .over(
                    partition_by=Job.team_id,
                    order_by=(Job.priority.desc(), Job.created_at, Job.id),
                )
                .label("rank")
            )
            inner = (
                select(*_WAITING_COLUMNS, rank)
                .where(
                    Job.status == _QUEUED,
                    Job.admitted_at.is_(None),
                    Job.queue == pool,
                    Job.gpus <= max_gpus,
                )
                .subquery()
            )
            cols = [c for c in inner.c if c.name != "rank"]
            rows += self.session.execute(select(*cols).where(inner.c.rank <= n)).all()
        return rows

    def store_positions(self, rows: Sequence[tuple[str, int | None, str]]) -> None:
        """Write (job id, position, reason) for waiting jobs, as a pass computed them; a job
        admitted or gone meanwhile is left alone (the pass holds the scheduling lock, and
        the condition keeps a cancelled job's row as its cancel left it)."""
        if not rows:
            return
        stmt = (
            update(Job)
            .where(
                Job.id == bindparam("b_id"),
                Job.status == _QUEUED,
                Job.admitted_at.is_(None),
            )
            .values(queue_position=bindparam("b_pos"), queue_reason=bindparam("b_reason"))
            .execution_options(synchronize_session=False)
        )
        self.session.connection().execute(
            stmt, [{"b_id": i, "b_pos": p, "b_reason": r} for i, p, r in rows]
        )

    def admitted(self) -> Sequence[Any]:
        """Admitted jobs no worker claimed yet: (id, queue)."""
        return self.session.execute(
            select(Job.id, Job.queue).where(Job.status == _QUEUED, Job.admitted_at.is_not(None))
        ).all()


class WorkerRepository:
    """The ``workers`` table: one row per live Celery worker (a scheduler slot)."""

    def __init__(self, session: Session):
        self.session = session

    def register(
        self,
        *,
        name: str,
        pool: str,
        gpus: int,
        hostname: str,
        gpu_type: str | None = None,
        gpu_memory_bytes: int | None = None,
        backend: str = "local",
        max_nodes: int = 1,
        gpus_per_node: int | None = None,
        backend_info: dict[str, Any] | None = None,
    ) -> None:
        """Insert or refresh a worker's row (its heartbeat)."""
        now = utcnow()
        fields = {
            "pool": pool,
            "gpus": gpus,
            "hostname": hostname,
            "gpu_type": gpu_type,
            "gpu_memory_bytes": gpu_memory_bytes,
            "backend": backend,
            "max_nodes": max_nodes,
            "gpus_per_node": gpus_per_node,
            "backend_info": backend_info,
        }
        stmt = _insert(self.session, Worker).values(
            name=name, started_at=now, heartbeat_at=now, **fields
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"], set_={**fields, "heartbeat_at": now}
        )
        self.session.execute(stmt)

    def pool_card(self, pool: str) -> tuple[str | None, int | None] | None:
        """(gpu_type, gpu_memory_bytes) the most recently heard worker of `pool` declared;
        None when no worker of the pool is registered."""
        row = self.session.execute(
            select(Worker.gpu_type, Worker.gpu_memory_bytes)
            .where(Worker.pool == pool)
            .order_by(Worker.heartbeat_at.desc())
            .limit(1)
        ).first()
        return None if row is None else (row[0], row[1])

    def live_in_pool(self, pool: str, cutoff: dt.datetime) -> Sequence[Worker]:
        """The pool's workers whose heartbeat is newer than `cutoff`."""
        return self.session.scalars(
            select(Worker).where(Worker.pool == pool, Worker.heartbeat_at >= cutoff)
        ).all()

    def prune(self, cutoff: dt.datetime) -> None:
        """Forget workers silent since before `cutoff`."""
        self.session.execute(delete(Worker).where(Worker.heartbeat_at < cutoff))

    def deregister(self, name: str) -> None:
        self.session.execute(delete(Worker).where(Worker.name == name))

    def list(self) -> Sequence[Worker]:
        return self.session.scalars(select(Worker).order_by(Worker.pool, Worker.name)).all()


class StepCostRepository:
    """The ``step_costs`` table: finished jobs' measured speeds per card."""

    def __init__(self, session: Session):
        self.session = session

    def add(self, **values: Any) -> None:
        self.session.add(StepCost(**values))
        self.session.flush()

    def for_card(self, gpu_type: str, limit: int = 200) -> Sequence[StepCost]:
        """The newest `limit` rows of a card."""
        return self.session.scalars(
            select(StepCost)
            .where(StepCost.gpu_type == gpu_type)
            .order_by(StepCost.id.desc())
            .limit(limit)
        ).all()

    def peak_metric(self, job_id: str, name: str) -> float | None:
        return self.session.scalar(
            select(func.max(Metric.value)).where(Metric.job_id == job_id, Metric.name == name)
        )

    def median_metric(self, job_id: str, name: str) -> float | None:
        """Median of a job's positive values of metric `name` (tokens/s is 0 off the beat)."""
        vals = sorted(
            self.session.scalars(
                select(Metric.value).where(
                    Metric.job_id == job_id, Metric.name == name, Metric.value > 0
                )
            ).all()
        )
        if not vals:
            return None
        m = len(vals) // 2
        return vals[m] if len(vals) % 2 else (vals[m - 1] + vals[m]) / 2


# --------------------------------------------------------------------------- /metrics
class StatsRepository:
    """What a Prometheus scrape reads (`api.metrics`)."""

    def __init__(self, session: Session):
        self.session = session

    def jobs_by_status(self) -> dict[str, int]:
        return {
            status: int(n)
            for status, n in self.session.execute(
                select(Job.status, func.count()).group_by(Job.status)
            )
        }

    def queued_by_queue(self) -> dict[str, int]:
        rows = self.session.execute(
            select(Job.queue, func.count()).where(Job.status == _QUEUED).group_by(Job.queue)
        )
        return {queue: int(n) for queue, n in rows}

    def active_jobs(self) -> Sequence[Any]:
        """(id, worker, started_at) of the jobs a worker is running."""
        return self.session.execute(
            select(Job.id, Job.worker, Job.started_at).where(
                Job.status.in_(ACTIVE_STATUSES), Job.worker.is_not(None)
            )
        ).all()

    def steps_since(self, job_id: str, since: dt.datetime) -> int:
        """Distinct steps of `job_id` with metrics recorded since `since`."""
        return int(
            self.session.scalar(
                select(func.count(func.distinct(Metric.step))).where(
                    Metric.job_id == job_id, Metric.created_at >= since
                )
            )
            or 0
        )
