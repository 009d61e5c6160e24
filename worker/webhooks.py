"""The webhook delivery worker: ``python -m worker.webhooks`` (``sharp up`` starts one, the
compose file runs it as the ``webhooks`` service).

Why its own worker: a GPU worker runs one job at a time (solo pool) for hours, so a delivery
queued behind it would wait for the next job to end. This one consumes only the delivery
queue (`service.dispatch.WEBHOOK_QUEUE`) with a small thread pool (``webhook_concurrency``):
deliveries are I/O, and one slow receiver must not hold up the others. It registers no GPU
slot with the scheduler (it never imports `worker.tasks`).

Each message is one attempt (`service.webhooks.attempt_delivery`); a failed attempt sends
the next message with a countdown (the backoff), after the commit that logged the attempt.
A background thread runs `worker.reaper.redispatch_deliveries` every
``webhook_sweep_interval_s``, starting at once, so messages lost in a crash are re-sent.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from celery import signals

from service.db import Database
from service.dispatch import (
    DELIVER_TASK,
    WEBHOOK_QUEUE,
    celery_worker_argv,
    make_celery,
    pool_queue,
    send_delivery,
)
from service.settings import Settings, get_settings
from service.webhooks import attempt_delivery
from worker.reaper import redispatch_deliveries

log = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.update(
    task_queues=[pool_queue(WEBHOOK_QUEUE)],
    task_default_queue=WEBHOOK_QUEUE,
    beat_schedule={},
)

_db: dict[str, Database] = {}
_db_lock = threading.Lock()
_stop = threading.Event()


def _settings() -> Settings:
    return app.conf.sharp_settings


def database() -> Database:
    """One engine per process, shared by the pool's threads."""
    with _db_lock:
        if "db" not in _db:
            _db["db"] = Database(_settings())
        return _db["db"]


def send(delivery_id: str, countdown: float | None = None) -> None:
    send_delivery(app, delivery_id, countdown=countdown)


@app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver(delivery_id: str) -> str:
    outcome = attempt_delivery(database(), _settings(), delivery_id)
    if outcome.status == "pending" and outcome.retry_in is not None:
        send(delivery_id, countdown=outcome.retry_in)
    return outcome.status


def _sweep_loop(stop: threading.Event) -> None:
    settings = _settings()
    while not stop.is_set():
        try:
            redispatch_deliveries(settings, database(), send)
        except Exception:  # noqa: BLE001 - the next pass may succeed
            log.exception("webhook sweep failed")
        stop.wait(settings.webhook_sweep_interval_s)


@signals.worker_ready.connect
def _start_sweep(sender: Any = None, **_: Any) -> None:
    if sender is None or getattr(sender, "app", None) is not app:
        return  # another Celery app in this process (a test importing this module)
    threading.Thread(
        target=_sweep_loop, args=(_stop,), name="sharp-webhook-sweep", daemon=True
    ).start()


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    _stop.set()


def celery_argv(settings: Settings, extra_args: Sequence[str] = ()) -> list[str]:
    """``celery worker`` on the delivery queue with a thread pool."""
    return celery_worker_argv(
        "worker.webhooks",
        pool="threads",
        concurrency=settings.webhook_concurrency,
        queue=WEBHOOK_QUEUE,
        name=f"sharp-webhooks-{os.getpid()}@{socket.gethostname()}",
        extra_args=extra_args,
    )


def main() -> None:
    cmd = celery_argv(get_settings(), sys.argv[1:])
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
