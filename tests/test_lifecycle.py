"""The job lifecycle (`service.lifecycle`): the transition table, its pure model, and the
database functions checked against that model on a real Postgres row.

Invariants: nothing leaves ``succeeded``; only ``retry`` leaves ``failed``/``cancelled``;
``attempt`` never decreases; every status change writes exactly one status event.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service import lifecycle
from service.db import Database
from service.ids import new_id
from service.lifecycle import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    TERMINAL_STATUSES,
    TRANSITIONS,
    JobStatus,
    Snapshot,
    plan,
)
from service.models import Job, JobEvent, utcnow
from service.repositories import JobRepository

Q, R, CING = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING
S, F, C = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED


# -- the table ----------------------------------------------------------------------------------


def test_status_values_are_the_stored_strings() -> None:
    """The CHECK constraint and the API's strings: these values never change."""
    assert JOB_STATUSES == ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
    assert ACTIVE_STATUSES == ("running", "cancelling")
    assert frozenset({"succeeded", "failed", "cancelled"}) == TERMINAL_STATUSES
    assert JobStatus("cancelling") is CING and f"{CING}" == "cancelling" and CING == "cancelling"


def test_shown_status_is_queued_only_for_a_running_job_its_backend_holds() -> None:
    """A claimed job Slurm still holds PENDING (the supervisor wrote its reason) shows queued;
    nothing else is shown differently from what is stored."""
    assert lifecycle.shown_status("running", "slurm: Resources") is Q
    assert lifecycle.shown_status("running", None) is R
    for status in JOB_STATUSES:
        if status != "running":
            assert lifecycle.shown_status(status, "slurm: Resources") == status


def test_only_retry_leaves_a_terminal_status() -> None:
    edges = [
        (name, src, dst)
        for name, table in TRANSITIONS.items()
        for src, dsts in table.items()
        for dst in dsts
    ]
    from_terminal = {(name, src, dst) for name, src, dst in edges if src in TERMINAL_STATUSES}
    assert from_terminal == {("retry", F, Q), ("retry", C, Q)}
    assert not [e for e in edges if e[1] == S]  # succeeded is final


def test_sources_of_each_transition() -> None:
    assert lifecycle.sources("claim") == ("queued",)
    assert set(lifecycle.sources("request_cancel")) == {"queued", "running"}
    assert set(lifecycle.sources("finish", S)) == {"running", "cancelling"}
    assert set(lifecycle.sources("requeue_or_fail", Q)) == {"running", "cancelling"}
    assert set(lifecycle.sources("retry")) == {"failed", "cancelled"}
    assert lifecycle.sources("retry", S) == ()


@pytest.mark.parametrize(
    ("transition", "before", "kw", "after"),
    [
        ("claim", Snapshot(Q, admitted=True), {}, Snapshot(R, attempt=1, admitted=True)),
        ("claim", Snapshot(Q), {}, None),  # not admitted
        ("claim", Snapshot(Q, admitted=True, cancel_requested=True), {}, None),
        ("request_cancel", Snapshot(Q), {}, Snapshot(C, cancel_requested=True)),
        ("request_cancel", Snapshot(R, 1), {}, Snapshot(CING, 1, cancel_requested=True)),
        ("request_cancel", Snapshot(S, 1), {}, None),
        ("finish", Snapshot(R, 1), {"final": S}, Snapshot(S, 1)),
        ("finish", Snapshot(Q), {"final": S}, None),
        ("requeue_or_fail", Snapshot(R, 1, 3, admitted=True), {}, Snapshot(Q, 1, 3)),
        ("requeue_or_fail", Snapshot(R, 3, 3, admitted=True), {}, Snapshot(F, 3, 3, admitted=True)),
        (
            "requeue_or_fail",
            Snapshot(CING, 1, 3, cancel_requested=True),
            {},
            Snapshot(C, 1, 3, cancel_requested=True),
        ),
        ("retry", Snapshot(F, 3, 3, admitted=True), {"budget": 2}, Snapshot(Q, 3, 5)),
        ("retry", Snapshot(C, 1, 3, cancel_requested=True), {"budget": 3}, Snapshot(Q, 1, 4)),
        ("retry", Snapshot(S, 1), {"budget": 3}, None),
    ],
)
def test_plan_table(transition: str, before: Snapshot, kw: dict, after: Snapshot | None) -> None:
    assert plan(transition, before, **kw) == after


def test_finish_needs_a_terminal_status() -> None:
    with pytest.raises(ValueError):
        plan("finish", Snapshot(R, 1), final=Q)


# -- the pure model under random sequences ------------------------------------------------------

OPS = ["admit", "claim", "request_cancel", "finish", "requeue_or_fail", "retry"]
op_names = st.sampled_from(OPS)
finals = st.sampled_from([S, F, C])  # finish's status
budgets = st.integers(1, 4)  # retry's budget
op_strategy = st.tuples(op_names, finals, budgets)


def _admit(job: Snapshot) -> Snapshot | None:
    ok = job.status == Q and not job.admitted and not job.cancel_requested
    return Snapshot(**{**vars(job), "admitted": True}) if ok else None


def _step(job: Snapshot, op: str, final: JobStatus, budget: int) -> Snapshot | None:
    if op == "admit":
        return _admit(job)
    return plan(op, job, final=final, budget=budget)


def _check_invariants(before: Snapshot, after: Snapshot, op: str) -> None:
    assert after.attempt >= before.attempt
    if before.status == S:
        assert after.status == S
    if before.status in TERMINAL_STATUSES and after.status != before.status:
        assert op == "retry"
    assert after.attempt <= max(after.max_attempts, before.attempt)


@given(st.lists(op_strategy, max_size=40), st.integers(1, 4))
def test_random_sequences_keep_the_invariants(ops: list, max_attempts: int) -> None:
    job = Snapshot(Q, max_attempts=max_attempts)
    for op, final, budget in ops:
        nxt = _step(job, op, final, budget)
        if nxt is None:
            continue
        _check_invariants(job, nxt, op)
        job = nxt


# -- the database functions against the model ---------------------------------------------------


@pytest.fixture(scope="module")
def team_id(make_team) -> str:
    return make_team("lifecycle").team_id


def _new_job(db: Database, team_id: str, max_attempts: int) -> str:
    now = utcnow()
    job = Job(
        id=new_id("job"),
        team_id=team_id,
        name="lifecycle",
        spec={},
        queue="default",
        gpus=1,
        priority=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        step=0,
        max_steps=10,
        latest_metrics={},
        created_at=now,
        enqueued_at=now,
        updated_at=now,
    )
    with db.session() as s:
        lifecycle.start(JobRepository(s), job)
        return job.id


def _snapshot(db: Database, job_id: str) -> tuple[Snapshot, int]:
    with db.session() as s:
        job = JobRepository(s).get(job_id)
        assert job is not None
        events = s.query(JobEvent).filter_by(job_id=job_id, kind="status").count()
        return (
            Snapshot(
                JobStatus(job.status),
                job.attempt,
                job.max_attempts,
                job.cancel_requested,
                job.admitted_at is not None,
            ),
            events,
        )


def _run(db: Database, job_id: str, op: str, final: JobStatus, budget: int, stale: bool) -> None:
    """One database transition, the way the API, the supervisor, the reaper and the
    scheduler call them; `stale`: an attempt other than the job's (a fenced writer)."""
    with db.session() as s:
        repo = JobRepository(s)
        job = repo.get(job_id)
        assert job is not None
        s.expunge(job)  # a copy: what the caller read earlier (never flushed back)
        attempt = job.attempt - 1 if stale else job.attempt
        if op == "admit":
            lifecycle.admit(repo, job_id, utcnow())
        elif op == "claim":
            lifecycle.claim(repo, job_id, "w1")
        elif op == "request_cancel":
            if job.status in lifecycle.sources("request_cancel"):
                lifecycle.request_cancel(repo, job)
        elif op == "finish":
            lifecycle.finish(repo, job_id, attempt, final)
        elif op == "requeue_or_fail":
            job.attempt = attempt  # a stale supervisor holds an older attempt
            lifecycle.requeue_or_fail(repo, job, reason="test", error={"code": "x"})
        elif op == "retry":
            lifecycle.retry(repo, job, budget)


@pytest.mark.service
@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(st.tuples(op_names, finals, budgets, st.booleans()), max_size=25),
    st.integers(1, 3),
)
def test_database_transitions_follow_the_model(
    db: Database, team_id: str, ops: list, max_attempts: int
) -> None:
    job_id = _new_job(db, team_id, max_attempts)
    model, events = _snapshot(db, job_id)
    assert model == Snapshot(Q, 0, max_attempts) and events == 1
    for op, final, budget, stale in ops:
        stale = stale and model.attempt > 0 and op in ("finish", "requeue_or_fail")
        _run(db, job_id, op, final, budget, stale)
        row, n = _snapshot(db, job_id)
        expected = None if stale else _step(model, op, final, budget)
        if expected is None:
            assert (row, n) == (model, events), f"{op} should have been refused"
            continue
        assert row == expected, op
        assert n == events + (op != "admit"), op  # one status event per status change
        _check_invariants(model, row, op)
        model, events = row, n


# -- the job-ended reactions (registered from above: no import circle) ---------------------------


def test_ending_transition_runs_reactions_in_order_and_refuses_without_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_ended` runs the registered reactions in registration order with (repo, id, status);
    re-registering a name replaces it; with none registered it raises instead of silently
    losing the webhook outbox and the sweep's advance."""
    monkeypatch.setattr(lifecycle, "_reactions", {})
    with pytest.raises(RuntimeError, match="service.reactions"):
        lifecycle._ended(None, "job_1", F)  # type: ignore[arg-type]
    calls: list[tuple[str, object, str, JobStatus]] = []
    lifecycle.on_job_ended("a", lambda repo, job_id, st: calls.append(("a", repo, job_id, st)))
    lifecycle.on_job_ended("b", lambda repo, job_id, st: calls.append(("b", repo, job_id, st)))
    lifecycle.on_job_ended("a", lambda repo, job_id, st: calls.append(("a2", repo, job_id, st)))
    lifecycle._ended("repo", "job_1", C)  # type: ignore[arg-type]
    assert calls == [("a2", "repo", "job_1", C), ("b", "repo", "job_1", C)]
    assert lifecycle.job_ended_reactions() == ("a", "b")


@pytest.mark.parametrize("entry", ["api.app", "worker.tasks", "worker.supervisor", "worker.reaper"])
def test_every_process_that_runs_transitions_registers_the_reactions(entry: str) -> None:
    """The API, the Celery worker (its task module), the supervisor and the reaper each
    register the webhook outbox and the sweep advance, in that order, on import alone (a fresh
    interpreter: nothing else imported first)."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import {entry}; from service import lifecycle; print(lifecycle.job_ended_reactions())"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "('webhooks', 'sweeps', 'step_costs')"
