"""sharp_core.study.sweep (expansion, validation) and sharp_core.study.compare (the statistics) against
hand-computed numbers; no service, no scipy in the expected values."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sharp_core.errors import SpecError
from sharp_core.study.compare import (
    CellResult,
    choose_best,
    compare,
    gap_closed,
    gaps_closed,
    holm,
    mean_std,
    metric_for,
    paired,
)
from sharp_core.study.sweep import (
    config_key,
    count_cells,
    expand,
    final_cells,
    parse_sweep,
    validate_cells,
)

BASE: dict[str, Any] = {
    "student": {"init": "config", "config": {"model_type": "gpt2", "n_layer": 1}},
    "tokenizer": {"train": {"vocab_size": 300}},
    "dataset": {"source": "files", "files": ["/data/c.txt"]},
    "method": {"name": "sft"},
    "training": {"max_steps": 4},
}


def sweep(**kw: Any) -> dict[str, Any]:
    return {"base": BASE, **kw}


# --------------------------------------------------------------------------- statistics
def test_holm_matches_a_hand_computed_example() -> None:
    # sorted: a 0.01·3 = 0.03; c 0.03·2 = 0.06; b 0.04·1 = 0.04 → raised to 0.06 (monotone)
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert got == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    # capped at 1, and the larger p follows the capped one
    assert holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}
    assert holm({"only": 0.02}) == {"only": 0.02}


def test_paired_t_interval_and_p_against_hand_numbers() -> None:
    # Δ = x − ref = 1, 2, 3: mean 2, sd 1, se 1/√3; t(0.975, 2) = 4.302653;
    # two-sided p for t = 2√3 at 2 df is 1 − t/√(2 + t²) = 1 − √(12/14)
    ref = {0: 10.0, 1: 10.0, 2: 10.0, 7: 99.0}  # seed 7 has no partner: left out
    x = {0: 11.0, 1: 12.0, 2: 13.0}
    d = paired(x, ref, relative=False)
    assert d is not None
    se = 1 / math.sqrt(3)
    assert (d["n"], d["mean"], d["std"]) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert d["se"] == pytest.approx(se)
    assert d["ci"] == pytest.approx([2 - 4.302653 * se, 2 + 4.302653 * se], abs=1e-5)
    assert d["p"] == pytest.approx(1 - math.sqrt(12 / 14), abs=1e-9)
    assert d["per_seed"] == {"0": 1.0, "1": 2.0, "2": 3.0}
    # relative: per cent of the reference
    r = paired({0: 110.0, 1: 90.0}, {0: 100.0, 1: 100.0}, relative=True)
    assert r is not None and r["per_seed"] == pytest.approx({"0": 10.0, "1": -10.0})
    # one pair: a mean, no interval
    one = paired({0: 3.0}, {0: 1.0}, relative=False)
    assert one is not None and (one["mean"], one["ci"], one["p"]) == (2.0, None, None)
    assert paired({0: 1.0}, {1: 1.0}, relative=False) is None


def test_mean_std_and_metric_for() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, None)
    assert metric_for("causal_lm", "val") == {
        "name": "val_ppl",
        "lower_is_better": True,
        "relative": True,
    }
    assert metric_for("sequence_classification", "test")["name"] == "test_accuracy"


def _cells(rows: list[tuple[str, str, int, str, float | None]]) -> list[dict[str, Any]]:
    return [
        {"method": m, "config": c, "seed": s, "status": st, "value": v, "overrides": {}}
        for m, c, s, st, v in rows
    ]


def test_compare_chooses_the_best_config_per_method_and_counts_failures() -> None:
    cells = _cells(
        [
            ("kd", "kd-a", 0, "completed", 100.0),
            ("kd", "kd-a", 1, "completed", 104.0),
            ("kd", "kd-b", 0, "completed", 90.0),
            ("kd", "kd-b", 1, "failed", None),
            ("sharp", "sharp-a", 0, "completed", 95.0),
            ("sharp", "sharp-a", 1, "completed", 93.6),
            ("sharp", "sharp-b", 0, "failed", None),
            ("sharp", "sharp-b", 1, "running", None),
        ]
    )
    ppl = metric_for("causal_lm", "val")
    out = compare(cells, metric=ppl)
    # kd-b has the lower mean (90, on one seed): chosen; the failed seed is counted, not hidden
    assert out["best"] == {"kd": "kd-b", "sharp": "sharp-a"}
    assert out["reference"] == "kd"
    assert out["configs"]["kd-b"]["failed"] == 1 and out["configs"]["kd-b"]["n"] == 1
    assert out["configs"]["sharp-b"]["failed"] == 1  # the running cell is not a failure
    assert out["configs"]["sharp-b"]["by_status"] == {"failed": 1, "running": 1}
    assert out["configs"]["kd-a"]["mean"] == pytest.approx(102.0)
    assert out["configs"]["kd-a"]["std"] == pytest.approx(math.sqrt(8.0))
    # sharp vs kd-b paired on seed 0 only: 100·(95/90 − 1)
    delta = out["methods"]["sharp"]["delta"]
    assert delta["n"] == 1 and delta["mean"] == pytest.approx(100 * (95 / 90 - 1))
    assert out["methods"]["kd"]["delta"] is None
    assert out["methods"]["sharp"]["configs_tried"] == 2
    # a fixed choice (the final stage) compares exactly those configurations
    fixed = compare(cells, metric=ppl, best={"kd": "kd-a", "sharp": "sharp-a"})
    d = fixed["methods"]["sharp"]["delta"]
    assert d["per_seed"] == pytest.approx({"0": -5.0, "1": -10.0})
    assert d["p_holm"] == pytest.approx(d["p"])  # one comparison: Holm changes nothing
    assert choose_best(out["configs"], lower_is_better=False) == {"kd": "kd-a", "sharp": "sharp-a"}


def test_holm_is_applied_over_the_methods_compared() -> None:
    rows = []
    for seed, (ref, a, b) in enumerate([(100, 90, 99), (100, 91, 101), (100, 89, 98)]):
        rows += [
            ("kd", "kd", seed, "completed", float(ref)),
            ("a", "a", seed, "completed", float(a)),
            ("b", "b", seed, "completed", float(b)),
        ]
    out = compare(_cells(rows), metric=metric_for("causal_lm", "val"))
    ps = {m: out["methods"][m]["delta"]["p"] for m in ("a", "b")}
    assert {m: out["methods"][m]["delta"]["p_holm"] for m in ps} == pytest.approx(holm(ps))
    assert out["methods"]["a"]["delta"]["p_holm"] == pytest.approx(2 * ps["a"])


# --------------------------------------------------------------------------- expansion
def test_expansion_counts_trials_times_axes_times_seeds() -> None:
    s = parse_sweep(
        sweep(
            axes={"training.seed": [0, 1], "method.kd_weight": [0.5, 0.9]},
            tune={
                "trials": 3,
                "space": {
                    "kd": {"training.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
                    "sharp": {"training.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
                },
            },
        )
    )
    cells = expand(s)
    assert len(cells) == 2 * 3 * 2 * 2
    assert len({c.config for c in cells}) == 2 * 3 * 2
    assert {c.seed for c in cells} == {0, 1}
    # the seed is crossed last: a configuration's cells are adjacent
    assert [c.seed for c in cells[:4]] == [0, 1, 0, 1] and cells[0].config == cells[1].config
    for c in cells:
        assert c.spec["training"]["seed"] == c.seed
        assert c.spec["method"]["name"] == c.method
        assert 1e-4 <= c.spec["training"]["lr"] <= 1e-2
        assert c.config == config_key(c.method, c.overrides)
    # axes alone: every combination, no tune
    plain = expand(parse_sweep(sweep(axes={"training.seed": [0, 1, 2], "training.lr": [1e-3]})))
    assert len(plain) == 3 and {c.method for c in plain} == {"sft"}


def test_random_search_is_reproducible_per_seed() -> None:
    def draw(seed: int) -> list[dict[str, Any]]:
        return [
            c.overrides
            for c in expand(
                parse_sweep(
                    sweep(
                        tune={
                            "trials": 4,
                            "seed": seed,
                            "space": {"kd": {"training.lr": {"low": 1e-4, "high": 1e-2}}},
                        }
                    )
                )
            )
        ]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert len({o["training.lr"] for o in draw(1)}) == 4


def test_a_grid_larger_than_the_trials_is_refused() -> None:
    with pytest.raises(SpecError) as e:
        parse_sweep(
            sweep(
                tune={
                    "trials": 2,
                    "search": "grid",
                    "space": {"kd": {"training.lr": [1e-4, 2e-4, 3e-4]}},
                }
            )
        )
    assert e.value.param == "sweep.tune.space.kd"


def test_final_seeds_overlapping_tune_seeds_are_refused() -> None:
    with pytest.raises(SpecError) as e:
        parse_sweep(sweep(axes={"training.seed": [0, 1]}, final={"seeds": [1, 5]}))
    assert e.value.param == "sweep.final.seeds"


def test_an_unknown_axis_path_is_named() -> None:
    with pytest.raises(SpecError) as e:
        parse_sweep(sweep(axes={"training.nope": [1]}))
    assert e.value.param == "sweep.axes.training.nope"
    with pytest.raises(SpecError) as e:
        parse_sweep(sweep(axes={"training.lr": []}))
    assert e.value.param.startswith("sweep.axes")


def test_final_cells_keep_the_test_set_and_use_the_fresh_seeds() -> None:
    s = parse_sweep(sweep(axes={"training.seed": [0, 1]}, final={"seeds": [10, 11, 12]}))
    chosen = {"kd": {"method.name": "kd", "training.lr": 1e-3}}
    cells = final_cells(s, chosen)
    assert [(c.stage, c.method, c.seed) for c in cells] == [
        ("final", "kd", x) for x in (10, 11, 12)
    ]
    assert all(c.spec["training"]["lr"] == 1e-3 for c in cells)


def test_validate_cells_lists_the_invalid_ones() -> None:
    s = parse_sweep(sweep(axes={"training.lr": [1e-3, -1.0], "training.seed": [0, 1]}))
    count, bad = validate_cells(expand(s))
    assert count == 2
    assert bad[0]["param"] == "training.lr" or bad[0]["param"].endswith("training.lr")
    assert bad[0]["overrides"] == {"training.lr": -1.0}


def test_cells_are_counted_without_expanding_a_huge_sweep() -> None:
    """8 axes of 100 values (10^16 cells) and a 100^3 grid are counted in no time; the
    service refuses them against its limit before anything is built."""
    paths = ["training.lr", "training.batch_size", "training.max_steps", "training.seq_len"]
    paths += ["training.warmup_steps", "method.kd_weight", "method.temperature", "training.seed"]
    huge = parse_sweep(sweep(axes={p: list(range(1, 101)) for p in paths}))
    assert count_cells(huge) == (100**8, 0)
    s = parse_sweep(
        sweep(
            axes={"training.seed": [0, 1], "training.lr": [1e-3, 2e-3, 3e-3]},
            tune={
                "trials": 4,
                "space": {
                    "kd": {"method.kd_weight": list(range(100)), "method.temperature": [1.0] * 100},
                    "sft": {},
                },
            },
            final={"seeds": [10, 11, 12]},
        )
    )
    # kd: 4 distinct draws of a 10 000-point grid, sft: 1; × 3 lrs × 2 seeds
    assert count_cells(s) == ((4 + 1) * 3 * 2, 2 * 3)
    assert len(expand(s)) == count_cells(s)[0]
    grid = parse_sweep(
        sweep(
            tune={
                "trials": 1,
                "search": "random",
                "space": {
                    "kd": {
                        f"method.{k}": list(range(100))
                        for k in ("kd_weight", "temperature", "rank")
                    }
                },
            }
        )
    )
    assert count_cells(grid) == (1, 0)
    with pytest.raises(SpecError):  # a grid search over 100^3 points with 8 trials
        parse_sweep(
            sweep(
                tune={
                    "search": "grid",
                    "space": {
                        "kd": {
                            f"method.{k}": list(range(100))
                            for k in ("kd_weight", "temperature", "rank")
                        }
                    },
                }
            )
        )
    plain = parse_sweep(sweep(axes={"method.name": ["sft", "kd"]}, final={"seeds": [5]}))
    assert count_cells(plain) == (2, 2)


def test_the_readme_example_sweep_is_valid() -> None:
    """examples/sweeps/kd-vs-sharp.yaml (the README's sweep), its teacher filled in as the
    README does:
    2 methods × 2 lr trials × 2 seeds to tune, each method's choice on 2 fresh seeds."""
    from pathlib import Path

    import yaml

    from sharp_core.study.sweep import count_cells

    root = Path(__file__).resolve().parents[1]
    text = (
        (root / "examples" / "sweeps" / "kd-vs-sharp.yaml")
        .read_text()
        .replace("TEACHER_JOB", "job_0123")
    )
    s = parse_sweep(yaml.safe_load(text))
    cells = expand(s)
    assert count_cells(s) == (8, 4)
    assert validate_cells(cells) == (0, [])
    assert {c.spec["teacher"]["model"]["job"] for c in cells} == {"job_0123"}


def test_gap_closed_against_the_baseline_on_hand_values() -> None:
    assert gap_closed(0.55, 0.40, 0.70) == pytest.approx(0.5)  # half of 0.30 closed
    assert gap_closed(0.70, 0.40, 0.70) == pytest.approx(1.0)
    assert gap_closed(0.30, 0.40, 0.70) == pytest.approx(-1 / 3)  # worse than the baseline
    assert gap_closed(0.50, 0.60, 0.60) is None  # no gap to close
    assert gap_closed(float("nan"), 0.4, 0.7) is None

    acc, rouge = "harness/t/acc", "gen/rougeL"

    def cell(method: str, config: str, seed: int, score: float | None, **kw: Any) -> CellResult:
        return {
            "method": method,
            "config": config,
            "seed": seed,
            "status": kw.get("status", "completed"),
            "scores": {} if score is None else {acc: score, acc + "_stderr": 0.1, rouge: 0.2},
            "teacher": {acc: 0.80, acc + "_stderr": 0.05},
        }

    cells = [
        cell("sft", "a", 0, 0.40),
        cell("sft", "a", 1, 0.50),  # baseline mean 0.45
        cell("sft", "b", 0, 0.99),  # not the chosen config: ignored
        cell("kd", "c", 0, 0.60),
        cell("kd", "c", 1, 0.70),  # student mean 0.65
        cell("kd", "c", 2, 0.10, status="failed"),  # failed cells do not count
    ]
    got = gaps_closed(cells, best={"sft": "a", "kd": "c"}, reference="sft")
    assert got is not None
    assert got["baseline"] == "sft" and got["baseline_config"] == "a" and got["baseline_n"] == 2
    assert got["baseline_scores"][acc] == pytest.approx(0.45)
    kd = got["methods"]["kd"]
    assert kd["n"] == 2 and set(kd["gap_closed"]) == {acc}  # the teacher has no ROUGE-L
    assert kd["gap_closed"][acc] == pytest.approx((0.65 - 0.45) / (0.80 - 0.45))
    assert "sft" not in got["methods"]
    # no baseline (the reference has no chosen config), or no teacher score: the column is absent
    assert gaps_closed(cells, best={"kd": "c"}, reference="sft") is None
    assert gaps_closed(cells, best={"sft": "a"}, reference="sft") is None
    bare = [{**c, "teacher": {}} for c in cells]
    assert gaps_closed(bare, best={"sft": "a", "kd": "c"}, reference="sft") is None
