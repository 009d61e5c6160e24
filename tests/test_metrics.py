"""Prometheus ``/metrics`` scraped from a real uvicorn and parsed with prometheus_client's own
text parser: values must move when the service's state does.

- jobs by state and queue depth follow a job created (queued +1) and cancelled;
- the latency histogram is labelled by route template, never by raw path;
- the SSE gauge counts an open stream and drops when it closes;
- steps per second per worker are computed from the metrics table;
- with two uvicorn worker processes and ``PROMETHEUS_MULTIPROC_DIR``, every scrape (whichever
  process answers) sees the requests that *all* processes served.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import StatsQueries
from ops.launcher import api_command
from service.db import Database
from service.models import Job, Metric
from service.settings import Settings, settings_env
from tests.conftest import ROOT, TeamKey, free_port, stop_process, tiny_spec, wait_for

pytestmark = pytest.mark.service

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> Samples:
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def team(make_team: Callable[[str], TeamKey]) -> TeamKey:
    return make_team("metrics")


def test_jobs_by_state_and_queue_depth_follow_a_job(
    live_server: str, team: TeamKey, corpus: Path
) -> None:
    before = scrape(live_server)
    assert value(before, "sharp_database_up") == 1.0
    for state in ("queued", "running", "succeeded", "failed", "cancelled", "cancelling"):
        assert ("sharp_jobs", frozenset({("state", state)})) in before, state

    r = httpx.post(
        f"{live_server}/v1/jobs",
        json={"spec": tiny_spec(corpus, name="metrics-queued")},
        headers=team.headers,
        timeout=60,  # a fresh API may still be importing the plan's torch/transformers
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    created = scrape(live_server)
    assert (
        value(created, "sharp_jobs", state="queued")
        == value(before, "sharp_jobs", state="queued") + 1
    )
    assert (
        value(created, "sharp_queue_depth", queue="default")
        == value(before, "sharp_queue_depth", queue="default") + 1
    )

    r = httpx.post(f"{live_server}/v1/jobs/{job_id}/cancel", headers=team.headers)
    assert r.status_code == 202, r.text
    cancelled = scrape(live_server)
    assert value(cancelled, "sharp_jobs", state="queued") == value(
        before, "sharp_jobs", state="queued"
    )
    assert (
        value(cancelled, "sharp_jobs", state="cancelled")
        == value(before, "sharp_jobs", state="cancelled") + 1
    )
    assert value(cancelled, "sharp_queue_depth", queue="default") == value(
        before, "sharp_queue_depth", queue="default"
    )


def test_latency_histogram_is_labelled_by_route_template(
    live_server: str, team: TeamKey, corpus: Path
) -> None:
    r = httpx.post(f"{live_server}/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team.headers)
    job_id = r.json()["id"]
    labels = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}
    before = scrape(live_server)
    for _ in range(3):
        assert httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=team.headers).status_code == 200
    assert httpx.get(f"{live_server}/no/such/path").status_code == 404
    after = scrape(live_server)
    name = "sharp_http_request_duration_seconds"
    assert value(after, f"{name}_count", **labels) == value(before, f"{name}_count", **labels) + 3
    assert value(after, f"{name}_sum", **labels) > value(before, f"{name}_sum", **labels)
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(after, f"{name}_count", **unmatched) >= 1
    routes = {dict(lbl).get("route") for (_, lbl) in after if dict(lbl).get("route")}
    assert not any(job_id in str(route) for route in routes), routes
    assert "/no/such/path" not in routes


def test_sse_connections_gauge_counts_open_streams(
    live_server: str, team: TeamKey, corpus: Path
) -> None:
    r = httpx.post(f"{live_server}/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team.headers)
    job_id = r.json()["id"]  # stays queued: this module runs no worker, so the stream stays open
    base = value(scrape(live_server), "sharp_sse_connections")
    with (
        httpx.Client(base_url=live_server, headers=team.headers, timeout=30) as c,
        c.stream("GET", f"/v1/jobs/{job_id}/events") as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: status"
        assert value(scrape(live_server), "sharp_sse_connections") == base + 1
    wait_for(
        lambda: value(scrape(live_server), "sharp_sse_connections") == base,
        15,
        what="the SSE gauge to drop after the client left",
    )


def test_steps_per_second_per_worker_from_the_metrics_table(
    db: Database, team: TeamKey, corpus: Path
) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    with db.session() as s:
        for job_id, worker, started_s_ago, steps in (
            ("job_rate_a", "gpu-host-1", 10.0, 20),  # 20 steps in 10 s → 2/s
            ("job_rate_b", "gpu-host-2", 300.0, 30),  # 30 steps in the 60 s window → 0.5/s
        ):
            s.add(
                Job(
                    id=job_id,
                    team_id=team.team_id,
                    name=job_id,
                    spec=tiny_spec(corpus),
                    queue="default",
                    status="running",
                    attempt=1,
                    worker=worker,
                    max_steps=100,
                    started_at=now - dt.timedelta(seconds=started_s_ago),
                )
            )
            s.flush()
            for step in range(1, steps + 1):
                for name in ("loss", "lr"):
                    s.add(
                        Metric(
                            job_id=job_id,
                            step=step,
                            name=name,
                            value=1.0,
                            attempt=1,
                            created_at=now - dt.timedelta(seconds=1),
                        )
                    )
            # a step recorded before the window must not count
            s.add(
                Metric(
                    job_id=job_id,
                    step=10_000,
                    name="loss",
                    value=1.0,
                    attempt=1,
                    created_at=now - dt.timedelta(seconds=120),
                )
            )
        s.commit()
    try:
        rates = StatsQueries(db).steps_per_second(now)
        assert rates["gpu-host-1"] == pytest.approx(2.0)
        assert rates["gpu-host-2"] == pytest.approx(0.5)
    finally:
        with db.session() as s:
            for job_id in ("job_rate_a", "job_rate_b"):
                job = s.get(Job, job_id)
                assert job is not None
                job.status = "failed"
            s.commit()


@pytest.fixture
def two_process_server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """``uvicorn --workers 2`` with a shared ``PROMETHEUS_MULTIPROC_DIR``."""
    port = free_port()
    mpdir = tmp_path / "prom"
    mpdir.mkdir()
    log = tmp_path / "api.log"
    env = {
        **os.environ,
        **settings_env(settings),
        "PROMETHEUS_MULTIPROC_DIR": str(mpdir),
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            api_command("127.0.0.1", port, workers=2),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def both_up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited:\n{log.read_text(errors='replace')[-4000:]}")
        # prometheus_client writes histogram_<pid>.db once a process has timed a request:
        # wait until both have, so the scrape below really has two processes to add up.
        try:
            httpx.get(f"{base}/healthz", timeout=1)
        except httpx.HTTPError:
            return False
        return len(list(mpdir.glob("histogram_*.db"))) >= 2

    try:
        wait_for(both_up, 60, interval=0.1, what="two uvicorn workers")
        yield base
    finally:
        stop_process(proc, 10)


def test_several_worker_processes_report_one_total(two_process_server: str, team: TeamKey) -> None:
    base = two_process_server
    labels = {"method": "GET", "route": "/v1/jobs", "status": "200"}
    name = "sharp_http_request_duration_seconds_count"
    before = value(scrape(base), name, **labels)
    # Concurrent new connections, so both processes take some.
    with ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.get(f"{base}/v1/jobs", headers=team.headers).status_code, range(12)
            )
        )
    assert codes == [200] * 12
    # Whichever process answers, it reports the sum over both.
    for _ in range(4):
        assert value(scrape(base), name, **labels) == before + 12
