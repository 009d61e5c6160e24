"""Prometheus ``/metrics``: what an operator graphs and alerts on.

Two kinds of series, chosen so the numbers are right however many uvicorn worker processes
serve the API:

- **From the database at scrape time** (a custom collector, `DatabaseCollector`): jobs by
  state, queue depth per queue (jobs ``queued`` on it), and training steps per second per
  worker. Whichever API process answers the scrape reads the same rows, so these are
  correct with any number of processes and survive restarts. Queue depth counts every
  ``queued`` job of a pool, admitted by the scheduler or not (``GET /v1/jobs/{id}`` tells
  which, with ``queue_position``). Steps per second come from the
  ``metrics`` table, which every training process already writes: the distinct steps a
  running job recorded over the last `RATE_WINDOW_S` seconds (or since it started, if later),
  divided by that span, labelled with the worker that holds the job (``jobs.worker``, set at
  claim time and refreshed by its heartbeats).
- **Per process** (request latency histogram, open SSE connections, Celery messages sent):
  these live in the memory of the process that saw the request. With one process they come
  from prometheus_client's default registry. With several (``uvicorn --workers N``, gunicorn),
  set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory shared by the processes *before they
  start*: prometheus_client then writes each process's values to memory-mapped files there and
  `render` aggregates them with its ``MultiProcessCollector`` (histograms and counters summed,
  the SSE gauge summed over live processes). Empty the directory when the service restarts.

Request latency is the time to the response's first byte, labelled by the route *template*
(``/v1/jobs/{job_id}``, never the raw path, which would be one series per job) and the method;
an SSE stream or a download counts until its headers are sent, not for its whole length.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import Database
from service.lifecycle import JOB_STATUSES
from service.repositories import StatsRepository

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0

REQUEST_LATENCY = Histogram(
    "sharp_http_request_duration_seconds",
    "Time from request to the response's first byte, by route template and method.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SSE_CONNECTIONS = Gauge(
    "sharp_sse_connections",
    "Server-Sent Events streams open now (GET /v1/jobs/{job_id}/events).",
    multiprocess_mode="livesum",
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
T = TypeVar("T")


# -- database-derived series -----------------------------------------------------------------


class StatsQueries:
    """The scrape's reads, each in its own short transaction (the queries are
    `service.repositories.StatsRepository`'s)."""

    def __init__(self, db: Database):
        self.db = db

    def jobs_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        with self.db.session() as s:
            counts.update(StatsRepository(s).jobs_by_status())
        return counts

    def queue_depth(self, queues: Iterable[str]) -> dict[str, int]:
        depth = dict.fromkeys(queues, 0)
        with self.db.session() as s:
            depth.update(StatsRepository(s).queued_by_queue())
        return depth

    def steps_per_second(self, now: dt.datetime | None = None) -> dict[str, float]:
        """Per worker: steps recorded by its running jobs over the last window, per second."""
        now = now or dt.datetime.now(dt.timezone.utc)
        window_start = now - dt.timedelta(seconds=RATE_WINDOW_S)
        rates: dict[str, float] = {}
        with self.db.session() as s:
            repo = StatsRepository(s)
            for job_id, worker, started_at in repo.active_jobs():
                since = max(window_start, started_at) if started_at else window_start
                span = (now - since).total_seconds()
                steps = repo.steps_since(job_id, since)
                rate = steps / span if span > 0 else 0.0
                name = worker or "unknown"
                rates[name] = rates.get(name, 0.0) + rate
        return rates


class DatabaseCollector(Collector):
    """Reads the database on every scrape; a database outage shows as ``sharp_database_up 0``
    instead of a failed scrape, so the per-process series still arrive."""

    def __init__(self, db: Database, queues: Callable[[], Iterable[str]]):
        self.queries = StatsQueries(db)
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("sharp_database_up", "1 if the scrape could read the database.")
        try:
            by_state = self.queries.jobs_by_state()
            depth = self.queries.queue_depth(self.queues())
            rates = self.queries.steps_per_second()
        except Exception as e:  # noqa: BLE001 - any database failure is reported as a value
            log.warning("metrics scrape could not read the database: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("sharp_jobs", "Jobs by state.", labels=["state"])
        for state, n in sorted(by_state.items()):
            jobs.add_metric([state], n)
        yield jobs
        queue = GaugeMetricFamily(
            "sharp_queue_depth", "Jobs waiting (status queued) per queue.", labels=["queue"]
        )
        for name, n in sorted(depth.items()):
            queue.add_metric([name], n)
        yield queue
        steps = GaugeMetricFamily(
            "sharp_worker_steps_per_second",
            f"Training steps per second per worker, over the last {RATE_WINDOW_S:.0f} s.",
            labels=["worker"],
        )
        for worker, rate in sorted(rates.items()):
            steps.add_metric([worker], rate)
        yield steps


class _ProcessLocal(Collector):
    """This process's series from the default registry (single-process mode)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def render(db: Database, queues: Callable[[], Iterable[str]]) -> bytes:
    """One scrape: a fresh registry each time, as prometheus_client's multiprocess docs ask."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ProcessLocal())
    registry.register(DatabaseCollector(db, queues))
    return generate_latest(registry)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format (see the module docstring for what is where)."""
    state = request.app.state
    body = render(state.db, lambda: state.settings.worker_queues)
    return Response(body, media_type=CONTENT_TYPE)


# -- request latency -------------------------------------------------------------------------


def route_template(scope: Scope) -> str:
    """The path template of the route that served `scope` (the router records it in
    ``scope["route"]``; a mount's prefix for mounts); ``unmatched`` otherwise, so scanners
    probing random paths cannot create series."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if isinstance(route, Mount) and scope["path"].startswith(route.path + "/"):
            return route.path
    return "unmatched"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware observing `REQUEST_LATENCY` (pure ASGI so streaming is untouched)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if observed:
                return
            observed = True
            method = scope["method"]
            REQUEST_LATENCY.labels(
                method=method if method in _METHODS else "other",
                route=route_template(scope),
                status=str(status),
            ).observe(time.perf_counter() - start)

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            observe(500)


async def counted_stream(events: AsyncIterator[T]) -> AsyncIterator[T]:
    """`events`, counted in `SSE_CONNECTIONS` while the client is connected. The count goes
    down however the stream ends: finished, client gone (cancellation), or an error."""
    SSE_CONNECTIONS.inc()
    try:
        async for event in events:
            yield event
    finally:
        SSE_CONNECTIONS.dec()
