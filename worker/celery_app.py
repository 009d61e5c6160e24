"""The Celery application for GPU workers.

Configured as the design asks, and why:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only when
  the task returns, so a worker that dies mid-job leaves it to be delivered again. A second
  delivery is harmless: the claim in `worker.tasks` is a conditional UPDATE.
- ``worker_prefetch_multiplier = 1`` and one process per GPU (``--pool=solo``): a worker never
  holds a job it cannot start, so other GPUs' workers can take it.
- JSON only: messages carry a job id, never pickles.
- One queue per GPU pool (named like the pool), declared explicitly with
  ``task_create_missing_queues = False``. A worker consumes its own pool's queue only;
  senders name the queue with `pool_queue`. Messages are sent by the scheduler
  (`service.scheduler`) only for jobs it admitted to a pool that has live workers.
- ``visibility_timeout`` longer than the longest job, or Redis would re-deliver running jobs.
- ``global_keyprefix``: every Redis key Celery makes starts with ``settings.redis_prefix``, so
  deployments (and parallel test runs) can share one Redis without sharing queues.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.settings import Settings, get_settings


def pool_queue(pool: str) -> Queue:
    """The Celery queue of a GPU pool (senders pass it so any pool can be named)."""
    return Queue(pool, routing_key=pool)


def make_celery(settings: Settings) -> Celery:
    app = Celery("sharp", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_queues=[pool_queue(settings.pool)],
        task_default_queue=settings.pool,
        task_create_missing_queues=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": settings.redis_prefix,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "reap-stale-jobs": {
                "task": "worker.tasks.reap",
                "schedule": settings.reaper_interval_s,
                "options": {
                    "queue": settings.pool,
                    "expires": settings.reaper_interval_s,
                },
            }
        },
    )
    app.conf.sharp_settings = settings
    return app


#: ``celery -A worker.celery_app worker`` finds this; it reads settings from SHARP_* variables.
app = make_celery(get_settings())
