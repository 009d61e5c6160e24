"""``python -m bench.quality.term_sizes``: each attention term's size at step 0, and the
weight that puts it level with SHARP's default term (the rule behind the spec's defaults).

The rule (docs/method.md, "Default weights"): a single-term attention baseline's default
weight w_b is chosen so that w_b · term_b(step 0) equals SHARP's default weighted attention
term Σ_g w_g · term_g(step 0), both measured on the first batch of a freshly initialised
student against the same teacher, averaged over seeds. Sized this way, no baseline is plain
KD in disguise (a term of 1e-4 of the loss) nor swamps the logit term.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.quality.grid import base_spec, deep_merge
from bench.quality.presets import PRESETS
from sharp_core.spec import MethodSpec, parse_spec
from sharp_core.train.loop import TrainCallbacks, train

#: method → the spec's method block measured (weights 1 so the raw term is read)
MEASURED: dict[str, dict[str, Any]] = {
    "sharp": {"name": "sharp"},
    "sharp-direct": {"name": "sharp", "decomposition": "direct", "attention_weight": 1.0},
    "tinybert": {"name": "tinybert", "attention_weight": 1.0},
    "minilm": {"name": "minilm", "attention_weight": 1.0},
}
TERM = {"sharp-direct": "sharp_direct", "tinybert": "tinybert_attn", "minilm": "minilm_attn"}


class _First(TrainCallbacks):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == 1:
            self.metrics.update(metrics)


def step0_terms(base: dict[str, Any], method: dict[str, Any], seed: int) -> dict[str, float]:
    """The raw (unweighted) terms of the first step of one cell."""
    spec = deep_merge(base, {"method": method, "training": {"seed": seed, "max_steps": 1}})
    spec["training"].update(eval_every=0, checkpoint_every=0)
    cb = _First()
    with tempfile.TemporaryDirectory() as d:
        train(parse_spec(spec), Path(d), callbacks=cb, device="cpu")
    return cb.metrics


def measure(base: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    g = MethodSpec().granularities
    weights = {f"sharp_{c}": float(getattr(g, c)) for c in ("layer", "head", "token", "residual")}
    raw: dict[str, list[dict[str, float]]] = {
        name: [step0_terms(base, m, s) for s in seeds] for name, m in MEASURED.items()
    }
    sharp_total = statistics.fmean(
        sum(w * r.get(k, 0.0) for k, w in weights.items()) for r in raw["sharp"]
    )
    out: dict[str, Any] = {"seeds": list(seeds), "sharp_weighted_term": sharp_total, "terms": {}}
    for name, term in TERM.items():
        v = statistics.fmean(r[term] for r in raw[name])
        out["terms"][name] = {
            "term": term,
            "raw_step0": v,
            "weight_rule": float(f"{sharp_total / v:.2g}"),
        }
    out["kd_step0"] = statistics.fmean(r["kd"] for r in raw["sharp"])
    out["ce_step0"] = statistics.fmean(r["ce"] for r in raw["sharp"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality.term_sizes", description=__doc__)
    ap.add_argument("--preset", default="tiny-cpu", choices=list(PRESETS))
    ap.add_argument("--run", type=Path, required=True, help="a bench.quality run folder")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    run = args.run.resolve()
    teacher = json.loads((run / "teacher" / "result.json").read_text())["path"]
    base = base_spec(PRESETS[args.preset], run, str(run / teacher))
    print(json.dumps(measure(base, range(args.seeds)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
