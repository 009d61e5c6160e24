"""Statistics over seeds for the benchmarks, all computed by `sharp_core.study.compare` (the code the
service's sweep report runs): mean ± std, paired Δ against a reference, its Student-t interval
and p-value. Here only the benchmarks' dict shapes are kept (``ci95``, ``per_seed`` …), so the
JSON they wrote before still reads the same way."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.quality.grid import BASELINES
from sharp_core.study.compare import mean_std, paired


def delta(
    xs: Mapping[Any, float], refs: Mapping[Any, float], *, relative: bool = True
) -> dict[str, Any] | None:
    """`compare.paired` over the seeds both have (keys may be str, as read back from JSON), in
    the benchmarks' shape: mean, std, se, ci95 (95 %), p, n, per_seed. None without a common
    seed; std/se/ci95/p are None for one seed."""
    d = paired(
        {int(k): float(v) for k, v in xs.items()},
        {int(k): float(v) for k, v in refs.items()},
        relative=relative,
        level=0.95,
    )
    if d is None:
        return None
    return {
        "mean": d["mean"],
        "std": d["std"],
        "se": d["se"],
        "ci95": d["ci"],
        "p": d["p"],
        "n": d["n"],
        "per_seed": d["per_seed"],
    }


def interval(xs: Mapping[Any, float]) -> dict[str, Any] | None:
    """Mean of per-seed values with a one-sample 95 % t-interval: `delta` against zero."""
    return delta(xs, dict.fromkeys(xs, 0.0), relative=False)


def summarise(
    cells: dict[str, dict[int, dict[str, Any]]],
    split: str,
    baselines: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """Per-method statistics and the paired comparison with the best baseline (the lowest
    mean perplexity among `baselines`: every non-SHARP method, tuned variants included)."""
    methods: dict[str, dict[str, Any]] = {}
    for name, by_seed in cells.items():
        seeds = sorted(by_seed)
        ppl = [by_seed[s]["ppl"][split]["ppl"] for s in seeds]
        mean, std = mean_std(ppl)
        speeds = [by_seed[s]["tokens_per_s"] for s in seeds if by_seed[s].get("tokens_per_s")]
        methods[name] = {
            "seeds": seeds,
            "ppl": dict(zip(map(str, seeds), ppl, strict=True)),
            "ppl_mean": mean,
            "ppl_std": std,
            "tokens_per_s": statistics.fmean(speeds) if speeds else None,
            "train_wall_s": statistics.fmean(by_seed[s]["train_wall_s"] for s in seeds),
            "train_cpu_s": statistics.fmean(by_seed[s]["train_cpu_s"] for s in seeds),
        }
    baselines = [m for m in baselines if m in methods]
    best = min(baselines, key=lambda m: methods[m]["ppl_mean"]) if baselines else None
    if best is not None:
        ref = {s: cells[best][s]["ppl"][split]["ppl"] for s in methods[best]["seeds"]}
        for name, st in methods.items():
            d = delta({s: cells[name][s]["ppl"][split]["ppl"] for s in st["seeds"]}, ref)
            if d is not None:
                st["delta_pct"] = d
    return {"best_baseline": best, "methods": methods}


def cosine_summary(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and last-point cosine per term pair, averaged over seeds, for cells that have them."""
    out: dict[str, dict[str, Any]] = {}
    for name, by_seed in cells.items():
        keys = sorted({k for r in by_seed.values() for k in r.get("cosines", {})})
        if not keys:
            continue
        out[name] = {}
        for k in keys:
            series = [r["cosines"][k] for r in by_seed.values() if k in r.get("cosines", {})]
            means = [statistics.fmean(v for _, v in s) for s in series]
            lasts = [s[-1][1] for s in series]
            out[name][k] = {
                "mean": statistics.fmean(means),
                "last": statistics.fmean(lasts),
                "points": statistics.fmean(len(s) for s in series),
            }
    return out
