"""A pruned student seen through the service (issue 14, "visible in the job"): the training
process's 'pruned' event, ``pruning`` in ``GET /v1/jobs/{id}``, ``sharp jobs show`` and
``watch``'s line, on real Postgres, Redis, uvicorn and a Celery worker.

The fast tests drive `worker.child.Reporter` (what the real child's callbacks call) and the
API in-process; the slow one runs a real pruned job end to end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from ops.follow import JobState, fmt_params, pruned_summary
from service import lifecycle
from service.db import Database
from service.jobs import JobService
from service.lifecycle import ACTIVE_STATUSES, JobStatus
from service.models import Job, utcnow
from service.repositories import EventRepository, JobRepository
from service.settings import Settings
from tests.conftest import ROOT, TeamKey, tiny_spec, wait_for
from tests.helpers import GPT2_TEACHER, spec_dict
from tests.test_cli_jobs import sharp
from tests.test_service_e2e import _parse_sse
from worker.child import Reporter
from worker.supervisor import Supervisor

pytestmark = pytest.mark.service

REPORT: dict[str, Any] = {  # the shape of `sharp_core.train.setup.PruneReport.event()`
    "kept_layers": [1, 3],
    "heads_per_layer": {"1": [0, 2], "3": [1, 3]},
    "ffn": 64,
    "hidden": 32,
    "params_before": 398_400,
    "params_after": 137_024,
    "scoring": "activation",
    "calibration_samples": 12,
    "calibration_s": 0.25,
    "note": "the training data has 12 blocks: calibrated on those, not the 256 asked for",
}


# -- helpers shared with tests/test_ui.py ----------------------------------------------------


def train_teacher(corpus: Path, out: Path) -> Path:
    """A tiny GPT-2 teacher (4 layers × 4 heads × 64) trained a few steps; its final
    checkpoint folder (save_pretrained layout with the tokenizer)."""
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import train

    spec = parse_spec(
        spec_dict(
            corpus,
            student={"init": "config", "config": dict(GPT2_TEACHER)},
            training={"max_steps": 6, "eval_every": 0, "checkpoint_every": 0},
        )
    )
    res = train(spec, out)
    assert res.checkpoint is not None
    return Path(res.checkpoint)


def pruned_spec(corpus: Path, teacher: Path, name: str = "pruned") -> dict[str, Any]:
    """A KD job whose student keeps 2 of the teacher's 4 layers and 2 of its 4 heads."""
    d = spec_dict(
        corpus,
        name=name,
        teacher={"model": str(teacher)},
        method={"name": "kd"},
        training={"max_steps": 4, "eval_every": 2, "checkpoint_every": 4},
    )
    d["student"] = {
        "init": "prune",
        "prune": {
            "layers": 2,
            "heads": 2,
            "ffn": 64,
            "calibration": {"samples": 16, "batch_size": 8},
        },
    }
    d.pop("tokenizer")  # a pruned student keeps the teacher's
    return d


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("pruned")


@pytest.fixture
def running(
    client: TestClient, team: TeamKey, corpus: Path, settings: Settings, db: Database, live
) -> Iterator[Callable[[], str]]:
    """Makes jobs claimed by a supervisor (attempt 1, running), as the worker would leave
    them; cancels what is still active afterwards, so the slow test's worker (and its
    reaper) find nothing of these to run."""
    made: list[str] = []

    def make() -> str:
        r = client.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team.headers)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        with db.session() as s:
            JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
        assert Supervisor(settings, db, live, lambda *_: None).claim(job_id) is not None
        made.append(job_id)
        return job_id

    yield make
    with db.session() as s:
        repo = JobRepository(s)
        for job_id in made:
            job = repo.get(job_id)
            if job is not None and job.status in ACTIVE_STATUSES:
                lifecycle.finish(repo, job_id, job.attempt, JobStatus.CANCELLED)


def _reporter(settings: Settings, db: Database, live, job_id: str, attempt: int) -> Reporter:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
    return Reporter(settings, db, live, job, attempt)


def _events(db: Database, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    with db.session() as s:
        return [(e.kind, e.data) for e in EventRepository(s).list_after(job_id, 0, 1000)]


def _make_pruned(db: Database, job_id: str) -> None:
    """Turn the stored spec into a pruned student's (what the API stores for one)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        spec = dict(job.spec)
        spec["student"] = {"init": "prune", "prune": {"layers": 2}}
        JobRepository(s).update_fenced(job_id, values={"spec": spec})


# -- no worker -------------------------------------------------------------------------------


def test_reporter_writes_the_event_after_earlier_metrics_and_fenced_by_attempt(
    running, settings, db, live
) -> None:
    job_id = running()
    rep = _reporter(settings, db, live, job_id, 1)
    rep.last_flush = float("inf")  # metrics stay buffered until the event flushes them
    rep.add_metrics(0, {"loss": 5.0})
    assert rep.buffer
    assert rep.add_event("pruned", REPORT)
    kinds = [(k, d.get("attempt")) for k, d in _events(db, job_id)]
    assert kinds[-2:] == [("metrics", 1), ("pruned", 1)], kinds  # the metrics came first
    assert _events(db, job_id)[-1][1] == {**REPORT, "attempt": 1}

    # another attempt owns the job now: nothing is written, and the process stops
    with db.session() as s:
        JobRepository(s).update_fenced(job_id, values={"attempt": 2})
    n = len(_events(db, job_id))
    assert rep.add_event("pruned", REPORT) is False and rep.fenced and rep.should_stop()
    assert len(_events(db, job_id)) == n


def test_pruning_in_the_job_only_for_a_pruned_student(
    client, team, running, settings, db, live
) -> None:
    job_id = running()
    rep = _reporter(settings, db, live, job_id, 1)
    assert rep.add_event("pruned", REPORT)
    rep.add_metrics(0, {"eval_ppl": 212.5, "eval_loss": 5.36, "prune_params_after": 137_024.0})
    rep.add_metrics(2, {"eval_ppl": 90.0})
    assert rep.flush()
    url = f"/v1/jobs/{job_id}"

    # A student that is not pruned: null, and the database is not asked (other jobs pay
    # nothing for the field)
    assert client.get(url, headers=team.headers).json()["pruning"] is None
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    with db.session() as s:
        job = s.get(Job, job_id)
        event.listen(db.engine, "before_cursor_execute", count)
        try:
            assert JobService(s, settings).pruning(job) is None
        finally:
            event.remove(db.engine, "before_cursor_execute", count)
    assert statements == []

    _make_pruned(db, job_id)
    got = client.get(url, headers=team.headers).json()["pruning"]
    assert got == {
        **REPORT,
        "kv_heads_per_layer": None,
        "attempt": 1,
        "eval_at_step_0": {"eval_ppl": 212.5, "eval_accuracy": None, "eval_macro_f1": None},
    }
    # the answers about one job carry it; a list does not
    assert client.post(f"{url}/cancel", headers=team.headers).json()["pruning"] == got
    listed = client.get("/v1/jobs", params={"limit": 100}, headers=team.headers).json()["data"]
    assert next(j for j in listed if j["id"] == job_id)["pruning"] is None

    # a later attempt's report is the one shown
    with db.session() as s:
        JobRepository(s).update_fenced(job_id, values={"attempt": 2})
    assert _reporter(settings, db, live, job_id, 2).add_event(
        "pruned", {**REPORT, "kept_layers": [0, 3], "heads_per_layer": {"0": [1], "3": [2]}}
    )
    got = client.get(url, headers=team.headers).json()["pruning"]
    assert got["kept_layers"] == [0, 3] and got["attempt"] == 2


def test_pruned_job_without_its_report_yet_has_no_pruning(client, team, running, db) -> None:
    job_id = running()
    _make_pruned(db, job_id)
    assert client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["pruning"] is None


def test_watch_state_and_summary_line() -> None:
    state = JobState()
    state.apply("pruned", {**REPORT, "attempt": 1, "seq": 4})
    assert state.pruned is not None and state.pruned["kept_layers"] == [1, 3]
    assert pruned_summary(state.pruned) == (
        "pruned: layers [1, 3], 2 heads per layer, 0.40M → 0.14M params"
    )
    uneven = {**REPORT, "heads_per_layer": {"1": [0], "3": [1, 3]}, "params_before": 1.3e9}
    assert pruned_summary(uneven) == (
        "pruned: layers [1, 3], 1-2 heads per layer, 1.30B → 0.14M params"
    )
    assert fmt_params(6_700_000_000) == "6.70B" and fmt_params(125_000_000) == "125.00M"


# -- a real pruned job -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # under pytest's base temp dir, like the corpus: a folder the deployment reads from
    return train_teacher(corpus, tmp_path_factory.mktemp("teacher"))


@pytest.mark.slow
def test_pruned_job_shows_what_it_kept_in_events_api_and_cli(
    live_server: str,
    worker: Path,
    team: TeamKey,
    corpus: Path,
    teacher_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    base, headers = live_server, team.headers
    r = httpx.post(
        f"{base}/v1/jobs", json={"spec": pruned_spec(corpus, teacher_dir)}, headers=headers
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["pruning"] is None  # not pruned yet
    # `sharp jobs watch` follows it from the start and prints a line when it is pruned
    watch = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "jobs", "watch", job_id],
        cwd=ROOT,
        env={
            **os.environ,
            "SHARP_URL": base,
            "SHARP_API_KEY": team.key,
            "SHARP_CONFIG": str(ROOT / "no-such-profile.toml"),
            "PYTHONPATH": str(ROOT),
            "COLUMNS": "200",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    request.addfinalizer(lambda: watch.poll() is None and watch.kill())

    def finished() -> dict | None:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, 300, interval=1.0, what="the pruned job to finish")
    assert isinstance(job, dict) and job["status"] == "succeeded", job.get("error")

    # -- the event log: one 'pruned' event, from attempt 1, before the first training step
    body = httpx.get(
        f"{base}/v1/jobs/{job_id}/events", params={"follow": "false"}, headers=headers
    ).text
    events = _events_of(body)
    pruned = [d for k, d in events if k == "pruned"]
    assert len(pruned) == 1, [k for k, _ in events]
    ev = pruned[0]
    assert len(ev["kept_layers"]) == 2 and set(ev["kept_layers"]) <= {0, 1, 2, 3}
    assert ev["kept_layers"] == sorted(ev["kept_layers"])
    assert list(ev["heads_per_layer"]) == [str(i) for i in ev["kept_layers"]]
    assert all(len(h) == 2 for h in ev["heads_per_layer"].values())
    assert ev["attempt"] == 1 and ev["calibration_samples"] > 0 and ev["calibration_s"] >= 0
    first_step = next(
        i
        for i, (k, d) in enumerate(events)
        if k == "metrics" and any(p["step"] >= 1 for p in d["metrics"])
    )
    assert events.index(("pruned", ev)) < first_step

    # -- GET /v1/jobs/{id}: the event's data and the step-0 evaluation
    p = job["pruning"]
    assert p is not None
    for k in ("kept_layers", "heads_per_layer", "params_before", "params_after", "scoring"):
        assert p[k] == ev[k], k
    assert p["params_before"] > p["params_after"] > 0
    assert p["eval_at_step_0"]["eval_ppl"] > 1 and p["eval_at_step_0"]["eval_accuracy"] is None
    m0 = httpx.get(
        f"{base}/v1/jobs/{job_id}/metrics",
        params={"after": -1, "limit": 1},
        headers=headers,
    ).json()["data"][0]
    assert m0["step"] == 0
    assert m0["values"]["eval_ppl"] == p["eval_at_step_0"]["eval_ppl"]
    assert m0["values"]["prune_params_after"] == p["params_after"]
    assert m0["values"]["prune_calibration_s"] >= 0 and m0["values"]["prune_s"] >= 0

    # -- sharp jobs show: the same numbers
    done = sharp("show", job_id, url=base, key=team.key)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "pruned from the teacher" in text, text
    layers = "[" + ", ".join(map(str, p["kept_layers"])) + "]"
    assert re.search(rf"kept layers\s+{re.escape(layers)}", text), text
    before, after = p["params_before"], p["params_after"]
    assert f"{before:,} → {after:,}" in text, text
    assert f"{after / before:.1%} of the teacher" in text, text
    assert f"{p['calibration_samples']} samples in {p['calibration_s']:.2f} s" in text, text
    assert f"ppl {p['eval_at_step_0']['eval_ppl']:.2f}" in text, text
    layer0 = str(p["kept_layers"][0])
    assert f"{layer0}: [{', '.join(map(str, p['heads_per_layer'][layer0]))}]" in text, text

    # -- sharp jobs watch: exit 0, and the 'pruned' line once
    _, watched = watch.communicate(timeout=120)
    assert watch.returncode == 0, watched
    line = pruned_summary(ev)
    assert line.startswith(f"pruned: layers {layers}, 2 heads per layer, ")
    assert f"{fmt_params(before)} → {fmt_params(after)} params" in line
    assert watched.count(line) == 1, watched


def _events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of an SSE body."""
    return [(kind, data) for _, kind, data in _parse_sse(text)]
