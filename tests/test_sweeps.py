"""Sweeps in the service (issue 16, item 1): real Postgres, the API in-process, and, for the
end-to-end test, a real Celery worker running every cell.

Most tests put their cells in a pool no worker serves (``resources.queue: nowhere``), so the
cells wait queued and the test moves each job through the job lifecycle's own functions
(admit, claim, finish), writing the metrics a training process would. That exercises the
real trigger (the lifecycle's terminal transition advances the sweep after its commit) with
values the test controls, so the report can be checked number by number. The last test runs
a small sweep to completion on the worker.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.db import Database
from service.lifecycle import JobStatus, admit, claim, finish
from service.models import Job, utcnow
from service.repositories import JobRepository, MetricRepository
from service.sweeps import advance_one
from sharp_core.study.compare import compare
from tests.conftest import TeamKey, tiny_spec, wait_for

TEACHER = {
    "init": "config",
    "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64},
}
PPL = {"name": "eval_ppl", "lower_is_better": True, "relative": True}

pytestmark = pytest.mark.service


def base(corpus: Path, *, queue: str = "nowhere", max_steps: int = 4) -> dict[str, Any]:
    spec = tiny_spec(corpus, max_steps=max_steps, name="cell", eval_every=2, checkpoint_every=4)
    spec["dataset"]["max_eval_blocks"] = 8  # the evaluations are not what is tested
    spec["teacher"] = TEACHER
    spec["resources"] = {"queue": queue}
    return spec


def two_methods(corpus: Path, **kw: Any) -> dict[str, Any]:
    """sft (two lrs) and kd (one configuration), seeds 0 and 1, final on seeds 10 and 11."""
    return {
        "name": "sft-vs-kd",
        "base": base(corpus, **kw),
        "axes": {"training.seed": [0, 1]},
        "tune": {
            "trials": 2,
            "search": "grid",
            "space": {"sft": {"training.lr": [1e-3, 2e-3]}, "kd": {}},
        },
        "reference": "sft",
        "final": {"seeds": [10, 11]},
    }


def post(client: TestClient, team: TeamKey, body: dict[str, Any]) -> Any:
    return client.post("/v1/sweeps", json=body, headers=team.headers)


def get(client: TestClient, team: TeamKey, sweep_id: str, what: str = "") -> dict[str, Any]:
    r = client.get(f"/v1/sweeps/{sweep_id}{what}", headers=team.headers)
    assert r.status_code == 200, r.text
    return r.json()


def counts_in_db(db: Database, team_id: str) -> tuple[int, int, int]:
    with db.session() as s:
        row = s.execute(
            text(
                "SELECT (SELECT count(*) FROM jobs WHERE team_id = :t),"
                " (SELECT count(*) FROM sweeps WHERE team_id = :t),"
                " (SELECT count(*) FROM sweep_cells c JOIN sweeps w ON w.id = c.sweep_id"
                "  WHERE w.team_id = :t)"
            ),
            {"t": team_id},
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


def run_job(
    db: Database, job_id: str, *, loss: float | None, status: JobStatus = JobStatus.SUCCEEDED
) -> None:
    """What a worker would do to a queued job, through the lifecycle: admit, claim, write
    eval metrics (the last one is the end-of-training evaluation), finish."""
    with db.session() as s:
        repo = JobRepository(s)
        assert admit(repo, job_id, utcnow())
        job = claim(repo, job_id, "test-worker")
        assert job is not None
        if loss is not None:
            MetricRepository(s).insert_ignore(
                [
                    {
                        "job_id": job_id,
                        "step": 2,
                        "name": "eval_loss",
                        "value": loss + 1.0,
                        "attempt": job.attempt,
                    },
                    {
                        "job_id": job_id,
                        "step": 4,
                        "name": "eval_loss",
                        "value": loss,
                        "attempt": job.attempt,
                    },
                ]
            )
        error = None
        if status == JobStatus.FAILED:
            error = {"code": "data_error", "message": "boom", "param": None}
        assert finish(repo, job_id, job.attempt, status, error=error)


def sweep_deliveries(db: Database, sweep_id: str) -> list[str]:
    with db.session() as s:
        rows = s.execute(
            text(
                "SELECT body FROM webhook_deliveries WHERE event_type = 'sweep.finished'"
                " AND body::jsonb -> 'data' ->> 'id' = :id"
            ),
            {"id": sweep_id},
        ).all()
    return [r[0] for r in rows]


@pytest.fixture()
def team(make_team: Callable[[str], TeamKey]) -> TeamKey:
    return make_team("sweeps")


def register_hook(client: TestClient, team: TeamKey) -> None:
    r = client.post(
        "/v1/webhooks",
        json={"url": "https://93.184.216.34/hook", "events": ["sweep.finished"]},
        headers=team.headers,
    )
    assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- bad input
def test_an_unknown_axis_path_is_a_422_naming_it(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    r = post(client, team, {"base": base(corpus), "axes": {"training.nope": [1, 2]}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "sweep.axes.training.nope"
    assert "'training.nope' is not a field of the job spec" in err["message"]
    r = post(client, team, {**two_methods(corpus), "reference": "minilm"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "sweep.reference"
    assert counts_in_db(db, team.team_id) == (0, 0, 0)


def test_more_cells_than_the_limit_is_a_422_and_creates_nothing(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    r = post(client, team, {"base": base(corpus), "axes": {"training.seed": list(range(501))}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("too_many_cells", "sweep")
    assert "501 tune cells" in err["message"] and "500" in err["message"]
    # the final stage counts too: 2 methods × 200 seeds + 2 methods × 51 final seeds = 502
    r = post(
        client,
        team,
        {
            "base": base(corpus),
            "axes": {"training.seed": list(range(200))},
            "tune": {"trials": 1, "space": {"sft": {}, "kd": {}}},
            "final": {"seeds": list(range(1000, 1051))},
        },
    )
    assert r.status_code == 422, r.text
    assert "400 tune cells and 102 final cells" in r.json()["error"]["message"]
    assert counts_in_db(db, team.team_id) == (0, 0, 0)


def test_invalid_cells_are_listed_and_nothing_is_created(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    ok = post(client, team, {"base": base(corpus), "axes": {"training.seed": [0]}})
    assert ok.status_code == 201, ok.text
    before = counts_in_db(db, team.team_id)
    assert before == (1, 1, 1)

    body = {"base": base(corpus), "axes": {"training.lr": [0.001, -1], "training.seed": [0, 1]}}
    r = post(client, team, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_sweep_cells" and err["invalid_cells"] == 2
    assert err["param"] == "spec.training.lr"
    assert [(c["cell"], c["seed"], c["overrides"]) for c in err["cells"]] == [
        (2, 0, {"training.lr": -1}),
        (3, 1, {"training.lr": -1}),
    ]
    assert all(c["param"] == "spec.training.lr" and c["config"] for c in err["cells"])
    assert counts_in_db(db, team.team_id) == before

    # the service's own checks apply to each cell too (a file outside the dataset roots)
    body = {
        "base": base(corpus),
        "axes": {"dataset.files": [[str(corpus)], ["/etc/passwd"]]},
    }
    r = post(client, team, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["invalid_cells"] == 1
    assert (err["cells"][0]["cell"], err["cells"][0]["code"]) == (1, "file_not_allowed")
    assert err["cells"][0]["param"] == "spec.dataset.files.0"
    assert counts_in_db(db, team.team_id) == before


def test_each_cell_is_planned_a_cell_that_cannot_fit_is_named_and_levers_are_applied(
    client: TestClient, make_team: Callable[[str], TeamKey], corpus: Path, db: Database
) -> None:
    """The plan runs for every cell at submission, as for a job: on a declared 8×H100 pool,
    an 8B → 3B cell at batch 256 cannot fit (422 naming the cell and the field, nothing
    created); at batch 8 it fits only with the student sharded, which the cell's job runs
    with and the sweep reports."""
    from service import scheduler
    from tests.test_plan import big_spec

    team = make_team("sweep-plans")
    with db.session() as s:
        scheduler.register_worker(
            s, name="w-h100-sweeps", pool="h100-sweeps", gpus=8, hostname="h", gpu_type="h100"
        )
    spec = {
        **big_spec(),
        "dataset": {"files": [str(corpus)]},
        "resources": {"gpus": 8, "queue": "h100-sweeps"},
    }
    r = post(client, team, {"base": spec, "axes": {"training.batch_size": [8, 256]}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_sweep_cells" and err["invalid_cells"] == 1
    assert err["param"] == "spec.training.batch_size"
    [bad] = err["cells"]
    assert (bad["cell"], bad["overrides"]) == (1, {"training.batch_size": 256})
    assert "the h100-sweeps pool has 80 (92% usable: 74); batch" in bad["message"]
    assert "First: cell 1 " in err["message"]
    assert counts_in_db(db, team.team_id) == (0, 0, 0)

    r = post(client, team, {"base": spec, "axes": {"training.batch_size": [8]}})
    assert r.status_code == 201, r.text
    [cell] = r.json()["cells"]
    assert [lv["field"] for lv in cell["levers"]] == ["resources.student_parallel"]
    job = client.get(f"/v1/jobs/{cell['job_id']}", headers=team.headers).json()
    assert job["spec"]["resources"]["student_parallel"] == "fsdp"
    assert job["plan"]["strategy"]["student_parallel"] == "fsdp"
    assert job["plan"]["levers"] == cell["levers"]


def test_the_queued_jobs_quota_refuses_a_sweep_that_does_not_fit(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    with db.session() as s:
        s.execute(text("UPDATE teams SET max_queued_jobs = 3 WHERE id = :t"), {"t": team.team_id})
    r = post(client, team, {"base": base(corpus), "axes": {"training.seed": [0, 1, 2, 3]}})
    assert r.status_code == 429, r.text
    assert "this sweep queues 4" in r.json()["error"]["message"]
    assert counts_in_db(db, team.team_id) == (0, 0, 0)
    r = post(client, team, {"base": base(corpus), "axes": {"training.seed": [0, 1, 2]}})
    assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- life of a sweep
def test_report_final_stage_failed_cell_and_webhook(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    register_hook(client, team)
    r = post(client, team, two_methods(corpus))
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["id"].startswith("swp_") and r.headers["Location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["status"] == "running" and sweep["counts"] == {"tune": {"queued": 6}}
    cells = sweep["cells"]
    assert [(c["index"], c["stage"], c["method"], c["seed"]) for c in cells] == [
        (0, "tune", "sft", 0),
        (1, "tune", "sft", 1),
        (2, "tune", "sft", 0),
        (3, "tune", "sft", 1),
        (4, "tune", "kd", 0),
        (5, "tune", "kd", 1),
    ]
    assert cells[0]["overrides"] == {"method.name": "sft", "training.lr": 0.001}
    assert cells[2]["overrides"] == {"method.name": "sft", "training.lr": 0.002}
    for c in cells:  # ordinary jobs, with the cell's spec
        job = client.get(f"/v1/jobs/{c['job_id']}", headers=team.headers).json()
        assert job["status"] == "queued" and job["spec"]["training"]["seed"] == c["seed"]
        assert job["spec"]["method"]["name"] == c["method"]
        assert job["name"] == f"sft-vs-kd/{c['config']}/seed{c['seed']}"

    # eval_loss per cell; sft lr=2e-3 is best for sft; kd's seed-1 cell fails
    losses = {0: 3.0, 1: 3.2, 2: 2.5, 3: 2.7, 4: 2.9, 5: None}
    for c in cells[:-1]:
        run_job(db, c["job_id"], loss=losses[c["index"]])
        assert get(client, team, sweep["id"])["final_started_at"] is None
    run_job(db, cells[5]["job_id"], loss=None, status=JobStatus.FAILED)

    # the last tune cell's end created the final stage (the lifecycle's hook, after commit)
    with db.session() as s:
        n_final = s.execute(
            text("SELECT count(*) FROM sweep_cells WHERE sweep_id = :s AND stage = 'final'"),
            {"s": sweep["id"]},
        ).scalar_one()
    assert n_final == 4
    got = get(client, team, sweep["id"])
    sft_best, kd_best = cells[2]["config"], cells[4]["config"]
    assert got["chosen"] == {"sft": sft_best, "kd": kd_best}
    final = [c for c in got["cells"] if c["stage"] == "final"]
    assert [(c["method"], c["config"], c["seed"], c["status"]) for c in final] == [
        ("sft", sft_best, 10, "queued"),
        ("sft", sft_best, 11, "queued"),
        ("kd", kd_best, 10, "queued"),
        ("kd", kd_best, 11, "queued"),
    ]
    assert final[0]["overrides"] == {"method.name": "sft", "training.lr": 0.002}
    assert [c["index"] for c in final] == [6, 7, 8, 9]
    assert got["cells"][0]["value"] == pytest.approx(math.exp(3.0))
    assert got["cells"][5]["status"] == "failed" and got["cells"][5]["value"] is None
    assert got["cells"][5]["error"]["code"] == "data_error"

    # the report's tune section is compare() over the jobs' last eval values
    report = get(client, team, sweep["id"], "/report")
    assert report["selection_metric"] == "eval_ppl" and report["final_metric"] == "eval_ppl"
    assert "names no dataset.eval.val" in report["selection_metric_note"]
    tune_in = [
        {
            "method": c["method"],
            "config": c["config"],
            "seed": c["seed"],
            "status": "failed" if losses[c["index"]] is None else "completed",
            "value": None if losses[c["index"]] is None else math.exp(losses[c["index"]]),
            "overrides": c["overrides"],
        }
        for c in cells
    ]
    expected = compare(tune_in, metric=PPL, reference="sft")
    assert report["tune"]["best"] == expected["best"] == {"sft": sft_best, "kd": kd_best}
    kd = report["tune"]["methods"]["kd"]
    assert (kd["n"], kd["cells"], kd["failed"]) == (1, 2, 1)
    assert kd["mean"] == pytest.approx(math.exp(2.9))
    assert kd["delta"]["per_seed"] == pytest.approx(
        {"0": 100 * (math.exp(2.9) / math.exp(2.5) - 1)}
    )
    sft = report["tune"]["methods"]["sft"]
    assert sft["mean"] == pytest.approx(expected["methods"]["sft"]["mean"])
    assert sft["std"] == pytest.approx(expected["methods"]["sft"]["std"])
    assert sft["configs_tried"] == 2
    assert report["tune"]["configs"][kd_best]["by_status"] == {"completed": 1, "failed": 1}
    assert [(f["index"], f["status"], f["error"]["code"]) for f in report["failed_cells"]] == [
        (5, "failed", "data_error")
    ]
    assert report["counts"] == {
        "tune": {"succeeded": 5, "failed": 1},
        "final": {"queued": 4},
    }
    assert report["final"]["best"] == {"sft": sft_best, "kd": kd_best}
    assert report["final"]["methods"]["sft"]["n"] == 0
    assert get(client, team, sweep["id"])["status"] == "running"
    assert sweep_deliveries(db, sweep["id"]) == []

    # the final stage ends: the sweep completes, sweep.finished is written once
    final_losses = {6: 2.4, 7: 2.6, 8: 2.8, 9: 3.1}
    for c in final:
        run_job(db, c["job_id"], loss=final_losses[c["index"]])
    for _ in range(3):  # GETs advance again: still one event
        done = get(client, team, sweep["id"])
    assert done["status"] == "completed" and done["finished_at"] is not None
    bodies = sweep_deliveries(db, sweep["id"])
    assert len(bodies) == 1
    assert f'"report_url":"/v1/sweeps/{sweep["id"]}/report"' in bodies[0]
    assert '"status":"completed"' in bodies[0]
    report = get(client, team, sweep["id"], "/report")
    final_in = [
        {
            "method": c["method"],
            "config": c["config"],
            "seed": c["seed"],
            "status": "completed",
            "value": math.exp(final_losses[c["index"]]),
        }
        for c in final
    ]
    want = compare(final_in, metric=PPL, reference="sft", best={"sft": sft_best, "kd": kd_best})
    d = report["final"]["methods"]["kd"]["delta"]
    assert d["per_seed"] == pytest.approx(want["methods"]["kd"]["delta"]["per_seed"])
    assert d["ci"] == pytest.approx(want["methods"]["kd"]["delta"]["ci"])
    assert d["p_holm"] == pytest.approx(want["methods"]["kd"]["delta"]["p"])
    assert report["final"]["methods"]["sft"]["mean"] == pytest.approx(
        (math.exp(2.4) + math.exp(2.6)) / 2
    )

    assert report["tune"]["gap_closed"] is None  # no downstream scores: no column

    # downstream scores on the final cells and their teacher's (as the worker writes them): the
    # report gives each method's gap closed between the baseline student (sft) and the teacher
    accs = {6: 0.40, 7: 0.50, 8: 0.60, 9: 0.70}
    with db.session() as s:
        for c in final:
            job = s.get(Job, c["job_id"])
            assert job is not None
            job.latest_metrics = {**(job.latest_metrics or {}), "harness/t/acc": accs[c["index"]]}
            JobRepository(s).add_event(
                c["job_id"],
                10_000,
                "teacher_scores",
                {"reused": True, "scores": {"harness/t/acc": 0.8}},
            )
    gaps = get(client, team, sweep["id"], "/report")["final"]["gap_closed"]
    assert gaps["baseline"] == "sft" and gaps["baseline_config"] == sft_best
    assert gaps["baseline_scores"]["harness/t/acc"] == pytest.approx(0.45)
    assert list(gaps["methods"]) == ["kd"]
    assert gaps["methods"]["kd"]["gap_closed"]["harness/t/acc"] == pytest.approx(
        (0.65 - 0.45) / (0.8 - 0.45)
    )

    # curves: one series per cell, from the metrics table
    curves = get(client, team, sweep["id"], "/curves")
    assert curves["metric"] == "eval_loss" and len(curves["cells"]) == 10
    assert curves["cells"][0]["points"] == [[2, 4.0], [4, 3.0]]
    assert curves["cells"][5]["points"] == [] and curves["cells"][5]["status"] == "failed"

    # listed, newest first, with counts
    listed = client.get("/v1/sweeps", headers=team.headers).json()
    assert [s["id"] for s in listed["data"]] == [sweep["id"]]
    assert listed["data"][0]["cells"] is None
    assert listed["data"][0]["counts"]["final"] == {"succeeded": 4}


def test_cancel_cancels_the_cells_and_the_final_stage_never_starts(
    client: TestClient, team: TeamKey, corpus: Path, db: Database, settings: Any
) -> None:
    register_hook(client, team)
    sweep = post(client, team, two_methods(corpus)).json()
    cells = sweep["cells"]
    run_job(db, cells[0]["job_id"], loss=3.0)
    with db.session() as s:  # one cell is running
        repo = JobRepository(s)
        assert admit(repo, cells[1]["job_id"], utcnow())
        running = claim(repo, cells[1]["job_id"], "test-worker")
        assert running is not None

    r = client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=team.headers)
    assert r.status_code == 202, r.text
    got = r.json()
    assert got["status"] == "cancelling" and got["cancel_requested_at"] is not None
    assert [c["status"] for c in got["cells"]] == [
        "succeeded",
        "cancelling",
        "cancelled",
        "cancelled",
        "cancelled",
        "cancelled",
    ]
    assert sweep_deliveries(db, sweep["id"]) == []
    # idempotent
    again = client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=team.headers).json()
    assert again["status"] == "cancelling"

    # the running cell's worker stops it: the sweep ends cancelled, with no final stage
    with db.session() as s:
        assert finish(JobRepository(s), cells[1]["job_id"], running.attempt, JobStatus.CANCELLED)
    maker = Database(settings).sessionmaker
    assert advance_one(maker, sweep["id"]) is False  # the hook already finished it
    done = get(client, team, sweep["id"])
    assert done["status"] == "cancelled" and done["final_started_at"] is None
    assert done["chosen"] is None and len(done["cells"]) == 6
    assert done["counts"] == {"tune": {"succeeded": 1, "cancelled": 5}}
    assert len(sweep_deliveries(db, sweep["id"])) == 1
    report = get(client, team, sweep["id"], "/report")
    assert report["final"] is None and len(report["failed_cells"]) == 5


def test_the_final_stage_is_created_once_under_concurrent_advances(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    sweep = post(client, team, two_methods(corpus)).json()
    _end_tune_without_the_hook(db, sweep)  # four advances then race for the final stage
    with db.session() as s:
        n = s.execute(
            text("SELECT count(*) FROM sweep_cells WHERE sweep_id = :s"), {"s": sweep["id"]}
        ).scalar_one()
    assert n == 6  # not advanced yet

    barrier = threading.Barrier(4)
    results: list[bool] = []

    def racer() -> None:
        barrier.wait()
        results.append(advance_one(db.sessionmaker, sweep["id"]))

    threads = [threading.Thread(target=racer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False, False, False, True]
    got = get(client, team, sweep["id"])
    final = [c for c in got["cells"] if c["stage"] == "final"]
    assert len(final) == 4 and len({c["job_id"] for c in final}) == 4
    assert sorted(c["index"] for c in got["cells"]) == list(range(10))
    with db.session() as s:
        jobs = s.execute(
            text("SELECT count(*) FROM jobs WHERE team_id = :t"), {"t": team.team_id}
        ).scalar_one()
    assert jobs == 10


def _end_tune_without_the_hook(db: Database, sweep: dict[str, Any]) -> None:
    """End every tune cell in one transaction whose after-commit advance is switched off,
    as if the process had died right after the commit."""
    with db.session() as s:
        s.info["sharp_sweeps_to_advance"] = {sweep["id"]}
        repo = JobRepository(s)
        for c in sweep["cells"]:
            assert admit(repo, c["job_id"], utcnow())
            job = claim(repo, c["job_id"], "w")
            assert job is not None
            MetricRepository(s).insert_ignore(
                [
                    {
                        "job_id": c["job_id"],
                        "step": 4,
                        "name": "eval_loss",
                        "value": 3.0 + c["seed"] + c["index"] / 10,
                        "attempt": 1,
                    }
                ]
            )
            assert finish(repo, c["job_id"], 1, JobStatus.SUCCEEDED)


def test_a_stranded_sweep_is_advanced_by_a_get_and_by_the_reaper(
    client: TestClient, team: TeamKey, corpus: Path, db: Database, settings: Any
) -> None:
    from worker.reaper import reap

    by_get = post(client, team, two_methods(corpus)).json()
    by_reaper = post(client, team, two_methods(corpus)).json()
    _end_tune_without_the_hook(db, by_get)
    _end_tune_without_the_hook(db, by_reaper)
    with db.session() as s:
        started = s.execute(
            text("SELECT id FROM sweeps WHERE team_id = :t AND final_started_at IS NOT NULL"),
            {"t": team.team_id},
        ).all()
    assert started == []

    got = get(client, team, by_get["id"])
    assert got["final_started_at"] is not None
    assert [c["seed"] for c in got["cells"] if c["stage"] == "final"] == [10, 11, 10, 11]
    # lr 1e-3 (cells 0, 1) has the lower values: chosen for sft
    assert got["chosen"]["sft"] == by_get["cells"][0]["config"]

    sent: list[tuple[str, str]] = []
    report = reap(settings, db, None, lambda job_id, pool: sent.append((job_id, pool)))
    assert by_reaper["id"] in report.sweeps_advanced
    assert by_get["id"] not in report.sweeps_advanced  # already advanced: nothing to do
    again = get(client, team, by_reaper["id"])
    assert len([c for c in again["cells"] if c["stage"] == "final"]) == 4
    assert by_reaper["id"] not in reap(settings, db, None, lambda *a: None).sweeps_advanced


def test_an_idempotency_key_replays_the_same_sweep(
    client: TestClient, team: TeamKey, corpus: Path, db: Database
) -> None:
    body = {"base": base(corpus), "axes": {"training.seed": [0, 1]}}
    h = {**team.headers, "Idempotency-Key": "sweep-1"}
    first = client.post("/v1/sweeps", json=body, headers=h)
    assert first.status_code == 201, first.text
    again = client.post("/v1/sweeps", json=body, headers=h)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert [c["job_id"] for c in again.json()["cells"]] == [
        c["job_id"] for c in first.json()["cells"]
    ]
    other = client.post("/v1/sweeps", json={**body, "name": "other"}, headers=h)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    assert counts_in_db(db, team.team_id) == (2, 1, 2)

    # concurrent requests with one key: one sweep, and only its jobs
    results: list[int] = []
    barrier = threading.Barrier(3)

    def send() -> None:
        barrier.wait()
        r = client.post("/v1/sweeps", json=body, headers={**team.headers, "Idempotency-Key": "k2"})
        results.append(r.status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [200, 200, 201]
    assert counts_in_db(db, team.team_id) == (4, 2, 4)


def test_another_teams_sweep_is_a_404(
    client: TestClient, make_team: Callable[[str], TeamKey], corpus: Path
) -> None:
    a, b = make_team("a"), make_team("b")
    sweep = post(client, a, {"base": base(corpus), "axes": {"training.seed": [0]}}).json()
    for path in ("", "/report", "/curves"):
        r = client.get(f"/v1/sweeps/{sweep['id']}{path}", headers=b.headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=b.headers).status_code == 404
    assert client.get("/v1/sweeps", headers=b.headers).json()["data"] == []
    # paging
    second = post(client, a, {"base": base(corpus), "axes": {"training.seed": [1]}}).json()
    page = client.get("/v1/sweeps?limit=1", headers=a.headers).json()
    assert [s["id"] for s in page["data"]] == [second["id"]] and page["next_cursor"]
    rest = client.get(f"/v1/sweeps?limit=1&after={page['next_cursor']}", headers=a.headers)
    assert [s["id"] for s in rest.json()["data"]] == [sweep["id"]]


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_sweep_runs_to_completion_on_the_worker(
    client: TestClient,
    team: TeamKey,
    corpus: Path,
    db: Database,
    worker: Path,
    tmp_path: Path,
) -> None:
    """2 methods × 2 seeds selected on a val set, then each method's chosen configuration on 2
    fresh seeds reported on a test set: 8 real jobs on the module's Celery worker."""
    from pydoc_data.topics import topics

    doc = "\n\n".join(topics[k] for k in sorted(topics))
    sets = {}
    for split, (a, b) in {"val": (60_000, 70_000), "test": (70_000, 80_000)}.items():
        sets[split] = tmp_path / f"{split}.txt"  # text the training corpus does not hold
        sets[split].write_text(doc[a:b], encoding="utf-8")
    register_hook(client, team)
    spec = base(corpus, queue="default", max_steps=4)
    spec["dataset"]["eval"] = {
        split: {"files": [str(path)], "max_blocks": 8} for split, path in sets.items()
    }
    body = {
        "name": "e2e",
        "base": spec,
        "axes": {"training.seed": [0, 1]},
        "tune": {"trials": 1, "space": {"sft": {}, "kd": {}}},
        "final": {"seeds": [7, 8]},
    }
    r = post(client, team, body)
    assert r.status_code == 201, r.text
    sweep_id = r.json()["id"]
    t0 = time.monotonic()

    def finished() -> dict[str, Any] | None:
        s = get(client, team, sweep_id)
        failed = [c for c in s["cells"] if c["status"] == "failed"]
        assert not failed, failed
        return s if s["status"] == "completed" else None

    done = wait_for(finished, 400, interval=1.0, what="sweep completed")
    assert isinstance(done, dict)
    print(f"sweep of 8 jobs took {time.monotonic() - t0:.0f} s")
    tune = [c for c in done["cells"] if c["stage"] == "tune"]
    final = [c for c in done["cells"] if c["stage"] == "final"]
    assert len(tune) == 4 and len(final) == 4
    assert {(c["method"], c["seed"]) for c in final} == {
        (m, s) for m in ("sft", "kd") for s in (7, 8)
    }
    assert {c["method"]: c["config"] for c in final} == done["chosen"]
    assert all(c["status"] == "succeeded" for c in done["cells"])

    def last(job_id: str) -> dict[str, float]:
        with db.session() as s:
            rows = s.execute(
                text(
                    "SELECT DISTINCT ON (name) name, value FROM metrics WHERE job_id = :j"
                    " ORDER BY name, step DESC"
                ),
                {"j": job_id},
            ).all()
        return dict(rows)

    # selection never saw the test set; the final cells were evaluated on it
    for c in tune:
        job = client.get(f"/v1/jobs/{c['job_id']}", headers=team.headers).json()
        assert job["spec"]["dataset"]["eval"]["test"] is None
        assert "val_ppl" in last(c["job_id"]) and "test_ppl" not in last(c["job_id"])
    for c in final:
        assert {"val_ppl", "test_ppl"} <= set(last(c["job_id"]))

    # the report equals compare() over the metrics the jobs recorded
    def results(cells: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
        return [
            {
                "method": c["method"],
                "config": c["config"],
                "seed": c["seed"],
                "status": "completed",
                "value": last(c["job_id"])[name],
            }
            for c in cells
        ]

    report = get(client, team, sweep_id, "/report")
    assert (report["selection_metric"], report["final_metric"]) == ("val_ppl", "test_ppl")
    assert report["selection_metric_note"] is None and report["final_metric_note"] is None
    val = {"name": "val_ppl", "lower_is_better": True, "relative": True}
    want = compare(results(tune, "val_ppl"), metric=val)
    assert report["tune"]["best"] == want["best"] == done["chosen"]
    assert report["tune"]["reference"] == "kd"
    d = report["tune"]["methods"]["sft"]["delta"]
    assert d["per_seed"] == pytest.approx(want["methods"]["sft"]["delta"]["per_seed"])
    assert d["ci"] == pytest.approx(want["methods"]["sft"]["delta"]["ci"])
    assert {c["job_id"]: c["value"] for c in tune} == pytest.approx(
        {c["job_id"]: last(c["job_id"])["val_ppl"] for c in tune}
    )
    test = {"name": "test_ppl", "lower_is_better": True, "relative": True}
    final_want = compare(results(final, "test_ppl"), metric=test, best=done["chosen"])
    for m in ("sft", "kd"):
        got = report["final"]["methods"][m]
        assert got["mean"] == pytest.approx(final_want["methods"][m]["mean"])
        assert got["n"] == 2
    assert report["final"]["methods"]["sft"]["delta"]["per_seed"] == pytest.approx(
        final_want["methods"]["sft"]["delta"]["per_seed"]
    )
    curves = get(client, team, sweep_id, "/curves")
    assert curves["metric"] == "val_loss"
    assert all(len(c["points"]) >= 2 for c in curves["cells"])
    assert len(sweep_deliveries(db, sweep_id)) == 1


def test_the_documented_example_is_a_valid_sweep() -> None:
    """The OpenAPI example (and docs/sweeps.md's) expand into valid cells: 2 methods × 8
    trials × 3 seeds, and 2 × 5 final cells (only the upload id is a placeholder)."""
    from api.schemas import EXAMPLE_SWEEP
    from sharp_core.spec import parse_spec
    from sharp_core.study.sweep import count_cells, expand, parse_sweep

    spec = parse_sweep(EXAMPLE_SWEEP)
    cells = expand(spec)
    assert count_cells(spec) == (len(cells), 10) == (48, 10)
    for c in cells:
        assert parse_spec(c.spec).method.name == c.method
