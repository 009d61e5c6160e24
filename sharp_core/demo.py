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


def _dataset(corpus: str | dict[str, Any]) -> dict[str, Any]:
    base = {"files": [corpus]} if isinstance(corpus, str) else corpus
    return {**base, "eval_fraction": 0.05, "max_eval_blocks": 32}


def _training(steps: int) -> dict[str, Any]:
    """Teacher and student train on the same schedule, so their perplexities compare."""
    return {
        "max_steps": steps,
        "batch_size": 16,
        "seq_len": 128,
        "lr": 2e-3,
        "warmup_steps": 20,
        "eval_every": 50,
        "checkpoint_every": 100,
        "seed": 0,
    }


def _gpt2(layers: int, heads: int, width: int, **extra: Any) -> dict[str, Any]:
    config = {
        "model_type": "gpt2",
        "n_layer": layers,
        "n_head": heads,
        "n_embd": width,
        "n_positions": 128,
        **extra,
    }
    return {"init": "config", "config": config}


def teacher_spec(corpus: str | dict[str, Any], steps: int = 300) -> dict[str, Any]:
    """A 4-layer × 4-head GPT-2 trained from scratch with its own byte-level BPE tokenizer."""
    return {
        "name": "demo-teacher",
        "student": _gpt2(4, 4, 128, resid_pdrop=0.1, attn_pdrop=0.1),
        "tokenizer": {"train": {"vocab_size": 1024}},
        "dataset": _dataset(corpus),
        "method": {"name": "sft"},
        "training": _training(steps),
    }


def student_spec(
    teacher: str | dict[str, Any], corpus: str | dict[str, Any], steps: int = 200
) -> dict[str, Any]:
    """A 2-layer × 2-head student distilled with SHARP (KD + the three attention terms)."""
    return {
        "name": "demo-student-sharp",
        "teacher": {"model": teacher},
        "student": _gpt2(2, 2, 64),
        "dataset": _dataset(corpus),
        "method": {
            "name": "sharp",
            "kd_weight": 0.9,
            "rank": 32,
            "granularities": {"layer": 0.1, "head": 0.1, "token": 0.1},
        },
        "training": _training(steps),
    }
