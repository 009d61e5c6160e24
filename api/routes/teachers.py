"""``/v1/teachers``: the teachers a team distilled from and the leaderboard of each one's
students (docs/evaluation.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from api.deps import SessionDep, TeamDep
from api.schemas import ErrorResponse, LeaderboardPublic, TeachersPublic, TeacherSummary
from service import evaluation

router = APIRouter(prefix="/v1/teachers", tags=["teachers"])

_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "Missing or revoked API key."},
}
Digest = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256 of the teacher.")]


@router.get("", response_model=TeachersPublic, responses=_ERRORS)
def list_teachers(
    team: TeamDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> TeachersPublic:
    """The teachers this team's jobs distilled from (by weights digest), most students first."""
    rows = evaluation.teachers(session, team, limit)
    return TeachersPublic(data=[TeacherSummary.model_validate(r) for r in rows])


@router.get(
    "/{digest}/students",
    response_model=LeaderboardPublic,
    responses={
        404: {"model": ErrorResponse, "description": "No job of this team has that teacher."},
        **_ERRORS,
    },
)
def students(
    digest: Digest,
    team: TeamDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> LeaderboardPublic:
    """Every student of this team distilled from the teacher: method, init, parameters,
    tokens seen, perplexity, harness scores with retained %, answer quality; the teacher's
    own scores beside them."""
    return LeaderboardPublic.model_validate(evaluation.leaderboard(session, team, digest, limit))
