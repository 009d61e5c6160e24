"""`python -m sharp_core train SPEC --out DIR` and `python -m sharp_core eval --model DIR --data FILE`.

Exit codes scripts can rely on: 0 success, 1 an internal error, 2 bad input (spec, model,
data, tokenizer: the message names the field or the cause), 3 stopped before the end
(``--stop-at``, or SIGTERM: the loop checkpoints first, and the same command resumes).

A spec with ``resources.gpus: N > 1`` re-executes itself under torchrun with N processes
(`sharp_core.train.launch.torchrun_command`, as the worker does); rank 0 shows the progress
and writes the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from sharp_core.errors import SharpError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SHARP distillation library.")
err = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
#: Under torchrun, where rank 0 leaves its exit code for the launching command: torchrun
#: itself only says 0 or 1 (and calls any non-zero rank a failure, a stop included).
EXIT_CODE_ENV = "SHARP_EXIT_CODE_FILE"


def _exit(code: int) -> None:
    from sharp_core.train.launch import env_rank

    path = os.environ.get(EXIT_CODE_ENV)
    if path:
        if env_rank() == 0:
            Path(path).write_text(str(code))
        if code == EXIT_STOPPED:
            code = 0  # a stop is not a failure; the launching command exits 3
    raise typer.Exit(code)


def _fail(e: SharpError) -> None:
    err.print(f"[bold red]error[/] {escape(str(e))}")
    _exit(EXIT_BAD_INPUT if not e.retryable or e.status < 500 else 1)


def _torchrun(nproc: int) -> int:
    """Run this same command as `nproc` ranks under torchrun; rank 0's exit code."""
    import subprocess
    import tempfile

    from sharp_core.train.launch import torchrun_command

    cmd = torchrun_command(nproc, ["sharp_core", *sys.argv[1:]], shutdown_timeout_s=600)
    with tempfile.TemporaryDirectory(prefix="sharp-") as d:
        code_file = Path(d) / "exit_code"
        proc = subprocess.Popen(cmd, env={**os.environ, EXIT_CODE_ENV: str(code_file)})
        # SIGTERM to this process reaches torchrun, which forwards it to every rank (they
        # checkpoint and stop); Ctrl-C reaches torchrun directly (same process group).
        prev_term = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        prev_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            rc = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, prev_term)
            signal.signal(signal.SIGINT, prev_int)
        try:
            return int(code_file.read_text())
        except (OSError, ValueError):
            return rc or 1


def _run_with_bar(
    job,
    out: Path,
    *,
    device: str | None = None,
    quiet: bool = False,
    stop_at: int | None = None,
    metrics_jsonl: Path | None = None,
):
    """Run `train` with a rich progress bar: step, loss, tokens/s, eval perplexity, ETA."""
    from sharp_core.train.loop import TrainCallbacks
    from sharp_core.train.loop import train as run

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )

    class Bar(TrainCallbacks):
        def __init__(self) -> None:
            self.task = progress.add_task(job.name, total=job.training.max_steps, info="loading…")
            self.eval = ""
            self.step = 0
            self.signalled = False

        def should_stop(self) -> bool:
            return self.signalled or (stop_at is not None and self.step >= stop_at)

        def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
            self.step = step
            if metrics_jsonl is not None:
                with metrics_jsonl.open("a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            if "eval_ppl" in metrics:
                self.eval = _ppls(metrics, ".2f")
            info = self.eval
            if "loss" in metrics:
                info = f"loss {metrics['loss']:.4f} {metrics['tokens_per_s']:.0f} tok/s" + self.eval
            progress.update(self.task, completed=step, info=info)

    bar = Bar()

    def _on_sigterm(_sig: int, _frame: object) -> None:
        bar.signalled = True  # checkpoint at the next step, then exit 3

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with progress:
            return run(job, out, callbacks=bar, device=device)
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def train(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (checkpoints; resumes if present).")
    ],
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if any).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    stop_at: Annotated[
        int | None,
        typer.Option(min=1, help="Checkpoint and stop (exit 3) once this step is done."),
    ] = None,
    metrics_jsonl: Annotated[
        Path | None, typer.Option(help="Append every metrics record to this JSON-lines file.")
    ] = None,
) -> None:
    """Train or distil a student from SPEC; resumes from the newest checkpoint in --out."""
    from sharp_core.spec import load_spec
    from sharp_core.train import launch

    try:
        job = load_spec(spec)
    except SharpError as e:
        _fail(e)
        return
    if job.resources.gpus > 1 and not launch.under_torchrun():
        try:
            launch.check_world(job, job.resources.gpus)
        except SharpError as e:
            _fail(e)
            return
        raise typer.Exit(_torchrun(job.resources.gpus))

    main_rank = launch.env_rank() == 0
    try:
        result = _run_with_bar(
            job,
            out,
            device=device,
            quiet=quiet or not main_rank,
            stop_at=stop_at,
            metrics_jsonl=metrics_jsonl if main_rank else None,
        )
    except SharpError as e:
        _fail(e)
        return
    if main_rank:
        err.print(
            f"{result.status} at step {result.step}; checkpoint: {result.checkpoint}"
            + (";" + _ppls(result.metrics, ".3f") if "eval_ppl" in result.metrics else "")
        )
    _exit(0 if result.status == "completed" else EXIT_STOPPED)


def _ppls(metrics: dict[str, float], fmt: str) -> str:
    """' eval ppl 12.34', with the evaluation sets' (' val ppl …', ' test ppl …') when named."""
    return "".join(
        f" {name} ppl {metrics[f'{name}_ppl']:{fmt}}"
        for name in ("eval", "val", "test")
        if f"{name}_ppl" in metrics
    )


@app.command("eval")
def evaluate(
    model: Annotated[
        Path, typer.Option("--model", help="A save_pretrained folder (a checkpoint).")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="Text file (txt, jsonl with 'text', parquet).")
    ],
    seq_len: Annotated[int, typer.Option(min=8)] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    device: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Print the perplexity of MODEL on DATA (packed into SEQ_LEN blocks)."""
    from sharp_core.evaluate.perplexity import perplexity

    try:
        loss, n = perplexity(model, data, seq_len=seq_len, batch_size=batch_size, device=device)
    except SharpError as e:
        _fail(e)
        return
    typer.echo(f"loss {loss:.4f}  perplexity {math.exp(loss):.3f}  tokens {n}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes its runs.")] = Path(
        "var/demo"
    ),
    teacher_steps: Annotated[int, typer.Option(min=1)] = 300,
    student_steps: Annotated[int, typer.Option(min=1)] = 200,
) -> None:
    """Standalone demo: a small teacher on Python's docs text, then a SHARP student."""
    from sharp_core.demo import student_spec, teacher_spec, write_demo_corpus
    from sharp_core.spec import parse_spec

    corpus = write_demo_corpus(out / "corpus.txt")
    t = _run_with_bar(parse_spec(teacher_spec(str(corpus), teacher_steps)), out / "teacher")
    s = _run_with_bar(
        parse_spec(student_spec(str(t.checkpoint), str(corpus), student_steps)), out / "student"
    )
    typer.echo(f"teacher eval perplexity {t.metrics['eval_ppl']:.2f}  ({t.checkpoint})")
    typer.echo(f"student eval perplexity {s.metrics['eval_ppl']:.2f}  ({s.checkpoint})")
    typer.echo(f"the distilled student is at {s.checkpoint.resolve()}")


def main() -> None:
    app(prog_name="python -m sharp_core")


if __name__ == "__main__":
    main()
