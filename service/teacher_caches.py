"""The service side of the teacher-logit cache (`sharp_core.teacher_cache`, docs/teacher-cache.md).

Caches belong to a team: ``<artifact_root>/teacher-caches/<team_id>/<key>/``, so one team's
jobs share a cache and another team's never read it (a key says nothing about who may see the
teacher's outputs). All file access goes through a `CacheStore` (put/get/exists/list); the
local one is `sharp_core.teacher_cache.LocalCacheStore`, and an object-store backend plugs in
at `store_for`. The training process records each build or read as a job event and a row
here (`record`); ``GET /v1/teacher-caches`` and the job's ``teacher_cache`` field read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.repositories import TeacherCacheRepository
from service.settings import Settings
from sharp_core.cache_store import CacheStore, LocalCacheStore


def cache_root(settings: Settings, team_id: str) -> Path:
    return Path(settings.artifact_root) / "teacher-caches" / team_id


def store_for(settings: Settings, team_id: str) -> CacheStore:
    """The team's cache store (the artifact store's local backend today)."""
    return LocalCacheStore(cache_root(settings, team_id))


def record(
    session: Session, *, team_id: str, job_id: str, attempt: int, data: dict[str, Any]
) -> None:
    """Write the row of a ``teacher_cache`` event (`sharp_core.teacher_cache.attach`)."""
    TeacherCacheRepository(session).record(
        team_id=team_id,
        job_id=job_id,
        attempt=attempt,
        role=str(data["role"]),
        values={
            "key": str(data["key"]),
            "kind": str(data["kind"]),
            "k": int(data["k"]),
            "parts": data.get("parts") or {},
            "size_bytes": int(data["bytes"]),
            "shards": int(data["shards"]),
            "positions": int(data["blocks"]) * int(data["positions"]),
        },
    )


def list_for_team(
    session: Session, settings: Settings, team_id: str, limit: int = 100
) -> list[dict[str, Any]]:
    """The team's caches, newest first, with the jobs that used each and whether the files
    are still in the store (a corrupt cache is discarded until a job rebuilds it)."""
    repo = TeacherCacheRepository(session)
    caches = repo.list_for_team(team_id, limit)
    uses: dict[int, list[dict[str, Any]]] = {}
    for u in repo.uses([c.id for c in caches]):
        uses.setdefault(u.cache_id, []).append(
            {"job_id": u.job_id, "role": u.role, "attempt": u.attempt, "at": u.created_at}
        )
    store = store_for(settings, team_id)
    return [
        {
            "key": c.key,
            "kind": c.kind,
            "k": c.k,
            "parts": c.parts,
            "size_bytes": c.size_bytes,
            "shards": c.shards,
            "positions": c.positions,
            "present": store.exists(c.key),
            "built_by_job_id": c.built_by_job_id,
            "created_at": c.created_at,
            "updated_at": c.updated_at,
            "jobs": uses.get(c.id, []),
        }
        for c in caches
    ]


def of_job(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The caches a job built or read (the job's ``teacher_cache`` field)."""
    return [
        {
            "key": c.key,
            "kind": c.kind,
            "k": c.k,
            "role": u.role,
            "attempt": u.attempt,
            "size_bytes": c.size_bytes,
            "at": u.created_at,
        }
        for c, u in TeacherCacheRepository(session).of_job(job_id)
    ]
