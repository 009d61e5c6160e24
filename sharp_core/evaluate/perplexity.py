"""Held-out evaluation: the one perplexity loop (the trainer's eval and `perplexity`) and the
classifier's accuracy / macro-F1."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from sharp_core.data.loading import ClassificationData, PackedData, eval_batches, load_texts, pack
from sharp_core.errors import DataError
from sharp_core.models.loading import load_model, resolve_tokenizer
from sharp_core.objectives import losses
from sharp_core.spec import DatasetSpec, parse_spec

__all__ = [
    "SET_METRICS",
    "classifier_metrics",
    "evaluate",
    "evaluate_sets",
    "lm_loss",
    "perplexity",
]


def lm_loss(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    vocab: int,
    batch_size: int,
    device: torch.device,
) -> tuple[float, int]:
    """(mean next-token cross-entropy, token count) of `model` over packed `blocks` (M, N).

    Logits are sliced to the tokenizer's `vocab` (a padded embedding's extra rows never
    count). Runs under the caller's grad / autocast mode.
    """
    total, count = 0.0, 0
    for x in eval_batches(blocks, batch_size):
        x = x.to(device)  # (B, N)
        logits = model(input_ids=x).logits[:, :-1, :vocab]  # (B, N-1, V)
        n = x[:, 1:].numel()
        total += losses.cross_entropy(logits, x[:, 1:], num_valid=n).item() * n
        count += n
    return total / max(count, 1), count


def classifier_metrics(
    model: torch.nn.Module, data: ClassificationData, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Accuracy, macro-F1 (unweighted mean of per-class F1, classes absent from both
    predictions and labels skipped) and the cross-entropy on the eval split."""
    preds, golds, total = [], [], 0.0
    n = data.eval["labels"].shape[0]
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size].to(device) for k, v in data.eval.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        total += torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        golds.append(b["labels"].cpu())
    p, g = torch.cat(preds), torch.cat(golds)
    f1s = []
    for c in range(data.num_labels):
        tp = int(((p == c) & (g == c)).sum())
        fp = int(((p == c) & (g != c)).sum())
        fn = int(((p != c) & (g == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "eval_loss": total / n,
        "eval_accuracy": float((p == g).float().mean()),
        "eval_macro_f1": sum(f1s) / max(len(f1s), 1),
    }


def evaluate(
    model: torch.nn.Module,
    data: PackedData | ClassificationData,
    *,
    vocab: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The trainer's eval metrics: eval_loss and eval_ppl (LM) or accuracy and macro-F1
    (classification), in eval mode, under no_grad and autocast to `amp_dtype` if given.
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            if isinstance(data, ClassificationData):
                return classifier_metrics(model, data, batch_size, device)
            loss, _ = lm_loss(model, data.eval, vocab, batch_size, device)
            return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    finally:
        model.train(was_training)


#: What an evaluation set's metrics are called after its split's name: ``val_loss``,
#: ``val_ppl``; ``val_accuracy``, ``val_f1`` (sweeps and their reports read these names).
SET_METRICS = {
    "eval_loss": "loss",
    "eval_ppl": "ppl",
    "eval_accuracy": "accuracy",
    "eval_macro_f1": "f1",
}


def evaluate_sets(
    model: torch.nn.Module,
    sets: Mapping[str, PackedData | ClassificationData],
    *,
    vocab: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """`evaluate` on each named evaluation set (`Setup.eval_sets`), its metrics prefixed with
    the split's name (`SET_METRICS`): ``{"val_loss": …, "val_ppl": …, "test_loss": …}``."""
    out: dict[str, float] = {}
    for split, data in sets.items():
        ev = evaluate(
            model, data, vocab=vocab, batch_size=batch_size, device=device, amp_dtype=amp_dtype
        )
        out.update(
            {f"{split}_{SET_METRICS.get(k, k.removeprefix('eval_'))}": v for k, v in ev.items()}
        )
    return out


def perplexity(
    model_dir: Path,
    data: Path,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    device: str | None = None,
) -> tuple[float, int]:
    """(mean token cross-entropy, tokens) of a saved model over every full `seq_len` block
    of the text file `data`."""
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
    blocks = pack(ids, tok.eos_token_id, seq_len)
    if blocks.shape[0] == 0:
        raise DataError(f"{data} has fewer than {seq_len} tokens", param="data")
    with torch.no_grad():
        return lm_loss(model, blocks, len(tok), batch_size, dev)
