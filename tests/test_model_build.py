"""Models built where they run (issue 17): `load_model` builds a config-initialised model
inside a ``torch.device`` context, in its dtype. On the CPU the weights must be bit-identical
to the code path it replaced (built on the default device, then ``.to(device)``) for the same
seed: resume and the distributed tests compare runs across that change. Tolerance: none
(``torch.equal`` on every tensor of the state dict, buffers included).

Also: the build time of each model is a metric at step 0 (``build_teacher_s``,
``build_student_s``), as the service records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from sharp_core.models.loading import LocalResolver, load_model, weights_dtype
from sharp_core.spec import ModelSpec, parse_spec
from sharp_core.train.loop import train
from tests.helpers import GPT2_TINY, Recorder, spec_dict, write_corpus

CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "gpt2": (
        {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 101},
        "causal_lm",
    ),
    "opt": (
        {
            "model_type": "opt",
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "vocab_size": 101,
            "max_position_embeddings": 64,
        },
        "causal_lm",
    ),
    "llama": (
        {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "vocab_size": 101,
            "max_position_embeddings": 64,
        },
        "causal_lm",
    ),
    "bert": (
        {
            "model_type": "bert",
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "vocab_size": 101,
            "max_position_embeddings": 64,
        },
        "sequence_classification",
    ),
}


def _old_build(cfg: dict[str, Any], dtype: torch.dtype, task: str) -> torch.nn.Module:
    """The code path before issue 17, verbatim in effect: build on the default device in
    `dtype`, then move (here to the CPU, a no-op)."""
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if task == "sequence_classification":
        config.num_labels = 3
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    return auto.from_config(config, attn_implementation="sdpa", dtype=dtype).to("cpu")


@pytest.mark.parametrize("dtype_name", ["auto", "bfloat16"])
@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_config_init_on_cpu_is_bit_identical_to_the_old_path(
    family: str, role: str, dtype_name: str
) -> None:
    cfg, task = CONFIGS[family]
    cpu = torch.device("cpu")
    dtype = weights_dtype(dtype_name, role, cpu)
    torch.manual_seed(1234)
    old = _old_build(cfg, dtype, task)
    torch.manual_seed(1234)
    new = load_model(
        ModelSpec(init="config", config=cfg, dtype=dtype_name),
        role=role,
        resolver=LocalResolver(),
        device=cpu,
        task=task,
        num_labels=3 if task == "sequence_classification" else None,
    )
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert (
            a[name].dtype
            == b[name].dtype
            == (dtype if a[name].is_floating_point() else a[name].dtype)
        )
        assert b[name].device == cpu
        assert torch.equal(a[name], b[name]), f"{family}: {name} differs"
    # and the draw is the seed's: another seed gives other weights
    torch.manual_seed(4321)
    other = _old_build(cfg, dtype, task).state_dict()
    assert any(not torch.equal(other[n], b[n]) for n in b if b[n].is_floating_point())


def test_build_times_are_metrics_at_step_0(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, 20_000)
    spec = parse_spec(
        spec_dict(
            corpus,
            teacher={"init": "config", "config": dict(GPT2_TINY, n_layer=3)},
            method={"name": "kd"},
            training={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0},
        )
    )
    rec = Recorder()
    res = train(spec, tmp_path / "run", callbacks=rec)
    assert res.status == "completed"
    first = rec.metrics[0]
    assert 0 < first["build_teacher_s"] < 60 and 0 < first["build_student_s"] < 60, first
    assert not any(k.startswith("build_") for s, m in rec.metrics.items() if s for k in m)
