"""``/v1/webhooks``: a team's signed webhook endpoints and their delivery log
(`service.webhooks`; payload, headers and verification in docs/api.md)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, TeamDep
from api.schemas import ErrorResponse
from service.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from service.webhooks import EVENTS, DeliveryPage, WebhookService

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

EventName = Literal["job.succeeded", "job.failed", "job.cancelled", "sweep.finished"]
assert set(EventName.__args__) == set(EVENTS)  # type: ignore[attr-defined]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, malformed or revoked API key."},
    404: {"model": ErrorResponse, "description": "No such webhook for this team."},
}
WebhookId = Annotated[str, Path(max_length=64, description="A webhook id, `wh_…`.")]


def get_webhook_service(session: SessionDep, settings: SettingsDep) -> WebhookService:
    return WebhookService(session=session, settings=settings)


WebhookServiceDep = Annotated[WebhookService, Depends(get_webhook_service)]


# -- schemas ---------------------------------------------------------------------------------
class WebhookCreate(BaseModel):
    """Body of ``POST /v1/webhooks``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://ci.example.com/hooks/sharp", "events": ["job.succeeded"]}]
        },
    )

    url: str = Field(
        max_length=8192,
        description="https URL (http only where the operator allows it) of a public host.",
    )
    events: list[EventName] | None = Field(
        default=None, min_length=1, max_length=16, description="Default: every event."
    )
    description: str | None = Field(default=None, max_length=200)


class WebhookPublic(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str | None
    secret_prefix: str = Field(description="The first characters of the signing secret.")
    created_at: dt.datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(
        description="The signing secret. Shown this once: the server keeps it encrypted and "
        "never returns it again."
    )


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]


class AttemptPublic(BaseModel):
    attempt: int
    started_at: dt.datetime
    duration_ms: float | None
    status_code: int | None = Field(description="The receiver's HTTP status (null: no answer).")
    error: str | None


class DeliveryPublic(BaseModel):
    id: str = Field(description="Sent as `Sharp-Delivery`; the same on every retry.")
    event_id: str
    event_type: str
    job_id: str | None
    status: Literal["pending", "succeeded", "failed"]
    next_attempt_at: dt.datetime | None
    created_at: dt.datetime
    attempts: list[AttemptPublic]
    event: dict[str, Any] = Field(description="The JSON body sent.")


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    next_cursor: str | None


def webhook_public(e: WebhookEndpoint) -> WebhookPublic:
    return WebhookPublic(
        id=e.id,
        url=e.url,
        events=list(e.events),
        description=e.description,
        secret_prefix=e.secret_prefix,
        created_at=e.created_at,
    )


def _attempt(a: WebhookAttempt) -> AttemptPublic:
    return AttemptPublic(
        attempt=a.attempt,
        started_at=a.started_at,
        duration_ms=a.duration_ms,
        status_code=a.status_code,
        error=a.error,
    )


def _delivery(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryPublic:
    return DeliveryPublic(
        id=d.id,
        event_id=d.event_id,
        event_type=d.event_type,
        job_id=d.job_id,
        status=d.status,  # type: ignore[arg-type]
        next_attempt_at=d.next_attempt_at,
        created_at=d.created_at,
        attempts=[_attempt(a) for a in attempts],
        event=json.loads(d.body),
    )


def deliveries_public(page: DeliveryPage) -> DeliveriesPublic:
    return DeliveriesPublic(
        data=[_delivery(d, page.attempts.get(d.id, [])) for d in page.deliveries],
        next_cursor=page.next_cursor,
    )


# -- routes ----------------------------------------------------------------------------------
@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    responses={
        400: {"model": ErrorResponse, "description": "Malformed JSON."},
        422: {
            "model": ErrorResponse,
            "description": "A URL that is not https, too long, or whose host resolves to a "
            "private address (`param`: `url`); an unknown event (`events.N`).",
        },
        429: {"model": ErrorResponse, "description": "The team has the most endpoints allowed."},
        503: {"model": ErrorResponse, "description": "Webhooks are not configured here."},
        **_ERRORS,
    },
)
def create_webhook(
    body: WebhookCreate, team: TeamDep, service: WebhookServiceDep, response: Response
) -> WebhookCreated:
    """Register an endpoint. The response carries its signing secret, the only time it is
    shown."""
    endpoint, secret = service.create(team, body.url, body.events, body.description)
    response.headers["Location"] = f"/v1/webhooks/{endpoint.id}"
    return WebhookCreated(**webhook_public(endpoint).model_dump(), secret=secret)


@router.get("", response_model=WebhooksPublic, responses=_ERRORS)
def list_webhooks(team: TeamDep, service: WebhookServiceDep) -> WebhooksPublic:
    """This team's endpoints, newest first (secrets are never shown again)."""
    return WebhooksPublic(data=[webhook_public(e) for e in service.list_endpoints(team)])


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=_ERRORS)
def get_webhook(webhook_id: WebhookId, team: TeamDep, service: WebhookServiceDep) -> WebhookPublic:
    return webhook_public(service.get(team, webhook_id))


@router.delete("/{webhook_id}", status_code=204, responses=_ERRORS)
def delete_webhook(webhook_id: WebhookId, team: TeamDep, service: WebhookServiceDep) -> Response:
    """Delete an endpoint with its delivery log; pending deliveries are not sent."""
    service.delete(team, webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic, responses=_ERRORS)
def list_webhook_deliveries(
    webhook_id: WebhookId,
    team: TeamDep,
    service: WebhookServiceDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=256, description="`next_cursor` of the previous page.")
    ] = None,
) -> DeliveriesPublic:
    """Deliveries newest first, each with every attempt (status code, duration, error)."""
    return deliveries_public(service.deliveries(team, webhook_id, limit=limit, after=after))
