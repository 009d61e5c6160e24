"""Durable files, shared by checkpoints (`sharp_core.train.checkpoint`) and the teacher-logit
cache (`sharp_core.cache`): the manifest's name, a file's sha256, fsync of a folder.

Why here, at the bottom: the cache sits below `train/` and may not import it (no circles
between sub-packages, ``tests/test_layout.py``), yet both write folders the same way.
Standard library only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Written last into a checkpoint or cache folder: a folder with one is complete.
MANIFEST = "manifest.json"


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
