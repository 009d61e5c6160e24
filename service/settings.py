"""One settings class for the API, the worker and the CLI.

Why one class with an env prefix: every process of a deployment (API, workers, migration job)
reads the same variables (``SHARP_DATABASE_URL``, ``SHARP_REDIS_URL``...), and tests override
them by replacing ``get_settings`` instead of patching ``os.environ`` all over the code.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHARP_", env_file=None, extra="ignore")

    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        description="SQLAlchemy URL. The embedded default (`sharp up`) uses a SQLite file.",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Broker and live feed.")
    artifact_root: Path = Field(
        default=Path("var/artifacts"),
        description="Checkpoint store when `artifact_url` is unset; with an S3 store, the "
        "worker's local scratch (the training process writes here, logs, cached downloads).",
    )
    artifact_url: str | None = Field(
        default=None,
        description="`s3://bucket/prefix`: checkpoints and uploads go to this S3-compatible "
        "bucket (credentials: the standard AWS variables). Unset: the local `artifact_root`.",
    )
    artifact_endpoint_url: str | None = Field(
        default=None, description="The S3 API's URL for MinIO, Ceph RGW, GCS… (unset: AWS)."
    )
    artifact_region: str | None = Field(default=None, description="The bucket's region.")
    artifact_download: Literal["stream", "redirect"] = Field(
        default="stream",
        description="Checkpoint file downloads: streamed through the API, or a 307 redirect "
        "to a presigned URL of the S3 store (the local store always streams).",
    )
    artifact_presign_s: int = Field(
        default=600, ge=1, le=7 * 24 * 3600, description="Lifetime of a presigned URL."
    )
    artifact_retry_s: float = Field(
        default=120.0,
        gt=0,
        description="How long the worker retries an upload to an unreachable store before "
        "the job fails with artifact_write_failed.",
    )
    upload_root: Path = Field(default=Path("var/uploads"), description="Uploaded corpora.")
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1,
        description="One-request uploads (POST /v1/uploads); larger files use upload sessions.",
    )
    max_upload_session_bytes: int = Field(
        default=1024**4,
        ge=1,
        description="The largest file an upload session takes (POST /v1/uploads/sessions).",
    )
    upload_part_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="An upload session's part size when the client does not choose one.",
    )
    upload_min_part_bytes: int = Field(
        default=5 * 1024 * 1024,
        ge=1,
        description="The smallest part size a client may choose (S3's minimum is 5 MiB; "
        "an S3 store never goes below it).",
    )
    upload_session_ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="An upload session expires this long after its last part (its bytes are "
        "then deleted).",
    )
    cache_budget_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Per-team bytes of tokenized and teacher-logit caches; over it the "
        "least recently used entries are evicted after each job. Unset: no budget.",
    )
    max_request_bytes: int = Field(default=1024 * 1024, ge=1, description="JSON bodies.")
    model_allowlist: list[str] = Field(
        default_factory=list,
        description="If non-empty, model sources must start with one of these prefixes.",
    )
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    cancel_grace_s: float = Field(default=30.0, gt=0)
    visibility_timeout_s: int = Field(default=7 * 24 * 3600, gt=0)
    worker_queues: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Legacy name for the worker's pool: its first entry is the pool when "
        "`worker_pool` is unset.",
    )
    worker_pool: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="The GPU pool this worker serves (jobs ask for it in "
        "spec.resources.queue), e.g. 'h100', 'a100-40g', 'cpu'. Its Celery queue has the same "
        "name.",
    )
    worker_gpus: str | None = Field(default=None, description="CUDA_VISIBLE_DEVICES for a worker.")
    worker_gpu_count: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="GPUs this worker gives one job (it runs one job at a time). Default: the "
        "number of devices in `worker_gpus`, else 1.",
    )
    worker_gpu_type: str | None = Field(
        default=None,
        max_length=32,
        description="The card this worker's pool runs on (h100, h200, a100, a100-80g, l40s, a10, "
        "l4, v100, t4, cpu): the job plan's throughput and bf16 check (docs/planning.md).",
    )
    worker_gpu_memory_gb: float | None = Field(
        default=None,
        gt=0,
        le=100_000,
        description="Memory per GPU in GB (1e9 bytes) that job plans fit against; default: the "
        "card's (`worker_gpu_type`). For a 'cpu' pool: the memory a job may use.",
    )
    # -- backends (worker/backends.py, worker/slurm.py, docs/operations.md) ----------------
    worker_backend: Literal["local", "slurm", "kubernetes"] = Field(
        default="local",
        description="How this worker runs a job: 'local' (the training process on this host, "
        "torchrun --standalone for several GPUs), 'slurm' (an sbatch job of "
        "spec.resources.nodes nodes, srun torchrun with c10d rendezvous on the first node) or "
        "'kubernetes' (a Kubeflow PyTorchJob; not run in CI).",
    )
    k8s_image: str | None = Field(
        default=None, description="Kubernetes: the service's image the training pods run."
    )
    k8s_namespace: str = Field(default="default", description="Kubernetes: the namespace.")
    slurm_partition: str | None = Field(default=None, description="sbatch --partition.")
    slurm_account: str | None = Field(default=None, description="sbatch --account.")
    slurm_qos: str | None = Field(default=None, description="sbatch --qos.")
    slurm_gpus_per_node: int = Field(
        default=0,
        ge=0,
        le=64,
        description="GPUs on each node of the partition; 0: CPU nodes (gloo, and "
        "spec.resources.gpus counts processes per node, no --gpus-per-node).",
    )
    slurm_time_limit: str | None = Field(default=None, description="sbatch --time.")
    slurm_signal_grace_s: int = Field(
        default=120,
        ge=1,
        description="--signal=B:USR1@N: Slurm warns N seconds before a time limit or "
        "preemption; the job checkpoints, stops and resumes as attempt + 1.",
    )
    slurm_container_image: str | None = Field(
        default=None, description="Pyxis/Enroot: srun --container-image (unset: no container)."
    )
    slurm_container_mounts: str | None = Field(
        default=None, description="Pyxis: srun --container-mounts (the artifact root, data)."
    )
    slurm_python: str | None = Field(
        default=None, description="The Python on the nodes (default: the worker's own)."
    )
    slurm_rdzv_port: int = Field(
        default=29400, ge=1024, le=65535, description="torchrun's c10d rendezvous port."
    )
    slurm_sbatch_args: list[str] = Field(
        default_factory=list, description="Extra sbatch options, e.g. ['--constraint=h100']."
    )
    slurm_poll_s: float = Field(
        default=2.0, gt=0, description="How often the worker asks squeue about its jobs."
    )
    scheduler_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often each worker re-registers itself (its heartbeat) and runs a "
        "scheduling pass, besides the passes that submissions and finished jobs trigger.",
    )
    queue_refresh_s: float = Field(
        default=1.0,
        gt=0,
        description="With 1000 or more waiting jobs, how often at most an API process "
        "recomputes the stored queue positions after submissions and cancellations (each "
        "recompute reads the whole queue); below that, every such request does.",
    )
    sse_heartbeat_s: float = Field(default=10.0, gt=0)
    host: str = "127.0.0.1"
    port: int = 8000
    redis_prefix: str = Field(
        default="sharp:",
        description="Prefix of every Redis key (Celery queues via kombu's global_keyprefix, the "
        "live event streams), so several deployments or test runs can share one Redis.",
    )
    reaper_interval_s: float = Field(
        default=30.0, gt=0, description="How often a worker looks for jobs whose heartbeat stopped."
    )
    requeue_queued_after_s: float = Field(
        default=900.0,
        gt=0,
        description="A job still queued after this long gets its Celery message sent again "
        "(covers a lost message; a duplicate is harmless because the claim is idempotent).",
    )
    metrics_flush_s: float = Field(
        default=1.0, gt=0, description="The training process writes metric batches this often."
    )
    cancel_poll_s: float = Field(
        default=1.0, gt=0, description="How often the training process reads the cancel flag."
    )
    kill_grace_s: float = Field(
        default=10.0, gt=0, description="After SIGTERM, how long before SIGKILL."
    )
    dataset_file_roots: list[Path] = Field(
        default_factory=list,
        description="Directories dataset.source='files' may read from: each path, symlinks "
        "resolved, must lie under one of these. Empty (the default) refuses 'files' jobs; "
        "`sharp up` uses <var>/data and docker-compose.yml /data/datasets unless this is set.",
    )
    dataset_s3_roots: list[str] = Field(
        default_factory=list,
        description="`s3://bucket/prefix` under which dataset.files may name `s3://` objects "
        "(read with the artifact store's endpoint, region and AWS credentials). Empty (the "
        "default) refuses `s3://` data. The artifact store's own bucket prefix is refused "
        "whatever this says: it holds every team's uploads and checkpoints.",
    )
    hf_token: SecretStr | None = Field(
        default=None,
        description="A Hugging Face token for gated hub models and data sets: the training "
        "process gets it as HF_TOKEN (an HF_TOKEN in the worker's own environment reaches it "
        "too). Never written to a log, an event, a job's error or an API answer: every text "
        "the worker stores or logs is scrubbed of it (docs/operations.md).",
    )
    dataset_scan_rows: int = Field(
        default=100_000,
        ge=0,
        description="At submission, chat and prompt/completion rows of dataset files read "
        "and checked per source (0: none); past this (or dataset_scan_bytes) the rest is "
        "checked when the job starts.",
    )
    dataset_scan_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, description="Bytes of that scan per source."
    )
    worker_name: str | None = Field(
        default=None, description="Recorded on claimed jobs; default: host name and pid."
    )
    # -- webhooks (service/webhooks.py, docs/operations.md) --------------------------------
    webhook_secret_keys: list[str] = Field(
        default_factory=list,
        repr=False,
        description="Fernet keys (JSON list) that encrypt webhook signing secrets at rest: the "
        "first encrypts, every one decrypts, so a new key goes first and an old one is dropped "
        "once no secret needs it. Empty: webhooks cannot be registered. `sharp up` keeps one "
        "in <var>/webhook-key.",
    )
    webhook_allow_http: bool = Field(
        default=False, description="Accept http:// webhook URLs (else https only)."
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Accept webhook URLs whose host resolves to loopback, private, link-local, "
        "multicast or reserved addresses (SSRF guard; checked at registration and delivery).",
    )
    webhook_url_max_length: int = Field(default=2048, ge=16, le=8192)
    webhook_max_endpoints: int = Field(default=20, ge=1, description="Endpoints per team.")
    webhook_max_attempts: int = Field(default=8, ge=1, le=50, description="Per delivery.")
    webhook_backoff_s: float = Field(
        default=30.0, gt=0, description="Wait after the first failed attempt; doubles each time."
    )
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Per attempt.")
    webhook_sweep_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the delivery worker re-sends deliveries whose message was lost "
        "(due longer ago than this).",
    )
    sweep_max_cells: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Most jobs one sweep may create, its final stage included (more: 422).",
    )
    webhook_concurrency: int = Field(
        default=4, ge=1, le=64, description="Deliveries one webhook worker sends at once."
    )

    @field_validator("webhook_secret_keys")
    @classmethod
    def _fernet_keys(cls, keys: list[str]) -> list[str]:
        from cryptography.fernet import Fernet

        for i, key in enumerate(keys):
            try:
                Fernet(key)
            except (ValueError, TypeError):
                raise ValueError(
                    f"entry {i} is not a Fernet key (32 url-safe base64 bytes; make one with "
                    "python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())')"
                ) from None
        return keys

    @field_validator("hf_token")
    @classmethod
    def _no_empty_token(cls, token: SecretStr | None) -> SecretStr | None:
        # an empty variable (compose's ${SHARP_HF_TOKEN:-}) is no token
        return token if token is not None and token.get_secret_value().strip() else None

    @field_validator("dataset_s3_roots")
    @classmethod
    def _s3_roots(cls, roots: list[str]) -> list[str]:
        for i, root in enumerate(roots):
            bucket, _, _ = root.removeprefix("s3://").partition("/")
            if not root.startswith("s3://") or not bucket:
                raise ValueError(f"entry {i} ({root!r}) is not s3://bucket or s3://bucket/prefix")
        return roots

    @property
    def pool(self) -> str:
        """The pool this process serves as a worker."""
        return self.worker_pool or self.worker_queues[0]

    @property
    def gpu_count(self) -> int:
        if self.worker_gpu_count is not None:
            return self.worker_gpu_count
        if self.worker_gpus:
            return len([d for d in self.worker_gpus.split(",") if d.strip()])
        return 1


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_env(settings: Settings) -> dict[str, str]:
    """``SHARP_*`` variables that rebuild `settings` in another process."""
    env: dict[str, str] = {}
    prefix = Settings.model_config.get("env_prefix", "SHARP_")
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        secret = getattr(settings, name)
        if isinstance(secret, SecretStr):  # dumped as '**********': the value itself travels
            value = secret.get_secret_value()
        key = f"{prefix}{name}".upper()
        env[key] = value if isinstance(value, str) else json.dumps(value)
    return env
