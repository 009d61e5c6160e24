"""Serving checkpoint files: single files with Range/ETag, whole folders as a tar stream.

Why names are looked up in the manifest instead of joined onto a path: the manifest is the
list of files the trainer wrote and hashed, so ``../../etc/passwd`` or a half-written
temporary file can never be served; the resolved path is still checked to stay inside the
checkpoint folder (a symlink planted there cannot leak out either).

Why a hand-written tar stream: ``tarfile`` in streaming mode buffers each member whole, and
a student's weights can be gigabytes. A tar member is a 512-byte header, the bytes, and
padding, so we write exactly that while reading each file in chunks.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from service.errors import NotFoundError, RangeNotSatisfiableError, SharpError
from service.models import Checkpoint

CHUNK = 1024 * 1024


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def resolve_file(ckpt: Checkpoint, name: str) -> tuple[Path, dict[str, Any]]:
    files = (ckpt.manifest or {}).get("files", {})
    meta = files.get(name)
    if meta is None:
        raise NotFoundError(f"no file '{name}' in checkpoint {ckpt.step}", param="name")
    root = Path(ckpt.path).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFoundError(f"no file '{name}' in checkpoint {ckpt.step}", param="name")
    if path.stat().st_size != int(meta.get("size", -1)):
        raise SharpError(
            f"'{name}' on disk does not match the checkpoint's manifest",
            code="checkpoint_error",
        )
    return path, meta


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range → inclusive (start, end); None means "ignore it, send it all"."""
    units, _, spec = header.partition("=")
    if units.strip().lower() != "bytes" or "," in spec:
        return None  # several ranges: RFC 9110 lets us answer with the whole file
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0 or size == 0:
                raise RangeNotSatisfiableError("empty suffix range", param="Range")
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or start >= size or end < start:
        raise RangeNotSatisfiableError(f"range outside 0-{size - 1}", param="Range")
    return start, min(end, size - 1)


def _read(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def file_response(request: Request, path: Path, meta: dict[str, Any]) -> Response:
    size = path.stat().st_size
    etag = f'"{meta["sha256"]}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=31536000, immutable",  # content-addressed
        "Content-Disposition": f'attachment; filename="{path.name}"',
    }
    inm = request.headers.get("if-none-match")
    if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
        return Response(status_code=304, headers=headers)

    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if rng and (if_range is None or if_range.strip() == etag):
        try:
            parsed = _parse_range(rng, size)
        except RangeNotSatisfiableError:
            return Response(
                status_code=416,
                headers={**headers, "Content-Range": f"bytes */{size}"},
            )
        if parsed is not None:
            start, end = parsed
            length = end - start + 1
            return StreamingResponse(
                _read(path, start, length),
                status_code=206,
                media_type="application/octet-stream",
                headers={
                    **headers,
                    "Content-Range": f"bytes {start}-{end}/{size}",
                    "Content-Length": str(length),
                },
            )
    return StreamingResponse(
        _read(path, 0, size),
        media_type="application/octet-stream",
        headers={**headers, "Content-Length": str(size)},
    )


def archive_members(ckpt: Checkpoint) -> list[tuple[str, Path]]:
    """(archive name, path) for every manifest file plus the manifest itself."""
    root = Path(ckpt.path).resolve()
    folder = checkpoint_dir_name(ckpt.step)
    members = []
    for name in sorted((ckpt.manifest or {}).get("files", {})):
        path = (root / name).resolve()
        if path.is_relative_to(root) and path.is_file():
            members.append((f"{folder}/{name}", path))
    manifest = root / "manifest.json"
    if manifest.is_file():
        members.append((f"{folder}/manifest.json", manifest))
    return members


def tar_stream(members: list[tuple[str, Path]]) -> Iterator[bytes]:
    for arcname, path in members:
        st = path.stat()
        info = tarfile.TarInfo(arcname)
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o644
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        sent = 0
        for chunk in _read(path, 0, st.st_size):
            sent += len(chunk)
            yield chunk
        if sent != st.st_size:  # the file shrank under us: a corrupt archive must not look whole
            raise OSError(f"{path} changed while archiving")
        pad = -st.st_size % tarfile.BLOCKSIZE
        if pad:
            yield b"\0" * pad
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
