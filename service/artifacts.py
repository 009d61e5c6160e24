"""Serving checkpoint files: single files with Range/ETag, whole folders as a tar stream.

Why names are looked up in the manifest instead of joined onto a path: the manifest is the
list of files the trainer wrote and hashed, so ``../../etc/passwd`` or a half-written
temporary file can never be served; the resolved path is still checked to stay inside the
checkpoint folder (a symlink planted there cannot leak out either).

Files are read through the artifact store (`service.store`): a local folder or an S3 bucket,
streamed in chunks (a Range becomes a ranged GET), or answered with a presigned redirect.

Why a hand-written tar stream: ``tarfile`` in streaming mode buffers each member whole, and
a student's weights can be gigabytes. A tar member is a 512-byte header, the bytes, and
padding, so we write exactly that while reading each file in chunks.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from service.errors import (
    NotFoundError,
    RangeNotSatisfiableError,
    SharpError,
    StoreUnavailableError,
)
from service.models import Checkpoint
from service.store import ArtifactStore

CHUNK = 1024 * 1024


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_key(store: ArtifactStore, ckpt: Checkpoint) -> str:
    key = store.key_of(ckpt.path)
    if key is None:  # a row from another store (the deployment switched backends)
        raise NotFoundError(f"checkpoint {ckpt.step} is not in this store", param="step")
    return key


def resolve_file(store: ArtifactStore, ckpt: Checkpoint, name: str) -> tuple[str, dict[str, Any]]:
    """(key, manifest entry) of a manifest-listed file that is in the store, whole."""
    files = (ckpt.manifest or {}).get("files", {})
    meta = files.get(name)
    if meta is None:
        raise NotFoundError(f"no file '{name}' in checkpoint {ckpt.step}", param="name")
    root = checkpoint_key(store, ckpt)
    key = f"{root}/{name}"
    try:
        size = store.size(key, within=root)
    except FileNotFoundError:
        size = None
    except OSError as e:
        raise StoreUnavailableError(f"the artifact store did not answer: {e}") from None
    if size is None:
        raise NotFoundError(f"no file '{name}' in checkpoint {ckpt.step}", param="name")
    if size != int(meta.get("size", -1)):
        raise SharpError(
            f"'{name}' in the store does not match the checkpoint's manifest",
            code="checkpoint_error",
        )
    return key, meta


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


def file_response(
    request: Request,
    store: ArtifactStore,
    key: str,
    meta: dict[str, Any],
    *,
    redirect_s: int | None = None,
) -> Response:
    """The file with ETag (its sha256) and Range; or, with `redirect_s` and a store that can
    presign, a 307 to a URL valid that long (conditional requests are still answered here)."""
    size = int(meta["size"])
    name = key.rsplit("/", 1)[-1]
    etag = f'"{meta["sha256"]}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=31536000, immutable",  # content-addressed
        "Content-Disposition": f'attachment; filename="{name}"',
    }
    inm = request.headers.get("if-none-match")
    if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
        return Response(status_code=304, headers=headers)
    if redirect_s is not None:
        url = store.presign(key, name, redirect_s)
        if url is not None:
            return Response(
                status_code=307,
                headers={"Location": url, "ETag": etag, "Cache-Control": "private, no-store"},
            )

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
                store.read(key, start, length),
                status_code=206,
                media_type="application/octet-stream",
                headers={
                    **headers,
                    "Content-Range": f"bytes {start}-{end}/{size}",
                    "Content-Length": str(length),
                },
            )
    return StreamingResponse(
        store.read(key, 0, size),
        media_type="application/octet-stream",
        headers={**headers, "Content-Length": str(size)},
    )


#: The folder of a checkpoint that holds the sharded training state (sharp_core's DCP_DIR):
#: what a resume needs, not what a user who downloads the student wants.
STATE_DIR = "dcp/"


def is_student_file(name: str) -> bool:
    """True for the files of the ``save_pretrained`` student (and its small loop state), False
    for the sharded training state, which is as large as weights + AdamW moments again."""
    return not name.startswith(STATE_DIR)


def archive_members(
    store: ArtifactStore, ckpt: Checkpoint, *, with_state: bool = False
) -> list[tuple[str, str, int]]:
    """(archive name, key, size) for every manifest file in the store, then the manifest;
    the sharded training state (``dcp/``) only ``with_state``."""
    root = checkpoint_key(store, ckpt)
    folder = checkpoint_dir_name(ckpt.step)
    members = []
    for name in sorted((ckpt.manifest or {}).get("files", {})):
        if not with_state and not is_student_file(name):
            continue
        size = store.size(f"{root}/{name}", within=root)
        if size is not None:
            members.append((f"{folder}/{name}", f"{root}/{name}", size))
    size = store.size(f"{root}/manifest.json", within=root)
    if size is not None:
        members.append((f"{folder}/manifest.json", f"{root}/manifest.json", size))
    return members


def tar_stream(
    store: ArtifactStore, members: list[tuple[str, str, int]], mtime: int = 0
) -> Iterator[bytes]:
    for arcname, key, size in members:
        info = tarfile.TarInfo(arcname)
        info.size = size
        info.mtime = mtime
        info.mode = 0o644
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        sent = 0
        for chunk in store.read(key, 0, size):
            sent += len(chunk)
            yield chunk
        if sent != size:  # the object shrank under us: a corrupt archive must not look whole
            raise OSError(f"{key} changed while archiving")
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            yield b"\0" * pad
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
