"""The service's tables (SQLAlchemy 2 typed models).

Postgres is the source of truth: Celery only delivers job ids, Redis only wakes up
listeners. So everything a client can replay lives here: every status transition and every
metric batch is a `JobEvent` with a per-job sequence number (the SSE ``id:``), metrics are
unique per (job, step, name) so a resumed attempt cannot duplicate them, and each job row
carries the attempt number that fences writes from a stale training process.

Constraint names follow one convention (the Alembic docs' recipe, as polar does) so
migrations can drop and alter them by name on every backend.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.lifecycle import JOB_STATUSES

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type and hands back naive values; this puts UTC back on them so
    API responses and heartbeat arithmetic never mix naive and aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        if value is not None and dialect.name == "sqlite":
            # Stored as text there: one zone keeps string comparison (heartbeat cutoffs) right.
            value = value.astimezone(dt.timezone.utc)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Team(Base):
    """A team, with the scheduler's limits for it (`service.scheduler`).

    ``weight`` is the team's share of each pool relative to other teams (equal by default);
    the quotas are None for "no limit".
    """

    __tablename__ = "teams"
    __table_args__ = (
        CheckConstraint("weight > 0", name="weight_positive"),
        CheckConstraint("max_running_gpus >= 0", name="max_running_gpus_nonnegative"),
        CheckConstraint("max_queued_jobs >= 0", name="max_queued_jobs_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    weight: Mapped[float] = mapped_column(Double, default=1.0, server_default="1")
    max_running_gpus: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    # Bytes of tokenized and teacher-logit caches the team may keep (`service.caches`);
    # None: the deployment's default (SHARP_CACHE_BUDGET_BYTES).
    cache_budget_bytes: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    """A team's API key. Only its sha256 is stored; `prefix` is what humans see and revoke by."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in JOB_STATUSES)), name="status"
        ),
        CheckConstraint("attempt >= 0", name="attempt_nonnegative"),
        UniqueConstraint("team_id", "idempotency_key"),
        Index("ix_jobs_team_id_id", "team_id", "id"),
        Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
        Index("ix_jobs_status_queue", "status", "queue"),
        CheckConstraint("gpus >= 0", name="gpus_nonnegative"),
    )

    # "job_" + a ULID: sortable by creation time, so "newest first" is ORDER BY id DESC.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The GPU pool (spec.resources.queue); each pool is its own Celery queue.
    queue: Mapped[str] = mapped_column(String(64))
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set when the scheduler admits the job (its Celery message is sent after that commit);
    # NULL while it waits for capacity or its team's quota. Only admitted jobs can be claimed.
    admitted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # A waiting job's place in its pool and why it waits, as the latest scheduling pass
    # computed them (`service.scheduler.refresh_positions`), so reading a job does not
    # replay the queue; NULL until a pass has placed it (and again when it is re-queued).
    queue_position: Mapped[int | None] = mapped_column(Integer)
    queue_reason: Mapped[str | None] = mapped_column(String(200))
    # Written only by `service.lifecycle`'s transitions.
    status: Mapped[str] = mapped_column(String(16), default="queued", server_default="queued")
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Progress, written by the training process with each metric batch.
    step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_steps: Mapped[int] = mapped_column(Integer)
    tokens_per_s: Mapped[float | None] = mapped_column(Double)
    latest_metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # Last JobEvent.seq handed out; bumped by an UPDATE so appends are serialised per job.
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When the job's Celery message was last sent (the reaper re-sends lost ones).
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # The plan made at submission (`service.plans`), and the highest peak memory the training
    # process reported (MiB; its `peak_mem_mb` metric), shown side by side in GET /v1/jobs/{id}.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    peak_mem_mb: Mapped[float | None] = mapped_column(Double)

    # The backend's id for the current attempt (a Slurm job id), so a worker that lost the
    # supervisor adopts the running job instead of submitting it again (`worker.backends`).
    backend_job_id: Mapped[str | None] = mapped_column(String(64))

    #: sha256 of the loaded teacher (`sharp_core.cache.teacher_cache.teacher_digest`), written
    #: by the training process: the leaderboard lists a teacher's students by it.
    teacher_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    #: {code, message, param} when `spec.evaluation` failed; the job still succeeds.
    evaluation_error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class StepCost(Base):
    """A finished job's measured speed on its pool's card: the table job plans estimate
    throughput from (`sharp_core.train.plan.throughput`)."""

    __tablename__ = "step_costs"
    __table_args__ = (Index("ix_step_costs_gpu_type_id", "gpu_type", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32))
    gpu_type: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(32))
    student_params: Mapped[int] = mapped_column(BigInteger)
    seq_len: Mapped[int] = mapped_column(Integer)
    world_size: Mapped[int] = mapped_column(Integer)
    tokens_per_s: Mapped[float] = mapped_column(Double)
    flops_per_token: Mapped[float] = mapped_column(Double)
    mfu: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobEvent(Base):
    """One entry of a job's log: a status change, a metric batch or a checkpoint.

    ``seq`` is dense per job and allocated under the job row's lock, so a reader that has
    seen ``seq <= n`` can never later find an uncommitted ``n - 1``: replay from
    ``Last-Event-ID`` is exact.
    """

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Metric(Base):
    """One scalar at one step. The primary key (job, step, name) makes writes idempotent:
    a resumed attempt that re-runs steps past its checkpoint cannot duplicate them."""

    __tablename__ = "metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Double)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Upload(Base):
    """A training corpus, stored once per content hash (``upload_root/ab/abcdef….ext``)."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("team_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


#: ``upload_sessions.status``: taking parts, an ordinary upload now, or given up.
UPLOAD_SESSION_STATUSES = ("open", "completed", "aborted")


class UploadSession(Base):
    """A resumable upload (`service.upload_sessions`): parts sent by offset into a staging
    object (a local file, or an S3 multipart upload), verified against ``sha256`` at the end
    and then an `Upload`. ``received`` is the byte count the server holds, where a client
    resumes; ``parts`` the S3 parts' ETags by number (empty for the local store)."""

    __tablename__ = "upload_sessions"
    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in UPLOAD_SESSION_STATUSES)),
            name="status",
        ),
        CheckConstraint("received >= 0 AND received <= size", name="received_in_size"),
        Index("ix_upload_sessions_team_id_sha256", "team_id", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    part_size: Mapped[int] = mapped_column(BigInteger)
    received: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    store_key: Mapped[str] = mapped_column(Text)
    multipart_id: Mapped[str | None] = mapped_column(Text)
    parts: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    upload_id: Mapped[str | None] = mapped_column(ForeignKey("uploads.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Worker(Base):
    """A registered Celery worker: one slot that runs one job at a time on ``gpus`` GPUs.

    The scheduler counts a pool's capacity from the workers whose heartbeat is fresh, so a
    host that disappears stops receiving jobs after ``heartbeat_timeout_s``.
    """

    __tablename__ = "workers"
    __table_args__ = (
        CheckConstraint("gpus >= 0", name="gpus_nonnegative"),
        Index("ix_workers_pool_heartbeat_at", "pool", "heartbeat_at"),
    )

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64))
    gpus: Mapped[int] = mapped_column(Integer)
    hostname: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the pool's job plans fit against (SHARP_WORKER_GPU_TYPE / _GPU_MEMORY_GB).
    gpu_type: Mapped[str | None] = mapped_column(String(32))
    gpu_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # What its backend offers: "local" (one host, torchrun --standalone) or "slurm" (jobs of
    # up to `max_nodes` nodes with `gpus_per_node` each; `backend_info`: partition, nodes).
    backend: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    max_nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    gpus_per_node: Mapped[int | None] = mapped_column(Integer)
    backend_info: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


#: ``webhook_deliveries.status``: waiting for its next attempt, delivered, or given up.
DELIVERY_STATUSES = ("pending", "succeeded", "failed")


class WebhookEndpoint(Base):
    """A team's webhook URL and the events it subscribes to (`service.webhooks`).

    The signing secret is stored Fernet-encrypted (signing needs the plaintext, so a hash
    would not do); ``secret_prefix`` is what a human sees, as with API keys.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_team_id_id", "team_id", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSONType)
    description: Mapped[str | None] = mapped_column(String(200))
    secret_encrypted: Mapped[str] = mapped_column(Text)
    secret_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row, written in the transaction that ended the
    job, so a crash cannot lose it. ``body`` is the exact JSON sent on every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in DELIVERY_STATUSES)), name="status"
        ),
        UniqueConstraint("endpoint_id", "event_id"),
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(32))
    event_type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the next attempt is due (NULL once delivered or given up); a claimed attempt
    # pushes it forward by a lease, so the sweeper re-sends only lost messages.
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: what came back and how long it took."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float | None] = mapped_column(Double)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class TeacherCache(Base):
    """A team's teacher-logit cache (`sharp_core.cache.teacher_cache`): one row per key, written by
    the training process that built or read it; the files live in the artifact store under
    ``teacher-caches/<team>/<key>/``. ``parts`` is what the key hashes (teacher, tokenizer,
    data set, packing, kind, k…)."""

    __tablename__ = "teacher_caches"
    __table_args__ = (UniqueConstraint("team_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    k: Mapped[int] = mapped_column(Integer)
    parts: Mapped[dict[str, Any]] = mapped_column(JSONType)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    shards: Mapped[int] = mapped_column(Integer)
    positions: Mapped[int] = mapped_column(BigInteger)
    built_by_job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class TeacherCacheUse(Base):
    """A job that built (``role`` 'built') or read ('read') a teacher cache."""

    __tablename__ = "teacher_cache_uses"

    cache_id: Mapped[int] = mapped_column(
        ForeignKey("teacher_caches.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CacheRecord(Base):
    """A cache entry in the artifact store (`service.caches`): a tokenized data set
    (``kind`` 'data-caches') or a teacher-logit cache ('teacher-caches'). The files are the
    truth of what exists; this row holds when a job last read it (least recently used goes
    first when the team is over its budget) and is the lock eviction and readers share."""

    __tablename__ = "cache_entries"
    __table_args__ = (
        UniqueConstraint("team_id", "kind", "key"),
        Index("ix_cache_entries_team_id_last_used_at", "team_id", "last_used_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CacheRecordUse(Base):
    """A job that read or built a cache entry: while that job is active the entry is not
    evicted."""

    __tablename__ = "cache_entry_uses"

    entry_id: Mapped[int] = mapped_column(
        ForeignKey("cache_entries.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    used_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


#: ``sweep_cells.stage``: tuning (selection on val) or the final re-training on fresh seeds.
SWEEP_STAGES = ("tune", "final")


class Sweep(Base):
    """A sweep (`service.sweeps`): the request, and the facts only the sweep owns. Its
    status is derived from its cells' jobs (the lifecycle owns job statuses); each of
    ``final_started_at`` and ``finished_at`` is set once, by a conditional UPDATE, so the
    final stage is created once and ``sweep.finished`` is enqueued once."""

    __tablename__ = "sweeps"
    __table_args__ = (
        Index("ix_sweeps_team_id_id", "team_id", "id"),
        UniqueConstraint("team_id", "idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    reference: Mapped[str | None] = mapped_column(String(64))
    # As jobs have them: the same key and body → the same sweep, another body → 409.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    #: method → the configuration key chosen on val (written with ``final_started_at``).
    chosen: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    cancel_requested_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    final_started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class SweepCell(Base):
    """One cell of a sweep: an ordinary job plus where it came from (stage, method,
    configuration, seed, the spec paths it overrides)."""

    __tablename__ = "sweep_cells"
    __table_args__ = (
        CheckConstraint(
            "stage IN ({})".format(", ".join(f"'{s}'" for s in SWEEP_STAGES)), name="stage"
        ),
        UniqueConstraint("job_id"),
    )

    sweep_id: Mapped[str] = mapped_column(
        ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(String(8))
    method: Mapped[str] = mapped_column(String(64))
    config: Mapped[str] = mapped_column(String(100))
    seed: Mapped[int] = mapped_column(BigInteger)
    overrides: Mapped[dict[str, Any]] = mapped_column(JSONType)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))


class TeacherScore(Base):
    """A teacher's harness scores (`sharp_core.train.downstream`), computed once per key
    (teacher weights, tasks with their files' content, few-shot, limit) and read by every
    later job of the team with that key."""

    __tablename__ = "teacher_scores"
    __table_args__ = (
        UniqueConstraint("team_id", "key"),
        Index("ix_teacher_scores_team_id_teacher_digest", "team_id", "teacher_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    teacher_digest: Mapped[str] = mapped_column(String(64))
    scores: Mapped[dict[str, Any]] = mapped_column(JSONType)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONType)
    computed_by_job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
