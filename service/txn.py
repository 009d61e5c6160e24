"""Run side effects only after the transaction that justifies them has committed.

Why: a Celery message for a job that was rolled back would run a job that does not exist,
and a Redis "wake up" sent before the commit would let a listener read the database before
the new event is visible. So services register callables with `after_commit`; they run once
the session's outermost transaction commits and are dropped if it rolls back. A failure
here is logged, never raised: the database already holds the truth, and the reaper re-sends
messages for jobs left queued (a lost message costs a delay, never a job).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

log = logging.getLogger(__name__)

_KEY = "sharp_after_commit"
_READY = "sharp_after_commit_ready"


def after_commit(session: Session, fn: Callable[[], object]) -> None:
    session.info.setdefault(_KEY, []).append(fn)


@event.listens_for(Session, "after_commit")
def _on_commit(session: Session) -> None:
    # Committed, but the session still holds its connection here; run the callables once it
    # is back in the pool (below). A callable that opens a session of its own (a scheduling
    # pass) would otherwise need a second connection per request, and with as many requests
    # as the pool has connections every one of them waits for a second that never comes
    # (until pool_timeout): issue 4's load test hung POST /v1/jobs for 30 s that way.
    session.info.setdefault(_READY, []).extend(session.info.pop(_KEY, []))


@event.listens_for(Session, "after_transaction_end")
def _run_after_commit(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:  # a savepoint, not the request's transaction
        return
    for fn in session.info.pop(_READY, []):
        try:
            fn()
        except Exception:  # noqa: BLE001 - see module docstring
            log.exception("post-commit action failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_KEY, None)
