"""Losing a worker: a warm shutdown checkpoints and re-queues the running job; a killed worker's
job is found by the reaper (stale heartbeat) and resumed by another worker from the
checkpoint its orphaned training process saved on noticing its supervisor was gone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.launcher import start_worker
from service.settings import Settings
from tests.conftest import ROOT, WORKER_ENV, TeamKey, stop_process, tiny_spec, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]

TIMEOUT = 240


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    # Notice a dead worker within seconds, not the production minute.
    return settings.model_copy(update={"heartbeat_timeout_s": 4.0, "reaper_interval_s": 1.0})


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("recovery")


@pytest.fixture(scope="module")
def api(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


class Workers:
    def __init__(self, settings: Settings, logdir: Path):
        self.settings = settings
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        log = self.logdir / f"worker-{len(self.procs)}.log"
        proc = start_worker(
            self.settings,
            log_file=log,
            cwd=ROOT,
            extra_env=WORKER_ENV,
            hostname=f"rec-{secrets.token_hex(3)}@%h",
        )
        self.procs.append(proc)
        wait_for(
            lambda: proc.poll() is not None or " ready." in log.read_text(errors="replace"),
            90,
            what="worker ready",
        )
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.logdir.glob("*.log"))


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(settings, tmp_path)
    yield w
    for proc in w.procs:
        stop_process(proc, 20)


def _job(api: httpx.Client, team: TeamKey, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()


def _submit_and_wait_for_progress(api: httpx.Client, team: TeamKey, corpus: Path) -> str:
    spec = tiny_spec(
        corpus, max_steps=300, name="recover", log_every=5, eval_every=0, checkpoint_every=0
    )
    job_id = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers).json()["id"]
    wait_for(
        lambda: _job(api, team, job_id)["progress"]["step"] >= 10,
        TIMEOUT,
        interval=0.1,
        what="training progress",
    )
    return job_id


def _events(api: httpx.Client, team: TeamKey, job_id: str) -> list[tuple[str, dict]]:
    text = api.get(
        f"/v1/jobs/{job_id}/events", params={"follow": "false"}, headers=team.headers
    ).text
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in block.splitlines()
            if ": " in line and not line.startswith(":")
        )
        if "data" in fields:
            out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


def _check_resumed(api: httpx.Client, team: TeamKey, job_id: str, workers: Workers) -> None:
    try:
        wait_for(
            lambda: _job(api, team, job_id)["status"] in ("succeeded", "failed"),
            TIMEOUT,
            what="job to finish after recovery",
        )
    except TimeoutError:
        raise AssertionError(f"{_job(api, team, job_id)}\n{workers.logs()}") from None
    job = _job(api, team, job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = _events(api, team, job_id)
    saved = [d["step"] for kind, d in events if kind == "checkpoint" and d["attempt"] == 1]
    assert saved and saved[0] > 0, events
    resumed = [
        m["step"]
        for kind, d in events
        if kind == "metrics" and d["attempt"] == 2
        for m in d["metrics"]
    ]
    assert min(resumed) > saved[0]  # attempt 2 continued from attempt 1's checkpoint


def test_warm_shutdown_checkpoints_and_requeues(api, team, corpus, workers) -> None:
    first = workers.start()
    job_id = _submit_and_wait_for_progress(api, team, corpus)
    first.terminate()  # SIGTERM: Celery's warm shutdown
    first.wait(60)
    job = _job(api, team, job_id)
    assert job["status"] == "queued" and job["attempt"] == 1, job
    reasons = [d.get("reason") for kind, d in _events(api, team, job_id) if kind == "status"]
    assert reasons[-1] == "preempted"
    workers.start()
    _check_resumed(api, team, job_id, workers)


def test_killed_worker_is_reaped_and_job_resumes(api, team, corpus, workers) -> None:
    doomed = workers.start()
    job_id = _submit_and_wait_for_progress(api, team, corpus)
    os.kill(doomed.pid, signal.SIGKILL)  # no shutdown handlers, nothing acknowledged
    doomed.wait(10)
    workers.start()  # its reaper finds the stale heartbeat and re-queues the job
    _check_resumed(api, team, job_id, workers)
    reasons = [d.get("reason") for kind, d in _events(api, team, job_id) if kind == "status"]
    assert "worker_lost" in reasons
