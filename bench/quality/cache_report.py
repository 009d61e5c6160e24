"""Teacher-logit cache against dense kd (issue 15), from a finished quality run::

    python -m bench.quality.cache_report --run runs/tcache-cache \\
        --out docs/results/teacher-cache-tiny-cpu.json
    python -m bench.quality.cache_report --from-json docs/results/teacher-cache-tiny-cpu.json

Every cache method is compared with the run's dense ``kd``, paired by seed (the same student
init and batches), as a % change of perplexity with a 95 % t-interval (`stats.summarise` with
``kd`` as the only baseline). The caches' sizes and build times come from their manifests in
the run's ``teacher-caches/``. Writes the raw per-cell results and the statistics as one
JSON file and prints the Markdown table of docs/results.md; ``--from-json`` recomputes the
statistics from that file's raw cells alone and prints the table again.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.quality.stats import summarise


def _cells(run: Path) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(run.glob("cells/*/seed*/result.json")):
        r = json.loads(f.read_text())
        out.setdefault(r["method"], {})[int(r["seed"])] = r
    return out


def _caches(run: Path) -> list[dict[str, Any]]:
    out = []
    for m in sorted(run.glob("teacher-caches/*/manifest.json")):
        d = json.loads(m.read_text())
        p = d["parts"]
        out.append(
            {
                "key": d["key"],
                "kind": d["kind"],
                "k": p["k"],
                "tail_samples": p.get("tail_samples", 0),
                "bytes": d["bytes"],
                "shards": len(d["shards"]),
                "positions": d["blocks"] * d["positions"],
                "build_s": d["build_s"],
                "temperature": p["temperature"],
                "dtype": p["dtype"],
            }
        )
    return out


def collect(run: Path, split: str = "val") -> dict[str, Any]:
    return _report(_cells(run), split, str(run), _caches(run))


def recompute(data: dict[str, Any]) -> dict[str, Any]:
    """The report again from a written JSON's raw cells (its statistics recomputed)."""
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    for r in data["cells"].values():
        cells.setdefault(r["method"], {})[int(r["seed"])] = r
    return _report(cells, data["split"], data["run"], data["caches"])


def _report(
    cells: dict[str, dict[int, dict[str, Any]]], split: str, run: str, caches: list[Any]
) -> dict[str, Any]:
    spec_of = {m: next(iter(by.values()))["spec"] for m, by in cells.items()}
    stats = summarise(cells, split, baselines=["kd"])
    return {
        "run": run,
        "split": split,
        "methods": {m: s.get("method") for m, s in spec_of.items()},
        "stats": stats,
        "caches": caches,
        "cells": {f"{m}/seed{s}": r for m, by in cells.items() for s, r in by.items()},
    }


def _f(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.2f}"  # one seed: no std


def render(data: dict[str, Any]) -> str:
    st = data["stats"]["methods"]
    caches = {(c["kind"], c["k"], c["tail_samples"]): c for c in data["caches"]}
    lines = [
        "| method | cache | val ppl (mean ± std) | Δ vs dense kd % [95% CI] | per-seed Δ % "
        "| cache MB | build s | train s (wall / cpu) | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(st, key=lambda m: (m != "kd", m))
    for m in order:
        s = st[m]
        tc = (data["methods"].get(m) or {}).get("teacher_cache") or {}
        if tc:
            kind = tc.get("kind", "topk")
            k = tc.get("samples", 12) if kind == "sampled" else tc.get("k", 32)
            est = "sampled" if kind == "sampled" else tc.get("estimator", "tail")
            n_tail = tc.get("tail_samples", 0)
            what = f"{kind} {k}, {est}" + (f" + {n_tail} tail draws" if n_tail else "")
            c = caches.get((kind, k, n_tail))
            mb = f"{c['bytes'] / 2**20:.1f}" if c else "–"
            build = f"{c['build_s']:.0f}" if c else "–"
        else:
            what, mb, build = "none (teacher forward)", "–", "–"
        d = s.get("delta_pct")
        if m == "kd" or d is None:
            delta = per = "—"
        else:
            delta = f"{d['mean']:+.2f}" + (
                f" [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else " (one seed)"
            )
            per = ", ".join(f"{v:+.2f}" for v in d["per_seed"].values())
        lines.append(
            f"| {m} | {what} | {s['ppl_mean']:.2f} ± {_f(s['ppl_std'])} | {delta} | {per} "
            f"| {mb} | {build} | {s['train_wall_s']:.0f} / {s['train_cpu_s']:.0f} "
            f"| {len(s['seeds'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality.cache_report")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a finished bench.quality run")
    src.add_argument("--from-json", type=Path, help="re-render a written JSON (recomputed)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    args = ap.parse_args(argv)
    if args.from_json:
        data = recompute(json.loads(args.from_json.read_text()))
    else:
        data = collect(args.run, args.split)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1, default=str))
    print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
