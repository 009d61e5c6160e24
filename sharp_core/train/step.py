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

import contextlib
import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sharp_core.cache import teacher_cache
from sharp_core.data.loading import BatchStream, ClassificationData
from sharp_core.data.packing import forward_kwargs
from sharp_core.objectives import fused, losses
from sharp_core.objectives.cross_tokenizer import check_cross_parity, fused_cross_objective
from sharp_core.train.setup import Setup

_log = logging.getLogger(__name__)

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
    """input_ids (B, N); for packed documents position_ids, and loss_mask where not every
    token is a target (`PackedData.inputs`); for classification attention_mask and labels."""
    idx = stream.next_indices(batch_size)
    if isinstance(S.data, ClassificationData):
        return {k: v[idx].to(S.device, non_blocking=True) for k, v in S.data.train.items()}
    # packed rows with what their packing needs (position_ids, attention_mask, loss_mask)
    batch = S.data.inputs("train", idx, S.device)
    if S.teacher_cache is not None:  # the blocks' cached teacher targets ride along
        batch.update(S.teacher_cache.batch(idx, S.device))
    return batch


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


def _maybe(ctx: Any) -> Any:
    return ctx if ctx is not None else contextlib.nullcontext()


def _hidden_of(head: fused.Head | None) -> Any:
    return fused.capture_hidden(head) if head is not None else contextlib.nullcontext([])


def _fused_heads(
    S: Setup, cached: Any, a: float
) -> tuple[fused.FusedLinearLoss | None, fused.Head | None, fused.Head | None]:
    """(kernel, student head, teacher head) of the fused logit term, or Nones for the dense
    path (a model whose head is not a plain lm_head: said once in the log). The teacher's
    head is None when its logits are not needed (a cache, or a = 0)."""
    if S.logit_path == "dense":
        return None, None, None
    s_head, why = fused.head_of(S.student)
    t_head = None
    need_teacher = S.teacher is not None and cached is None and a > 0
    if s_head is not None and need_teacher:
        assert S.teacher is not None
        t_head, why = fused.head_of(S.teacher)
        why = why and f"teacher: {why}"
    else:
        why = why and f"student: {why}"
    if s_head is None or (need_teacher and t_head is None):
        _log.warning("logit term: dense path (B×N×V logits), no fused loss: %s", why)
        S.logit_path = "dense"
        return None, None, None
    if S.teacher is not None and cached is None and t_head is None:
        # a = 0 (or no teacher logits needed): the teacher's head is skipped when it can be
        t_head = fused.head_of(S.teacher)[0]
    # looked up each step (cheap), not kept: a profiler or a test that wraps the module's
    # function sees every call; a kernel handed in through Setup.fused_loss wins
    capped = s_head.softcap is not None or (t_head is not None and t_head.softcap is not None)
    m = S.spec.method
    kernel = S.fused_loss or fused.select_kernel(m.logit_kernel, m.divergence, S.device, capped)[0]
    if S.logit_path is None and capped:  # the first micro-batch: said once
        _log.info(
            "logit term: fused with soft-capped logits (student cap %s, teacher cap %s)%s",
            s_head.softcap,
            None if t_head is None else t_head.softcap,
            " on the torch kernel: Liger's kernels cannot soft-cap"
            if S.fused_loss is None and m.logit_kernel in ("liger", "auto")
            else "",
        )
    return kernel, s_head, t_head


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
    if batch["input_ids"].dtype != torch.long:  # memory-mapped rows are int32
        batch = {**batch, "input_ids": batch["input_ids"].long()}
    if S.cross is not None:
        return _cross_step(S, batch, n_tokens=n_tokens, a=a, amp_dtype=amp_dtype)
    classify = S.spec.task == "sequence_classification"
    x = batch["input_ids"]  # (B, N)
    # packed LM blocks: every position attends (causally); classification: padding masked
    # None for packed blocks: an all-ones mask would cost transformers a device-to-host
    # sync per forward to discover it can use SDPA's is_causal path
    mask = batch.get("attention_mask")  # (B, N) or None
    # packed documents: positions restart per document, and transformers builds the
    # block-diagonal causal mask from them (sharp_core.data.packing)
    fwd = {"attention_mask": mask, **forward_kwargs(batch)}
    query_mask = mask.bool() if mask is not None else torch.ones_like(x, dtype=torch.bool)
    # labels aligned with logits rows: next tokens (B, N-1), or one class per example (B, 1)
    labels = batch["labels"][:, None] if classify else x[:, 1:]
    loss_mask = batch.get("loss_mask")  # (B, N) bool: on-policy, True on generated tokens
    if loss_mask is not None:  # prompt tokens carry no loss: neither logit nor attention terms
        labels = labels.masked_fill(~loss_mask[:, 1:], losses.IGNORE_INDEX)
        query_mask = query_mask & loss_mask
    terms: dict[str, torch.Tensor] = {}
    cached = teacher_cache.SparseTargets.from_batch(batch)  # the logit term from the cache
    run_teacher = S.teacher is not None and (cached is None or S.teacher_capture is not None)
    kernel, s_head, t_head = (None, None, None) if classify else _fused_heads(S, cached, a)
    # the divergence's settings, shared by the dense, fused and cached (sparse) logit terms
    div: dict[str, Any] = {
        "kd_weight": a,
        "temperature": m.temperature,
        "alpha": m.skew_alpha,
        "beta": m.jsd_beta,
        "num_valid": n_tokens,
        "chunk_size": m.logit_chunk,
    }
    with torch.autocast(S.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        t_logits = t_hidden = None
        if cached is not None and S.teacher is not None and S.teacher_capture is not None:
            # attention methods on a cache: the teacher runs for its attention only, no LM head
            with torch.inference_mode(), S.teacher_capture:
                teacher_cache.teacher_backbone(S.teacher)(input_ids=x, **fwd)
        elif run_teacher:
            assert S.teacher is not None
            # inference mode, not just no_grad: no version counters or view tracking on the
            # teacher's activations; its outputs (logits, captured q/k) are only ever read
            with torch.inference_mode(), _maybe(S.teacher_capture), _hidden_of(t_head) as seen:
                t_logits = S.teacher(input_ids=x, **fwd).logits
            if t_head is not None:  # (B, N-1, D_t): the head's input, the logits never built
                t_hidden, t_logits = seen[0][:, :-1], None
            else:  # (B, N-1, V): teacher rows beyond the tokenizer dropped; classes: (B, 1, C)
                t_logits = t_logits[:, None, :] if classify else t_logits[:, :-1, :V]
        with _maybe(S.student_capture), _hidden_of(s_head) as seen:
            s_logits = S.student(input_ids=x, **fwd).logits
        s_hidden = seen[0][:, :-1] if s_head is not None else None  # (B, N-1, D_s)
        if s_hidden is None:
            s_logits = s_logits[:, None, :] if classify else s_logits[:, :-1, :V]  # like t_logits

    if s_hidden is not None and cached is not None:
        assert s_head is not None
        logit_term, terms["ce"], kd = teacher_cache.sparse_linear_objective(
            m.divergence,
            s_hidden,
            s_head.weight,
            cached,
            labels,
            estimator=m.teacher_cache.loss_estimator,
            vocab=V,
            student_bias=s_head.bias,
            student_softcap=s_head.softcap,
            **div,
        )
        if a > 0:
            terms["kd"] = kd
    elif s_hidden is not None:
        assert kernel is not None and s_head is not None
        t_w = t_b = t_cap = None
        if t_head is not None and a > 0:
            t_w, t_b, t_cap = t_head.weight, t_head.bias, t_head.softcap
        else:
            t_hidden = None
        caps = fused.softcap_kwargs(s_head.softcap, t_cap)  # none for plain heads
        # the head's matmuls in the forwards' autocast dtype, as the dense path's F.linear ran
        # them (float32 head GEMMs were half of an H200 KD step); the losses stay float32
        with torch.autocast(S.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if S.logit_path is None:  # the first micro-batch: the kernel against dense
                fused.check_parity(
                    kernel, m.divergence, s_hidden, s_head.weight, t_hidden, t_w, labels,
                    kd_weight=a, temperature=m.temperature, alpha=m.skew_alpha,
                    beta=m.jsd_beta, vocab=V, student_bias=s_head.bias, teacher_bias=t_b, **caps,
                )  # fmt: skip
                S.logit_path = f"fused:{getattr(kernel, '__name__', type(kernel).__name__)}"
            logit_term, terms["ce"], kd = kernel(
                m.divergence, s_hidden, s_head.weight, t_hidden, t_w, labels,
                vocab=V, student_bias=s_head.bias, teacher_bias=t_b, **div, **caps,
            )  # fmt: skip
        if t_hidden is not None:
            terms["kd"] = kd
    elif cached is not None and a > 0:
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


def _cross_step(
    S: Setup,
    batch: dict[str, torch.Tensor],
    *,
    n_tokens: int,
    a: float,
    amp_dtype: torch.dtype | None,
) -> StepLosses:
    """(1 − a)·CE + a·D_cross with teacher and student on different tokenizers
    (`sharp_core.objectives.cross_tokenizer`): the teacher reads the student block's text in
    its own tokens, a document at a time where the block packs several (its own restarting
    positions and block-diagonal mask, as the student's), without the padding. Both terms
    cover the targets only (a chat row's ``loss_mask``): CE over them, D averaged over the
    aligned positions among them and weighted by the micro-batch's share of the step's
    targets (so accumulation weighs micro-batches as CE does). With plain heads (the default)
    neither model builds logits: both run with `fused.capture_hidden` and
    `fused_cross_objective` projects a chunk of target rows at a time (the teacher's only
    for the chunk's aligned rows), its gradients pushed through the student's head at once.
    Otherwise (``S.logit_path == "dense"``, or a head that is not a plain lm_head) both
    models' logits are whole (B×N×V_S', B×T×V_T') and the divergence runs a chunk of aligned
    rows at a time (`chunked_divergence`); same value and gradients (docs/planning.md,
    "Memory at 128k vocabularies")."""
    assert S.cross is not None and S.teacher is not None
    m = S.spec.method
    x = batch["input_ids"]  # (B, N)
    fwd = {"attention_mask": batch.get("attention_mask"), **forward_kwargs(batch)}
    labels = x[:, 1:]  # (B, N-1)
    loss_mask = batch.get("loss_mask")  # (B, N) bool: chat answers, no padding
    if loss_mask is not None:
        labels = labels.masked_fill(~loss_mask[:, 1:], losses.IGNORE_INDEX)
    pad = S.cross.teacher.pad_token_id or 0
    keep = batch.get("attention_mask")
    t_ids, t_mask, t_pos, rows = S.cross.teacher_batch(
        x, pad, position_ids=batch.get("position_ids"), keep=keep
    )
    t_fwd: dict[str, Any] = (
        {"attention_mask": t_mask} if t_pos is None else forward_kwargs({"position_ids": t_pos})
    )
    s_head, t_head = _cross_heads(S)
    with torch.autocast(S.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        with torch.inference_mode(), _hidden_of(t_head) as t_seen:
            t_logits = S.teacher(input_ids=t_ids, **t_fwd).logits  # (B, T, V_T') or (B, T, 0)
        with _hidden_of(s_head) as s_seen:
            out = S.student(input_ids=x, **fwd).logits  # (B, N, V_S') or (B, N, 0)
    if loss_mask is not None:  # only predictions of a target are compared
        target = loss_mask[:, 1:].cpu()
        rows = [r.where(target[b].tolist()) for b, r in enumerate(rows)]
        targets = int(target.sum())
    else:
        targets = labels.numel()
    n_aligned = sum(len(r.student_pos) for r in rows)
    terms: dict[str, torch.Tensor] = {}
    if s_head is not None and t_head is not None:
        # the fused path: neither model's logits, one chunk of target rows at a time
        kernel = S.fused_cross or fused_cross_objective
        s_hidden, t_hidden = s_seen[0][:, :-1], t_seen[0]  # (B, N-1, D_S), (B, T, D_T)
        kw: dict[str, Any] = dict(
            kd_weight=a, temperature=m.temperature, vocab=S.vocab, chunk=m.logit_chunk,
            student_bias=s_head.bias, teacher_bias=t_head.bias,
            student_softcap=s_head.softcap, teacher_softcap=t_head.softcap,
        )  # fmt: skip
        with torch.autocast(S.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if S.logit_path is None:  # the first micro-batch: the kernel against dense
                check_cross_parity(
                    kernel, S.cross, s_hidden, s_head.weight, t_hidden, t_head.weight, labels,
                    rows, **kw,
                )  # fmt: skip
                S.logit_path = "fused:cross"
            logit_term, terms["ce"], kd, n_aligned = kernel(
                S.cross, s_hidden, s_head.weight, t_hidden, t_head.weight, labels, rows,
                targets=targets, n_tokens=n_tokens, **kw,
            )  # fmt: skip
        if a > 0 and n_aligned:
            terms["kd"] = kd
            terms["aligned_fraction"] = torch.tensor(n_aligned / max(1, targets))
        terms["logit"] = logit_term
        terms["loss"] = logit_term
        return StepLosses(terms, {"logit": logit_term})
    ce = losses.cross_entropy(
        out[:, :-1, : S.vocab], labels, num_valid=n_tokens, chunk_size=m.logit_chunk
    )
    terms["ce"] = ce
    logit_term = (1 - a) * ce
    if a > 0 and n_aligned:
        # Σ over the aligned positions, a chunk of rows at a time (no (M, V) float32 copies)
        total, n_aligned = S.cross.total(out, t_logits, rows, S.vocab, m.temperature, m.logit_chunk)
        kd = total / n_aligned * (targets / n_tokens)
        terms["kd"] = kd
        terms["aligned_fraction"] = torch.tensor(n_aligned / max(1, targets))
        logit_term = logit_term + a * kd
    terms["logit"] = logit_term
    terms["loss"] = logit_term
    return StepLosses(terms, {"logit": logit_term})


def _cross_heads(S: Setup) -> tuple[fused.Head | None, fused.Head | None]:
    """(student head, teacher head) of the fused cross-tokenizer term, or Nones for the dense
    one: ``S.logit_path == "dense"`` (forced), or a head that is not a plain lm_head (said
    once in the log, as `_fused_heads` does). ``S.logit_path`` becomes 'fused:cross' in
    `_cross_step`, after the first micro-batch's parity check (`check_cross_parity`)."""
    if S.logit_path == "dense":
        return None, None
    assert S.teacher is not None
    s_head, why = fused.head_of(S.student)
    why = why and f"student: {why}"
    t_head = None
    if s_head is not None:
        t_head, why = fused.head_of(S.teacher)
        why = why and f"teacher: {why}"
    if s_head is None or t_head is None:
        _log.warning("cross-tokenizer term: dense path (B×N×V logits), no fused loss: %s", why)
        S.logit_path = "dense"
        return None, None
    return s_head, t_head


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
