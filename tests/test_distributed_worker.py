"""A 2-GPU job through the real worker path on CPU: the supervisor spawns `worker.child`, which
execs torchrun with two gloo ranks; rank 0 alone writes metrics, checkpoints and the result.
A cancel reaches every rank (they stop at the same step, checkpoint, and exit); a retry
resumes from that checkpoint, and the whole trajectory equals one process's (tolerance: see
tests/test_distributed.py). Real Postgres, real Redis, real processes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from service.live import LivePublisher
from service.models import Checkpoint, Job, Metric, utcnow
from service.repositories import JobRepository
from service.settings import Settings
from sharp_core.spec import parse_spec
from sharp_core.train.loop import train
from tests.conftest import wait_for
from tests.helpers import GPT2_TEACHER, GPT2_TINY, Recorder, spec_dict
from tests.test_distributed import NO_DROPOUT, RTOL
from tests.test_service_worker import Sent
from worker.child import log_path
from worker.supervisor import Supervisor

pytestmark = [pytest.mark.service, pytest.mark.slow]

MAX_STEPS = 40


def _processes_running(job_id: str) -> list[int]:
    """Pids whose command line names this job (the child, torchrun, the ranks)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if job_id.encode() in cmd and b"worker.child" in cmd:
            pids.append(int(d.name))
    return pids


def test_two_rank_job_cancels_everywhere_and_resumes_on_one_process_trajectory(
    settings: Settings, db, make_team, corpus, tmp_path
) -> None:
    teacher = train(
        parse_spec(
            spec_dict(
                corpus,
                student={"init": "config", "config": {**GPT2_TEACHER, **NO_DROPOUT}},
                training={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0},
            )
        ),
        tmp_path / "teacher",
    ).checkpoint
    spec = spec_dict(
        corpus,
        teacher={"model": str(teacher)},
        student={"init": "config", "config": {**GPT2_TINY, **NO_DROPOUT}},
        method={"name": "kd"},
        training={"max_steps": MAX_STEPS, "eval_every": 0, "checkpoint_every": 0},
    )
    spec.pop("tokenizer")
    ref = Recorder()
    train(parse_spec(spec), tmp_path / "one", callbacks=ref)

    team = make_team("multigpu")
    spec["resources"] = {"gpus": 2}
    live = LivePublisher(settings)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def admit() -> None:  # as a scheduling pass would, were a worker registered
            with db.session() as s:
                JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})

        admit()

        def job() -> Job:
            with db.session() as s:
                j = s.get(Job, job_id)
                assert j is not None
                return j

        sup = Supervisor(settings, db, live, Sent())
        outcome: list[str] = []
        runner = threading.Thread(target=lambda: outcome.append(sup.run(job_id)))
        runner.start()
        try:
            wait_for(lambda: (job().step or 0) >= 3, 180, what="two ranks training")
            assert len(_processes_running(job_id)) == 3  # the child exec-ed into torchrun, 2 ranks
        finally:
            r = client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
            runner.join(180)
        assert r.status_code == 202, r.text
        assert outcome == ["cancelled"]
        stopped = job()
        assert 3 <= stopped.step < MAX_STEPS
        assert _processes_running(job_id) == []  # every rank is gone, none orphaned
        log = log_path(settings, team.team_id, job_id, 1).read_text()
        assert "2 processes under torchrun" in log and "teacher: replicate over 2" in log

        r = client.post(f"/v1/jobs/{job_id}/retry", headers=team.headers)
        assert r.status_code == 202, r.text
        admit()
        assert sup.run(job_id) == "succeeded"
    live.close()

    with db.session() as s:
        rows = s.execute(select(Metric).where(Metric.job_id == job_id)).scalars().all()
        ckpts = {
            c.step
            for c in s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)).scalars()
        }
    assert ckpts == {stopped.step, MAX_STEPS}
    loss = {m.step: m for m in rows if m.name == "loss"}
    assert sorted(loss) == list(range(1, MAX_STEPS + 1))  # one row per step: rank 0 only
    assert {m.attempt for s, m in loss.items() if s <= stopped.step} == {1}
    assert {m.attempt for s, m in loss.items() if s > stopped.step} == {2}
    for step, m in loss.items():
        assert m.value == pytest.approx(ref.metrics[step]["loss"], rel=RTOL), step
