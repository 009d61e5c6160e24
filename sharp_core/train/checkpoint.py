"""Checkpoints written atomically with a sha256 manifest.

Why: a job may be killed at any instant (preemption, OOM, a full disk). A checkpoint folder
therefore appears under its final name only once every file in it is fsynced and listed in
`manifest.json` with its sha256; readers (resume, the API's listing and downloads) trust
only folders whose manifest verifies. Layout of `out_dir`:

    step_000500/
        config.json, model.safetensors, tokenizer files   (the consolidated student:
                            save_pretrained layout, what users download)
        dcp/.metadata, dcp/__R_0.distcp   (student, optimizer, learned basis: sharded by
                            torch.distributed.checkpoint, one file per rank; any world size
                            resumes from it)
        training_state.pt   (step, scaler, RNG of every rank, data position; loaded weights_only)
        spec.json           (the fully resolved spec that trained it)
        manifest.json       ({"step", "files": {name: {"sha256", "size"}}, "metrics"}), last

Older checkpoints have no ``dcp/``: their optimizer is inside ``training_state.pt`` and
their weights are ``model.safetensors`` (`sharp_core.train.state.resume` reads both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sharp_core.errors import ArtifactWriteError, CheckpointError
from sharp_core.files import MANIFEST, fsync_dir, sha256_file

DCP_DIR = "dcp"  # the sharded training state (torch.distributed.checkpoint), inside a step folder
STEP_RE = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def temporary_dir(out_dir: Path, step: int) -> Path:
    """A fresh hidden folder in ``out_dir`` that a checkpoint of ``step`` is written into
    (removed by `clean_temporaries` if the writer dies before `commit_checkpoint`)."""
    tmp = out_dir / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise ArtifactWriteError(f"cannot write checkpoint {tmp}: {e}") from e
    return tmp


def commit_checkpoint(
    out_dir: Path, step: int, tmp: Path, metrics: dict[str, float] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Make the files in ``tmp`` the checkpoint of ``step``: fsync and hash every file (in
    sub-folders too), write the manifest last, rename ``tmp`` to ``step_NNNNNN``.

    Raises ArtifactWriteError (and removes ``tmp``) on any OSError.
    """
    final = out_dir / step_dir_name(step)
    try:
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
                files[p.relative_to(tmp).as_posix()] = {
                    "sha256": sha256_file(p),
                    "size": p.stat().st_size,
                }
        for d in sorted({p.parent for p in tmp.rglob("*") if p.parent != tmp}, reverse=True):
            fsync_dir(d)  # sub-folders (the sharded state's) hold renamed files too
        manifest = {"step": step, "files": files, "metrics": metrics or {}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # a rewrite of the same step (e.g. a retried final save): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactWriteError(f"cannot write checkpoint {final}: {e}") from e
    return final, manifest


def write_checkpoint(
    out_dir: Path,
    step: int,
    write_files: Callable[[Path], None],
    metrics: dict[str, float] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write a checkpoint: `write_files(tmp)` fills a temporary folder, then `commit_checkpoint`.

    Raises ArtifactWriteError (and leaves nothing behind under a step_ name) on any OSError.
    """
    tmp = temporary_dir(out_dir, step)
    try:
        write_files(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactWriteError(
            f"cannot write checkpoint {out_dir / step_dir_name(step)}: {e}"
        ) from e
    return commit_checkpoint(out_dir, step, tmp, metrics)


def verify_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The manifest, if every listed file exists with its size and sha256; else CheckpointError."""
    mpath = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: unreadable manifest: {e}") from None
    for name, info in manifest.get("files", {}).items():
        p = ckpt_dir / name
        if not p.is_file() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{ckpt_dir}: {name} does not match its manifest")
    return manifest


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking step folders (temporary ones excluded), oldest first. Not verified."""
    if not out_dir.is_dir():
        return []
    out = []
    for p in out_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (a corrupt newer one is skipped)."""
    for _, p in reversed(list_checkpoints(out_dir)):
        try:
            verify_manifest(p)
            return p
        except CheckpointError:
            continue
    return None


#: The eval metric that names a job's best checkpoint (lower is better), kept by retention.
BEST_METRIC = "eval_loss"


def retained_steps(checkpoints: list[tuple[int, dict[str, Any]]], keep: int) -> set[int]:
    """Retention: the newest `keep` steps and the best one by `BEST_METRIC` (the newest of
    equals), from (step, metrics) pairs. One policy for the local folder and the store."""
    steps = sorted(step for step, _ in checkpoints)
    kept = set(steps[-keep:]) if keep > 0 else set()
    scored = [
        (float(m[BEST_METRIC]), -step)
        for step, m in checkpoints
        if isinstance((m or {}).get(BEST_METRIC), (int, float))
        and float(m[BEST_METRIC]) == float(m[BEST_METRIC])  # not NaN
    ]
    if scored:
        kept.add(-min(scored)[1])
    return kept


def prune_checkpoints(out_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` checkpoints and the best by eval; returns the deleted
    steps."""
    cps = list_checkpoints(out_dir)

    def metrics(p: Path) -> dict[str, Any]:
        try:
            return json.loads((p / MANIFEST).read_text()).get("metrics") or {}
        except (OSError, ValueError):
            return {}

    kept = retained_steps([(step, metrics(p)) for step, p in cps], keep)
    removed = []
    for step, p in cps:
        if step not in kept:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(step)
    return removed


def clean_temporaries(out_dir: Path) -> None:
    """Remove leftovers of checkpoints interrupted mid-write."""
    if out_dir.is_dir():
        for p in out_dir.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
