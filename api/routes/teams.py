"""``/v1/teams/me``: the caller's team, its scheduler limits and its current usage."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import JobServiceDep, TeamDep
from api.schemas import ErrorResponse, TeamPublic, team_public

router = APIRouter(prefix="/v1/teams", tags=["teams"])


@router.get(
    "/me",
    response_model=TeamPublic,
    operation_id="getMyTeam",
    responses={401: {"model": ErrorResponse, "description": "Missing or revoked API key."}},
)
def my_team(team: TeamDep, service: JobServiceDep) -> TeamPublic:
    """Quotas (set by an operator) and the GPUs and queued jobs they are counted against."""
    return team_public(service.team_usage(team))
