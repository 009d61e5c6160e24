"""Jobs on a real two-node Slurm cluster (`ops.slurm_cluster`: munged, slurmctld, slurmd n1/n2
on their own ports, slurmdbd on the MariaDB when one runs), through the service: the API, a
real Celery worker with ``SHARP_WORKER_BACKEND=slurm``, sbatch, ``srun torchrun`` with c10d
rendezvous, one gloo process per node.

What is proved, once each:
- a 2-node job trains, streams metrics over SSE, its student downloads, and its losses equal
  the 2-process single-host run (``python -m sharp_core train`` with gpus: 2) to 1e-5
  relative (fp32; the same world size and data split, so the same arithmetic);
- an outside ``scancel`` fails the job naming the Slurm job; Slurm's USR1 warning
  checkpoints and the job resumes as attempt 2; a dead node (its slurmd and its processes
  killed) → attempt 2 on the node that is left, from the checkpoint, no metric step twice; a
  worker killed mid-job → the next worker adopts the Slurm job (no second sbatch), and a
  POST cancel then stops it after a checkpoint;
- bad input: 422 naming spec.resources.nodes / .gpus / .queue; an sbatch Slurm refuses
  fails the job with Slurm's message.

Skipped only where Slurm is not installed (``.ci/run`` installs slurm-wlm and munge) or the
tests do not run as root (slurmd must).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
from sqlalchemy import select

from ops.launcher import start_worker
from ops.slurm_cluster import Cluster, installed
from service.db import Database
from service.live import LivePublisher
from service.models import Checkpoint, Job, JobEvent, Metric, utcnow
from service.repositories import JobRepository
from service.scheduler import register_worker
from service.settings import Settings, settings_env
from tests.conftest import ROOT, WORKER_ENV, TeamKey, stop_process, wait_for
from tests.helpers import GPT2_TINY, NO_DROPOUT, spec_dict, train_tiny_teacher
from tests.test_distributed import cli_train, read_jsonl
from tests.test_service_e2e import _collect_sse
from tests.test_service_worker import Sent
from worker.slurm import describe_partition, query
from worker.supervisor import Supervisor

pytestmark = [pytest.mark.service, pytest.mark.slow]

POOL = "slurm"
RTOL = 1e-5


def _skip_reason() -> str | None:
    problem = installed()
    if problem:
        return f"Slurm is {problem} (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        os.environ["SLURM_CONF"] = str(c.conf)  # this process's sbatch/squeue (the fixtures)
        yield c
    finally:
        c.stop()
        os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def slurm_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "worker_backend": "slurm",
            "worker_pool": POOL,
            "slurm_partition": "debug",
            "slurm_poll_s": 0.5,
            "slurm_signal_grace_s": 30,
            "heartbeat_timeout_s": 8.0,
            "reaper_interval_s": 2.0,
            "scheduler_interval_s": 1.0,
            "kill_grace_s": 15.0,
        }
    )


class SlurmWorker:
    """A real Celery worker of the Slurm pool, restartable (the adoption test kills it)."""

    def __init__(self, settings: Settings, cluster: Cluster, logdir: Path):
        self.settings, self.cluster, self.logdir = settings, cluster, logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.n = 0

    def start(self) -> Path:
        self.n += 1
        log = self.logdir / f"worker{self.n}.log"
        self.proc = start_worker(
            self.settings,
            log_file=log,
            cwd=ROOT,
            extra_env={**WORKER_ENV, **self.cluster.env, "GLOO_SOCKET_IFNAME": "lo"},
            hostname=f"slurm-{secrets.token_hex(3)}@%h",
        )
        wait_for(
            lambda: self.proc.poll() is not None or " ready." in log.read_text(errors="replace"),
            90,
            what="celery worker ready",
        )
        assert self.proc.poll() is None, log.read_text(errors="replace")[-4000:]
        self.log = log
        return log

    def kill(self) -> None:
        """SIGKILL: the worker is lost (its Slurm job is not its child and runs on)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, 9)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20)


@pytest.fixture(scope="module")
def slurm_worker(
    slurm_settings: Settings, cluster: Cluster, db: Database, tmp_path_factory
) -> Iterator[SlurmWorker]:
    w = SlurmWorker(slurm_settings, cluster, tmp_path_factory.mktemp("slurm-worker"))
    w.start()
    wait_for(lambda: _pool_registered(db), 30, what="the Slurm pool registered")
    yield w
    w.stop()


def _pool_registered(db: Database) -> bool:
    from service.models import Worker

    with db.session() as s:
        return any(w.backend == "slurm" for w in s.scalars(select(Worker)).all())


@pytest.fixture(scope="module")
def api(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def teacher(corpus: Path, tmp_path_factory) -> Path:
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher"))


def _spec(corpus: Path, teacher: Path, max_steps: int, **resources: object) -> dict:
    d = spec_dict(
        corpus,
        teacher={"model": str(teacher)},
        student={"init": "config", "config": {**GPT2_TINY, **NO_DROPOUT}},
        method={"name": "kd"},
        training={"max_steps": max_steps, "eval_every": 0, "checkpoint_every": 2},
        resources={"queue": POOL, "nodes": 2, "gpus": 1, **resources},
    )
    d.pop("tokenizer")  # the teacher's
    return d


def _job(db: Database, job_id: str) -> Job:
    with db.session() as s:
        j = s.get(Job, job_id)
        assert j is not None
        return j


def _submit(api: httpx.Client, team: TeamKey, spec: dict) -> str:
    r = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _wait_done(db: Database, job_id: str, worker: SlurmWorker, timeout: float = 240) -> Job:
    def done() -> bool:
        return _job(db, job_id).status in ("succeeded", "failed", "cancelled")

    try:
        wait_for(done, timeout, interval=0.5, what=f"job {job_id} to end")
    except TimeoutError:
        raise AssertionError(worker.log.read_text(errors="replace")[-6000:]) from None
    return _job(db, job_id)


def _losses(db: Database, job_id: str) -> dict[int, Metric]:
    """The training loss by step (steps from 1)."""
    with db.session() as s:
        rows = s.execute(select(Metric).where(Metric.job_id == job_id)).scalars().all()
    return {m.step: m for m in rows if m.name == "loss" and m.step > 0}


def _slurm_jobs_named(job_id: str) -> list[str]:
    """Slurm job ids whose name carries `job_id` (scontrol keeps finished ones MinJobAge)."""
    r = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=False
    )
    return [
        line.split()[0].split("=")[1]
        for line in r.stdout.splitlines()
        if f"JobName=sharp-{job_id}-" in line
    ]


@pytest.fixture
def team(make_team) -> TeamKey:
    return make_team("slurm")


# --------------------------------------------------------------------------- the 2-node job
def test_two_node_job_streams_downloads_and_equals_two_process_run(
    api: httpx.Client,
    live_server: str,
    db: Database,
    team: TeamKey,
    corpus: Path,
    teacher: Path,
    slurm_worker: SlurmWorker,
    tmp_path: Path,
) -> None:
    steps = 6
    spec = _spec(corpus, teacher, steps)
    job_id = _submit(api, team, spec)
    events: list = []
    listener = threading.Thread(target=_collect_sse, args=(live_server, team, job_id, events))
    listener.start()

    # the reference meanwhile: the same spec on one host, 2 gloo processes (torchrun)
    ref_spec = {**spec, "resources": {"gpus": 2}}
    (tmp_path / "spec.json").write_text(json.dumps(ref_spec))
    r = cli_train(tmp_path / "spec.json", tmp_path / "ref", tmp_path / "ref.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    ref = read_jsonl(tmp_path / "ref.jsonl")

    job = _wait_done(db, job_id, slurm_worker)
    listener.join(60)
    assert job.status == "succeeded", job.error
    assert job.attempt == 1 and job.gpus == 2  # quotas count nodes × gpus
    assert job.backend_job_id and _slurm_jobs_named(job_id) == [job.backend_job_id]

    # two nodes, one process each, rendezvous on the first node's NodeAddr
    log = (Path(slurm_worker.settings.artifact_root) / team.team_id / job_id / "logs").glob(
        "attempt_1.log"
    )
    text = next(log).read_text()
    assert "on n[1-2], head 127.0.0.1:" in text

    # SSE: the Slurm job id, metrics for every step, then the terminal status
    assert not listener.is_alive()
    kinds = [k for _, k, _ in events]
    assert "backend" in kinds
    backend = next(d for _, k, d in events if k == "backend")
    assert backend["backend_job_id"] == job.backend_job_id
    streamed = {m["step"] for _, k, d in events if k == "metrics" for m in d["metrics"]}
    assert streamed - {0} == set(range(1, steps + 1))  # (step 0: the metrics before training)
    assert events[-1][2]["status"] == "succeeded"

    # the same losses as the single-host 2-process run
    loss = _losses(db, job_id)
    assert sorted(loss) == list(range(1, steps + 1))
    worst = max(abs(loss[s].value - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in loss)
    print(f"2-node vs 2-process single host: worst relative loss difference {worst:.2e}")
    assert worst <= RTOL

    # the student downloads
    got = api.get(f"/v1/jobs/{job_id}/checkpoints/{steps}/archive", headers=team.headers)
    assert got.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        assert f"step_{steps:06d}/model.safetensors" in tar.getnames()


# --------------------------------------------------------------------------- faults
def _block_both_nodes() -> str:
    """Someone else's job on both nodes: Slurm holds ours PENDING (reason Resources)."""
    return subprocess.run(
        ["sbatch", "--parsable", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _shown_held(api: httpx.Client, team: TeamKey, job_id: str) -> dict | None:
    shown = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    held = shown["status"] == "queued" and str(shown["queue_reason"]).startswith("slurm: ")
    return shown if held else None  # (before the claim: the service's own queue's reason)


def test_slurm_pending_job_is_queued_with_slurms_reason_then_running_then_succeeds(
    api: httpx.Client, db: Database, team: TeamKey, corpus: Path, teacher: Path, slurm_worker
) -> None:
    blocker = _block_both_nodes()
    seen: list[tuple[str, str | None]] = []
    try:
        job_id = _submit(api, team, _spec(corpus, teacher, 4))
        held = cast(
            dict, wait_for(lambda: _shown_held(api, team, job_id), 60, what="queued, a reason")
        )
        assert held["queue_reason"] not in ("slurm: None", "slurm: "), held
        assert held["queue_position"] == 0 and held["attempt"] == 1
        # inside, the claim stands: the worker slot, the attempt and the pool's 2 GPUs are its
        row = _job(db, job_id)
        assert row.status == "running" and row.gpus == 2 and row.backend_job_id
        assert query(row.backend_job_id)[0] == "PENDING"
        listed = api.get("/v1/jobs?status=queued", headers=team.headers).json()["data"]
        assert job_id in {j["id"] for j in listed}
        listed = api.get("/v1/jobs?status=running", headers=team.headers).json()["data"]
        assert job_id not in {j["id"] for j in listed}
    finally:
        subprocess.run(["scancel", blocker], check=True)

    def shown() -> bool:
        j = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        seen.append((j["status"], j["queue_reason"]))
        return j["status"] in ("succeeded", "failed", "cancelled")

    wait_for(shown, 240, interval=0.2, what=f"job {job_id} to end")
    assert seen[-1] == ("succeeded", None), seen
    statuses = [st for st, _ in seen]
    # queued (Slurm's reason) → running (no reason) → succeeded, never back
    assert "running" in statuses, statuses
    first_running = statuses.index("running")
    assert set(statuses[:first_running]) <= {"queued"}, statuses
    assert set(statuses[first_running:-1]) == {"running"}, statuses
    assert all(reason is None for st, reason in seen if st == "running"), seen
    with db.session() as s:
        states = [
            e.data.get("state")
            for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
            if e.kind == "backend" and "state" in e.data
        ]
    assert states[-1] == "running" and set(states[:-1]) == {"pending"}, states


def test_cancel_of_a_slurm_pending_job_scancels_it_and_ends_cancelled(
    api: httpx.Client, db: Database, team: TeamKey, corpus: Path, teacher: Path, slurm_worker
) -> None:
    blocker = _block_both_nodes()
    try:
        job_id = _submit(api, team, _spec(corpus, teacher, 400))
        wait_for(lambda: _shown_held(api, team, job_id), 60, what="queued with a reason")
        r = api.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
        assert r.status_code in (200, 202), r.text
        job = _wait_done(db, job_id, slurm_worker, timeout=60)
        # ended in Slurm's queue, before any training: nothing to checkpoint, nothing left
        assert job.status == "cancelled" and job.error is None and job.step == 0, job.error
        assert job.backend_job_id and query(job.backend_job_id)[0] == "CANCELLED"
    finally:
        subprocess.run(["scancel", blocker], check=True)
    assert api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["status"] == "cancelled"


def test_outside_scancel_fails_the_job_naming_it(
    api: httpx.Client, db: Database, team: TeamKey, corpus: Path, teacher: Path, slurm_worker
) -> None:
    job_id = _submit(api, team, _spec(corpus, teacher, 400))
    wait_for(lambda: _job(db, job_id).step >= 2, 180, what="training")
    slurm_id = _job(db, job_id).backend_job_id
    assert slurm_id
    subprocess.run(["scancel", slurm_id], check=True)
    job = _wait_done(db, job_id, slurm_worker)
    assert job.status == "failed"
    assert job.error and job.error["code"] == "slurm_cancelled"
    assert f"Slurm job {slurm_id} was cancelled outside the service" in job.error["message"]


def test_usr1_warning_checkpoints_and_resumes_as_attempt_2(
    api: httpx.Client, db: Database, team: TeamKey, corpus: Path, teacher: Path, slurm_worker
) -> None:
    steps = 12
    job_id = _submit(api, team, _spec(corpus, teacher, steps))
    wait_for(lambda: _job(db, job_id).step >= 3, 180, what="training")
    first = _job(db, job_id).backend_job_id
    assert first
    # what Slurm does before a time limit or a preemption (--signal=B:USR1@grace)
    subprocess.run(["scancel", "--batch", "--signal=USR1", first], check=True)
    job = _wait_done(db, job_id, slurm_worker)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2 and job.backend_job_id != first
    with db.session() as s:
        evs = (
            s.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
            .scalars()
            .all()
        )
        ckpts = {
            c.step
            for c in s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)).scalars()
        }
    requeued = [e.data for e in evs if e.kind == "status" and e.data.get("status") == "queued"]
    assert [d.get("reason") for d in requeued] == [None, "preempted"]  # submitted, then USR1
    loss = _losses(db, job_id)
    assert sorted(loss) == list(range(1, steps + 1))
    stopped_at = max(s for s, m in loss.items() if m.attempt == 1)
    written = {e.data["step"] for e in evs if e.kind == "checkpoint"}
    assert stopped_at in written  # checkpointed at the step it stopped, before it exited
    assert steps in ckpts


def test_dead_node_resumes_from_checkpoint_on_the_node_left(
    api: httpx.Client,
    db: Database,
    team: TeamKey,
    corpus: Path,
    teacher: Path,
    slurm_worker: SlurmWorker,
    cluster: Cluster,
) -> None:
    steps = 16
    job_id = _submit(api, team, _spec(corpus, teacher, steps))
    wait_for(lambda: _job(db, job_id).step >= 5, 180, what="training past a checkpoint")
    first = _job(db, job_id).backend_job_id
    cluster.kill_node("n2")
    try:
        job = _wait_done(db, job_id, slurm_worker, timeout=300)
    finally:
        cluster.restart_node("n2")
    assert job.status == "succeeded", job.error
    assert job.attempt == 2 and job.backend_job_id != first
    loss = _losses(db, job_id)
    assert sorted(loss) == list(range(1, steps + 1))  # every step once
    assert {m.attempt for m in loss.values()} == {1, 2}
    log = (
        Path(slurm_worker.settings.artifact_root) / team.team_id / job_id / "logs" / "attempt_2.log"
    ).read_text()
    assert "on n1, head" in log  # Slurm gave the one node left (--nodes 1-2)


def test_lost_worker_job_is_adopted_then_cancelled_after_a_checkpoint(
    api: httpx.Client, db: Database, team: TeamKey, corpus: Path, teacher: Path, slurm_worker
) -> None:
    job_id = _submit(api, team, _spec(corpus, teacher, 400))
    wait_for(lambda: _job(db, job_id).step >= 2, 180, what="training")
    before = _job(db, job_id)
    slurm_worker.kill()
    slurm_worker.start()
    wait_for(
        lambda: (_job(db, job_id).worker or "") not in ("", before.worker),
        60,
        what="adoption by the new worker",
    )
    wait_for(lambda: _job(db, job_id).step >= before.step + 2, 120, what="training on")
    adopted = _job(db, job_id)
    assert adopted.attempt == 1 and adopted.backend_job_id == before.backend_job_id
    assert _slurm_jobs_named(job_id) == [before.backend_job_id]  # never submitted twice

    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
    assert r.status_code == 202, r.text
    job = _wait_done(db, job_id, slurm_worker)
    assert job.status == "cancelled"
    with db.session() as s:
        ckpts = {
            c.step
            for c in s.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)).scalars()
        }
    assert job.step in ckpts  # checkpoint, then stop


# --------------------------------------------------------------------------- bad input
def test_what_the_pool_cannot_run_is_a_422_naming_the_field(
    api: httpx.Client,
    db: Database,
    team: TeamKey,
    corpus: Path,
    teacher: Path,
    slurm_settings: Settings,
    slurm_worker,
) -> None:
    def refused(**resources: object) -> tuple[int, str | None]:
        spec = _spec(corpus, teacher, 4, **resources)
        r = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        return r.status_code, r.json().get("error", {}).get("param")

    assert refused(queue="default") == (422, "spec.resources.nodes")  # no multi-node backend
    assert refused(nodes=1, gpus=4) == (422, "spec.resources.gpus")  # the nodes have 2 CPUs
    assert refused(nodes=4) == (422, "spec.resources.nodes")  # the partition has 2 nodes
    # a pool whose worker submits to a partition Slurm does not have
    ghost = slurm_settings.model_copy(update={"slurm_partition": "nosuch", "worker_pool": "ghost"})
    offer = describe_partition(ghost)
    assert offer["backend_info"]["partition_exists"] is False
    with db.session() as s:
        register_worker(
            s, name=f"ghost-{secrets.token_hex(2)}", pool="ghost", hostname="h", **offer
        )
    assert refused(queue="ghost") == (422, "spec.resources.queue")


def test_sbatch_refusal_fails_the_job_with_slurms_message(
    api: httpx.Client, db: Database, team: TeamKey, corpus: Path, teacher: Path, slurm_settings
) -> None:
    # a single-node job on a pool no worker serves yet is accepted and waits...
    job_id = _submit(api, team, _spec(corpus, teacher, 4, queue="refusing", nodes=1))
    with db.session() as s:
        JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
    # ...and a Slurm worker of that pool whose sbatch Slurm refuses fails it, with the reason
    refusing = slurm_settings.model_copy(
        update={"worker_pool": "refusing", "slurm_sbatch_args": ["--constraint=nosuchfeature"]}
    )
    live = LivePublisher(refusing)
    try:
        assert Supervisor(refusing, db, live, Sent()).run(job_id) == "failed"
    finally:
        live.close()
    job = _job(db, job_id)
    assert job.error and job.error["code"] == "backend_refused"
    assert "sbatch: error" in job.error["message"] and "feature" in job.error["message"].lower()


def test_admin_workers_list_shows_the_slurm_pool_with_its_nodes(
    settings: Settings, slurm_worker: SlurmWorker
) -> None:
    env = {**os.environ, **settings_env(settings), "COLUMNS": "300"}
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "admin", "workers", "list"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if f" {POOL} " in line)
    assert "slurm: debug, 2 nodes × CPU" in row
    assert re.search(r"n1 (idle|mix|alloc)", row) and re.search(r"n2 (idle|mix|alloc)", row)
