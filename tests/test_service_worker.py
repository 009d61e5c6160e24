"""Worker plumbing on real Postgres and Redis, without training: claim, fencing, reaper,
outcome mapping, and the SSE feed (live, then resumed with Last-Event-ID) over real uvicorn.

The training-process side is driven through `worker.child.Reporter`, the object the real
child's callbacks delegate to, so these tests exercise the same writes.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx_sse import connect_sse

from service.db import Database
from service.live import LivePublisher
from service.models import Job, Metric, utcnow
from service.repositories import JobRepository, MetricRepository
from service.settings import Settings
from tests.conftest import TeamKey, tiny_spec, wait_for
from worker.child import Reporter
from worker.reaper import reap
from worker.supervisor import Claim, Supervisor, Watch

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("workers")


class Sent(list):
    """A dispatch that records (job_id, queue) instead of sending."""

    def __call__(self, job_id: str, queue: str) -> None:
        self.append((job_id, queue))


def _new_job(client: TestClient, team: TeamKey, corpus: Path, **kw) -> str:
    """A queued job, admitted as a scheduling pass would admit it were a worker registered
    (none is in this module, so the API's own pass leaves it waiting)."""
    r = client.post("/v1/jobs", json={"spec": tiny_spec(corpus, **kw)}, headers=team.headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with client.app.state.db.session() as s:  # type: ignore[attr-defined]
        JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
    return job_id


def _job(db: Database, job_id: str) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _reporter(
    settings: Settings, db: Database, live: LivePublisher | None, job_id: str, attempt: int
) -> Reporter:
    return Reporter(settings, db, live, _job(db, job_id), attempt)


def test_claim_is_idempotent(client, team, corpus, settings, db, live) -> None:
    job_id = _new_job(client, team, corpus)
    sup = Supervisor(settings, db, live, Sent(), worker_name="w1")
    claim = sup.claim(job_id)
    assert claim is not None and claim.attempt == 1
    assert sup.claim(job_id) is None  # a duplicate delivery does nothing
    job = _job(db, job_id)
    assert (job.status, job.attempt, job.worker) == ("running", 1, "w1")
    assert job.heartbeat_at is not None and job.started_at is not None


def test_cancelled_queued_job_is_not_claimed(client, team, corpus, settings, db, live) -> None:
    job_id = _new_job(client, team, corpus)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
    assert Supervisor(settings, db, live, Sent()).claim(job_id) is None


def test_metrics_are_batched_idempotent_and_fenced(
    client, team, corpus, settings, db, live
) -> None:
    job_id = _new_job(client, team, corpus)
    sup = Supervisor(settings, db, live, Sent())
    sup.claim(job_id)
    rep = _reporter(settings, db, live, job_id, 1)
    for step in range(1, 6):
        rep.add_metrics(step, {"loss": 10.0 - step, "tokens_per_s": 100.0, "nan": float("nan")})
    assert rep.flush()
    # A resumed run re-logging step 5 cannot overwrite or duplicate it.
    rep.add_metrics(5, {"loss": 99.0})
    assert rep.flush()
    with db.session() as s:
        rows = MetricRepository(s).replay(job_id, after_step=-1, limit_steps=100, names=["loss"])
    assert [(st, v["loss"]) for st, v in rows] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.0)]

    page = client.get(
        f"/v1/jobs/{job_id}/metrics", params={"after": 2, "limit": 2}, headers=team.headers
    ).json()
    assert [p["step"] for p in page["data"]] == [3, 4] and page["next_after"] == 4
    assert page["data"][0]["values"] == {"loss": 7.0, "tokens_per_s": 100.0}
    got = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    assert got["progress"]["step"] == 5 and got["progress"]["tokens_per_s"] == 100.0
    assert got["progress"]["eta_s"] == pytest.approx((20 - 5) * 4 * 32 / 100.0)
    assert got["metrics"]["loss"] == 99.0  # the latest value the process reported

    # The reaper (or anyone) moves the job on to attempt 2: attempt 1's writes are refused.
    with db.session() as s:
        JobRepository(s).update_fenced(job_id, values={"attempt": 2})
    rep.add_metrics(6, {"loss": 1.0})
    assert rep.flush() is False and rep.fenced and rep.should_stop()
    assert rep.add_checkpoint(6, Path("/nonexistent"), {"files": {}}) is False
    with db.session() as s:
        assert s.get(Metric, (job_id, 6, "loss")) is None


def test_should_stop_follows_the_cancel_flag(client, team, corpus, settings, db, live) -> None:
    job_id = _new_job(client, team, corpus)
    Supervisor(settings, db, live, Sent()).claim(job_id)
    rep = _reporter(settings, db, live, job_id, 1)
    assert rep.should_stop() is False
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    wait_for(rep.should_stop, 5, what="should_stop after cancel")
    assert not rep.fenced


def test_outcomes(client, team, corpus, settings, db, live) -> None:
    def run(result: dict | None, exit_code: int = 0, cancel: bool = False, attempts: int = 3):
        job_id = _new_job(client, team, corpus)
        with db.session() as s:
            JobRepository(s).update_fenced(job_id, values={"max_attempts": attempts})
        sent = Sent()
        sup = Supervisor(settings, db, live, sent)
        claim = sup.claim(job_id)
        assert claim is not None
        if cancel:
            client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
        outcome = sup._finish(claim, Watch(exit_code=exit_code), result)
        return outcome, _job(db, job_id), sent

    outcome, job, sent = run({"status": "completed", "step": 20})
    assert outcome == job.status == "succeeded" and job.step == 20 and not sent
    outcome, job, _ = run({"status": "stopped", "step": 7}, cancel=True)
    assert outcome == job.status == "cancelled" and job.finished_at is not None
    outcome, job, _ = run(None, exit_code=-9, cancel=True)
    assert outcome == "cancelled"
    err = {
        "status": "error",
        "code": "model_not_found",
        "message": "cannot load model 'x/y'",
        "param": "spec.student.model",
        "retryable": False,
    }
    outcome, job, sent = run(err)
    assert outcome == job.status == "failed" and not sent
    assert job.error == {
        "code": "model_not_found",
        "message": "cannot load model 'x/y'",
        "param": "spec.student.model",
    }
    outcome, job, sent = run(None, exit_code=-9)
    # Back through the scheduler: not admitted, no message until a worker of its pool is free.
    assert outcome == job.status == "queued" and job.admitted_at is None and not sent
    assert job.attempt == 1 and job.worker is None
    outcome, job, sent = run(None, exit_code=1, attempts=1)
    assert outcome == job.status == "failed" and job.error["code"] == "training_process_died"
    assert "exit code 1" in job.error["message"] and not sent
    outcome, job, sent = run({"status": "stopped", "step": 3})  # preempted, not cancelled
    assert outcome == "queued" and job.admitted_at is None


def test_reaper(client, team, corpus, settings, db, live) -> None:
    old = utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 60)
    ids = {}
    for name, attempts, cancel in (
        ("requeue", 3, False),
        ("fail", 1, False),
        ("cancel", 3, True),
        ("fresh", 3, False),
    ):
        job_id = _new_job(client, team, corpus)
        with db.session() as s:
            JobRepository(s).update_fenced(job_id, values={"max_attempts": attempts})
        Supervisor(settings, db, live, Sent(), worker_name="dead").claim(job_id)
        if cancel:
            client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
        if name != "fresh":
            with db.session() as s:
                JobRepository(s).update_fenced(job_id, values={"heartbeat_at": old})
        ids[name] = job_id
    sent = Sent()
    report = reap(settings, db, live, sent)
    assert ids["requeue"] in report.requeued
    assert _job(db, ids["requeue"]).admitted_at is None  # goes back through the scheduler
    assert ids["fail"] in report.failed and ids["cancel"] in report.cancelled
    assert _job(db, ids["requeue"]).status == "queued"
    failed = _job(db, ids["fail"])
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    assert _job(db, ids["cancel"]).status == "cancelled"
    assert _job(db, ids["fresh"]).status == "running"
    assert ids["fresh"] not in report.requeued
    # A second pass finds nothing more to do.
    again = reap(settings, db, live, Sent())
    assert not ({*again.requeued, *again.failed, *again.cancelled} & set(ids.values()))
    # A worker restarting under a stable name takes its jobs back at once.
    report = reap(settings, db, live, Sent(), dead_worker="dead")
    assert ids["fresh"] in report.requeued


def test_stale_queued_jobs_are_dispatched_again(client, team, corpus, settings, db, live) -> None:
    job_id = _new_job(client, team, corpus)
    long_ago = utcnow() - dt.timedelta(seconds=settings.requeue_queued_after_s + 10)
    with db.session() as s:
        JobRepository(s).update_fenced(job_id, values={"enqueued_at": long_ago})
    sent = Sent()
    assert job_id in reap(settings, db, live, sent).redispatched
    assert (job_id, "default") in sent
    assert job_id not in reap(settings, db, live, Sent()).redispatched


def _sse_events(
    base: str,
    team: TeamKey,
    job_id: str,
    last_id: int | None,
    out: list,
    ready: threading.Event | None = None,
) -> None:
    headers = dict(team.headers)
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(30, read=30)) as http,
        connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source,
    ):
        assert source.response.status_code == 200
        if ready is not None:
            ready.set()
        for ev in source.iter_sse():
            if not ev.data:  # httpx-sse reports a heartbeat comment as an empty event
                continue
            out.append((int(ev.id), ev.event, json.loads(ev.data)))


def test_sse_live_then_resume_with_last_event_id(
    live_server: str, client, team, corpus, settings, db, live
) -> None:
    job_id = _new_job(client, team, corpus)
    received: list = []
    ready = threading.Event()
    listener = threading.Thread(
        target=_sse_events, args=(live_server, team, job_id, None, received, ready)
    )
    listener.start()
    assert ready.wait(20)
    wait_for(lambda: len(received) >= 1, 10, what="first event")  # the 'queued' event
    sup = Supervisor(settings, db, live, Sent())
    claim = sup.claim(job_id)
    assert claim is not None
    wait_for(lambda: len(received) >= 2, 10, what="running event, live")
    rep = _reporter(settings, db, live, job_id, 1)
    for step in range(1, 11):
        rep.add_metrics(step, {"loss": float(step)})
        rep.flush()
    sup._finish(
        Claim(job_id, team.team_id, "default", 1),
        Watch(exit_code=0),
        {"status": "completed", "step": 10},
    )
    listener.join(30)
    assert not listener.is_alive(), "the stream must end at a terminal state"
    seqs = [seq for seq, _, _ in received]
    assert seqs == list(range(1, len(seqs) + 1))  # ids are dense: nothing lost, no dupes
    kinds = [kind for _, kind, _ in received]
    assert kinds[0] == kinds[1] == "status" and kinds[-1] == "status"
    assert [d["status"] for _, k, d in received if k == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    steps = [m["step"] for _, k, d in received if k == "metrics" for m in d["metrics"]]
    assert steps == list(range(1, 11))

    # Reconnect as if we had lost the connection after event 4: exactly 5.. come back.
    resumed: list = []
    _sse_events(live_server, team, job_id, 4, resumed)
    assert resumed == [e for e in received if e[0] > 4]
    # An unknown job and another team's job are 404, not an empty stream.
    with httpx.Client(base_url=live_server) as http:
        assert http.get("/v1/jobs/job_nope/events", headers=team.headers).status_code == 404
