"""The grid of cells: one base spec plus a table of per-method overrides, never copies of code.

An ablation is exactly one spec flag away from ``sharp``; ``sharp`` itself is the spec's
*default* SHARP (``MethodSpec()``), so when the defaults change this table follows.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.quality.presets import Preset
from sharp_core.spec import MethodSpec

BASELINES: tuple[str, ...] = ("sft", "kd", "rkl", "skl", "srkl", "jsd", "tinybert", "minilm")


#: kd read from a teacher-logit cache (docs/teacher-cache.md), run only when named (--methods):
#: top-k with the tail bucket at three k, the renormalised top-k, RS-KD's 12 draws, and the
#: top-32 with 12 draws from the tail.
CACHE_METHODS: dict[str, dict[str, Any]] = {
    "cache-topk8": {"kind": "topk", "k": 8},
    "cache-topk32": {"kind": "topk", "k": 32},
    "cache-topk128": {"kind": "topk", "k": 128},
    "cache-topk32-renorm": {"kind": "topk", "k": 32, "estimator": "renormalized"},
    "cache-sampled12": {"kind": "sampled", "samples": 12},
    "cache-topk32-tail12": {"kind": "topk", "k": 32, "tail_samples": 12},
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` merged in, dicts recursively."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """['granularities.layer=0.1', 'rank=16'] → {'granularities': {'layer': 0.1}, 'rank': 16}.

    Values are parsed as JSON when they parse (numbers, true/false, lists), else kept as text.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, last = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def sharp_base(sharp_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SHARP method dict every SHARP cell starts from: the spec's defaults + overrides."""
    d = MethodSpec().model_dump(mode="json")
    # fields every method shares (kd_weight, temperature…) stay in the base spec, so `--set
    # method.kd_weight=…` reaches every cell; only SHARP's own knobs live here
    keep = (
        "granularities",
        "rank",
        "basis",
        "decomposition",
        "normalization",
        "layer_map",
        "attention_weight",
        "attention_schedule",
        "attention_anneal_fraction",
        "conflict",
    )
    base = {"name": "sharp", **{k: d[k] for k in keep}}
    return deep_merge(base, sharp_overrides or {})


def method_table(
    preset: Preset,
    sharp_overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict]:
    """Method name → overrides of the base spec's ``method`` section.

    The SHARP ablations are each one flag away from ``sharp``:

    * ``sharp-no-{layer,head,token}``: that granularity's weight set to 0;
    * ``sharp-direct``: decomposition 'direct' (per-head MSE on the whole projected map),
      weighted by the *sum* of the granularity weights, so that if every component had the
      same relative error e, both objectives would equal (Σ w_g)·e;
    * ``sharp-rank{r}``: two other ranks (rank/4 and 2·rank unless the preset names them);
    * ``sharp-learned``: the learned orthonormal basis; ``sharp-pcgrad``: conflict 'pcgrad'.

    ``variants`` (name → overrides of the SHARP base) add ``var-<name>`` methods: the variant
    search runs them in the same run folder as the baselines, which are then not retrained.
    """
    sharp = sharp_base(sharp_overrides)
    n = int(preset.training["max_steps"])
    diag = {"interference_every": max(1, n // preset.interference_points)}
    table: dict[str, dict] = {b: {"name": b} for b in BASELINES}
    table["sharp"] = {**sharp, **diag}
    for g in ("layer", "head", "token"):
        table[f"sharp-no-{g}"] = deep_merge(sharp, {"granularities": {g: 0.0}})
    w = sharp["granularities"]
    direct_w = sum(float(w[g]) for g in ("layer", "head", "token", "residual"))
    table["sharp-direct"] = {
        **sharp,
        "decomposition": "direct",
        "attention_weight": direct_w,
        **diag,
    }
    rank = int(sharp["rank"])
    ranks = preset.other_ranks or (max(1, rank // 4), min(2 * rank, preset.seq_len))
    for r in ranks:
        if r != rank:
            table[f"sharp-rank{r}"] = {**sharp, "rank": int(r)}
    table["sharp-learned"] = {**sharp, "basis": "learned"}
    table["sharp-pcgrad"] = {**sharp, "conflict": "pcgrad"}
    for name, cache in CACHE_METHODS.items():  # kd from a teacher-logit cache (issue 15)
        table[name] = {"name": "kd", "teacher_cache": {"mode": "use", **cache}}
    for vname, over in (variants or {}).items():  # the search: SHARP + overrides, diagnosed
        table[f"var-{vname}"] = {**deep_merge(sharp, over), **diag}
    return table


def base_spec(
    preset: Preset, run_dir: Path, teacher: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The spec every student cell derives from (method and seed filled in per cell);
    `overrides` (``--set``) reach every cell, baselines included."""
    return deep_merge(_base_spec(preset, run_dir, teacher), overrides or {})


def _base_spec(preset: Preset, run_dir: Path, teacher: str) -> dict[str, Any]:
    return {
        "name": f"quality-{preset.name}",
        "teacher": {"model": teacher},
        "student": copy.deepcopy(preset.student)
        or {"init": "config", "config": dict(preset.student_config)},
        "dataset": {
            "files": [str(run_dir / "train.txt")],
            "eval_fraction": preset.eval_fraction,
            "max_eval_blocks": preset.max_eval_blocks,
        },
        "method": {"name": "kd"},
        "training": {
            "seq_len": preset.seq_len,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "log_every": 1,
            **preset.training,
        },
    }


def cell_spec(base: dict[str, Any], method: dict[str, Any], seed: int) -> dict[str, Any]:
    return deep_merge(
        base,
        {
            "method": method,
            "training": {"seed": seed},
            "name": f"{base['name']}-{method['name']}-s{seed}",
        },
    )


def teacher_spec(preset: Preset, run_dir: Path) -> dict[str, Any]:
    t = {
        "seq_len": preset.seq_len,
        "log_every": 10,
        "seed": 0,
        "checkpoint_every": preset.teacher_training.get("eval_every", 0),
        "keep_checkpoints": 1000,
        **preset.teacher_training,
    }
    return {
        "name": f"quality-{preset.name}-teacher",
        "student": {"init": "config", "config": dict(preset.teacher_config)},
        "tokenizer": {"train": {"vocab_size": preset.vocab_size}},
        "dataset": {
            "files": [str(run_dir / "train.txt")],
            "eval_fraction": preset.eval_fraction,
            "max_eval_blocks": preset.max_eval_blocks,
        },
        "method": {"name": "sft"},
        "training": t,
    }
