"""Fused linear losses: the logit term from final hidden states and LM-head weights, chunk by
chunk of tokens, so no (B, N, V) logits of either model ever exist.

At a 128k vocabulary and 4k context one sequence's float32 logits are 2 GiB per model, and a
dense logit loss holds several such tensors (both models' logits, the student's gradient).
Here each chunk of valid tokens is projected to (R, V) float32 logits, its per-row CE and
divergence and their gradient w.r.t. those logits are computed by
`sharp_core.objectives.losses.objective_rows` (the very code of the dense `logit_objective`),
and that gradient is pushed through the head at once: into the chunk's rows of grad_hidden
(T, D) and accumulated into grad_weight (V, D). The chunk is then freed. Peak memory is one
chunk's float32 work plus the two gradients, which backward only scales (the Liger-Kernel
approach: gradients in the forward pass, differentiable once).

Numerics: the student's logits are computed in float32 (promoted from the hidden states'
and weight's dtypes), the teacher's in the teacher weight's dtype and then upcast, as the
dense path does. In float32 the value and gradients equal the dense path's to rounding
(tests/test_fused_loss.py: ≤ 1e-5 relative).

Logit soft-capping (Gemma 2 / 3's ``final_logit_softcapping``: logits = c·tanh(lm_head(h)/c),
as transformers applies it) is fused too: `Head.softcap` carries c, the teacher's chunk
logits are capped in its own dtype as its forward caps them, and the student's chunk function
sees the capped logits and returns its gradient times 1 − tanh²(s/c) (`softcapped`). Where
the head is otherwise not a plain linear map of the last hidden state (logit scaling, ...),
`head_of` refuses the model and the trainer keeps the dense path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sharp_core.objectives import losses

__all__ = [
    "FUSED_CHUNK_BYTES",
    "FusedLinearLoss",
    "Head",
    "LIGER_DIVERGENCES",
    "PARITY_RTOL",
    "PARITY_TOKENS",
    "capture_hidden",
    "check_parity",
    "parity_rtol",
    "parity_verdict",
    "default_chunk_tokens",
    "fused_linear_objective",
    "head_of",
    "liger_available",
    "liger_linear_objective",
    "linear_chunked",
    "select_kernel",
    "softcap_kwargs",
    "softcap_logits",
    "softcapped",
]

FUSED_CHUNK_BYTES = 2**26
"""Default budget for one chunk's float32 logits (64 MiB). A chunk's work holds about six
such (R, V) float32 tensors (both models' logits, log-probabilities, the gradient), so 64 MiB
of logits keeps the loss's transient memory under ~0.5 GiB at any vocabulary."""

# (student logits (R, V) float32, rows slice into the valid rows) -> ce (R,), d (R,),
# g (R, V) float32: d Σ[(1 − a)·CE + a·D] / d logits, zero on masked rows, undivided.
ChunkFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _autocast_dtype(h: torch.Tensor) -> torch.dtype | None:
    """Autocast's low-precision dtype on ``h``'s device when it is on and ``h`` is wider:
    the fused kernels run their matmuls with autocast off, so they cast their inputs
    themselves, as autocast would cast them for F.linear (measured on an H200: float32 head
    GEMMs were half of a KD step)."""
    dev = h.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    lp = torch.get_autocast_dtype(dev)
    return lp if h.dtype.itemsize > lp.itemsize else None


def default_chunk_tokens(vocab: int, budget_bytes: int = FUSED_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's float32 logits (R, V) fit in ``budget_bytes``."""
    return max(1, budget_bytes // (4 * vocab))


class _LinearChunked(torch.autograd.Function):
    """(1 − a)·ce + a·d of F.linear(h, w, b), value and gradients in the forward pass."""

    @staticmethod
    def forward(ctx, h2, w, b, chunk_fn, a, denom, chunk):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # matmuls in the inputs' dtype (bf16 where the caller cast them for autocast: the
        # tensor cores), logits, row gradients and the weight's accumulator in float32
        cd = torch.promote_types(h2.dtype, w.dtype)
        acc = torch.promote_types(cd, torch.float32)
        wc = w.to(cd)  # (V, D), no copy when the dtypes agree
        bc = None if b is None else b.to(cd)
        gh = torch.empty_like(h2) if need_h else None  # (R, D)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None  # (V, D)
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None  # (V,)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h2.device)
        d_sum = torch.zeros((), dtype=torch.float32, device=h2.device)
        with torch.autocast(h2.device.type, enabled=False):
            for i in range(0, h2.shape[0], chunk):
                sl = slice(i, i + chunk)
                hc = h2[sl].to(cd)  # (r, D)
                s = F.linear(hc, wc, bc).float()  # (r, V)
                ce, d, g = chunk_fn(s, sl)
                del s
                ce_sum += ce.sum()
                d_sum += d.sum()
                g = g.div_(denom).to(acc)  # (r, V)
                gl = g.to(cd)  # no copy in float32
                if gh is not None:
                    gh[sl] = (gl @ wc).to(gh.dtype)
                if gw is not None:
                    if cd == acc:
                        gw.addmm_(g.T, hc)
                    else:  # a (V, D) product in cd, summed over chunks in float32
                        gw += gl.T @ hc
                if gb is not None:
                    gb += g.sum(0)
                del gl
                del g
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        ce_v, d_v = ce_sum / denom, d_sum / denom
        ctx.mark_non_differentiable(ce_v, d_v)
        return (1 - a) * ce_v + a * d_v, ce_v, d_v

    @staticmethod
    @once_differentiable
    def backward(ctx, go, _g_ce, _g_d):  # type: ignore[override]
        gh, gw, gb = ctx.saved_tensors
        wd, bd = ctx.dtypes
        out_h = None if gh is None else gh * go.to(gh.dtype)
        out_w = None if gw is None else (gw * go.to(gw.dtype)).to(wd)
        out_b = None if gb is None else (gb * go.to(gb.dtype)).to(bd)
        return out_h, out_w, out_b, None, None, None, None


def linear_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_fn: ChunkFn,
    *,
    kd_weight: float,
    denom: float | torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, d) of the logits F.linear(hidden, weight, bias), chunk by chunk.

    Shapes: ``hidden`` (R, D) rows already restricted to the valid tokens, ``weight`` (V, D),
    ``bias`` (V,) or None. ``chunk_fn(logits (r, V) float32, rows slice)`` gives the chunk's
    per-row ce, d and the gradient of Σ (1 − a)·ce + a·d w.r.t. the logits; ``denom``: the
    global valid-token count. loss = (1 − a)·ce + a·d is differentiable, ce and d are values.
    Gradients reach ``hidden``, ``weight`` and ``bias`` (tied embeddings: ``weight`` is the
    embedding's Parameter and accumulates there). Also the building block of the
    teacher-cache's chunked loss (`sharp_core.cache.teacher_cache`).
    """
    if hidden.shape[0] == 0:  # all masked: 0, with zero gradients (never 0/0)
        zero = hidden.sum() * 0.0 + weight[:0].sum()
        z = torch.zeros((), dtype=torch.float32, device=hidden.device)
        return zero.float(), z, z.clone()
    return _LinearChunked.apply(hidden, weight, bias, chunk_fn, kd_weight, denom, chunk)


def _denominator(num_valid: int | torch.Tensor, rows: int, device: torch.device) -> Any:
    if isinstance(num_valid, torch.Tensor):
        return num_valid.detach().to(device=device, dtype=torch.float32).clamp_min(1.0)
    if num_valid < rows:
        raise ValueError(
            f"num_valid={num_valid} is smaller than this call's {rows} valid tokens; it must "
            "be the global count over all micro-batches"
        )
    return float(max(num_valid, 1))


def fused_linear_objective(
    name: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kd_weight: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int | torch.Tensor,
    chunk_size: int | None = None,
    vocab: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, d): `losses.logit_objective` on the logits hidden·Wᵀ (+ b), never built whole.

    Shapes: ``student_hidden`` (B, N, D_s) and ``teacher_hidden`` (B, N, D_t), already aligned
    with ``labels`` (B, N) (the caller drops the last position for next-token prediction);
    ``student_weight`` (V_s, D_s), ``teacher_weight`` (V_t, D_t), biases (V_·,) or None.
    ``vocab``: the logit columns the loss sees (the tokenizer's size; default V_s): both
    weights are sliced to it, so a teacher padded beyond the tokenizer is handled. The teacher
    side may be None when ``kd_weight`` is 0 (CE alone, ``sft``). ``chunk_size``: tokens per
    chunk (default `default_chunk_tokens`). ``student_softcap`` / ``teacher_softcap``: each
    head's logit soft-cap c (logits = c·tanh(h·Wᵀ/c), `Head.softcap`) or None. Same value and
    gradients as the dense ``logit_objective(name, h_s·W_sᵀ, h_t·W_tᵀ, labels, ...)`` (capped
    where a cap is given); d is 0 without a teacher.
    """
    a = losses._check_unit("kd_weight", kd_weight)
    tau = losses._check_temperature(temperature)
    fn = losses._lookup(name)
    V = vocab if vocab is not None else student_weight.shape[0]
    if student_hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the hidden states' leading dims "
            f"{tuple(student_hidden.shape[:-1])}"
        )
    if teacher_hidden is None and a > 0:
        raise ValueError("kd_weight > 0 needs the teacher's hidden states and head")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ws = student_weight[:V]
    bs = None if student_bias is None else student_bias[:V]
    y = labels.reshape(-1)
    rows = (y != losses.IGNORE_INDEX).nonzero().squeeze(1)  # (R,), one host sync per call
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)  # (R, D_s)
    yv = y.index_select(0, rows)  # (R,)
    denom = _denominator(num_valid, rows.numel(), hs.device)
    use_teacher = a > 0 and teacher_hidden is not None
    closed_form = True  # CE alone and forward KL: a closed-form row gradient, no graph
    if use_teacher:
        assert teacher_hidden is not None and teacher_weight is not None
        wt = teacher_weight.detach()[:V]
        bt = None if teacher_bias is None else teacher_bias.detach()[:V]
        ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
        closed_form = fn is losses.forward_kl or (fn is losses.generalized_jsd and beta == 0.0)
        d_rows = losses._divergence_rows(fn, tau, alpha, beta)
    # the other divergences differentiate the chunk through autograd, which keeps several more
    # float32 (chunk, V) intermediates alive: half the tokens keep their peak near forward KL's
    chunk = chunk_size or default_chunk_tokens(
        V, FUSED_CHUNK_BYTES if closed_form else FUSED_CHUNK_BYTES // 2
    )

    def chunk_fn(s: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = None
        if use_teacher:  # the teacher's logits in its own dtype, as its lm_head computes them
            t = softcap_logits(F.linear(ht[sl].to(wt.dtype), wt, bt), teacher_softcap)  # (r, V)
        return losses.objective_rows(
            s,
            t,
            yv[sl],
            divergence_rows=d_rows if use_teacher else None,
            closed_form=closed_form,
            kd_weight=a if use_teacher else 0.0,
            temperature=tau,
        )

    if not use_teacher and a > 0:  # unreachable (checked above); keeps the weights honest
        raise AssertionError
    if not torch.is_grad_enabled():
        hs, ws = hs.detach(), ws.detach()
        bs = None if bs is None else bs.detach()
    lp = _autocast_dtype(hs)
    if lp is not None:  # the head's matmuls as autocast runs F.linear (gradients flow back)
        hs, ws = hs.to(lp), ws.to(lp)
        bs = None if bs is None else bs.to(lp)
    capped = softcapped(chunk_fn, student_softcap)
    loss, ce, d = linear_chunked(hs, ws, bs, capped, kd_weight=a, denom=denom, chunk=chunk)
    return loss, ce, d


class FusedLinearLoss(Protocol):
    """The fused logit term as the trainer calls it: `fused_linear_objective`'s signature.

    `sharp_core.train.setup.Setup.fused_loss` holds one (None: chosen from the spec's
    ``method.logit_kernel``), so a test can hand the step another kernel (e.g. a wrong one,
    to see the parity check fail) instead of patching this module.
    """

    def __call__(
        self,
        name: str,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        labels: torch.Tensor,
        *,
        kd_weight: float,
        temperature: float = ...,
        alpha: float = ...,
        beta: float = ...,
        num_valid: int | torch.Tensor,
        chunk_size: int | None = ...,
        vocab: int | None = ...,
        student_bias: torch.Tensor | None = ...,
        teacher_bias: torch.Tensor | None = ...,
        student_softcap: float | None = ...,
        teacher_softcap: float | None = ...,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


# ------------------------------------------------------------------ models' heads


# config attributes of heads that are not a plain linear map (Cohere's logit_scale, Granite's
# logits_scaling, ...): the fused path would be wrong. Gemma 2 / 3's final_logit_softcapping
# is applied by the fused paths (`SOFTCAP_ATTR`); attn_logit_softcapping is the attention's,
# not the head's, and is left to the model's own forward.
SOFTCAP_ATTR = "final_logit_softcapping"
_HEAD_TRANSFORMS = (
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_logits_scale",
    "mup_width_multiplier",
)
# model classes whose forward is checked (transformers' modeling code) to be exactly
# logits = c·tanh(lm_head(h)/c) with c = config.final_logit_softcapping, in the logits' dtype
_SOFTCAP_MODELS = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})


@dataclass
class Head:
    """A causal LM's output head: the module its forward calls on the last hidden state, and
    the soft-cap c its forward applies after it (logits = c·tanh(lm_head(h)/c); None: none)."""

    module: torch.nn.Linear
    softcap: float | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", None)  # DDP
    return inner if isinstance(inner, torch.nn.Module) else model


def head_of(model: torch.nn.Module) -> tuple[Head | None, str]:
    """(head, "") when the model's logits are exactly ``lm_head(last hidden state)``, else
    (None, why): the trainer then keeps the dense logit path and says why once."""
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    if cfg is None or not hasattr(m, "get_output_embeddings"):
        return None, f"{type(m).__name__} is not a transformers model with an output head"
    for attr in _HEAD_TRANSFORMS:
        v = getattr(cfg, attr, None)
        if v is not None and v is not False and v != 1.0 and v != 1:
            return None, f"its config sets {attr}={v!r} (logits are not a plain lm_head)"
    cap = getattr(cfg, SOFTCAP_ATTR, None)
    if cap is not None and not isinstance(cap, (int, float)):
        return None, f"its config sets {SOFTCAP_ATTR}={cap!r} (not a number)"
    if cap is not None and type(m).__name__ not in _SOFTCAP_MODELS:
        # a model class not checked against transformers' code: its cap may sit elsewhere
        return None, f"its config sets {SOFTCAP_ATTR}={cap!r} on an unchecked {type(m).__name__}"
    head = m.get_output_embeddings()  # type: ignore[operator]  # a transformers model
    if type(head) is not torch.nn.Linear:
        return None, f"its output head is a {type(head).__name__}, not a plain nn.Linear"
    # transformers tests `is not None` (a cap of 0 would divide by zero there as well)
    return Head(head, None if cap is None else float(cap)), ""


def softcap_kwargs(student: float | None, teacher: float | None) -> dict[str, Any]:
    """The kernels' soft-cap keywords, only those set: a kernel handed in through
    ``Setup.fused_loss`` that predates soft-capping still serves uncapped heads."""
    out = {"student_softcap": student, "teacher_softcap": teacher}
    return {k: v for k, v in out.items() if v is not None}


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c·tanh(logits/c) in the logits' dtype, the very ops of transformers'
    Gemma2ForCausalLM.forward (divide, tanh, multiply); ``logits`` unchanged for None."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def softcapped(chunk_fn: ChunkFn, cap: float | None) -> ChunkFn:
    """``chunk_fn`` on soft-capped logits: it sees c·tanh(s/c) of the raw chunk logits s and
    its gradient g w.r.t. the capped logits is returned w.r.t. s: g·(1 − tanh²(s/c)) (the
    formula of autograd's tanh backward, so the dense path's gradient to rounding). Done in
    place of s, so a capped chunk holds no more (r, V) tensors than a plain one (the memory
    plan's count): the raw logits are overwritten (the fused kernels drop them after the
    call) and ``chunk_fn`` must only read its logits (every chunk function here does)."""
    if cap is None:
        return chunk_fn

    def fn(s: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        capped = s.div_(cap).tanh_().mul_(cap)  # (r, V), in place of s
        ce, d, g = chunk_fn(capped, sl)
        # 1 − tanh² from the capped logits, in their place (the chunk function is done)
        return ce, d, g.mul_(capped.div_(cap).square_().neg_().add_(1.0))

    return fn


@contextlib.contextmanager
def capture_hidden(head: Head) -> Iterator[list[torch.Tensor]]:
    """While active, the head records its input (the last hidden state, (B, N, D)) and
    returns empty (B, N, 0) logits instead of projecting to the vocabulary.

    The model is still called through its own forward (and any DDP wrapper's), so every
    hook (attention capture, gradient synchronisation) sees the usual call. The override is
    an attribute of this one module instance, removed on exit.
    """
    seen: list[torch.Tensor] = []
    mod = head.module

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    mod.forward = forward  # type: ignore[method-assign,assignment]
    try:
        yield seen
    finally:
        del mod.forward


# ------------------------------------------------------------------ kernels and parity

LIGER_DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")
"""Divergences Liger's fused linear JSD implements (β = 0 and 1 are forward and reverse KL)."""


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # not installed, or no triton / CUDA
        return False
    return True


def liger_linear_objective(
    name: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kd_weight: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int | torch.Tensor,
    chunk_size: int | None = None,
    vocab: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_linear_objective` through Liger-Kernel (CUDA only): fused linear CE (summed)
    and fused linear JSD (β; 0 and 1 are forward and reverse KL), rescaled to the global
    ``num_valid`` and τ². Biases and logit soft-caps are not supported by Liger's fused JSD:
    refused (ValueError; `select_kernel` never picks Liger for a capped head).
    Liger's conventions have changed between releases; the trainer's first-micro-batch parity
    check (`check_parity`) is what vouches for this adapter."""
    if student_bias is not None or teacher_bias is not None:
        raise ValueError("the liger kernel does not take lm_head biases")
    if student_softcap is not None or teacher_softcap is not None:
        raise ValueError("the liger kernel does not soft-cap logits")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    b = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(name, beta)
    V = vocab if vocab is not None else student_weight.shape[0]
    a = float(kd_weight)
    y = labels.reshape(-1)
    n_here = (y != losses.IGNORE_INDEX).sum()
    denom = torch.as_tensor(num_valid, dtype=torch.float32, device=y.device).clamp_min(1.0)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ws = student_weight[:V]
    lp = _autocast_dtype(hs)
    if lp is not None:  # Liger computes in its inputs' dtype: float32 inputs miss the tensor cores
        hs, ws = hs.to(lp), ws.to(lp)
    ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")(ws, hs, y) / denom
    if a == 0 or teacher_hidden is None or teacher_weight is None:
        return (1 - a) * ce, ce.detach(), torch.zeros_like(ce).detach()
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(hs.dtype)
    wt = teacher_weight.detach()[:V].to(ws.dtype)
    jsd = LigerFusedLinearJSD(jsd_beta=b, temperature=temperature)
    # Liger averages over this call's valid tokens: back to a sum, then the global count
    d = jsd(hs, ws, ht, wt, y) * n_here.clamp_min(1) / denom * temperature**2
    return (1 - a) * ce + a * d, ce.detach(), d.detach()


def select_kernel(
    logit_kernel: str, divergence: str, device: torch.device, softcap: bool = False
) -> tuple[FusedLinearLoss, str]:
    """(kernel, its name) for the spec's ``method.logit_kernel``; 'liger' without Liger or off
    CUDA is a SpecError naming the field. ``softcap``: a head soft-caps its logits, which
    Liger's kernels cannot apply: our kernel then, even for 'liger' (the caller says so)."""
    from sharp_core.errors import SpecError

    if softcap and logit_kernel in ("liger", "auto"):
        return fused_linear_objective, "torch"
    liger_ok = device.type == "cuda" and liger_available()
    if logit_kernel == "liger":
        if not liger_ok:
            raise SpecError(
                "logit_kernel 'liger' needs CUDA and the liger-kernel package (the 'gpu' extra)",
                param="spec.method.logit_kernel",
            )
        if divergence not in LIGER_DIVERGENCES:
            raise SpecError(
                f"the liger kernel implements {', '.join(LIGER_DIVERGENCES)}, not {divergence}",
                param="spec.method.logit_kernel",
            )
        return liger_linear_objective, "liger"
    if logit_kernel == "auto" and liger_ok and divergence in LIGER_DIVERGENCES:
        return liger_linear_objective, "liger"
    return fused_linear_objective, "torch"


PARITY_TOKENS = 256
#: Budget of one float32 (tokens, V) logits tensor of the parity check's dense reference.
PARITY_BYTES = 2**25
"""Tokens of the first micro-batch the parity check compares (the dense reference's logits
of that many tokens are affordable at any vocabulary)."""
PARITY_RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""Relative tolerance of the parity check by the hidden states' dtype: float32 kernels agree
with the dense loss to ~1e-6; 1e-4 leaves room for another summation order. bf16 logits round
at 3 significant digits."""


def parity_rtol(
    student_hidden: torch.Tensor, teacher_weight: torch.Tensor | None, kd_weight: float
) -> float:
    """`PARITY_RTOL` of the looser of the student's compute dtype (autocast's where it casts
    the head, so call it under the step's autocast) and the teacher head's, when its logits
    count (a > 0): a bf16 teacher's logits round to bf16 differently under another GEMM
    tiling (seen on an H200 with a float32 student: loss 7e-6, grads 3e-4 against the dense
    reference). Shared by `check_parity` and the cross-tokenizer check."""
    dtypes = [_autocast_dtype(student_hidden) or student_hidden.dtype]
    if teacher_weight is not None and kd_weight > 0:
        dtypes.append(teacher_weight.dtype)
    return max(PARITY_RTOL.get(d, 3e-2) for d in dtypes)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).abs().max().item()
    return err / max(want.float().abs().max().item(), 1e-12)


def check_parity(
    kernel: FusedLinearLoss,
    name: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kd_weight: float,
    temperature: float,
    alpha: float,
    beta: float,
    vocab: int,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    tokens: int = PARITY_TOKENS,
    rtol: float | None = None,
) -> dict[str, float]:
    """Compare ``kernel`` with the dense `losses.logit_objective` on the first ``tokens``
    positions: the loss and its gradients w.r.t. the student's hidden states and head weight.
    The soft-caps (`Head.softcap`) are applied to the dense reference's logits as the models'
    forwards apply them, and handed to the kernel only when set.

    Shapes as `fused_linear_objective`'s. Raises `sharp_core.errors.LossParityError` (code
    ``loss_parity``, both values in the message) beyond ``rtol`` (default `PARITY_RTOL` by
    dtype); returns the relative errors otherwise. Works on detached copies: the training
    graph is not touched.
    """
    # the dense reference holds a few float32 (tokens, V) rows and two (V, D) weight gradients:
    # at a 128k vocabulary keep its rows near 32 MiB, so the check stays a small part of a step
    tokens = max(16, min(tokens, PARITY_BYTES // (4 * vocab)))
    n = max(1, min(labels.shape[1], tokens // max(1, labels.shape[0])))
    y = labels[:, :n]
    hs = student_hidden[:, :n].detach().clone().requires_grad_(True)
    # a new leaf on the same storage (no copy of the head): the kernels slice it to ``vocab``
    ws = student_weight.detach().requires_grad_(True)
    bs = None if student_bias is None else student_bias.detach()[:vocab].clone()
    ht = None if teacher_hidden is None else teacher_hidden[:, :n].detach()
    wt = None if teacher_weight is None else teacher_weight.detach()[:vocab]
    bt = None if teacher_bias is None else teacher_bias.detach()[:vocab]
    nv = max(1, losses.count_valid(y))
    kw: dict[str, Any] = dict(
        kd_weight=kd_weight, temperature=temperature, alpha=alpha, beta=beta, num_valid=nv
    )
    caps = softcap_kwargs(student_softcap, teacher_softcap)
    # under autocast the dense path's lm_head (F.linear) rounds the student's logits to
    # autocast's dtype, and so does the kernel: the reference does the same, so that the check
    # measures the kernel and not bf16's rounding of large logits (a float32 reference refused
    # a correct kernel at logits of std 12, max 59: grads 4.4e-2 against 3e-2)
    s_dt = _autocast_dtype(student_hidden) or torch.float32
    with torch.enable_grad():
        got, _, _ = kernel(
            name, hs, ws, ht, wt, y, vocab=vocab, student_bias=bs, teacher_bias=bt, **kw, **caps
        )
        g_h, g_w = torch.autograd.grad(got, (hs, ws), allow_unused=True)
        with torch.autocast(hs.device.type, enabled=False):
            bs_ = None if bs is None else bs.to(s_dt)
            s = F.linear(hs.to(s_dt), ws[:vocab].to(s_dt), bs_).float()  # (B, n, V)
            s = softcap_logits(s, student_softcap)
            if ht is not None and wt is not None and kd_weight > 0:
                t = softcap_logits(F.linear(ht.to(wt.dtype), wt, bt), teacher_softcap).float()
                want, _, _ = losses.logit_objective(name, s, t, y, **kw)
            else:
                want = (1 - kd_weight) * losses.cross_entropy(s, y, num_valid=nv)
        r_h, r_w = torch.autograd.grad(want, (hs, ws))
    g_h = torch.zeros_like(hs) if g_h is None else g_h
    g_w = torch.zeros_like(ws) if g_w is None else g_w
    tol = parity_rtol(student_hidden, teacher_weight, kd_weight) if rtol is None else rtol
    errs = {
        "loss": abs(got.item() - want.item()) / max(abs(want.item()), 1e-12),
        "grad_hidden": _rel(g_h, r_h),
        "grad_weight": _rel(g_w, r_w),
    }
    return parity_verdict(
        errs, tol, f"the logit-loss kernel disagrees with the dense loss on the first "
        f"micro-batch ({n} positions × {labels.shape[0]}): kernel loss {got.item():.8g}, dense "
        f"loss {want.item():.8g}", "spec.method.logit_kernel",
    )  # fmt: skip


def parity_verdict(errs: dict[str, float], tol: float, said: str, param: str) -> dict[str, float]:
    """The parity checks' one rule: every relative error within ``tol`` (NaN is not), or
    LossParityError saying ``said`` (what disagreed, with both values) and the errors."""
    from sharp_core.errors import LossParityError

    if all(v <= tol for v in errs.values()):
        return errs
    raise LossParityError(
        f"{said}; relative errors "
        + ", ".join(f"{k} {v:.3g}" for k, v in errs.items())
        + f" (tolerance {tol:g})",
        param=param,
    )
