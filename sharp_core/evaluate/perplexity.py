"""Held-out evaluation: the one perplexity loop (the trainer's eval and `perplexity`) and the
classifier's accuracy / macro-F1."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sharp_core.data.loading import ClassificationData, PackedData, load_texts, pack
from sharp_core.data.packing import forward_kwargs
from sharp_core.errors import DataError
from sharp_core.models.loading import load_model, resolve_tokenizer
from sharp_core.objectives import fused, losses
from sharp_core.ranks import ONE, Ranks
from sharp_core.spec import DatasetSpec, parse_spec

__all__ = [
    "ONE",
    "SET_METRICS",
    "Ranks",
    "EVAL_LOGIT_ROWS",
    "classifier_metrics",
    "evaluate",
    "evaluate_sets",
    "lm_loss",
    "perplexity",
    "rank_rows",
]


def rank_rows(n: int, batch_size: int, rank: int, world_size: int) -> list[torch.Tensor | None]:
    """Row indices of every forward this rank runs over `n` rows: rank r takes rows
    r, r+W, r+2W, … in micro-batches of `batch_size` (the per-rank batch).

    Every rank gets the same number of forwards, ceil(ceil(n / W) / batch_size); None
    marks a padding forward on a rank that ran out of rows. Why: a sharded (FSDP) model
    all-gathers its weights inside each forward, so every rank must join every forward."""
    mine = torch.arange(n)[rank::world_size]
    steps = math.ceil(math.ceil(n / world_size) / batch_size)
    out: list[torch.Tensor | None] = []
    for i in range(steps):
        sl = mine[i * batch_size : (i + 1) * batch_size]
        out.append(sl if sl.numel() else None)
    return out


def _sums(ranks: Ranks, values: list[float], device: torch.device) -> list[float]:
    """`values` summed over the ranks (float64; every rank must call this)."""
    if ranks.world_size <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return ranks.all_reduce_sum(t).tolist()


#: Rows of (rows, V) logits the evaluation holds at once: 4096 × 128 256 fp32 = 2 GiB was the
#: old (1, N, V) at N = 4096; 512 rows keep it at 256 MiB whatever the batch and length.
EVAL_LOGIT_ROWS = 512


def _lm_head(model: torch.nn.Module) -> fused.Head | None:
    """The output projection the chunked loss can run itself, with the soft-cap the model's
    forward applies after it (Gemma 2 / 3), or None (then the model's own logits are used):
    absent, not a plain Linear (or its own FSDP unit), compiled (hooks added after compiling
    are not traced in), or followed by another transform of the logits (`fused.head_of`
    decides, as for training). Inside an FSDP root unit it works: the root's weights stay
    gathered until the whole forward returns."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "_orig_mod"):
        return None
    # a plain Linear only: a head sharded as its own FSDP unit (its class is then an FSDP
    # subclass) is resharded by FSDP's post-forward hook before ours could use its weight
    return fused.head_of(inner)[0]


class _ChunkedHead:
    """Runs the head on the hidden states `rows` positions at a time inside the model's own
    forward (where an FSDP root has its head gathered), summing the cross-entropy of the
    next tokens, and lets the model's head project only the last position."""

    def __init__(self, head: torch.nn.Linear, vocab: int, rows: int, softcap: float | None = None):
        self.head, self.vocab, self.rows, self.softcap = head, vocab, rows, softcap
        self.targets: torch.Tensor | None = None  # (B, N-1) set before each forward
        self.total = 0.0
        self.hidden: torch.Tensor | None = None
        self.hooks = [
            head.register_forward_pre_hook(self._pre),
            head.register_forward_hook(self._post),
        ]

    def _pre(self, _m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        self.hidden = args[0]  # (B, N, D)
        return (args[0][:, -1:],)  # the model's own logits: (B, 1, V)

    def _post(self, m: torch.nn.Module, _args: object, _out: object) -> None:
        assert self.hidden is not None and self.targets is not None
        D = self.hidden.shape[-1]
        h = self.hidden[:, :-1].reshape(-1, D)  # (B·(N-1), D)
        y = self.targets.reshape(-1)
        total = 0.0
        for i in range(0, h.shape[0], self.rows):
            logits = torch.nn.functional.linear(h[i : i + self.rows], m.weight, m.bias)  # type: ignore[arg-type]
            logits = fused.softcap_logits(logits, self.softcap)  # as the model's forward caps
            logits = logits[None, :, : self.vocab]  # (1, R, V)
            part = y[None, i : i + self.rows]
            r = int((part != losses.IGNORE_INDEX).sum())  # masked targets do not count
            mean = losses.cross_entropy(logits, part, num_valid=max(r, 1))
            total += mean.item() * r
        self.total, self.hidden = total, None

    def remove(self) -> None:
        for hk in self.hooks:
            hk.remove()


def lm_loss(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    vocab: int,
    batch_size: int,
    device: torch.device,
    ranks: Ranks = ONE,
    rows: int | None = EVAL_LOGIT_ROWS,
    inputs: Callable[[Any], dict[str, torch.Tensor]] | None = None,
) -> tuple[float, int]:
    """(mean next-token cross-entropy, token count) of `model` over packed `blocks` (M, N).

    ``inputs`` turns row indices into the batch the packing needs (`PackedData.inputs`:
    position_ids, a padding mask and the loss mask, which limits the targets counted, so
    evaluation sees the tokens training does).

    `batch_size` is per rank; under several ranks each evaluates its share of the blocks
    (`rank_rows`) and the sums (loss·tokens, tokens) are all-reduced, so every rank returns
    the single-process numbers. The (B, N-1, V) logits are never held whole: the head runs
    on `rows` positions at a time (`_ChunkedHead`) where the model allows it (``rows=None``:
    the model's own full logits, the reference). Logits are
    sliced to the tokenizer's `vocab` (a padded embedding's extra rows never count). Runs
    under the caller's grad / autocast mode.
    """
    head = _lm_head(model) if rows is not None else None
    chunked = (
        _ChunkedHead(head.module, vocab, rows, head.softcap)
        if head is not None and rows is not None
        else None
    )
    total, count = 0.0, 0
    try:
        for sel in rank_rows(blocks.shape[0], batch_size, ranks.rank, ranks.world_size):
            at = sel if sel is not None else slice(0, 1)
            b = inputs(at) if inputs is not None else {"input_ids": blocks[at].to(device)}
            x = b["input_ids"].long()  # (B, N)
            fwd = forward_kwargs(b)
            y = x[:, 1:]
            if "loss_mask" in b:
                y = y.masked_fill(~b["loss_mask"][:, 1:], losses.IGNORE_INDEX)
            n = int((y != losses.IGNORE_INDEX).sum())
            if chunked is not None:
                chunked.targets = y
                model(input_ids=x, **fwd)
                part = chunked.total
            else:
                logits = model(input_ids=x, **fwd).logits[:, :-1, :vocab]  # (B, N-1, V)
                part = losses.cross_entropy(logits, y, num_valid=max(n, 1)).item() * n
            if sel is None:
                continue  # a padding forward: its result is not counted
            total += part
            count += n
    finally:
        if chunked is not None:
            chunked.remove()
    total, count_f = _sums(ranks, [total, float(count)], device)
    return total / max(count_f, 1), int(count_f)


def classifier_metrics(
    model: torch.nn.Module,
    data: ClassificationData,
    batch_size: int,
    device: torch.device,
    ranks: Ranks = ONE,
) -> dict[str, float]:
    """Accuracy, macro-F1 (unweighted mean of per-class F1, classes absent from both
    predictions and labels skipped) and the cross-entropy on the eval split.

    Each rank counts a confusion matrix over its share of the rows (`rank_rows`); the
    matrices and loss sums are all-reduced, so F1 is computed from the global counts."""
    C = data.num_labels
    confusion = torch.zeros(C, C, dtype=torch.float64)  # (gold, predicted)
    total = 0.0
    n = data.eval["labels"].shape[0]
    for rows in rank_rows(n, batch_size, ranks.rank, ranks.world_size):
        sel = rows if rows is not None else slice(0, 1)
        b = {k: v[sel].to(device) for k, v in data.eval.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        if rows is None:
            continue  # a padding forward: its result is not counted
        total += torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum").item()
        pairs = b["labels"].cpu() * C + logits.argmax(-1).cpu()
        confusion += torch.bincount(pairs, minlength=C * C).view(C, C).double()
    if ranks.world_size > 1:  # one all-reduce: [loss sum, C×C counts]
        flat = torch.cat([torch.tensor([total], dtype=torch.float64), confusion.flatten()])
        flat = ranks.all_reduce_sum(flat.to(device)).cpu()
        total, confusion = float(flat[0]), flat[1:].view(C, C)
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp  # predicted c, gold another class
    fn = confusion.sum(1) - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return {
        "eval_loss": total / n,
        "eval_accuracy": float(tp.sum() / n),
        "eval_macro_f1": float(f1[present].sum() / max(int(present.sum()), 1)),
    }


def evaluate(
    model: torch.nn.Module,
    data: PackedData | ClassificationData,
    *,
    vocab: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    ranks: Ranks = ONE,
) -> dict[str, float]:
    """The trainer's eval metrics: eval_loss and eval_ppl (LM) or accuracy and macro-F1
    (classification), in eval mode, under no_grad and autocast to `amp_dtype` if given.
    The model's train/eval mode is restored afterwards.

    Under several `ranks`, every rank must call this with the model it trains (the
    DDP/FSDP-wrapped one) and its per-rank `batch_size`: the rows are split over the
    ranks, every rank runs the same number of forwards, and every rank returns the same
    (single-process) metrics."""
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        ):
            if isinstance(data, ClassificationData):
                return classifier_metrics(model, data, batch_size, device, ranks)
            inputs = None
            if data.eval_flags is not None:  # packed documents, padding or a loss mask
                inputs = functools.partial(data.inputs, "eval", device=device)
            loss, _ = lm_loss(model, data.eval, vocab, batch_size, device, ranks, inputs=inputs)
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
    ranks: Ranks = ONE,
) -> dict[str, float]:
    """`evaluate` on each named evaluation set (`Setup.eval_sets`), its metrics prefixed with
    the split's name (`SET_METRICS`): ``{"val_loss": …, "val_ppl": …, "test_loss": …}``."""
    out: dict[str, float] = {}
    for split, data in sets.items():
        ev = evaluate(
            model,
            data,
            vocab=vocab,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
            ranks=ranks,
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
