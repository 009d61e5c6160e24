"""``python -m bench.quality.sweep``: a sweep (the service's format) trained on this machine.

    python -m bench.quality.sweep --preset tiny-cpu --out runs/equal-budget \\
        --sweep bench/quality/sweeps/equal-budget.json --jobs 2 \\
        --json docs/results/equal-budget-tiny-cpu.json
    python -m bench.quality.sweep --from-json docs/results/equal-budget-tiny-cpu.json

The sweep file holds the `axes`, `tune`, `reference` and `final` of a ``POST /v1/sweeps``
request; its `base` is the preset's student spec (teacher, data and budget of the run). The
cells are expanded by `sharp_core.study.sweep` and compared by `sharp_core.study.compare`, the service's
own code: what differs is only where a cell trains (here, a process of this machine; there, a
GPU worker). A cell's value is the perplexity of its final checkpoint on the run's val.txt
(tune stage) or test.txt (final stage), by `sharp_core.evaluate.perplexity.perplexity`, the loop behind
the job's `val_ppl` / `test_ppl` metrics. Tuning never computes a test perplexity.

The raw per-cell results go into ``--json``; ``--from-json`` recomputes every table from them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import host_info
from bench.quality.cells import RunContext, atomic_write, prepare_teacher, run_cell
from bench.quality.data import write_splits
from bench.quality.grid import base_spec
from bench.quality.presets import PRESETS, Preset
from bench.quality.report import fmt
from bench.quality.run import _run_parallel
from sharp_core.study.compare import compare, metric_for
from sharp_core.study.sweep import Cell, expand, final_cells, parse_sweep

_KEEP = (
    "method",
    "config",
    "seed",
    "stage",
    "overrides",
    "steps",
    "eval_curve",
    "train_wall_s",
    "train_cpu_s",
    "tokens_per_s",
    "final_eval_loss",
)


def _run_cells(ctx: RunContext, cells: list[Cell], jobs: int, log: Any) -> list[dict[str, Any]]:
    """Train (or reuse) every cell; each cell's folder is cells/<config>/seed<k>."""
    specs = {(c.config, c.seed): c for c in cells}
    done: dict[tuple[str, int], dict[str, Any]] = {}

    def record(name: str, seed: int, res: dict[str, Any], skipped: bool) -> None:
        done[(name, seed)] = res
        p = res["ppl"][ctx.split]["ppl"]
        log(f"{name}/seed{seed}: {ctx.split} ppl {p:.3f}{' (done before)' if skipped else ''}")

    def spec_of(name: str, seed: int) -> dict[str, Any]:
        return specs[(name, seed)].spec

    # round-robin over methods: an interrupted run leaves every method equally far along
    rank: dict[str, int] = {}
    order = []
    for c in cells:
        rank[c.method] = rank.get(c.method, -1) + 1
        order.append((rank[c.method], c))
    todo = [(c.config, c.seed) for _, c in sorted(order, key=lambda rc: rc[0])]
    if jobs <= 1:
        for name, seed in todo:
            record(name, seed, *run_cell(ctx, name, seed, spec_of(name, seed)))
    else:
        _run_parallel(ctx, todo, spec_of, record, jobs)
    out = []
    for c in cells:
        res = done[(c.config, c.seed)]
        row = {k: res.get(k) for k in _KEEP}
        row.update(
            method=c.method,
            config=c.config,
            seed=c.seed,
            stage=c.stage,
            overrides=c.overrides,
            status="completed",
            val_ppl=res["ppl"]["val"]["ppl"],
            test_ppl=res["ppl"]["test"]["ppl"] if "test" in res["ppl"] else None,
        )
        out.append(row)
    return out


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    """Both stages' comparisons from the raw cells (what --from-json recomputes)."""
    ref = data["sweep"].get("reference")
    tune = [dict(c, value=c["val_ppl"]) for c in data["cells"] if c["stage"] == "tune"]
    out: dict[str, Any] = {
        "tune": compare(tune, metric=metric_for("causal_lm", "val"), reference=ref)
    }
    final = [c for c in data["cells"] if c["stage"] == "final"]
    if final:
        out["final"] = compare(
            [dict(c, value=c["test_ppl"]) for c in final],
            metric=metric_for("causal_lm", "test"),
            reference=ref,
            best=out["tune"]["best"],
        )
        out["final_val"] = compare(
            [dict(c, value=c["val_ppl"]) for c in final],
            metric=metric_for("causal_lm", "val"),
            reference=ref,
            best=out["tune"]["best"],
        )
        # SHARP against the best other method, that method picked on val (never on test)
        tuned = out["tune"]["methods"]
        others = [m for m in tuned if m != "sharp" and tuned[m]["mean"] is not None]
        if "sharp" in tuned and others:
            best_other = min(others, key=lambda m: tuned[m]["mean"])
            out["final_vs_best_baseline"] = compare(
                [dict(c, value=c["test_ppl"]) for c in final],
                metric=metric_for("causal_lm", "test"),
                reference=best_other,
                best=out["tune"]["best"],
            )
        for key in ("final", "final_val", "final_vs_best_baseline"):  # the tuning budget
            for m, e in out.get(key, {}).get("methods", {}).items():
                e["configs_tried"] = tuned[m]["configs_tried"] if m in tuned else 0
    return out


def run_sweep(
    preset: Preset,
    out: Path,
    sweep_file: dict[str, Any],
    *,
    teacher: str | None = None,
    device: str | None = None,
    jobs: int = 1,
    log: Any = print,
) -> dict[str, Any]:
    """Tune, choose each method's configuration on val, re-train it on the fresh seeds and
    evaluate test once. Resumable: finished cells are read back, not retrained."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    splits = write_splits(preset, out)
    tctx = RunContext(preset, out, "val", device, log)
    t = prepare_teacher(tctx, teacher)
    base = base_spec(preset, out, str(out / t["path"]))
    sweep = parse_sweep({**sweep_file, "base": base})
    tune_cells = expand(sweep)
    log(f"{len(tune_cells)} tuning cells; teacher val ppl {t['ppl']['val']['ppl']:.3f}")
    rows = _run_cells(tctx, tune_cells, jobs, log)
    data: dict[str, Any] = {
        "preset": preset.name,
        "sweep": {k: v for k, v in sweep_file.items() if k != "base"},
        "base": base,
        "splits": splits,
        "teacher": {"path": t["path"], "ppl": t["ppl"]},
        "cells": rows,
    }
    if sweep.final is not None:
        chosen_keys = analyse(data)["tune"]["best"]
        by_key = {c.config: c.overrides for c in tune_cells}
        chosen = {m: by_key[k] for m, k in chosen_keys.items()}
        log(f"chosen on val: {chosen}")
        fctx = RunContext(preset, out, "test", device, log)
        rows += _run_cells(fctx, final_cells(sweep, chosen), jobs, log)
        fctx.add_split(t, out / t["path"], out / "teacher" / "result.json")
        data["teacher"]["ppl"] = t["ppl"]
    data["machine"] = host_info()
    data["written_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return data


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _row(name: str, m: dict[str, Any], ref: str | None, relative: bool) -> str:
    d = m.get("delta")
    unit = "%" if relative else ""
    if d is None:
        delta = "reference" if name == ref else "–"
        ci = p = "–"
    else:
        delta = f"{d['mean']:+.2f}{unit} (n={d['n']})"
        ci = f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d.get("ci") else "–"
        p = f"{_p(d['p'])} / {_p(d['p_holm'])}" if d.get("p") is not None else "–"
    over = {k: v for k, v in (m.get("overrides") or {}).items() if k != "method.name"}
    cfg = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(over.items())) or "defaults"
    return (
        f"| {name} | {fmt(m['mean'], 3)} ± {fmt(m['std'], 3)} (n={m['n']}, failed "
        f"{m['failed']}) | {delta} | {ci} | {p} | {m['configs_tried']} | {cfg} |"
    )


def render(data: dict[str, Any], stats: dict[str, Any]) -> str:
    lines = [
        f"Preset `{data['preset']}`; teacher val ppl {data['teacher']['ppl']['val']['ppl']:.3f}"
        + (
            f", test ppl {data['teacher']['ppl']['test']['ppl']:.3f}"
            if "test" in data["teacher"]["ppl"]
            else ""
        )
        + ".",
        "",
    ]
    for title, key in (
        ("Tuning (val, the chosen configuration of each method)", "tune"),
        ("Final (test, fresh seeds, configurations chosen on val)", "final"),
        ("Final cells on val (the same fresh seeds)", "final_val"),
        ("Final (test) against the best baseline on val", "final_vs_best_baseline"),
    ):
        s = stats.get(key)
        if not s:
            continue
        rel = s["metric"]["relative"]
        lines += [
            f"### {title}",
            "",
            f"| method | {s['metric']['name']} mean ± std | Δ vs {s['reference']} (paired) | "
            "95% CI | p / Holm p | configs tried | chosen config |",
            "|---|---|---|---|---|---|---|",
        ]
        order = sorted(
            s["methods"],
            key=lambda m: (s["methods"][m]["mean"] is None, s["methods"][m]["mean"] or 0.0),
        )
        lines += [_row(m, s["methods"][m], s["reference"], rel) for m in order]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.quality.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", choices=list(PRESETS))
    ap.add_argument("--out", type=Path, help="run folder (resumable)")
    ap.add_argument("--sweep", type=Path, help="JSON: axes, tune, reference, final")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the raw per-cell results")
    ap.add_argument("--from-json", type=Path, default=None, help="recompute from raw results")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        if not (args.preset and args.out and args.sweep):
            ap.error("--preset, --out and --sweep are needed (or --from-json)")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        data = run_sweep(
            PRESETS[args.preset],
            args.out,
            json.loads(args.sweep.read_text()),
            teacher=args.teacher,
            device=args.device,
            jobs=args.jobs,
        )
        atomic_write(args.out / "sweep-results.json", json.dumps(data, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1))
    text = render(data, analyse(data))
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
