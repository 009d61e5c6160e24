"""The demo pipeline: train a small teacher, then distil a smaller student from it with SHARP.

Why this corpus: `pydoc_data.topics` is the text of Python's own documentation and ships
inside every CPython, so the demo needs no download and no file from this repository.
The same two specs are what `sharp demo` submits to the service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_demo_corpus(path: Path) -> Path:
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def teacher_spec(corpus: str | dict[str, Any], steps: int = 300) -> dict[str, Any]:
    """A 4-layer × 4-head GPT-2 trained from scratch with its own byte-level BPE tokenizer."""
    dataset = {"files": [corpus]} if isinstance(corpus, str) else corpus
    return {
        "name": "demo-teacher",
        "student": {
            "init": "config",
            "config": {
                "model_type": "gpt2",
                "n_layer": 4,
                "n_head": 4,
                "n_embd": 128,
                "n_positions": 128,
                "resid_pdrop": 0.1,
                "attn_pdrop": 0.1,
            },
        },
        "tokenizer": {"train": {"vocab_size": 1024}},
        "dataset": {**dataset, "eval_fraction": 0.05, "max_eval_blocks": 32},
        "method": {"name": "sft"},
        "training": {
            "max_steps": steps,
            "batch_size": 16,
            "seq_len": 128,
            "lr": 2e-3,
            "warmup_steps": 20,
            "eval_every": 50,
            "checkpoint_every": 100,
            "seed": 0,
        },
    }


def student_spec(
    teacher: str | dict[str, Any], corpus: str | dict[str, Any], steps: int = 200
) -> dict[str, Any]:
    """A 2-layer × 2-head student distilled with SHARP (KD + the three attention terms)."""
    dataset = {"files": [corpus]} if isinstance(corpus, str) else corpus
    return {
        "name": "demo-student-sharp",
        "teacher": {"model": teacher},
        "student": {
            "init": "config",
            "config": {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_head": 2,
                "n_embd": 64,
                "n_positions": 128,
            },
        },
        "dataset": {**dataset, "eval_fraction": 0.05, "max_eval_blocks": 32},
        "method": {
            "name": "sharp",
            "kd_weight": 0.5,
            "rank": 32,
            "granularities": {"layer": 0.1, "head": 0.1, "token": 0.1},
        },
        "training": {
            "max_steps": steps,
            "batch_size": 16,
            "seq_len": 128,
            "lr": 2e-3,
            "warmup_steps": 20,
            "eval_every": 50,
            "checkpoint_every": 100,
            "seed": 0,
        },
    }


def run_standalone(out: Path, teacher_steps: int = 300, student_steps: int = 200) -> dict[str, Any]:
    """Both jobs with the library alone (no service); returns perplexities and paths."""
    from sharp_core.spec import parse_spec
    from sharp_core.trainer import train

    corpus = write_demo_corpus(out / "corpus.txt")
    t = train(parse_spec(teacher_spec(str(corpus), teacher_steps)), out / "teacher")
    assert t.checkpoint is not None
    s = train(
        parse_spec(student_spec(str(t.checkpoint), str(corpus), student_steps)), out / "student"
    )
    return {
        "teacher_ppl": t.metrics.get("eval_ppl"),
        "student_ppl": s.metrics.get("eval_ppl"),
        "teacher": t.checkpoint,
        "student": s.checkpoint,
    }
