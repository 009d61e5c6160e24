"""Durable files, shared by checkpoints (`sharp_core.train.checkpoint`) and the teacher-logit
cache (`sharp_core.cache`): the manifest's name, a file's sha256, fsync of a folder; and which
model sources are local folders (`local_model_path`, for the loader and the API alike).

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


def local_model_path(src: str) -> Path | None:
    """The folder a model source names when it is a path rather than a hub id, else None.

    A path: path syntax (``/``, ``./``, ``../``, ``~``), more than one ``/`` (a hub id is
    ``name`` or ``org/name``), or something that exists here, whole or its first part
    (``runs/teacher`` when ``./runs`` is a folder). Why the API asks too: a folder that does
    not exist is refused at submission (422 naming the field), not an hour later.
    """
    first = src.split("/", 1)[0]
    if (
        src.startswith(("/", "./", "../", "~"))
        or src.count("/") > 1
        or os.path.exists(src)
        or ("/" in src and os.path.isdir(first))
    ):
        return Path(src).expanduser()
    return None


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
