"""The FastAPI application: `create_app(settings)` builds one from any settings.

Why a factory: tests, the embedded launcher (`sharp up`) and production (``uvicorn
api.app:app`` / ``--factory api.app:create_app``) each need an app bound to *their* database,
Redis and artifact root. Process-wide objects live on ``app.state`` and are closed by the
lifespan, so several apps can coexist in one process (as the tests do).

Errors: one handler renders every `SharpError` — the library's and the API's — and FastAPI's
own validation errors as ``{"error": {"code", "message", "param"}}``, with ``param`` naming
the offending field the way a client wrote it (``spec.training.lr``, ``limit``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import service.reactions  # noqa: F401  (registers the lifecycle's job-ended reactions)
from api.metrics import RequestMetrics
from api.metrics import router as metrics_router
from api.openapi import install as install_openapi
from api.openapi import install_docs, operation_id
from api.routes import (
    evaluations,
    health,
    jobs,
    sweeps,
    teacher_caches,
    teachers,
    teams,
    uploads,
    webhooks,
)
from api.ui import router as ui_router
from api.ui import static_files as ui_static
from service import plans, redact
from service.db import Database
from service.dispatch import Dispatch, make_delivery_dispatch, make_dispatch
from service.errors import SharpError
from service.live import LivePublisher
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

JOBS_DISPATCHED = Counter("sharp_jobs_dispatched_total", "Celery messages sent for jobs", ["queue"])


def _count_dispatch(pool: str) -> None:
    JOBS_DISPATCHED.labels(queue=pool).inc()


def error_response(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "param": param}}
    return JSONResponse(status_code=status, content=redact.scrub_data(body))


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        ctx: dict[str, Any] = dict(first.get("ctx") or {})  # type: ignore[arg-type]
        detail = ctx.get("error") or first.get("msg")
        return error_response(
            400, "malformed_json", f"the body is not valid JSON: {detail}", "body"
        )
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"unknown field '{loc[-1]}'"
    return error_response(422, "invalid_request", f"{param}: {message}", param)


async def _sharp_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SharpError)
    if exc.status >= 500:
        log.error("request failed: %s", exc)
    # An error may quote the user's data (a bad row), and with it a token pasted there.
    return JSONResponse(status_code=exc.status, content=redact.scrub_data({"error": exc.to_dict()}))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def _http_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 400:
        # FastAPI's own "error parsing the body" (bytes that are not UTF-8 JSON at all).
        return error_response(
            400, "malformed_json", f"the body is not valid JSON: {exc.detail}", "body"
        )
    resp = error_response(exc.status_code, code, str(exc.detail))
    for k, v in (exc.headers or {}).items():
        resp.headers[k] = v
    return resp


async def _unhandled_handler(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error")


def _streamed_upload(path: str) -> bool:
    """The routes that stream a file and enforce their own limit: a one-request upload and an
    upload session's part. (Creating or completing a session is a small JSON body.)"""
    return path == "/v1/uploads" or (
        path.startswith("/v1/uploads/sessions/") and path.endswith("/parts")
    )


class BodySizeLimit:
    """Refuse JSON bodies over ``max_request_bytes`` without reading more than that (uploads
    have their own limit, enforced while streaming).

    A declared ``Content-Length`` over the limit is refused before a byte is read. A body
    without one (``Transfer-Encoding: chunked``) is read here up to the limit and handed on
    from memory; the first chunk past the limit gets the 413, so a client cannot make the
    app buffer an unbounded body by simply not declaring its size.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Callable[[str], bool]):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            "payload_too_large",
            f"request bodies are limited to {self.max_bytes} bytes",
            "body",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                length = value
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No declared length: read (at most the limit) before the app sees anything.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None, *, dispatch: Dispatch | None = None) -> FastAPI:
    """Build the API for `settings` (default: `get_settings()`, i.e. the environment).

    `dispatch` replaces the Celery sender (for embedding in a process that already has one).
    """
    settings = settings or get_settings()
    redact.register_settings(settings)  # what this process stores is scrubbed of the token

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.aredis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=5, health_check_interval=30
        )
        threading.Thread(target=plans.warm_up, name="plan-warm-up", daemon=True).start()
        try:
            yield
        finally:
            await app.state.aredis.aclose()
            app.state.live.close()
            app.state.close_dispatch()
            app.state.close_deliver()
            app.state.db.dispose()

    app = FastAPI(
        title="SHARP distillation service",
        version="1",
        summary="Submit knowledge-distillation jobs, follow them live, download the student.",
        description=(
            "Authenticate with `Authorization: Bearer <key>` (keys come from "
            "`sharp admin keys create TEAM`). Errors are always "
            '`{"error": {"code", "message", "param"}}` (an invalid spec adds `errors`, every '
            "error found); another team's job is a 404."
        ),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        docs_url=None,  # served by install_docs from the package, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = Database(settings)
    app.state.live = LivePublisher(settings)
    app.state.aredis = None
    if dispatch is None:
        app.state.dispatch, app.state.close_dispatch = make_dispatch(settings, _count_dispatch)
    else:
        app.state.dispatch, app.state.close_dispatch = dispatch, lambda: None
    app.state.deliver, app.state.close_deliver = make_delivery_dispatch(settings)

    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(SharpError, _sharp_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, exempt=_streamed_upload)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    app.include_router(teams.router)
    app.include_router(webhooks.router)
    app.include_router(teacher_caches.router)
    app.include_router(teachers.router)
    app.include_router(evaluations.router)
    app.include_router(sweeps.router)
    app.include_router(metrics_router)
    app.include_router(ui_router)
    app.mount("/ui/static", ui_static, name="ui-static")
    install_openapi(app)  # JobSpec, error bodies, links: api/openapi.py
    install_docs(app)  # /docs: Swagger UI from the swagger-ui-bundle-v2 package
    # Outermost, so the latency covers every handler (and 413s from BodySizeLimit).
    app.add_middleware(RequestMetrics)
    return app


def _lazy_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """``uvicorn api.app:app`` for production: built from the environment on first request."""
    holder: dict[str, FastAPI] = {}

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if "app" not in holder:
            holder["app"] = create_app()
        await holder["app"](scope, receive, send)

    return asgi


app = _lazy_app()
