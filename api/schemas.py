"""Request and response bodies, one schema per entity (`JobCreate`, `JobPublic`, `JobsPublic`…).

Why the spec is validated as a plain dict in `JobCreate`: `sharp_core.spec.parse_spec` is the
one validator of job specs, shared with the CLI and the library, and it names the offending
field as ``spec.training.lr``. The OpenAPI document still publishes the ``JobSpec`` schema
itself (`SpecBody`), generated from the pydantic model, so clients and fuzzers see every
field, bound and default.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.lifecycle import JobStatus, shown_status
from service.plans import usage as plan_usage
from service.progress import progress
from sharp_core.spec import EvaluationJobSpec, JobSpec
from sharp_core.study.sweep import SweepSpec

if TYPE_CHECKING:
    from service.jobs import MetricsPage, TeamUsage
    from service.models import Checkpoint, Job, Sweep
    from service.scheduler import QueueInfo
    from service.sweeps import SweepView

EXAMPLE_SPEC: dict[str, Any] = {
    "name": "opt-1.3b-to-125m",
    "teacher": {"model": "facebook/opt-1.3b"},
    "student": {"model": "facebook/opt-125m", "init": "pretrained"},
    "dataset": {"source": "upload", "upload_id": "upl_01J8Z3Q4W5E6R7T8Y9U0I1O2P3"},
    "method": {"name": "sharp", "kd_weight": 0.9, "rank": 32},
    "training": {"max_steps": 2000, "batch_size": 8, "seq_len": 512, "lr": 5e-4},
    "resources": {"queue": "default"},
}


class ErrorItem(BaseModel):
    code: str = Field(examples=["invalid_spec"])
    message: str = Field(examples=["spec.training.lr: Input should be less than or equal to 1"])
    param: str | None = Field(default=None, examples=["spec.training.lr"])


class ErrorBody(ErrorItem):
    """The first error; `errors` lists every one a validation found (the first included),
    so an invalid spec is fixed in one go. Absent for an error that stands alone."""

    errors: list[ErrorItem] | None = Field(default=None)


class ErrorResponse(BaseModel):
    error: ErrorBody


#: A spec as the request carries it: validated here only as a JSON object (`parse_spec` does
#: the rest, with its error naming), documented as ``JobSpec`` (``json_schema_input_type``
#: only changes the JSON schema, never what is accepted).
SpecBody = Annotated[dict[str, Any], BeforeValidator(lambda v: v, json_schema_input_type=JobSpec)]


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"spec": EXAMPLE_SPEC}]},
    )

    spec: SpecBody = Field(
        description="The job spec; every field, bound and default: docs/spec.md."
    )


EvaluationSpecBody = Annotated[
    dict[str, Any], BeforeValidator(lambda v: v, json_schema_input_type=EvaluationJobSpec)
]


class EvaluationCreate(BaseModel):
    """Body of ``POST /v1/evaluations``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "spec": {
                        "model": {"model": {"job": "job_01J8Z3Q4W5E6R7T8Y9U0I1O2P3"}},
                        "evaluation": {
                            "harness": {"tasks": ["/data/datasets/evals/my_task.yaml"]},
                            "generation": {"set": "/data/datasets/evals/prompts.jsonl"},
                        },
                    }
                }
            ]
        },
    )

    spec: EvaluationSpecBody = Field(description="What to score and on what: docs/evaluation.md.")


class Progress(BaseModel):
    step: int
    max_steps: int
    tokens_per_s: float | None = None
    eta_s: float | None = Field(default=None, description="Seconds left at the current speed.")


class Step0Eval(BaseModel):
    """The student's evaluation at step 0, before any training (null: not recorded)."""

    eval_ppl: float | None = Field(default=None, description="Language models: perplexity.")
    eval_accuracy: float | None = Field(default=None, description="Classifiers: accuracy.")
    eval_macro_f1: float | None = Field(default=None, description="Classifiers: macro-F1.")


class PruningPublic(BaseModel):
    """What pruning the student from the teacher kept and cost (docs/pruning.md): the
    training process's 'pruned' event, plus the step-0 evaluation from the metrics."""

    kept_layers: list[int] = Field(description="The teacher's layer indices the student kept.")
    heads_per_layer: dict[str, list[int]] = Field(
        description="Teacher layer index → the teacher's query heads kept in it."
    )
    kv_heads_per_layer: dict[str, list[int]] | None = Field(
        default=None,
        description="Grouped-query models whose key/value heads differ from the query heads.",
    )
    ffn: int | None = Field(default=None, description="MLP width of the student.")
    hidden: int | None = Field(default=None, description="Hidden size of the student.")
    params_before: int = Field(description="Parameters of the teacher.")
    params_after: int = Field(description="Parameters of the pruned student.")
    scoring: str = Field(description="'activation' (calibration pass) or 'magnitude'.")
    calibration_samples: int = Field(description="Blocks of training data scored.")
    calibration_s: float = Field(description="Seconds the calibration pass took.")
    note: str | None = Field(
        default=None, description="Set when the calibration set was smaller than asked for."
    )
    attempt: int | None = Field(default=None, description="The attempt that pruned.")
    eval_at_step_0: Step0Eval


class TeacherCacheJobUse(BaseModel):
    """A teacher-logit cache a job built or read (docs/teacher-cache.md)."""

    key: str = Field(description="sha256 of the key parts (see GET /v1/teacher-caches).")
    kind: str = Field(description="'topk' or 'sampled'.")
    k: int = Field(description="Top-k entries, or draws per position (sampled).")
    role: Literal["built", "read"]
    attempt: int
    size_bytes: int
    at: dt.datetime


class PlannedMeasured(BaseModel):
    planned: float | None = None
    measured: float | None = None


class PlanUsage(BaseModel):
    """The plan's predictions beside what the training process reported (measured peak:
    CUDA's max_memory_allocated on a GPU, the process's peak RSS on a CPU)."""

    peak_memory_gb: PlannedMeasured
    tokens_per_s: PlannedMeasured


class EvaluationPublic(BaseModel):
    """A job's downstream evaluation (docs/evaluation.md)."""

    teacher_digest: str | None = Field(
        default=None, description="sha256 of the teacher's weights: its leaderboard's id."
    )
    scores: dict[str, float] = Field(description="harness/<task>/<metric> (and _stderr).")
    teacher_scores: dict[str, float] | None = Field(
        default=None, description="The teacher's scores on the same tasks, few-shot and limit."
    )
    teacher_scores_reused: bool | None = Field(
        default=None, description="True: another job of the team had computed them."
    )
    retained: dict[str, float] = Field(description="retained/<task>/<metric> = student / teacher.")
    answer_quality: dict[str, float] = Field(
        description="gen/rougeL (ROUGE-L F1), gen/exact_match over short references, gen/answers."
    )
    answer_samples: list[dict[str, Any]] = Field(
        default_factory=list, description="Prompt, reference, answer and ROUGE-L of a few answers."
    )
    error: dict[str, Any] | None = Field(
        default=None, description="{code, message, param} when the evaluation failed."
    )


class StudentRow(BaseModel):
    job_id: str
    name: str
    status: str
    method: str
    init: str
    params: int | None = None
    tokens_seen: int
    ppl: float | None = None
    ppl_metric: str | None = None
    scores: dict[str, float] = Field(description="harness/…, retained/… and gen/… metrics.")
    evaluation_error: dict[str, Any] | None = None
    created_at: dt.datetime


class TeacherScoresRow(BaseModel):
    key: str
    scores: dict[str, float]
    tasks: list[str] | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    computed_by_job_id: str | None = None
    created_at: dt.datetime


class LeaderboardPublic(BaseModel):
    """``GET /v1/teachers/{digest}/students``."""

    teacher_digest: str
    teacher_params: int | None = None
    teacher_scores: list[TeacherScoresRow]
    students: list[StudentRow]


class TeacherSummary(BaseModel):
    teacher_digest: str
    students: int


class TeachersPublic(BaseModel):
    data: list[TeacherSummary]


class JobPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job_01J8Z3Q4W5E6R7T8Y9U0I1O2P3",
                    "name": "opt-1.3b-to-125m",
                    "status": "running",
                    "spec": EXAMPLE_SPEC,
                    "queue": "default",
                    "attempt": 1,
                    "max_attempts": 3,
                    "cancel_requested": False,
                    "progress": {
                        "step": 120,
                        "max_steps": 2000,
                        "tokens_per_s": 51200.0,
                        "eta_s": 150.4,
                    },
                    "metrics": {"loss": 3.21, "lr": 0.0005},
                    "error": None,
                    "created_at": "2026-05-20T10:00:00Z",
                    "started_at": "2026-05-20T10:00:02Z",
                    "finished_at": None,
                    "queue_position": None,
                    "queue_reason": None,
                    "pruning": None,
                }
            ]
        }
    )

    id: str
    name: str
    status: JobStatus
    spec: dict[str, Any]
    queue: str
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    metrics: dict[str, float] = Field(description="Latest value of each metric.")
    error: ErrorBody | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    queue_position: int | None = Field(
        default=None,
        description="Queued jobs: 1 = the next its pool admits (in the scheduler's fair-share "
        "order), 0 = admitted and waiting for a worker to start it, null when it cannot run "
        "as things stand (see queue_reason). Null for jobs that are not queued.",
        examples=[3],
    )
    queue_reason: str | None = Field(
        default=None,
        description="Why a queued job is not running yet; for a running job whose backend "
        'has its own queue (a Slurm pool), why that queue still holds it ("slurm: '
        'Resources"), null once it runs.',
        examples=[
            "waiting for a free h100",
            "team quota: 4 of 4 GPUs in use",
            "no worker serves pool 'h100'",
        ],
    )
    pruning: PruningPublic | None = Field(
        default=None,
        description="Jobs whose student is pruned from the teacher (student.init 'prune'), once "
        "the training process has reported it: the kept layers and heads, parameters before and "
        "after, the calibration, and the evaluation at step 0. Filled in the answers about one "
        "job (GET /v1/jobs/{job_id}, cancel, retry); null in lists and for every other job.",
    )
    teacher_cache: list[TeacherCacheJobUse] | None = Field(
        default=None,
        description="Jobs with method.teacher_cache.mode 'use': the cache(s) the job built or "
        "read, latest first (empty until the training process reports it). Filled in the "
        "answer of GET /v1/jobs/{job_id}; null in lists and for other jobs.",
    )
    plan: dict[str, Any] | None = Field(
        default=None,
        description="The plan made at submission (docs/planning.md): memory per GPU by "
        "component, strategy, expected tokens/s and cost, the levers it pulled, preflight "
        "findings and what is unknown (a sweep's cells are planned as jobs are). Null for jobs "
        "from before plans.",
    )
    usage: PlanUsage | None = Field(
        default=None,
        description="Planned against measured: peak memory per GPU (GB) and tokens/s.",
    )
    evaluation: EvaluationPublic | None = Field(
        default=None,
        description="Jobs with spec.evaluation or a teacher: harness scores beside the "
        "teacher's, retained = student / teacher, answer quality with sample answers, and the "
        "evaluation's error (the job still succeeds). Filled in GET /v1/jobs/{job_id}; null in "
        "lists.",
    )


class JobPlanPublic(BaseModel):
    """``POST /v1/jobs/plan``: the plan of a spec, and the spec as it would run (with the
    levers the plan pulled, e.g. resources.student_parallel 'fsdp')."""

    plan: dict[str, Any]
    spec: dict[str, Any]


class TeamPublic(BaseModel):
    """``GET /v1/teams/me``: the caller's team, its scheduler limits and what it uses now."""

    id: str
    name: str
    weight: float = Field(description="Share of each pool relative to other teams (default 1).")
    max_running_gpus: int | None = Field(
        description="GPUs the team's admitted and running jobs may hold at once; null: no limit."
    )
    max_queued_jobs: int | None = Field(
        description="Queued jobs the team may have; a submission beyond it is a 429 "
        "quota_exceeded. Null: no limit."
    )
    running_gpus: int = Field(description="GPUs held now by admitted and running jobs.")
    queued_jobs: int


class TeacherCacheJob(BaseModel):
    job_id: str
    role: Literal["built", "read"]
    attempt: int
    at: dt.datetime


class TeacherCachePublic(BaseModel):
    """One of the team's teacher-logit caches (docs/teacher-cache.md)."""

    key: str = Field(description="sha256 of `parts`; the cache's folder name.")
    kind: str = Field(description="'topk' or 'sampled'.")
    k: int = Field(description="Top-k entries, or draws per position (sampled).")
    parts: dict[str, Any] = Field(
        description="What the key hashes: teacher (weights+config sha256), tokenizer, dataset "
        "(documents sha256), packing (seq_len, blocks, blocks_sha256), vocab, kind, k, "
        "temperature, dtype (and sample_seed)."
    )
    size_bytes: int
    shards: int
    positions: int = Field(description="Token positions covered (blocks × (seq_len − 1)).")
    present: bool = Field(
        description="False once the files are gone (a corrupt cache is discarded; the next "
        "job with this key rebuilds it)."
    )
    built_by_job_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    jobs: list[TeacherCacheJob] = Field(description="Jobs that built or read it, oldest first.")


class TeacherCachesPublic(BaseModel):
    data: list[TeacherCachePublic]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None = Field(
        default=None, description="Pass as `after` for the next page; null on the last page."
    )


class MetricPoint(BaseModel):
    step: int
    values: dict[str, float]


class MetricsPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": [
                        {"step": 1, "values": {"loss": 5.6, "lr": 0.0001}},
                        {"step": 2, "values": {"loss": 5.4, "lr": 0.0002}},
                    ],
                    "next_after": 2,
                }
            ]
        }
    )

    data: list[MetricPoint]
    next_after: int | None = Field(
        default=None, description="Pass as `after` for the next page; null when caught up."
    )


class CheckpointFile(BaseModel):
    name: str
    size: int
    sha256: str


class CheckpointPublic(BaseModel):
    step: int
    metrics: dict[str, Any]
    files: list[CheckpointFile]
    created_at: dt.datetime


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]


class UploadPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "upl_01J8Z3Q4W5E6R7T8Y9U0I1O2P3",
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "size": 1048576,
                    "filename": "corpus.jsonl",
                    "format": "jsonl",
                    "created_at": "2026-05-20T10:00:00Z",
                }
            ]
        }
    )

    id: str
    sha256: str
    size: int
    filename: str
    format: Literal["txt", "jsonl", "parquet"]
    created_at: dt.datetime


_SHA_EXAMPLE = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class UploadSessionCreate(BaseModel):
    """A resumable upload: the file's name, size and the sha256 it must have at the end."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"filename": "corpus.jsonl", "size": 53687091200, "sha256": _SHA_EXAMPLE}]
        },
    )

    filename: str = Field(
        min_length=1, max_length=1000, description="Its extension tells the format."
    )
    size: int = Field(ge=1, description="The file's length in bytes.")
    sha256: str = Field(min_length=64, max_length=64, description="Checked at completion.")
    format: Literal["txt", "jsonl", "parquet"] | None = Field(
        default=None, description="Overrides the file name's extension."
    )
    part_size: int | None = Field(
        default=None, ge=1, description="Bytes per part (default: the server's upload_part_bytes)."
    )


class UploadSessionComplete(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}]})

    sha256: str | None = Field(
        default=None,
        min_length=64,
        max_length=64,
        description="Replaces the sha256 declared at creation (after a 422 on sha256).",
    )


class UploadSessionPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ups_01J8Z3Q4W5E6R7T8Y9U0I1O2P3",
                    "status": "open",
                    "filename": "corpus.jsonl",
                    "format": "jsonl",
                    "size": 53687091200,
                    "sha256": _SHA_EXAMPLE,
                    "part_size": 67108864,
                    "offset": 134217728,
                    "created_at": "2026-05-20T10:00:00Z",
                    "expires_at": "2026-05-27T10:00:00Z",
                    "upload": None,
                }
            ]
        }
    )

    id: str
    status: Literal["open", "completed", "aborted", "expired"]
    filename: str
    format: Literal["txt", "jsonl", "parquet"]
    size: int
    sha256: str
    part_size: int
    offset: int = Field(description="Bytes the server holds: the next part starts here.")
    created_at: dt.datetime
    expires_at: dt.datetime
    upload: UploadPublic | None = Field(
        default=None, description="The upload it became (status completed)."
    )


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


# -- shaping service results into responses --------------------------------------------------
def job_public(
    job: Job,
    queue: QueueInfo | None = None,
    pruning: dict[str, Any] | None = None,
    teacher_cache: list[dict[str, Any]] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> JobPublic:
    """A job row as the API shows it; ``progress`` (the ETA) comes from `service.progress`,
    ``pruning`` from `service.jobs.JobService.pruning`."""
    metrics = {k: v for k, v in (job.latest_metrics or {}).items() if isinstance(v, (int, float))}
    # queued while its backend still holds a claimed job (Slurm PENDING): past the service's
    # queue (position 0), waiting in the backend's for `queue_reason`
    status = shown_status(job.status, job.queue_reason)
    held = status == JobStatus.QUEUED and job.status == JobStatus.RUNNING.value
    return JobPublic(
        id=job.id,
        name=job.name,
        status=status,
        spec=job.spec,
        queue=job.queue,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        progress=Progress(
            **progress(job.status, job.step, job.max_steps, job.tokens_per_s, job.spec)
        ),
        metrics=metrics,
        error=ErrorBody(**job.error) if job.error else None,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=queue.position if queue else (0 if held else None),
        queue_reason=queue.reason if queue else (job.queue_reason if held else None),
        pruning=PruningPublic.model_validate(pruning) if pruning else None,
        teacher_cache=None
        if teacher_cache is None
        else [TeacherCacheJobUse.model_validate(u) for u in teacher_cache],
        plan=getattr(job, "plan", None),
        usage=PlanUsage.model_validate(u) if (u := plan_usage(job)) else None,
        evaluation=EvaluationPublic.model_validate(evaluation) if evaluation else None,
    )


def team_public(usage: TeamUsage) -> TeamPublic:
    t = usage.team
    return TeamPublic(
        id=t.id,
        name=t.name,
        weight=t.weight,
        max_running_gpus=t.max_running_gpus,
        max_queued_jobs=t.max_queued_jobs,
        running_gpus=usage.running_gpus,
        queued_jobs=usage.queued_jobs,
    )


def metrics_public(page: MetricsPage) -> MetricsPublic:
    return MetricsPublic(
        data=[MetricPoint(step=s, values=v) for s, v in page.steps], next_after=page.next_after
    )


def checkpoint_public(ckpt: Checkpoint) -> CheckpointPublic:
    files = (ckpt.manifest or {}).get("files", {})
    return CheckpointPublic(
        step=ckpt.step,
        metrics=ckpt.metrics or {},
        files=[
            CheckpointFile(name=name, size=int(meta.get("size", 0)), sha256=str(meta.get("sha256")))
            for name, meta in sorted(files.items())
        ],
        created_at=ckpt.created_at,
    )


# --------------------------------------------------------------------------- sweeps
EXAMPLE_SWEEP: dict[str, Any] = {
    "name": "kd-vs-sharp",
    "base": {
        **EXAMPLE_SPEC,
        "dataset": {
            **EXAMPLE_SPEC["dataset"],
            "eval": {
                "val": {"source": "upload", "upload_id": "upl_01J8Z3Q4W5E6R7T8Y9U0VAL000"},
                "test": {"source": "upload", "upload_id": "upl_01J8Z3Q4W5E6R7T8Y9U0TEST00"},
            },
        },
    },
    "axes": {"training.seed": [0, 1, 2]},
    "tune": {
        "trials": 8,
        "search": "random",
        "seed": 0,
        "space": {
            "kd": {"training.lr": {"low": 1e-4, "high": 1e-3, "log": True}},
            "sharp": {
                "training.lr": {"low": 1e-4, "high": 1e-3, "log": True},
                "method.rank": [16, 32, 64],
            },
        },
    },
    "reference": "kd",
    "final": {"seeds": [100, 101, 102, 103, 104]},
}

#: A sweep request as the body carries it: checked here only as a JSON object
#: (`sharp_core.study.sweep.parse_sweep` does the rest and names the field, ``sweep.axes.…``),
#: documented as ``SweepSpec``.
SweepBody = Annotated[
    dict[str, Any], BeforeValidator(lambda v: v, json_schema_input_type=SweepSpec)
]

#: stage ("tune" | "final") → job status → cells.
SweepCounts = dict[str, dict[str, int]]


class SweepCellPublic(BaseModel):
    index: int
    stage: Literal["tune", "final"]
    method: str
    config: str = Field(description="The configuration: method and a hash of its overrides.")
    seed: int
    overrides: dict[str, Any] = Field(description="Spec path → value (the seed aside).")
    job_id: str
    status: JobStatus = Field(description="The cell's job's status (the job owns it).")
    progress: Progress
    value: float | None = Field(
        default=None,
        description="What the stage compares, as last recorded: the val metric (tune) or the "
        "test metric (final); see the report's selection_metric / final_metric.",
    )
    error: ErrorBody | None = None
    levers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The levers the plan pulled for this cell at submission (its job's "
        "plan.levers, e.g. resources.student_parallel 'fsdp'); the job's spec has them applied.",
    )


class SweepPublic(BaseModel):
    id: str
    name: str
    status: Literal["running", "cancelling", "completed", "cancelled"] = Field(
        description="Derived from the cells' jobs: running while any has not ended (or the "
        "final stage is owed), then completed, or cancelled after a cancel."
    )
    reference: str | None = None
    chosen: dict[str, str] | None = Field(
        default=None,
        description="method → configuration chosen on val for the final stage (null until "
        "the final stage starts).",
    )
    counts: SweepCounts = Field(description="stage → job status → cells.")
    created_at: dt.datetime
    cancel_requested_at: dt.datetime | None = None
    final_started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    request: dict[str, Any] = Field(description="The sweep as validated (defaults filled).")
    cells: list[SweepCellPublic] | None = Field(
        default=None, description="Every cell, in order (null in lists)."
    )


class SweepsPublic(BaseModel):
    data: list[SweepPublic]
    next_cursor: str | None = None


class SweepCurve(BaseModel):
    index: int
    job_id: str
    stage: Literal["tune", "final"]
    method: str
    config: str
    seed: int
    status: JobStatus
    points: list[tuple[int, float]] = Field(description="[step, value] in step order.")


class SweepCurvesPublic(BaseModel):
    metric: str = Field(examples=["val_loss", "eval_loss"])
    cells: list[SweepCurve]


class SweepReport(BaseModel):
    """``GET /v1/sweeps/{id}/report``: `sharp_core.study.compare.compare` of each stage
    (docs/sweeps.md, "The report")."""

    model_config = ConfigDict(extra="allow")

    sweep_id: str
    status: str
    counts: SweepCounts
    selection_metric: str
    selection_metric_note: str | None = None
    final_metric: str
    final_metric_note: str | None = None
    tune: dict[str, Any] = Field(
        description="{metric, reference, best, methods, configs} over the tune cells."
    )
    final: dict[str, Any] | None = Field(
        default=None,
        description="The same over the final cells, with best = the configurations chosen on "
        "val (null until the final stage exists).",
    )
    failed_cells: list[dict[str, Any]] = Field(
        description="Every failed or cancelled cell, with its job's error."
    )


def sweep_public(sweep: Sweep, counts: SweepCounts, status: str) -> SweepPublic:
    return SweepPublic(
        id=sweep.id,
        name=sweep.name,
        status=status,  # type: ignore[arg-type]
        reference=sweep.reference,
        chosen=sweep.chosen,
        counts=counts,
        created_at=sweep.created_at,
        cancel_requested_at=sweep.cancel_requested_at,
        final_started_at=sweep.final_started_at,
        finished_at=sweep.finished_at,
        request=sweep.request,
    )


def sweep_view_public(view: SweepView) -> SweepPublic:
    out = sweep_public(view.sweep, view.counts, view.status)
    out.cells = [
        SweepCellPublic(
            index=c.index,
            stage=c.stage,  # type: ignore[arg-type]
            method=c.method,
            config=c.config,
            seed=c.seed,
            overrides=c.overrides,
            job_id=j.id,
            status=JobStatus(j.status),
            progress=Progress(**progress(j.status, j.step, j.max_steps, j.tokens_per_s, j.spec)),
            value=view.values.get(j.id),
            error=ErrorBody(**j.error) if j.error else None,
            levers=list((j.plan or {}).get("levers") or []),
        )
        for c, j in view.cells
    ]
    return out
