"""The random-vs-pruned comparison: its statistics, a round trip, and the committed results
recomputed through `sharp_core.study.compare` (the service's sweep report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.quality.init_compare import analyse, render
from sharp_core.study.compare import compare, paired

ROOT = Path(__file__).resolve().parents[1]


def _cells(ppls: list[float]) -> dict:
    return {
        s: {"ppl": v, "eval_curve": [[0, math.log(v) + 1], [10, math.log(v)]]}
        for s, v in enumerate(ppls)
    }


def test_paired_statistics_and_json_round_trip() -> None:
    data = {
        "split": "val",
        "pairs": {
            "2x2": {
                "teacher_ppl": 30.0,
                "random": {"kd": _cells([50, 52, 54]), "sharp": _cells([49, 51, 53])},
                "prune": {"kd": _cells([35, 36, 37]), "sharp": _cells([34, 35, 37])},
            }
        },
    }
    st = analyse(data)["2x2"]
    kd = st["methods"]["kd"]
    assert kd["random"][0] == pytest.approx(52.0) and kd["prune"][0] == pytest.approx(36.0)
    # gap closed per seed: (50-35)/20, (52-36)/22, (54-37)/24
    assert kd["gap_closed"]["mean"] == pytest.approx((15 / 20 + 16 / 22 + 17 / 24) / 3)
    d = [100 * (35 / 50 - 1), 100 * (36 / 52 - 1), 100 * (37 / 54 - 1)]
    assert kd["delta_pct"]["mean"] == pytest.approx(sum(d) / 3)
    vs = st["prune_vs_kd"]["sharp"]
    assert vs["n"] == 3 and vs["p_holm"] == pytest.approx(min(1.0, vs["p"]))
    again = analyse(json.loads(json.dumps(data)))  # keys become strings in the JSON
    assert again["2x2"]["methods"]["kd"]["delta_pct"]["mean"] == pytest.approx(
        kd["delta_pct"]["mean"]
    )
    # pruned mean eval loss at step 0 (log 36 + 1) is above random's final (log 52): step 10
    assert kd["steps_to_random_final"] == 10
    text = render(data, analyse(data))
    assert "| kd | 52.00 ± 2.00 | 36.00 ± 1.00 |" in text


def test_one_common_seed_renders_without_an_interval() -> None:
    data = {
        "split": "val",
        "pairs": {
            "2x2": {
                "teacher_ppl": 30.0,
                "random": {"kd": _cells([50]), "sft": _cells([60])},
                "prune": {"kd": _cells([35]), "sft": _cells([36])},
            }
        },
    }
    st = analyse(data)["2x2"]
    d = st["methods"]["kd"]["delta_pct"]
    assert d["n"] == 1 and d["std"] is None and d["ci95"] is None
    assert st["prune_vs_kd"] == {}  # one seed: no test, nothing to correct
    assert "| kd | 50.00 ± – | 35.00 ± – | -30.00 | 75.0 ± – % |" in render(data, analyse(data))


def _ppl(cells: dict) -> dict[int, float]:
    return {int(s): c["ppl"] for s, c in cells.items()}


def test_committed_results_recompute_as_sharp_core_compare() -> None:
    """docs/results/init-compare.json through `analyse` gives the intervals, p and Holm p that
    `sharp_core.study.compare` computes from the raw per-seed perplexities, and the markdown of
    docs/results.md (its numbers are these)."""
    data = json.loads((ROOT / "docs/results/init-compare.json").read_text())
    stats = analyse(data)
    for name, pair in data["pairs"].items():
        st = stats[name]
        for method, prune in pair["prune"].items():
            want = paired(_ppl(prune), _ppl(pair["random"][method]), relative=True)
            got = st["methods"][method]["delta_pct"]
            assert got["n"] == want["n"] >= 2
            assert got["mean"] == pytest.approx(want["mean"], abs=1e-12)
            assert got["ci95"] == pytest.approx(want["ci"], abs=1e-12)
        # the service's whole report: one configuration per method, kd the reference
        cells = [
            {"method": m, "config": m, "seed": s, "status": "completed", "value": v}
            for m, by_seed in pair["prune"].items()
            for s, v in _ppl(by_seed).items()
        ]
        rep = compare(cells, metric={"lower_is_better": True, "relative": True}, reference="kd")
        vs_kd = st["prune_vs_kd"]
        assert set(vs_kd) == set(pair["prune"]) - {"kd"}
        for method, iv in vs_kd.items():
            want = rep["methods"][method]["delta"]
            assert iv["n"] == want["n"]
            assert iv["mean"] == pytest.approx(want["mean"], abs=1e-12)
            assert iv["ci95"] == pytest.approx(want["ci"], abs=1e-12)
            assert iv["p"] == pytest.approx(want["p"], rel=1e-12)
            assert iv["p_holm"] == pytest.approx(want["p_holm"], rel=1e-12)
    # the values docs/results.md quotes (2x2, sharp-direct against kd, pruned init)
    sd = stats["2x2"]["prune_vs_kd"]["sharp-direct"]
    assert (round(sd["p"], 3), round(sd["p_holm"], 3)) == (0.009, 0.036)
    doc = (ROOT / "docs/results.md").read_text()
    rows = [ln for ln in render(data, stats).splitlines() if ln.startswith("| ")]
    assert len(rows) > 20 and [r for r in rows if r not in doc] == []
