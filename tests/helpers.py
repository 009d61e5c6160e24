"""Shared builders for the library tests: tiny specs, corpora and model folders."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
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


def resign_manifest(ckpt: Path) -> None:
    """List and hash a checkpoint's files anew in its manifest (so an edited one verifies)."""
    import json

    from sharp_core.train.checkpoint import MANIFEST, sha256_file

    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {
        p.relative_to(ckpt).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def to_legacy_checkpoint(ckpt: Path) -> None:
    """Rewrite a checkpoint the way the trainer wrote them before the sharded format: no
    ``dcp/``, the optimizer's ``state_dict()`` inside ``training_state.pt``, the weights only in
    ``model.safetensors``. For students without a learned basis (not SHARP's)."""
    import json
    import shutil
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from sharp_core.spec import parse_spec
    from sharp_core.train.state import STATE_FILE, adamw, load_sharded

    spec = parse_spec(json.loads((ckpt / "spec.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, [], spec.training, torch.device("cpu"))
    load_sharded(ckpt, model, SimpleNamespace(objective=None, optimizer=opt))  # type: ignore[arg-type]
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    state.update(optimizer=opt.state_dict(), objective=None)
    torch.save(state, ckpt / STATE_FILE)
    shutil.rmtree(ckpt / "dcp")
    resign_manifest(ckpt)


#: A chat template with {% generation %} marks around each answer and its end marker, the
#: way templates that support ``return_assistant_tokens_mask`` are written.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ m['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_rows(n: int, seed: int = 0, turns: int = 2) -> list[dict[str, Any]]:
    """Generated multi-turn conversations (system, then user/assistant turns) whose
    answers are a deterministic function of the question, so a model can learn them."""
    import random

    rng = random.Random(seed)
    words = corpus_text(20_000).split()
    rows = []
    for _ in range(n):
        msgs: list[dict[str, str]] = [{"role": "system", "content": "Answer in reverse."}]
        for _ in range(turns):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            msgs.append({"role": "user", "content": q})
            msgs.append({"role": "assistant", "content": " ".join(reversed(q.split()))})
        rows.append({"messages": msgs})
    return rows


def write_chat_jsonl(path: Path, n: int = 200, seed: int = 0) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed)), encoding="utf-8")
    return path


#: Credentials boto3 needs to talk to moto, and no instance-metadata lookups.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def moto_server() -> Iterator[int]:
    """A real S3-compatible HTTP server (moto) on a free loopback port, with `AWS_ENV` set in
    this process (and so in the workers it starts) while it runs; yields the port."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield port
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
