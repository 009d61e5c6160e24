"""One run of the table: the teacher, every cell (in parallel processes if asked), the report."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import host_info
from bench.quality.cells import (
    RunContext,
    SanityCheckError,
    atomic_write,
    prepare_teacher,
    run_cell,
    sanity_message,
)
from bench.quality.data import write_splits
from bench.quality.grid import base_spec, cell_spec, method_table
from bench.quality.presets import Preset
from bench.quality.report import fmt, make_plots, render_markdown
from bench.quality.stats import cosine_summary, summarise


def _cell_worker(
    preset: Preset,
    run_dir: Path,
    split: str,
    device: str | None,
    name: str,
    seed: int,
    spec_dict: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    import torch

    torch.set_num_threads(1)
    return run_cell(RunContext(preset, run_dir, split, device), name, seed, spec_dict)


def _run_parallel(
    ctx: RunContext, todo: list[tuple[str, int]], spec_of: Any, record: Any, jobs: int
) -> str | None:
    """Cells in `jobs` worker processes; finished (skipped) cells are read here. On a refusal
    the pending cells are cancelled (the running ones finish and keep their results)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = []
    for name, seed in todo:
        done_file = ctx.run_dir / "cells" / name / f"seed{seed}" / "result.json"
        if done_file.is_file():
            refusal = record(name, seed, *run_cell(ctx, name, seed, spec_of(name, seed)))
            if refusal:
                return refusal
        else:
            pending.append((name, seed))
    if not pending:
        return None
    refusal = None
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = {
            ex.submit(
                _cell_worker,
                ctx.preset,
                ctx.run_dir,
                ctx.split,
                ctx.device,
                name,
                seed,
                spec_of(name, seed),
            ): (name, seed)
            for name, seed in pending
        }
        waiting = set(futures)
        while waiting and refusal is None:
            finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for f in finished:
                name, seed = futures[f]
                refusal = record(name, seed, *f.result()) or refusal
        if refusal is not None:
            for f in waiting:
                f.cancel()
    return refusal


@dataclass
class RunSummary:
    run_dir: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


def run(
    preset: Preset,
    out: Path,
    *,
    teacher: str | None = None,
    methods: Sequence[str] | None = None,
    seeds: int | None = None,
    split: str = "val",
    sharp_overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    base_overrides: dict[str, Any] | None = None,
    device: str | None = None,
    jobs: int = 1,
    log: Any = print,
) -> RunSummary:
    """Build (or complete) the table in `out`. Raises SanityCheckError after writing the
    refusal into results.json / results.md.

    jobs > 1 trains that many cells at once, in worker processes of one torch thread each
    (small models use two cores better as two single-threaded runs than as one two-threaded
    one); the first cell (sft, seed 0) runs alone first, so the sanity check can refuse a
    useless teacher before any distillation cell starts."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = out.resolve()
    if split not in ("val", "test"):
        raise ValueError("split must be 'val' or 'test'")
    out.mkdir(parents=True, exist_ok=True)
    table = method_table(preset, sharp_overrides, variants)
    order = list(
        methods or preset.methods or [m for m in table if not m.startswith(("var-", "cache-"))]
    )
    order += [f"var-{v}" for v in variants or {} if f"var-{v}" not in order]
    # every method that is not SHARP is a baseline (a tuned TinyBERT variant included)
    baselines = [m for m in order if table[m]["name"] != "sharp"]
    unknown = [m for m in order if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(table)}")
    if "sft" in order:  # the teacher-free student first: a useless teacher is refused at once
        order.remove("sft")
        order.insert(0, "sft")
    n_seeds = seeds or preset.seeds
    ctx = RunContext(preset, out, split, device, log)
    splits = write_splits(preset, out)
    t = prepare_teacher(ctx, teacher)
    t_ppl = t["ppl"][split]["ppl"]
    log(f"teacher: {split} ppl {t_ppl:.3f} ({t['path']})")
    # an absolute teacher path stays absolute
    base = base_spec(preset, out, str(out / t["path"]), base_overrides)
    summary = RunSummary(out)
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    refusal = None
    best_student: tuple[str, float] | None = None
    # seed-major: a complete first seed early; sft/seed0 first and alone (sanity pre-check)
    todo = [(name, seed) for seed in range(n_seeds) for name in order]

    def record(name: str, seed: int, res: dict[str, Any], skipped: bool) -> str | None:
        nonlocal best_student
        key = f"{name}/seed{seed}"
        (summary.skipped if skipped else summary.trained).append(key)
        cells.setdefault(name, {})[seed] = res
        p = res["ppl"][split]["ppl"]
        log(
            f"{key}: {split} ppl {p:.3f}"
            + (
                " (done before, skipped)"
                if skipped
                else f", {res['train_wall_s']:.0f} s wall, {res['train_cpu_s']:.0f} s cpu, "
                f"{fmt(res['tokens_per_s'], 0)} tok/s"
            )
        )
        if best_student is None or p < best_student[1]:
            best_student = (key, p)
        return sanity_message(t_ppl, key, p, preset.sanity_ratio, split)

    def spec_of(name: str, seed: int) -> dict[str, Any]:
        return cell_spec(base, table[name], seed)

    if jobs <= 1:
        for name, seed in todo:
            refusal = record(name, seed, *run_cell(ctx, name, seed, spec_of(name, seed)))
            if refusal:
                break
    else:
        refusal = record(*todo[0], *run_cell(ctx, *todo[0], spec_of(*todo[0])))
        if not refusal:
            refusal = _run_parallel(ctx, todo[1:], spec_of, record, jobs)

    report: dict[str, Any] = {
        "preset": {
            "name": preset.name,
            "description": preset.description,
            "seq_len": preset.seq_len,
            "training": preset.training,
            "student_config": preset.student_config,
            "teacher_config": preset.teacher_config if t.get("trained") else None,
        },
        "split": split,
        "splits": splits,
        "seeds": list(range(n_seeds)),
        "order": order,
        "methods": {m: table[m] for m in order},
        "sharp_overrides": sharp_overrides or {},
        "base_overrides": base_overrides or {},
        "variants": variants or {},
        "teacher": t,
        "sanity": {
            "ok": refusal is None,
            "message": refusal,
            "ratio": preset.sanity_ratio,
            "best_student": best_student[0] if best_student else None,
            "best_student_ppl": best_student[1] if best_student else None,
        },
        "machine": host_info(),
        "baselines": baselines,
        "summary": summarise(cells, split, baselines),
        "cosines": cosine_summary(cells),
        "cells": {f"{m}/seed{s}": r for m, by in cells.items() for s, r in by.items()},
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    report["plots"] = make_plots(report, cells, out)
    atomic_write(out / "results.json", json.dumps(report, indent=1))
    atomic_write(out / "results.md", render_markdown(report))
    summary.report = report
    if refusal:
        summary.refused = refusal
        raise SanityCheckError(refusal)
    return summary
