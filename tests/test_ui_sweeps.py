"""The sweep pages (/ui/sweeps, /ui/sweeps/{id}) in a real browser, as tests/test_ui.py tests
the job pages: Debian's Chromium driven by Playwright (its fixtures), against the real service
(uvicorn, Postgres, Redis, a Celery worker training the sweep's tiny jobs).
"""

# The browser fixtures are test_ui's, imported by name (so tests take `page` as an argument).
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TeamKey, wait_for
from tests.helpers import train_tiny_teacher
from tests.test_cli_sweeps import cancel_losing_cell, tiny_sweep
from tests.test_ui import (  # noqa: F401 (fixtures)
    ARTIFACTS,
    browser_context,
    chromium,
    page,
    sign_in,
)

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def team(make_team: Callable[[str], TeamKey]) -> TeamKey:
    return make_team("ui-sweeps")


def test_sweep_pages_send_the_csp_and_an_unknown_sweep_says_so(
    live_server: str, team: TeamKey, page: Any
) -> None:
    for path in ("/ui/sweeps", "/ui/sweeps/swp_x"):
        r = httpx.get(f"{live_server}{path}")
        assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{live_server}/ui/sweeps/bad%20id").status_code == 422
    sign_in(page, live_server, team, "/ui/sweeps/swp_does_not_exist")
    page.wait_for_selector("#page-error:not([hidden])")
    assert "No sweep swp_does_not_exist" in (page.text_content("#page-error") or "")
    assert page.text_content("#poll-state") == "stopped"


def _cells_done(page: Any) -> list[str]:
    return page.eval_on_selector_all(
        "#cells-body tr[data-status=succeeded]", "trs => trs.map(t => t.dataset.jobId)"
    )


@pytest.mark.slow
def test_sweep_page_shows_the_report_and_every_cells_curve_live(
    live_server: str,
    worker: Path,
    team: TeamKey,
    page: Any,
    corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = live_server
    teacher = train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher"))
    spec = tiny_sweep(corpus, teacher, name="ui-sweep", max_steps=9)
    r = httpx.post(f"{base}/v1/sweeps", json=spec, headers=team.headers, timeout=30)
    assert r.status_code == 201, r.text
    sweep_id, cancelled = cancel_losing_cell(base, team, "ui-sweep")
    assert sweep_id == r.json()["id"]

    # -- the list links to it
    sign_in(page, base, team, "/ui/sweeps")
    page.click(f"#sweeps-body tr[data-sweep-id='{sweep_id}'] a")
    page.wait_for_url(f"**/ui/sweeps/{sweep_id}")

    # -- opened while it runs: live, with cells still to finish
    page.wait_for_selector("#sweep-status[data-status=running]")
    page.wait_for_selector("body[data-poll=live]")  # the first load is complete
    assert page.text_content("#poll-state") == "live"
    total = len(page.query_selector_all("#cells-body tr[data-index]"))
    first = _cells_done(page)
    assert len(first) < total, "every cell had finished before the page opened"

    # -- a cell finishes: the page shows it without a reload (its row, and its curve)
    # (polled from here: a wait_for_function predicate is eval'd, which the page's CSP refuses)
    wait_for(lambda: len(_cells_done(page)) > len(first), 300, interval=0.5, what="a cell to end")
    done = _cells_done(page)
    newly = [j for j in done if j not in first]
    assert newly, (first, done)
    page.wait_for_selector(f"#curves polyline[data-job-id='{newly[0]}']")

    # -- until the sweep ends; then polling stops
    page.wait_for_selector("#sweep-status[data-status=completed]", timeout=600_000)
    page.wait_for_selector("body[data-poll=ended]")
    assert page.text_content("#poll-state") == "ended"

    sweep = httpx.get(f"{base}/v1/sweeps/{sweep_id}", headers=team.headers).json()
    rep = httpx.get(f"{base}/v1/sweeps/{sweep_id}/report", headers=team.headers).json()
    curves = httpx.get(f"{base}/v1/sweeps/{sweep_id}/curves", headers=team.headers).json()
    assert len(sweep["cells"]) == 8
    assert [c["job_id"] for c in sweep["cells"] if c["status"] != "succeeded"] == [
        cancelled["job_id"]
    ]

    # -- the cancelled cell: its row says so, and the report lists it with a link to its job
    row = f"#cells-body tr[data-job-id='{cancelled['job_id']}']"
    assert page.get_attribute(row, "data-status") == "cancelled"
    assert page.is_visible("#failed-block")
    failed = page.eval_on_selector_all("#failed-cells li", "lis => lis.map(l => l.dataset.jobId)")
    assert failed == [cancelled["job_id"]], failed
    assert page.get_attribute(f"#failed-cells li a[href='/ui/jobs/{cancelled['job_id']}']", "href")

    # -- one line per cell, in its method's colour (one colour per method, as in the legend)
    legend = dict(
        page.eval_on_selector_all(
            "#curves-legend li", "lis => lis.map(l => [l.dataset.method, l.dataset.color])"
        )
    )
    assert set(legend) == {"sft", "kd"} and len(set(legend.values())) == 2, legend
    lines = page.eval_on_selector_all(
        "#curves polyline.cell-line",
        "ps => ps.map(p => ({job: p.dataset.jobId, method: p.dataset.method,"
        " stroke: p.getAttribute('stroke'), points: +p.dataset.points, style: p.dataset.style,"
        " width: +p.getAttribute('stroke-width')}))",
    )
    by_job = {ln["job"]: ln for ln in lines}
    with_points = [c for c in curves["cells"] if c["points"]]
    assert len(with_points) >= 7  # the cancelled cell may have none (cancelled while queued)
    assert len(lines) == len(by_job) == len(with_points), lines
    best = rep["tune"]["best"]
    for c in with_points:
        ln = by_job[c["job_id"]]
        assert ln["method"] == c["method"] and ln["stroke"] == legend[c["method"]], (ln, c)
        assert ln["points"] == len(c["points"]), (ln, c)
        if c["status"] == "succeeded":
            assert ln["points"] >= 3, (ln, c)  # evaluations at steps 3, 6, 9
        want = (
            "dashed"
            if c["stage"] == "final"
            else "chosen"
            if best[c["method"]] == c["config"]
            else "thin"
        )
        assert ln["style"] == want, (ln, c)
    # sft tried two learning rates: the one not chosen is drawn thin, the chosen one thick
    assert sorted({ln["width"] for ln in lines if ln["method"] == "sft"}) == [1, 2.5]

    # -- the report tables hold the API's numbers
    for stage, table in (("tune", "#report-tune"), ("final", "#report-final")):
        assert rep[stage] is not None
        assert page.is_visible(table)
        for name, m in rep[stage]["methods"].items():
            row = f"{table} tr[data-method='{name}']"

            def cell(col: str, attr: str = "data-value", row: str = row) -> str:
                return page.get_attribute(f"{row} td[data-col='{col}']", attr) or ""

            assert cell("config") == m["config"]
            assert float(cell("mean")) == m["mean"]
            assert cell("mean", "data-n") == str(m["n"])
            if m["std"] is not None:
                assert float(cell("mean", "data-std")) == m["std"]
            assert (cell("failed", "data-failed"), cell("failed", "data-cells")) == (
                str(m["failed"]),
                str(m["cells"]),
            )
            text = page.text_content(f"{row} td[data-col='mean']") or ""
            assert text.endswith(f"({m['n']})"), text
            assert float(text.split()[0]) == pytest.approx(m["mean"], rel=1e-3)
            d = m["delta"]
            if name == rep[stage]["reference"]:
                assert d is None and cell("delta") == ""
                continue
            assert d is not None and float(cell("delta")) == d["mean"]
            shown = page.text_content(f"{row} td[data-col='delta']") or ""
            assert shown.endswith(f"(n {d['n']})"), shown
            if d.get("p_holm") is not None:
                assert float(cell("p_holm")) == d["p_holm"]
    assert "kd" in (page.text_content("#report-tune thead") or "")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-sweep-page.png"), full_page=True)
