"""Redis, Postgres and the API restarted under a running job (issue 4, item 4).

This module runs its *own* Postgres cluster and Redis server on free ports (the machine's
shared ones are other people's), built with conftest's starters, so it can restart them;
and its own uvicorn, so it can restart that too. One job lives through all three restarts
while one SSE client follows it, reconnecting with ``Last-Event-ID`` whenever its stream
breaks. Afterwards: the job succeeded, and the client holds exactly the job's event log —
every seq once, none missing, none twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from httpx_sse import connect_sse

from ops.launcher import api_command
from service.settings import Settings, settings_env
from tests.conftest import (
    ROOT,
    TeamKey,
    _EmbeddedPostgres,
    _pg_bindir,
    _redis_reachable,
    free_port,
    libpq_url,
    stop_process,
    template_database,
    tiny_spec,
    wait_for,
)
from tests.test_reliability import assert_listed_checkpoints_verify

pytestmark = [pytest.mark.service, pytest.mark.slow]

TIMEOUT = 300
#: Long enough to outlast three restarts on an idle machine (a tiny model trains ~30 steps/s):
#: 800 steps were once done before a slow Postgres restart had finished.
MAX_STEPS = 1600


# ------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def private_pg() -> Iterator[_EmbeddedPostgres]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no initdb/pg_ctl to run a private Postgres that can be restarted")
    server = _EmbeddedPostgres(bindir)
    server.url = server.start()  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg_admin_url(private_pg: _EmbeddedPostgres) -> str:
    return private_pg.url  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def migrated_template(pg_admin_url: str) -> Iterator[str]:
    """The migrated template on this module's own Postgres (conftest's is per session, on
    the shared one)."""
    yield from template_database(pg_admin_url)


def restart_pg(server: _EmbeddedPostgres) -> None:
    """``pg_ctl restart -m fast``: every open connection is terminated, the server comes back
    on the same port with the same options."""
    ctl = str(server.bindir / "pg_ctl")
    log = str(server.base / "pg.log")  # without -l the server would hold our pipe open
    server._run([ctl, "-D", str(server.data), "-l", log, "-m", "fast", "-w", "-t", "60", "restart"])


class PrivateRedis:
    """redis-server as compose runs it (AOF on), on a fixed port so it can come back."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: _redis_reachable(self.url), 30, what="private redis")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
        pytest.skip("no redis-server to run a private Redis that can be restarted")
    server = PrivateRedis(tmp_path_factory.mktemp("private-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(private_redis: PrivateRedis) -> str:
    return private_redis.url


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"heartbeat_timeout_s": 6.0, "reaper_interval_s": 1.0})


class Api:
    """uvicorn on a fixed port, stoppable and startable again."""

    def __init__(self, settings: Settings, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                api_command("127.0.0.1", self.port),
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, what="uvicorn")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


@pytest.fixture(scope="module")
def api_server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = Api(settings, tmp_path_factory.mktemp("api") / "api.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("restarts")


# ------------------------------------------------------------------------------ client
class Follower(threading.Thread):
    """An SSE client that reconnects with Last-Event-ID until it has seen a terminal status."""

    def __init__(self, base: str, team: TeamKey, job_id: str):
        super().__init__(daemon=True)
        self.base, self.team, self.job_id = base, team, job_id
        self.events: list[tuple[int, str, dict]] = []
        self.connections = 0
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.done.is_set() and time.monotonic() < deadline:
            headers = dict(self.team.headers)
            if self.events:
                headers["Last-Event-ID"] = str(self.events[-1][0])
            try:
                with (
                    httpx.Client(base_url=self.base, timeout=httpx.Timeout(10, read=15)) as http,
                    connect_sse(
                        http, "GET", f"/v1/jobs/{self.job_id}/events", headers=headers
                    ) as src,
                ):
                    if src.response.status_code != 200:
                        raise httpx.HTTPError(f"HTTP {src.response.status_code}")
                    self.connections += 1
                    for ev in src.iter_sse():
                        if not ev.data:
                            continue
                        data = json.loads(ev.data)
                        self.events.append((int(ev.id), ev.event, data))
                        if ev.event == "status" and data["status"] in (
                            "succeeded",
                            "failed",
                            "cancelled",
                        ):
                            self.done.set()
                            return
            except (httpx.HTTPError, httpx.StreamError):
                pass
            time.sleep(0.2)  # the reconnection delay of an EventSource


# ------------------------------------------------------------------------------ the test
def test_job_and_sse_client_survive_redis_postgres_and_api_restarts(
    api_server: Api, private_redis: PrivateRedis, private_pg, team, corpus, worker, settings
) -> None:
    spec = tiny_spec(
        corpus,
        max_steps=MAX_STEPS,
        name="restarts",
        log_every=5,
        eval_every=0,
        checkpoint_every=MAX_STEPS // 4,
    )
    with httpx.Client(base_url=api_server.base, headers=team.headers, timeout=30) as http:
        created = http.post("/v1/jobs", json={"spec": spec})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

    def job() -> dict:
        for _ in range(50):  # the API may be the thing that is restarting
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                r = httpx.get(f"{api_server.base}/v1/jobs/{job_id}", headers=team.headers)
                if r.status_code == 200:
                    return r.json()
            time.sleep(0.2)
        raise AssertionError("the API did not come back")

    def advance(by: int) -> int:
        start = job()["progress"]["step"]
        try:
            wait_for(
                lambda: job()["progress"]["step"] >= start + by,
                TIMEOUT,
                interval=0.1,
                what=f"training past step {start + by}",
            )
        except TimeoutError:
            raise AssertionError(f"training stalled at step {start}:\n{diagnose()}") from None
        return job()["progress"]["step"]

    def diagnose() -> str:
        """What each database session is doing or waiting for, and the worker's log."""
        with psycopg.connect(libpq_url(private_pg.url)) as conn:
            rows = conn.execute(
                "SELECT pid, datname, state, wait_event_type, wait_event, xact_start, left(query, 120) "
                "FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).fetchall()
        return "\n".join(map(str, rows)) + "\n" + worker.read_text(errors="replace")[-3000:]

    follower = Follower(api_server.base, team, job_id)
    follower.start()
    advance(10)

    private_redis.stop()
    time.sleep(2.0)  # an outage, not a synchronisation
    private_redis.start()
    advance(10)

    restart_pg(private_pg)
    advance(10)

    api_server.stop()
    time.sleep(1.0)
    api_server.start()
    mid = job()
    assert mid["status"] == "running", f"job ended before the last restart: {mid}"

    wait_for(lambda: job()["status"] in ("succeeded", "failed", "cancelled"), TIMEOUT, what="end")
    final = job()
    follower.done.wait(60)
    assert final["status"] == "succeeded", (final, worker.read_text(errors="replace")[-3000:])
    assert final["attempt"] == 1, "an outage of a dependency cost the job an attempt"

    with httpx.Client(base_url=api_server.base, headers=team.headers, timeout=30) as http:
        text = http.get(f"/v1/jobs/{job_id}/events", params={"follow": "false"}).text
    log = [
        int(line.split(": ", 1)[1])
        for line in text.replace("\r\n", "\n").splitlines()
        if line.startswith("id: ")
    ]
    seqs = [seq for seq, _, _ in follower.events]
    assert follower.connections >= 2, "the API restart should have broken the stream"
    assert seqs == log == list(range(1, len(log) + 1)), (seqs, log)
    with httpx.Client(base_url=api_server.base, timeout=30) as http:
        listed = assert_listed_checkpoints_verify(http, team, job_id, settings)
    # every MAX_STEPS / 4 steps, the newest keep_checkpoints=3
    assert listed == [MAX_STEPS // 2, 3 * MAX_STEPS // 4, MAX_STEPS]
    batches = [m for _, k, d in follower.events if k == "metrics" for m in d["metrics"]]
    steps = [m["step"] for m in batches]
    # step 0: the student's build time only (a fresh sft run, no teacher); then every
    # log_every = 5 steps
    assert sorted(set(steps)) == [0, *range(5, MAX_STEPS + 1, 5)], steps
    assert {k for m in batches if m["step"] == 0 for k in m["values"]} == {"build_student_s"}
