"""A team's caches in the artifact store: tokenized data sets and teacher-logit caches.

Both kinds live under ``<kind>/<team>/<key>/`` (`service.teacher_caches.store_for`), are
listed with their size and when a job last used them, removable one by one, and count
against the team's budget: ``teams.cache_budget_bytes`` (``sharp admin teams set-budget``),
or the deployment's default ``SHARP_CACHE_BUDGET_BYTES`` for a team without one. `evict`
removes the team's least recently used entries, of either kind, until it fits. The worker
evicts after each job; ``sharp admin storage caches`` shows usage, budget and the entries
in eviction order, and ``--evict`` applies the budgets now.

The files are the truth of what exists; the database (``cache_entries``) holds when a job
last read each entry and which jobs used it (``cache_entry_uses``). A job's stores are
wrapped in `TrackedCacheStore`, which records the use *before* the job opens the entry.

Why eviction never removes an entry a job is reading: the job's record and the eviction
meet on the entry's row. `TrackedCacheStore` (the job) takes the row lock, checks the files
are there, records itself as a user and commits, and only then opens the files; `evict`
takes the same lock, skips an entry with a user that has not ended (queued again after a
preemption, running, cancelling), and deletes files and row *while holding the lock*. So
either the job recorded itself first (the entry is skipped) or the eviction finished first
(the job finds no files and rebuilds the entry, as after any miss). Postgres row locks
(``SELECT … FOR UPDATE``); SQLite, the one-machine default, serialises writers instead.
A job whose database write failed is logged and goes on without that protection; the
manifest's mtime is still touched as before.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.db import Database
from service.models import utcnow
from service.repositories import CacheRecordRepository
from service.settings import Settings
from service.store import get_store
from service.teacher_caches import CACHE_KINDS, cache_root, store_for
from sharp_core.cache.store import MANIFEST, CacheStore

__all__ = [
    "CacheEntry",
    "TrackedCacheStore",
    "budget_of",
    "evict",
    "list_caches",
    "remove_cache",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "data-caches" | "teacher-caches"
    team_id: str
    key: str
    bytes: int
    last_used: float  # epoch seconds: a job's last read (database), else the manifest mtime
    in_use: tuple[str, ...] = field(default=())  # jobs not ended that used it: not evicted


def _teams(settings: Settings, kind: str) -> list[str]:
    objects = get_store(settings)
    if objects.remote:
        return sorted({o.split("/")[1] for o, _ in objects.list(kind) if o.count("/") >= 2})
    root = Path(settings.artifact_root) / kind
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _sized(settings: Settings, team_id: str | None) -> list[CacheEntry]:
    """Every complete entry (one with a manifest) in the store, its size and manifest mtime."""
    objects = get_store(settings)
    out = []
    for kind in CACHE_KINDS:
        for team in [team_id] if team_id else _teams(settings, kind):
            store = store_for(settings, team, kind)
            for key in store.list():
                if objects.remote:
                    size = sum(s for _, s in objects.list(f"{kind}/{team}/{key}"))
                    local = Path(settings.artifact_root) / ".cache" / kind / team / key
                else:
                    local = cache_root(settings, team, kind) / key
                    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
                m = local / MANIFEST
                used = m.stat().st_mtime if m.is_file() else 0.0
                out.append(CacheEntry(kind, team, key, size, used))
    return out


def list_caches(
    settings: Settings, team_id: str | None = None, db: Database | None = None
) -> list[CacheEntry]:
    """Every complete cache entry, least recently used first (the order eviction takes).
    With `db`: last use as the database recorded it and the jobs using each entry."""
    entries = _sized(settings, team_id)
    if db is not None and entries:
        with db.session() as s:
            repo = CacheRecordRepository(s)
            rows = {(r.team_id, r.kind, r.key): r for r in repo.for_team(team_id)}
            users = repo.users(r.id for r in rows.values())
        merged = []
        for e in entries:
            r = rows.get((e.team_id, e.kind, e.key))
            if r is not None:
                used = max(e.last_used, r.last_used_at.timestamp())
                e = CacheEntry(e.kind, e.team_id, e.key, e.bytes, used, tuple(users.get(r.id, [])))
            merged.append(e)
        entries = merged
    return sorted(entries, key=lambda e: (e.last_used, e.kind, e.key))


def remove_cache(settings: Settings, kind: str, team_id: str, key: str) -> bool:
    """Remove one entry (readers stop seeing it at once); False when there was none."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"kind must be one of {CACHE_KINDS}")
    store = store_for(settings, team_id, kind)
    if not store.exists(key):
        return False
    store.discard(key)
    return True


def budget_of(settings: Settings, team_id: str, db: Database | None = None) -> int | None:
    """The team's cache budget in bytes: its own, else the deployment's default (None: none)."""
    if db is not None:
        with db.session() as s:
            own = CacheRecordRepository(s).budget(team_id)
        if own is not None:
            return own
    return settings.cache_budget_bytes


def evict(
    settings: Settings, team_id: str, budget: int | None = None, db: Database | None = None
) -> list[CacheEntry]:
    """Remove the team's least recently used entries, of either kind, until its caches fit
    ``budget`` bytes (default: `budget_of`); returns what was removed. With `db`, an entry a
    job that has not ended used is kept (see the module's docstring); without, the manifest
    mtimes order the entries and nothing is protected (a store with no database)."""
    budget = budget_of(settings, team_id, db) if budget is None else budget
    if budget is None:
        return []
    entries = list_caches(settings, team_id, db)
    if db is not None:
        _forget_missing(db, team_id, {(e.kind, e.key) for e in entries})
    total = sum(e.bytes for e in entries)
    gone = []
    for e in entries:  # oldest use first
        if total <= budget:
            break
        removed = _evict_one(settings, db, e) if db is not None else (
            remove_cache(settings, e.kind, e.team_id, e.key)
        )  # fmt: skip
        if removed:
            gone.append(e)
            total -= e.bytes
    return gone


def _evict_one(settings: Settings, db: Database, e: CacheEntry) -> bool:
    """Remove one entry under its row lock unless a job that has not ended uses it."""
    with db.session() as s:
        repo = CacheRecordRepository(s)
        used = dt.datetime.fromtimestamp(e.last_used, dt.UTC) if e.last_used else utcnow()
        repo.ensure(e.team_id, e.kind, e.key, nbytes=e.bytes, used=used)
        row = repo.lock(e.team_id, e.kind, e.key)
        if row is None or repo.users([row.id]).get(row.id):
            return False
        removed = remove_cache(settings, e.kind, e.team_id, e.key)  # under the lock
        repo.remove(row)
        return removed


def _forget_missing(db: Database, team_id: str, present: set[tuple[str, str]]) -> None:
    """Rows of entries whose files are gone (removed by hand, a build that failed), unless a
    job that has not ended still uses them."""
    with db.session() as s:
        repo = CacheRecordRepository(s)
        rows = [r for r in repo.for_team(team_id) if (r.kind, r.key) not in present]
        users = repo.users(r.id for r in rows)
        for r in rows:
            if not users.get(r.id):
                repo.remove(r)


class TrackedCacheStore:
    """A job's `CacheStore`: each read or build records the job as a user of the entry and
    its last use (in the database, before the files are opened), so eviction leaves the
    entry alone while the job runs. Everything else is the wrapped store's."""

    def __init__(self, inner: CacheStore, db: Database, team_id: str, kind: str, job_id: str):
        self.inner, self.db, self.team_id, self.kind, self.job_id = (
            inner, db, team_id, kind, job_id,
        )  # fmt: skip

    def _pin(self, key: str, nbytes: int = 0) -> bool:
        """Record the use under the row lock; whether the entry's files are there."""
        try:
            with self.db.session() as s:
                repo = CacheRecordRepository(s)
                now = utcnow()
                repo.ensure(self.team_id, self.kind, key, nbytes=nbytes, used=now)
                row = repo.lock(self.team_id, self.kind, key)
                present = self.inner.exists(key)
                if row is not None:
                    if nbytes:
                        row.bytes = nbytes
                    repo.use(row, self.job_id, now)
                return present
        except Exception:  # noqa: BLE001 - the database is bookkeeping here, not the data
            log.warning("could not record the use of cache %s/%s", self.kind, key, exc_info=True)
            return self.inner.exists(key)

    def exists(self, key: str) -> bool:
        return self._pin(key)

    def get(self, key: str) -> Path:
        self._pin(key)
        return self.inner.get(key)

    def staging(self, key: str) -> Path:
        return self.inner.staging(key)

    def put(self, key: str, local_dir: Path) -> Path:
        nbytes = sum(f.stat().st_size for f in Path(local_dir).rglob("*") if f.is_file())
        self._pin(key, nbytes)  # a user before the entry is visible
        return self.inner.put(key, local_dir)

    def discard(self, key: str) -> None:
        self.inner.discard(key)

    def list(self) -> list[str]:
        return self.inner.list()


def tracked_store(
    settings: Settings, db: Database, team_id: str, kind: str, job_id: str | None
) -> Any:
    """The team's store of ``kind`` for a job: tracked when the job is known."""
    store = store_for(settings, team_id, kind)
    return store if job_id is None else TrackedCacheStore(store, db, team_id, kind, job_id)
