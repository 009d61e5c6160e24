"""``/v1/uploads``: training corpora usable as ``dataset: {source: upload, upload_id: …}``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TeamDep
from api.schemas import (
    ErrorResponse,
    UploadPublic,
    UploadSessionComplete,
    UploadSessionCreate,
    UploadSessionPublic,
)
from service import upload_sessions, uploads
from service.errors import InvalidRequestError, NotFoundError
from service.repositories import UploadRepository

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


def _public(u) -> UploadPublic:  # noqa: ANN001 - an service.models.Upload
    return UploadPublic(
        id=u.id,
        sha256=u.sha256,
        size=u.size,
        filename=u.filename,
        format=u.format,
        created_at=u.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=UploadPublic,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "examples": [{"file": "The quick brown fox.\n", "format": "txt"}],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": "The corpus: .txt, .jsonl or .parquet",
                            },
                            "format": {
                                "type": "string",
                                "enum": list(uploads.FORMATS),
                                "description": "Overrides the file name's extension.",
                            },
                        },
                    }
                }
            },
        }
    },
    responses={
        200: {"model": UploadPublic, "description": "The same content was uploaded before."},
        413: {"model": ErrorResponse, "description": "Larger than max_upload_bytes."},
        422: {"model": ErrorResponse, "description": "Not valid txt / jsonl / parquet."},
        401: {"model": ErrorResponse},
    },
)
async def create_upload(
    request: Request, response: Response, team: TeamDep, session: SessionDep, settings: SettingsDep
) -> UploadPublic:
    """Stream a corpus in (multipart field ``file``), validate it, store it by sha256."""
    received = await uploads.receive(request, settings)
    upload, created = await run_in_threadpool(uploads.store, session, settings, team, received)
    response.status_code = 201 if created else 200
    return _public(upload)


@router.get(
    "/{upload_id}",
    response_model=UploadPublic,
    responses={404: {"model": ErrorResponse}, 401: {"model": ErrorResponse}},
)
def get_upload(
    upload_id: Annotated[str, Path(max_length=64)], team: TeamDep, session: SessionDep
) -> UploadPublic:
    upload = UploadRepository(session).get_for_team(team.id, upload_id)
    if upload is None:
        raise NotFoundError(f"no upload '{upload_id}'", param="upload_id")
    return _public(upload)


# --------------------------------------------------------------------------- upload sessions
def _session_public(s, upload=None) -> UploadSessionPublic:  # noqa: ANN001 - models
    return UploadSessionPublic(
        id=s.id,
        status=upload_sessions.public_status(s),
        filename=s.filename,
        format=s.format,
        size=s.size,
        sha256=s.sha256,
        part_size=s.part_size,
        offset=s.received,
        created_at=s.created_at,
        expires_at=s.expires_at,
        upload=_public(upload) if upload is not None else None,
    )


def _with_upload(session: SessionDep, team_id: str, s) -> UploadSessionPublic:  # noqa: ANN001
    upload = UploadRepository(session).get_for_team(team_id, s.upload_id) if s.upload_id else None
    return _session_public(s, upload)


SessionId = Annotated[str, Path(max_length=64)]
_SESSION_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such session for this team."},
    410: {"model": ErrorResponse, "description": "The session expired or was aborted."},
    401: {"model": ErrorResponse},
}


@router.post(
    "/sessions",
    status_code=201,
    response_model=UploadSessionPublic,
    responses={
        200: {
            "model": UploadSessionPublic,
            "description": "The team's open session for the same file (resume from its "
            "`offset`), or a completed one when the team has these bytes already.",
        },
        413: {"model": ErrorResponse, "description": "Larger than max_upload_session_bytes."},
        422: {"model": ErrorResponse},
        503: {"model": ErrorResponse, "description": "The artifact store did not answer."},
        401: {"model": ErrorResponse},
    },
)
def create_upload_session(
    body: UploadSessionCreate,
    response: Response,
    team: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
) -> UploadSessionPublic:
    """Start a resumable upload of a large file (parts by offset, sha256 checked at the end)."""
    s, created = upload_sessions.create(
        session,
        settings,
        team,
        filename=body.filename,
        size=body.size,
        sha256=body.sha256,
        fmt=body.format,
        part_size=body.part_size,
    )
    response.status_code = 201 if created and s.status == "open" else 200
    return _with_upload(session, team.id, s)


@router.get(
    "/sessions/{session_id}",
    response_model=UploadSessionPublic,
    responses={404: _SESSION_ERRORS[404], 401: _SESSION_ERRORS[401]},
)
def get_upload_session(
    session_id: SessionId, team: TeamDep, session: SessionDep
) -> UploadSessionPublic:
    """Where a session stands: `offset` is the byte the next part starts at."""
    return _with_upload(session, team.id, upload_sessions.get(session, team.id, session_id))


@router.put(
    "/sessions/{session_id}/parts",
    response_model=UploadSessionPublic,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                }
            },
            "description": "The part's bytes: `part_size` of them (the last part: the rest).",
        }
    },
    responses={
        **_SESSION_ERRORS,
        409: {
            "model": ErrorResponse,
            "description": "`offset` is beyond the bytes the server holds (the message says "
            "where to resume).",
        },
        422: {"model": ErrorResponse, "description": "Offset not a part boundary, wrong length."},
        503: {"model": ErrorResponse, "description": "The artifact store did not answer."},
    },
)
async def put_upload_part(
    request: Request,
    session_id: SessionId,
    offset: Annotated[int, Query(ge=0, description="Where the part starts in the file.")],
    team: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
) -> UploadSessionPublic:
    """Send one part. Idempotent: a part the server already holds is acknowledged again."""
    declared = request.headers.get("content-length")
    length = int(declared) if declared and declared.isdigit() else None
    plan = await run_in_threadpool(
        upload_sessions.plan_part, session, team.id, session_id, offset, length
    )
    etag = None
    if plan.duplicate:
        seen = 0
        async for chunk in request.stream():  # read and dropped: the server has these bytes
            seen += len(chunk)
            if seen > plan.length:
                raise InvalidRequestError(
                    f"the part at offset {offset} is {plan.length} bytes; more were sent",
                    param="Content-Length",
                )
    else:
        writer = await run_in_threadpool(upload_sessions.PartWriter, settings, plan)
        try:
            pending: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                pending.append(chunk)
                size += len(chunk)
                if size >= 4 * 1024 * 1024:
                    await run_in_threadpool(writer.write, b"".join(pending))
                    pending, size = [], 0
            if pending:
                await run_in_threadpool(writer.write, b"".join(pending))
            etag = await run_in_threadpool(writer.finish)
        finally:
            await run_in_threadpool(writer.close)
    s = await run_in_threadpool(upload_sessions.commit_part, session, settings, team.id, plan, etag)
    return _session_public(s)


@router.post(
    "/sessions/{session_id}/complete",
    response_model=UploadSessionPublic,
    responses={
        **_SESSION_ERRORS,
        409: {"model": ErrorResponse, "description": "Not every byte has arrived yet."},
        422: {
            "model": ErrorResponse,
            "description": "The bytes' sha256 is not the declared one (`param: sha256`; the "
            "session keeps its bytes), or they are not valid txt / jsonl / parquet.",
        },
        503: {"model": ErrorResponse, "description": "The artifact store did not answer."},
    },
)
def complete_upload_session(
    session_id: SessionId,
    team: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
    body: UploadSessionComplete | None = None,
) -> UploadSessionPublic:
    """Verify size and sha256 and make the bytes an upload (`upload.id` for a job's spec)."""
    sha = body.sha256 if body is not None else None
    s = upload_sessions.complete(session, settings, team.id, session_id, sha)
    return _with_upload(session, team.id, s)


@router.delete(
    "/sessions/{session_id}",
    response_model=UploadSessionPublic,
    responses={
        404: _SESSION_ERRORS[404],
        401: _SESSION_ERRORS[401],
        422: {"model": ErrorResponse},
    },
)
def abort_upload_session(
    session_id: SessionId, team: TeamDep, session: SessionDep, settings: SettingsDep
) -> UploadSessionPublic:
    """Give up a session and delete its bytes (idempotent; a completed one stays an upload)."""
    return _session_public(upload_sessions.abort(session, settings, team.id, session_id))
