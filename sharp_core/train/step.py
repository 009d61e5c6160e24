"""One micro-step of the objective, and the per-term backward pass of the diagnostics.

    L = (1 − a)·CE + a·D(p_T ‖ q_S; τ) + s(t)·Σ_g w_g·L_g      (+ basis_loss, learned basis)

`micro_step` is the only place the methods differ (which terms exist); the loop
(`sharp_core.train.loop.train`) is the same for all. It is public so that benchmarks time the
trainer's very step on a hand-built `Setup`, with the logit loss they choose passed in as
``Setup.logit_loss`` rather than patched.

All terms are normalised by *global* counts of the optimizer step (valid tokens for CE and
D, sequences for the attention terms), so grad_accum=8 × batch 1 equals grad_accum=1 ×
batch 8.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sharp_core.cache import teacher_cache
from sharp_core.data.loading import BatchStream, ClassificationData
from sharp_core.objectives import losses
from sharp_core.train.setup import Setup

__all__ = [
    "StepLosses",
    "backward_per_term",
    "micro_step",
    "next_batch",
    "pcgrad",
    "step_counts",
]


class StepLosses(NamedTuple):
    """What `micro_step` returns.

    ``terms``: every term already normalised by the step's global counts ('ce', 'kd',
    'logit', each attention term, 'basis_loss'), with their weighted sum under 'loss'.
    ``parts``: the weighted pieces whose sum is the loss ('logit' and each weighted attention
    term), which the per-term backward (diagnostics, PCGrad) differentiates one at a time.
    """

    terms: dict[str, torch.Tensor]
    parts: dict[str, torch.Tensor]


def next_batch(S: Setup, stream: BatchStream, batch_size: int) -> dict[str, torch.Tensor]:
    """input_ids (B, N), and for classification attention_mask (B, N) and labels (B,)."""
    if isinstance(S.data, ClassificationData):
        idx = stream.next_indices(batch_size)
        return {k: v[idx].to(S.device, non_blocking=True) for k, v in S.data.train.items()}
    if S.teacher_cache is not None:  # the blocks' cached teacher targets ride along
        idx = stream.next_indices(batch_size)
        x = stream.blocks[idx].to(S.device, non_blocking=True)
        return {"input_ids": x, **S.teacher_cache.batch(idx, S.device)}
    return {"input_ids": stream.next(batch_size).to(S.device, non_blocking=True)}


def step_counts(batches: list[dict[str, torch.Tensor]], classify: bool) -> tuple[int, int]:
    """(sequences, target tokens) of one optimizer step's micro-batches: the global counts
    every term is divided by. Targets: every next token of a packed block (no padding), the
    generated tokens of an on-policy batch (its ``loss_mask``), or one label per example."""
    n_seqs = sum(b["input_ids"].shape[0] for b in batches)
    if classify:
        return n_seqs, n_seqs
    # generated batches (sharp_core.train.onpolicy): only the masked-in tokens are targets
    n_tokens = sum(
        int(b["loss_mask"][:, 1:].sum()) if "loss_mask" in b else b["input_ids"][:, 1:].numel()
        for b in batches
    )
    return n_seqs, n_tokens


def micro_step(
    S: Setup,
    batch: torch.Tensor | dict[str, torch.Tensor],
    *,
    n_tokens: int,
    n_seqs: int,
    kd_weight: float | None = None,
    attn_scale: float = 1.0,
    amp_dtype: torch.dtype | None = None,
) -> StepLosses:
    """Forward both models on one micro-batch and compute every term of the objective.

    ``batch``: input_ids (B, N), or a `next_batch` dict (or an on-policy one, whose
    ``loss_mask`` (B, N) limits every term to the generated tokens). ``n_tokens`` / ``n_seqs``: the
    optimizer step's global counts (`step_counts`). ``kd_weight``: a (default: the spec's
    effective one, 0 for sft). ``attn_scale``: s(t). ``amp_dtype``: autocast dtype of the
    forwards (None: none). No backward pass here.
    """
    m = S.spec.method
    a = m.effective_kd_weight if kd_weight is None else kd_weight
    V = S.vocab
    batch = batch if isinstance(batch, dict) else {"input_ids": batch}
    classify = S.spec.task == "sequence_classification"
    x = batch["input_ids"]  # (B, N)
    # packed LM blocks: every position attends (causally); classification: padding masked
    # None for packed blocks: an all-ones mask would cost transformers a device-to-host
    # sync per forward to discover it can use SDPA's is_causal path
    mask = batch.get("attention_mask")  # (B, N) or None
    query_mask = mask.bool() if mask is not None else torch.ones_like(x, dtype=torch.bool)
    # labels aligned with logits rows: next tokens (B, N-1), or one class per example (B, 1)
    labels = batch["labels"][:, None] if classify else x[:, 1:]
    loss_mask = batch.get("loss_mask")  # (B, N) bool: on-policy, True on generated tokens
    if loss_mask is not None:  # prompt tokens carry no loss: neither logit nor attention terms
        labels = labels.masked_fill(~loss_mask[:, 1:], losses.IGNORE_INDEX)
        query_mask = query_mask & loss_mask
    terms: dict[str, torch.Tensor] = {}
    cached = teacher_cache.SparseTargets.from_batch(batch)  # the logit term from the cache
    with torch.autocast(S.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        t_logits = None
        if cached is not None and S.teacher is not None and S.teacher_capture is not None:
            # attention methods on a cache: the teacher runs for its attention only, no LM head
            with torch.inference_mode(), S.teacher_capture:
                teacher_cache.teacher_backbone(S.teacher)(input_ids=x, attention_mask=mask)
        elif S.teacher is not None and cached is None:
            # inference mode, not just no_grad: no version counters or view tracking on the
            # teacher's activations; its outputs (logits, captured q/k) are only ever read
            with torch.inference_mode():
                if S.teacher_capture is not None:
                    with S.teacher_capture:
                        t_logits = S.teacher(input_ids=x, attention_mask=mask).logits
                else:
                    t_logits = S.teacher(input_ids=x, attention_mask=mask).logits
            # (B, N-1, V): teacher rows beyond the tokenizer dropped; classes: (B, 1, C)
            t_logits = t_logits[:, None, :] if classify else t_logits[:, :-1, :V]
        if S.student_capture is not None:
            with S.student_capture:
                s_logits = S.student(input_ids=x, attention_mask=mask).logits
        else:
            s_logits = S.student(input_ids=x, attention_mask=mask).logits
        s_logits = s_logits[:, None, :] if classify else s_logits[:, :-1, :V]  # like t_logits

    # the divergence's settings, shared by the dense and the cached (sparse) logit term
    div: dict[str, Any] = {
        "kd_weight": a,
        "temperature": m.temperature,
        "alpha": m.skew_alpha,
        "beta": m.jsd_beta,
        "num_valid": n_tokens,
        "chunk_size": m.logit_chunk,
    }
    if cached is not None and a > 0:
        logit_term, terms["ce"], terms["kd"] = teacher_cache.sparse_logit_objective(
            m.divergence, s_logits, cached, labels, estimator=m.teacher_cache.loss_estimator, **div
        )
    elif t_logits is not None and a > 0:
        # (1-a)·CE + a·D in one fused pass over the logits (same value and gradient)
        logit_term, terms["ce"], terms["kd"] = S.logit_loss(
            m.divergence, s_logits, t_logits, labels, **div
        )
    else:
        ce = losses.cross_entropy(s_logits, labels, num_valid=n_tokens, chunk_size=m.logit_chunk)
        terms["ce"] = ce
        logit_term = (1 - a) * ce
    terms["logit"] = logit_term
    parts = {"logit": logit_term}  # the weighted pieces whose sum is the loss
    if S.objective is not None:
        assert S.student_capture is not None and S.teacher_capture is not None
        att = S.objective(S.student_capture.layers, S.teacher_capture.layers, query_mask)
        S.student_capture.clear()
        S.teacher_capture.clear()
        for name, term in att.items():
            term = term / n_seqs
            terms[name] = term
            if name != "basis_loss":
                parts[name] = attn_scale * S.objective.weights[name] * term
    total = torch.stack(list(parts.values())).sum()
    if "basis_loss" in terms:
        total = total + terms["basis_loss"]
    terms["loss"] = total
    return StepLosses(terms, parts)


def backward_per_term(
    parts: dict[str, torch.Tensor],
    basis_loss: torch.Tensor | None,
    params: list[torch.nn.Parameter],
    use_pcgrad: bool,
    scaler: Any,
) -> dict[str, float]:
    """One backward pass per term: gradient cosines between terms, optionally PCGrad.

    Why per term and not from the attention-level gradients: orthogonality of the SHARP
    terms w.r.t. the attention probabilities does not imply orthogonality on the shared
    student weights; this measures the latter (sharp-method.md, "interference").
    Terms: 'logit' ((1-a)CE + a·D) and each weighted attention term. Gradients are taken
    of the scaler-scaled terms (fp16), which changes no cosine. Accumulates into ``.grad``
    (summed, or PCGrad-projected then summed) and returns {cos_<a>_<b>: cosine}.
    """
    names = list(parts)
    grads = []
    for n in names:
        g = torch.autograd.grad(
            scaler.scale(parts[n]), params, retain_graph=True, allow_unused=True
        )
        grads.append(
            torch.cat(
                [
                    (gi if gi is not None else torch.zeros_like(p)).reshape(-1).float()
                    for gi, p in zip(g, params, strict=True)
                ]
            )
        )  # (P,) over every student parameter
        del g
    cos: dict[str, float] = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            c = F.cosine_similarity(grads[i], grads[j], dim=0, eps=1e-20)
            cos[f"cos_{names[i]}_{names[j]}"] = float(c)
    if use_pcgrad:
        grads = pcgrad(grads)
    total = torch.stack(grads).sum(0)  # (P,)
    offset = 0
    for p in params:
        size = p.numel()
        piece = total[offset : offset + size].view_as(p).to(p.dtype)
        p.grad = piece if p.grad is None else p.grad + piece
        offset += size
    if basis_loss is not None and basis_loss.requires_grad:
        scaler.scale(basis_loss).backward()
    return cos


def pcgrad(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """PCGrad (Yu et al. 2020): project each gradient off every other one it conflicts with.

    Deterministic order (the terms' order) rather than the paper's random shuffle, so runs
    are reproducible; the projections use the original gradients, as in the paper.
    """
    out = []
    for i, gi in enumerate(grads):
        g = gi.clone()
        for j, gj in enumerate(grads):
            if i == j:
                continue
            dot = torch.dot(g, gj)
            if dot < 0:
                g = g - dot / (gj.dot(gj) + 1e-20) * gj
        out.append(g)
    return out
