"""Reliability (issue 4): a worker SIGKILLed between checkpoints, a task message delivered
twice, and a poison job, each judged only by what a user can observe afterwards — the job's
status and attempt, its event log, its metric rows and its checkpoints.

The SIGTERM (preemption) case is `tests.test_service_recovery.test_warm_shutdown_checkpoints_and_requeues`;
this module reuses that module's worker helper rather than a copy of it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.db import Database
from service.dispatch import RUN_JOB_TASK, make_celery
from service.models import Checkpoint, Job, Metric
from service.settings import Settings
from sharp_core.train.checkpoint import verify_manifest
from tests.conftest import TeamKey, tiny_spec, wait_for
from tests.test_service_recovery import Workers, _events, _job
from worker.child import job_dir

pytestmark = [pytest.mark.service, pytest.mark.slow]

TIMEOUT = 240


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    # Notice a dead worker within seconds, not the production minute.
    return settings.model_copy(update={"heartbeat_timeout_s": 4.0, "reaper_interval_s": 1.0})


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("reliability")


@pytest.fixture(scope="module")
def api(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    from tests.conftest import stop_process

    w = Workers(settings, tmp_path)
    yield w
    for proc in w.procs:
        stop_process(proc, 20)


def training_pids(job_id: str) -> list[int]:
    """Pids of ``python -m worker.child JOB_ID …`` processes (read from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.child" in argv and job_id.encode() in argv:
            out.append(int(entry.name))
    return out


def metric_rows(db: Database, job_id: str) -> list[tuple[str, int, int]]:
    with db.session() as s:
        return [
            (m.name, m.step, m.attempt)
            for m in s.scalars(select(Metric).where(Metric.job_id == job_id))
        ]


def attempt_logs(settings: Settings, team: TeamKey, job_id: str) -> list[str]:
    logs = job_dir(settings, team.team_id, job_id) / "logs"
    return sorted(p.name for p in logs.glob("attempt_*.log"))


def assert_listed_checkpoints_verify(
    api: httpx.Client, team: TeamKey, job_id: str, settings: Settings
) -> list[int]:
    """Item 10: every checkpoint the API lists verifies against its manifest on disk, and
    the API's file list is the manifest's."""
    listed = api.get(f"/v1/jobs/{job_id}/checkpoints", headers=team.headers).json()["data"]
    out = job_dir(settings, team.team_id, job_id)
    for ck in listed:
        manifest = verify_manifest(out / f"step_{ck['step']:06d}")
        assert {f["name"]: f["sha256"] for f in ck["files"]} == {
            n: m["sha256"] for n, m in manifest["files"].items()
        }
    return [ck["step"] for ck in listed]


def _wait_terminal(api: httpx.Client, team: TeamKey, job_id: str, workers: Workers) -> dict:
    try:
        wait_for(
            lambda: _job(api, team, job_id)["status"] in ("succeeded", "failed", "cancelled"),
            TIMEOUT,
            what=f"{job_id} to finish",
        )
    except TimeoutError:
        raise AssertionError(f"{_job(api, team, job_id)}\n{workers.logs()}") from None
    return _job(api, team, job_id)


# ------------------------------------------------------------------------------ item 1
def test_sigkill_between_checkpoints_resumes_from_the_last_one(
    api, team, corpus, workers, db, settings
) -> None:
    """Supervisor *and* training process die at once (the host lost power, the OOM killer
    took the cgroup): nothing gets a chance to checkpoint on the way out."""
    # checkpoints every 100 steps and a kill window of 101..125: the reported step lags the
    # real one by a metrics flush (0.2 s) and a checkpoint is recorded only once its
    # background save commits, and on an idle machine this tiny model trains fast enough that
    # shorter intervals were overshot (20: killed at 40 with a window of 21..30; 40: checkpoint
    # 40 recorded only by step 81, 2026-12-04)
    every, max_steps = 100, 250
    spec = tiny_spec(
        corpus,
        max_steps=max_steps,
        name="sigkill",
        log_every=1,
        eval_every=0,
        checkpoint_every=every,
    )
    doomed = workers.start()
    job_id = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers).json()["id"]
    kill_at = random.Random().randint(every + 1, every + every // 4)

    def step() -> int:
        with db.session() as s:
            return s.scalar(select(Job.step).where(Job.id == job_id)) or 0

    def recorded() -> list[int]:
        with db.session() as s:
            return list(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))

    # checkpoints are written in the background and recorded once committed, a few steps
    # after the step they hold: wait for the first one's row too
    wait_for(
        lambda: step() >= kill_at and every in recorded(),
        TIMEOUT,
        interval=0.01,
        what=f"step {kill_at} and checkpoint {every} recorded",
    )
    children = training_pids(job_id)
    assert len(children) == 1, children
    # Freeze it first (the reported step lags the real one by a metrics flush), check that
    # no second checkpoint exists yet, then kill everything.
    os.kill(children[0], signal.SIGSTOP)
    with db.session() as s:
        saved = list(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))
    killed_at = step()
    for pid in (*children, doomed.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    doomed.wait(10)
    # between checkpoints: the first is saved, the second not yet. The process may have been
    # frozen just after flushing step 2·every's metrics and before writing that checkpoint
    # (seen once with two test processes sharing the cores), which is still between them.
    assert saved == [every] and every < killed_at <= 2 * every, (saved, killed_at)

    workers.start()  # its reaper finds the stale heartbeat; it then runs attempt 2
    job = _wait_terminal(api, team, job_id, workers)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2, job

    events = _events(api, team, job_id)
    reasons = [d.get("reason") for kind, d in events if kind == "status"]
    assert "worker_lost" in reasons, reasons
    saved: dict[int, list[int]] = {}
    for kind, d in events:
        if kind == "checkpoint":
            saved.setdefault(d["attempt"], []).append(d["step"])
    assert saved == {1: [every], 2: [2 * every, max_steps]}, saved
    resumed = [
        m["step"]
        for kind, d in events
        if kind == "metrics" and d["attempt"] == 2
        for m in d["metrics"]
    ]
    assert min(resumed) == every + 1, "attempt 2 did not resume from the first checkpoint"

    assert assert_listed_checkpoints_verify(api, team, job_id, settings) == [
        every,
        2 * every,
        max_steps,
    ]

    rows = metric_rows(db, job_id)
    keys = [(name, step) for name, step, _ in rows]
    assert len(keys) == len(set(keys))  # one row per (name, step)
    for name in ("loss", "lr", "grad_norm"):
        steps = sorted(step for n, step in keys if n == name)
        assert steps == list(range(1, max_steps + 1)), (name, steps)
    # Steps the dead attempt had already written keep its rows; the rest are attempt 2's.
    assert {a for n, s, a in rows if n == "loss" and s > killed_at} == {2}
    assert {a for n, s, a in rows if n == "loss" and s <= every} == {1}


# ------------------------------------------------------------------------------ item 2
def test_same_message_published_twice_runs_once(
    api, team, corpus, workers, settings, queue_length
) -> None:
    """Two extra copies of the task message are already waiting when the worker starts."""
    assert queue_length() == 0
    spec = tiny_spec(corpus, max_steps=10, name="twice", checkpoint_every=0, eval_every=0)
    job_id = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers).json()["id"]
    celery = make_celery(settings)
    try:
        for _ in range(2):
            celery.send_task(RUN_JOB_TASK, args=[job_id], queue="default")
    finally:
        celery.close()
    wait_for(lambda: queue_length() >= 2, 30, what="the copies to be queued")
    workers.start()
    job = _wait_terminal(api, team, job_id, workers)
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    wait_for(lambda: queue_length() == 0, 60, what="worker to consume every copy")
    # The claim is what refuses the copies: the job ends with the same single run.
    job = _wait_terminal(api, team, job_id, workers)
    assert job["attempt"] == 1
    statuses = [d["status"] for kind, d in _events(api, team, job_id) if kind == "status"]
    assert statuses == ["queued", "running", "succeeded"], statuses
    assert attempt_logs(settings, team, job_id) == ["attempt_1.log"]


# ------------------------------------------------------------------------------ item 5
def test_poison_job_fails_after_max_attempts(
    api, team, corpus, workers, settings, queue_length
) -> None:
    """The training process dies (SIGKILL) every time it starts: two attempts, then
    ``failed`` with the reason, and nothing left that would deliver it again."""
    spec = tiny_spec(corpus, max_steps=200, name="poison", checkpoint_every=0, eval_every=0)
    spec["resources"] = {"max_attempts": 2}
    workers.start()
    job_id = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers).json()["id"]
    stop = threading.Event()
    killed: list[int] = []

    def poison() -> None:
        while not stop.is_set():
            for pid in training_pids(job_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    if pid not in killed:
                        killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=poison, daemon=True)
    killer.start()
    try:
        job = _wait_terminal(api, team, job_id, workers)
    finally:
        stop.set()
        killer.join()
    assert job["status"] == "failed", job
    assert job["attempt"] == job["max_attempts"] == 2, job
    assert job["error"]["code"] == "training_process_died", job
    assert "SIGKILL" in job["error"]["message"], job
    assert len(killed) == 2, killed
    statuses = [d["status"] for kind, d in _events(api, team, job_id) if kind == "status"]
    assert statuses == ["queued", "running", "queued", "running", "failed"], statuses
    # No redelivery loop: the queue drains and the job stays failed through several reaper
    # passes (reaper_interval_s = 1).
    wait_for(lambda: queue_length() == 0, 30, what="queue to drain")
    deadline = time.monotonic() + 4 * settings.reaper_interval_s
    while time.monotonic() < deadline:
        again = _job(api, team, job_id)
        assert (again["status"], again["attempt"]) == ("failed", 2), again
        assert queue_length() == 0
        time.sleep(0.5)
    assert attempt_logs(settings, team, job_id) == ["attempt_1.log", "attempt_2.log"]
