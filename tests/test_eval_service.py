"""Downstream evaluation in the service (issue 24): real uvicorn, a real Celery worker and
real training processes on Postgres and Redis, the real lm-evaluation-harness offline.

Two students of one teacher run the same local harness task and prompt set: the first
computes the teacher's scores, the second reuses them (its events say so); the job shows
its scores beside the teacher's with retained = student / teacher; the teacher's leaderboard
lists both with the API's numbers. A hub task with no network fails the evaluation, not the
job. Bad evaluation files are 422s naming the field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, TeamKey, tiny_spec, wait_for
from tests.test_cli_jobs import sharp
from tests.test_ui import ARTIFACTS, browser_context, chromium, page, sign_in  # noqa: F401

pytestmark = [pytest.mark.service, pytest.mark.slow]

TIMEOUT = 300
#: The leaderboard test's jobs and their teacher, for the browser test after it.
SEEN: dict[str, object] = {}
TEACHER = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("evalh")


@pytest.fixture(scope="module")
def other(make_team) -> TeamKey:
    return make_team("evalh-other")


@pytest.fixture(scope="module")
def api(live_server: str, worker: Path) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        yield c


def write_eval_files(root: Path) -> tuple[Path, Path]:
    """A local multiple-choice task (YAML + jsonl) and a prompt set with references."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["the", "and", "of", "to", "is", "in", "that", "it"]
    rows = [
        {"q": f"Which word {i}?", "choices": [words[(i + k) % 8] for k in range(3)], "a": i % 3}
        for i in range(12)
    ]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = root / "evalh_mc.yaml"
    task.write_text(
        "task: evalh_mc\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: a\ndoc_to_choice: choices\n'
        "metric_list:\n  - metric: acc\n"
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"prompt": f"The {w} of", "reference": f"the {w} and the"})
            for w in ["king", "queen", "duke", "lord"]
        )
    )
    return task, prompts


def spec(
    corpus: Path, name: str, tasks: list[str], prompts: Path | None = None, steps: int = 4
) -> dict:
    d = tiny_spec(corpus, max_steps=steps, name=name, eval_every=0, checkpoint_every=0)
    d["teacher"] = {"init": "config", "config": dict(TEACHER)}
    d["method"] = {"name": "kd"}
    d["evaluation"] = {"harness": {"tasks": tasks, "batch_size": 4}}
    if prompts is not None:
        d["evaluation"]["generation"] = {"set": str(prompts), "max_new_tokens": 6, "samples": 2}
    return d


def run(api: httpx.Client, team: TeamKey, body: dict) -> dict:
    r = api.post("/v1/jobs", json={"spec": body}, headers=team.headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def done() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, TIMEOUT, interval=0.25, what=f"{job_id} to end")  # type: ignore[return-value]


def events(api: httpx.Client, team: TeamKey, job_id: str) -> list[tuple[str, dict]]:
    text = api.get(f"/v1/jobs/{job_id}/events", headers=team.headers, timeout=60).text
    out, kind = [], None
    for line in text.splitlines():
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind:
            out.append((kind, json.loads(line.split(":", 1)[1])))
    return out


def test_bad_evaluation_input_is_a_422_naming_the_field(api, team, corpus, tmp_path) -> None:
    task, prompts = write_eval_files(tmp_path / "files")

    def post(body: dict) -> dict:
        r = api.post("/v1/jobs", json={"spec": body}, headers=team.headers)
        assert r.status_code == 422, r.text
        return r.json()["error"]

    err = post(spec(corpus, "x", [str(task), "no_such_harness_task"]))
    assert err["param"] == "spec.evaluation.harness.tasks.1"
    assert "no_such_harness_task" in err["message"]
    broken = tmp_path / "files" / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    err = post(spec(corpus, "x", [str(broken)]))
    assert err["param"] == "spec.evaluation.harness.tasks.0" and "does not parse" in err["message"]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as outside:  # not under the data roots
        far = Path(outside) / "far.yaml"
        far.write_text(task.read_text())
        err = post(spec(corpus, "x", [str(far)]))
        assert err["param"] == "spec.evaluation.harness.tasks.0"
        assert err["code"] == "file_not_allowed"
    # a task file under the roots whose data is outside them
    with tempfile.TemporaryDirectory(dir="/var/tmp") as outside:
        (Path(outside) / "mc.jsonl").write_text((tmp_path / "files" / "mc.jsonl").read_text())
        sneaky = tmp_path / "files" / "sneaky.yaml"
        sneaky.write_text(task.read_text().replace("mc.jsonl", f"{outside}/mc.jsonl"))
        err = post(spec(corpus, "x", [str(sneaky)]))
        assert err["param"] == "spec.evaluation.harness.tasks.0" and "outside" in err["message"]
    noref = tmp_path / "files" / "noref.jsonl"
    noref.write_text(json.dumps({"prompt": "hi"}) + "\n")
    err = post(spec(corpus, "x", [str(task)], noref))
    assert err["param"] == "spec.evaluation.generation.set" and "reference" in err["message"]
    # a chat set (the data issue's format) whose conversation has no assistant turn to score
    chat = tmp_path / "files" / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    err = post(spec(corpus, "x", [str(task)], chat))
    assert err["param"] == "spec.evaluation.generation.set"
    assert "no assistant turn" in err["message"]


def test_teacher_scores_once_retained_and_leaderboard(api, team, other, corpus, tmp_path) -> None:
    task, prompts = write_eval_files(tmp_path / "files")
    # the teacher is config-initialised from the job's seed: both jobs get the same weights
    a = run(api, team, spec(corpus, "first", [str(task)], prompts))
    assert a["status"] == "succeeded", a
    ev_a = a["evaluation"]
    assert ev_a["error"] is None and ev_a["teacher_scores_reused"] is False
    acc = ev_a["scores"]["harness/evalh_mc/acc"]
    t_acc = ev_a["teacher_scores"]["harness/evalh_mc/acc"]
    assert 0.0 <= acc <= 1.0 and "harness/evalh_mc/acc_stderr" in ev_a["scores"]
    if t_acc > 0:
        assert ev_a["retained"]["retained/evalh_mc/acc"] == pytest.approx(acc / t_acc)
    assert a["metrics"]["harness/evalh_mc/acc"] == acc  # also a job metric
    q = ev_a["answer_quality"]
    assert q["gen/answers"] == 4 and 0.0 <= q["gen/rougeL"] <= 1.0
    assert len(ev_a["answer_samples"]) == 2 and ev_a["answer_samples"][0]["prompt"] == "The king of"
    # the scores are in the last checkpoint's manifest too
    cks = api.get(f"/v1/jobs/{a['id']}/checkpoints", headers=team.headers).json()["data"]
    assert cks[-1]["metrics"]["harness/evalh_mc/acc"] == acc

    b = run(api, team, spec(corpus, "second", [str(task)], steps=2))  # fewer steps: other numbers
    assert b["status"] == "succeeded", b
    ev_b = b["evaluation"]
    assert ev_b["teacher_scores_reused"] is True
    assert ev_b["teacher_scores"] == ev_a["teacher_scores"]
    assert ev_b["teacher_digest"] == ev_a["teacher_digest"]
    kinds = {k: d for k, d in events(api, team, b["id"]) if k == "teacher_scores"}
    assert kinds["teacher_scores"]["reused"] is True
    first_events = {k: d for k, d in events(api, team, a["id"]) if k == "teacher_scores"}
    assert first_events["teacher_scores"]["reused"] is False

    digest = ev_a["teacher_digest"]
    SEEN.update(digest=digest, jobs=[a["id"], b["id"]], task=str(task), acc=acc)
    board = api.get(f"/v1/teachers/{digest}/students", headers=team.headers)
    assert board.status_code == 200, board.text
    body = board.json()
    rows = {r["job_id"]: r for r in body["students"]}
    assert set(rows) == {a["id"], b["id"]}
    assert rows[a["id"]]["scores"]["harness/evalh_mc/acc"] == acc
    assert rows[a["id"]]["method"] == "kd" and rows[a["id"]]["init"] == "config"
    assert rows[a["id"]]["tokens_seen"] == 4 * 4 * 32
    assert rows[a["id"]]["ppl"] == pytest.approx(a["metrics"]["eval_ppl"])
    assert rows[a["id"]]["params"] > 0 and body["teacher_params"] > rows[a["id"]]["params"]
    assert [t["computed_by_job_id"] for t in body["teacher_scores"]] == [a["id"]]
    assert body["teacher_scores"][0]["scores"]["harness/evalh_mc/acc"] == t_acc
    # the CLI prints each score beside the teacher's, with retained %
    shown = sharp("show", a["id"], url=str(api.base_url).rstrip("/"), key=team.key)
    assert shown.returncode == 0, shown.stderr
    line = next(ln for ln in shown.stdout.splitlines() if "evalh_mc/acc" in ln and "±" in ln)
    assert f"{acc:.4f}" in line and f"{t_acc:.4f}" in line, shown.stdout
    if t_acc > 0:
        assert f"{100 * acc / t_acc:.1f} %" in line, shown.stdout
    assert "teacher scores computed" in shown.stdout and "gen/rougeL" in shown.stdout

    listed = api.get("/v1/teachers", headers=team.headers).json()["data"]
    assert {"teacher_digest": digest, "students": 2} in listed
    assert api.get(f"/v1/teachers/{digest}/students", headers=other.headers).status_code == 404


def test_evaluation_failure_keeps_the_trained_student(api, team, corpus, tmp_path) -> None:
    """A hub task with no network (the worker runs offline): the job succeeds with its
    checkpoint and records evaluation_failed with the harness's message."""
    job = run(api, team, spec(corpus, "offline", ["arc_easy"]))
    assert job["status"] == "succeeded", job
    err = job["evaluation"]["error"]
    assert err["code"] == "evaluation_failed" and "harness" in err["message"], err
    assert "harness/arc_easy/acc" not in job["metrics"]
    cks = api.get(f"/v1/jobs/{job['id']}/checkpoints", headers=team.headers).json()["data"]
    assert cks and cks[-1]["step"] == 4
    kinds = [k for k, _ in events(api, team, job["id"])]
    assert "evaluation_failed" in kinds


def test_leaderboard_page_shows_the_api_numbers(api, team, live_server, page) -> None:  # noqa: F811
    """In Chromium: the teacher's page lists both students with the API's numbers, each job
    linked, and sorts by a score when its header is clicked."""
    if "digest" not in SEEN:
        pytest.skip("needs the jobs of test_teacher_scores_once_retained_and_leaderboard")
    digest = str(SEEN["digest"])
    board = api.get(f"/v1/teachers/{digest}/students", headers=team.headers).json()
    sign_in(page, live_server, team, f"/ui/teachers/{digest}")
    page.wait_for_selector("#leaderboard-body tr[data-job-id^='job_']")
    rows = page.locator("#leaderboard-body tr[data-job-id^='job_']")
    assert rows.count() == len(board["students"]) >= 2  # with the offline job's when run

    def cell(job_id: str, col: str) -> str:
        td = page.locator(f"#leaderboard-body tr[data-job-id='{job_id}'] td[data-col='{col}']")
        return str(td.get_attribute("data-value"))

    for r in board["students"]:
        shown_acc = cell(r["job_id"], "harness/evalh_mc/acc")
        want = r["scores"].get("harness/evalh_mc/acc")  # none for a job whose evaluation failed
        assert (float(shown_acc) == want) if want is not None else shown_acc == ""
        assert float(cell(r["job_id"], "ppl")) == pytest.approx(r["ppl"], rel=1e-12)
        assert int(cell(r["job_id"], "params")) == r["params"]
        assert int(cell(r["job_id"], "tokens_seen")) == r["tokens_seen"]
        kept = r["scores"].get("retained/evalh_mc/acc")
        shown = cell(r["job_id"], "retained/evalh_mc/acc")
        assert (float(shown) == pytest.approx(kept)) if kept is not None else shown == ""
        link = page.locator(f"#leaderboard-body tr[data-job-id='{r['job_id']}'] a")
        assert link.get_attribute("href") == f"/ui/jobs/{r['job_id']}"
    t_acc = board["teacher_scores"][0]["scores"]["harness/evalh_mc/acc"]
    teacher = page.locator("#leaderboard-body tr.teacher-row td[data-col='harness/evalh_mc/acc']")
    assert float(str(teacher.get_attribute("data-value"))) == t_acc

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "leaderboard.png"), full_page=True)

    # sorting: perplexity ascending by default; a click on a header sorts by it, again reverses
    def order() -> list[str]:
        return [str(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)")]

    by_ppl = sorted(board["students"], key=lambda r: r["ppl"])
    assert order() == [r["job_id"] for r in by_ppl]
    page.click("#leaderboard-head th[data-col='ppl']")
    page.wait_for_function(
        "document.querySelector('#leaderboard-head th[data-col=ppl]').textContent.includes('▼')"
    )
    # descending, ties (equal perplexities) kept in the API's order, as a stable sort does
    by_ppl_desc = sorted(board["students"], key=lambda r: r["ppl"], reverse=True)
    assert order() == [r["job_id"] for r in by_ppl_desc]
    page.click("#leaderboard-head th[data-col='name']")
    page.wait_for_function(
        "document.getElementById('leaderboard-body').dataset.sortedBy === 'name'"
    )
    assert order() == [r["job_id"] for r in sorted(board["students"], key=lambda r: r["name"])]

    page.goto(f"{live_server}/ui/teachers")
    page.wait_for_selector(f"#teachers-body tr[data-digest='{digest}']")
    assert page.locator(
        f"#teachers-body tr[data-digest='{digest}'] td[data-col='students']"
    ).inner_text() == str(len(board["students"]))


def test_sweep_selects_on_a_harness_score(api, team, corpus, tmp_path, live_server, page) -> None:  # noqa: F811
    """Two learning rates of kd and one of rkl, chosen on the harness's accuracy: the report
    compares on it, its values are the jobs' own harness metric, the chosen configuration is
    the best one, the report's cells carry the leaderboard's columns, and rkl's gap closed
    against the baseline (kd) is on the report and the sweep page."""
    task, _ = write_eval_files(tmp_path / "files")
    base = spec(corpus, "sw", [str(task)], steps=3)
    base["dataset"]["max_eval_blocks"] = 4
    body = {
        "name": "by-acc",
        "base": base,
        "tune": {
            "trials": 2,
            "search": "grid",
            "space": {"kd": {"training.lr": [1e-4, 3e-2]}, "rkl": {"training.lr": [3e-2]}},
        },
        "selection_metric": "harness/evalh_mc/acc",
    }
    bad = api.post(
        "/v1/sweeps", json={**body, "selection_metric": "gen/rougeL"}, headers=team.headers
    )
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "sweep.selection_metric"
    r = api.post("/v1/sweeps", json=body, headers=team.headers)
    assert r.status_code == 201, r.text
    sweep_id = r.json()["id"]

    def ended() -> dict | None:
        sw = api.get(f"/v1/sweeps/{sweep_id}", headers=team.headers).json()
        return sw if sw["status"] in ("completed", "cancelled") else None

    wait_for(ended, TIMEOUT * 2, interval=0.5, what=f"sweep {sweep_id}")
    report = api.get(f"/v1/sweeps/{sweep_id}/report", headers=team.headers).json()
    assert report["selection_metric"] == "harness/evalh_mc/acc"
    assert report["tune"]["metric"]["lower_is_better"] is False
    acc = {}
    for cell in report["cells"]:
        job = api.get(f"/v1/jobs/{cell['job_id']}", headers=team.headers).json()
        assert job["status"] == "succeeded", job
        acc[cell["config"]] = job["metrics"]["harness/evalh_mc/acc"]
        assert cell["scores"]["harness/evalh_mc/acc"] == acc[cell["config"]]
        assert cell["ppl"] == pytest.approx(job["metrics"]["eval_ppl"])
    configs = report["tune"]["configs"]
    for key, value in acc.items():
        assert configs[key]["mean"] == pytest.approx(value)
    chosen = report["tune"]["best"]["kd"]
    assert acc[chosen] == max(v for k, v in acc.items() if k.startswith("kd-"))

    # gap closed against the baseline student (kd, the reference): rkl's accuracy from the
    # jobs' own metrics and the teacher's scores from its job's events
    rkl_job = next(c["job_id"] for c in report["cells"] if c["method"] == "rkl")
    t_acc = next(d for k, d in events(api, team, rkl_job) if k == "teacher_scores")["scores"][
        "harness/evalh_mc/acc"
    ]
    gaps = report["tune"]["gap_closed"]
    assert gaps["baseline"] == "kd" and gaps["baseline_config"] == chosen
    rkl_acc = acc[report["tune"]["best"]["rkl"]]
    got = gaps["methods"]["rkl"]["gap_closed"]["harness/evalh_mc/acc"]
    if t_acc == acc[chosen]:
        assert got is None  # no gap between the baseline and the teacher
    else:
        assert got == pytest.approx((rkl_acc - acc[chosen]) / (t_acc - acc[chosen]), abs=1e-12)

    # the sweep page's downstream table shows the report's numbers
    sign_in(page, live_server, team, f"/ui/sweeps/{sweep_id}")
    page.wait_for_selector("#cell-scores-body tr[data-job-id]")
    for cell in report["cells"]:
        td = page.locator(
            f"#cell-scores-body tr[data-job-id='{cell['job_id']}'] "
            "td[data-col='harness/evalh_mc/acc']"
        )
        assert float(str(td.get_attribute("data-value"))) == cell["scores"]["harness/evalh_mc/acc"]
    td = page.locator("#gaps-body tr[data-method='rkl'] td[data-col='harness/evalh_mc/acc']")
    shown = td.get_attribute("data-value")
    assert (float(shown) if shown else None) == got
    assert page.text_content("#gaps-stage") == f"(tune · baseline kd, {chosen})"


def test_evaluation_job_scores_a_finished_checkpoint(api, team, live_server, tmp_path) -> None:
    """``sharp eval submit --watch``: a finished job's checkpoint scored without training
    gives the very accuracy its training job measured on the same weights; the job's event
    stream carries the scores; bad input is a 422 naming the field."""
    if "jobs" not in SEEN:
        pytest.skip("needs the jobs of test_teacher_scores_once_retained_and_leaderboard")
    job_id = SEEN["jobs"][0]  # type: ignore[index]
    bad = api.post(
        "/v1/evaluations",
        json={
            "spec": {
                "model": {"model": {"job": "job_nope"}},
                "evaluation": {"harness": {"tasks": [SEEN["task"]]}},
            }
        },
        headers=team.headers,
    )
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "spec.model.model.job"
    empty = api.post(
        "/v1/evaluations",
        json={"spec": {"model": {"model": {"job": job_id}}, "evaluation": {}}},
        headers=team.headers,
    )
    assert empty.status_code == 422 and empty.json()["error"]["param"].startswith("spec")

    path = tmp_path / "eval.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "score-first",
                "model": {"model": {"job": job_id}},
                "evaluation": {"harness": {"tasks": [SEEN["task"]], "batch_size": 4}},
            }
        )
    )
    env = {
        **os.environ,
        "SHARP_URL": live_server,
        "SHARP_API_KEY": team.key,
        "SHARP_CONFIG": str(tmp_path / "none.toml"),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "eval", "submit", str(path), "--watch"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    eval_id = done.stdout.strip().splitlines()[0]
    job = api.get(f"/v1/jobs/{eval_id}", headers=team.headers).json()
    assert job["status"] == "succeeded" and job["progress"]["step"] == 1, job
    assert job["metrics"]["harness/evalh_mc/acc"] == SEEN["acc"]
    assert job["evaluation"]["scores"]["harness/evalh_mc/acc"] == SEEN["acc"]
    kinds = [k for k, _ in events(api, team, eval_id)]
    assert "metrics" in kinds and kinds[-1] == "status"
    shown = subprocess.run(
        [sys.executable, "-m", "ops.cli", "eval", "show", eval_id],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and "evalh_mc/acc" in shown.stdout, shown.stderr
