"""Scheduling decisions on real Postgres: fair share, priorities, quotas, reasons, and two
passes racing. The state is written as rows (teams, workers, jobs) and `service.scheduler`'s
decisions are asserted exactly; no worker process and no sleeps.

Each test uses its own pool names and teams, so tests sharing the module's database do not
see each other's capacity.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from service import scheduler
from service.admin import create_team, set_quota
from service.db import Database
from service.ids import new_id
from service.migrate import upgrade
from service.models import Job, Worker, utcnow
from service.settings import Settings
from tests.conftest import ROOT, TeamKey, tiny_spec, wait_for
from worker.supervisor import Supervisor

pytestmark = pytest.mark.service

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
TIMEOUT = 60.0


def _pool() -> str:
    return f"p{secrets.token_hex(4)}"


def _team(db: Database, name: str, **quota: object) -> str:
    with db.session() as s:
        team = create_team(s, f"{name}-{secrets.token_hex(3)}")
        if quota:
            set_quota(s, team.id, **quota)  # type: ignore[arg-type]
        return team.id


def _workers(db: Database, pool: str, n: int, gpus: int = 1) -> None:
    with db.session() as s:
        for i in range(n):
            scheduler.register_worker(
                s, name=f"{pool}-w{i}", pool=pool, gpus=gpus, hostname="test-host"
            )


def _job(
    db: Database,
    team_id: str,
    pool: str,
    *,
    label: str,
    age: int,
    gpus: int = 1,
    priority: int = 0,
    status: str = "queued",
    admitted_at: dt.datetime | None = None,
) -> str:
    """A job row; `age` orders creation (T0 + age seconds); `label` is kept in its name."""
    job_id = new_id("job")
    with db.session() as s:
        s.add(
            Job(
                id=job_id,
                team_id=team_id,
                name=label,
                spec={"resources": {"queue": pool, "gpus": gpus, "priority": priority}},
                queue=pool,
                gpus=gpus,
                priority=priority,
                status=status,
                attempt=1 if status != "queued" else 0,
                max_attempts=3,
                cancel_requested=False,
                step=0,
                max_steps=10,
                latest_metrics={},
                event_seq=0,
                created_at=T0 + dt.timedelta(seconds=age),
                admitted_at=admitted_at,
                heartbeat_at=utcnow() if status == "running" else None,
                updated_at=utcnow(),
            )
        )
    return job_id


def _labels(db: Database, ids: list[str]) -> list[str]:
    with db.session() as s:
        names = dict(s.execute(select(Job.id, Job.name).where(Job.id.in_(ids))).all())
    return [names[i] for i in ids]


def _admit(db: Database, sent: list[tuple[str, str]] | None = None) -> list[str]:
    with db.session() as s:
        done = scheduler.admit(
            s,
            (lambda j, p: sent.append((j, p))) if sent is not None else None,
            heartbeat_timeout_s=TIMEOUT,
        )
    return _labels(db, [a.job_id for a in done])


def _info(db: Database) -> dict[str, scheduler.QueueInfo]:
    with db.session() as s:
        state = scheduler.load_state(s, heartbeat_timeout_s=TIMEOUT)
        names = dict(s.execute(select(Job.id, Job.name)).all())
    return {names[k]: v for k, v in scheduler.explain(state).items()}


# --------------------------------------------------------------------------- decisions
def test_fair_share_weights_priority_then_age(db: Database) -> None:
    """8 slots, 4 held. A (weight 1) holds 2 GPUs, C (weight 2) holds 2, B none.

    Shares: A 2/1 = 2, B 0, C 2/2 = 1. B is furthest below its share and its priority-5 job
    goes first; then B and C tie at 1 and C, admitted less recently, goes; then B, then C
    (1.5 < A's 2). A gets nothing this round: it already has twice C's per-weight share."""
    pool = _pool()
    a, b, c = _team(db, "a"), _team(db, "b"), _team(db, "c", weight=2.0)
    _workers(db, pool, 8)
    past = T0 - dt.timedelta(hours=1)
    for i, team in enumerate((a, a, c, c)):
        _job(db, team, pool, label=f"run{i}", age=-100 + i, status="running", admitted_at=past)
    for i in (1, 2, 3):
        _job(db, a, pool, label=f"a{i}", age=i)  # A's are the oldest waiting jobs
    _job(db, b, pool, label="b1", age=10)
    _job(db, b, pool, label="b2", age=11)
    _job(db, b, pool, label="b3", age=12, priority=5)
    _job(db, c, pool, label="c1", age=20)
    _job(db, c, pool, label="c2", age=21)

    with db.session() as s:
        planned = scheduler.plan(s, heartbeat_timeout_s=TIMEOUT)
    assert _labels(db, [p.job_id for p in planned]) == ["b3", "c1", "b1", "c2"]

    sent: list[tuple[str, str]] = []
    assert _admit(db, sent) == ["b3", "c1", "b1", "c2"]
    assert [p for _, p in sent] == [pool] * 4  # one message per admission, to the pool's queue
    assert _admit(db) == []  # full: a second pass admits nothing

    # What is left, in the order the pool would admit it: A and B tie at 2 GPUs per weight,
    # A was admitted less recently; then B's last job, then A's.
    info = _info(db)
    assert [(k, info[k].position) for k in ("a1", "b2", "a2", "a3")] == [
        ("a1", 1),
        ("b2", 2),
        ("a2", 3),
        ("a3", 4),
    ]
    assert info["a1"].reason == f"waiting for a free {pool}"
    assert info["b3"] == scheduler.QueueInfo(0, f"admitted; waiting for a worker in pool '{pool}'")


def test_equal_shares_alternate_when_one_slot_frees_at_a_time(db: Database) -> None:
    """One slot: each finished job hands the slot to the other team (round robin on ties),
    whatever order the jobs were submitted in."""
    pool = _pool()
    a, b = _team(db, "a"), _team(db, "b")
    _workers(db, pool, 1)
    for i in range(3):
        _job(db, a, pool, label=f"a{i}", age=i)
    for i in range(3):
        _job(db, b, pool, label=f"b{i}", age=10 + i)
    order = []
    for _ in range(6):
        admitted = _admit(db)
        assert len(admitted) == 1
        order += admitted
        with db.session() as s:  # the job runs and finishes; its slot is free again
            s.execute(
                text("UPDATE jobs SET status = 'succeeded' WHERE queue = :p AND name = :n"),
                {"p": pool, "n": admitted[0]},
            )
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_quotas_capacity_and_reasons(db: Database) -> None:
    pool, big, nobody = _pool(), _pool(), _pool()
    q = _team(db, "quota", max_running_gpus=2)
    other = _team(db, "other")
    _workers(db, pool, 3)
    _workers(db, big, 1, gpus=2)
    _job(db, q, big, label="q-running", age=0, gpus=2, status="running", admitted_at=T0)
    _job(db, q, pool, label="q1", age=1)  # 2 of 2 GPUs in use: held back
    _job(db, other, pool, label="o1", age=2)
    _job(db, other, pool, label="o-huge", age=3, gpus=4)  # no worker in the pool has 4 GPUs
    _job(db, other, pool, label="o2", age=4)
    _job(db, other, nobody, label="o-nowhere", age=5)

    # The 4-GPU job can never run in this pool, so it does not block o2 behind it.
    assert _admit(db) == ["o1", "o2"]
    info = _info(db)
    assert info["q1"] == scheduler.QueueInfo(1, "team quota: 2 of 2 GPUs in use")
    assert info["o-huge"] == scheduler.QueueInfo(
        None, f"no worker in pool '{pool}' has 4 GPUs (the largest has 1)"
    )
    assert info["o-nowhere"] == scheduler.QueueInfo(None, f"no worker serves pool '{nobody}'")

    # The 2-GPU job finishes: the team is under its quota again and q1 gets the free slot.
    with db.session() as s:
        s.execute(text("UPDATE jobs SET status = 'succeeded' WHERE name = 'q-running'"))
    assert _admit(db) == ["q1"]
    # A worker that stopped heartbeating is no capacity: o-nowhere's pool gets one, dead.
    _workers(db, nobody, 1)
    with db.session() as s:
        s.execute(
            text("UPDATE workers SET heartbeat_at = :t WHERE pool = :p"),
            {"t": utcnow() - dt.timedelta(seconds=TIMEOUT + 5), "p": nobody},
        )
    assert _admit(db) == []
    assert _info(db)["o-nowhere"].reason == f"no worker serves pool '{nobody}'"
    _workers(db, nobody, 1)  # its heartbeat resumes
    assert _admit(db) == ["o-nowhere"]


def test_claim_requires_admission(db: Database, settings: Settings) -> None:
    """A stray message (say, redelivered after the reaper re-queued the job) starts nothing."""
    pool = _pool()
    team = _team(db, "claim")
    job_id = _job(db, team, pool, label="stray", age=0)
    sup = Supervisor(settings, db, None, lambda j, p: None, worker_name="w")
    assert sup.claim(job_id) is None
    _workers(db, pool, 1)
    assert _admit(db) == ["stray"]
    claim = sup.claim(job_id)
    assert claim is not None and claim.attempt == 1
    assert _admit(db) == []  # the running job holds the pool's only slot


def test_reaper_requeue_goes_back_through_the_scheduler(db: Database, settings: Settings) -> None:
    """A job whose worker went silent is re-queued without its admission; the pass the reaper
    runs admits it again (a live worker of its pool is free), and only then is it sent."""
    from worker.reaper import reap

    pool = _pool()
    team = _team(db, "reaped")
    job_id = _job(db, team, pool, label="lost", age=0, status="running", admitted_at=T0)
    with db.session() as s:
        s.execute(
            text("UPDATE jobs SET heartbeat_at = :t, worker = 'gone' WHERE id = :i"),
            {"t": utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 5), "i": job_id},
        )
    _workers(db, pool, 1)
    sent: list[tuple[str, str]] = []
    report = reap(settings, db, None, lambda j, p: sent.append((j, p)))
    # (Other tests' running rows may be stale too by now; only this pool is asserted.)
    assert job_id in report.requeued
    assert [x for x in sent if x[1] == pool] == [(job_id, pool)]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "queued" and job.attempt == 1
        assert job.admitted_at is not None and job.admitted_at > T0  # admitted anew


# --------------------------------------------------------------------------- concurrency
def _admitted(db: Database, pool: str) -> int:
    with db.session() as s:
        return s.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.queue == pool, Job.admitted_at.is_not(None))
        )


def test_a_second_pass_waits_for_the_first_and_sees_its_admissions(db: Database) -> None:
    """Pass 1 has admitted up to capacity but not committed. Then an urgent job arrives and
    pass 2 starts on another connection. Pass 2 must wait for pass 1 and find the pool full.
    Without the scheduler lock it would plan from the state before pass 1 (the urgent job
    first) and admit it past the capacity: the conditional UPDATE only stops it from
    admitting the same jobs twice."""
    pool = _pool()
    team = _team(db, "race")
    _workers(db, pool, 3)
    for i in range(8):
        _job(db, team, pool, label=f"j{i}", age=i)
    first = db.sessionmaker()
    assert len(scheduler.admit(first, None, heartbeat_timeout_s=TIMEOUT)) == 3
    _job(db, team, pool, label="urgent", age=99, priority=50)
    second: list[str] = []
    thread = threading.Thread(target=lambda: second.extend(_admit(db)))
    thread.start()

    def second_pass_waiting() -> bool:
        with db.engine.connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE NOT l.granted AND a.datname = current_database()"
                    )
                ).scalar()
            )

    try:
        wait_for(second_pass_waiting, 30, interval=0.05, what="the second pass to wait")
        assert thread.is_alive()
    finally:
        first.commit()
        first.close()
        thread.join(30)
    assert second == []
    assert _admitted(db, pool) == 3
    assert _info(db)["urgent"].position == 1  # it goes first once a slot frees


def test_a_submission_pass_skips_while_another_pass_runs(db: Database) -> None:
    """`wait=False` (what a submission triggers) returns at once, admitting nothing, while
    another pass holds the lock — a burst of POSTs must not queue up behind it — and the
    next pass, once the lock is free, admits as usual."""
    pool = _pool()
    team = _team(db, "skip")
    _workers(db, pool, 2)
    for i in range(3):
        _job(db, team, pool, label=f"s{i}", age=i)
    holder = db.sessionmaker()
    try:
        assert scheduler.lock(holder)  # a pass in progress
        factory = db.sessionmaker
        assert scheduler.run_pass(factory, None, heartbeat_timeout_s=TIMEOUT, wait=False) == []
        assert _admitted(db, pool) == 0
    finally:
        holder.rollback()
        holder.close()
    done = scheduler.run_pass(db.sessionmaker, None, heartbeat_timeout_s=TIMEOUT, wait=False)
    assert len(done) == 2 and _admitted(db, pool) == 2


def test_many_concurrent_passes_never_over_admit(db: Database) -> None:
    pool = _pool()
    teams = [_team(db, f"t{i}") for i in range(3)]
    _workers(db, pool, 5)
    for i in range(30):
        _job(db, teams[i % 3], pool, label=f"j{i}", age=i)
    start = threading.Barrier(8)
    results: list[int] = []
    errors: list[BaseException] = []

    def one_pass() -> None:
        try:
            start.wait(10)
            results.append(len(_admit(db)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_pass) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(results) == 5 and sorted(results) == [0] * 7 + [5]
    assert _admitted(db, pool) == 5


def test_sqlite_pass(tmp_path: Path) -> None:
    """The embedded default: the same decisions on SQLite (serialised by BEGIN IMMEDIATE)."""
    url = f"sqlite:///{tmp_path / 'sched.db'}"
    upgrade(url)
    lite = Database(Settings(database_url=url))
    try:
        a, b = _team(lite, "a"), _team(lite, "b")
        _workers(lite, "cpu", 2)
        for i in range(3):
            _job(lite, a, "cpu", label=f"a{i}", age=i)
        _job(lite, b, "cpu", label="b0", age=10)
        done = scheduler.run_pass(lite.sessionmaker, None, heartbeat_timeout_s=TIMEOUT)
        assert _labels(lite, [d.job_id for d in done]) == ["a0", "b0"]
        info = _info(lite)
        assert (info["a1"].position, info["a2"].position) == (1, 2)
    finally:
        lite.dispose()


# --------------------------------------------------------------------------- API and CLI
def test_queued_jobs_quota_and_teams_me(
    client: TestClient, make_team, db: Database, corpus: Path, queue_length
) -> None:
    team: TeamKey = make_team("capped")
    with db.session() as s:
        set_quota(s, team.team_id, max_queued_jobs=2, max_running_gpus=4)
    pool = _pool()  # nobody serves it: the jobs stay queued
    spec = tiny_spec(corpus)
    spec["resources"] = {"queue": pool, "gpus": 1}
    before = queue_length(pool)
    ids = []
    for _ in range(2):
        r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "quota_exceeded"
    assert r.json()["error"]["param"] == "team.max_queued_jobs"
    assert "2 of 2 queued jobs" in r.json()["error"]["message"]
    assert queue_length(pool) == before  # nothing reached the broker

    got = client.get(f"/v1/jobs/{ids[1]}", headers=team.headers).json()
    assert got["queue_reason"] == f"no worker serves pool '{pool}'"
    assert got["queue_position"] is None
    me = client.get("/v1/teams/me", headers=team.headers).json()
    assert me == {
        "id": team.team_id,
        "name": team.name,
        "weight": 1.0,
        "max_running_gpus": 4,
        "max_queued_jobs": 2,
        "running_gpus": 0,
        "queued_jobs": 2,
    }

    # A worker joins the pool: the next submission's pass admits the oldest job, whose
    # message goes to the pool's queue; the other waits its turn, first in line.
    _workers(db, pool, 1)
    client.post(f"/v1/jobs/{ids[1]}/cancel", headers=team.headers)  # frees a queued place
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    assert queue_length(pool) == before + 1
    first = client.get(f"/v1/jobs/{ids[0]}", headers=team.headers).json()
    assert (first["queue_position"], first["status"]) == (0, "queued")
    newest = client.get(f"/v1/jobs/{r.json()['id']}", headers=team.headers).json()
    assert newest["queue_position"] == 1
    assert newest["queue_reason"] == f"waiting for a free {pool}"
    me = client.get("/v1/teams/me", headers=team.headers).json()
    assert (me["running_gpus"], me["queued_jobs"]) == (1, 2)

    # Cancelling the admitted job frees the slot: the pass after the cancel admits the next.
    r = client.post(f"/v1/jobs/{ids[0]}/cancel", headers=team.headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert r.json()["queue_position"] is None and r.json()["queue_reason"] is None
    assert queue_length(pool) == before + 2
    newest = client.get(f"/v1/jobs/{newest['id']}", headers=team.headers).json()
    assert newest["queue_position"] == 0


def test_admin_cli_sets_and_lists_quotas(db_url: str, db: Database) -> None:
    env = {**os.environ, "SHARP_DATABASE_URL": db_url}
    team = _team(db, "cli")

    def sharp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ops.cli", "admin", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = sharp(
        "teams",
        "quota",
        team,
        "--max-running-gpus",
        "4",
        "--max-queued-jobs",
        "10",
        "--weight",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "weight 2, max running GPUs 4, max queued jobs 10" in done.stdout
    done = sharp("teams", "quota", team, "--max-running-gpus", "none")
    assert "max running GPUs -, max queued jobs 10" in done.stdout  # the other one stays
    bad = sharp("teams", "quota", team, "--max-queued-jobs", "-3")
    assert bad.returncode == 2 and "--max-queued-jobs" in bad.stderr
    with db.session() as s:
        row = s.execute(
            text("SELECT weight, max_running_gpus, max_queued_jobs FROM teams WHERE id = :i"),
            {"i": team},
        ).one()
    assert tuple(row) == (2.0, None, 10)
    _workers(db, "cli-pool", 1, gpus=8)
    listed = sharp("workers", "list")
    assert listed.returncode == 0 and "cli-pool" in listed.stdout and "yes" in listed.stdout
    with db.session() as s:
        assert s.get(Worker, "cli-pool-w0") is not None
