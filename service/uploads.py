"""Corpus uploads: streamed, size-limited, validated, stored once per sha256.

Why a streaming multipart parser instead of FastAPI's ``UploadFile``: ``UploadFile`` is only
handed over after the whole body has been spooled to disk, so a 50 GB upload would fill the
disk before the size check could say 413. Here each chunk is hashed, counted and written as
it arrives, and the request stops at ``max_upload_bytes``.

Validation is what the trainer will rely on: txt must be UTF-8 text, jsonl one JSON object
per line, parquet a readable Parquet file. Files are stored content-addressed
(``upload_root/ab/abcdef….jsonl``, or ``uploads/ab/…`` in the S3 store, `service.store`), so
the same corpus uploaded twice costs nothing.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.requests import Request

from service.errors import InvalidRequestError, PayloadTooLargeError, StoreUnavailableError
from service.ids import new_id
from service.models import Team, Upload, utcnow
from service.repositories import UploadRepository
from service.settings import Settings
from service.store import get_store, upload_key
from sharp_core.data.formats import validate_chat_rows
from sharp_core.errors import DataError

FORMATS = ("txt", "jsonl", "parquet")
_EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file


def format_of(filename: str) -> str:
    """The format a file name's extension says ('' when it says none)."""
    return _EXTENSIONS.get(Path(filename).suffix.lower(), "")


def _invalid(message: str, param: str = "file") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_upload")


@dataclass
class ReceivedFile:
    tmp_path: Path
    sha256: str
    size: int
    filename: str
    format: str


@dataclass
class _Part:
    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[str, bytes] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None


class _Receiver:
    """Parser callbacks: route the 'file' part to disk, keep the small 'format' field."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.part = _Part()
        self.pending: list[bytes] = []  # file bytes waiting to be written (off the event loop)
        self.hasher = hashlib.sha256()
        self.size = 0
        self.filename: str | None = None
        self.seen_file = False
        self.format_value = b""
        self.text = Validator("txt")  # the format may be named after the file: check as text

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        self.part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def _header_end(self) -> None:
        self.part.headers[self.part.header_field.decode("latin-1").lower()] = self.part.header_value
        self.part.header_field = b""
        self.part.header_value = b""

    def _headers_finished(self) -> None:
        _, opts = parse_options_header(self.part.headers.get("content-disposition", b""))
        self.part.name = opts.get(b"name", b"").decode("utf-8", "replace")
        fn = opts.get(b"filename")
        self.part.filename = fn.decode("utf-8", "replace") if fn is not None else None
        if self.part.name == "file":
            if self.seen_file:
                raise _invalid("send exactly one 'file' part")
            self.seen_file = True
            self.filename = Path(self.part.filename or "upload").name[:255] or "upload"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part.name == "file":
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLargeError(
                    f"the file is larger than this deployment's limit of {self.max_bytes} bytes",
                    param="file",
                )
            self.hasher.update(chunk)
            self.text.feed(chunk)
            self.pending.append(chunk)
        elif self.part.name == "format":
            self.format_value += chunk
            if len(self.format_value) > 32:
                raise _invalid("'format' is one of txt, jsonl, parquet", param="format")


async def receive(request: Request, settings: Settings) -> ReceivedFile:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise _invalid("send the corpus as multipart/form-data with a 'file' part")
    declared = request.headers.get("content-length")
    if (
        declared
        and declared.isdigit()
        and int(declared) > settings.max_upload_bytes + _MULTIPART_OVERHEAD
    ):
        raise PayloadTooLargeError(
            f"the file is larger than this deployment's limit of {settings.max_upload_bytes} bytes",
            param="file",
        )

    tmp_dir = Path(settings.upload_root) / ".tmp"
    await anyio.to_thread.run_sync(lambda: tmp_dir.mkdir(parents=True, exist_ok=True))
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    tmp_path = Path(tmp_name)
    receiver = _Receiver(settings.max_upload_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                    if receiver.pending:
                        data = b"".join(receiver.pending)
                        receiver.pending.clear()
                        await anyio.to_thread.run_sync(out.write, data)
                parser.finalize()
            except MultipartParseError as e:
                raise _invalid(f"malformed multipart/form-data body: {e}") from None
            await anyio.to_thread.run_sync(out.flush)
            await anyio.to_thread.run_sync(os.fsync, out.fileno())
        if not receiver.seen_file:
            raise _invalid("no 'file' part in the form")
        fmt = receiver.format_value.decode("utf-8", "replace").strip().lower()
        if not fmt:
            fmt = _EXTENSIONS.get(Path(receiver.filename or "").suffix.lower(), "")
        if fmt not in FORMATS:
            raise _invalid(
                "cannot tell the format: name the file .txt, .jsonl or .parquet, or send a "
                "'format' field",
                param="format",
            )
        if receiver.size == 0:
            raise _invalid("the file is empty")
        if fmt == "txt":
            receiver.text.finish()
        elif fmt == "jsonl":
            await anyio.to_thread.run_sync(_check_jsonl, tmp_path)
        else:
            await anyio.to_thread.run_sync(_check_parquet, tmp_path)
        return ReceivedFile(
            tmp_path=tmp_path,
            sha256=receiver.hasher.hexdigest(),
            size=receiver.size,
            filename=receiver.filename or "upload",
            format=fmt,
        )
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _check_jsonl(path: Path) -> None:
    with path.open("rb") as f:
        check = Validator("jsonl")
        while chunk := f.read(1 << 22):
            check.feed(chunk)
        check.finish()


class Validator:
    """The txt / jsonl checks over a stream of chunks (an upload session's bytes as they are
    read back for the sha256, never held whole): UTF-8 without NUL for txt, one JSON object
    per line (conversations checked) for jsonl. `finish` raises the first problem."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self.ok = True
        self.nul = False
        self.tail = b""
        self.lineno = 0
        self.rows = 0

    def feed(self, chunk: bytes) -> None:
        if self.fmt == "txt":
            if self.ok:
                try:
                    self.utf8.decode(chunk)
                except UnicodeDecodeError:
                    self.ok = False
            self.nul = self.nul or b"\0" in chunk
        elif self.fmt == "jsonl":
            lines = (self.tail + chunk).split(b"\n")
            self.tail = lines.pop()
            for line in lines:
                self._line(line)

    def _line(self, line: bytes) -> None:
        self.lineno += 1
        if not line.strip():
            return
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _invalid(f"line {self.lineno} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _invalid(f"line {self.lineno} is not a JSON object")
        if "messages" in obj:  # a conversation: refused now, not when a job starts
            try:
                validate_chat_rows([obj["messages"]], f"line {self.lineno}", "file", self.rows)
            except DataError as e:
                raise _invalid(e.message) from None
        self.rows += 1

    def finish(self) -> None:
        if self.fmt == "txt":
            try:
                self.utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                self.ok = False
            if not self.ok or self.nul:
                raise _invalid("a txt corpus must be UTF-8 text")
        elif self.fmt == "jsonl":
            if self.tail:
                self._line(self.tail)
                self.tail = b""
            if self.rows == 0:
                raise _invalid("no JSON objects in the file")


def _check_parquet(path: Path | Any) -> None:
    """A readable Parquet file with rows: only its footer is read (`path` may be a file
    object that seeks, an upload session's object in S3)."""
    import pyarrow.parquet as pq  # heavy; only uploads need it

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise _invalid(f"not a readable Parquet file: {e}") from None
    if meta.num_rows == 0:
        raise _invalid("the Parquet file has no rows")


def store(
    session: Session, settings: Settings, team: Team, received: ReceivedFile
) -> tuple[Upload, bool]:
    """Move the file to its content address and record it. (upload, created)."""
    repo = UploadRepository(session)
    existing = repo.get_by_sha256(team.id, received.sha256)
    ustore = get_store(settings, uploads=True)
    key = upload_key(received.sha256, received.format, ustore.remote)
    # Same content, same bytes: replacing an existing object is harmless and keeps this atomic.
    try:
        ustore.put_file(key, received.tmp_path, move=True)
    except OSError as e:
        received.tmp_path.unlink(missing_ok=True)
        raise StoreUnavailableError(f"the artifact store did not take the upload: {e}") from None
    if existing is not None:
        return existing, False
    return record(
        session,
        team.id,
        sha256=received.sha256,
        size=received.size,
        filename=received.filename,
        fmt=received.format,
        location=ustore.location(key),
    )


def record(
    session: Session, team_id: str, *, sha256: str, size: int, filename: str, fmt: str,
    location: str,
) -> tuple[Upload, bool]:  # fmt: skip
    """The team's upload row for content already at its address: (upload, created)."""
    repo = UploadRepository(session)
    existing = repo.get_by_sha256(team_id, sha256)
    if existing is not None:
        return existing, False
    upload = Upload(
        id=new_id("upl"),
        team_id=team_id,
        sha256=sha256,
        size=size,
        filename=filename,
        format=fmt,
        path=location,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            repo.add(upload)
    except IntegrityError:  # the same team uploaded the same bytes concurrently
        existing = repo.get_by_sha256(team_id, sha256)
        if existing is None:
            raise
        return existing, False
    return upload, True
