"""How a job reaches a worker: the Celery configuration every process shares, and the one
function that sends a job's message.

The message carries only the job id and goes to its pool's queue; the worker registers its
task under `RUN_JOB_TASK`, so senders (the API, the worker's scheduling passes and reaper)
need no worker code, only this module. Messages are sent after the commit that admitted the
job (`service.scheduler`); a lost send is repaired by the reaper, and a duplicate is
harmless (the claim in `service.lifecycle` is a conditional UPDATE).

Celery is configured as the design asks, and why:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only when
  the task returns, so a worker that dies mid-job leaves it to be delivered again.
- ``worker_prefetch_multiplier = 1`` and one process per GPU (``--pool=solo``): a worker never
  holds a job it cannot start, so other GPUs' workers can take it.
- JSON only: messages carry a job id, never pickles.
- One queue per GPU pool (named like the pool), declared explicitly with
  ``task_create_missing_queues = False``. A worker consumes its own pool's queue only;
  senders name the queue with `pool_queue`.
- ``visibility_timeout`` longer than the longest job, or Redis would re-deliver running jobs.
- ``global_keyprefix``: every Redis key Celery makes starts with ``settings.redis_prefix``, so
  deployments (and parallel test runs) can share one Redis without sharing queues.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from kombu import Queue

from service.settings import Settings

#: (job id, pool) -> send the job's Celery message to the pool's queue.
Dispatch = Callable[[str, str], None]

#: The task that runs a job (`worker.tasks.run_job` registers under this name).
RUN_JOB_TASK = "worker.tasks.run_job"
#: The periodic stale-job sweep (`worker.tasks.reap`).
REAP_TASK = "worker.tasks.reap"
#: One webhook delivery attempt (`worker.webhooks.deliver`), on its own queue: a GPU worker
#: runs one job for hours, so deliveries have their own worker (``python -m worker.webhooks``).
DELIVER_TASK = "worker.webhooks.deliver"
#: The delivery queue. Pool names start with a letter or digit, so no pool can take it.
WEBHOOK_QUEUE = "_webhooks"
#: delivery id -> send its Celery message (after the commit that wrote it).
DeliveryDispatch = Callable[[str], None]

#: A broker blip while sending: retry a few times within ~2 s, then raise (the job stays
#: admitted and the reaper sends its message again after ``requeue_queued_after_s``).
RETRY_POLICY: dict[str, Any] = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}


def pool_queue(pool: str) -> Queue:
    """The Celery queue of a GPU pool (senders pass it so any pool can be named)."""
    return Queue(pool, routing_key=pool)


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery app configured for `settings`; `include` names task modules (the worker's)."""
    app = Celery("sharp", broker=settings.redis_url, include=list(include))
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
                "task": REAP_TASK,
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


def celery_worker_argv(
    app: str, *, pool: str, concurrency: int, queue: str, name: str, extra_args: Sequence[str]
) -> list[str]:
    """``celery -A app worker`` with the options every SHARP worker shares (no mingle or
    gossip: workers never talk to each other). Options given last override these."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        "-Q",
        queue,
        "-n",
        name,
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        *extra_args,
    ]


def send_job(celery: Celery, job_id: str, pool: str) -> None:
    """Send the message that runs `job_id` to `pool`'s queue (the one way a job is sent)."""
    celery.send_task(
        RUN_JOB_TASK,
        args=[job_id],
        queue=pool_queue(pool),
        retry=True,
        retry_policy=RETRY_POLICY,
    )


def send_delivery(celery: Celery, delivery_id: str, countdown: float | None = None) -> None:
    """Send the message that attempts webhook delivery `delivery_id` (after `countdown` s)."""
    celery.send_task(
        DELIVER_TASK,
        args=[delivery_id],
        queue=pool_queue(WEBHOOK_QUEUE),
        countdown=countdown,
        retry=True,
        retry_policy=RETRY_POLICY,
    )


def make_delivery_dispatch(settings: Settings) -> tuple[DeliveryDispatch, Callable[[], None]]:
    """A `DeliveryDispatch` with its own Celery connection, and the function that closes it."""
    celery = make_celery(settings)
    return (lambda delivery_id: send_delivery(celery, delivery_id)), celery.close


def make_dispatch(
    settings: Settings, on_sent: Callable[[str], None] | None = None
) -> tuple[Dispatch, Callable[[], None]]:
    """A `Dispatch` with its own Celery connection, and the function that closes it.
    `on_sent(pool)` is called after each send (the API counts them)."""
    celery = make_celery(settings)

    def dispatch(job_id: str, pool: str) -> None:
        send_job(celery, job_id, pool)
        if on_sent is not None:
            on_sent(pool)

    return dispatch, celery.close
