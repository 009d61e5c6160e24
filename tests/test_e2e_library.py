"""End to end with the library alone: a teacher trained on real text, then SHARP and KD students."""

from __future__ import annotations

import pytest
import torch

from sharp_core.spec import parse_spec
from sharp_core.train.loop import TrainCallbacks, train
from tests.helpers import write_corpus


class Evals(TrainCallbacks):
    def __init__(self) -> None:
        self.eval: dict[int, float] = {}

    def on_metrics(self, step, metrics):
        if "eval_ppl" in metrics:
            self.eval[step] = metrics["eval_ppl"]


def _spec(corpus, student_cfg, method, steps, teacher=None):
    d = {
        "name": method["name"],
        "student": {"init": "config", "config": student_cfg},
        "dataset": {"files": [str(corpus)], "eval_fraction": 0.05, "max_eval_blocks": 16},
        "method": method,
        "training": {
            "max_steps": steps,
            "batch_size": 16,
            "seq_len": 64,
            "lr": 3e-3,
            "warmup_steps": 10,
            "eval_every": steps,
            "checkpoint_every": 0,
            "seed": 1,
        },
    }
    if teacher is None:
        d["tokenizer"] = {"train": {"vocab_size": 512}}
    else:
        d["teacher"] = {"model": str(teacher)}
    return parse_spec(d)


@pytest.mark.slow
def test_teacher_then_sharp_and_kd_students(tmp_path):
    corpus = write_corpus(tmp_path, max_chars=300_000)
    teacher_cfg = {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 96, "n_positions": 64}
    student_cfg = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 48, "n_positions": 64}
    t_ev = Evals()
    t = train(
        _spec(corpus, teacher_cfg, {"name": "sft"}, 150), tmp_path / "teacher", callbacks=t_ev
    )
    assert t_ev.eval[150] < 0.5 * t_ev.eval[0], t_ev.eval

    results = {}
    for method in (
        {"name": "kd"},
        {"name": "sharp", "granularities": {"layer": 0.1, "head": 0.1, "token": 0.1}},
    ):
        ev = Evals()
        res = train(
            _spec(corpus, student_cfg, method, 100, teacher=t.checkpoint),
            tmp_path / method["name"],
            callbacks=ev,
        )
        results[method["name"]] = (ev.eval[0], ev.eval[100], res.checkpoint)
    for name, (start, end, ckpt) in results.items():
        # "well below": at least halved from the random-init perplexity (~ vocab size)
        assert end < 0.5 * start, (name, start, end)
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(ckpt)
        assert m.config.n_layer == 2 and torch.isfinite(m.lm_head.weight).all()
