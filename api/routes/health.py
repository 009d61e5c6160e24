"""Liveness and readiness.

``/healthz`` says the process serves requests (restart it if not); ``/readyz`` says its
dependencies answer (take it out of the load balancer if not): the database and Redis,
without which no job can be created or followed, and the artifact store (a local folder or
an S3 bucket), without which no checkpoint can be listed or downloaded.
"""

from __future__ import annotations

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.schemas import ErrorResponse, Health
from service.store import get_store

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def _check_db(request: Request) -> None:
    request.app.state.db.ping()


def _check_store(request: Request) -> None:
    get_store(request.app.state.settings).ping()


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(5):
            await anyio.to_thread.run_sync(_check_db, request)
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means "not ready"
        checks["database"] = f"error: {type(e).__name__}: {e}"[:300]
    try:
        with anyio.fail_after(5):
            await request.app.state.aredis.ping()
        checks["redis"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["redis"] = f"error: {type(e).__name__}: {e}"[:300]
    try:
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(_check_store, request, abandon_on_cancel=True)
        checks["artifacts"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["artifacts"] = f"error: {type(e).__name__}: {e}"[:300]
    bad = {k: v for k, v in checks.items() if v != "ok"}
    if bad:
        message = "; ".join(f"{k}: {v}" for k, v in bad.items())
        return JSONResponse(
            status_code=503,
            content={
                "error": {"code": "not_ready", "message": message, "param": None},
                "checks": checks,
            },
        )
    return JSONResponse(Health(status="ready", checks=checks).model_dump())
