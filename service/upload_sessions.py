"""Resumable uploads: a file of tens of GB sent in parts, checked against its sha256 at the end.

The protocol (docs/api.md, "Large files: upload sessions") borrows from three designs:
tus's offset (the server says how many bytes it holds, a client resumes from there), S3
multipart's fixed parts (each part is one object part, replaced if sent again) and GCS's
session that expires. A session is created with the file's name, size and expected sha256;
each part is ``PUT …/parts?offset=N`` with N a multiple of ``part_size`` and the body exactly
``part_size`` bytes (the last part: the rest of the file); ``complete`` reads the bytes back
once, hashing and validating them as a stream, and turns the session into an ordinary
`Upload` (``dataset.source: upload``).

Where the bytes go while a session is open:

- local store: one staging file ``upload_root/.sessions/<id>.part``; a part is written at
  its offset (``pwrite``), so a part cut off mid-way is simply written again, and two
  requests racing on one part write the same bytes to the same place;
- S3 store: an S3 multipart upload to ``uploads/.sessions/<id>``, one S3 part per session
  part (part number = offset / part_size + 1), each spooled through a temporary file first
  (S3 wants a part's length before its bytes). ``complete`` assembles it, hashes it with a
  streaming GET and makes a server-side copy at the content address.

The database is the truth about progress: ``received`` moves forward only by a conditional
update under a row lock, after the part's bytes are in the store, so a crash between the two
leaves a part the client sends again (harmless: same offset, same bytes). A part below
``received`` is acknowledged without being written; one beyond it is a 409 naming the offset
to send. A wrong sha256 at ``complete`` is a 422 on ``sha256`` that keeps the session and its
bytes: complete again with the right digest, or abort.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from sqlalchemy.orm import Session

from service import uploads
from service.errors import (
    GoneError,
    InvalidRequestError,
    InvalidStateError,
    NotFoundError,
    OffsetMismatchError,
    PayloadTooLargeError,
    StoreUnavailableError,
)
from service.ids import new_id
from service.models import Team, UploadSession, utcnow
from service.repositories import UploadRepository, UploadSessionRepository
from service.settings import Settings
from service.store import UPLOADS, ArtifactStore, S3Store, get_store, upload_key

S3_MIN_PART = 5 * 1024 * 1024
S3_MAX_PART = 5 * 1024**3
S3_MAX_PARTS = 10_000
READ_CHUNK = 8 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _store(settings: Settings) -> ArtifactStore:
    return get_store(settings, uploads=True)


def staging_key(session_id: str, remote: bool) -> str:
    return f"{UPLOADS}/.sessions/{session_id}" if remote else f".sessions/{session_id}.part"


SessionStatus = Literal["open", "completed", "aborted", "expired"]


def public_status(s: UploadSession, now: dt.datetime | None = None) -> SessionStatus:
    """open | completed | aborted | expired (an open session past its ``expires_at``)."""
    if s.status == "open" and s.expires_at <= (now or utcnow()):
        return "expired"
    return cast(SessionStatus, s.status)


def _digest(value: str, param: str = "sha256") -> str:
    v = value.strip().lower()
    if not _SHA256.match(v):
        raise InvalidRequestError("a sha256 is 64 hexadecimal characters", param=param)
    return v


def _part_bounds(settings: Settings, remote: bool) -> tuple[int, int]:
    low = max(settings.upload_min_part_bytes, S3_MIN_PART if remote else 1)
    return low, S3_MAX_PART


# --------------------------------------------------------------------------- create / read
def create(
    session: Session,
    settings: Settings,
    team: Team,
    *,
    filename: str,
    size: int,
    sha256: str,
    fmt: str | None = None,
    part_size: int | None = None,
) -> tuple[UploadSession, bool]:
    """A new session, or (created False) the team's open session for the same file — how a
    client that lost its session id resumes — or a completed one when the team already has
    an upload with this sha256 (nothing to send)."""
    sha = _digest(sha256)
    name = Path(filename or "upload").name[:255] or "upload"
    if size < 1:
        raise InvalidRequestError("size is the file's length in bytes, at least 1", param="size")
    if size > settings.max_upload_session_bytes:
        raise PayloadTooLargeError(
            f"the file is larger than this deployment's limit of "
            f"{settings.max_upload_session_bytes} bytes for an upload session",
            param="size",
        )
    fmt = (fmt or "").strip().lower() or uploads.format_of(name)
    if fmt not in uploads.FORMATS:
        raise InvalidRequestError(
            "cannot tell the format: name the file .txt, .jsonl or .parquet, or send 'format'",
            param="format",
        )
    ustore = _store(settings)
    low, high = _part_bounds(settings, ustore.remote)
    part = part_size if part_size is not None else max(settings.upload_part_bytes, low)
    if not low <= part <= high:
        raise InvalidRequestError(f"part_size must be in [{low}, {high}] bytes", param="part_size")
    if ustore.remote and math.ceil(size / part) > S3_MAX_PARTS:
        need = math.ceil(size / S3_MAX_PARTS)
        raise InvalidRequestError(
            f"an S3 upload has at most {S3_MAX_PARTS} parts: part_size must be at least {need}",
            param="part_size",
        )
    sweep_expired(session, settings, team.id)
    now = utcnow()
    done = UploadRepository(session).get_by_sha256(team.id, sha)
    if done is not None:  # the team has these bytes already
        sid = new_id("ups")
        return _add(
            session, team.id, sid, name, fmt, size, sha, part, "", now, settings, done.id
        ), True
    for s in UploadSessionRepository(session).open_for_sha256(team.id, sha):
        same = s.size == size and s.format == fmt and part_size in (None, s.part_size)
        if same and s.expires_at > now:
            return s, False
    sid = new_id("ups")
    key = staging_key(sid, ustore.remote)
    s = _add(session, team.id, sid, name, fmt, size, sha, part, key, now, settings, None)
    if isinstance(ustore, S3Store):
        try:
            s.multipart_id = ustore.multipart_start(key)
        except OSError as e:
            raise StoreUnavailableError(f"the artifact store did not answer: {e}") from None
        session.flush()
    return s, True


def _add(
    session: Session, team_id: str, sid: str, name: str, fmt: str, size: int, sha: str, part: int,
    key: str, now: dt.datetime, settings: Settings, upload_id: str | None,
) -> UploadSession:  # fmt: skip
    s = UploadSession(
        id=sid,
        team_id=team_id,
        filename=name,
        format=fmt,
        size=size,
        sha256=sha,
        part_size=part,
        received=size if upload_id else 0,
        status="completed" if upload_id else "open",
        store_key=key,
        parts={},
        upload_id=upload_id,
        created_at=now,
        updated_at=now,
        expires_at=now + dt.timedelta(seconds=settings.upload_session_ttl_s),
    )
    return UploadSessionRepository(session).add(s)


def get(session: Session, team_id: str, session_id: str, *, lock: bool = False) -> UploadSession:
    s = UploadSessionRepository(session).get_for_team(team_id, session_id, lock=lock)
    if s is None:
        raise NotFoundError(f"no upload session '{session_id}'", param="session_id")
    return s


def _open(session: Session, team_id: str, session_id: str, *, lock: bool = False) -> UploadSession:
    s = get(session, team_id, session_id, lock=lock)
    status = public_status(s)
    if status in ("expired", "aborted"):
        raise GoneError(
            f"upload session '{session_id}' is {status}: create a new one", param="session_id"
        )
    return s


# --------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class PartPlan:
    """What one ``PUT …/parts?offset=`` does: write ``length`` bytes at ``offset`` (part
    ``number`` in S3), or, ``duplicate``, acknowledge a part the server already holds (its
    body is read and dropped, whatever it is: a retry after a lost answer)."""

    session_id: str
    offset: int
    length: int
    number: int
    duplicate: bool
    store_key: str
    multipart_id: str | None


def plan_part(
    session: Session, team_id: str, session_id: str, offset: int, length: int | None
) -> PartPlan:
    s = _open(session, team_id, session_id)
    if offset < 0 or offset >= s.size or offset % s.part_size:
        raise InvalidRequestError(
            f"offset must be a multiple of part_size ({s.part_size}) below size ({s.size})",
            param="offset",
        )
    expected = min(s.part_size, s.size - offset)
    duplicate = offset < s.received or s.status == "completed"
    if length is not None and length != expected and not duplicate:
        raise InvalidRequestError(
            f"the part at offset {offset} is {expected} bytes, not {length}",
            param="Content-Length",
        )
    if offset > s.received:
        raise OffsetMismatchError(
            f"the server holds {s.received} bytes of this upload: send the part at offset "
            f"{s.received} first",
            param="offset",
        )
    return PartPlan(
        session_id=s.id,
        offset=offset,
        length=expected,
        number=offset // s.part_size + 1,
        duplicate=duplicate,
        store_key=s.store_key,
        multipart_id=s.multipart_id,
    )


class PartWriter:
    """Where a part's bytes go as they arrive (called off the event loop): straight into the
    staging file at the part's offset, or into a temporary file that becomes an S3 part."""

    def __init__(self, settings: Settings, plan: PartPlan):
        self.plan = plan
        self.store = _store(settings)
        self.written = 0
        if isinstance(self.store, S3Store):
            tmp_dir = Path(settings.upload_root) / ".tmp"
            tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="part-")
            self.spool: Path | None = Path(name)
        else:
            path = Path(self.store.location(plan.store_key))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            self.spool = None
        self.fd = fd

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.plan.length:
            raise InvalidRequestError(
                f"the part at offset {self.plan.offset} is {self.plan.length} bytes; more "
                "were sent",
                param="Content-Length",
            )
        at = self.written if self.spool is not None else self.plan.offset + self.written
        os.pwrite(self.fd, data, at)
        self.written += len(data)

    def finish(self) -> str | None:
        """Make the part durable; its S3 ETag (None for the local store)."""
        try:
            if self.written != self.plan.length:
                raise InvalidRequestError(
                    f"the part at offset {self.plan.offset} is {self.plan.length} bytes; "
                    f"{self.written} arrived",
                    param="Content-Length",
                )
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.spool is None:
                return None
            assert isinstance(self.store, S3Store) and self.plan.multipart_id
            try:
                return self.store.multipart_put(
                    self.plan.store_key, self.plan.multipart_id, self.plan.number, self.spool
                )
            except OSError as e:
                raise StoreUnavailableError(
                    f"the artifact store did not take the part: {e}"
                ) from None
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)


def commit_part(
    session: Session, settings: Settings, team_id: str, plan: PartPlan, etag: str | None
) -> UploadSession:
    """Record a part the store now holds: ``received`` moves on if it was waiting for this
    part (under the row lock, so two racing requests move it once)."""
    s = _open(session, team_id, plan.session_id, lock=True)
    now = utcnow()
    if etag is not None:  # S3 holds the latest upload of this part number
        s.parts = {**s.parts, str(plan.number): etag}
    if s.status == "open" and s.received == plan.offset:
        s.received = plan.offset + plan.length
    s.updated_at = now
    s.expires_at = now + dt.timedelta(seconds=settings.upload_session_ttl_s)
    session.flush()
    return s


# --------------------------------------------------------------------------- complete / abort
class _StoreFile(io.RawIOBase):
    """A seekable read-only file over an object (ranged reads): how pyarrow reads a Parquet
    footer from a staged upload without downloading it."""

    def __init__(self, store: ArtifactStore, key: str, size: int):
        self.store, self.key, self.length, self.pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        data = b"".join(self.store.read(self.key, self.pos, n))
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def complete(
    session: Session, settings: Settings, team_id: str, session_id: str, sha256: str | None = None
) -> UploadSession:
    """Verify size and sha256 (one streaming read), validate the format, move the bytes to
    their content address and record the upload. Idempotent once completed."""
    s = _open(session, team_id, session_id)
    if s.status == "completed":
        return s
    if s.received < s.size:
        raise InvalidStateError(
            f"the server holds {s.received} of {s.size} bytes: send the part at offset "
            f"{s.received}",
            param="offset",
            code="upload_incomplete",
        )
    want = _digest(sha256) if sha256 is not None else s.sha256
    ustore = _store(settings)
    try:
        if isinstance(ustore, S3Store) and s.multipart_id:
            ustore.multipart_complete(
                s.store_key, s.multipart_id, {int(n): e for n, e in s.parts.items()}
            )
            s.multipart_id = None
            session.commit()  # the assembled object is kept whatever the digest turns out to be
        h = hashlib.sha256()
        check = uploads.Validator(s.format)
        n = 0
        for chunk in ustore.read(s.store_key, 0, s.size):
            h.update(chunk)
            check.feed(chunk)
            n += len(chunk)
    except FileNotFoundError:
        session.refresh(s)
        if s.status == "completed":  # another request completed it meanwhile
            return s
        if s.status == "aborted":
            raise GoneError(f"upload session '{s.id}' was aborted", param="session_id") from None
        raise StoreUnavailableError(
            f"the staged bytes of upload session '{s.id}' are missing from the store"
        ) from None
    except OSError as e:
        raise StoreUnavailableError(f"the artifact store did not answer: {e}") from None
    if n != s.size:
        raise StoreUnavailableError(f"the store holds {n} of the session's {s.size} bytes")
    digest = h.hexdigest()
    if digest != want:
        raise InvalidRequestError(
            f"the {s.size} bytes received have sha256 {digest}, not {want}; the session keeps "
            "them: complete again with the right sha256, or abort it and upload again",
            param="sha256",
            code="sha256_mismatch",
        )
    check.finish()
    if s.format == "parquet":
        uploads._check_parquet(_StoreFile(ustore, s.store_key, s.size))
    final = upload_key(digest, s.format, ustore.remote)
    try:
        if isinstance(ustore, S3Store):
            ustore.copy(s.store_key, final)
            ustore.delete([s.store_key])
        else:
            ustore.put_file(final, Path(ustore.location(s.store_key)), move=True)
    except OSError as e:
        raise StoreUnavailableError(f"the artifact store did not take the upload: {e}") from None
    upload, _ = uploads.record(
        session,
        team_id,
        sha256=digest,
        size=s.size,
        filename=s.filename,
        fmt=s.format,
        location=ustore.location(final),
    )
    UploadSessionRepository(session).set_state(s, "completed", sha256=digest, upload_id=upload.id)
    return s


def _discard(settings: Settings, s: UploadSession) -> None:
    ustore = _store(settings)
    if not s.store_key:
        return
    if isinstance(ustore, S3Store) and s.multipart_id:
        ustore.multipart_abort(s.store_key, s.multipart_id)
    ustore.delete([s.store_key])


def abort(session: Session, settings: Settings, team_id: str, session_id: str) -> UploadSession:
    """Give up a session: its bytes are deleted (idempotent; a completed session is left as
    it is, its bytes being an upload)."""
    s = get(session, team_id, session_id, lock=True)
    if s.status in ("completed", "aborted"):  # a completed session's bytes are its upload now
        return s
    try:
        _discard(settings, s)
    except OSError as e:
        raise StoreUnavailableError(f"the artifact store did not answer: {e}") from None
    UploadSessionRepository(session).set_state(s, "aborted", multipart_id=None, parts={})
    return s


def sweep_expired(session: Session, settings: Settings, team_id: str | None = None) -> list[str]:
    """Delete the bytes of open sessions past their expiry (they read as 'expired' from then
    on, status 'aborted'); returns their ids. Run when a session is created and by
    ``sharp admin storage prune``."""
    repo = UploadSessionRepository(session)
    gone = []
    for s in repo.expired(team_id, utcnow()):
        try:
            _discard(settings, s)
        except OSError:
            continue  # the store is down: next time
        repo.set_state(s, "aborted", multipart_id=None, parts={})
        gone.append(s.id)
    return gone
