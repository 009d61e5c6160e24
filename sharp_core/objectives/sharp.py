"""SHARP attention terms and the TinyBERT / MiniLM attention baselines.

The method is defined in ``design/sharp-method.md``; this module is its executable reading.
For one layer with attention probabilities ``P[h, i, k]`` (head h, query i, key k) over the
valid queries of a sequence, the two-way decomposition over heads × queries, key by key, is::

    μ[k]      = mean_{h,i} P[h,i,k]                 'layer'     (B, 1, 1, N)
    α[h,k]    = mean_i P[h,i,k] − μ[k]              'head'      (B, H, 1, N)
    β[i,k]    = mean_h P[h,i,k] − μ[k]              'token'     (B, 1, N, N)
    γ[h,i,k]  = P[h,i,k] − μ[k] − α[h,k] − β[i,k]   'residual'  (B, H, N, N)

Broadcast to (B, H, N, N) the four components sum to P on the valid query rows and are
mutually orthogonal in the Frobenius inner product restricted to those rows: each one is the
image of P under an orthogonal projector Π_g that acts on the (head, query) axes only. A
rank-r orthonormal basis over keys, Q (N, r), acts on the key axis only, so it commutes with
every Π_g: the projected components ``z_g = component_g · Q`` are the components of ``P·Q`` and
stay orthogonal. The SHARP terms are

    L_g = mean_j  Σ_b  ‖z_g(P_s,j) − z_g(W_H · P_t,λ(j))‖²_F / n_g       g ∈ {layer, head, token, residual}

and ∇_{P_s} L_g = (2 / n_g)·Π_g((P_s − target)·Q·Qᵀ) up to a positive constant per granularity,
which lies in the range of Π_g: the gradients of two different terms on the student's
attention maps are orthogonal on any input (``tests/test_sharp.py`` checks it).

Decisions the design page leaves open (each is repeated where it is implemented):

* **Compact norms.** ‖·‖_F is taken over each component's own shape (layer: r values, head:
  H·r, token: n·r, residual: H·n·r, n = number of valid queries), as in the page's table. With
  the default relative normalisation the choice cancels; with ``count`` normalisation each term
  is the mean squared error per element of its own component.
* **Relative normalisation floor.** n_g = ‖z_g(target)‖² + RELATIVE_EPS · E_tot / m_g, where
  E_tot = ‖(W_H·P_t)·Q‖² over the valid rows (the whole mapped teacher map's energy, which by
  orthogonality is Σ_g m_g‖z_g‖²) and m_g is the broadcast multiplicity of the component
  (layer H·n, head n, token H, residual 1). In words: a component is never normalised by less
  than RELATIVE_EPS = 1% of the teacher's total projected attention energy. A component that
  carries almost none of the teacher's energy (e.g. heads that the head map has averaged into
  near-copies of each other) would otherwise turn a small student mismatch into a huge,
  noise-driven gradient. The floor is scale free (it depends on no N, H or magnitude) and
  depends on the teacher only, so the orthogonality property is untouched. Exactly degenerate
  components (H_s = 1 for 'head', one valid query for 'token') are identically zero for both
  models and give 0, not 0/0.
* **Learned basis.** Trained by online (uncentred) PCA of the teacher's attention rows: the
  auxiliary ``basis_loss`` = 1 − ‖P_t·Q‖² / ‖P_t‖² (fraction of teacher energy the basis fails
  to capture) with its gradient flowing only into Q; the distillation terms see Q detached.
  Training Q on the distillation terms instead would shrink the student–teacher difference by
  rotating the basis towards directions where the two agree (a degenerate optimum).
* **Terms are sums over sequences** of per-sequence values averaged over layer pairs and are
  returned unweighted; the trainer multiplies by ``weights`` and divides by the global number
  of sequences of the optimizer step, so gradient accumulation is exact.

How the maps are computed (``docs/method.md``, "Attention terms at long context"): never as
stored (B, H, N, N) tensors. Every term of a captured layer runs through `recompute_chunks`, a
custom autograd Function that rebuilds the softmax rows query chunk by query chunk in forward
and again in backward (flash-attention style), saving only q and k: memory O(N·query_chunk)
per layer for forward and backward, on any device and with any mask. Chosen over SDPA with
the basis as values (`project_sdpa`, ``projection: sdpa``) as the default because on CUDA
float32 q/k with GQA leave SDPA only its math kernel, which keeps the (B, H, N, N) maps for
backward (33× the recomputed path's peak at N=4096 on the benchmark, ``bench.memory.
attention``), and bf16 q/k would round the maps whose differences the terms measure. On the
CPU, SDPA's flash kernel is faster for the objective alone (1.1× at the tiny-cpu preset),
not measurably for a whole step; it stays available. Chunks compute in float32 (TF32 allowed on CUDA,
scoped: `ALLOW_TF32`) and read only the key prefix a causal chunk can attend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

from sharp_core.models.capture import CapturedLayer
from sharp_core.spec import MethodSpec

#: The four granularities of the hierarchical decomposition, in order.
COMPONENTS: tuple[str, ...] = ("layer", "head", "token", "residual")

#: Floor of the relative normaliser, as a fraction of the teacher's total projected energy.
RELATIVE_EPS = 1e-2

#: Absolute floor of every denominator (only reached when there is nothing to compare: a
#: sequence without valid queries, where the numerator is exactly 0 as well).
_TINY = 1e-12


# --------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------


@runtime_checkable
class AttentionProbs(Protocol):
    """One layer's attention probabilities, produced on demand query chunk by query chunk.

    ``probs(start, end)`` returns (B, H, end − start, N) float32: the exact softmax rows of
    queries [start, end); rows with no valid key are zeros. For the student it keeps the
    autograd graph back to the model's queries and keys.
    """

    @property
    def num_heads(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    def probs(self, start: int = 0, end: int | None = None) -> Tensor: ...


class DenseProbs:
    """`AttentionProbs` over an already materialised (B, H, N, N) tensor (tests, benchmarks).

    Slicing keeps the autograd graph, so a leaf ``probs`` with ``requires_grad`` receives the
    gradients of any term computed from it. Rows are returned in float32, except that a
    float64 tensor stays float64 (so tests can check identities to 1e-10); every consumer in
    this module computes in at least float32 either way.
    """

    def __init__(self, probs: Tensor) -> None:
        if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
            raise ValueError(
                f"expected probabilities of shape (B, H, N, N), got {tuple(probs.shape)}"
            )
        self._p = probs

    @property
    def num_heads(self) -> int:
        return int(self._p.shape[1])

    @property
    def seq_len(self) -> int:
        return int(self._p.shape[-1])

    def probs(self, start: int = 0, end: int | None = None) -> Tensor:
        end = self.seq_len if end is None else end
        p = self._p[:, :, start:end]  # (B, H, end-start, N)
        return p if p.dtype == torch.float64 else p.float()


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    if size < 1:
        raise ValueError(f"query_chunk must be >= 1, got {size}")
    for a in range(0, n, size):
        yield a, min(a + size, n)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 inputs stay float64 so tests can check to 1e-10)."""
    return torch.promote_types(dtype, torch.float32)


def _resolve_mask(attn: AttentionProbs, query_mask: Tensor | None) -> Tensor:
    """The (B, N) bool mask; None means all valid (B is read from one probability row)."""
    if query_mask is not None:
        if query_mask.dim() != 2 or query_mask.shape[1] != attn.seq_len:
            raise ValueError(
                f"query_mask must have shape (B, {attn.seq_len}), got {tuple(query_mask.shape)}"
            )
        return query_mask.to(torch.bool)
    with torch.no_grad():
        row = attn.probs(0, 1)
    return torch.ones(row.shape[0], attn.seq_len, dtype=torch.bool, device=row.device)


def _row_mask(query_mask: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    """(B, N) bool; None means every query is valid."""
    if query_mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if query_mask.shape != (b, n):
        raise ValueError(
            f"query_mask must have shape (B, N) = {(b, n)}, got {tuple(query_mask.shape)}"
        )
    return query_mask.to(device=device, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------------


def _anova(
    x: Tensor, query_mask: Tensor | None, parts: Sequence[str] = COMPONENTS
) -> dict[str, Tensor]:
    """Two-way decomposition of x (B, H, N, F) over heads × valid queries, feature by feature.

    Returns keepdim tensors: 'layer' (B,1,1,F), 'head' (B,H,1,F), 'token' (B,1,N,F) and
    'residual' (B,H,N,F), the last two zero on invalid query rows. Only the requested parts
    (plus the layer mean, which every other part needs) are computed. A sequence without any
    valid query gives zeros (counts are clamped to 1 over an all-zero sum), never NaN.
    """
    b, _, n, _ = x.shape
    valid = _row_mask(query_mask, b, n, x.device)[:, None, :, None]  # (B, 1, N, 1)
    xm = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))  # (B, H, N, F)
    count = valid.sum(dim=2, keepdim=True).clamp_min(1).to(x.dtype)  # (B, 1, 1, 1)
    head_mean = xm.sum(dim=2, keepdim=True) / count  # (B, H, 1, F) mean over valid queries
    mu = head_mean.mean(dim=1, keepdim=True)  # (B, 1, 1, F)
    out = {"layer": mu}
    if "head" in parts or "residual" in parts:
        out["head"] = head_mean - mu  # (B, H, 1, F)
    if "token" in parts or "residual" in parts:
        out["token"] = (xm.mean(dim=1, keepdim=True) - mu) * valid  # (B, 1, N, F)
    if "residual" in parts:
        out["residual"] = xm - (mu + out["head"]) * valid - out["token"]  # (B, H, N, F)
    return {g: v for g, v in out.items() if g == "layer" or g in parts}


def decompose(probs: Tensor, query_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Hierarchical decomposition of one layer's attention maps (the design page's table).

    Args:
        probs: (B, H, N, N) attention probabilities P[b, h, i, k].
        query_mask: (B, N) bool, True for valid queries; None means all valid.

    Returns:
        'layer' (B,1,1,N) μ[k] = mean over heads and valid queries of P;
        'head' (B,H,1,N) α = mean_i P − μ; 'token' (B,1,N,N) β = mean_h P − μ (zero on
        invalid rows); 'residual' (B,H,N,N) γ = P − μ − α − β (zero on invalid rows).

    Broadcast to (B,H,N,N), μ + α + β + γ = P on valid rows and the four are mutually
    orthogonal in the Frobenius inner product restricted to valid rows (balanced two-way ANOVA
    over heads × valid queries, key by key). A sequence without valid queries gives zeros.
    """
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"expected probabilities of shape (B, H, N, N), got {tuple(probs.shape)}")
    return _anova(probs, query_mask)


def projected_components(pq: Tensor, query_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Components of projected maps PQ (B, H, N, r): z_g = component_g(P)·Q.

    Every component is linear in P and acts on the (head, query) axes only, while Q acts on
    keys only, so decomposing PQ equals decompose(P)·Q — without ever forming P.

    Returns 'layer' (B, r), 'head' (B, H, r), 'token' (B, N, r) (zero on invalid rows) and
    'residual' (B, H, N, r) (zero on invalid rows).
    """
    if pq.dim() != 4:
        raise ValueError(f"expected projected maps of shape (B, H, N, r), got {tuple(pq.shape)}")
    c = _anova(pq, query_mask)
    return {
        "layer": c["layer"][:, 0, 0],
        "head": c["head"][:, :, 0],
        "token": c["token"][:, 0],
        "residual": c["residual"],
    }


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


def layer_map(
    student_layers: int, teacher_layers: int, explicit: Sequence[int] | None = None
) -> list[int]:
    """Teacher layer for each student layer: j ↦ ⌈(j+1)·L_t/L_s⌉ − 1 (uniform, last with last).

    ``explicit`` (one teacher layer index per student layer) overrides the uniform map; it is
    validated here so that a wrong spec fails at construction, not in the middle of a run.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1, got student {student_layers}, teacher {teacher_layers}"
        )
    if explicit is not None:
        explicit = list(explicit)
        if len(explicit) != student_layers:
            raise ValueError(
                f"layer_map has {len(explicit)} entries but the student has {student_layers} layers: "
                "give one teacher layer per student layer"
            )
        for j, t in enumerate(explicit):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < teacher_layers:
                raise ValueError(
                    f"layer_map[{j}] = {t!r} is not a teacher layer index in [0, {teacher_layers - 1}]"
                )
        return explicit
    # Integer ceil: ⌈a/b⌉ = −(−a // b), exact for any size.
    return [-(-(j + 1) * teacher_layers // student_layers) - 1 for j in range(student_layers)]


def head_map(
    student_heads: int,
    teacher_heads: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Row-stochastic head map W_H (H_s, H_t): student head i ↔ a mix of teacher heads.

    If H_t = k·H_s, row i is the mean of teacher heads ik … ik+k−1. Otherwise row i holds the
    overlap of the interval [i·H_t/H_s, (i+1)·H_t/H_s) with each teacher head's [j, j+1),
    normalised to sum to 1 (this also covers H_t < H_s, where a teacher head is shared by
    several student heads). Overlaps are computed with exact fractions. Since each row is a
    convex combination, W_H·P_t is still a row distribution.
    """
    if student_heads < 1 or teacher_heads < 1:
        raise ValueError(
            f"head counts must be >= 1, got student {student_heads}, teacher {teacher_heads}"
        )
    w = torch.zeros(student_heads, teacher_heads, dtype=torch.float64)
    if teacher_heads % student_heads == 0:
        k = teacher_heads // student_heads
        for i in range(student_heads):
            w[i, i * k : (i + 1) * k] = 1.0 / k
    else:
        for i in range(student_heads):
            lo = Fraction(i * teacher_heads, student_heads)
            hi = Fraction((i + 1) * teacher_heads, student_heads)
            for j in range(math.floor(lo), math.ceil(hi)):
                overlap = min(hi, Fraction(j + 1)) - max(lo, Fraction(j))
                if overlap > 0:
                    w[i, j] = float(overlap / (hi - lo))
    return w.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class AlignmentMaps:
    """Layer and head maps known exactly, e.g. from pruning: student layer j *is* teacher layer
    ``layers[j]`` and its head i *is* teacher head ``heads[j][i]``."""

    layers: list[int] | None = None
    heads: list[list[int]] | None = None


def one_hot_head_maps(heads: Sequence[Sequence[int]], teacher_heads: int) -> Tensor:
    """(L_s, H_s, H_t) one-hot rows: row i of layer j picks teacher head ``heads[j][i]``."""
    rows = [len(h) for h in heads]
    if not heads or len(set(rows)) != 1:
        raise ValueError(f"every student layer needs the same number of heads, got {rows}")
    w = torch.zeros(len(heads), rows[0], teacher_heads)
    for j, hs in enumerate(heads):
        for i, h in enumerate(hs):
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < teacher_heads:
                raise ValueError(
                    f"head_map[{j}][{i}] = {h!r} is not a teacher head in [0, {teacher_heads - 1}]"
                )
            w[j, i, h] = 1.0
    return w


def _head_maps(
    l_s: int, h_s: int, h_t: int, method: MethodSpec, maps: AlignmentMaps | None
) -> Tensor:
    """W_H for every student layer: the spec's explicit map, else a known one, else uniform."""
    heads = method.head_map or (maps.heads if maps is not None else None)
    if heads is None:
        return head_map(h_s, h_t).expand(l_s, h_s, h_t).contiguous()
    w = one_hot_head_maps(heads, h_t)
    if tuple(w.shape[:2]) != (l_s, h_s):
        raise ValueError(
            f"head_map has {w.shape[0]} layers of {w.shape[1]} heads but the student has "
            f"{l_s} layers of {h_s} heads"
        )
    return w


# --------------------------------------------------------------------------------------------
# Bases over keys
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _dct_cached(n: int, r: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]  # (N, 1) key position
    m = torch.arange(r, dtype=torch.float64)[None, :]  # (1, r) frequency
    q = torch.cos(math.pi * (k + 0.5) * m / n) * math.sqrt(2.0 / n)  # (N, r)
    q[:, 0] = 1.0 / math.sqrt(n)
    return q.to(device=device, dtype=dtype)


def dct_basis(
    n: int, r: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """First r orthonormal DCT-II vectors for length n, as columns: Q (n, r), QᵀQ = I.

    Q[k, m] = √(2/n)·cos(π(k + ½)m/n), column 0 scaled to 1/√n. Low frequencies first, so
    truncating to r keeps the smooth part of each attention row and drops fine-grained
    noise. Built in float64, then cast; cached per (n, r, device, dtype) — the returned tensor
    is shared, never modify it in place.
    """
    if not 1 <= r <= n:
        raise ValueError(f"DCT rank must satisfy 1 <= r <= n, got r={r}, n={n}")
    dev = torch.device(device) if device is not None else torch.empty(0).device
    return _dct_cached(int(n), int(r), dev, dtype)


class LearnedBasis(nn.Module):
    """A learned key-axis basis Q (n, r), kept exactly orthonormal (QᵀQ = I) by construction.

    ``torch.nn.utils.parametrizations.orthogonal`` (Householder product for n > r, matrix
    exponential for n = r) makes every value of ``weight`` orthonormal whatever the optimizer
    does — no soft penalty, which would not keep the projected components orthogonal. Starts
    at the DCT basis (the parametrization keeps an orthonormal initial value as is).

    How it is trained (see `SharpObjective`): by maximising the teacher energy it
    captures, i.e. ``basis_loss`` = 1 − ‖P_t·Q‖²/‖P_t‖² (online uncentred PCA of the teacher's
    attention rows), gradient into Q only. It must NOT be trained on the distillation terms:
    a basis free to minimise ‖(P_s − P_t)·Q‖² would rotate towards the directions where
    student and teacher already agree, making the terms vanish without teaching anything.
    Put its parameters in the optimizer, preferably without weight decay.
    """

    def __init__(self, n: int, r: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 1 <= r <= n:
            raise ValueError(f"learned basis rank must satisfy 1 <= r <= n, got r={r}, n={n}")
        self.n, self.r = n, r
        self.weight = nn.Parameter(dct_basis(n, r, dtype=dtype).clone())
        parametrizations.orthogonal(self, "weight")

    def forward(self) -> Tensor:
        """Q (n, r), orthonormal columns."""
        return self.weight


# --------------------------------------------------------------------------------------------
# Projection, chunk by chunk
# --------------------------------------------------------------------------------------------


def _project_chunk(attn: AttentionProbs, basis: Tensor, start: int, end: int) -> Tensor:
    p = attn.probs(start, end)  # (B, H, c, N)
    dt = _work_dtype(p.dtype)
    return p.to(dt) @ basis.to(dt)  # (B, H, c, r)


def project(attn: AttentionProbs, basis: Tensor, query_chunk: int) -> Tensor:
    """P·Q (B, H, N, r) computed query chunk by query chunk (``projection: chunked``).

    Never holds the full (B, H, N, N) map: each chunk's (B, H, c, N) rows are projected and
    dropped. A captured layer goes through `project_recompute` (rows rebuilt from q/k in
    backward by a custom autograd Function). Any other source runs each chunk, when grad is
    enabled, under ``torch.utils.checkpoint`` (non-reentrant), so backward recomputes the
    chunk's rows instead of keeping every chunk's probabilities alive until backward.
    Computed in float32 (float64 if the maps are float64).
    """
    if isinstance(attn, CapturedLayer):
        return project_recompute(attn, basis, query_chunk)
    n = attn.seq_len
    if basis.dim() != 2 or basis.shape[0] != n:
        raise ValueError(f"basis must have shape (N={n}, r), got {tuple(basis.shape)}")
    use_ckpt = torch.is_grad_enabled()
    outs = []
    for a, b in _chunks(n, query_chunk):
        if use_ckpt:
            outs.append(checkpoint(_project_chunk, attn, basis, a, b, use_reentrant=False))
        else:
            outs.append(_project_chunk(attn, basis, a, b))
    return torch.cat(outs, dim=2)  # (B, H, N, r)


def project_sdpa(attn: CapturedLayer, basis: Tensor) -> Tensor:
    """P·Q (B, H, N, r) as one fused attention call whose values are the key basis.

    Why: P·Q = softmax(q·kᵀ·scale + mask)·Q *is* an attention with the basis as values, so
    `scaled_dot_product_attention` computes it without materialising any (B, H, N, N) block,
    and its backward returns dq, dk without the chunked path's recompute of the softmax
    under activation checkpointing (measured in ``bench/step.py``: the objective forward +
    backward 1.8× faster on CPU). Same numerics as `project`: q and k are upcast to float32
    (with autocast off) before the call, so a bf16 model's projected maps are not rounded
    to bf16 — the SHARP terms are differences of near-equal maps and would cancel badly.

    Same masks, scale, causal flag and GQA as the model's own call. The basis is zero-padded
    to the head dim because the fused CPU/CUDA kernels want equal q/k/v head dims; the pad
    columns are sliced off. Rows with no attendable key (left padding under a causal mask)
    are zeros, as in `CapturedLayer.probs`: SDPA would return NaN there, and NaN times a
    zero gradient is still NaN, so such rows attend everywhere (finite) and are zeroed after.
    """
    n_k = attn.key.shape[2]
    r = basis.shape[1]
    if basis.dim() != 2 or basis.shape[0] != n_k:
        raise ValueError(f"basis must have shape (N={n_k}, r), got {tuple(basis.shape)}")
    with torch.autocast(device_type=attn.query.device.type, enabled=False):
        dt = _work_dtype(attn.query.dtype)
        q, k = attn.query.to(dt), attn.key.to(dt)  # (B, H, N, D), (B, H_kv, Nk, D)
        b, h, _n, d = q.shape
        h_kv = k.shape[1]
        cols = max(d, r)
        v = torch.zeros(n_k, cols, dtype=dt, device=q.device)
        v[:, :r] = basis.to(dt)
        # materialised like one key tensor: a stride-0 broadcast can push SDPA off its kernels
        v = v.expand(b, h_kv, n_k, cols).contiguous()
        gqa = h != h_kv
        if gqa and q.device.type == "cuda":
            # CUDA's memory-efficient kernel (the one that takes float32 and any mask) does
            # not take enable_gqa: the math kernel would serve and keep (B, H, N, N) maps for
            # backward. Repeated kv heads are O(N·D); the CPU's flash kernel takes GQA as is.
            k = k.repeat_interleave(h // h_kv, dim=1)  # (B, H, Nk, D)
            v = v.repeat_interleave(h // h_kv, dim=1)  # (B, H, Nk, cols)
            gqa = False
        mask, valid = attn.mask, None
        if mask is not None:
            if mask.dtype == torch.bool:
                valid = mask.any(dim=-1, keepdim=True)
                mask = mask | ~valid
            else:
                valid = (mask > torch.finfo(mask.dtype).min).any(dim=-1, keepdim=True)
                mask = torch.where(valid, mask, torch.zeros((), dtype=mask.dtype)).to(dt)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=bool(attn.is_causal and mask is None),
            scale=attn.scaling,
            enable_gqa=gqa,
        )[..., :r]  # (B, H, N, r)
        if valid is not None:
            out = out * valid.to(dt)
    return out


# --------------------------------------------------------------------------------------------
# Recomputed softmax chunks: O(N · chunk) memory for forward and backward
# --------------------------------------------------------------------------------------------

#: Let float32 matmuls of the recomputed chunks use TF32 on CUDA (scoped to those chunks).
ALLOW_TF32 = True


@contextlib.contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 for the chunk matmuls on CUDA only, restored afterwards (CPU: nothing to do)."""
    if device.type != "cuda" or not ALLOW_TF32:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


#: A per-chunk function of the softmax rows: fn(p (B, H, c, N), start, end, *extras) -> Tensor.
ChunkFn = Callable[..., Tensor]


class _RecomputedSoftmax(torch.autograd.Function):
    """fn applied to a captured layer's softmax rows, query chunk by query chunk, with a
    flash-attention-style backward: only q, k (and the extras) are saved; backward recomputes
    each chunk's rows P_c and backpropagates through them one chunk at a time.

    Forward: out = cat_c fn(P_c) along dim 2 (``reduce='cat'``) or Σ_c fn(P_c) (``'sum'``).
    Backward per chunk: dP_c = ∂fn/∂P_c (local autograd on a (B, H, c, N) leaf), then the
    softmax backward dS = P_c ⊙ (dP_c − rowsum(dP_c ⊙ P_c)) and the score matmul's
    dq_c = scale·dS·k, dk += scale·dSᵀ·q_c (GQA: query heads grouped per key head, keys never
    repeated). Masked entries have P = 0, rows without any attendable key are all-zero rows
    (as in `CapturedLayer.probs`), so both get dS = 0 exactly as autograd through
    `probs` would give. Work in float32 (TF32 on CUDA if `ALLOW_TF32`); q, k are saved in
    their own dtype (the model's tensors: no copy) and gradients returned in it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        layer: CapturedLayer,
        fn: ChunkFn,
        reduce: str,
        chunk: int,
        trim: bool,
        query: Tensor,
        key: Tensor,
        *extras: Tensor,
    ) -> Tensor:
        rec = dataclasses.replace(layer, query=query, key=key)
        parts = []
        with _tf32(query.device):
            for a, b in _chunks(rec.seq_len, chunk):
                kw = rec.key_extent(b) if trim else None
                parts.append(fn(rec.probs(a, b, kw), a, b, *extras))
        ctx.layer, ctx.fn, ctx.reduce, ctx.chunk, ctx.trim = layer, fn, reduce, chunk, trim
        ctx.save_for_backward(query, key, *extras)
        if reduce == "cat":
            return torch.cat(parts, dim=2)
        return functools.reduce(torch.add, parts)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:  # type: ignore[override]
        query, key, *extras = ctx.saved_tensors
        rec = dataclasses.replace(ctx.layer, query=query, key=key)
        need_q, need_k = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        need_x = ctx.needs_input_grad[7:]
        b_, h, n_q, d = query.shape
        h_kv, n_k = key.shape[1], key.shape[2]
        rep = h // h_kv
        scale = rec.scaling
        with torch.autocast(device_type=query.device.type, enabled=False), _tf32(query.device):
            kf = key.float()  # (B, H_kv, Nk, D)
            dq = torch.zeros(b_, h, n_q, d, dtype=torch.float32, device=query.device)
            dk = torch.zeros(b_, h_kv, n_k, d, dtype=torch.float32, device=key.device)
            dx: list[Tensor | None] = [
                torch.zeros_like(x) if need else None
                for x, need in zip(extras, need_x, strict=True)
            ]
            for a, b in _chunks(n_q, ctx.chunk):
                kw = rec.key_extent(b) if ctx.trim else n_k
                with torch.no_grad():
                    p = rec.probs(a, b, kw)  # (B, H, c, kw) float32
                leaves = [
                    x.detach().requires_grad_() if need else x
                    for x, need in zip(extras, need_x, strict=True)
                ]
                with torch.enable_grad():
                    p_leaf = p.detach().requires_grad_()
                    out = ctx.fn(p_leaf, a, b, *leaves)
                    g = grad_out[:, :, a:b] if ctx.reduce == "cat" else grad_out
                    wrt = [p_leaf] + [x for x, need in zip(leaves, need_x, strict=True) if need]
                    grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
                dp = grads[0]
                it = iter(grads[1:])
                for i, need in enumerate(need_x):
                    if need:
                        gx = next(it)
                        if gx is not None:
                            dx[i] += gx  # type: ignore[operator]  # need ⇒ not None
                if dp is None or not (need_q or need_k):
                    continue
                dp = dp.float()
                # softmax backward P ⊙ (dP − rowsum(dP ⊙ P)) in one fused pass: (B, H, c, Nk)
                ds = torch.ops.aten._softmax_backward_data(dp, p, -1, torch.float32)
                c = b - a
                ds_g = ds.reshape(b_, h_kv, rep * c, kw)  # query heads grouped per key head
                if need_q:
                    dq_c = torch.matmul(ds_g, kf[:, :, :kw]) * scale  # (B, H_kv, rep·c, D)
                    dq[:, :, a:b] = dq_c.reshape(b_, h, c, d)
                if need_k:
                    q_c = query[:, :, a:b].float().reshape(b_, h_kv, rep * c, d)
                    # (B, H_kv, kw, D)
                    dk[:, :, :kw] += torch.matmul(ds_g.transpose(-1, -2), q_c) * scale
        return (
            None,
            None,
            None,
            None,
            None,
            dq.to(query.dtype) if need_q else None,
            dk.to(key.dtype) if need_k else None,
            *dx,
        )


def recompute_chunks(
    layer: CapturedLayer,
    fn: ChunkFn,
    reduce: str,
    query_chunk: int,
    *extras: Tensor,
    trim: bool = False,
) -> Tensor:
    """fn over the captured layer's softmax rows in query chunks, differentiable w.r.t. the
    layer's q, k and ``extras`` through `_RecomputedSoftmax` (nothing (·, ·, c, N) kept for
    backward). ``reduce``: 'cat' joins per-chunk outputs along dim 2 (the query axis of a
    (B, H, c, ·) output), 'sum' adds them. Without grad it is a plain chunk loop.
    ``trim``: fn may receive only the first ``layer.key_extent(end)`` key columns of a chunk
    (the causal prefix; the rest are zeros) and must accept any width ≤ N."""
    if reduce not in ("cat", "sum"):
        raise ValueError(f"reduce must be 'cat' or 'sum', got {reduce!r}")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    if layer.query.shape[1] % layer.key.shape[1]:
        raise ValueError(
            f"{layer.query.shape[1]} query heads not a multiple of {layer.key.shape[1]} key heads"
        )
    return _RecomputedSoftmax.apply(
        layer, fn, reduce, query_chunk, trim, layer.query, layer.key, *extras
    )


def _times_basis(p: Tensor, _a: int, _b: int, basis: Tensor) -> Tensor:
    return p @ basis[: p.shape[-1]].to(p.dtype)  # (B, H, c, r): keys past p's width are 0


def project_recompute(attn: CapturedLayer, basis: Tensor, query_chunk: int) -> Tensor:
    """P·Q (B, H, N, r) of a captured layer, float32, with O(N · query_chunk) memory for
    forward and backward (`recompute_chunks`): the default (``projection: chunked``)."""
    n = attn.key.shape[2]
    if basis.dim() != 2 or basis.shape[0] != n:
        raise ValueError(f"basis must have shape (N={n}, r), got {tuple(basis.shape)}")
    return recompute_chunks(attn, _times_basis, "cat", query_chunk, basis, trim=True)


def _project_any(attn: AttentionProbs, basis: Tensor, query_chunk: int, how: str) -> Tensor:
    """Captured layers: `project_sdpa` when asked; otherwise `project` (which recomputes a
    captured layer's rows and checkpoints any other source's, e.g. dense maps in tests)."""
    if how == "sdpa" and isinstance(attn, CapturedLayer):
        return project_sdpa(attn, basis)
    return project(attn, basis, query_chunk)


@torch.no_grad()
def _project_teacher(
    attn: AttentionProbs,
    basis: Tensor,
    query_chunk: int,
    w_h: Tensor,
    valid: Tensor,
    with_stats: bool,
    how: str = "chunked",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Teacher side, under no_grad: (W_H·P_t)·Q (B, H_s, N, r) chunk by chunk.

    With ``with_stats`` it also accumulates, over valid rows of the raw teacher heads, the
    learned basis' statistics G_b = Σ P_tᵀ(P_t Q) (B, N, r) and E_b = Σ‖P_t‖² (B,), at the
    cost of one more (c·N·r) product per chunk — the same as the projection itself.
    """
    if how == "sdpa" and not with_stats and isinstance(attn, CapturedLayer):
        pq = project_sdpa(attn, basis)  # (B, H_t, N, r)
        return torch.einsum("st,btnr->bsnr", w_h.to(pq.dtype), pq), None, None
    outs = []
    g = e = None
    trim = isinstance(attn, CapturedLayer) and not with_stats
    for a, b in _chunks(attn.seq_len, query_chunk):
        # a capture under the causal flag: only the key prefix the chunk attends (rest is 0)
        p = attn.probs(a, b, attn.key_extent(b)) if trim else attn.probs(a, b)  # type: ignore[attr-defined,call-arg]
        dt = _work_dtype(p.dtype)
        p = p.to(dt)  # (B, H_t, c, kw ≤ N)
        pq = p @ basis[: p.shape[-1]].to(dt)  # (B, H_t, c, r)
        outs.append(torch.einsum("st,btcr->bscr", w_h.to(dt), pq))  # (B, H_s, c, r)
        if with_stats:
            pm = p * valid[:, None, a:b, None].to(dt)  # (B, H_t, c, N) valid rows only
            g_c = torch.einsum("btcn,btcr->bnr", pm, pq)  # (B, N, r)
            e_c = pm.square().sum(dim=(1, 2, 3))  # (B,)
            g = g_c if g is None else g + g_c
            e = e_c if e is None else e + e_c
    return torch.cat(outs, dim=2), g, e


# --------------------------------------------------------------------------------------------
# Losses (pure functions, per sequence)
# --------------------------------------------------------------------------------------------


def _profile_chunk(attn: AttentionProbs, valid: Tensor, head_w: Tensor, a: int, b: int) -> Tensor:
    return _profile_rows(attn.probs(a, b), a, b, valid, head_w)


def _profile_rows(p: Tensor, a: int, b: int, valid: Tensor, head_w: Tensor) -> Tensor:
    dt = _work_dtype(p.dtype)
    rows = valid[:, None, a:b, None].to(dt)  # (B, 1, c, 1)
    out = torch.einsum("h,bhcn->bn", head_w.to(dt), p.to(dt) * rows)  # (B, kw)
    return F.pad(out, (0, valid.shape[1] - out.shape[-1]))  # (B, N): trimmed keys are 0


def layer_profile(
    attn: AttentionProbs, valid: Tensor, query_chunk: int, head_weights: Tensor | None = None
) -> Tensor:
    """μ (B, N) = Σ_h w_h · mean over valid queries of P[h, i, :]: the layer component
    *before* projection, a distribution over keys (each valid row of P sums to one).

    ``head_weights`` (H,) default to 1/H (the plain head mean); the teacher's side passes
    the column means of the head map, so that μ of W_H·P_t is formed without mixing maps.
    Query chunks run under a non-reentrant checkpoint when grad is enabled (the same memory
    contract as `project`: no (B, H, N, N) map is ever held).
    """
    h = attn.num_heads
    w = head_weights if head_weights is not None else torch.full((h,), 1.0 / h, dtype=torch.float64)
    w = w.to(valid.device)
    if isinstance(attn, CapturedLayer):
        rows = recompute_chunks(attn, _profile_rows, "sum", query_chunk, valid, w, trim=True)
        return rows / valid.sum(dim=1, keepdim=True).clamp_min(1).to(rows.dtype)
    total: Tensor | None = None
    for a, b in _chunks(attn.seq_len, query_chunk):
        if torch.is_grad_enabled():
            part = checkpoint(_profile_chunk, attn, valid, w, a, b, use_reentrant=False)
        else:
            part = _profile_chunk(attn, valid, w, a, b)
        total = part if total is None else total + part
    assert total is not None
    return total / valid.sum(dim=1, keepdim=True).clamp_min(1).to(total.dtype)


def layer_profile_kl(mu_s: Tensor, mu_t: Tensor) -> Tensor:
    """KL(μ_t ‖ μ_s) per sequence (B,), the distribution-aware layer distance.

    Why a divergence here: the layer component is a distribution over keys, and squared
    error on it (projected or not) weighs a key that gets 0.30 instead of 0.31 of the mass
    like one that gets 0.01 instead of 0.02; KL weighs them by the teacher's mass, as the
    logit term does for tokens. Written as the generalised KL Σ t·log(t/s) − t + s so that
    sequences without valid rows (μ = 0) give 0, and with s floored at a tiny value so that
    a key the student ignores entirely gives a large but finite loss. Its gradient with
    respect to the student's maps is the same vector on every valid (head, query) row, i.e.
    it lies in the range of the layer projector Π_layer: orthogonal to the other terms'.
    """
    mu_t = mu_t.detach()
    s = mu_s.clamp_min(_TINY)
    t = mu_t.clamp_min(0.0)
    log_ratio = torch.where(t > 0, torch.log(t.clamp_min(_TINY)) - torch.log(s), 0.0)
    return (t * log_ratio - t + mu_s).sum(dim=-1)


def sharp_distances(
    pq_s: Tensor,
    pq_t: Tensor,
    query_mask: Tensor | None,
    terms: Sequence[str] = ("layer", "head", "token"),
    normalization: str = "relative",
    eps: float = RELATIVE_EPS,
) -> dict[str, Tensor]:
    """Per-sequence SHARP distances ‖z_g(P_s) − z_g(target)‖²_F / n_g, each (B,).

    Args:
        pq_s: (B, H, N, r) student maps projected on the key basis, P_s·Q.
        pq_t: (B, H, N, r) target, (W_H·P_t)·Q; treated as a constant (detached).
        query_mask: (B, N) bool, True for valid queries (None: all valid).
        terms: granularities among 'layer', 'head', 'token', 'residual', or just 'direct'
            (one distance on whole maps over valid rows = the sum of the four components'
            broadcast distances, the reviewers' baseline).
        normalization: 'relative' — n_g = ‖z_g(target)‖² + eps·E_tot/m_g (see the module
            docstring: the floor is eps of the target's total energy E_tot in the component's
            own units, m_g its broadcast multiplicity); 'count' — n_g = the number of
            elements of the compact component over valid rows (layer r, head H·r, token n·r,
            residual H·n·r, direct H·n·r), i.e. a mean squared error per element.

    Norms are over each component's compact shape (layer r values, head H·r, …); with the
    relative normaliser this choice cancels.
    """
    if pq_s.shape != pq_t.shape:
        raise ValueError(
            f"student {tuple(pq_s.shape)} and target {tuple(pq_t.shape)} shapes differ"
        )
    if normalization not in ("relative", "count"):
        raise ValueError(f"normalization must be 'relative' or 'count', got {normalization!r}")
    terms = tuple(terms)
    if "direct" in terms and len(terms) != 1:
        raise ValueError("'direct' cannot be combined with hierarchical terms")
    for t in terms:
        if t not in (*COMPONENTS, "direct"):
            raise ValueError(f"unknown SHARP term {t!r}")
    b, h, n, r = pq_s.shape
    pq_t = pq_t.detach()
    valid = _row_mask(query_mask, b, n, pq_s.device)
    n_valid = valid.sum(dim=1).to(pq_s.dtype)  # (B,)
    rows = valid[:, None, :, None]  # (B, 1, N, 1)
    zero = torch.zeros((), dtype=pq_s.dtype, device=pq_s.device)
    e_tot = torch.where(rows, pq_t, zero).square().sum(dim=(1, 2, 3))  # (B,)

    if terms == ("direct",):
        d = torch.where(rows, pq_s - pq_t, zero).square().sum(dim=(1, 2, 3))
        if normalization == "relative":
            denom = (e_tot * (1.0 + eps)).clamp_min(_TINY)
        else:
            denom = (h * r * n_valid).clamp_min(1.0)
        return {"direct": d / denom}

    cs = _anova(pq_s, valid, terms)
    ct = _anova(pq_t, valid, terms)
    n1 = n_valid.clamp_min(1.0)
    multiplicity = {
        "layer": h * n1,
        "head": n1,
        "token": torch.full_like(n1, h),
        "residual": torch.ones_like(n1),
    }
    count = {
        "layer": torch.full_like(n1, r),
        "head": torch.full_like(n1, h * r),
        "token": n1 * r,
        "residual": n1 * h * r,
    }
    out = {}
    for g in terms:
        d = (cs[g] - ct[g]).square().sum(dim=(1, 2, 3))  # (B,)
        if normalization == "relative":
            energy = ct[g].square().sum(dim=(1, 2, 3))
            denom = (energy + eps * e_tot / multiplicity[g]).clamp_min(_TINY)
        else:
            denom = count[g]
        out[g] = d / denom
    return out


def _row_loss_chunk(
    row_fn: Callable[[Tensor, Tensor], Tensor],
    student: AttentionProbs,
    teacher: AttentionProbs,
    w_h: Tensor,
    valid: Tensor,
    start: int,
    end: int,
) -> Tensor:
    return _row_loss_rows(student.probs(start, end), start, end, row_fn, teacher, w_h, valid)


def _row_loss_rows(
    s: Tensor,
    start: int,
    end: int,
    row_fn: Callable[[Tensor, Tensor], Tensor],
    teacher: AttentionProbs,
    w_h: Tensor,
    valid: Tensor,
) -> Tensor:
    """Σ over valid rows and student heads of row_fn on the student rows s (B, H_s, c, kw)
    of queries [start, end), the teacher's rows recomputed under no_grad; (B,).

    s may hold only the first kw ≤ N keys (the rest zero, see `recompute_chunks`' trim):
    the teacher's rows are then cut to kw when its own causal extent allows (both rows zero
    beyond: row_fn adds 0 there, for squared error and generalised KL alike), otherwise s
    is zero-padded to N.
    """
    dt = _work_dtype(s.dtype)
    s = s.to(dt)
    kw = s.shape[-1]
    with torch.no_grad():
        if isinstance(teacher, CapturedLayer) and teacher.key_extent(end) <= kw:
            rows = teacher.probs(start, end, kw)
        else:
            rows = teacher.probs(start, end)
        t = torch.einsum("st,btcn->bscn", w_h.to(dt), rows.to(dt))  # (B, H_s, c, kw|N)
    if t.shape[-1] > kw:
        s = F.pad(s, (0, t.shape[-1] - kw))
    per_row = row_fn(s, t)  # (B, H_s, c)
    return (per_row * valid[:, None, start:end].to(dt)).sum(dim=(1, 2))  # (B,)


def _chunked_row_loss(
    row_fn: Callable[[Tensor, Tensor], Tensor],
    student: AttentionProbs,
    teacher: AttentionProbs,
    w_h: Tensor,
    query_mask: Tensor | None,
    query_chunk: int,
) -> tuple[Tensor, Tensor]:
    """Σ over valid rows and student heads of row_fn(P_s row, (W_H·P_t) row), per sequence.

    Each chunk runs under a non-reentrant checkpoint when grad is enabled (student and
    teacher rows are recomputed in backward instead of being kept: the teacher recompute is
    the price of never holding a (B, H, N, N) map). Returns (sums (B,), valid counts (B,)).
    """
    valid = _resolve_mask(student, query_mask)  # (B, N)
    if isinstance(student, CapturedLayer):
        fn = functools.partial(_row_loss_rows, row_fn=row_fn, teacher=teacher, w_h=w_h, valid=valid)
        summed = recompute_chunks(student, fn, "sum", query_chunk, trim=True)
        return summed, valid.sum(dim=1).to(summed.dtype)
    total: Tensor | None = None
    for a, b in _chunks(student.seq_len, query_chunk):
        if torch.is_grad_enabled():
            part = checkpoint(
                _row_loss_chunk, row_fn, student, teacher, w_h, valid, a, b, use_reentrant=False
            )
        else:
            part = _row_loss_chunk(row_fn, student, teacher, w_h, valid, a, b)
        total = part if total is None else total + part
    assert total is not None
    return total, valid.sum(dim=1).to(total.dtype)


def _squared_error_rows(s: Tensor, t: Tensor) -> Tensor:
    return (s - t).square().sum(dim=-1)


def _kl_rows(s: Tensor, t: Tensor) -> Tensor:
    # Generalised KL Σ_k t·log(t/s) − t + s: equals KL(t‖s) for rows that sum to one, and
    # every summand is ≥ 0, so the term is ≥ 0 even with float rounding of the row sums.
    # s is clamped at float32's smallest normal so a key the student ignores completely
    # costs t·87 instead of inf (the clamp has no gradient there).
    tiny = torch.finfo(torch.float32).tiny
    return (torch.xlogy(t, t) - t * torch.log(s.clamp_min(tiny)) - t + s).sum(dim=-1)


def tinybert_attention_loss(
    student: AttentionProbs,
    teacher: AttentionProbs,
    w_h: Tensor,
    query_mask: Tensor | None,
    query_chunk: int = 128,
) -> Tensor:
    """TinyBERT attention term, per sequence (B,): Σ_{h,i valid,k} (P_s − W_H·P_t)² / (H_s·n²).

    TinyBERT matched pre-softmax scores; we match probabilities because (1) the capture path
    (SDPA/flash, no eager attention) never materialises scores, only q/k from which the exact
    softmax rows are rebuilt; (2) scores are defined only up to a per-row constant (softmax
    is shift invariant), carry −inf at masked keys and scale with 1/√d_head, which differs
    between teacher and student; (3) on probabilities it is exactly SHARP's 'direct' ablation
    without the key basis, so the comparison isolates what the decomposition adds.
    The count n² (n valid queries × n valid keys) makes a padded sequence cost the same as
    the unpadded one (padded keys carry zero probability in both maps).
    """
    sums, n_valid = _chunked_row_loss(
        _squared_error_rows, student, teacher, w_h, query_mask, query_chunk
    )
    return sums / (student.num_heads * n_valid.square()).clamp_min(1.0)


def minilm_attention_loss(
    student: AttentionProbs,
    teacher: AttentionProbs,
    w_h: Tensor,
    query_mask: Tensor | None,
    query_chunk: int = 128,
) -> Tensor:
    """MiniLM attention term, per sequence (B,): mean over student heads and valid rows of
    KL((W_H·P_t)[h,i,:] ‖ P_s[h,i,:]).

    MiniLM transfers only the last layer's attention distributions (plus value relations, not
    used here: the capture protocol records queries and keys only). Its student and teacher
    had equal head counts; with different counts the teacher heads are mixed by W_H, whose
    rows are convex combinations, so the target rows are still distributions.
    """
    sums, n_valid = _chunked_row_loss(_kl_rows, student, teacher, w_h, query_mask, query_chunk)
    return sums / (student.num_heads * n_valid).clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


class AttentionObjective(nn.Module):
    """The attention terms of one method for one optimizer micro-step (base class).

    Build one per run with `make_attention_objective` (it picks `SharpObjective`,
    `TinyBertObjective` or `MiniLMObjective` by the method's name)::

        obj = make_attention_objective(spec.method, student_shape=(L_s, H_s),
                                       teacher_shape=(L_t, H_t), seq_len=N)

    capture ``obj.student_layers`` / ``obj.teacher_layers`` only, then per micro-batch::

        terms = obj(student_maps, teacher_maps, query_mask)   # dict name -> scalar
        loss += sum(obj.weights[k] * v for k, v in terms.items() if k in obj.weights)
        loss += terms.get("basis_loss", 0)                      # learned basis only

    Every term is Σ over sequences of a per-sequence value averaged over layer pairs,
    unweighted: the trainer divides the whole loss by the global number of sequences in the
    optimizer step, so accumulation over micro-batches equals one big batch. Only terms whose
    weight is > 0 are computed (weights in ``self.weights``); with none, nothing is captured.

    This base holds what every method shares: the layer map λ and head map W_H (applied to
    the teacher side, under no_grad), the layer pairs and the checks of the captured maps.
    A subclass chooses its terms and layer pairs (`_select_terms`) and computes them
    (`_terms`).
    """

    weights: dict[str, float]
    pairs: list[tuple[int, int]]

    def __init__(
        self,
        method: MethodSpec,
        *,
        student_shape: tuple[int, int],
        teacher_shape: tuple[int, int],
        seq_len: int,
        maps: AlignmentMaps | None = None,
    ) -> None:
        super().__init__()
        l_s, h_s = (int(x) for x in student_shape)
        l_t, h_t = (int(x) for x in teacher_shape)
        if min(l_s, h_s, l_t, h_t) < 1:
            raise ValueError(
                f"shapes must be positive, got student {student_shape}, teacher {teacher_shape}"
            )
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.query_chunk = int(method.query_chunk)
        self.seq_len = int(seq_len)
        self.student_shape = (l_s, h_s)
        self.teacher_shape = (l_t, h_t)
        # the spec's explicit layer map wins over one known from pruning, which wins over uniform
        known = maps.layers if maps is not None else None
        self.layer_map = layer_map(l_s, l_t, method.layer_map or known)
        self.w_h: Tensor  # (L_s, H_s, H_t): one head map per student layer
        self.register_buffer("w_h", _head_maps(l_s, h_s, h_t, method, maps), persistent=False)
        weights, pairs = self._select_terms(method)
        # terms of weight 0 are not computed; with none left, no layer needs capturing
        self.weights = {k: float(v) for k, v in weights.items() if v > 0}
        self.pairs = pairs if self.weights else []
        self._configure(method)

    def _configure(self, method: MethodSpec) -> None:
        """A subclass's own settings from the method (called last in __init__)."""

    def _select_terms(self, method: MethodSpec) -> tuple[dict[str, float], list[tuple[int, int]]]:
        """The method's terms with their weights, and the (student, teacher) layer pairs."""
        raise NotImplementedError(
            f"{type(self).__name__} chooses no terms; build objectives with make_attention_objective"
        )

    @property
    def student_layers(self) -> list[int]:
        """Student layers whose attention must be captured."""
        return sorted({s for s, _ in self.pairs})

    @property
    def teacher_layers(self) -> list[int]:
        """Teacher layers whose attention must be captured."""
        return sorted({t for _, t in self.pairs})

    def _check(self, attn: AttentionProbs, heads: int, n: int, who: str, layer: int) -> None:
        if attn.num_heads != heads:
            raise ValueError(f"{who} layer {layer} has {attn.num_heads} heads, expected {heads}")
        if attn.seq_len != n:
            raise ValueError(
                f"{who} layer {layer} has sequence length {attn.seq_len}, expected {n}"
            )

    def forward(
        self,
        student: Mapping[int, AttentionProbs],
        teacher: Mapping[int, AttentionProbs],
        query_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Named scalar terms (see the class docstring); query_mask (B, N) bool, True = valid."""
        for js, jt in self.pairs:
            if js not in student:
                raise ValueError(f"student attention for layer {js} was not captured")
            if jt not in teacher:
                raise ValueError(f"teacher attention for layer {jt} was not captured")
        if not self.pairs:
            return self._no_terms()
        first = student[self.pairs[0][0]]
        n = first.seq_len
        valid = _resolve_mask(first, query_mask)  # (B, N)
        w_h = self.w_h.to(valid.device)  # (L_s, H_s, H_t)
        h_s, h_t = self.student_shape[1], self.teacher_shape[1]
        for js, jt in self.pairs:
            self._check(student[js], h_s, n, "student", js)
            self._check(teacher[jt], h_t, n, "teacher", jt)
        return self._terms(student, teacher, valid, w_h, n)

    def _no_terms(self) -> dict[str, Tensor]:
        """The result when every weight is 0 (nothing captured)."""
        return {}

    def _terms(
        self,
        student: Mapping[int, AttentionProbs],
        teacher: Mapping[int, AttentionProbs],
        valid: Tensor,
        w_h: Tensor,
        n: int,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


class _MapMatchingObjective(AttentionObjective):
    """One term matching whole maps row by row (the TinyBERT / MiniLM baselines).

    ``term`` is its name, `per_sequence` its loss (B,) on one layer pair; the value is the
    sum over sequences of the mean over layer pairs, weighted by ``method.effective_attention_weight``.
    """

    term: str

    def per_sequence(
        self, student: AttentionProbs, teacher: AttentionProbs, w_h: Tensor, valid: Tensor
    ) -> Tensor:
        raise NotImplementedError

    def _terms(
        self,
        student: Mapping[int, AttentionProbs],
        teacher: Mapping[int, AttentionProbs],
        valid: Tensor,
        w_h: Tensor,
        n: int,
    ) -> dict[str, Tensor]:
        total = None
        for js, jt in self.pairs:
            per_seq = self.per_sequence(student[js], teacher[jt], w_h[js], valid)  # (B,)
            total = per_seq if total is None else total + per_seq
        assert total is not None
        return {self.term: total.sum() / len(self.pairs)}


class TinyBertObjective(_MapMatchingObjective):
    """'tinybert': ``tinybert_attn`` (`tinybert_attention_loss`), every layer pair."""

    term = "tinybert_attn"

    def _select_terms(self, method: MethodSpec) -> tuple[dict[str, float], list[tuple[int, int]]]:
        return {self.term: method.effective_attention_weight}, list(enumerate(self.layer_map))

    def per_sequence(
        self, student: AttentionProbs, teacher: AttentionProbs, w_h: Tensor, valid: Tensor
    ) -> Tensor:
        return tinybert_attention_loss(student, teacher, w_h, valid, self.query_chunk)


class MiniLMObjective(_MapMatchingObjective):
    """'minilm': ``minilm_attn`` (`minilm_attention_loss`), the last student layer with its
    mapped teacher layer (the last one unless an explicit layer_map says otherwise)."""

    term = "minilm_attn"

    def _select_terms(self, method: MethodSpec) -> tuple[dict[str, float], list[tuple[int, int]]]:
        last = self.student_shape[0] - 1
        return {self.term: method.effective_attention_weight}, [(last, self.layer_map[-1])]

    def per_sequence(
        self, student: AttentionProbs, teacher: AttentionProbs, w_h: Tensor, valid: Tensor
    ) -> Tensor:
        return minilm_attention_loss(student, teacher, w_h, valid, self.query_chunk)


class SharpObjective(AttentionObjective):
    """'sharp': the hierarchical terms on rank-projected maps (see the module docstring).

    * decomposition 'hierarchical': 'sharp_layer', 'sharp_head', 'sharp_token',
      'sharp_residual', weights ``method.granularities``; see `sharp_distances`.
    * decomposition 'direct': 'sharp_direct' — per-head squared error of the whole projected
      maps (the sum of the four components' distances), normalised as above. It has no
      granularities, so like the single baseline terms its weight is
      ``method.attention_weight``.
    * with ``method.basis == 'learned'``: 'basis_loss', not in ``weights``. The module then
      has parameters: move it with ``.to(device)`` and give ``obj.parameters()`` to the
      optimizer (without weight decay; the parametrization keeps the basis orthonormal
      whatever the step).

    Head mapping is applied on the projected teacher maps: W_H·(P_t Q) = (W_H·P_t)·Q (linear),
    so the (B, H_t, N, N) → (B, H_s, N, N) mix is never formed. The rank is
    min(method.rank, N): a DCT basis for length N has at most N vectors (r = N is lossless).
    The DCT basis follows the actual sequence length of each batch; a learned basis is tied
    to ``seq_len``.
    """

    def _configure(self, method: MethodSpec) -> None:
        self.decomposition = method.decomposition
        self.normalization = method.normalization
        # 'auto' is the memory-safe path until the trainer resolves it for its device
        # (`sharp_core.train.memory.resolve_projection`, `Context.prepare`)
        self.projection = "chunked" if method.projection == "auto" else method.projection
        self.layer_distance = method.layer_distance
        self.rank = min(int(method.rank), self.seq_len)
        self.basis: LearnedBasis | None = None
        if method.basis == "learned":
            self.basis = LearnedBasis(self.seq_len, self.rank)

    def _select_terms(self, method: MethodSpec) -> tuple[dict[str, float], list[tuple[int, int]]]:
        if method.decomposition == "hierarchical":
            g = method.granularities
            weights = {f"sharp_{c}": float(getattr(g, c)) for c in COMPONENTS}
        else:
            weights = {"sharp_direct": float(method.effective_attention_weight)}
        return weights, list(enumerate(self.layer_map))

    def basis_matrix(self, n: int, device: torch.device) -> Tensor:
        """Q (n, r) with live gradient for a learned basis, the cached DCT basis otherwise."""
        if self.basis is not None:
            if n != self.seq_len:
                raise ValueError(
                    f"the learned basis is for sequences of length {self.seq_len}, got {n}"
                )
            return self.basis()
        return dct_basis(n, min(self.rank, n), device=device)

    def _no_terms(self) -> dict[str, Tensor]:
        # a zero that still reaches the basis' parameters, so the optimizer sees a gradient
        return {"basis_loss": self.basis().sum() * 0.0} if self.basis is not None else {}

    def _terms(
        self,
        student: Mapping[int, AttentionProbs],
        teacher: Mapping[int, AttentionProbs],
        valid: Tensor,
        w_h: Tensor,
        n: int,
    ) -> dict[str, Tensor]:
        q = self.basis_matrix(n, valid.device)  # (N, r), live for a learned basis
        q_d = q.detach()  # distillation terms must not train the basis (see LearnedBasis)
        terms = (
            ("direct",)
            if self.decomposition == "direct"
            else tuple(c for c in COMPONENTS if f"sharp_{c}" in self.weights)
        )
        learned = self.basis is not None
        sums: dict[str, Tensor] = {}
        basis_sum = None
        has_valid = valid.any(dim=1)  # (B,)
        kl_layer = self.layer_distance == "kl" and "layer" in terms
        if kl_layer:
            terms = tuple(t for t in terms if t != "layer")
        for js, jt in self.pairs:
            if kl_layer:
                mu_s = layer_profile(student[js], valid, self.query_chunk)  # (B, N)
                teacher_head_w = w_h[js].mean(dim=0)  # (H_t,): mean over student heads of W_H·P_t
                with torch.no_grad():
                    mu_t = layer_profile(teacher[jt], valid, self.query_chunk, teacher_head_w)
                kl = layer_profile_kl(mu_s, mu_t)  # (B,)
                sums["layer"] = kl if "layer" not in sums else sums["layer"] + kl
            if not terms and not learned:
                continue  # the KL layer term alone needs no projection
            pq_s = _project_any(student[js], q_d, self.query_chunk, self.projection)
            pq_t, g, e = _project_teacher(
                teacher[jt], q_d, self.query_chunk, w_h[js], valid, learned, self.projection
            )  # (B, H_s, N, r) each
            dists = (
                sharp_distances(pq_s, pq_t, valid, terms, self.normalization) if terms else {}
            )  # each (B,)
            for k, v in dists.items():
                sums[k] = v if k not in sums else sums[k] + v
            if learned:
                assert g is not None and e is not None
                # Value Σ‖P_t Q‖² = ⟨Q, G⟩ with G = P_tᵀ P_t Q, gradient 2G: written as
                # 2⟨Q, G⟩ − ⟨Q, G⟩.detach() so backward needs no (N, N) teacher matrix.
                lin = torch.einsum("nr,bnr->b", q.to(g.dtype), g)  # (B,)
                captured = 2.0 * lin - lin.detach()
                per_seq = torch.where(
                    has_valid, 1.0 - captured / e.clamp_min(_TINY), torch.zeros_like(lin)
                )
                basis_sum = per_seq if basis_sum is None else basis_sum + per_seq
        n_pairs = len(self.pairs)
        out = {f"sharp_{k}": v.sum() / n_pairs for k, v in sums.items()}
        if basis_sum is not None:
            out["basis_loss"] = basis_sum.sum() / n_pairs
        return out


#: The attention objective of each attention method (`sharp_core.methods.ATTENTION_METHODS`).
ATTENTION_OBJECTIVES: dict[str, type[AttentionObjective]] = {
    "tinybert": TinyBertObjective,
    "minilm": MiniLMObjective,
    "sharp": SharpObjective,
}


def make_attention_objective(
    method: MethodSpec,
    *,
    student_shape: tuple[int, int],
    teacher_shape: tuple[int, int],
    seq_len: int,
    maps: AlignmentMaps | None = None,
) -> AttentionObjective:
    """The attention objective of ``method`` (one of ``ATTENTION_OBJECTIVES``).

    ``student_shape`` / ``teacher_shape`` are (layers, heads) (`sharp_core.models.loading.
    model_shape`), ``seq_len`` the training sequence length (a learned basis is tied to it).
    ``maps``: the layer and head maps when they are known exactly (a student pruned from this
    teacher); the spec's ``layer_map`` / ``head_map`` still override them.
    A method without attention terms ('kd', 'sft', …): ValueError.
    """
    cls = ATTENTION_OBJECTIVES.get(method.name)
    if cls is None:
        raise ValueError(
            f"attention objectives exist for methods {', '.join(ATTENTION_OBJECTIVES)}, "
            f"not {method.name!r}"
        )
    return cls(
        method,
        student_shape=student_shape,
        teacher_shape=teacher_shape,
        seq_len=seq_len,
        maps=maps,
    )
