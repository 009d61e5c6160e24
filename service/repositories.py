"""All SQL lives here (routes call services, services call repositories).

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
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.live import LivePublisher
from service.models import (
    ACTIVE_STATUSES,
    ApiKey,
    Checkpoint,
    Job,
    JobEvent,
    Metric,
    Team,
    Upload,
    utcnow,
)
from service.txn import after_commit


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
    """Jobs and their event log. Pass `live` to publish appended events after commit."""

    def __init__(self, session: Session, live: LivePublisher | None = None):
        self.session = session
        self.live = live

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
        """Newest first (ids are ULIDs); `before_id` is the keyset cursor."""
        q = select(Job).where(Job.team_id == team_id)
        if statuses:
            q = q.where(Job.status.in_(statuses))
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
            .where(Job.status == "queued", Job.admitted_at.is_not(None), Job.enqueued_at < cutoff)
            .order_by(Job.id)
            .limit(limit)
        ).all()

    # -- writes ----------------------------------------------------------------------------
    def add(self, job: Job) -> Job:
        self.session.add(job)
        self.session.flush()
        return job

    def update_fenced(
        self,
        job_id: str,
        *,
        statuses: Iterable[str] | None = None,
        attempt: int | None = None,
        cancel_requested: bool | None = None,
        values: dict[str, Any] | None = None,
        events: int = 0,
        where: Sequence[Any] = (),
    ) -> int | None:
        """Conditionally update a job; return its new ``event_seq`` or None if nothing matched.

        ``events`` sequence numbers are reserved (``event_seq - events + 1 … event_seq``).
        """
        conds = [Job.id == job_id]
        if statuses is not None:
            conds.append(Job.status.in_(tuple(statuses)))
        if attempt is not None:
            conds.append(Job.attempt == attempt)
        if cancel_requested is not None:
            conds.append(Job.cancel_requested.is_(cancel_requested))
        conds.extend(where)
        vals: dict[str, Any] = {"updated_at": utcnow(), **(values or {})}
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

    def heartbeat(self, job_id: str, attempt: int) -> bool | None:
        """Touch the heartbeat of our attempt; returns cancel_requested, or None if fenced off."""
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE_STATUSES))
            .values(heartbeat_at=utcnow())
            .returning(Job.cancel_requested)
            .execution_options(synchronize_session=False)
        )
        return self.session.execute(stmt).scalar_one_or_none()

    def add_event(self, job_id: str, seq: int, kind: str, data: dict[str, Any]) -> JobEvent:
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
        attempt: int | None = None,
        cancel_requested: bool | None = None,
        values: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        where: Sequence[Any] = (),
    ) -> int | None:
        """Move a job to `to_status` if it is in one of `from_statuses` (and at `attempt`).

        Writes the status event in the same transaction. Returns the event seq, or None when
        the job was not in an allowed state (someone else moved it first).
        """
        vals = {"status": to_status, **(values or {})}
        seq = self.update_fenced(
            job_id,
            statuses=from_statuses,
            attempt=attempt,
            cancel_requested=cancel_requested,
            values=vals,
            events=1,
            where=where,
        )
        if seq is None:
            return None
        row = self.session.execute(select(Job.attempt, Job.error).where(Job.id == job_id)).one()
        event = {"status": to_status, "attempt": row.attempt, **(data or {})}
        if to_status == "failed" and row.error is not None:
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
