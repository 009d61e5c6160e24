"""``sharp jobs …``: the HTTP client of the job service (submit, list, show, watch, cancel,
retry, download).

Where the server and the key come from (first found wins):

1. ``--url`` / ``--key`` flags;
2. environment ``SHARP_URL`` / ``SHARP_API_KEY``;
3. a profile file with ``url`` and ``key``: ``$SHARP_CONFIG`` if set, else
   ``$XDG_CONFIG_HOME/sharp/config.toml`` (``~/.config/sharp/config.toml``) or, if that does not
   exist, ``config.json`` beside it.

Exit codes (stable; scripts may rely on them):

====  =========================================================================================
0     ok (``watch`` / ``submit --watch``: the job succeeded)
1     the job failed, or the server answered 5xx / something unexpected happened
2     bad input: the spec is invalid (checked locally, nothing is sent), a 4xx from the API
      (``error.code``, message and ``param`` are printed on stderr), bad flags, no key
3     the job was cancelled (``watch`` / ``submit --watch``)
4     cannot reach the server (connection refused, DNS, timeout, stream lost for good)
====  =========================================================================================

Results go to stdout (``submit`` prints only the job id, so ``ID=$(sharp jobs submit s.yaml)``
works); progress bars and errors go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ops.follow import (
    JobState,
    fmt_eta,
    fmt_params,
    follow_events,
    job_progress,
    progress_fields,
    pruned_summary,
)

# Reused from the demo, which verifies downloads the same way.
from sharp_core.train.checkpoint import sha256_file

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4

OUTCOME_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}

jobs_app = typer.Typer(help="Jobs on a SHARP service (over its HTTP API).", no_args_is_help=True)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Wide enough that no table is cut: piped output has no terminal width to fit.
UNCUT_WIDTH = 100_000


def print_table(table: Table, console: Console = out) -> None:
    """A table fitted to the terminal, or whole when the output is not one (a pipe, a file),
    so ids and URLs reach scripts uncut instead of ``job_01M8YNSE…``."""
    if console.is_terminal:
        console.print(table)
    else:  # print(width=) only narrows: a console of its own, as wide as the table wants
        Console(file=console.file, width=UNCUT_WIDTH, highlight=False).print(table)


# -- configuration ---------------------------------------------------------------------------


class CliExit(Exception):
    def __init__(self, code: int, message: str | None = None):
        super().__init__(message or "")
        self.code = code
        self.message = message


def _die(code: int, message: str) -> NoReturn:
    raise CliExit(code, message)


def profile_path() -> Path:
    explicit = os.environ.get("SHARP_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "sharp"
    toml = base / "config.toml"
    return toml if toml.exists() or not (base / "config.json").exists() else base / "config.json"


def read_profile(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib  # type: ignore[import-not-found,no-redef]
            data = tomllib.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        _die(EXIT_BAD_INPUT, f"cannot read the profile {path}: {e}")
    if not isinstance(data, dict):
        _die(EXIT_BAD_INPUT, f"the profile {path} must be a table / object")
    return data


@dataclass
class Conn:
    url: str
    key: str


def resolve_conn(url: str | None, key: str | None) -> Conn:
    """Flags > environment > profile file."""
    profile: dict[str, Any] | None = None

    def from_profile(name: str) -> str | None:
        nonlocal profile
        if profile is None:
            profile = read_profile(profile_path())
        value = profile.get(name)
        return str(value) if value else None

    url = url or os.environ.get("SHARP_URL") or from_profile("url")
    key = key or os.environ.get("SHARP_API_KEY") or from_profile("key")
    if not url:
        _die(
            EXIT_BAD_INPUT,
            f"no server URL: pass --url, set SHARP_URL or write a profile ({profile_path()})",
        )
    if not key:
        _die(
            EXIT_BAD_INPUT,
            f"no API key: pass --key, set SHARP_API_KEY or write a profile ({profile_path()})",
        )
    return Conn(url.rstrip("/"), key)


# -- HTTP ------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None,
        others: list[dict[str, Any]] | None = None,
    ):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.param = status, code, message, param
        #: The errors after the first (the body's ``errors`` list less its first entry).
        self.others = others or []


def check(r: httpx.Response) -> Any:
    """The JSON body, or ApiError with the service's ``{"error": {code, message, param}}``."""
    if r.status_code >= 400:
        try:
            body = r.json()["error"]
            raise ApiError(
                r.status_code,
                str(body.get("code")),
                str(body.get("message")),
                body.get("param"),
                list(body.get("errors") or [])[1:],
            )
        except (ValueError, KeyError, TypeError):
            raise ApiError(r.status_code, f"http_{r.status_code}", r.text[:500], None) from None
    return r.json()


def _error_lines(
    code: str, message: str, param: str | None, others: list[dict[str, Any]]
) -> list[str]:
    """One line per error: the first, then each other one a validation found."""
    lines = [f"{escape(code)}: {escape(message)}" + (f" (param {escape(param)})" if param else "")]
    for o in others:
        where = f" (param {escape(str(o['param']))})" if o.get("param") else ""
        lines.append(f"  and {escape(str(o.get('code')))}: {escape(str(o.get('message')))}{where}")
    return lines


def _report_api_error(e: ApiError) -> int:
    first, *rest = _error_lines(e.code, e.message, e.param, e.others)
    err.print(f"[red]error[/red] {e.status} {first}")
    for line in rest:
        err.print(line)
    return EXIT_BAD_INPUT if 400 <= e.status < 500 else EXIT_FAILED


@contextmanager
def client(url: str | None, key: str | None) -> Iterator[httpx.Client]:
    conn = resolve_conn(url, key)
    with httpx.Client(
        base_url=conn.url,
        headers={"Authorization": f"Bearer {conn.key}", "User-Agent": "sharp-cli"},
        timeout=httpx.Timeout(30.0, connect=10.0),
    ) as c:
        yield c


def run(fn: Any) -> NoReturn:
    """Run a command body and turn what it raises into the documented exit codes."""
    try:
        code = fn()
    except CliExit as e:
        if e.message:
            err.print(f"[red]error[/red] {escape(e.message)}")
        code = e.code
    except ApiError as e:
        code = _report_api_error(e)
    except httpx.TransportError as e:
        err.print(
            f"[red]error[/red] cannot reach the server: {escape(type(e).__name__)}: "
            f"{escape(str(e))}"
        )
        code = EXIT_UNREACHABLE
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        code = 130
    raise typer.Exit(code or 0)


UrlOpt = typer.Option(None, "--url", help="Server URL (else SHARP_URL, else the profile).")
KeyOpt = typer.Option(None, "--key", help="API key (else SHARP_API_KEY, else the profile).")


# -- watching --------------------------------------------------------------------------------


def watch_job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    """Follow a job's SSE stream with a progress bar on stderr; return the terminal job.

    The loop is `ops.follow.follow_events` (shared with the demo): reconnects with
    ``Last-Event-ID``, ``SSE_RETRIES`` failures in a row at most, then exit 4. Shows loss, the
    evaluation (perplexity, or accuracy and macro-F1 for a classifier) and each SHARP term.
    """
    job = check(c.get(f"/v1/jobs/{job_id}"))
    max_steps = int(job["progress"]["max_steps"])
    state = JobState(
        status=job["status"], step=int(job["progress"]["step"]), eta_s=job["progress"]["eta_s"]
    )
    # The latest value of each metric, so a finished job (no stream to follow) still shows
    # its final loss and evaluation.
    state.apply("metrics", {"metrics": [{"step": state.step, "values": job.get("metrics", {})}]})
    progress = job_progress(err, terms=True)

    shown: dict[str, Any] = {"pruned": None}  # the 'pruned' event last printed

    def refresh() -> None:
        if state.pruned is not None and state.pruned is not shown["pruned"]:
            shown["pruned"] = state.pruned  # a line of its own above the bar, once per event
            progress.console.print(escape(pruned_summary(state.pruned)))
        progress.update(
            task,
            completed=min(state.step, max_steps),
            description=f"{job_id} [{state.status}]",
            **progress_fields(state),
        )

    with progress:
        task = progress.add_task(
            job_id, total=max_steps, loss="-", eval="", terms="", tps="-", eta="-:--"
        )
        refresh()
        follow_events(c, job_id, state, refresh, check)
        if state.status == "succeeded":
            progress.update(task, completed=max_steps)
        refresh()
    return dict(check(c.get(f"/v1/jobs/{job_id}")))


def outcome(job: dict[str, Any]) -> int:
    status = job["status"]
    if status == "failed":
        e = job.get("error") or {}
        err.print(
            f"[red]job {job['id']} failed[/red]: {escape(str(e.get('code')))}: "
            f"{escape(str(e.get('message')))}"
        )
    elif status == "cancelled":
        err.print(f"[yellow]job {job['id']} cancelled[/yellow]")
    else:
        err.print(f"[green]job {job['id']} {status}[/green]")
    return OUTCOME_EXIT.get(status, EXIT_FAILED)


# -- commands --------------------------------------------------------------------------------


def read_spec_file(path: Path) -> dict[str, Any]:
    """Validate with `sharp_core.spec.load_spec`, then return the file's own mapping."""
    from sharp_core.errors import SharpError
    from sharp_core.spec import load_spec

    try:
        load_spec(path)
    except SharpError as e:
        first, *rest = _error_lines(e.code, e.message, e.param, [x.to_dict() for x in e.errors[1:]])
        err.print(f"[red]invalid spec[/red] {escape(str(path))}: {first}")
        for line in rest:
            err.print(line)
        raise CliExit(EXIT_BAD_INPUT) from None
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return dict(data)


@jobs_app.command("submit")
def submit_cmd(
    spec: Path = typer.Argument(..., help="A job spec, YAML or JSON (see docs/spec.md)."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Same key and spec → the same job (safe to rerun)."
    ),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the job until it ends."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Validate SPEC locally, submit it, print the job id (with --watch: follow it)."""

    def body() -> int:
        data = read_spec_file(spec)
        with client(url, key) as c:
            headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
            job = check(c.post("/v1/jobs", json={"spec": data}, headers=headers))
            out.print(job["id"])
            if not watch:
                return EXIT_OK
            return outcome(watch_job(c, job["id"]))

    run(body)


def plan_text(plan: dict[str, Any]) -> str:
    """The plan as the CLI prints it: memory by component, strategy, speed, cost, findings."""
    gb = 1e9
    lines = []
    pool = plan.get("pool") or {}
    mem = plan.get("memory") or {}
    cap = pool.get("gpu_memory_bytes")
    fits = {True: "fits", False: "does not fit", None: "fit unknown"}[plan.get("fits")]
    total = mem.get("per_gpu_bytes")
    lines.append(
        f"pool {pool.get('name')} ({pool.get('gpu_type') or 'card not declared'}"
        f"{'' if cap is None else f', {cap / gb:.0f} GB'}), {pool.get('gpus')} GPU(s): {fits}"
    )
    if total is not None:
        lines.append(
            f"memory per GPU: {total / gb:.2f} GB" + (" (partial)" if mem.get("partial") else "")
        )
        for k, v in (mem.get("components") or {}).items():
            lines.append(f"  {k:<22} {v / gb:8.3f} GB")
    st = plan.get("strategy") or {}
    lines.append("strategy: " + ", ".join(f"{k} {v}" for k, v in st.items() if v is not None))
    for lv in plan.get("levers") or []:
        lines.append(f"lever: {lv['field']} = {lv['value']} ({lv['reason']})")
    tp = plan.get("throughput") or {}
    if tp.get("tokens_per_s"):
        lines.append(
            f"throughput: {tp['tokens_per_s']:,.0f} tokens/s "
            f"({tp['low']:,.0f}–{tp['high']:,.0f}; {tp.get('source')})"
        )
        cost = plan.get("cost") or {}
        if cost.get("wall_hours") is not None:
            lo, hi = cost["gpu_hours_range"] or (None, None)
            lines.append(
                f"cost: {cost['wall_hours']:.2f} h wall, {cost['gpu_hours']:.2f} GPU-hours"
                + (f" ({lo:.2f}–{hi:.2f})" if lo is not None else "")
            )
    else:
        lines.append(f"throughput: {tp.get('source')}")
    for f in plan.get("findings") or []:
        lines.append(f"{f['severity']}: {f['code']}: {f['message']}")
    if plan.get("unknown"):
        lines.append("unknown: " + ", ".join(plan["unknown"]))
    return "\n".join(lines)


@jobs_app.command("plan")
def plan_cmd(
    spec: Path = typer.Argument(..., help="A job spec, YAML or JSON (see docs/spec.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print the API's answer as JSON."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """The plan of SPEC on its pool (memory per GPU, strategy, speed, cost, preflight),
    without queueing it (docs/planning.md)."""

    def body() -> int:
        data = read_spec_file(spec)
        with client(url, key) as c:
            answer = check(c.post("/v1/jobs/plan", json={"spec": data}))
        if as_json:
            out.print_json(json.dumps(answer))
        else:
            out.print(escape(plan_text(answer["plan"])))
        errors = [f for f in answer["plan"].get("findings") or [] if f["severity"] == "error"]
        return EXIT_BAD_INPUT if errors else EXIT_OK

    run(body)


def fmt_time(value: str | None) -> str:
    """An API timestamp as the CLIs print it (seconds, no 'T')."""
    return value.replace("T", " ")[:19] if value else ""


@jobs_app.command("list")
def list_cmd(
    status: str | None = typer.Option(
        None, "--status", "-s", help="Comma-separated statuses, e.g. queued,running."
    ),
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=100, help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON instead of a table."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """This team's jobs, newest first."""

    def body() -> int:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        with client(url, key) as c:
            page = check(c.get("/v1/jobs", params=params))
        if as_json:
            out.print_json(data=page)
            return EXIT_OK
        table = Table("id", "name", "status", "step", "loss", "created")
        for j in page["data"]:
            loss = j["metrics"].get("loss")
            table.add_row(
                j["id"],
                j["name"],
                j["status"],
                f"{j['progress']['step']}/{j['progress']['max_steps']}",
                "" if loss is None else f"{loss:.4f}",
                fmt_time(j["created_at"]),
            )
        print_table(table)
        return EXIT_OK

    run(body)


def _layer_map(per_layer: dict[str, list[int]]) -> str:
    return "  ".join(
        f"{layer}: [{', '.join(map(str, heads))}]" for layer, heads in per_layer.items()
    )


def print_pruning(p: dict[str, Any]) -> None:
    """The "pruned" section of ``sharp jobs show``: what was kept, the parameters before and
    after, the calibration, and the student's evaluation before any training."""
    before, after = int(p["params_before"]), int(p["params_after"])
    ratio = f", {after / before:.1%} of the teacher" if before else ""
    step0 = p.get("eval_at_step_0") or {}
    evals = []
    if step0.get("eval_ppl") is not None:
        evals.append(f"ppl {step0['eval_ppl']:.2f}")
    if step0.get("eval_accuracy") is not None:
        evals.append(f"accuracy {step0['eval_accuracy']:.3f}")
    if step0.get("eval_macro_f1") is not None:
        evals.append(f"macro-F1 {step0['eval_macro_f1']:.3f}")
    rows = [
        ("kept layers", f"[{', '.join(map(str, p['kept_layers']))}]"),
        ("heads", _layer_map(p["heads_per_layer"]) + "  (teacher layer: its heads kept)"),
    ]
    if p.get("kv_heads_per_layer"):
        rows.append(("kv heads", _layer_map(p["kv_heads_per_layer"])))
    sizes = [f"{k} {p[k]}" for k in ("ffn", "hidden") if p.get(k) is not None]
    if sizes:
        rows.append(("sizes", ", ".join(sizes)))
    rows += [
        (
            "params",
            f"{before:,} → {after:,} ({fmt_params(before)} → {fmt_params(after)}{ratio})",
        ),
        (
            "calibration",
            f"{p['calibration_samples']} samples in {p['calibration_s']:.2f} s "
            f"({p.get('scoring', '?')} scoring)",
        ),
        ("step 0", ("  ".join(evals) or "not evaluated yet") + "  (before any training)"),
    ]
    if p.get("note"):
        rows.append(("note", str(p["note"])))
    out.print("[bold]pruned[/bold] from the teacher")
    for label, value in rows:
        out.print(f"  {label:<13}{escape(value)}")


def evaluation_rows(ev: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(score, student, teacher, retained %) of every harness score (stderr beside the
    value), then answer quality: what ``sharp jobs show`` prints under "evaluation"."""
    scores = ev.get("scores") or {}
    teacher = ev.get("teacher_scores") or {}
    kept = ev.get("retained") or {}
    rows = []
    for name in sorted(n for n in scores if not n.endswith("_stderr")):
        short = name[len("harness/") :]
        err = scores.get(f"{name}_stderr")
        t = teacher.get(name)
        r = kept.get(f"retained/{short}")
        rows.append(
            (
                short,
                f"{scores[name]:.4f}" + (f" ± {err:.4f}" if err is not None else ""),
                f"{t:.4f}" if t is not None else "-",
                f"{100 * r:.1f} %" if r is not None else "-",
            )
        )
    for name, v in sorted((ev.get("answer_quality") or {}).items()):
        rows.append((name, f"{v:.4g}", "-", "-"))
    return rows


def print_evaluation(ev: dict[str, Any]) -> None:
    """The "evaluation" section of ``sharp jobs show``: each harness score beside the
    teacher's with retained = student / teacher, answer quality, and a failed evaluation."""
    rows = evaluation_rows(ev)
    if rows:
        reused = ev.get("teacher_scores_reused")
        note = {True: "  (teacher scores reused)", False: "  (teacher scores computed)"}
        out.print("[bold]evaluation[/bold]" + (note[reused] if isinstance(reused, bool) else ""))
        table = Table("score", "student", "teacher", "retained", title=None)
        for row in rows:
            table.add_row(*(escape(x) for x in row))
        out.print(table)
    if ev.get("error"):
        e = ev["error"]
        out.print(
            f"[yellow]evaluation failed[/yellow] {escape(str(e.get('code')))}: "
            f"{escape(str(e.get('message')))} (the trained student is kept)"
        )


@jobs_app.command("show")
def show_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Status, progress, latest metrics, what pruning kept (a pruned student) and error."""

    def body() -> int:
        with client(url, key) as c:
            job = check(c.get(f"/v1/jobs/{job_id}"))
        if as_json:
            out.print_json(data=job)
            return EXIT_OK
        p = job["progress"]
        out.print(f"[bold]{job['id']}[/bold]  {escape(job['name'])}")
        out.print(
            f"status    {job['status']}"
            + ("  (cancel requested)" if job.get("cancel_requested") else "")
        )
        out.print(
            f"progress  {p['step']}/{p['max_steps']}"
            + (f"  {p['tokens_per_s']:,.0f} tok/s" if p.get("tokens_per_s") else "")
            + (f"  ETA {fmt_eta(p['eta_s'])}" if p.get("eta_s") is not None else "")
        )
        out.print(f"queue     {job['queue']}  attempt {job['attempt']}/{job['max_attempts']}")
        out.print(
            f"created   {fmt_time(job['created_at'])}  started "
            f"{fmt_time(job.get('started_at')) or '-'}  finished "
            f"{fmt_time(job.get('finished_at')) or '-'}"
        )
        if job["metrics"]:
            table = Table("metric", "latest", title=None)
            for name, value in sorted(job["metrics"].items()):
                table.add_row(name, f"{value:.6g}")
            print_table(table)
        if job.get("pruning"):
            print_pruning(job["pruning"])
        if job.get("evaluation"):
            print_evaluation(job["evaluation"])
        if job.get("error"):
            e = job["error"]
            param = f" (param {e['param']})" if e.get("param") else ""
            out.print(
                f"[red]error[/red]     {escape(str(e['code']))}: "
                f"{escape(str(e['message']))}{escape(param)}"
            )
        return EXIT_OK

    run(body)


@jobs_app.command("watch")
def watch_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Live progress until the job ends; exit 0 succeeded, 1 failed, 3 cancelled."""

    def body() -> int:
        with client(url, key) as c:
            return outcome(watch_job(c, job_id))

    run(body)


def _post_action(job_id: str, action: str, url: str | None, key: str | None) -> None:
    def body() -> int:
        with client(url, key) as c:
            job = check(c.post(f"/v1/jobs/{job_id}/{action}"))
        out.print(f"{job['id']} {job['status']}")
        return EXIT_OK

    run(body)


@jobs_app.command("cancel")
def cancel_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Cancel a job (idempotent; a running job saves a checkpoint first)."""
    _post_action(job_id, "cancel", url, key)


@jobs_app.command("retry")
def retry_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Queue a failed or cancelled job again (it resumes from its newest checkpoint)."""
    _post_action(job_id, "retry", url, key)


def _target(root: Path, name: str) -> Path:
    """Where a listed file goes; names are remote input, so never outside `root`."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()) or target == root.resolve():
        _die(EXIT_FAILED, f"unsafe file name in the checkpoint listing: {name!r}")
    return target


def download_files(
    c: httpx.Client, job_id: str, step: int | None, dest: Path | None, with_state: bool = False
) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """Download one checkpoint file by file; return (folder, files, names resumed).

    A file is written to ``NAME.part`` and renamed once its sha256 matches the listing; an
    existing ``.part`` is resumed with ``Range`` + ``If-Range`` (the ETag is the sha256, so a
    changed file restarts from zero); a complete file whose sha256 matches is skipped.
    """
    from service.artifacts import checkpoint_dir_name, is_student_file

    ckpts = check(c.get(f"/v1/jobs/{job_id}/checkpoints"))["data"]
    if not ckpts:
        _die(EXIT_BAD_INPUT, f"job {job_id} has no checkpoint yet")
    if step is None:
        ckpt = max(ckpts, key=lambda k: k["step"])
    else:
        found = [k for k in ckpts if k["step"] == step]
        if not found:
            steps = ", ".join(str(k["step"]) for k in sorted(ckpts, key=lambda k: k["step"]))
            _die(EXIT_BAD_INPUT, f"job {job_id} has no checkpoint at step {step} (has {steps})")
        ckpt = found[0]
    folder = dest if dest is not None else Path(job_id) / checkpoint_dir_name(ckpt["step"])
    folder.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = [
        f for f in ckpt["files"] if with_state or is_student_file(f["name"])
    ]
    resumed: list[str] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    with progress:
        task = progress.add_task(f"step {ckpt['step']}", total=sum(f["size"] for f in files))
        for meta in files:
            name, size, sha = meta["name"], int(meta["size"]), meta["sha256"]
            target = _target(folder, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha:
                progress.advance(task, size)
                continue
            part = target.with_name(target.name + ".part")
            have = part.stat().st_size if part.is_file() else 0
            if have > size:
                part.unlink()
                have = 0
            headers: dict[str, str] = {}
            if 0 < have < size:
                headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha}"'}
            url = f"/v1/jobs/{job_id}/checkpoints/{ckpt['step']}/files/{name}"
            if have < size:
                with c.stream(
                    "GET", url, headers=headers, timeout=httpx.Timeout(10.0, read=120.0)
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        check(r)
                    mode = "ab" if r.status_code == 206 else "wb"
                    if r.status_code == 206:
                        resumed.append(name)
                        progress.advance(task, have)
                    with part.open(mode) as f:
                        for chunk in r.iter_bytes(1 << 20):
                            f.write(chunk)
                            progress.advance(task, len(chunk))
            else:
                progress.advance(task, size)
            got = sha256_file(part)
            if got != sha:
                part.unlink()
                _die(
                    EXIT_FAILED,
                    f"{name}: sha256 {got} does not match the listing ({sha}); "
                    "the partial file was removed, run the command again",
                )
            part.replace(target)
    return folder, files, resumed


@jobs_app.command("download")
def download_cmd(
    job_id: str = typer.Argument(..., metavar="ID"),
    step: int | None = typer.Option(None, "--step", help="Checkpoint step (default: the last)."),
    dest: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the files (default: ./ID/step_NNNNNN)."
    ),
    with_state: bool = typer.Option(
        False, "--with-state", help="Also the sharded training state (dcp/), to resume elsewhere."
    ),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Download a checkpoint's student (resumable, sha256-verified); print the folder."""

    def body() -> int:
        with client(url, key) as c:
            folder, files, resumed = download_files(c, job_id, step, dest, with_state)
        for name in resumed:
            err.print(f"resumed {escape(name)}")
        err.print(f"{len(files)} files, sha256 verified")
        out.print(str(folder))
        return EXIT_OK

    run(body)
