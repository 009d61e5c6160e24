"""``sharp sweeps …`` run as real subprocesses against a real uvicorn, Celery worker, Postgres
and Redis (the fixtures of conftest.py), as tests/test_cli_jobs.py does for ``sharp jobs``;
plus the report table's formatting on the output of `sharp_core.study.compare` itself.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, TeamKey, free_port, wait_for
from tests.helpers import spec_dict, train_tiny_teacher

CLI_TIMEOUT = 600


def cli_env(url: str, key: str, cwd: Path | None) -> dict[str, str]:
    return {
        **os.environ,
        "SHARP_URL": url,
        "SHARP_API_KEY": key,
        # No profile file of the machine running the tests may leak in.
        "SHARP_CONFIG": str(Path(cwd or ROOT) / "no-such-profile.toml"),
        "COLUMNS": "250",
        "PYTHONPATH": str(ROOT),
    }


def sharp(*args: str, url: str, key: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "sweeps", *args],
        cwd=ROOT if cwd is None else cwd,
        env=cli_env(url, key, cwd),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def tiny_sweep(
    corpus: Path, teacher: Path, *, name: str = "tiny-sweep", max_steps: int = 6, **over: Any
) -> dict[str, Any]:
    """sft (two learning rates) against kd (one configuration) on seeds 0 and 1, then each
    method's chosen configuration once more on seed 5: 6 tuning cells and 2 final cells of a
    few steps each, with an evaluation at steps 3 and 6."""
    base = spec_dict(
        corpus,
        name=name,
        teacher={"model": str(teacher)},
        training={"max_steps": max_steps, "eval_every": 3, "checkpoint_every": max_steps},
    )
    base.pop("tokenizer")  # the teacher's
    sweep: dict[str, Any] = {
        "name": name,
        "base": base,
        "axes": {"training.seed": [0, 1]},
        "tune": {
            "trials": 2,
            "search": "grid",
            "space": {"sft": {"training.lr": [1e-3, 3e-3]}, "kd": {}},
        },
        "reference": "kd",
        "final": {"seeds": [5]},
    }
    sweep.update(over)
    return sweep


def cancel_losing_cell(base: str, team: TeamKey, name: str) -> tuple[str, dict[str, Any]]:
    """Cancel the job of one cell that cannot be chosen (sft at lr 1e-3, seed 1: its perplexity
    is far above lr 3e-3's) as soon as the sweep `name` exists: a cell that ends without a
    value, which the report must count and list. Returns (sweep id, that cell)."""
    found: dict[str, Any] = {}

    def sweep_listed() -> bool:
        page = httpx.get(f"{base}/v1/sweeps", headers=team.headers, timeout=10).json()
        found.update(next((s for s in page["data"] if s["name"] == name), {}))
        return bool(found)

    wait_for(sweep_listed, 60, interval=0.2, what=f"the sweep {name}")
    sweep = httpx.get(f"{base}/v1/sweeps/{found['id']}", headers=team.headers, timeout=10).json()
    cell = next(
        c
        for c in sweep["cells"]
        if c["method"] == "sft" and c["overrides"].get("training.lr") == 1e-3 and c["seed"] == 1
    )
    r = httpx.post(f"{base}/v1/jobs/{cell['job_id']}/cancel", headers=team.headers, timeout=10)
    assert r.is_success, r.text
    return sweep["id"], cell


@pytest.fixture(scope="module")
def teacher(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher"))


# -- no server needed ------------------------------------------------------------------------


def test_invalid_sweep_exits_2_before_any_request(tmp_path: Path, corpus: Path) -> None:
    """Checked locally: the sweep's own fields, then every cell's spec; the URL is never
    contacted (nothing listens on it)."""
    url = f"http://127.0.0.1:{free_port()}"
    bad_axis = tiny_sweep(corpus, tmp_path, axes={"training.nope": [1, 2]})
    path = tmp_path / "bad-axis.yaml"
    path.write_text(yaml.safe_dump(bad_axis))
    done = sharp("submit", str(path), url=url, key="sk_whatever", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "sweep.axes.training.nope" in done.stderr and done.stdout == ""

    bad_cells = tiny_sweep(
        corpus, tmp_path, axes={"training.seed": [0], "training.batch_size": [0]}
    )
    path = tmp_path / "bad-cells.json"
    path.write_text(json.dumps(bad_cells))
    done = sharp("submit", str(path), url=url, key="sk_whatever", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "3 cells have invalid specs" in done.stderr, done.stderr  # sft ×2 configs, kd ×1
    assert "spec.training.batch_size" in done.stderr and "cannot reach" not in done.stderr

    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    done = sharp("submit", str(path), url=url, key="k", cwd=tmp_path)
    assert done.returncode == 2 and "cannot read the sweep" in done.stderr, done.stderr


def test_unreachable_server_exits_4(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = sharp("list", url=url, key="sk_whatever", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert "cannot reach the server" in done.stderr


def _report(
    methods: dict[str, tuple[float, list[float | None]]], *, relative: bool = True
) -> dict[str, Any]:
    from sharp_core.study.compare import compare

    cells = [
        {
            "method": m,
            "config": f"{m}-c",
            "seed": s,
            "status": "failed" if v is None else "completed",
            "value": v,
            "overrides": {"method.name": m, "training.lr": lr},
        }
        for m, (lr, values) in methods.items()
        for s, v in enumerate(values)
    ]
    metric = {"name": "val_ppl", "lower_is_better": True, "relative": relative}
    return compare(cells, metric=metric, reference="kd")


def test_report_table_prints_the_servers_numbers() -> None:
    """Per method: the chosen configuration, mean ± std (n), Δ [CI] (n), p, Holm p and
    failed / cells, each as `sharp_core.study.compare` computed it (4 significant digits)."""
    from rich.console import Console

    import ops.sweeps_cli as cli

    rep = _report(
        {
            "kd": (1e-3, [30.0, 31.0, 32.0]),
            "sft": (3e-3, [27.0, 28.5, 29.0]),
            "minilm": (1e-3, [30.5, None, 31.0]),
        }
    )
    buf = io.StringIO()
    Console(file=buf, width=250).print(cli.report_table("tune", rep))
    text = buf.getvalue()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "kd (reference)" in rows
    sft = rep["methods"]["sft"]
    d = sft["delta"]
    assert f"{sft['mean']:.4g} ± {sft['std']:.4g} (3)" in rows["sft"]
    assert f"{d['mean']:+.3g} % [{d['ci'][0]:+.3g}, {d['ci'][1]:+.3g}] (n 3)" in rows["sft"]
    assert f"{d['p']:.2g}" in rows["sft"] and f"{d['p_holm']:.2g}" in rows["sft"]
    assert "training.lr=0.003" in rows["sft"] and "0 / 3" in rows["sft"]
    minilm = rep["methods"]["minilm"]
    assert minilm["n"] == 2 and "1 / 3" in rows["minilm"]  # the failed cell is counted
    assert f"(n {minilm['delta']['n']})" in rows["minilm"]
    assert "val_ppl (lower is better)" in text and "Δ vs kd [95% CI]" in text

    # an absolute metric (accuracy): Δ in points, no %
    acc = _report({"kd": (1e-3, [0.5, 0.6]), "sft": (1e-3, [0.7, 0.7])}, relative=False)
    buf = io.StringIO()
    Console(file=buf, width=250).print(cli.report_table("final", acc))
    assert re.search(r"\+0\.15 \[[-+0-9.e]+, [-+0-9.e]+\] \(n 2\)", buf.getvalue())


def test_gap_table_prints_the_reports_gap_closed() -> None:
    """The report's gap closed (`sharp_core.study.compare.gaps_closed`) in %, per method."""
    from rich.console import Console

    import ops.sweeps_cli as cli
    from sharp_core.study.compare import gaps_closed

    acc = "harness/t/acc"
    cells = [
        {"method": m, "config": c, "status": "completed", "scores": {acc: v}, "teacher": {acc: 0.8}}
        for m, c, v in [("kd", "k", 0.4), ("kd", "k", 0.5), ("rkl", "r", 0.6)]
    ]
    gap = gaps_closed(cells, best={"kd": "k", "rkl": "r"}, reference="kd")
    buf = io.StringIO()
    table = cli.gap_table("final", gap)
    assert table is not None and cli.gap_table("tune", None) is None
    Console(file=buf, width=250).print(table)
    text = buf.getvalue()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert f"{100 * (0.6 - 0.45) / (0.8 - 0.45):.1f} %" in rows["rkl"]  # 42.9 %
    assert "t/acc" in text and "baseline kd (k)" in text


# -- against the live service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("cli-sweeps")


@pytest.mark.service
def test_unknown_sweep_exits_2(live_server: str, team: TeamKey, tmp_path: Path) -> None:
    for cmd in ("show", "report", "cancel", "watch"):
        done = sharp(cmd, "swp_does_not_exist", url=live_server, key=team.key, cwd=tmp_path)
        assert done.returncode == 2, (cmd, done.stderr)
        assert "not_found" in done.stderr, (cmd, done.stderr)


@pytest.mark.service
@pytest.mark.slow
def test_submit_wait_show_list_report(
    live_server: str,
    worker: Path,
    team: TeamKey,
    corpus: Path,
    teacher: Path,
    tmp_path: Path,
) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(corpus, teacher, name="cli-sweep")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "sweeps", "submit", str(path), "--wait"]
        + ["--idempotency-key", "cli-sweep-1"],
        cwd=tmp_path,
        env=cli_env(live_server, team.key, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listed_id, cancelled = cancel_losing_cell(live_server, team, "cli-sweep")
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = worker.read_text(errors="replace")[-3000:]
    assert proc.returncode == 0, stderr + "\n" + log
    sweep_id = stdout.strip()
    assert sweep_id == listed_id, stdout
    # completed, with the cancelled cell counted, not hidden
    assert (
        f"sweep {sweep_id} completed (1 cells failed or cancelled; see `sharp sweeps report`)"
        in stderr.splitlines()
    ), stderr
    # the live table's last state: every cell ended, one row per stage and method
    assert "8/8 cells done" in stderr, stderr
    assert re.search(r"│ tune +│ sft +│ 4 +│ 0 +│ 0 +│ 3 +│ 1 +│", stderr), stderr
    assert re.search(r"│ final +│ sft +│ 1 +│ 0 +│ 0 +│ 1 +│ 0 +│", stderr), stderr

    # the same key and file: the same sweep, nothing new queued
    again = sharp(
        "submit",
        str(path),
        "--idempotency-key",
        "cli-sweep-1",
        url=live_server,
        key=team.key,
        cwd=tmp_path,
    )
    assert again.returncode == 0 and again.stdout.strip() == sweep_id, again.stderr

    api = httpx.Client(base_url=live_server, headers=team.headers, timeout=30)
    sweep = api.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["status"] == "completed" and len(sweep["cells"]) == 8  # 6 tune + 2 final

    shown = sharp("show", sweep_id, url=live_server, key=team.key, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "completed" in shown.stdout and "cli-sweep" in shown.stdout
    for cell in sweep["cells"]:
        assert cell["job_id"] in shown.stdout, cell

    listed = sharp("list", url=live_server, key=team.key, cwd=tmp_path)
    assert listed.returncode == 0 and sweep_id in listed.stdout, listed.stderr

    as_json = sharp("report", sweep_id, "--json", url=live_server, key=team.key, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    rep = api.get(f"/v1/sweeps/{sweep_id}/report").json()
    assert json.loads(as_json.stdout) == rep

    table = sharp("report", sweep_id, url=live_server, key=team.key, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    tune_text, final_text = table.stdout.split("final: ", 1)  # the tune table comes first
    for stage, text in (("tune", tune_text), ("final", "final: " + final_text)):
        assert rep[stage] is not None, stage
        assert f"{stage}: {rep[stage]['metric']['name']}" in text
        rows = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 2}
        assert set(rows) == {"sft", "kd (reference)"}, rows
        for name, m in rep[stage]["methods"].items():
            row = rows[name + (" (reference)" if name == "kd" else "")]
            assert m["n"] >= 1, (stage, name, m)
            std = f" ± {m['std']:.4g}" if m["std"] is not None else ""
            assert f"{m['mean']:.4g}{std} ({m['n']})" in row, (stage, name, row)
            assert f"{m['failed']} / {m['cells']}" in row, (stage, name, row)
        d = rep[stage]["methods"]["sft"]["delta"]
        unit = " %" if rep[stage]["metric"]["relative"] else ""
        assert f"{d['mean']:+.3g}{unit}" in rows["sft"], rows["sft"]
    assert rep["tune"]["methods"]["sft"]["configs_tried"] == 2
    assert [f["job_id"] for f in rep["failed_cells"]] == [cancelled["job_id"]]
    assert (
        f"cancelled cell {cancelled['index']} (tune {cancelled['config']}, seed 1, "
        f"job {cancelled['job_id']})" in table.stdout
    ), table.stdout
    assert rep["final"]["methods"]["sft"]["n"] == 1  # one fresh seed

    watched = sharp("watch", sweep_id, url=live_server, key=team.key, cwd=tmp_path)
    assert watched.returncode == 0 and "completed" in watched.stderr, watched.stderr
    api.close()


@pytest.mark.service
@pytest.mark.slow
def test_cancel_then_watch_exits_3(
    live_server: str, worker: Path, team: TeamKey, corpus: Path, teacher: Path, tmp_path: Path
) -> None:
    path = tmp_path / "long.json"
    path.write_text(json.dumps(tiny_sweep(corpus, teacher, name="cli-cancel", max_steps=100_000)))
    done = sharp("submit", str(path), url=live_server, key=team.key, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sweep_id = done.stdout.strip()
    cancelled = sharp("cancel", sweep_id, url=live_server, key=team.key, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(sweep_id)
    watched = sharp("watch", sweep_id, url=live_server, key=team.key, cwd=tmp_path)
    assert watched.returncode == 3, watched.stderr
    assert f"sweep {sweep_id} cancelled" in watched.stderr

    def jobs_ended() -> bool:
        cells = httpx.get(
            f"{live_server}/v1/sweeps/{sweep_id}", headers=team.headers, timeout=10
        ).json()["cells"]
        return all(c["status"] == "cancelled" for c in cells)

    wait_for(jobs_ended, 120, interval=1.0, what="every cell's job to be cancelled")
