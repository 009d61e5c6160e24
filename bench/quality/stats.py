"""Statistics over seeds: mean ± std, the paired Δ against the best baseline, its interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from bench.quality.grid import BASELINES

#: Two-sided 95% Student-t quantiles by degrees of freedom (n − 1 seeds).
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def _t95(df: int) -> float:
    if df <= 0:
        return math.nan
    keys = sorted(_T95)
    for k in reversed(keys):
        if df >= k:
            return _T95[k]
    return _T95[1]


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else math.nan)


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
        mean, std = _mean_std(ppl)
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
        for name, st in methods.items():
            common = [s for s in st["seeds"] if s in methods[best]["seeds"]]
            d = [
                100
                * (cells[name][s]["ppl"][split]["ppl"] / cells[best][s]["ppl"][split]["ppl"] - 1)
                for s in common
            ]
            if not d:
                continue
            dm, ds = _mean_std(d)
            se = ds / math.sqrt(len(d)) if len(d) > 1 else math.nan
            half = _t95(len(d) - 1) * se
            st["delta_pct"] = {
                "mean": dm,
                "std": ds,
                "se": se,
                "ci95": [dm - half, dm + half],
                "n": len(d),
                "per_seed": dict(zip(map(str, common), d, strict=True)),
            }
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
