"""Request dependencies as ``Annotated`` aliases (full-stack-fastapi-template style).

Everything process-wide (settings, the database, the Redis publisher, the Celery dispatcher)
hangs off ``app.state``, set by `api.app.create_app`, so tests and the embedded launcher can
build an app from any `Settings` without touching module globals.

The session dependency is the request's one transaction. It uses ``scope="function"``: the
commit happens when the route returns, *before* the response is sent, so a client that gets a
201 can immediately read the job back, and a failing commit is a 500 instead of a lie.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import UnauthorizedError
from service.jobs import JobService
from service.models import Team
from service.repositories import ApiKeyRepository
from service.security import hash_key
from service.settings import Settings
from service.sweeps import SweepService


# The dependencies that do no I/O are ``async``: FastAPI runs a sync one in its thread pool,
# and each such hop cost CPU on every request (issue 17's profile: six hops per GET).
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    db: Database = request.app.state.db
    with db.session() as session:  # commit on success, roll back on error
        yield session


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_current_team(request: Request, session: SessionDep) -> Team:
    header = request.headers.get("authorization")
    if not header:
        raise UnauthorizedError(
            "missing 'Authorization: Bearer <key>' header", param="Authorization"
        )
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or " " in key:
        raise UnauthorizedError(
            "malformed Authorization header; use 'Bearer <key>'", param="Authorization"
        )
    team = ApiKeyRepository(session).active_team_for_hash(hash_key(key))
    if team is None:
        raise UnauthorizedError("unknown or revoked API key", param="Authorization")
    return team


TeamDep = Annotated[Team, Depends(get_current_team)]


async def get_job_service(request: Request, session: SessionDep) -> JobService:
    state = request.app.state
    return JobService(
        session=session,
        settings=state.settings,
        live=state.live,
        dispatch=state.dispatch,
        deliver=state.deliver,
    )


JobServiceDep = Annotated[JobService, Depends(get_job_service)]


async def get_sweep_service(request: Request, session: SessionDep) -> SweepService:
    state = request.app.state
    return SweepService(
        session=session,
        settings=state.settings,
        live=state.live,
        dispatch=state.dispatch,
        deliver=state.deliver,
    )


SweepServiceDep = Annotated[SweepService, Depends(get_sweep_service)]
