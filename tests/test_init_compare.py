"""The random-vs-pruned comparison: its statistics against closed forms, and a round trip."""

from __future__ import annotations

import json
import math

import pytest

from bench.quality.init_compare import _betainc, _p_two_sided, analyse, render


@pytest.mark.parametrize("df,t,p", [(4, 2.776, 0.05), (2, 4.303, 0.05), (10, 3.169, 0.01)])
def test_two_sided_p_matches_t_table(df: int, t: float, p: float) -> None:
    assert _p_two_sided(t, 1.0, df) == pytest.approx(p, abs=2e-4)


def test_incomplete_beta_closed_form() -> None:
    # I_x(1, 1) = x and I_x(a, 1) = x^a
    assert _betainc(1, 1, 0.3) == pytest.approx(0.3, abs=1e-10)
    assert _betainc(2.5, 1, 0.4) == pytest.approx(0.4**2.5, abs=1e-10)


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
