"""Celery tasks. They take ids only and open their own sessions.

``run_job`` is the supervisor (`worker.supervisor.Supervisor`); ``reap`` is the periodic
stale-job sweep (`worker.reaper`), also run by every worker at start-up and on a timer, so a
deployment without ``celery beat`` still recovers lost jobs.

Each worker also registers itself (pool, GPU count) in the ``workers`` table when it is
ready, refreshes that row every ``scheduler_interval_s`` and runs a scheduling pass with it
(`service.scheduler`): the pool's capacity is its live workers. On a warm shutdown the background
thread deletes the row, so no new job is admitted for a worker that is going away (done
there, not in the signal handler, which may have interrupted a database call).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

from celery import signals

from service import redact, scheduler
from service.caches import evict
from service.db import Database
from service.dispatch import REAP_TASK, RUN_JOB_TASK, send_delivery, send_job
from service.live import LivePublisher
from service.models import Job
from service.repositories import JobRepository
from service.settings import Settings
from worker.celery_app import app
from worker.reaper import reap as reap_once
from worker.supervisor import PREEMPT, Supervisor, backend_for, default_worker_name

log = logging.getLogger(__name__)
redact.register_settings(app.conf.sharp_settings)  # what this process stores is scrubbed

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


def dispatch(job_id: str, pool: str) -> None:
    """`service.dispatch.Dispatch` over this worker's Celery connection."""
    send_job(app, job_id, pool)


def deliver(delivery_id: str) -> None:
    """`service.dispatch.DeliveryDispatch` over this worker's Celery connection: a webhook
    delivery for the webhook worker (`worker.webhooks`), which owns its own queue."""
    send_delivery(app, delivery_id)


def worker_name() -> str:
    """The name on the ``workers`` row, the same one the supervisor writes on claimed jobs."""
    return _settings().worker_name or default_worker_name()


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    db, live = runtime()
    try:
        return Supervisor(_settings(), db, live, dispatch, deliver=deliver).run(job_id)
    finally:
        _evict_caches(db, job_id)


def _evict_caches(db: Database, job_id: str) -> None:
    """After a job, its team's caches are brought back under its budget (LRU; the team's own
    or the deployment's default), if it has one."""
    settings = _settings()
    try:
        with db.session() as s:
            job = JobRepository(s).get(job_id)
            team = job.team_id if job is not None else None
        if team is not None:
            for e in evict(settings, team, db=db):
                log.info("cache evicted (team budget): %s %s %d bytes", e.kind, e.key, e.bytes)
    except Exception:  # noqa: BLE001 - eviction is housekeeping; the next job tries again
        log.exception("cache eviction after job %s failed", job_id)


@app.task(name=REAP_TASK, ignore_result=True)
def reap() -> dict[str, list[str]]:
    db, live = runtime()
    return asdict(reap_once(_settings(), db, live, dispatch, deliver=deliver, adopt=adopt_later))


def _heartbeat(settings: Settings, db: Database) -> None:
    offer = backend_for(settings).describe()  # a Slurm pool: its partition and nodes
    gpus = int(offer.pop("gpus", settings.gpu_count))
    with db.session() as s:
        scheduler.prune_workers(s, older_than_s=max(24 * 3600, 10 * settings.heartbeat_timeout_s))
        scheduler.register_worker(
            s,
            name=worker_name(),
            pool=settings.pool,
            gpus=gpus,
            hostname=socket.gethostname(),
            gpu_type=settings.worker_gpu_type,
            gpu_memory_bytes=None
            if settings.worker_gpu_memory_gb is None
            else int(settings.worker_gpu_memory_gb * 1e9),
            **offer,
        )


def adopt_later(job: Job) -> bool:
    """The reaper's `adopt`: a lost job of this worker's pool whose backend job is still known
    to the backend (Slurm) gets a message; the supervisor that receives it adopts it."""
    settings = _settings()
    if settings.worker_backend != "slurm" or job.queue != settings.pool or not job.backend_job_id:
        return False
    from worker.slurm import query

    state, _, _ = query(job.backend_job_id)
    if not state:
        return False
    dispatch(job.id, job.queue)
    return True


def _background_loop(stop: threading.Event) -> None:
    """Register and heartbeat, schedule, and reap, until the worker shuts down."""
    settings = _settings()
    first = True
    next_reap = 0.0
    while not stop.is_set():
        try:
            db, live = runtime()
            _heartbeat(settings, db)
            if time.monotonic() >= next_reap:
                reap_once(
                    settings,
                    db,
                    live,
                    dispatch,
                    dead_worker=settings.worker_name if first else None,
                    deliver=deliver,
                    adopt=adopt_later,
                )
                first = False
                next_reap = time.monotonic() + settings.reaper_interval_s
            scheduler.run_pass(
                db.sessionmaker, dispatch, heartbeat_timeout_s=settings.heartbeat_timeout_s
            )
        except Exception:  # noqa: BLE001 - keep going; the next tick may succeed
            log.exception("worker background pass failed")
        stop.wait(settings.scheduler_interval_s)
    _deregister()


def _deregister() -> None:
    try:
        db, _ = runtime()
        with db.session() as s:
            scheduler.deregister_worker(s, worker_name())
    except Exception:  # noqa: BLE001 - the row expires after heartbeat_timeout_s anyway
        log.exception("could not deregister worker %s", worker_name())


_reaper_stop = threading.Event()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    """The worker's log never shows the HF token (its handlers scrub every record)."""
    redact.register_settings(_settings())
    redact.install(logger)


@signals.worker_ready.connect
def _start_background(**_: Any) -> None:
    threading.Thread(
        target=_background_loop, args=(_reaper_stop,), name="sharp-background", daemon=True
    ).start()


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    # Warm shutdown: leave the pool, then checkpoint and re-queue the running job instead of
    # finishing it here.
    _reaper_stop.set()
    PREEMPT.set()
