"""Held-out perplexity of a saved model on a text file."""

from __future__ import annotations

from pathlib import Path

import torch

from sharp_core import losses
from sharp_core.data import build_data, eval_batches, load_texts
from sharp_core.errors import DataError
from sharp_core.models import load_model, resolve_tokenizer
from sharp_core.spec import DatasetSpec, parse_spec


def perplexity(
    model_dir: Path,
    data: Path,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str | None = None,
) -> tuple[float, int]:
    """(mean token cross-entropy, tokens) over every full `seq_len` block of `data`."""
    if not data.is_file():
        raise DataError(f"data file not found: {data}", param="data")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = parse_spec(
        {
            "student": {"model": str(model_dir)},
            "dataset": {"files": [str(data)]},
            "method": {"name": "sft"},
        },
        prefix="",
    )
    tok = resolve_tokenizer(spec, resolver=None, corpus=None).tokenizer  # type: ignore[arg-type]
    model = load_model(spec.student, role="student", resolver=None, device=dev)  # type: ignore[arg-type]
    model.eval()
    texts = load_texts(DatasetSpec(files=[str(data)]))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    from sharp_core.data import pack

    blocks = pack(ids, tok.eos_token_id, seq_len)
    if blocks.shape[0] == 0:
        raise DataError(f"{data} has fewer than {seq_len} tokens", param="data")
    total, count = 0.0, 0
    V = len(tok)
    with torch.no_grad():
        for x in eval_batches(blocks, batch_size):
            x = x.to(dev)
            logits = model(input_ids=x).logits[:, :-1, :V]
            n = x[:, 1:].numel()
            total += losses.cross_entropy(logits, x[:, 1:], num_valid=n).item() * n
            count += n
    return total / count, count


__all__ = ["perplexity", "build_data"]
