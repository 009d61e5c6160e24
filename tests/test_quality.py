"""bench.quality (issue 6): the comparison table's machinery, on the hidden `micro` preset.

The numbers of a micro run mean nothing (a few steps on 40k characters); what is checked is
the structure of results.json / results.md, that a rerun skips finished cells (and retrains
nothing: result files keep their modification times), and that the teacher sanity check
refuses a teacher that is worse than its students.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench import quality

CELLS = ["sft/seed0", "sharp/seed0"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """On a CPU shared with other jobs, two OpenMP threads spin against each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quiet(*_: object) -> None:
    pass


def _result_files(out: Path) -> dict[str, int]:
    files = [out / "teacher" / "result.json"]
    files += [out / "cells" / c.split("/")[0] / c.split("/")[1] / "result.json" for c in CELLS]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def test_method_table_is_one_flag_per_ablation() -> None:
    p = quality.PRESETS["tiny-cpu"]
    t = quality.method_table(p)
    sharp = {k: v for k, v in t["sharp"].items() if k != "interference_every"}
    assert t["sharp"]["interference_every"] == p.training["max_steps"] // 10
    assert t["sharp-no-layer"]["granularities"]["layer"] == 0.0
    assert t["sharp-no-layer"]["granularities"]["head"] == sharp["granularities"]["head"]
    assert t["sharp-direct"]["decomposition"] == "direct"
    ranks = sorted(v["rank"] for k, v in t.items() if k.startswith("sharp-rank"))
    assert len(ranks) == 2 and sharp["rank"] not in ranks
    assert t["sharp-learned"]["basis"] == "learned" and t["sharp-pcgrad"]["conflict"] == "pcgrad"
    for b in quality.BASELINES:
        assert t[b] == {"name": b}
    # the teacher-cache methods (issue 15) run only when named: kd reading a cache
    cache = {k: v for k, v in t.items() if k.startswith("cache-")}
    assert len(t) - len(cache) == 17
    assert {v["name"] for v in cache.values()} == {"kd"}
    assert {v["teacher_cache"]["mode"] for v in cache.values()} == {"use"}
    assert cache["cache-topk32"]["teacher_cache"]["k"] == 32
    # overrides reach SHARP and every ablation
    t2 = quality.method_table(
        p,
        quality.parse_assignments(["granularities.token=0.25"]),
        {"anneal": quality.parse_assignments(["attention_schedule=linear_decay", "rank=8"])},
    )
    assert t2["sharp-no-layer"]["granularities"]["token"] == 0.25
    assert t2["sharp-direct"]["attention_weight"] == pytest.approx(
        sum(t2["sharp"]["granularities"][g] for g in ("layer", "head", "token", "residual"))
    )
    v = t2["var-anneal"]
    assert v["attention_schedule"] == "linear_decay" and v["rank"] == 8
    assert v["granularities"]["token"] == 0.25 and v["interference_every"] > 0
    # --set reaches every cell, baselines included; the cell spec validates
    from sharp_core.spec import parse_spec

    base = quality.base_spec(
        p, Path("/run"), "/run/teacher", quality.parse_assignments(["method.kd_weight=0.9"])
    )
    for name in ("kd", "sharp", "var-anneal"):
        spec = parse_spec(quality.cell_spec(base, t2[name], seed=2))
        assert spec.method.kd_weight == 0.9 and spec.training.seed == 2


def test_micro_structure_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    preset = quality.PRESETS["micro"]
    s1 = quality.run(preset, out, log=_quiet)
    assert sorted(s1.trained) == CELLS and s1.skipped == []

    for name in ("train.txt", "val.txt", "test.txt", "results.json", "results.md"):
        assert (out / name).is_file(), name
    train, val, test = ((out / f"{n}.txt").read_text() for n in ("train", "val", "test"))
    assert train and val and test
    rep = json.loads((out / "results.json").read_text())
    assert rep["split"] == "val" and rep["sanity"]["ok"] is True
    t_ppl = rep["teacher"]["ppl"]["val"]["ppl"]
    for key in CELLS:
        cell = rep["cells"][key]
        assert set(cell["ppl"]) == {"val"}  # the test split is never touched while tuning
        assert math.isfinite(cell["ppl"]["val"]["ppl"]) and cell["ppl"]["val"]["ppl"] > t_ppl
        steps = [s for s, _ in cell["eval_curve"]]
        assert steps[0] == 0 and steps[-1] == preset.training["max_steps"]
        assert cell["train_wall_s"] > 0 and cell["spec"]["training"]["seed"] == 0
    # gradient-cosine diagnostics of sharp: logit vs each granularity, and between them
    cos = rep["cells"]["sharp/seed0"]["cosines"]
    for k in ("cos_logit_sharp_layer", "cos_logit_sharp_token", "cos_sharp_layer_sharp_head"):
        assert cos[k] and all(-1.0 <= v <= 1.0 for _, v in cos[k])
    assert rep["cells"]["sft/seed0"]["tokens_per_s"] > 0
    summ = rep["summary"]
    assert summ["best_baseline"] == "sft"
    d = summ["methods"]["sharp"]["delta_pct"]
    ratio = (
        rep["cells"]["sharp/seed0"]["ppl"]["val"]["ppl"]
        / rep["cells"]["sft/seed0"]["ppl"]["val"]["ppl"]
    )
    assert d["mean"] == pytest.approx(100 * (ratio - 1)) and d["n"] == 1
    md = (out / "results.md").read_text()
    assert "| method | val ppl (mean ± std)" in md
    assert "| sft (best baseline) |" in md and "| sharp |" in md
    if rep["plots"]:  # matplotlib is optional
        assert (out / "eval_curves.png").stat().st_size > 1000
        assert (out / "cosines.png").is_file()

    # rerun: every cell skipped, nothing retrained or rewritten
    before = _result_files(out)
    s2 = quality.run(preset, out, log=_quiet)
    assert s2.trained == [] and sorted(s2.skipped) == CELLS
    assert _result_files(out) == before
    rep2 = json.loads((out / "results.json").read_text())
    assert rep2["summary"]["methods"]["sharp"]["ppl_mean"] == summ["methods"]["sharp"]["ppl_mean"]

    # a teacher worse than its students (randomly initialised) is refused after one cell
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    good = out / rep["teacher"]["path"]
    bad = tmp_path / "random-teacher"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(good)).save_pretrained(bad)
    AutoTokenizer.from_pretrained(good).save_pretrained(bad)
    refused = tmp_path / "refused"
    rc = quality.main(["--preset", "micro", "--out", str(refused), "--teacher", str(bad)])
    assert rc == 2
    rep3 = json.loads((refused / "results.json").read_text())
    assert rep3["sanity"]["ok"] is False and "sanity check failed" in rep3["sanity"]["message"]
    assert list(rep3["cells"]) == ["sft/seed0"]  # stopped before any distillation cell
    assert not (refused / "cells" / "sharp").exists()
    assert "REFUSED" in (refused / "results.md").read_text()


def test_micro_sweep_tunes_on_val_and_tests_the_chosen_configs_on_fresh_seeds(
    tmp_path: Path,
) -> None:
    """bench.quality.sweep: the service's expansion and comparison, trained here. The final
    cells are each method's configuration with the lowest mean val ppl, on the fresh seeds
    only; test is computed for final cells only; --from-json recomputes the same tables."""
    from bench.quality import sweep as bsweep
    from sharp_core.study.compare import compare, metric_for

    sweep = {
        "axes": {"training.seed": [0]},
        "tune": {
            "trials": 2,
            "seed": 3,
            "space": {
                "kd": {"training.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                "sft": {"training.lr": [2e-3, 8e-3]},
            },
        },
        "reference": "kd",
        "final": {"seeds": [7, 8]},
    }
    out = tmp_path / "sw"
    data = bsweep.run_sweep(quality.PRESETS["micro"], out, sweep, log=_quiet)
    tune = [c for c in data["cells"] if c["stage"] == "tune"]
    final = [c for c in data["cells"] if c["stage"] == "final"]
    assert len(tune) == 4 and all(c["test_ppl"] is None for c in tune)
    assert sorted((c["method"], c["seed"]) for c in final) == [
        ("kd", 7),
        ("kd", 8),
        ("sft", 7),
        ("sft", 8),
    ]
    for m in ("kd", "sft"):
        best = min((c for c in tune if c["method"] == m), key=lambda c: c["val_ppl"])
        assert {c["config"] for c in final if c["method"] == m} == {best["config"]}
    assert all(c["test_ppl"] > 1 and math.isfinite(c["test_ppl"]) for c in final)
    stats = bsweep.analyse(json.loads(json.dumps(data)))
    # the final table is compare() over the test perplexities, paired by the fresh seeds
    fin = compare(
        [dict(c, value=c["test_ppl"]) for c in final],
        metric=metric_for("causal_lm", "test"),
        reference="kd",
        best=stats["tune"]["best"],
    )
    assert stats["final"]["methods"]["sft"]["delta"]["mean"] == pytest.approx(
        fin["methods"]["sft"]["delta"]["mean"], rel=1e-12
    )
    by_seed = {(c["method"], c["seed"]): c["test_ppl"] for c in final}
    d = [100 * (by_seed[("sft", s)] / by_seed[("kd", s)] - 1) for s in (7, 8)]
    assert fin["methods"]["sft"]["delta"]["mean"] == pytest.approx(sum(d) / 2, rel=1e-9)
    (tmp_path / "raw.json").write_text(json.dumps(data))
    again = bsweep.run_sweep(quality.PRESETS["micro"], out, sweep, log=_quiet)  # all reused
    assert [c["val_ppl"] for c in again["cells"]] == [c["val_ppl"] for c in data["cells"]]


def test_committed_equal_budget_results_recompute_into_docs() -> None:
    """Every table row of the sections docs/results.md shows verbatim (the equal-budget
    sweep, the init comparison) is what `sharp_core.study.compare` gives from the committed raw
    cells; and the final stage's Δ is the paired per-seed ratio of the raw test values."""
    from bench.quality import recompute
    from bench.quality import sweep as bsweep

    assert recompute.main(["--check"]) == 0
    data = json.loads((recompute.RESULTS / "equal-budget-tiny-cpu.json").read_text())
    final = [c for c in data["cells"] if c["stage"] == "final"]
    assert len(final) == 45 and all(c["seed"] >= 100 for c in final)
    assert all(c["test_ppl"] is None for c in data["cells"] if c["stage"] == "tune")
    by = {(c["method"], c["seed"]): c["test_ppl"] for c in final}
    d = [100 * (by[("sharp", s)] / by[("kd", s)] - 1) for s in range(100, 105)]
    stats = bsweep.analyse(data)
    assert stats["final"]["methods"]["sharp"]["delta"]["mean"] == pytest.approx(
        sum(d) / 5, rel=1e-12
    )
    # the compared configurations are the ones with the lowest val ppl among 8 trials
    tune = [c for c in data["cells"] if c["stage"] == "tune"]
    for m, key in stats["tune"]["best"].items():
        mine = [c for c in tune if c["method"] == m]
        assert len(mine) == 8
        assert key == min(mine, key=lambda c: c["val_ppl"])["config"]


def test_term_sizes_give_the_weight_that_levels_each_term_with_sharps(tmp_path: Path) -> None:
    """bench.quality.term_sizes (the rule behind the default attention weights): the raw
    step-0 terms are positive, SHARP's weighted term is Σ_g w_g·term_g, and each rule weight
    times its raw term equals it (to the 2 significant digits the weight is rounded to)."""
    from bench.quality import term_sizes
    from bench.quality.cells import RunContext, prepare_teacher
    from bench.quality.data import write_splits
    from bench.quality.grid import base_spec

    preset = quality.PRESETS["micro"]
    out = tmp_path / "run"
    out.mkdir()
    write_splits(preset, out)
    t = prepare_teacher(RunContext(preset, out, "val", "cpu", _quiet), None)
    got = term_sizes.measure(base_spec(preset, out, str(out / t["path"])), [0])
    total = got["sharp_weighted_term"]
    assert total > 0 and got["kd_step0"] > 0 and got["ce_step0"] > 0
    for name, row in got["terms"].items():
        assert row["raw_step0"] > 0, name
        assert row["weight_rule"] * row["raw_step0"] == pytest.approx(total, rel=0.05), name
