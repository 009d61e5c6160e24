"""``/v1/uploads``: training corpora usable as ``dataset: {source: upload, upload_id: …}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TeamDep
from api.schemas import ErrorResponse, UploadPublic
from service import uploads
from service.errors import NotFoundError
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
