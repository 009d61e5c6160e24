"""What the API does with jobs: validate, create, list, cancel, retry, replay.

Services only ``flush()``; the request's session dependency commits (one transaction per
request). Side effects that must not happen for a rolled-back request — the scheduling pass
that may send the Celery message, the live notification — are registered with
`api.txn.after_commit`, so a job is queued only once its row is durable and nothing is queued
when validation fails. The API never sends a job's message itself: `api.scheduler` admits it
when its pool has a free worker and its team's quota allows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api import scheduler
from api.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidStateError,
    NotFoundError,
    QuotaExceededError,
)
from api.ids import new_id
from api.live import LivePublisher
from api.models import TERMINAL_STATUSES, Checkpoint, Job, Team, utcnow
from api.repositories import (
    CheckpointRepository,
    JobRepository,
    MetricRepository,
    UploadRepository,
)
from api.schemas import (
    CheckpointFile,
    CheckpointPublic,
    ErrorBody,
    JobPublic,
    MetricPoint,
    MetricsPublic,
    Progress,
    TeamPublic,
)
from api.settings import Settings
from api.txn import after_commit
from sharp_core.spec import JobRef, JobSpec, ModelSpec, parse_spec

#: Sends the Celery message for a job (job id, pool). Injected so the API holds no worker code.
Dispatch = Callable[[str, str], None]


def confine_dataset_files(files: Sequence[str], roots: Sequence[Path]) -> list[Path]:
    """The real path of each ``spec.dataset.files`` entry, refusing any outside every root.

    Why real paths: a symlink (or ``..``) inside a root may point anywhere, and what matters
    is where the bytes are read from. Why no roots means no files: the server would otherwise
    read, and train a downloadable model on, whatever its own user can read (``/etc/passwd``,
    the deployment's secrets); ``sharp up`` and the compose file configure a root. Called at
    submission (422) and again by the training process just before it reads, which also
    catches a link swapped in after submission. A missing file is not refused here: the
    training process reports it as a data error naming the entry.

    Raises `InvalidRequestError` (422, ``file_not_allowed``, not retryable) naming
    ``spec.dataset.files`` when nothing may be read, else the entry (``spec.dataset.files.N``).
    """
    if not roots:
        raise InvalidRequestError(
            "this deployment reads no dataset files from the server: SHARP_DATASET_FILE_ROOTS "
            "is not set. Upload the data (POST /v1/uploads, then dataset.source 'upload') or "
            "ask the operator for a root.",
            param="spec.dataset.files",
            code="file_not_allowed",
        )
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    out: list[Path] = []
    for i, f in enumerate(files):
        try:
            # The loader expands "~" too, so the check must see the same path it reads.
            real = Path(f).expanduser().resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before 3.13)
            raise InvalidRequestError(
                f"'{f}' cannot be resolved: {e}",
                param=f"spec.dataset.files.{i}",
                code="file_not_allowed",
            ) from None
        if not any(real.is_relative_to(r) for r in real_roots):
            shown = f"'{f}'" if str(real) == f else f"'{f}' (really '{real}')"
            raise InvalidRequestError(
                f"{shown} is outside the directories this deployment reads from",
                param=f"spec.dataset.files.{i}",
                code="file_not_allowed",
            )
        out.append(real)
    return out


def request_hash(body: dict[str, Any]) -> str:
    """Canonical JSON digest: the same body with keys in another order is the same request."""
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"id": job_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        pad = "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(cursor + pad))["id"]
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidRequestError(
            "malformed cursor", param="after", code="invalid_cursor"
        ) from None


def job_public(job: Job, queue: scheduler.QueueInfo | None = None) -> JobPublic:
    training = (job.spec or {}).get("training", {})
    tokens_per_step = (
        training.get("batch_size", 0) * training.get("grad_accum", 1) * training.get("seq_len", 0)
    )
    eta = None
    if job.status in ("running", "cancelling") and job.tokens_per_s and tokens_per_step:
        eta = max(0, job.max_steps - job.step) * tokens_per_step / job.tokens_per_s
    metrics = {k: v for k, v in (job.latest_metrics or {}).items() if isinstance(v, (int, float))}
    return JobPublic(
        id=job.id,
        name=job.name,
        status=job.status,  # type: ignore[arg-type]
        spec=job.spec,
        queue=job.queue,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        progress=Progress(
            step=job.step, max_steps=job.max_steps, tokens_per_s=job.tokens_per_s, eta_s=eta
        ),
        metrics=metrics,
        error=ErrorBody(**job.error) if job.error else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=queue.position if queue else None,
        queue_reason=queue.reason if queue else None,
    )


def checkpoint_files(ckpt: Checkpoint) -> list[CheckpointFile]:
    files = (ckpt.manifest or {}).get("files", {})
    return [
        CheckpointFile(name=name, size=int(meta.get("size", 0)), sha256=str(meta.get("sha256")))
        for name, meta in sorted(files.items())
    ]


@dataclass
class JobService:
    session: Session
    settings: Settings
    live: LivePublisher | None = None
    dispatch: Dispatch | None = None

    @property
    def jobs(self) -> JobRepository:
        return JobRepository(self.session, self.live)

    # -- create ----------------------------------------------------------------------------
    def create(
        self, team: Team, body: dict[str, Any], idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Validate and queue a job. Returns (job, created); created is False on a replay."""
        digest = request_hash(body)
        if idempotency_key is not None:
            existing = self.jobs.get_by_idempotency_key(team.id, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False

        spec = parse_spec(body.get("spec"), prefix="spec")  # type: ignore[arg-type]
        self._check_references(team, spec)
        self._check_queued_quota(team)

        now = utcnow()
        job = Job(
            id=new_id("job"),
            team_id=team.id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            queue=spec.resources.queue,
            gpus=spec.resources.gpus,
            priority=spec.resources.priority,
            status="queued",
            attempt=0,
            max_attempts=spec.resources.max_attempts,
            cancel_requested=False,
            idempotency_key=idempotency_key,
            request_hash=digest if idempotency_key is not None else None,
            step=0,
            max_steps=spec.training.max_steps,
            latest_metrics={},
            event_seq=1,
            created_at=now,
            enqueued_at=now,
            updated_at=now,
        )
        event = {"status": "queued", "attempt": 0}
        try:
            with self.session.begin_nested():
                repo = JobRepository(self.session)  # no live publish inside the savepoint
                repo.add(job)
                repo.add_event(job.id, 1, "status", event)
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race.
            if idempotency_key is None:
                raise
            existing = self.jobs.get_by_idempotency_key(team.id, idempotency_key)
            if existing is None:
                raise
            return self._replay(existing, digest), False
        if self.live is not None:
            after_commit(self.session, lambda: self.live.publish(job.id, 1, "status", event))  # type: ignore[union-attr]
        self._schedule_after_commit()
        return job, True

    @staticmethod
    def _replay(existing: Job, digest: str) -> Job:
        if existing.request_hash != digest:
            raise IdempotencyConflictError(
                "this Idempotency-Key was used with a different request body",
                param="Idempotency-Key",
            )
        return existing

    def _check_references(self, team: Team, spec: JobSpec) -> None:
        """What only the service can check: ids that must exist for this team, operator limits.

        A pool no worker serves is not an error: the job waits, and its ``queue_reason`` says
        why (workers may join later)."""
        roles: list[tuple[str, ModelSpec | None]] = [
            ("teacher", spec.teacher),
            ("student", spec.student),
        ]
        for role, model in roles:
            if model is None or model.model is None:
                continue
            if isinstance(model.model, JobRef):
                ref = self.jobs.get_for_team(team.id, model.model.job)
                if ref is None or ref.status != "succeeded":
                    raise InvalidRequestError(
                        f"job '{model.model.job}' is not a succeeded job of this team",
                        param=f"spec.{role}.model.job",
                        code="unknown_job",
                    )
            else:
                self._check_allowed(model.model, f"spec.{role}.model")
        if spec.tokenizer.name:
            self._check_allowed(spec.tokenizer.name, "spec.tokenizer.name")
        ds = spec.dataset
        if ds.source == "upload":
            assert ds.upload_id is not None  # the spec validator guarantees it
            if UploadRepository(self.session).get_for_team(team.id, ds.upload_id) is None:
                raise InvalidRequestError(
                    f"no upload '{ds.upload_id}' for this team",
                    param="spec.dataset.upload_id",
                    code="unknown_upload",
                )
        if ds.source == "files":
            confine_dataset_files(ds.files, self.settings.dataset_file_roots)

    def _check_allowed(self, name: str, param: str) -> None:
        allow = self.settings.model_allowlist
        if allow and not any(name.startswith(prefix) for prefix in allow):
            raise InvalidRequestError(
                f"model '{name}' is not in this deployment's allow-list",
                param=param,
                code="model_not_allowed",
            )

    def _check_queued_quota(self, team: Team) -> None:
        """Refuse a job over the team's ``max_queued_jobs``. The team row is locked first, so
        concurrent submissions count one after the other (SQLite serialises them anyway)."""
        limit = self.session.scalar(
            select(Team.max_queued_jobs).where(Team.id == team.id).with_for_update()
        )
        if limit is None:
            return
        queued = self.session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.team_id == team.id, Job.status == "queued")
        )
        if (queued or 0) >= limit:
            raise QuotaExceededError(
                f"team quota: {queued} of {limit} queued jobs; wait for some to start or cancel "
                "some (an operator sets the quota with `sharp admin teams quota`)",
                param="team.max_queued_jobs",
            )

    def _schedule_after_commit(self) -> None:
        """A scheduling pass once this request's changes are visible to other processes;
        skipped if another pass is running (see `scheduler.admit`)."""
        factory = sessionmaker(bind=self.session.get_bind(), expire_on_commit=False)
        dispatch, timeout = self.dispatch, self.settings.heartbeat_timeout_s
        after_commit(
            self.session,
            lambda: scheduler.run_pass(factory, dispatch, heartbeat_timeout_s=timeout, wait=False),
        )

    # -- responses -------------------------------------------------------------------------
    def public(self, job: Job) -> JobPublic:
        """`job_public` with the queue position and reason of a queued job."""
        info = scheduler.queue_info(
            self.session, job, heartbeat_timeout_s=self.settings.heartbeat_timeout_s
        )
        return job_public(job, info)

    def team_public(self, team: Team) -> TeamPublic:
        row = self.session.get(Team, team.id, populate_existing=True)
        assert row is not None
        in_use = self.session.scalar(
            select(func.coalesce(func.sum(Job.gpus), 0)).where(
                Job.team_id == team.id, scheduler.busy_condition()
            )
        )
        queued = self.session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.team_id == team.id, Job.status == "queued")
        )
        return TeamPublic(
            id=row.id,
            name=row.name,
            weight=row.weight,
            max_running_gpus=row.max_running_gpus,
            max_queued_jobs=row.max_queued_jobs,
            running_gpus=int(in_use or 0),
            queued_jobs=int(queued or 0),
        )

    # -- read ------------------------------------------------------------------------------
    def get(self, team: Team, job_id: str) -> Job:
        job = self.jobs.get_for_team(team.id, job_id)
        if job is None:
            raise NotFoundError(f"no job '{job_id}'", param="job_id")
        return job

    def list_jobs(
        self, team: Team, *, statuses: Sequence[str] | None, limit: int, after: str | None
    ) -> tuple[Sequence[Job], str | None]:
        before_id = decode_cursor(after) if after else None
        rows = self.jobs.list_for_team(
            team.id, statuses=statuses, limit=limit + 1, before_id=before_id
        )
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
        return page, next_cursor

    # -- cancel / retry --------------------------------------------------------------------
    def cancel(self, team: Team, job_id: str) -> Job:
        """Idempotent. queued → cancelled at once; running → cancelling (the worker finishes it)."""
        job = self.get(team, job_id)
        for _ in range(5):  # each lost race re-reads the row; a handful always suffices
            if job.status in ("cancelling", "cancelled"):
                return job
            if job.status in ("succeeded", "failed"):
                raise InvalidStateError(f"job is already {job.status}", param="job_id")
            if job.status == "queued":
                seq = self.jobs.transition(
                    job.id,
                    "cancelled",
                    from_statuses=("queued",),
                    values={"cancel_requested": True, "finished_at": utcnow()},
                )
                if seq is not None and job.admitted_at is not None:
                    self._schedule_after_commit()  # its slot is free again
            else:  # running
                seq = self.jobs.transition(
                    job.id,
                    "cancelling",
                    from_statuses=("running",),
                    values={"cancel_requested": True},
                )
            job = self.jobs.get(job.id)  # type: ignore[assignment]
            if seq is not None:
                return job
        raise InvalidStateError("the job changed state too often; try again", param="job_id")

    def retry(self, team: Team, job_id: str) -> Job:
        """A failed or cancelled job goes back to the queue with a fresh attempt budget; the
        trainer resumes from the newest checkpoint that verifies."""
        job = self.get(team, job_id)
        if job.status not in ("failed", "cancelled"):
            raise InvalidStateError(
                f"only failed or cancelled jobs can be retried; this one is {job.status}",
                param="job_id",
            )
        budget = int((job.spec.get("resources") or {}).get("max_attempts", 3))
        self._check_queued_quota(team)
        seq = self.jobs.transition(
            job.id,
            "queued",
            from_statuses=("failed", "cancelled"),
            values={
                "cancel_requested": False,
                "error": None,
                "finished_at": None,
                "enqueued_at": utcnow(),
                "admitted_at": None,
                "max_attempts": job.attempt + budget,
            },
            data={"reason": "retry"},
        )
        if seq is None:
            job = self.get(team, job_id)
            if job.status == "queued":
                return job  # a concurrent retry won; same outcome
            raise InvalidStateError(f"job is {job.status}", param="job_id")
        job = self.jobs.get(job.id)  # type: ignore[assignment]
        self._schedule_after_commit()
        return job

    # -- metrics and checkpoints -----------------------------------------------------------
    def metrics(
        self, team: Team, job_id: str, *, after: int | None, limit: int, names: Sequence[str]
    ) -> MetricsPublic:
        job = self.get(team, job_id)
        rows = MetricRepository(self.session).replay(
            job.id, after_step=-1 if after is None else after, limit_steps=limit, names=names
        )
        data = [MetricPoint(step=s, values=v) for s, v in rows]
        return MetricsPublic(data=data, next_after=data[-1].step if data else after)

    def checkpoints(self, team: Team, job_id: str) -> list[CheckpointPublic]:
        """Checkpoints whose folder still exists (the trainer prunes old ones)."""
        job = self.get(team, job_id)
        out = []
        for ck in CheckpointRepository(self.session).list(job.id):
            if not (Path(ck.path) / "manifest.json").is_file():
                continue
            out.append(
                CheckpointPublic(
                    step=ck.step,
                    metrics=ck.metrics or {},
                    files=checkpoint_files(ck),
                    created_at=ck.created_at,
                )
            )
        return out

    def checkpoint(self, team: Team, job_id: str, step: int) -> Checkpoint:
        job = self.get(team, job_id)
        ck = CheckpointRepository(self.session).get(job.id, step)
        if ck is None or not (Path(ck.path) / "manifest.json").is_file():
            raise NotFoundError(f"no checkpoint at step {step}", param="step")
        return ck


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES
