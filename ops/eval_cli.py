"""``sharp eval …``: evaluation jobs over the HTTP API (docs/evaluation.md): score a finished
job's checkpoint, a local folder or a hub model on harness tasks and a prompt set, without
training. An evaluation is a job, so ``show`` and ``watch`` are those of ``sharp jobs``.
Connection, profile and exit codes are those of ``sharp jobs`` (`ops.client_cli`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.markup import escape

from ops.client_cli import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CliExit,
    KeyOpt,
    UrlOpt,
    check,
    client,
    err,
    out,
    outcome,
    run,
    show_cmd,
    watch_cmd,
    watch_job,
)

eval_app = typer.Typer(
    help="Evaluation jobs: harness tasks and answer quality without training.",
    no_args_is_help=True,
)


def read_eval_spec(path: Path) -> dict[str, Any]:
    """The file's mapping, validated locally (`sharp_core.spec.parse_evaluation_spec`)."""
    from sharp_core.errors import SharpError
    from sharp_core.spec import parse_evaluation_spec

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        parse_evaluation_spec(data)
    except (OSError, ValueError, yaml.YAMLError) as e:
        err.print(f"[red]cannot read[/red] {escape(str(path))}: {escape(str(e))}")
        raise CliExit(EXIT_BAD_INPUT) from None
    except SharpError as e:
        param = f" (param {e.param})" if e.param else ""
        err.print(
            f"[red]invalid evaluation[/red] {escape(str(path))}: {e.code}: "
            f"{escape(e.message)}{escape(param)}"
        )
        raise CliExit(EXIT_BAD_INPUT) from None
    return dict(data)


@eval_app.command("submit")
def submit_cmd(
    spec: Path = typer.Argument(..., help="An evaluation spec, YAML or JSON."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow it until it ends."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Validate SPEC locally, submit it, print the job id (with --watch: follow it)."""

    def body() -> int:
        data = read_eval_spec(spec)
        with client(url, key) as c:
            headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
            job = check(c.post("/v1/evaluations", json={"spec": data}, headers=headers))
            out.print(job["id"])
            if not watch:
                return EXIT_OK
            return outcome(watch_job(c, job["id"]))

    run(body)


eval_app.command("show")(show_cmd)
eval_app.command("watch")(watch_cmd)
