"""``sharp demo``: the whole product in one command, on the embedded stack, through the API.

Why it goes through HTTP instead of calling the library: the demo is the proof that a
clean clone, with no Postgres or Redis installed, serves the real path a team uses — upload a
corpus, submit a teacher job, submit a student whose teacher is that job, follow both live
over Server-Sent Events, download the student archive and check it against its manifest.

The pipeline (`sharp_core.demo`): a 4-layer GPT-2 teacher trained from scratch on the text
of Python's own documentation (`pydoc_data.topics`, inside every CPython), then a 2-layer
student distilled from it with SHARP. If a ``sharp up`` already runs from the same var
directory the demo uses it and leaves it running; otherwise it starts the stack for the
length of the command and stops it at the end (or on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console

from ops.embedded import (
    EmbeddedError,
    EmbeddedStack,
    banner,
    become_subreaper,
    ignoring_signals,
    interrupt_on_sigterm,
    read_running,
)
from ops.follow import JobState, StreamLost, follow_events, job_progress, progress_fields
from service.artifacts import is_student_file
from sharp_core.train.checkpoint import sha256_file


class DemoError(RuntimeError):
    pass


# -- HTTP helpers ----------------------------------------------------------------------------


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
            detail = f"{err.get('code')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError):
            detail = r.text[:500]
        raise DemoError(f"{what} failed ({r.status_code}) {detail}")
    return r.json()


def upload_corpus(client: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        r = client.post("/v1/uploads", files={"file": (path.name, f, "text/plain")})
    return _check(r, "upload")


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    return _check(client.post("/v1/jobs", json={"spec": spec}), f"submitting {spec['name']}")


# -- following a job -------------------------------------------------------------------------


def follow(
    client: httpx.Client, job: dict[str, Any], label: str, console: Console
) -> dict[str, Any]:
    """Show a progress bar fed by the job's SSE stream (`ops.follow`); return the job once it
    has succeeded, raise `DemoError` otherwise."""
    job_id = job["id"]
    max_steps = int(job["progress"]["max_steps"])
    state = JobState()
    progress = job_progress(console)

    def refresh() -> None:
        progress.update(
            task,
            completed=min(state.step, max_steps),
            description=f"{label} [{state.status}]",
            **progress_fields(state),
        )

    with progress:
        task = progress.add_task(label, total=max_steps, loss="-", eval="", tps="-", eta="-:--")
        refresh()
        try:
            follow_events(
                client, job_id, state, refresh, lambda r: _check(r, f"following {job_id}")
            )
        except StreamLost as e:
            raise DemoError(str(e)) from e
        if state.status == "succeeded":
            progress.update(task, completed=max_steps)
        refresh()
    final = _check(client.get(f"/v1/jobs/{job_id}"), f"reading {job_id}")
    if final["status"] != "succeeded":
        err = final.get("error") or state.error or {}
        raise DemoError(
            f"{label} job {job_id} ended {final['status']}: "
            f"{err.get('code', '?')}: {err.get('message', '')}"
        )
    return final


# -- the student download --------------------------------------------------------------------


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files only, never outside `dest` (the archive is remote input)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not member.isfile() or not target.is_relative_to(root):
            raise DemoError(f"unsafe archive member {member.name!r}")
    tar.extractall(dest)  # noqa: S202 - every member checked above


def download_checkpoint(client: httpx.Client, job_id: str, dest_root: Path) -> tuple[Path, int]:
    """Download the newest checkpoint's archive, extract it, verify every file's sha256.

    Returns the extracted folder and how many files were verified. Three sources must agree:
    the API's checkpoint listing, the manifest inside the archive, and the bytes on disk.
    """
    ckpts = _check(client.get(f"/v1/jobs/{job_id}/checkpoints"), "listing checkpoints")["data"]
    if not ckpts:
        raise DemoError(f"job {job_id} has no checkpoint")
    ckpt = max(ckpts, key=lambda c: c["step"])
    step = ckpt["step"]
    dest_root.mkdir(parents=True, exist_ok=True)
    archive = dest_root / f"{job_id}-step_{step:06d}.tar"
    with client.stream(
        "GET",
        f"/v1/jobs/{job_id}/checkpoints/{step}/archive",
        timeout=httpx.Timeout(10.0, read=120.0),
    ) as r:
        if r.status_code >= 400:
            r.read()
            _check(r, "downloading the archive")
        with archive.open("wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
    out = dest_root / job_id
    with tarfile.open(archive) as tar:
        _safe_extract(tar, out)
    folders = [p.parent for p in out.glob("*/manifest.json")]
    if len(folders) != 1:
        raise DemoError(f"expected one checkpoint folder in {archive}, found {len(folders)}")
    folder = folders[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    # the archive holds the student; the sharded training state (dcp/) stays in the store
    listed = {f["name"]: f["sha256"] for f in ckpt["files"] if is_student_file(f["name"])}
    files = {n: m for n, m in manifest.get("files", {}).items() if is_student_file(n)}
    if not files or set(files) != set(listed):
        raise DemoError("the archive's manifest and the API's file list differ")
    for name, meta in files.items():
        got = sha256_file(folder / name)
        if got != meta["sha256"] or got != listed[name]:
            raise DemoError(f"{name}: sha256 {got} does not match the manifest")
    archive.unlink()
    return folder.resolve(), len(files)


def sample(folder: Path, prompt: str = "The for statement", tokens: int = 24) -> str | None:
    """Load the student with ``from_pretrained`` and continue a prompt (proof it is usable)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=tokens,
                do_sample=False,
                no_repeat_ngram_size=3,
                pad_token_id=tok.eos_token_id or 0,
            )
        return str(tok.decode(out[0], skip_special_tokens=True))
    except Exception as e:  # noqa: BLE001 - the sample is a courtesy, the checks are above
        return f"(could not sample: {type(e).__name__}: {e})"


# -- the command -----------------------------------------------------------------------------


def cancel_all(client: httpx.Client, job_ids: list[str], console: Console) -> None:
    """Cancel what this demo queued, so an interrupted demo leaves no job for the next start."""
    for job_id in job_ids:
        try:
            r = client.post(f"/v1/jobs/{job_id}/cancel", timeout=10)
        except httpx.HTTPError as e:
            console.print(f"could not cancel {job_id}: {e}")
            continue
        if r.status_code == 202:
            console.print(f"cancelled {job_id}")


def run_pipeline(
    client: httpx.Client,
    var_dir: Path,
    console: Console,
    teacher_steps: int,
    student_steps: int,
    submitted: list[str],
) -> dict[str, Any]:
    from sharp_core.demo import student_spec, teacher_spec, write_demo_corpus

    work = var_dir / "demo"
    corpus = write_demo_corpus(work / "pydoc_topics.txt")
    upload = upload_corpus(client, corpus)
    console.print(f"uploaded {corpus.name}: {upload['size']:,} bytes, id {upload['id']}")
    dataset = {"source": "upload", "upload_id": upload["id"]}

    t0 = time.monotonic()
    teacher = submit(client, teacher_spec(dataset, teacher_steps))
    submitted.append(teacher["id"])
    console.print(f"teacher job {teacher['id']} (4-layer GPT-2 from scratch, method sft)")
    teacher = follow(client, teacher, "teacher", console)
    t1 = time.monotonic()

    student = submit(client, student_spec({"job": teacher["id"]}, dataset, student_steps))
    submitted.append(student["id"])
    console.print(
        f"student job {student['id']} (2-layer GPT-2, method sharp, "
        f"teacher {{'job': '{teacher['id']}'}})"
    )
    student = follow(client, student, "student", console)
    t2 = time.monotonic()

    folder, n_files = download_checkpoint(client, student["id"], work / "student")
    console.print(f"downloaded the student: {n_files} files, sha256 verified against the manifest")
    return {
        "teacher": teacher,
        "student": student,
        "folder": folder,
        "teacher_s": t1 - t0,
        "student_s": t2 - t1,
    }


def run_demo(
    var_dir: Path, port: int, teacher_steps: int, student_steps: int, do_sample: bool = True
) -> int:
    console = Console(highlight=False, soft_wrap=True)
    var_dir = var_dir.resolve()
    start = time.monotonic()
    become_subreaper()
    stack: EmbeddedStack | None = None
    try:
        with interrupt_on_sigterm():
            running = read_running(var_dir)
            if running is not None and running.api_key:
                url, key = running.url, running.api_key
                console.print(f"using the service already running at {url} (pid {running.pid})")
            else:
                stack = EmbeddedStack(var_dir, port=port, log=lambda m: console.print(f"[dim]{m}"))
                stack.start()
                for line in banner(stack):
                    console.print(line, soft_wrap=True)
                url, key = stack.url, stack.api_key
            submitted: list[str] = []
            with httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {key}"},
                timeout=httpx.Timeout(30.0),
            ) as client:
                try:
                    result = run_pipeline(
                        client, var_dir, console, teacher_steps, student_steps, submitted
                    )
                except KeyboardInterrupt:
                    with ignoring_signals():
                        cancel_all(client, submitted, console)
                    raise
            text = sample(result["folder"]) if do_sample else None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except (DemoError, EmbeddedError) as e:
        console.print(f"[red]demo failed:[/red] {e}")
        if stack is not None:
            for child in stack.children:
                console.print(stack.tail(child, 10), soft_wrap=True)
        return 1
    finally:
        if stack is not None:
            console.print("[dim]stopping the embedded service…")
            with ignoring_signals():  # a second Ctrl-C must not leave children behind
                stack.stop()

    t_ppl = result["teacher"]["metrics"].get("eval_ppl")
    s_ppl = result["student"]["metrics"].get("eval_ppl")
    console.print()
    console.print(
        f"teacher eval perplexity: {t_ppl:.2f}" if t_ppl else "teacher eval perplexity: ?"
    )
    console.print(
        f"student eval perplexity: {s_ppl:.2f}" if s_ppl else "student eval perplexity: ?"
    )
    console.print(
        f"teacher {result['teacher_s']:.0f}s, student {result['student_s']:.0f}s, "
        f"demo total {time.monotonic() - start:.0f}s"
    )
    if text:
        console.print(f"student sample: {text!r}", soft_wrap=True)
    console.print(f"student: {result['folder']}", soft_wrap=True)
    return 0


def demo_command(
    var_dir: Path = typer.Option(
        Path("var"),
        "--var-dir",
        envvar="SHARP_VAR_DIR",
        help="The embedded service's directory (as for `sharp up`).",
    ),
    port: int = typer.Option(
        0, "--port", "-p", help="API port if the demo starts the service (0: any free port)."
    ),
    teacher_steps: int = typer.Option(300, help="Teacher training steps."),
    student_steps: int = typer.Option(200, help="Student distillation steps."),
    do_sample: bool = typer.Option(
        True, "--sample/--no-sample", help="Load the student and print a short greedy sample."
    ),
) -> None:
    """Train a teacher and distil a SHARP student through the service; print where it is."""
    raise typer.Exit(run_demo(var_dir, port, teacher_steps, student_steps, do_sample))
