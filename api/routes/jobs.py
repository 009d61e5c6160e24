"""``/v1/jobs``: create, list, get, cancel, retry, metrics, events, checkpoints, downloads."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse
from starlette.responses import StreamingResponse

from api.deps import JobServiceDep, SettingsDep, TeamDep
from api.events import job_events
from api.metrics import counted_stream
from api.schemas import (
    CheckpointsPublic,
    ErrorResponse,
    JobCreate,
    JobPlanPublic,
    JobPublic,
    JobsPublic,
    MetricsPublic,
    checkpoint_public,
    job_public,
    metrics_public,
)
from service.artifacts import (
    archive_members,
    checkpoint_dir_name,
    file_response,
    resolve_file,
    tar_stream,
)
from service.errors import InvalidRequestError
from service.lifecycle import JOB_STATUSES
from service.store import get_store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, malformed or revoked API key."},
    404: {"model": ErrorResponse, "description": "No such job for this team."},
}
JobId = Annotated[str, Path(max_length=64, description="A job id, `job_…`.")]
#: Steps and event seqs are 32-bit integer columns: a larger value is a 422, not a 500.
MAX_INT = 2**31 - 1
Step = Annotated[int, Path(ge=0, le=MAX_INT, description="A checkpoint's step.")]


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {
            "model": JobPublic,
            "description": "Replay of an earlier request with this "
            "Idempotency-Key and the same body.",
        },
        400: {"model": ErrorResponse, "description": "Malformed JSON."},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body."},
        422: {"model": ErrorResponse, "description": "Invalid spec; `param` names the field."},
        429: {
            "model": ErrorResponse,
            "description": "The team's queued-jobs quota is full (`quota_exceeded`).",
        },
        **_ERRORS,
    },
)
def create_job(
    body: JobCreate,
    team: TeamDep,
    service: JobServiceDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Same key and body → the same job; same key, other body → 409.",
        ),
    ] = None,
) -> JobPublic:
    """Validate a spec and queue the job. The scheduler admits it (and sends its Celery
    message) once its pool has a free worker and its team's quota allows."""
    job, created = service.create(team, body.model_dump(), idempotency_key)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job, service.queue_info(job))


@router.post(
    "/plan",
    response_model=JobPlanPublic,
    responses={
        400: {"model": ErrorResponse, "description": "Malformed JSON."},
        422: {
            "model": ErrorResponse,
            "description": "Invalid spec, or a job that cannot fit its pool even sharded; "
            "`param` names the field.",
        },
        **_ERRORS,
    },
)
def plan_job(body: JobCreate, team: TeamDep, service: JobServiceDep) -> JobPlanPublic:
    """The plan of a spec without queueing it (docs/planning.md): the same body and the same
    422s as POST /v1/jobs; preflight findings of severity 'error' are listed, not raised."""
    return JobPlanPublic(**service.plan(team, body.model_dump()))


_STATUSES = set(JOB_STATUSES)


@router.get("", response_model=JobsPublic, responses=_ERRORS)
def list_jobs(
    team: TeamDep,
    service: JobServiceDep,
    status: Annotated[
        str | None, Query(description="Comma-separated statuses, e.g. `queued,running`.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=256, description="`next_cursor` of the previous page.")
    ] = None,
) -> JobsPublic:
    """This team's jobs, newest first."""
    statuses = [s.strip() for s in status.split(",") if s.strip()] if status else None
    for s in statuses or ():
        if s not in _STATUSES:
            raise InvalidRequestError(f"unknown status '{s}'", param="status")
    jobs, cursor = service.list_jobs(team, statuses=statuses, limit=limit, after=after)
    return JobsPublic(data=[job_public(j, service.queue_info(j)) for j in jobs], next_cursor=cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def get_job(job_id: JobId, team: TeamDep, service: JobServiceDep) -> JobPublic:
    job = service.get(team, job_id)
    return job_public(
        job,
        service.queue_info(job),
        service.pruning(job),
        service.teacher_cache(job),
        service.evaluation(job),
    )


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses={
        409: {"model": ErrorResponse, "description": "Already succeeded or failed."},
        **_ERRORS,
    },
)
def cancel_job(job_id: JobId, team: TeamDep, service: JobServiceDep) -> JobPublic:
    """Idempotent. A queued job is cancelled at once; a running one saves a checkpoint first."""
    job = service.cancel(team, job_id)
    return job_public(job, service.queue_info(job), service.pruning(job))


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobPublic,
    responses={409: {"model": ErrorResponse, "description": "Not failed or cancelled."}, **_ERRORS},
)
def retry_job(job_id: JobId, team: TeamDep, service: JobServiceDep) -> JobPublic:
    """Queue a failed or cancelled job again; it resumes from its newest checkpoint."""
    job = service.retry(team, job_id)
    return job_public(job, service.queue_info(job), service.pruning(job))


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPublic,
    responses=_ERRORS,
    operation_id="getJobMetrics",
)
def job_metrics(
    job_id: JobId,
    team: TeamDep,
    service: JobServiceDep,
    after: Annotated[
        int | None, Query(ge=-1, le=MAX_INT, description="Return steps after this one.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many steps.")] = 1000,
    name: Annotated[list[str] | None, Query(description="Only these metrics (repeatable).")] = None,
) -> MetricsPublic:
    """Replay from the database, grouped by step, in step order."""
    return metrics_public(service.metrics(team, job_id, after=after, limit=limit, names=name or []))


@router.get(
    "/{job_id}/events",
    operation_id="streamJobEvents",
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "example": 'id: 3\nevent: status\ndata: {"seq":3,'
                    '"status":"running","attempt":1}\n\n'
                }
            },
            "description": "Events `status`, `metrics`, `checkpoint`, `pruned`; "
            "`id:` is the event seq.",
        },
        **_ERRORS,
    },
)
async def job_events_stream(
    request: Request,
    job_id: JobId,
    team: TeamDep,
    service: JobServiceDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
    after: Annotated[
        int | None,
        Query(
            ge=0, le=MAX_INT, description="Like Last-Event-ID, for clients that cannot set headers."
        ),
    ] = None,
    follow: Annotated[
        bool, Query(description="false: send what is logged so far, then end.")
    ] = True,
) -> EventSourceResponse:
    """Status changes and metrics, live; resumes after ``Last-Event-ID``; ends at a terminal state."""
    await run_in_threadpool(service.get, team, job_id)
    start = after or 0
    if last_event_id is not None:
        if not last_event_id.strip().isdigit() or int(last_event_id) > MAX_INT:
            raise InvalidRequestError("Last-Event-ID must be an event seq", param="Last-Event-ID")
        start = int(last_event_id)
    state = request.app.state
    return EventSourceResponse(
        counted_stream(job_events(settings, state.db, state.aredis, job_id, start, follow)),
        ping=settings.sse_heartbeat_s,
    )


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic, responses=_ERRORS)
def list_checkpoints(job_id: JobId, team: TeamDep, service: JobServiceDep) -> CheckpointsPublic:
    return CheckpointsPublic(data=[checkpoint_public(c) for c in service.checkpoints(team, job_id)])


@router.get(
    "/{job_id}/checkpoints/{step}/files/{name:path}",
    operation_id="downloadCheckpointFile",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "Partial content (Range)."},
        304: {"description": "If-None-Match matched the ETag (the file's sha256)."},
        307: {"description": "artifact_download=redirect: a presigned URL of the S3 store."},
        416: {"description": "Range not satisfiable."},
        503: {"model": ErrorResponse, "description": "The artifact store did not answer."},
        **_ERRORS,
    },
)
def download_file(
    request: Request,
    job_id: JobId,
    step: Step,
    name: str,
    team: TeamDep,
    service: JobServiceDep,
    settings: SettingsDep,
) -> Response:
    """One file of a checkpoint; names are those of the manifest. ETag is the sha256. With
    ``artifact_download: redirect`` and an S3 store, a 307 to a presigned URL."""
    ckpt = service.checkpoint(team, job_id, step)
    store = get_store(settings)
    key, meta = resolve_file(store, ckpt, name)
    redirect = settings.artifact_presign_s if settings.artifact_download == "redirect" else None
    return file_response(request, store, key, meta, redirect_s=redirect)


@router.get(
    "/{job_id}/checkpoints/{step}/archive",
    operation_id="downloadCheckpointArchive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **_ERRORS},
)
def download_archive(
    job_id: JobId,
    step: Step,
    team: TeamDep,
    service: JobServiceDep,
    settings: SettingsDep,
    state: bool = Query(
        False, description="Include the sharded training state (dcp/), needed only to resume."
    ),
) -> Response:
    """The checkpoint folder (``save_pretrained`` layout + manifest) as a tar stream; the
    sharded training state only with ``?state=true``."""
    ckpt = service.checkpoint(team, job_id, step)
    store = get_store(settings)
    members = archive_members(store, ckpt, with_state=state)
    filename = f"{job_id}-{checkpoint_dir_name(step)}.tar"
    return StreamingResponse(
        tar_stream(store, members, int(ckpt.created_at.timestamp())),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
