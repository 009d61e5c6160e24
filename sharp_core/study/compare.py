"""The one comparison of a sweep's cells: mean ± std per configuration, the best configuration
per method on val, paired per-seed differences against a reference with Student-t intervals,
and Holm's correction over the methods compared (docs/sweeps.md, "The report").

The service's sweep report and ``bench.quality`` both call `compare`, so every number in
docs/results.md is computed by the code users run. Inputs are plain dicts, one per cell.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CellResult",
    "compare",
    "holm",
    "mean_std",
    "paired",
    "metric_for",
    "metric_named",
    "choose_best",
    "gap_closed",
    "gaps_closed",
]

#: cell dict: {"method", "config", "seed", "status", "value" (float | None), "overrides"}
CellResult = dict[str, Any]
#: Statuses of a cell that has not ended yet (neither a value nor a failure).
PENDING = ("queued", "running", "cancelling", "scheduled", "pending")


def metric_for(task: str, split: str) -> dict[str, Any]:
    """What a report compares: perplexity (lower is better, Δ in % of the reference) for
    language models; accuracy (higher is better, Δ in points) for classifiers."""
    if task == "sequence_classification":
        return {"name": f"{split}_accuracy", "lower_is_better": False, "relative": False}
    return {"name": f"{split}_ppl", "lower_is_better": True, "relative": True}


def metric_named(name: str) -> dict[str, Any]:
    """A metric chosen by name (a sweep's ``selection_metric``): perplexity and loss are
    lower-is-better with Δ in % of the reference; scores (accuracy, harness, ROUGE-L,
    retained) are higher-is-better with Δ in points."""
    lower = name.endswith(("_ppl", "_loss"))
    return {"name": name, "lower_is_better": lower, "relative": name.endswith("_ppl")}


def mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else None)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m = len(order)
    out: dict[str, float] = {}
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out


def paired(
    xs: dict[int, float], refs: dict[int, float], *, relative: bool, level: float = 0.95
) -> dict[str, Any] | None:
    """Per-seed Δ (100·(x/ref − 1) if relative, else x − ref) over the seeds both have: mean,
    std, standard error, the two-sided Student-t interval and the paired t-test p-value."""
    seeds = sorted(set(xs) & set(refs))
    if not seeds:
        return None
    d = [100.0 * (xs[s] / refs[s] - 1.0) if relative else xs[s] - refs[s] for s in seeds]
    m, sd = mean_std(d)
    out: dict[str, Any] = {
        "n": len(d),
        "mean": m,
        "std": sd,
        "se": None,
        "ci": None,
        "p": None,
        "level": level,
        "per_seed": {str(s): v for s, v in zip(seeds, d, strict=True)},
    }
    if len(d) > 1 and sd is not None:
        # imported here: scipy.stats takes over a second to import, and the API and the
        # worker import this module at start
        from scipy import stats as _st

        se = sd / math.sqrt(len(d))
        q = float(_st.t.ppf(0.5 + level / 2, len(d) - 1))
        out["se"] = se
        out["ci"] = [m - q * se, m + q * se]
        out["p"] = (
            1.0
            if se == 0 and m == 0
            else (0.0 if se == 0 else float(2 * _st.t.sf(abs(m / se), len(d) - 1)))
        )
    return out


def _configs(cells: Iterable[CellResult]) -> dict[str, dict[str, Any]]:
    """Cells grouped by configuration, with counts by status (failed cells stay visible)."""
    out: dict[str, dict[str, Any]] = {}
    for c in cells:
        g = out.setdefault(
            c["config"],
            {
                "config": c["config"],
                "method": c["method"],
                "overrides": c.get("overrides", {}),
                "cells": 0,
                "by_status": {},
                "values": {},
            },
        )
        g["cells"] += 1
        g["by_status"][c["status"]] = g["by_status"].get(c["status"], 0) + 1
        v = c.get("value")
        if c["status"] == "completed" and v is not None and math.isfinite(v):
            g["values"][int(c["seed"])] = float(v)
    for g in out.values():
        vals = list(g["values"].values())
        g["n"] = len(vals)
        g["mean"], g["std"] = mean_std(vals) if vals else (None, None)
        g["failed"] = g["cells"] - g["n"] - sum(g["by_status"].get(s, 0) for s in PENDING)
    return out


def choose_best(configs: dict[str, dict[str, Any]], lower_is_better: bool) -> dict[str, str]:
    """method → its configuration with the best mean (ties: more cells, then the key)."""
    best: dict[str, str] = {}
    sign = 1.0 if lower_is_better else -1.0
    for key, g in sorted(configs.items()):
        if g["mean"] is None:
            continue
        cur = best.get(g["method"])
        if cur is None or (sign * g["mean"], -g["n"]) < (
            sign * configs[cur]["mean"],
            -configs[cur]["n"],
        ):
            best[g["method"]] = key
    return best


def compare(
    cells: Sequence[CellResult],
    *,
    metric: dict[str, Any],
    reference: str | None = None,
    best: dict[str, str] | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """The report of one stage. `best` (method → config) fixes the compared configurations
    (the final stage uses the ones chosen on val); by default they are chosen here.

    Returns {"metric", "configs", "best", "reference", "methods"}: per method, its chosen
    configuration's mean ± std, and its paired Δ against the reference's chosen
    configuration with a t-interval, p-value and Holm-adjusted p over the methods compared."""
    configs = _configs(cells)
    lower = bool(metric["lower_is_better"])
    chosen = dict(best) if best is not None else choose_best(configs, lower)
    methods_seen = list(dict.fromkeys(c["method"] for c in cells))
    if reference is None:
        reference = "kd" if "kd" in chosen else (next(iter(chosen), None))
    ref_cfg = chosen.get(reference) if reference else None
    methods: dict[str, Any] = {}
    for m in methods_seen:
        key = chosen.get(m)
        g = configs.get(key) if key else None
        entry: dict[str, Any] = {
            "config": key,
            "overrides": g["overrides"] if g else None,
            "mean": g["mean"] if g else None,
            "std": g["std"] if g else None,
            "n": g["n"] if g else 0,
            "cells": g["cells"] if g else sum(1 for c in cells if c["method"] == m),
            "failed": g["failed"]
            if g
            else sum(
                1 for c in cells if c["method"] == m and c["status"] in ("failed", "cancelled")
            ),
            "configs_tried": sum(1 for x in configs.values() if x["method"] == m),
            "delta": None,
        }
        if g and ref_cfg and m != reference:
            entry["delta"] = paired(
                g["values"], configs[ref_cfg]["values"], relative=metric["relative"], level=level
            )
        methods[m] = entry
    ps = {
        m: e["delta"]["p"] for m, e in methods.items() if e["delta"] and e["delta"]["p"] is not None
    }
    for m, p in holm(ps).items():
        methods[m]["delta"]["p_holm"] = p
    return {
        "metric": metric,
        "reference": reference,
        "best": chosen,
        "methods": methods,
        "configs": {
            k: {kk: vv for kk, vv in g.items() if kk != "values"}
            | {"values": {str(s): v for s, v in sorted(g["values"].items())}}
            for k, g in configs.items()
        },
    }


def gap_closed(student: float, baseline: float, teacher: float) -> float | None:
    """The share of the baseline→teacher gap a student closed: (student − baseline) /
    (teacher − baseline); 1 = the teacher's score, 0 = no better than the baseline, negative =
    worse. None when the teacher equals the baseline (no gap) or a value is not finite."""
    gap = teacher - baseline
    if gap == 0 or not all(math.isfinite(x) for x in (student, baseline, teacher)):
        return None
    return (student - baseline) / gap


def _mean_scores(cells: Iterable[CellResult], key: str) -> dict[str, float]:
    """Each score's mean over the cells that have it (a score's name → mean)."""
    acc: dict[str, list[float]] = {}
    for c in cells:
        for name, v in (c.get(key) or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                acc.setdefault(name, []).append(float(v))
    return {n: statistics.fmean(vs) for n, vs in sorted(acc.items())}


def gaps_closed(
    cells: Sequence[CellResult], *, best: dict[str, str], reference: str | None
) -> dict[str, Any] | None:
    """Gap closed per method against the baseline student (the reference method's chosen
    configuration, the same baseline the paired Δ uses), for every downstream score the
    teacher has: means over each configuration's completed cells. `cells` carry
    ``scores`` (the student's, by metric name) and ``teacher`` (its teacher's scores, same
    names). None when there is no baseline, no other method, or no teacher score."""
    ref_cfg = best.get(reference) if reference else None
    if ref_cfg is None:
        return None

    def of(method: str, config: str) -> list[CellResult]:
        return [
            c
            for c in cells
            if c["method"] == method and c["config"] == config and c["status"] == "completed"
        ]

    base_cells = of(str(reference), ref_cfg)
    baseline = _mean_scores(base_cells, "scores")
    methods: dict[str, Any] = {}
    for m, cfg in best.items():
        if m == reference:
            continue
        mine = of(m, cfg)
        student, teacher = _mean_scores(mine, "scores"), _mean_scores(mine, "teacher")
        gaps: dict[str, float | None] = {}
        for name, t in teacher.items():
            if name.endswith("_stderr") or name not in student or name not in baseline:
                continue
            gaps[name] = gap_closed(student[name], baseline[name], t)
        if gaps:
            methods[m] = {"config": cfg, "n": len(mine), "teacher": teacher, "gap_closed": gaps}
    if not methods:
        return None
    return {
        "baseline": reference,
        "baseline_config": ref_cfg,
        "baseline_n": len(base_cells),
        "baseline_scores": {k: v for k, v in baseline.items() if not k.endswith("_stderr")},
        "methods": methods,
    }
