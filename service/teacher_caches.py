"""The service side of the teacher-logit cache (`sharp_core.cache.teacher_cache`, docs/teacher-cache.md).

Caches belong to a team: ``<artifact_root>/teacher-caches/<team_id>/<key>/``, so one team's
jobs share a cache and another team's never read it (a key says nothing about who may see the
teacher's outputs). All file access goes through a `CacheStore` (put/get/exists/list); the
local one is `sharp_core.cache.teacher_cache.LocalCacheStore`, and an object-store backend plugs in
at `store_for`. The training process records each build or read as a job event and a row
here (`record`); ``GET /v1/teacher-caches`` and the job's ``teacher_cache`` field read them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from service.repositories import TeacherCacheRepository
from service.settings import Settings
from service.store import get_store
from sharp_core.cache.store import MANIFEST, CacheStore, LocalCacheStore


class ObjectStore(Protocol):
    """What `ObjectCacheStore` needs of an object store: the methods (and signatures) of the
    artifact store's interface (``service.store.ArtifactStore``)."""

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None: ...

    def get_file(self, key: str, dest: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[tuple[str, int]]: ...

    def delete(self, keys: Iterable[str]) -> None: ...


class ObjectCacheStore:
    """A `CacheStore` on an object store (S3 has no atomic rename of a folder).

    Keys are ``<prefix>/<key>/<file>``. `put` uploads every shard first and ``manifest.json``
    last, so a cache is visible (`exists`) only once whole; `discard` deletes the manifest
    first. `get` downloads the cache into ``scratch/<key>/`` (the training process reads a
    local folder) unless a complete copy is already there; the shards' sha256 are checked by
    the reader, so a stale or damaged local copy fails like a damaged remote one."""

    def __init__(self, objects: ObjectStore, prefix: str, scratch: Path):
        self.objects = objects
        self.prefix = prefix.strip("/")
        self.scratch = Path(scratch)

    def _key(self, key: str, name: str = "") -> str:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad cache key {key!r}")
        return f"{self.prefix}/{key}/{name}" if name else f"{self.prefix}/{key}"

    def exists(self, key: str) -> bool:
        return self.objects.exists(self._key(key, MANIFEST))

    def get(self, key: str) -> Path:
        local = self.scratch / key
        if (local / MANIFEST).is_file():
            return local
        tmp = self.scratch / f".tmp-get-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        base = self._key(key) + "/"
        for obj, _size in self.objects.list(self._key(key)):
            name = obj[len(base) :]
            if name and name != MANIFEST and "/" not in name:
                self.objects.get_file(obj, tmp / name)
        if self.objects.exists(self._key(key, MANIFEST)):
            self.objects.get_file(self._key(key, MANIFEST), tmp / MANIFEST)  # last, as put
        shutil.rmtree(local, ignore_errors=True)
        os.rename(tmp, local)
        return local

    def staging(self, key: str) -> Path:
        tmp = self.scratch / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def put(self, key: str, local_dir: Path) -> Path:
        if not (local_dir / MANIFEST).is_file():
            raise ValueError(f"{local_dir} has no {MANIFEST}: nothing to commit")
        if not self.exists(key):  # another job may have committed the same key first
            for f in sorted(local_dir.iterdir()):
                if f.is_file() and f.name != MANIFEST:
                    self.objects.put_file(self._key(key, f.name), f)
            self.objects.put_file(self._key(key, MANIFEST), local_dir / MANIFEST)
        shutil.rmtree(self.scratch / key, ignore_errors=True)
        os.rename(local_dir, self.scratch / key)  # our local copy serves the reads
        return self.get(key)

    def discard(self, key: str) -> None:
        objs = [o for o, _ in self.objects.list(self._key(key))]
        manifest = self._key(key, MANIFEST)
        self.objects.delete([manifest])  # readers stop seeing it first
        self.objects.delete([o for o in objs if o != manifest])
        shutil.rmtree(self.scratch / key, ignore_errors=True)

    def list(self) -> list[str]:
        keys = set()
        for obj, _size in self.objects.list(self.prefix):
            parts = obj[len(self.prefix) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST:
                keys.add(parts[0])
        return sorted(keys)


#: The kinds of cache a team has in the artifact store, by folder: teacher-logit caches and
#: tokenized data sets (`sharp_core.data.tokenized`).
CACHE_KINDS = ("teacher-caches", "data-caches")


def cache_root(settings: Settings, team_id: str, kind: str = "teacher-caches") -> Path:
    return Path(settings.artifact_root) / kind / team_id


def store_for(settings: Settings, team_id: str, kind: str = "teacher-caches") -> CacheStore:
    """The team's cache store of ``kind``: a folder under ``artifact_root`` for the local
    backend, or the S3 bucket (``<kind>/<team>/`` beside the checkpoints) with a local
    scratch copy that the training process reads, when ``settings.artifact_url`` is set."""
    objects = get_store(settings)
    if objects.remote:
        scratch = Path(settings.artifact_root) / ".cache" / kind / team_id
        return ObjectCacheStore(objects, f"{kind}/{team_id}", scratch)
    return LocalCacheStore(cache_root(settings, team_id, kind))


def record(
    session: Session, *, team_id: str, job_id: str, attempt: int, data: dict[str, Any]
) -> None:
    """Write the row of a ``teacher_cache`` event (`sharp_core.cache.teacher_cache.attach`)."""
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
