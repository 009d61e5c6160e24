"""Token-level losses on logits: cross-entropy and the distillation divergences.

``p`` is the teacher's distribution and ``q`` the student's, both over the vocabulary, one
per token position. Two levels, both pure functions:

* the divergences themselves, ``DIVERGENCES = {name: fn}``: ``fn(log_p, log_q)`` maps (R, V)
  log-probability rows to (R,) per-token values, each with its paper's equation;
* the reducers that turn logits into a float32 scalar loss: `cross_entropy`,
  `divergence` (any registry entry by name) and `logit_objective` ((1 − a)·CE + a·D in one
  fused pass, what the trainer calls). They own everything below.

Normalisation contract
----------------------
A position counts ("is valid") when its label is not ``-100`` (``IGNORE_INDEX``, the Hugging
Face convention); ``labels[b, i]`` masks the row ``logits[b, i]``, so the caller shifts labels
for next-token prediction before calling. Every loss returns

    sum over valid positions of the per-token loss  /  num_valid

where ``num_valid`` defaults to the number of valid positions in *this call*. With gradient
accumulation the trainer passes the *global* count of valid tokens of the whole optimizer step
(all micro-batches, and all ranks if the count is all-reduced) instead. Summing the returned
values (and gradients) over micro-batches then gives exactly what one call on the whole batch
gives: 8 micro-batches of 1 sequence == 1 batch of 8, whatever the padding of each. Dividing
each micro-batch by its own count (the usual ``mean``) would weight a token of a short sequence
more than one of a long sequence. An all-masked call returns ``0.0`` (never ``0/0 = NaN``) with
a gradient of zeros, so a micro-batch of pure padding is harmless.

Temperature
-----------
The divergences take ``temperature`` τ: both logits are divided by τ before the softmax and
the per-token divergence is multiplied by τ² (Hinton et al. 2015, "Distilling the Knowledge in
a Neural Network", §2). The gradient of the softened divergence w.r.t. the logits scales like
1/τ², so the τ² factor keeps its magnitude comparable across temperatures and the relative
weight of the KD term against cross-entropy does not need retuning when τ changes.

Numerics and memory
-------------------
All math is in float32 whatever the input dtype (bf16 logits are common): ``log_softmax`` for
the distributions and ``logaddexp`` (a two-term logsumexp) for the mixtures of the skew and
JSD divergences, so no ``log`` of a probability that underflowed to 0 is ever taken; terms
``a·log(a/b)`` with ``a == 0`` count as 0. The teacher side is detached.

Logits are ``B×N×V`` with V up to ~256k, so a float32 copy of all of them (and the several
float32 intermediates of a divergence, which autograd would keep for the backward pass) can
exceed the memory of the model itself. The losses therefore work on the flattened ``(B·N, V)``
rows, select the valid ones, and process ``chunk_size`` rows at a time (default: a chunk's
float32 is at most 256 MiB). When the student needs a gradient, a custom autograd Function
computes each chunk's gradient right after its value, writes it into one buffer in the
student's dtype, and frees the chunk's float32 intermediates: the backward pass only scales
that buffer. Peak memory is one gradient buffer (the same size as the student's logits, which
the backward pass needs anyway) plus one chunk's float32 work. The price is that these losses
are differentiable once (no double backward), and with bf16 logits the gradient is rounded to
bf16 before the upstream scale (e.g. a KD weight) is applied instead of after.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "IGNORE_INDEX",
    "DIVERGENCES",
    "Divergence",
    "LogitLoss",
    "count_valid",
    "cross_entropy",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "logit_objective",
    "objective_rows",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
]

IGNORE_INDEX = -100
"""Label value of a position that no loss sees (padding, prompt tokens)."""

_CHUNK_BYTES = 2**28
"""Default budget for one chunk's float32 logits: 256 MiB, i.e. 2**26 floats."""

# A per-row loss: (student rows (R, V) float32, teacher rows (R, V) float32 or None,
# labels (R,) int64) -> per-row loss (R,) float32.
RowLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- helpers


def count_valid(labels: torch.Tensor) -> int:
    """Number of positions whose label is not ``IGNORE_INDEX`` (-100).

    The trainer sums this over the micro-batches of an optimizer step (and all-reduces it
    across ranks) and passes the total as ``num_valid`` to every loss of the step.
    """
    return int((labels != IGNORE_INDEX).sum().item())


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ_v a_v (log a_v − log b_v) per row, from log-probabilities (R, V) → (R,).

    Where ``a_v`` underflowed to 0 (or the logit was -inf) the term is 0 by the convention
    0·log 0 = 0; the difference is zeroed *before* the product so that neither the value nor
    the gradient meets ``0 · (-inf)``.
    """
    a = log_a.exp()
    diff = (log_a - log_b).masked_fill(a == 0, 0.0)
    return (a * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, w_a: float, log_b: torch.Tensor) -> torch.Tensor:
    """log(w_a·a + (1 − w_a)·b) from log-probabilities, by logsumexp, never log(0).

    A weight of exactly 0 or 1 returns the other (or the same) input unchanged, so the skew
    divergences at α = 0 are bitwise the plain KL they reduce to.
    """
    if w_a == 0.0:
        return log_b
    if w_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w_a), log_b + math.log1p(-w_a))


def _soften(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = rows.float()
    return rows if temperature == 1.0 else rows / temperature


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _default_chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * vocab))


# ------------------------------------------------------------------- chunked reduction


def _run_chunks(
    row_loss: RowLoss,
    s2: torch.Tensor,  # (T, V) student logits, any float dtype
    t2: torch.Tensor | None,  # (T, V) teacher logits, detached, or None
    y: torch.Tensor,  # (T,) labels
    rows: torch.Tensor,  # (R,) indices of the valid rows
    chunk: int,
    denom: float | torch.Tensor,
    grad_buf: torch.Tensor | None,  # (T, V) in s2's dtype, zeros; filled when given
) -> torch.Tensor:
    """Σ over chunks of (Σ per-row loss) / denom, float32 scalar; fills grad_buf if given."""
    total = torch.zeros((), dtype=torch.float32, device=s2.device)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        t_rows = None if t2 is None else t2.index_select(0, r)
        y_rows = y.index_select(0, r)
        if grad_buf is None:
            part = row_loss(s2.index_select(0, r).float(), t_rows, y_rows).sum() / denom
        else:
            with torch.enable_grad():
                # The leaf is in the student's dtype so that autograd casts the float32
                # gradient back exactly as it would through `.float()` in a plain graph.
                x = s2.index_select(0, r).detach().requires_grad_(True)
                part = row_loss(x.float(), t_rows, y_rows).sum() / denom
            if part.requires_grad:  # not when the loss ignores the student (α = 1)
                (g,) = torch.autograd.grad(part, x)
                grad_buf.index_copy_(0, r, g)
            part = part.detach()
        total = total + part
    return total


class _ChunkedLoss(torch.autograd.Function):
    """Value and student gradient computed together, chunk by chunk, in the forward pass."""

    @staticmethod
    def forward(ctx, s2, t2, y, rows, row_loss, chunk, denom):  # type: ignore[override]
        grad_buf = torch.zeros_like(s2, memory_format=torch.contiguous_format)
        total = _run_chunks(row_loss, s2, t2, y, rows, chunk, denom, grad_buf)
        ctx.save_for_backward(grad_buf)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad_buf,) = ctx.saved_tensors
        grad = grad_buf * grad_output.to(grad_buf.dtype)
        return grad, None, None, None, None, None, None


def _prepare(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    num_valid: int | torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float | torch.Tensor | None, int]:
    """Checked, flattened (s2, t2, y), the denominator (None: this call's count) and chunk."""
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be floating point, got {student_logits.dtype}")
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be (..., V), got shape {tuple(student_logits.shape)}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in shape; slice a padded teacher vocabulary "
            "to the shared tokenizer first"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' leading dims "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, vocab)  # (B·N, V), a view when contiguous
    t2 = None if teacher_logits is None else teacher_logits.detach().reshape(-1, vocab)
    y = labels.reshape(-1)  # (B·N,)
    denom: float | torch.Tensor | None = None
    if isinstance(num_valid, torch.Tensor):
        denom = num_valid.detach().to(device=s2.device, dtype=torch.float32).clamp_min(1.0)
    elif num_valid is not None:
        if num_valid < 0:
            raise ValueError(f"num_valid must be >= 0, got {num_valid}")
        denom = float(max(num_valid, 1))
    chunk = chunk_size if chunk_size is not None else _default_chunk_rows(vocab)
    return s2, t2, y, denom, chunk


def _reduce(
    row_loss: RowLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    num_valid: int | torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    """Apply `row_loss` to the valid rows, chunked, and normalise by `num_valid`."""
    s2, t2, y, denom, chunk = _prepare(
        student_logits, teacher_logits, labels, num_valid, chunk_size
    )
    rows = (y != IGNORE_INDEX).nonzero().squeeze(1)  # (R,)
    if denom is None:
        denom = float(max(rows.numel(), 1))
    elif isinstance(num_valid, int) and num_valid < rows.numel():
        raise ValueError(
            f"num_valid={num_valid} is smaller than this call's {rows.numel()} valid "
            "tokens; it must be the global count over all micro-batches"
        )
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _ChunkedLoss.apply(s2, t2, y, rows, row_loss, chunk, denom)
    with torch.no_grad():
        return _run_chunks(row_loss, s2, t2, y, rows, chunk, denom, None)


# ------------------------------------------------------ per-token divergences (registry)


class Divergence(Protocol):
    """A per-token divergence D(p ‖ q) on log-probabilities, one registry entry.

    ``log_p`` is the teacher's and ``log_q`` the student's log-softmax, both (R, V) float32
    (already softened by the temperature); returns (R,) float32, the divergence of each row.
    Every entry takes both mixing weights so every entry is called the same way: ``alpha``
    is DistiLLM's skew (read by the two skew divergences only), ``beta`` GKD's β (read by
    ``jsd`` only). Masking, the τ² factor, chunking and normalisation are the reducer's
    (`divergence`, `logit_objective`), not the entry's.
    """

    def __call__(
        self, log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float, beta: float
    ) -> torch.Tensor: ...


def forward_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5
) -> torch.Tensor:
    """Forward KL, KL(p_T ‖ q_S) = Σ_v p_v (log p_v − log q_v), per row: (R, V), (R, V) → (R,).

    Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (the ``kd``
    baseline). Forward KL is mode-covering: the student is pushed to put mass wherever the
    teacher does, which is the classic choice and the default divergence of the objective.
    """
    return _kl_rows(log_p, log_q)


def reverse_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5
) -> torch.Tensor:
    """Reverse KL, KL(q_S ‖ p_T) = Σ_v q_v (log q_v − log p_v), per row: (R, V), (R, V) → (R,).

    Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR): the
    ``rkl`` baseline is the single-step (per-token, teacher-forced) term of MiniLLM's
    sequence-level reverse KL, without its policy-gradient part. Reverse KL is mode-seeking:
    a small student concentrates on the teacher's main modes instead of spreading mass over
    tokens the teacher gives low probability, which matters for generation.
    """
    return _kl_rows(log_q, log_p)


def skew_forward_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5
) -> torch.Tensor:
    """Skew KL (SKL), KL(p ‖ α·p + (1 − α)·q), per row: (R, V), (R, V) → (R,).

    Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models"
    (ICML), α = 0.1 there. ``alpha`` in [0, 1]; α = 0 is exactly `forward_kl`, α = 1 is 0.
    Mixing a little of p into the student's side bounds the divergence (by log 1/α) where
    q ≪ p, so early, badly calibrated students get stable gradients instead of the huge ones
    plain forward KL gives. The mixture is formed in log space with logsumexp, never as
    log(α·p + (1 − α)·q).
    """
    return _kl_rows(log_p, _log_mix(log_p, alpha, log_q))


def skew_reverse_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5
) -> torch.Tensor:
    """Skew reverse KL (SRKL), KL(q ‖ (1 − α)·p + α·q), per row: (R, V), (R, V) → (R,).

    Ko et al. 2024, "DistiLLM" (ICML), α = 0.1 there. ``alpha`` in [0, 1]; α = 0 is exactly
    `reverse_kl`, α = 1 is 0. The mode-seeking reverse KL with the same bounding trick as
    SKL (mixing α of q into the target keeps log-ratios finite where p ≪ q), which DistiLLM
    found the better of the two on generation tasks.
    """
    return _kl_rows(log_q, _log_mix(log_q, alpha, log_p))


def generalized_jsd(
    log_p: torch.Tensor, log_q: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per row, (R, V), (R, V) → (R,):

        M = β·p + (1 − β)·q,   JSD_β = β·KL(p ‖ M) + (1 − β)·KL(q ‖ M)

    Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD, ICLR), in the convention of TRL's ``generalized_jsd_loss``
    (β weights the teacher). ``beta`` in [0, 1]. β interpolates between the mode-covering
    and the mode-seeking behaviour while staying bounded (by log 2 at β = 0.5).

    Endpoints: the formula above tends to 0 as β → 0 or β → 1 (M collapses onto q or p, and
    the surviving term is KL(q‖q) or KL(p‖p)), which would make the endpoints useless. Like
    TRL, β = 0 is special-cased to return exactly `forward_kl` (KL(p‖q)) and β = 1 exactly
    `reverse_kl` (KL(q‖p)), the limits the GKD paper means by its endpoints. The function is
    therefore discontinuous at 0 and 1 by design.
    """
    if beta == 0.0:
        return _kl_rows(log_p, log_q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)
    log_m = _log_mix(log_p, beta, log_q)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "jsd": generalized_jsd,
}
"""The spec's logit divergence D, by name (`sharp_core.methods.DIVERGENCES` lists the names)."""


def _lookup(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; expected one of {', '.join(DIVERGENCES)}"
        ) from None


def _cross_entropy_rows(s: torch.Tensor, _t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s, y, reduction="none")


def _divergence_rows(fn: Divergence, temperature: float, alpha: float, beta: float) -> RowLoss:
    """`fn` as a `RowLoss` on raw logit rows: softened by τ, log-softmax in float32, × τ²."""
    tau = _check_temperature(temperature)
    alpha = _check_unit("alpha", alpha)
    beta = _check_unit("beta", beta)

    def row_loss(s: torch.Tensor, t: torch.Tensor | None, _y: torch.Tensor) -> torch.Tensor:
        assert t is not None
        log_q = F.log_softmax(_soften(s, tau), dim=-1)
        log_p = F.log_softmax(_soften(t, tau), dim=-1)
        return fn(log_p, log_q, alpha=alpha, beta=beta) * (tau * tau)

    return row_loss


# ------------------------------------------------------------------------- public API


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_valid: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy −log q_S(y) of the labels, summed over valid tokens / ``num_valid``.

    Shapes: ``student_logits`` (B, N, V), ``labels`` (B, N) int64, already aligned with the
    logits (shifted by the caller), -100 = ignored. Returns a float32 scalar.

    The supervised term of every baseline (``sft`` alone, ``(1 − a)·CE`` beside KD). It shares
    the divergences' normalisation so that CE and KD terms of one step are averaged over the
    same tokens and accumulate the same way; it is chunked for the same memory reason (no
    float32 copy of the whole (B, N, V) logits).
    """

    return _reduce(_cross_entropy_rows, student_logits, None, labels, num_valid, chunk_size)


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """τ² · D(p_T ‖ q_S) with D = ``DIVERGENCES[name]``, summed over valid tokens / ``num_valid``.

    Shapes: logits (B, N, V), any float dtype; ``labels`` (B, N), -100 = ignored (the caller
    shifts them for next-token prediction). Returns a float32 scalar (see the module
    docstring for the normalisation, the temperature and the chunking). ``alpha`` is read by
    the two skew divergences only, ``beta`` by ``"jsd"`` only; both must be in [0, 1].
    Unknown name: ValueError.
    """
    rows = _divergence_rows(_lookup(name), temperature, alpha, beta)
    return _reduce(rows, student_logits, teacher_logits, labels, num_valid, chunk_size)


# ----------------------------------------------------------- CE and D in one fused pass


def objective_rows(
    s: torch.Tensor,
    t: torch.Tensor | None,
    y: torch.Tensor,
    *,
    divergence_rows: RowLoss | None,
    closed_form: bool,
    kd_weight: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row CE and D of one chunk and the gradient of Σ_rows (1 − a)·CE + a·D.

    Shapes: ``s`` (R, V) student logits, ``t`` (R, V) teacher logits or None (CE only, a = 0),
    ``y`` (R,) labels, -100 = masked. Returns ce (R,), d (R,) float32 values (masked rows
    included: the caller zeroes them) and g (R, V) float32, zero on masked rows, *not*
    divided by any count. Forward KL (``closed_form``) uses its closed-form row gradient
    (1 − a)·(softmax(s) − e_y) + a·τ·(softmax(s/τ) − softmax(t/τ)) and holds no autograd
    graph; any other divergence differentiates the combined row loss once. Shared by the
    logit-level `logit_objective` and the fused linear losses (`sharp_core.objectives.fused`).
    """
    a, tau = kd_weight, temperature
    valid = y != IGNORE_INDEX  # (R,)
    y0 = y.clamp_min(0)[:, None]  # (R, 1), any class for masked rows
    if t is None or closed_form:
        with torch.no_grad():
            sf = s.float()
            log_q1 = F.log_softmax(sf, dim=-1)
            ce = -log_q1.gather(1, y0).squeeze(1)
            if t is None:  # CE alone: softmax(s) − e_y
                d = torch.zeros_like(ce)
                g = log_q1.exp_().mul_(1 - a)
            else:
                log_q = log_q1 if tau == 1.0 else F.log_softmax(sf / tau, dim=-1)
                log_p = F.log_softmax(_soften(t, tau), dim=-1)
                d = _kl_rows(log_p, log_q) * (tau * tau)
                p = log_p.exp_()
                del log_p
                if tau == 1.0:  # (1−a)(q − e_y) + a(q − p) = q − a·p − (1−a)·e_y
                    g = log_q1.exp_().sub_(p, alpha=a)
                else:
                    g = log_q.exp_().sub_(p).mul_(a * tau)
                    g.add_(log_q1.exp_(), alpha=1 - a)
            g.scatter_add_(1, y0, torch.full_like(y0, -(1 - a), dtype=g.dtype))
    else:
        assert divergence_rows is not None
        with torch.enable_grad():
            x = s.detach().float().requires_grad_(True)
            ce = F.cross_entropy(x, y0.squeeze(1), reduction="none")
            d = divergence_rows(x, t, y)
            combined = ((1 - a) * ce + a * d).masked_fill(~valid, 0.0).sum()
            (g,) = torch.autograd.grad(combined, x)
        ce, d = ce.detach(), d.detach()
    return ce, d, g.masked_fill_(~valid[:, None], 0.0)


class _FusedLogitLoss(torch.autograd.Function):
    """(1 − a)·CE + a·D, its student gradient and the two parts' values, one pass per chunk.

    Rows are taken as they come, invalid ones masked to zero, so no ``nonzero`` (a host
    synchronisation on CUDA) is needed. The per-chunk work is `objective_rows`.
    """

    @staticmethod
    def forward(ctx, s2, t2, y, divergence_rows, closed_form, a, tau, denom, chunk):  # type: ignore[override]
        grad = torch.empty_like(s2, memory_format=torch.contiguous_format)
        ce_sum = torch.zeros((), dtype=torch.float32, device=s2.device)
        d_sum = torch.zeros((), dtype=torch.float32, device=s2.device)
        for i in range(0, s2.shape[0], chunk):
            yc = y[i : i + chunk]
            ce, d, g = objective_rows(
                s2[i : i + chunk],
                t2[i : i + chunk],
                yc,
                divergence_rows=divergence_rows,
                closed_form=closed_form,
                kd_weight=a,
                temperature=tau,
            )
            zero = yc == IGNORE_INDEX
            ce_sum += ce.masked_fill(zero, 0.0).sum()
            d_sum += d.masked_fill(zero, 0.0).sum()
            grad[i : i + chunk] = g.div_(denom).to(grad.dtype)
        ctx.save_for_backward(grad)
        ce_v, d_v = ce_sum / denom, d_sum / denom
        ctx.mark_non_differentiable(ce_v, d_v)
        return (1 - a) * ce_v + a * d_v, ce_v, d_v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _g_ce, _g_d):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None, None, None, None


def logit_objective(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kd_weight: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int | torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, d): loss = (1 − a)·CE + a·D(p_T‖q_S; τ), with CE and D as detached values.

    The same value and gradient as ``(1 − a)·cross_entropy(...) + a·divergence(name, ...)``
    (tests/test_losses.py checks it for every divergence), at the cost of one pass over the
    logits instead of two: each chunk is upcast to float32 once, its log-softmax computed
    once, and there is no ``nonzero`` row selection. Why it matters: the logit term is most of
    a KD step's loss cost at large vocabularies (bench/step.py measured KD at 0.73× the time
    on CPU). ``num_valid`` is required: it is the global token count of the optimizer step.
    """
    a = _check_unit("kd_weight", kd_weight)
    tau = _check_temperature(temperature)
    fn = _lookup(name)
    rows = _divergence_rows(fn, tau, alpha, beta)
    s2, t2, y, denom, chunk = _prepare(
        student_logits, teacher_logits, labels, num_valid, chunk_size
    )
    assert t2 is not None and denom is not None
    # forward KL, also as the β = 0 endpoint of the JSD: its row gradient is closed-form
    closed_form = fn is forward_kl or (fn is generalized_jsd and beta == 0.0)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss, ce, d = _FusedLogitLoss.apply(s2, t2, y, rows, closed_form, a, tau, denom, chunk)
        return loss, ce, d
    with torch.no_grad():
        ce = _reduce(_cross_entropy_rows, student_logits, None, labels, num_valid, chunk_size)
        d = _reduce(rows, student_logits, teacher_logits, labels, num_valid, chunk_size)
    return (1 - a) * ce + a * d, ce, d


class LogitLoss(Protocol):
    """The logit part of the objective as the trainer calls it: `logit_objective`'s signature.

    ``(loss, ce, d)`` with loss = (1 − a)·CE + a·D differentiable and ce, d detached values.
    `sharp_core.train.loop.Setup.logit_loss` holds one (default: `logit_objective`), so a
    benchmark or a test can hand the training step another implementation (e.g. CE and
    `divergence` as two separate calls) instead of patching this module.
    """

    def __call__(
        self,
        name: str,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        kd_weight: float,
        temperature: float = ...,
        alpha: float = ...,
        beta: float = ...,
        num_valid: int | torch.Tensor,
        chunk_size: int | None = ...,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
