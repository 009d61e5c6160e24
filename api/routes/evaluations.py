"""``POST /v1/evaluations``: score a finished job's checkpoint, a local folder or a hub model
without training (docs/evaluation.md). An evaluation is a job: the same queues, scheduler,
workers, progress, events (SSE), cancel and errors, read through ``/v1/jobs/{id}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import JobServiceDep, TeamDep
from api.schemas import ErrorResponse, EvaluationCreate, JobPublic, job_public

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Replay (same Idempotency-Key and body)."},
        400: {"model": ErrorResponse, "description": "Malformed JSON."},
        401: {"model": ErrorResponse, "description": "Missing, malformed or revoked API key."},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body."},
        422: {"model": ErrorResponse, "description": "Invalid spec; `param` names the field."},
        429: {"model": ErrorResponse, "description": "The team's queued-jobs quota is full."},
    },
)
def create_evaluation(
    body: EvaluationCreate,
    team: TeamDep,
    service: JobServiceDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=255),
    ] = None,
) -> JobPublic:
    """Validate and queue an evaluation job; follow it at ``/v1/jobs/{id}`` (and its
    ``/events``), cancel it with ``/v1/jobs/{id}/cancel``."""
    job, created = service.create_evaluation(team, body.model_dump(), idempotency_key)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job, service.queue_info(job))
