"""``sharp sweeps …``: a team's sweeps over the HTTP API (submit, list, show, watch, report,
cancel; docs/sweeps.md, "From the command line"). Connection, profile, error handling and
exit codes are those of ``sharp jobs`` (`ops.client_cli`); a sweep that ends ``completed``
exits 0 (failed cells are counted in the report, not in the exit code), ``cancelled`` 3.

``watch`` polls ``GET /v1/sweeps/{id}`` (a sweep has no event stream of its own): a failed poll
is retried with a growing pause, `ops.follow.SSE_RETRIES` failures in a row at most, then exit
4 as for a lost job stream. The numbers of ``report`` are the server's (`sharp_core.study.compare`);
nothing is recomputed here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ops.client_cli import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    CliExit,
    KeyOpt,
    UrlOpt,
    check,
    client,
    err,
    fmt_time,
    out,
    print_table,
    run,
)
from ops.follow import SSE_RETRIES, StreamLost

sweeps_app = typer.Typer(
    help="Sweeps: a grid of jobs and their paired comparison (docs/sweeps.md).",
    no_args_is_help=True,
)

#: A sweep's statuses that end it, and the exit code of each (anything else still runs).
SWEEP_EXIT = {"completed": EXIT_OK, "cancelled": EXIT_CANCELLED, "failed": EXIT_FAILED}
#: Cell (job) statuses that are over; the others are still to come.
CELL_DONE = ("succeeded", "completed", "failed", "cancelled")
POLL_S = 2.0


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _counts(counts: dict[str, dict[str, int]]) -> str:
    """``tune: queued 2 succeeded 4; final: …`` from the API's stage → job status → cells."""
    parts = []
    for stage, by in counts.items():
        text = " ".join(f"{k} {v}" for k, v in sorted(by.items()) if v)
        if text:
            parts.append(f"{stage}: {text}")
    return "; ".join(parts) or "-"


def _stage(sweep: dict[str, Any]) -> str:
    """Which stage runs (or ran last): final once the server has started it."""
    return "final" if sweep.get("final_started_at") else "tune"


def _step(cell: dict[str, Any]) -> int | None:
    p = cell.get("progress") or {}
    return p.get("step")


# -- submit ----------------------------------------------------------------------------------


def read_sweep_file(path: Path) -> dict[str, Any]:
    """The file's mapping, checked locally first as ``sharp jobs submit`` checks a spec: the
    sweep's own fields (`sharp_core.study.sweep.parse_sweep`) and every tuning cell's job spec, so a
    bad sweep exits 2 and nothing is sent. The server checks again (and its cell limit)."""
    from sharp_core.errors import SharpError
    from sharp_core.study.sweep import expand, parse_sweep, validate_cells

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CliExit(EXIT_BAD_INPUT, f"cannot read the sweep {path}: {e}") from None
    try:
        sweep = parse_sweep(data)
    except SharpError as e:
        param = f" (param {e.param})" if e.param else ""
        err.print(
            f"[red]invalid sweep[/red] {escape(str(path))}: {e.code}: "
            f"{escape(e.message)}{escape(param)}"
        )
        raise CliExit(EXIT_BAD_INPUT) from None
    count, bad = validate_cells(expand(sweep))
    if count:
        err.print(f"[red]invalid sweep[/red] {escape(str(path))}: {count} cells have invalid specs")
        for b in bad:
            err.print(
                f"  cell {b['cell']} ({escape(b['config'])}, seed {b['seed']}): "
                f"{escape(str(b['message']))} (param {escape(str(b['param']))})"
            )
        raise CliExit(EXIT_BAD_INPUT)
    return dict(data)


@sweeps_app.command("submit")
def submit_cmd(
    path: Path = typer.Argument(..., metavar="FILE", help="A sweep, YAML or JSON."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Same key and sweep → the same sweep (safe to rerun)."
    ),
    wait: bool = typer.Option(
        False, "--wait", "--watch", "-w", help="Follow the sweep until it ends."
    ),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Validate FILE locally, submit it, print the sweep id (with --wait: follow it)."""

    def body() -> int:
        data = read_sweep_file(path)
        with client(url, key) as c:
            headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
            sweep = check(c.post("/v1/sweeps", json=data, headers=headers))
            out.print(sweep["id"])
            err.print(f"sweep {sweep['id']}: {len(sweep.get('cells', []))} cells")
            if not wait:
                return EXIT_OK
            return outcome(watch_sweep(c, sweep["id"]))

    run(body)


# -- list / show -----------------------------------------------------------------------------


@sweeps_app.command("list")
def list_cmd(
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=100, help="At most this many."),
    after: str | None = typer.Option(None, "--after", help="`next_cursor` of the last page."),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON instead of a table."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """This team's sweeps, newest first."""

    def body() -> int:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        with client(url, key) as c:
            page = check(c.get("/v1/sweeps", params=params))
        if as_json:
            out.print_json(data=page)
            return EXIT_OK
        table = Table("id", "name", "status", "stage", "cells", "created")
        for s in page["data"]:
            table.add_row(
                s["id"],
                escape(s["name"]),
                s["status"],
                _stage(s),
                _counts(s.get("counts") or {}),
                fmt_time(s.get("created_at")),
            )
        print_table(table)
        if page.get("next_cursor"):
            err.print(f"more: --after {page['next_cursor']}")
        return EXIT_OK

    run(body)


def _overrides(o: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((o or {}).items()) if k != "method.name")


def cells_table(cells: list[dict[str, Any]]) -> Table:
    table = Table("#", "stage", "method", "config", "seed", "status", "step", "value", "job")
    for c in cells:
        table.add_row(
            str(c["index"]),
            c["stage"],
            escape(c["method"]),
            escape(c["config"] + _cfg_suffix(c.get("overrides"))),
            str(c["seed"]),
            c["status"],
            "" if _step(c) is None else f"{_step(c)}/{(c.get('progress') or {}).get('max_steps')}",
            _num(c.get("value")),
            c.get("job_id") or "",
        )
    return table


@sweeps_app.command("show")
def show_cmd(
    sweep_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Status, stage, counts by status and every cell (its job, seed, status, value)."""

    def body() -> int:
        with client(url, key) as c:
            sweep = check(c.get(f"/v1/sweeps/{sweep_id}"))
        if as_json:
            out.print_json(data=sweep)
            return EXIT_OK
        out.print(f"[bold]{sweep['id']}[/bold]  {escape(sweep['name'])}")
        out.print(f"status    {sweep['status']}  stage {_stage(sweep)}")
        out.print(f"cells     {len(sweep['cells'])}: {_counts(sweep.get('counts') or {})}")
        out.print(f"reference {escape(str(sweep.get('reference') or '-'))}")
        out.print(
            f"created   {fmt_time(sweep.get('created_at'))}  finished "
            f"{fmt_time(sweep.get('finished_at')) or '-'}"
        )
        print_table(cells_table(sweep["cells"]))
        return EXIT_OK

    run(body)


# -- watch -----------------------------------------------------------------------------------


def progress_table(sweep: dict[str, Any]) -> Table:
    """One row per stage and method: its cells by status, the mean step of the running ones
    and the best value so far (lowest; the report says which direction is better)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in sweep["cells"]:
        groups.setdefault((c["stage"], c["method"]), []).append(c)
    table = Table(
        "stage", "method", "cells", "queued", "running", "done", "failed", "step", "values"
    )
    for (stage, method), cells in groups.items():
        by: dict[str, int] = {}
        for c in cells:
            by[c["status"]] = by.get(c["status"], 0) + 1
        running = [c for c in cells if c["status"] == "running" and _step(c) is not None]
        values = [c["value"] for c in cells if c.get("value") is not None]
        table.add_row(
            stage,
            escape(method),
            str(len(cells)),
            str(by.get("queued", 0)),
            str(by.get("running", 0) + by.get("cancelling", 0)),
            str(by.get("succeeded", 0) + by.get("completed", 0)),
            str(by.get("failed", 0) + by.get("cancelled", 0)),
            str(round(sum(_step(c) or 0 for c in running) / len(running))) if running else "",
            f"{_num(min(values))} … {_num(max(values))}" if values else "",
        )
    return table


def sweep_view(sweep: dict[str, Any]) -> Table:
    cells = sweep["cells"]
    done = sum(1 for c in cells if c["status"] in CELL_DONE)
    status = escape(f"[{sweep['status']}]")
    head = Text.from_markup(
        f"[bold]{escape(sweep['id'])}[/bold] {escape(sweep['name'])} {status} "
        f"stage {_stage(sweep)}  {done}/{len(cells)} cells done"
    )
    view = Table.grid()  # one row each, so every part ends its line (a bare bar does not)
    view.add_row(head)
    view.add_row(ProgressBar(total=max(len(cells), 1), completed=done, width=60))
    view.add_row(progress_table(sweep))
    return view


def poll_sweep(
    c: httpx.Client,
    sweep_id: str,
    on_update: Callable[[dict[str, Any]], None],
    *,
    interval: float = POLL_S,
    retries: int = SSE_RETRIES,
) -> dict[str, Any]:
    """Call `on_update` with the sweep every `interval` seconds until it is no longer running;
    return the last sweep. A poll that cannot reach the server is retried (growing pause);
    `retries` failures in a row raise `StreamLost` (exit 4)."""
    failures = 0
    while True:
        try:
            sweep = check(c.get(f"/v1/sweeps/{sweep_id}"))
            failures = 0
        except httpx.TransportError as e:
            failures += 1
            if failures > retries:
                raise StreamLost(f"lost the sweep {sweep_id}: {e}") from e
            time.sleep(min(5.0, 0.5 * failures))
            continue
        on_update(sweep)
        if sweep["status"] in SWEEP_EXIT:
            return dict(sweep)
        time.sleep(interval)


def watch_sweep(c: httpx.Client, sweep_id: str, interval: float = POLL_S) -> dict[str, Any]:
    """Live progress on stderr (a table per stage and method) until the sweep ends."""
    with Live(console=err, refresh_per_second=4, transient=False) as live:
        sweep = poll_sweep(c, sweep_id, lambda s: live.update(sweep_view(s)), interval=interval)
    if not err.is_terminal:  # off a terminal, Live prints the last table without ending its line
        err.line()
    return sweep


def outcome(sweep: dict[str, Any]) -> int:
    failed = sum(1 for c in sweep["cells"] if c["status"] in ("failed", "cancelled"))
    status = sweep["status"]
    colour = {"completed": "green", "cancelled": "yellow"}.get(status, "red")
    note = f" ({failed} cells failed or cancelled; see `sharp sweeps report`)" if failed else ""
    err.print(f"[{colour}]sweep {sweep['id']} {status}[/{colour}]{note}")
    return SWEEP_EXIT.get(status, EXIT_FAILED)


@sweeps_app.command("watch")
def watch_cmd(
    sweep_id: str = typer.Argument(..., metavar="ID"),
    interval: float = typer.Option(POLL_S, "--interval", min=0.2, help="Seconds between polls."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Live progress until the sweep ends; exit 0 completed, 3 cancelled."""

    def body() -> int:
        with client(url, key) as c:
            return outcome(watch_sweep(c, sweep_id, interval))

    run(body)


# -- report ----------------------------------------------------------------------------------


def fmt_delta(delta: dict[str, Any] | None, relative: bool) -> tuple[str, str, str]:
    """(Δ with its interval, p, Holm p) as text; Δ is in % of the reference when relative."""
    if not delta:
        return "", "", ""
    unit = " %" if relative else ""
    text = f"{delta['mean']:+.3g}{unit}"
    if delta.get("ci"):
        lo, hi = delta["ci"]
        text += f" [{lo:+.3g}, {hi:+.3g}]"
    text += f" (n {delta['n']})"
    return text, _num(delta.get("p"), 2), _num(delta.get("p_holm"), 2)


def report_table(stage: str, rep: dict[str, Any]) -> Table:
    """One row per method: its chosen configuration, mean ± std (n), Δ against the reference
    with the t-interval, p and Holm-adjusted p, and its failed cells out of all."""
    metric = rep["metric"]
    better = "lower" if metric["lower_is_better"] else "higher"
    level = next((m["delta"]["level"] for m in rep["methods"].values() if m.get("delta")), 0.95)
    table = Table(
        "method",
        "chosen config",
        f"{metric['name']} mean ± std (n)",
        escape(f"Δ vs {rep.get('reference') or '-'} [{level:.0%} CI]"),
        "p",
        "p (Holm)",
        "failed / cells",
        "configs",
        title=f"{stage}: {metric['name']} ({better} is better)",
    )
    for name, m in rep["methods"].items():
        ref = name == rep.get("reference")
        std = f" ± {_num(m['std'])}" if m.get("std") is not None else ""
        delta, p, p_holm = fmt_delta(m.get("delta"), bool(metric["relative"]))
        table.add_row(
            escape(name) + (" (reference)" if ref else ""),
            escape((m.get("config") or "-") + _cfg_suffix(m.get("overrides"))),
            f"{_num(m.get('mean'))}{std} ({m.get('n', 0)})",
            escape(delta),
            p,
            p_holm,
            f"{m.get('failed', 0)} / {m.get('cells', 0)}",
            str(m.get("configs_tried", "")),
        )
    return table


def gap_table(stage: str, gap: dict[str, Any] | None) -> Table | None:
    """One row per method: its gap closed between the baseline student and the teacher, per
    downstream score (%); None when the report has none (no baseline or no teacher score)."""
    if not gap:
        return None
    names = sorted({k for m in gap["methods"].values() for k in m["gap_closed"]})
    table = Table(
        "method",
        "config",
        *(escape(n.removeprefix("harness/")) for n in names),
        title=escape(
            f"{stage}: gap closed vs baseline {gap['baseline']} ({gap['baseline_config']}) "
            "= (student − baseline) / (teacher − baseline)"
        ),
    )
    for name, m in gap["methods"].items():
        vals = [m["gap_closed"].get(n) for n in names]
        table.add_row(
            escape(name),
            escape(str(m["config"])),
            *("-" if v is None else f"{100 * v:.1f} %" for v in vals),
        )
    return table


def _cfg_suffix(overrides: dict[str, Any] | None) -> str:
    text = _overrides(overrides)
    return f"  {text}" if text else ""


@sweeps_app.command("report")
def report_cmd(
    sweep_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Per method: the config chosen on val, mean ± std (n), Δ vs the reference [CI], Holm p,
    failed cells; then the final (test) table."""

    def body() -> int:
        with client(url, key) as c:
            rep = check(c.get(f"/v1/sweeps/{sweep_id}/report"))
        if as_json:
            out.print_json(data=rep)
            return EXIT_OK
        for stage, note in (("tune", "selection_metric_note"), ("final", "final_metric_note")):
            if rep.get(stage):
                print_table(report_table(stage, rep[stage]))
                gaps = gap_table(stage, rep[stage].get("gap_closed"))
                if gaps is not None:
                    print_table(gaps)
                if rep.get(note):
                    out.print(f"[dim]note: {escape(rep[note])}[/dim]")
        if not rep.get("final"):
            out.print("[dim]no final stage (yet)[/dim]")
        for f in rep.get("failed_cells") or []:
            e = f.get("error") or {}
            out.print(
                f"[red]{escape(str(f['status']))}[/red] cell {f['index']} ({escape(f['stage'])} "
                f"{escape(f['config'])}, seed {f['seed']}, job {f['job_id']})"
                + (f": {escape(str(e.get('code')))}: {escape(str(e.get('message')))}" if e else "")
            )
        return EXIT_OK

    run(body)


@sweeps_app.command("cancel")
def cancel_cmd(
    sweep_id: str = typer.Argument(..., metavar="ID"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Cancel a sweep and every job of it that has not ended (idempotent)."""

    def body() -> int:
        with client(url, key) as c:
            sweep = check(c.post(f"/v1/sweeps/{sweep_id}/cancel"))
        out.print(f"{sweep['id']} {sweep['status']}")
        return EXIT_OK

    run(body)
