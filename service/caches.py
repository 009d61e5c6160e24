"""A team's caches in the artifact store: tokenized data sets and teacher-logit caches.

Both kinds live under ``<kind>/<team>/<key>/`` (`service.teacher_caches.store_for`), are
listed with their size and when they were last used (their manifest's mtime, touched by
every job that reads them), removable one by one, and count against one per-team budget
(``SHARP_CACHE_BUDGET_BYTES``): `evict` removes the least recently used entries of a team
until it fits. The worker evicts after each job; ``sharp admin storage caches`` shows the
usage and ``--evict`` applies the budget now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings
from service.store import get_store
from service.teacher_caches import CACHE_KINDS, cache_root, store_for
from sharp_core.cache.store import MANIFEST

__all__ = ["CacheEntry", "evict", "list_caches", "remove_cache"]


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "data-caches" | "teacher-caches"
    team_id: str
    key: str
    bytes: int
    last_used: float  # epoch seconds (manifest mtime); 0 when unknown


def _teams(settings: Settings, kind: str) -> list[str]:
    objects = get_store(settings)
    if objects.remote:
        return sorted({o.split("/")[1] for o, _ in objects.list(kind) if o.count("/") >= 2})
    root = Path(settings.artifact_root) / kind
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def list_caches(settings: Settings, team_id: str | None = None) -> list[CacheEntry]:
    """Every complete cache entry (one with a manifest), oldest use first."""
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
    return sorted(out, key=lambda e: e.last_used)


def remove_cache(settings: Settings, kind: str, team_id: str, key: str) -> bool:
    """Remove one entry (readers stop seeing it at once); False when there was none."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"kind must be one of {CACHE_KINDS}")
    store = store_for(settings, team_id, kind)
    if not store.exists(key):
        return False
    store.discard(key)
    return True


def evict(settings: Settings, team_id: str, budget: int | None = None) -> list[CacheEntry]:
    """Remove the team's least recently used entries, of either kind, until its caches fit
    ``budget`` bytes (default: the settings'); returns what was removed."""
    budget = settings.cache_budget_bytes if budget is None else budget
    if budget is None:
        return []
    entries = list_caches(settings, team_id)
    total = sum(e.bytes for e in entries)
    gone = []
    for e in entries:  # oldest use first
        if total <= budget:
            break
        if remove_cache(settings, e.kind, e.team_id, e.key):
            gone.append(e)
            total -= e.bytes
    return gone
