"""Padded vocabularies (docs/planning.md): teacher and student with one tokenizer whose
embedding matrices are padded to different sizes distil as one vocabulary, the logits sliced
to the tokenizer's length (Qwen2.5's 151 936 vs 152 064 rows), instead of being refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sharp_core.models.compat import compare_tokenizers
from sharp_core.spec import parse_spec
from sharp_core.train.loop import train
from tests.helpers import Recorder, spec_dict, train_tiny_teacher

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def models(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(teacher, student, the same student with 128 more embedding and head rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("padded")
    teacher = train_tiny_teacher(corpus, tmp / "teacher")
    tok = AutoTokenizer.from_pretrained(str(teacher))
    from transformers import AutoConfig

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{**LLAMA, "vocab_size": len(tok)})
    student = AutoModelForCausalLM.from_config(cfg)
    plain, padded = tmp / "student", tmp / "student-padded"
    student.save_pretrained(plain)
    tok.save_pretrained(plain)
    student.resize_token_embeddings(len(tok) + 128)  # the first rows keep their values
    assert student.get_output_embeddings().weight.shape[0] == len(tok) + 128
    student.save_pretrained(padded)
    tok.save_pretrained(padded)
    return teacher, plain, padded


def test_a_student_padded_by_128_rows_distils_with_the_same_losses(corpus, models, tmp_path):
    teacher, plain, padded = models
    runs = {}
    for name, student in (("plain", plain), ("padded", padded)):
        spec = spec_dict(
            corpus,
            teacher={"model": str(teacher)},
            student={"model": str(student)},
            method={"name": "kd"},
            training={"max_steps": 4, "eval_every": 2, "checkpoint_every": 0},
        )
        spec.pop("tokenizer")
        rec = Recorder()
        train(parse_spec(spec), tmp_path / name, callbacks=rec)
        runs[name] = rec.metrics
    for step in range(1, 5):
        for key in ("loss", "kd", "ce", "grad_norm"):
            a, b = runs["plain"][step][key], runs["padded"][step][key]
            assert b == pytest.approx(a, rel=1e-5, abs=1e-7), (step, key)
    assert runs["padded"][4]["eval_loss"] == pytest.approx(runs["plain"][4]["eval_loss"], rel=1e-5)


def test_the_preflight_calls_it_padded(models):
    from transformers import AutoConfig, AutoTokenizer

    teacher, _, padded = models
    t_tok, s_tok = (
        AutoTokenizer.from_pretrained(str(teacher)),
        AutoTokenizer.from_pretrained(str(padded)),
    )
    rows_t = AutoConfig.from_pretrained(str(teacher)).vocab_size
    rows_s = AutoConfig.from_pretrained(str(padded)).vocab_size
    [f] = compare_tokenizers(
        t_tok, s_tok, teacher_rows=rows_t, student_rows=rows_s, cross_tokenizer=None
    )
    assert f.code == "vocab_padded" and str(rows_s) in f.message
