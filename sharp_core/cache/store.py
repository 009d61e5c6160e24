"""Where teacher-logit caches live: a tiny put/get/exists/list interface and its local backend.

No torch here: the API lists caches (`service.teacher_caches`) without loading it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from sharp_core.files import MANIFEST, fsync_dir

__all__ = ["MANIFEST", "CacheStore", "LocalCacheStore"]

# MANIFEST (shared with checkpoints) is written last: a folder with one is a complete cache.


class CacheStore(Protocol):
    """Where caches live (put/get/exists/list): the local artifact root today, S3 later.

    Training always works on a local folder: `staging` gives one to build in, `put` commits
    it (every shard first, the manifest last), `get` returns a local folder to read (a
    remote backend downloads into one)."""

    def exists(self, key: str) -> bool: ...

    def get(self, key: str) -> Path: ...

    def staging(self, key: str) -> Path: ...

    def put(self, key: str, local_dir: Path) -> Path: ...

    def discard(self, key: str) -> None: ...

    def list(self) -> list[str]: ...


class LocalCacheStore:
    """Caches as folders under ``root`` (the service: ``<artifact_root>/teacher-caches/<team>``).

    `put` renames the staged folder into place in one step, so readers see a whole cache or
    none; when two jobs build the same key at once, the first rename wins and the other
    job's copy is dropped (both are the same teacher's distribution)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _dir(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad cache key {key!r}")
        return self.root / key

    def exists(self, key: str) -> bool:
        return (self._dir(key) / MANIFEST).is_file()

    def get(self, key: str) -> Path:
        return self._dir(key)

    def staging(self, key: str) -> Path:
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def put(self, key: str, local_dir: Path) -> Path:
        final = self._dir(key)
        if not (local_dir / MANIFEST).is_file():
            raise ValueError(f"{local_dir} has no {MANIFEST}: nothing to commit")
        fsync_dir(local_dir)
        if final.exists():
            if self.exists(key):  # another job committed the same key first
                shutil.rmtree(local_dir, ignore_errors=True)
                return final
            self.discard(key)  # a leftover without a manifest
        os.rename(local_dir, final)
        fsync_dir(self.root)
        return final

    def discard(self, key: str) -> None:
        d = self._dir(key)
        if d.exists():
            trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            os.rename(d, trash)  # gone from readers at once, then deleted
            shutil.rmtree(trash, ignore_errors=True)

    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())
