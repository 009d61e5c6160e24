"""Celery tasks. They take ids only and open their own sessions.

``run_job`` is the supervisor (`worker.supervisor.Supervisor`); ``reap`` is the periodic
stale-job sweep (`worker.reaper`), also run by every worker at start-up and on a timer, so a
deployment without ``celery beat`` still recovers lost jobs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Any

from celery import signals

from api.db import Database
from api.live import LivePublisher
from api.settings import Settings
from worker.celery_app import app
from worker.reaper import reap as reap_once
from worker.supervisor import PREEMPT, Supervisor

log = logging.getLogger(__name__)

RUN_JOB = "worker.tasks.run_job"

_runtime: dict[str, Any] = {}
_runtime_lock = threading.Lock()


def _settings() -> Settings:
    return app.conf.sharp_settings


def runtime() -> tuple[Database, LivePublisher]:
    """Per-process database engine and Redis publisher, built on first use."""
    with _runtime_lock:
        if "db" not in _runtime:
            _runtime["db"] = Database(_settings())
            _runtime["live"] = LivePublisher(_settings())
        return _runtime["db"], _runtime["live"]


def dispatch(job_id: str, queue: str) -> None:
    app.send_task(RUN_JOB, args=[job_id], queue=queue)


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    db, live = runtime()
    return Supervisor(_settings(), db, live, dispatch).run(job_id)


@app.task(name="worker.tasks.reap", ignore_result=True)
def reap() -> dict[str, list[str]]:
    db, live = runtime()
    return asdict(reap_once(_settings(), db, live, dispatch))


def _reaper_loop(stop: threading.Event) -> None:
    settings = _settings()
    first = True
    while not stop.is_set():
        try:
            db, live = runtime()
            reap_once(
                settings, db, live, dispatch, dead_worker=settings.worker_name if first else None
            )
            first = False
        except Exception:  # noqa: BLE001 - keep sweeping; the next pass may succeed
            log.exception("reaper pass failed")
        stop.wait(settings.reaper_interval_s)


_reaper_stop = threading.Event()


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    threading.Thread(
        target=_reaper_loop, args=(_reaper_stop,), name="sharp-reaper", daemon=True
    ).start()


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    # Warm shutdown: checkpoint and re-queue the running job instead of finishing it here.
    _reaper_stop.set()
    PREEMPT.set()
