"""Where a data set's files are: globs expanded in a stable order. No torch here: the
worker's supervisor expands and confines the files before any training process starts."""

from __future__ import annotations

from pathlib import Path

from sharp_core.errors import DataError

__all__ = ["expand_files"]

TRAIN_PARAM = "spec.dataset"


def expand_files(files: list[str], where: str = TRAIN_PARAM) -> list[str]:
    """Each entry as is, or a glob (``shards/*.parquet``, ``**`` across folders) as its
    matches in sorted order (so the data's order, and its cache key, do not depend on the
    file system); a glob that matches nothing is an error naming the entry."""
    import glob

    out: list[str] = []
    for i, f in enumerate(files):
        if not any(c in f for c in "*?["):
            out.append(f)
            continue
        hits = sorted(glob.glob(str(Path(f).expanduser()), recursive=True))
        if not hits:
            raise DataError(f"no file matches {f}", param=f"{where}.files.{i}")
        out.extend(hits)
    return out
