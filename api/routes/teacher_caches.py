"""``/v1/teacher-caches``: the team's teacher-logit caches (docs/teacher-cache.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import SessionDep, SettingsDep, TeamDep
from api.schemas import ErrorResponse, TeacherCachePublic, TeacherCachesPublic
from service import teacher_caches

router = APIRouter(prefix="/v1/teacher-caches", tags=["teacher-caches"])


@router.get(
    "",
    response_model=TeacherCachesPublic,
    responses={401: {"model": ErrorResponse, "description": "Missing or revoked API key."}},
)
def list_teacher_caches(
    team: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> TeacherCachesPublic:
    """This team's caches, newest first: key and its parts, size, and the jobs that used each."""
    rows = teacher_caches.list_for_team(session, settings, team.id, limit)
    return TeacherCachesPublic(data=[TeacherCachePublic.model_validate(r) for r in rows])
