"""The scheduler end to end: real uvicorn, a real Celery worker in pool ``cpu`` with one slot,
two teams' tiny training jobs. Jobs wait (with their reason) until the worker registers, then
start one at a time in fair-share order; a job for a pool nobody serves stays queued."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.conftest import TeamKey, tiny_spec, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    """This module's worker serves pool 'cpu' with one GPU slot (the training runs on CPU)."""
    return settings.model_copy(
        update={"worker_pool": "cpu", "worker_gpu_count": 1, "scheduler_interval_s": 1.0}
    )


def _submit(base: str, team: TeamKey, corpus: Path, name: str, **resources: object) -> str:
    spec = tiny_spec(corpus, max_steps=4, name=name, eval_every=4, checkpoint_every=4)
    spec["resources"] = {"queue": "cpu", "gpus": 1, **resources}
    r = httpx.post(f"{base}/v1/jobs", json={"spec": spec}, headers=team.headers, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_jobs_start_in_fair_share_order_and_unserved_pools_wait(
    live_server: str, make_team, corpus: Path, request: pytest.FixtureRequest
) -> None:
    a: TeamKey = make_team("alpha")
    b: TeamKey = make_team("beta")
    ids = {
        "a1": _submit(live_server, a, corpus, "a1"),
        "a2": _submit(live_server, a, corpus, "a2"),
        "b1": _submit(live_server, b, corpus, "b1"),
        "h100": _submit(live_server, a, corpus, "h100", queue="h100"),
    }
    team_of = {k: (a if k.startswith(("a", "h")) else b) for k in ids}

    def get(k: str) -> dict:
        r = httpx.get(f"{live_server}/v1/jobs/{ids[k]}", headers=team_of[k].headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    # No worker yet: everything waits, and says why.
    for k in ids:
        job = get(k)
        pool = "h100" if k == "h100" else "cpu"
        assert (job["status"], job["queue_position"], job["queue_reason"]) == (
            "queued",
            None,
            f"no worker serves pool '{pool}'",
        ), k

    request.getfixturevalue("worker")  # one worker registers in pool 'cpu'

    cpu_jobs = ["a1", "a2", "b1"]
    wait_for(
        lambda: all(get(k)["status"] == "succeeded" for k in cpu_jobs),
        240,
        interval=0.5,
        what="the three cpu jobs to finish",
    )
    jobs = {k: get(k) for k in cpu_jobs}
    started = sorted(cpu_jobs, key=lambda k: jobs[k]["started_at"])
    # a1 is the oldest job; when it ends, team B (holding nothing, never served) goes before
    # A's older a2: first come, first served would have run a2 second. (Priorities within a
    # team are pinned on Postgres in test_scheduler, without training.)
    assert started == ["a1", "b1", "a2"]
    # One slot: each job started after the previous one finished.
    for prev, nxt in zip(started, started[1:], strict=False):
        assert jobs[nxt]["started_at"] >= jobs[prev]["finished_at"], (prev, nxt)

    h100 = get("h100")
    assert (h100["status"], h100["queue_reason"]) == ("queued", "no worker serves pool 'h100'")
    me = httpx.get(f"{live_server}/v1/teams/me", headers=a.headers, timeout=30).json()
    assert (me["running_gpus"], me["queued_jobs"]) == (0, 1)
