"""The job page's evaluation block in a real browser (Chromium, test_ui's fixtures): a job
that ended with downstream scores shows each score beside its teacher's with retained %, the
answer quality, the sample answers and the evaluation error, the numbers equal to the API's.

The job's scores are written as the worker writes them (the lifecycle, the job's latest
metrics, its ``teacher_scores`` and ``answers`` events) with no training: what a real run
produces is tests/test_eval_service.py's; what is tested here is the page.
"""

# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import Database
from service.lifecycle import JobStatus, admit, claim, finish
from service.models import Job, utcnow
from service.repositories import JobRepository
from tests.conftest import TeamKey, tiny_spec
from tests.test_ui import browser_context, chromium, page, sign_in  # noqa: F401 (fixtures)

pytestmark = pytest.mark.service

METRICS = {
    "eval_ppl": 41.5,
    "harness/mc/acc": 0.375,
    "harness/mc/acc_stderr": 0.125,
    "retained/mc/acc": 0.375 / 0.5,
    "gen/rougeL": 0.2125,
    "gen/exact_match": 0.25,
    "gen/answers": 4.0,
}
SAMPLES = [
    {
        "prompt": "The king of",
        "reference": "the king and the",
        "answer": "the and",
        "rougeL": 0.6667,
    },
    {"prompt": "The duke of", "reference": "the duke and the", "answer": "of of", "rougeL": 0.0},
]
ERROR = {
    "code": "evaluation_failed",
    "message": "TimeoutError: the hub task timed out",
    "param": None,
}


@pytest.fixture(scope="module")
def team(make_team: Callable[[str], TeamKey]) -> TeamKey:
    return make_team("ui-eval")


def test_job_page_shows_the_evaluation_block(
    live_server: str, team: TeamKey, page: Any, corpus: Path, db: Database
) -> None:
    spec = tiny_spec(corpus, max_steps=4, name="evaluated")
    spec["resources"] = {"queue": "nowhere"}  # no worker takes it: the test plays the worker
    spec["evaluation"] = {"harness": {"tasks": ["arc_easy"]}}
    r = httpx.post(f"{live_server}/v1/jobs", json={"spec": spec}, headers=team.headers, timeout=120)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with db.session() as s:
        repo = JobRepository(s)
        assert admit(repo, job_id, utcnow())
        job = claim(repo, job_id, "test-worker")
        assert job is not None
        repo.append_event(
            job_id,
            "teacher_scores",
            {"teacher_digest": "ab" * 32, "reused": True, "scores": {"harness/mc/acc": 0.5}},
        )
        repo.append_event(job_id, "answers", {"step": 4, "metrics": {}, "samples": SAMPLES})
        assert finish(repo, job_id, job.attempt, JobStatus.SUCCEEDED)
        row = s.get(Job, job_id)
        assert row is not None
        row.latest_metrics, row.teacher_digest, row.evaluation_error = METRICS, "ab" * 32, ERROR

    ev = httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=team.headers, timeout=60).json()[
        "evaluation"
    ]
    assert ev["teacher_scores"] == {"harness/mc/acc": 0.5} and ev["error"] == ERROR

    sign_in(page, live_server, team, f"/ui/jobs/{job_id}")
    page.wait_for_selector("#evaluation-panel:not([hidden])")
    row = "#eval-scores-body tr[data-metric='harness/mc/acc']"

    def cell(col: str) -> tuple[str | None, str]:
        td = page.locator(f"{row} td[data-col='{col}']")
        return td.get_attribute("data-value"), td.inner_text()

    assert cell("student") == (str(ev["scores"]["harness/mc/acc"]), "0.3750 ± 0.1250")
    assert cell("teacher") == (str(ev["teacher_scores"]["harness/mc/acc"]), "0.5000")
    assert cell("retained") == (str(ev["retained"]["retained/mc/acc"]), "75.0 %")
    assert len(page.query_selector_all("#eval-scores-body tr")) == 1  # no stderr row
    quality = dict(
        page.eval_on_selector_all(
            "#eval-quality dd", "dds => dds.map(d => [d.dataset.quality, +d.dataset.value])"
        )
    )
    assert (
        quality
        == ev["answer_quality"]
        == {k: v for k, v in METRICS.items() if k.startswith("gen/")}
    )
    shown = page.eval_on_selector_all(
        "#eval-samples-body tr", "trs => trs.map(t => [...t.cells].map(c => c.textContent))"
    )
    assert shown == [
        [s["prompt"], s["reference"], s["answer"], f"{s['rougeL']:.4g}"] for s in SAMPLES
    ]
    assert page.inner_text("#eval-error") == (
        "evaluation failed: evaluation_failed: TimeoutError: the hub task timed out"
    )
    assert "its scores reused from an earlier job" in page.inner_text("#eval-teacher")
