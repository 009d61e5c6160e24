"""Engine and sessions, for Postgres (production) and SQLite (the embedded default).

Why the SQLite tweaks: the embedded default runs the API, a worker supervisor and a training
process against one file. WAL lets readers run while one process writes; ``busy_timeout``
makes a writer wait instead of failing; foreign keys are off by default in SQLite and must
be switched on per connection. Every transaction starts with ``BEGIN IMMEDIATE`` because a
deferred transaction that reads and then writes fails at once (``SQLITE_BUSY``, not retried
by ``busy_timeout``) when another process committed in between — the read-then-update shape
every job transition has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.repositories import ping, sqlite_begin, sqlite_on_connect
from service.settings import Settings


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite connections get WAL, foreign keys and immediate BEGIN."""
    if is_sqlite(url):
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", lambda dbapi_conn, _record: sqlite_on_connect(dbapi_conn))
    event.listen(engine, "begin", sqlite_begin)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after the commit that ends a request or a
    # worker step (we render them after committing).
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


class Database:
    """An engine and its session factory, built once per process from the settings."""

    def __init__(self, settings: Settings, **engine_kwargs: Any):
        self.url = settings.database_url
        self.engine = make_engine(settings.database_url, **engine_kwargs)
        self.sessionmaker = make_sessionmaker(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error (used outside requests)."""
        with self.sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def ping(self) -> None:
        """One round trip to the database (the readiness probe)."""
        with self.engine.connect() as conn:
            ping(conn)

    def dispose(self) -> None:
        self.engine.dispose()
