"""``sharp uploads …``: send a corpus to the service (``put``) and look one up (``show``).

A file up to ``--chunked-above`` bytes (default 256 MiB, ``SHARP_UPLOAD_CHUNKED_ABOVE``) goes
in one request (``POST /v1/uploads``); a larger one through an upload session
(``POST /v1/uploads/sessions``, docs/api.md): the file's sha256 is computed first, parts are
sent by offset and retried, and the server checks the digest at the end. Run ``put`` again
after a crash or a cut connection and it resumes: the server hands back the team's open
session for the same sha256, with the offset it holds. ``put`` prints the upload id on stdout
(``ID=$(sharp uploads put corpus.jsonl)``). Connection, profile and exit codes are those of
``sharp jobs`` (`ops.client_cli`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.markup import escape

from ops.client_cli import (
    EXIT_FAILED,
    EXIT_OK,
    CliExit,
    KeyOpt,
    UrlOpt,
    check,
    client,
    err,
    out,
    run,
)
from sharp_core.train.checkpoint import sha256_file

uploads_app = typer.Typer(
    help="Training corpora: upload (resumable for large files), show.", no_args_is_help=True
)

DEFAULT_CHUNKED_ABOVE = 256 * 1024 * 1024
#: Tries per part on a lost connection or a 5xx before giving up (the next run resumes).
PART_TRIES = 5


def _chunked_above() -> int:
    raw = os.environ.get("SHARP_UPLOAD_CHUNKED_ABOVE")
    return int(raw) if raw and raw.isdigit() else DEFAULT_CHUNKED_ABOVE


def _one_request(c: httpx.Client, path: Path, fmt: str | None) -> dict[str, Any]:
    with path.open("rb") as f:
        data = {"format": fmt} if fmt else None
        return dict(check(c.post("/v1/uploads", files={"file": (path.name, f)}, data=data)))


def _session(c: httpx.Client, path: Path, fmt: str | None, part_size: int | None) -> dict[str, Any]:
    size = path.stat().st_size
    err.print(f"hashing {escape(path.name)} ({size:,} bytes)…")
    body: dict[str, Any] = {"filename": path.name, "size": size, "sha256": sha256_file(path)}
    if fmt:
        body["format"] = fmt
    if part_size:
        body["part_size"] = part_size
    s = dict(check(c.post("/v1/uploads/sessions", json=body)))
    if s["status"] == "completed":
        err.print("the server has these bytes already")
        return dict(s["upload"])
    if s["offset"]:
        err.print(f"resuming session {s['id']} at byte {s['offset']:,} of {size:,}")
    else:
        err.print(f"session {s['id']}: {size:,} bytes in parts of {s['part_size']:,}")
    with path.open("rb") as f:
        while s["offset"] < size:
            s = _send_part(c, s, f)
            err.print(f"  {s['offset']:,} / {size:,} bytes", end="\r")
    err.print("")
    err.print("verifying the sha256 on the server…")
    # the server reads the whole file back: minutes for tens of GB
    done = dict(
        check(
            c.post(
                f"/v1/uploads/sessions/{s['id']}/complete",
                json={},
                timeout=httpx.Timeout(None, connect=10.0),
            )
        )
    )
    return dict(done["upload"])


def _send_part(c: httpx.Client, s: dict[str, Any], f: Any) -> dict[str, Any]:
    """One part at the server's offset, retried on a lost connection or a 5xx; a 409 means
    the server holds a different offset than we thought: ask it and go on from there."""
    for attempt in range(PART_TRIES):
        offset = int(s["offset"])
        f.seek(offset)
        data = f.read(min(int(s["part_size"]), int(s["size"]) - offset))
        try:
            r = c.put(
                f"/v1/uploads/sessions/{s['id']}/parts",
                params={"offset": offset},
                content=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=httpx.Timeout(600.0, connect=10.0),
            )
            if r.status_code < 500 and r.status_code != 409:
                return dict(check(r))
            if r.status_code >= 500:
                err.print(f"  part at {offset:,}: HTTP {r.status_code}; retrying")
                time.sleep(min(2.0**attempt, 30.0))
        except httpx.TransportError as e:
            err.print(f"  part at {offset:,}: {type(e).__name__}; retrying")
            time.sleep(min(2.0**attempt, 30.0))
        s = dict(check(c.get(f"/v1/uploads/sessions/{s['id']}")))  # where the server is
    raise CliExit(
        EXIT_FAILED,
        f"the part at byte {s['offset']:,} did not go through after {PART_TRIES} tries; "
        "run the same command again to resume",
    )


@uploads_app.command("put")
def put_cmd(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    fmt: str | None = typer.Option(
        None, "--format", help="txt, jsonl or parquet (default: from the extension)."
    ),
    chunked_above: int | None = typer.Option(
        None,
        "--chunked-above",
        min=0,
        help="Files larger than this many bytes go through a resumable upload session "
        f"(default {DEFAULT_CHUNKED_ABOVE}, or SHARP_UPLOAD_CHUNKED_ABOVE).",
    ),
    part_size: int | None = typer.Option(
        None, "--part-size", min=1, help="Bytes per part (default: the server's)."
    ),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Upload PATH; print its upload id (for ``dataset: {source: upload, upload_id: …}``)."""

    def body() -> int:
        limit = _chunked_above() if chunked_above is None else chunked_above
        with client(url, key) as c:
            if path.stat().st_size > limit:
                upload = _session(c, path, fmt, part_size)
            else:
                upload = _one_request(c, path, fmt)
        out.print(upload["id"])
        err.print(
            f"upload {upload['id']}: {escape(upload['filename'])}, {upload['size']:,} bytes, "
            f"{upload['format']}, sha256 {upload['sha256']}"
        )
        return EXIT_OK

    run(body)


@uploads_app.command("show")
def show_cmd(
    upload_id: str,
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """An upload (or an upload session, ``ups_…``) as the API's JSON."""

    def body() -> int:
        path = "/v1/uploads/sessions/" if upload_id.startswith("ups_") else "/v1/uploads/"
        with client(url, key) as c:
            out.print_json(data=check(c.get(path + upload_id)))
        return EXIT_OK

    run(body)
