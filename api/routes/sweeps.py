"""``/v1/sweeps``: create, list, get, cancel, report, curves (docs/sweeps.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Response

from api.deps import SweepServiceDep, TeamDep
from api.schemas import (
    EXAMPLE_SWEEP,
    ErrorResponse,
    SweepBody,
    SweepCurvesPublic,
    SweepPublic,
    SweepReport,
    SweepsPublic,
    sweep_public,
    sweep_view_public,
)

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, malformed or revoked API key."},
    404: {"model": ErrorResponse, "description": "No such sweep for this team."},
}
SweepId = Annotated[str, Path(max_length=64, description="A sweep id, `swp_…`.")]


@router.post(
    "",
    status_code=201,
    response_model=SweepPublic,
    responses={
        200: {
            "model": SweepPublic,
            "description": "Replay of an earlier request with this Idempotency-Key and the "
            "same body.",
        },
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with another body."},
        422: {
            "model": ErrorResponse,
            "description": "Invalid sweep (`param` names the field, e.g. `sweep.axes.…`), "
            "more cells than the limit (`too_many_cells`), or invalid cells "
            "(`invalid_sweep_cells`, the first few listed in `cells`); nothing is created.",
        },
        429: {
            "model": ErrorResponse,
            "description": "The tune cells do not fit the team's queued-jobs quota "
            "(`quota_exceeded`); nothing is created.",
        },
        **_ERRORS,
    },
)
def create_sweep(
    body: Annotated[SweepBody, Body(examples=[EXAMPLE_SWEEP])],
    team: TeamDep,
    service: SweepServiceDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Same key and body → the same sweep; same key, other body → 409.",
        ),
    ] = None,
) -> SweepPublic:
    """Expand the sweep into cells and queue each as an ordinary job (quotas, fair share,
    cancel and retry apply); the final stage follows once every tune cell has ended."""
    view, created = service.create(team, body, idempotency_key)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/sweeps/{view.sweep.id}"
    return sweep_view_public(view)


@router.get("", response_model=SweepsPublic, responses=_ERRORS)
def list_sweeps(
    team: TeamDep,
    service: SweepServiceDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=256, description="`next_cursor` of the previous page.")
    ] = None,
) -> SweepsPublic:
    """This team's sweeps, newest first, with counts of cells per status (no cells)."""
    rows, cursor = service.list_sweeps(team, limit=limit, after=after)
    return SweepsPublic(data=[sweep_public(*r) for r in rows], next_cursor=cursor)


@router.get("/{sweep_id}", response_model=SweepPublic, responses=_ERRORS)
def get_sweep(sweep_id: SweepId, team: TeamDep, service: SweepServiceDep) -> SweepPublic:
    """The sweep and every cell: its job's status, progress and the value it is compared on."""
    return sweep_view_public(service.get(team, sweep_id))


@router.post("/{sweep_id}/cancel", status_code=202, response_model=SweepPublic, responses=_ERRORS)
def cancel_sweep(sweep_id: SweepId, team: TeamDep, service: SweepServiceDep) -> SweepPublic:
    """Idempotent. Cancels every cell's job that has not ended; the final stage never starts."""
    return sweep_view_public(service.cancel(team, sweep_id))


@router.get("/{sweep_id}/report", response_model=SweepReport, responses=_ERRORS)
def get_sweep_report(sweep_id: SweepId, team: TeamDep, service: SweepServiceDep) -> SweepReport:
    """Per configuration mean ± std over seeds; per method its best configuration on val and
    the paired per-seed Δ against the reference (t-interval, Holm-adjusted p); the final
    stage's test numbers for the configurations chosen on val."""
    return SweepReport.model_validate(service.report(team, sweep_id))


@router.get("/{sweep_id}/curves", response_model=SweepCurvesPublic, responses=_ERRORS)
def get_sweep_curves(
    sweep_id: SweepId, team: TeamDep, service: SweepServiceDep
) -> SweepCurvesPublic:
    """Every cell's evaluation curve (val_loss, or eval_loss without a val set)."""
    return SweepCurvesPublic.model_validate(service.curves(team, sweep_id))
