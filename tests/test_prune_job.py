"""A job whose student is pruned from its teacher: set-up, exact maps, events, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharp_core.models.prune_shapes import PruneError
from sharp_core.spec import parse_spec
from sharp_core.train.loop import train
from sharp_core.train.setup import setup
from tests.helpers import GPT2_TEACHER, Recorder, spec_dict, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory) -> Path:
    """A tiny GPT-2 teacher (4 layers × 4 heads × 64) trained for a few steps."""
    spec = parse_spec(
        spec_dict(
            corpus,
            student={"init": "config", "config": dict(GPT2_TEACHER)},
            training={"max_steps": 6, "eval_every": 0, "checkpoint_every": 0},
        )
    )
    res = train(spec, tmp_path_factory.mktemp("teacher"))
    assert res.checkpoint is not None
    return res.checkpoint


def _pruned(corpus, teacher_dir, method: dict, prune: dict | None = None, **over) -> dict:
    d = spec_dict(corpus, teacher={"model": str(teacher_dir)}, method=method, **over)
    d["student"] = {"init": "prune", "prune": prune or {"layers": 2, "heads": 2, "ffn": 64}}
    d.pop("tokenizer")
    return d


def test_setup_prunes_and_sets_exact_maps(corpus, teacher_dir):
    spec = parse_spec(
        _pruned(corpus, teacher_dir, {"name": "sharp"}, {"layers": [1, 3], "heads": 2, "ffn": 64})
    )
    S = setup(spec)
    c = S.student.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner) == (2, 2, 32, 64)
    assert S.pruned is not None and S.pruned.layers == [1, 3]
    assert S.objective is not None and S.objective.layer_map == [1, 3]
    w = S.objective.w_h  # (L_s, H_s, H_t): one-hot rows on the kept heads
    for j, heads in enumerate(S.pruned.heads):
        assert w[j].argmax(1).tolist() == heads
        assert torch.equal(w[j].sum(1), torch.ones(2))
    assert S.student.transformer.wte.weight.dtype == torch.float32
    assert S.pruned.params_after < S.pruned.params_before


def test_spec_maps_override_the_pruned_ones(corpus, teacher_dir):
    spec = parse_spec(
        _pruned(
            corpus,
            teacher_dir,
            {"name": "tinybert", "layer_map": [0, 2], "head_map": [[3, 0], [1, 2]]},
            {"layers": [1, 3], "heads": 2},
        )
    )
    S = setup(spec)
    assert S.objective.layer_map == [0, 2]
    assert S.objective.w_h[0].argmax(1).tolist() == [3, 0]
    assert S.objective.w_h[1].argmax(1).tolist() == [1, 2]


@pytest.mark.slow
def test_pruned_job_records_what_it_kept_and_starts_near_the_teacher(corpus, teacher_dir, tmp_path):
    target = {"layers": 2, "heads": 2, "ffn": 64, "calibration": {"samples": 50_000}}
    d = _pruned(
        corpus, teacher_dir, {"name": "kd"}, target, training={"max_steps": 4, "eval_every": 0}
    )
    rec = Recorder()
    res = train(parse_spec(d), tmp_path / "run", callbacks=rec)
    assert res.status == "completed"
    kinds = [k for k, _ in rec.events if k != "tokenized_data"]
    assert kinds == ["pruned"]
    (ev,) = [e for k, e in rec.events if k == "pruned"]
    assert len(ev["kept_layers"]) == 2 and all(len(h) == 2 for h in ev["heads_per_layer"].values())
    assert ev["params_after"] < ev["params_before"]
    m0 = rec.metrics[0]  # before any step: what pruning cost, and the step-0 perplexity
    assert m0["prune_params_after"] == ev["params_after"]
    assert m0["prune_calibration_s"] >= 0 and m0["prune_calibration_samples"] > 0
    assert "eval_ppl" in m0 and m0["eval_ppl"] > 1  # eval_every 0, still evaluated at step 0
    # the training data has fewer blocks than asked for: used whole, and said so
    assert ev["calibration_samples"] < 50_000 and "50000" in ev["note"]


def test_pruned_sft_job_does_not_keep_the_teacher(corpus, teacher_dir):
    S = setup(parse_spec(_pruned(corpus, teacher_dir, {"name": "sft"})))
    assert S.teacher is None and S.pruned is not None and S.objective is None


@pytest.mark.slow
def test_pruned_job_resumes_on_the_same_trajectory(corpus, teacher_dir, tmp_path):
    d = _pruned(
        corpus,
        teacher_dir,
        {"name": "sharp"},
        training={"max_steps": 6, "checkpoint_every": 3, "eval_every": 3},
    )
    full = Recorder()
    train(parse_spec(d), tmp_path / "full", callbacks=full)
    part = Recorder(stop_at=3)
    assert train(parse_spec(d), tmp_path / "part", callbacks=part).status == "stopped"
    rest = Recorder()
    assert train(parse_spec(d), tmp_path / "part", callbacks=rest).status == "completed"
    # the pruning report is written once, by the first attempt (the second reads its data)
    assert [k for k, _ in rest.events] == ["tokenized_data"]
    assert rest.events[0][1]["role"] == "read"
    for step in range(1, 7):
        got = (part.metrics if step <= 3 else rest.metrics)[step]["loss"]
        assert got == pytest.approx(full.metrics[step]["loss"], rel=1e-5, abs=1e-6), step


def test_target_that_does_not_fit_fails_before_anything_is_written(corpus, teacher_dir, tmp_path):
    d = _pruned(corpus, teacher_dir, {"name": "kd"}, {"layers": 9})
    with pytest.raises(PruneError) as e:
        train(parse_spec(d), tmp_path / "run")
    assert e.value.param == "spec.student.prune.layers" and e.value.status == 422
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
