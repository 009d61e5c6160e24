"""Shared builders for the library tests: tiny specs, corpora and model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sharp_core.train.loop import TrainCallbacks

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text(max_chars: int | None = None) -> str:
    """Real text: tiny Shakespeare when ../shared is present, else CPython's own docs text."""
    if SHARED_CORPUS.is_file():
        text = SHARED_CORPUS.read_text(encoding="utf-8")
    else:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars] if max_chars else text


def write_corpus(tmp: Path, max_chars: int = 60_000, name: str = "corpus.txt") -> Path:
    p = tmp / name
    p.write_text(corpus_text(max_chars), encoding="utf-8")
    return p


GPT2_TINY = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64}
GPT2_TEACHER = {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 64, "n_positions": 64}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def spec_dict(corpus: Path, **over: Any) -> dict[str, Any]:
    """A spec that trains in about a second on CPU."""
    d: dict[str, Any] = {
        "name": "t",
        "student": {"init": "config", "config": dict(GPT2_TINY)},
        "tokenizer": {"train": {"vocab_size": 300}},
        "dataset": {"files": [str(corpus)]},
        "method": {"name": "sft"},
        "training": {
            "max_steps": 6,
            "batch_size": 4,
            "seq_len": 32,
            "warmup_steps": 2,
            "eval_every": 3,
            "checkpoint_every": 3,
            "lr": 3e-3,
        },
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


class Recorder(TrainCallbacks):
    """Keeps what the training loop reports: metrics by step, checkpoint steps and events;
    asks to stop once the reported step reaches ``stop_at``."""

    def __init__(self, stop_at: int | None = None):
        self.metrics: dict[int, dict[str, float]] = {}
        self.checkpoints: list[int] = []
        self.events: list[tuple[str, dict]] = []
        self.stop_at = stop_at
        self.step = 0

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(step, {}).update(metrics)
        self.step = step

    def on_checkpoint(self, step: int, path: Path, manifest: dict) -> None:
        self.checkpoints.append(step)

    def on_event(self, kind: str, data: dict) -> None:
        self.events.append((kind, data))

    def should_stop(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at


def train_tiny_teacher(corpus: Path, out: Path) -> Path:
    """`GPT2_TEACHER` without dropout, 4 steps on `corpus`: a teacher whose outputs are
    deterministic (the distributed and on-policy tests compare runs bit for bit)."""
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import train

    spec = spec_dict(
        corpus,
        student={"init": "config", "config": {**GPT2_TEACHER, **NO_DROPOUT}},
        training={"max_steps": 4, "eval_every": 0, "checkpoint_every": 0},
    )
    res = train(parse_spec(spec), out)
    assert res.checkpoint is not None
    return res.checkpoint
