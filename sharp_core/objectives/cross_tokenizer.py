"""Distillation across tokenizers: ULD and GOLD's hybrid, with positions aligned on the text.

Why: a teacher and a student from different families do not share token ids, so the
per-token divergences of `sharp_core.objectives.losses` have nothing to compare. Two answers:

- **ULD** (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss"): the Wasserstein-1 distance between the two next-token distributions
  when the vocabularies are matched by rank, which for sorted probability vectors is the L1
  distance between them, Σ_i |p_T^(i) − q_S^(i)| (the shorter vector padded with zeros).
  It needs no token correspondence at all.
- **GOLD** (TRL's GOLD trainer, its "hybrid ULD"): tokens whose strings exist in both
  vocabularies are compared exactly, here with forward KL Σ_{v∈M} p_T(v)·log(p_T(v)/q_S(m(v)))
  on the shared set M, and ULD's sorted L1 on the rest; weighted |M|/V_T and 1 − |M|/V_T.
  With identical tokenizers M is everything and GOLD *is* forward KL.

Positions are aligned on the text (`align`): the student's prediction at i (of its token
i+1) is compared with the teacher's prediction at j (of its token j+1) when both tokens
start at the same character offset, so both distributions answer "what comes next after the
same text". Positions where the tokenisations disagree are left to the CE term.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "CrossTokenizer",
    "Aligned",
    "FusedCrossLoss",
    "align",
    "check_cross_parity",
    "chunked_divergence",
    "fused_cross_objective",
    "gold_loss",
    "shared_vocabulary",
    "token_bytes",
    "uld_loss",
]


# ------------------------------------------------------------------------------- losses
def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row Σ_i |sort(p)_i − sort(q)_i|, both sorted descending, the shorter padded with
    zeros. p (M, Vp), q (M, Vq) → (M,)."""
    ps = p.sort(dim=-1, descending=True).values
    qs = q.sort(dim=-1, descending=True).values
    V = max(ps.shape[-1], qs.shape[-1])
    ps = F.pad(ps, (0, V - ps.shape[-1]))
    qs = F.pad(qs, (0, V - qs.shape[-1]))
    return (ps - qs).abs().sum(-1)


def uld_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """ULD per aligned position (M,): L1 between the sorted softmaxes at temperature τ.

    student_logits (M, V_S), teacher_logits (M, V_T); float32 softmax. 0 when the two sorted
    vectors are equal (e.g. one is a permutation of the other), at most 2.
    """
    q = torch.softmax(student_logits.float() / temperature, dim=-1)
    p = torch.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return _sorted_l1(p, q)


def gold_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """GOLD's hybrid per aligned position (M,).

    ``teacher_ids`` / ``student_ids`` (K,): the shared vocabulary, teacher token
    ``teacher_ids[k]`` being student token ``student_ids[k]`` (`shared_vocabulary`).
    Matched part: forward KL restricted to the shared tokens, Σ_k p(t_k)(log p(t_k) −
    log q(s_k)), on the full softmaxes (not renormalised). Unmatched part: ULD between the
    teacher's probabilities outside the shared set and the student's outside it. Weights:
    K/V_T and 1 − K/V_T (TRL's default).
    """
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    p = logp.exp()
    Vt, Vs = logp.shape[-1], logq.shape[-1]
    K = teacher_ids.numel()
    w = K / Vt
    matched = (p[:, teacher_ids] * (logp[:, teacher_ids] - logq[:, student_ids])).sum(-1)
    if Vt == K and Vs == K:
        return matched
    t_rest = torch.ones(Vt, dtype=torch.bool, device=p.device)
    t_rest[teacher_ids] = False
    s_rest = torch.ones(Vs, dtype=torch.bool, device=p.device)
    s_rest[student_ids] = False
    unmatched = _sorted_l1(p[:, t_rest], logq.exp()[:, s_rest])
    return w * matched + (1 - w) * unmatched


def _rows_per_chunk(chunk: int | None, vocab: int) -> int:
    """``chunk``, or the rows of a float32 chunk of ``vocab`` columns within 256 MiB."""
    return chunk if chunk is not None else max(1, 2**28 // (4 * vocab))


class _Chunked(torch.autograd.Function):
    """Σ over aligned positions of a per-row divergence, a chunk of rows at a time: each
    chunk's float32 work (softmaxes, sorts, their indices) and its gradient are computed and
    freed before the next, the gradient written into one buffer shaped as the student's
    logits (the design of `sharp_core.objectives.losses`). Differentiable once."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_flat: torch.Tensor,
        t_flat: torch.Tensor,
        s_idx: torch.Tensor,
        t_idx: torch.Tensor,
        cols: tuple[int, int],
        fn: Any,
        chunk: int,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad[0]
        grad = torch.zeros_like(s_flat) if needs else None  # (B·N, V_S')
        total = torch.zeros((), dtype=torch.float32, device=s_flat.device)
        for i in range(0, s_idx.numel(), chunk):
            si, ti = s_idx[i : i + chunk], t_idx[i : i + chunk]
            rows = s_flat.index_select(0, si)[:, : cols[0]].float()  # (C, V_S)
            t_rows = t_flat.index_select(0, ti)[:, : cols[1]].float()  # (C, V_T)
            with torch.enable_grad():
                rows.requires_grad_(needs)
                d = fn(rows, t_rows).sum()
            if grad is not None:
                (g,) = torch.autograd.grad(d, rows)
                grad[si, : cols[0]] = g.to(grad.dtype)  # each student position aligns once
            total += d.detach()
        ctx.save_for_backward(grad if grad is not None else s_flat.new_zeros(0))
        return total

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * go.to(grad.dtype) if grad.numel() else None,) + (None,) * 6


def chunked_divergence(
    fn: Any,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_pos: torch.Tensor,
    teacher_pos: torch.Tensor,
    vocab: tuple[int, int],
    chunk: int | None = None,
) -> torch.Tensor:
    """Σ_m fn(student row s_m, teacher row t_m) over the aligned positions, without the
    (M, V) float32 copies of every aligned row that the dense form holds (several of them,
    kept for the backward pass: at a 128k vocabulary, tens of GB; docs/planning.md).

    student_logits (B, N, V_S'), teacher_logits (B, T, V_T'): the models' logits (rows past
    the tokenizers, ``vocab`` = (V_S, V_T), are cut per chunk, never copied whole);
    student_pos / teacher_pos (M,): flat positions b·N + i and b·T + j. ``chunk``: rows per
    chunk (default: a float32 chunk of the larger vocabulary within 256 MiB). Same value
    and gradient as ``fn(s[student_pos], t[teacher_pos]).sum()``."""
    V = max(vocab)
    step = _rows_per_chunk(chunk, V)
    s_flat = student_logits.reshape(-1, student_logits.shape[-1])
    t_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    return _Chunked.apply(s_flat, t_flat, student_pos, teacher_pos, vocab, fn, step)


# ------------------------------------------------------------------------- vocabularies
def shared_vocabulary(teacher: Any, student: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ids, student ids) of the token strings both vocabularies have (sorted by
    teacher id). Byte-level BPE token strings are byte sequences, so equal strings are equal
    bytes."""
    tv, sv = teacher.get_vocab(), student.get_vocab()
    pairs = sorted(
        (tid, sv[s])
        for s, tid in tv.items()
        if s in sv and tid < len(teacher) and sv[s] < len(student)
    )
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    t, s = zip(*pairs, strict=True)
    return torch.tensor(t, dtype=torch.long), torch.tensor(s, dtype=torch.long)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTES = _byte_decoder()


def _is_byte_level(tok: Any) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    return type(dec).__name__ == "ByteLevel" or "ByteLevel" in repr(dec)


def token_bytes(tok: Any, ids: list[int]) -> list[bytes]:
    """The bytes each token stands for: exact for byte-level BPE (its alphabet maps back to
    bytes; special tokens are their text), else each token decoded alone."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    if _is_byte_level(tok):
        out = []
        for i, t in zip(ids, tok.convert_ids_to_tokens(ids), strict=True):
            if i in special or t is None or any(c not in _BYTES for c in t):
                out.append(tok.decode([i]).encode("utf-8"))
            else:
                out.append(bytes(_BYTES[c] for c in t))
        return out
    return [tok.decode([i]).encode("utf-8") for i in ids]


# ---------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Aligned:
    """One row: the teacher's ids for the row's text, and the aligned prediction positions
    (student position i predicts its token i+1; teacher position j its token j+1)."""

    teacher_ids: list[int]
    student_pos: list[int]
    teacher_pos: list[int]

    def where(self, target: list[bool]) -> Aligned:
        """The pairs whose student prediction is of a target: ``target`` (N-1 flags), True
        where the student's position i predicts a token that carries loss."""
        pairs = [(i, j) for i, j in zip(self.student_pos, self.teacher_pos, strict=True)]
        kept = [(i, j) for i, j in pairs if target[i]]
        return Aligned(self.teacher_ids, [i for i, _ in kept], [j for _, j in kept])


def _complete_utf8(data: bytes) -> tuple[int, int]:
    """(start, end) of the longest slice of `data` that starts and ends on character
    boundaries: a row of tokens may begin or end inside a multi-byte character."""
    start = 0
    while start < len(data) and start < 3 and 0x80 <= data[start] < 0xC0:
        start += 1
    end = len(data)
    for back in range(1, min(4, end - start) + 1):
        b = data[end - back]
        if b < 0x80:
            break
        if b >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                end -= back
            break
    return start, end


def align(
    student_ids: list[int], student: Any, teacher: Any, max_len: int | None = None
) -> Aligned:
    """The row's text (the student tokens' bytes), re-tokenised by the teacher; positions
    pair up where both next tokens start at the same offset of the text.

    Offsets are in bytes, so that byte-level tokens that split a multi-byte character (BPE
    does) line up too: the student's from its tokens' bytes, the teacher's from its own
    tokens' bytes (byte-level BPE) or from its character offsets (other tokenizers, whose
    tokens do not split characters). A partial character at either end of the row is left
    out of the text (its tokens pair with nothing)."""
    pieces = token_bytes(student, student_ids)
    data = b"".join(pieces)
    lo, hi = _complete_utf8(data)
    text = data[lo:hi].decode("utf-8", errors="replace")
    s_start, pos = [], 0
    for piece in pieces:
        s_start.append(pos - lo)
        pos += len(piece)
    enc = teacher(text, add_special_tokens=False, return_offsets_mapping=True)
    t_ids = list(enc["input_ids"])
    if _is_byte_level(teacher):
        t_start, pos = [], 0
        for piece in token_bytes(teacher, t_ids):
            t_start.append(pos)
            pos += len(piece)
    else:
        byte_at = [0]
        for ch in text:
            byte_at.append(byte_at[-1] + len(ch.encode("utf-8")))
        t_start = [byte_at[a] for a, _ in enc["offset_mapping"]]
    if max_len is not None:
        t_ids, t_start = t_ids[:max_len], t_start[:max_len]
    where: dict[int, int] = {}
    for j, c in enumerate(t_start):
        where.setdefault(c, j)  # the first teacher token at each offset
    sp, tp = [], []
    for i in range(len(student_ids) - 1):
        j1 = where.get(s_start[i + 1])
        # the teacher's token j1 starts where the student's token i+1 does: the teacher's
        # prediction of it is made at j1 - 1, after the same text
        if j1 is not None and j1 >= 1 and 0 < s_start[i + 1] < hi - lo:
            sp.append(i)
            tp.append(j1 - 1)
    return Aligned(t_ids, sp, tp)


def _segments(
    n: int, positions: list[int] | None, keep: list[bool] | None
) -> list[tuple[int, int]]:
    """[start, end) of each run of kept tokens of a row, cut again where a document starts
    (position 0): the pieces of text that are re-tokenised alone."""
    out: list[tuple[int, int]] = []
    start = None
    for i in range(n + 1):
        kept = i < n and (keep is None or keep[i])
        new_doc = kept and positions is not None and positions[i] == 0
        if start is not None and (not kept or new_doc):
            out.append((start, i))
            start = None
        if kept and start is None:
            start = i
    return out


@dataclass
class CrossTokenizer:
    """What a cross-tokenizer step needs: both tokenizers and the shared vocabulary."""

    mode: str  # "uld" | "gold"
    student: Any
    teacher: Any
    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    teacher_max_len: int | None = None

    @classmethod
    def build(cls, mode: str, student: Any, teacher: Any, max_len: int | None) -> CrossTokenizer:
        t, s = shared_vocabulary(teacher, student)
        return cls(mode, student, teacher, t, s, max_len)

    def teacher_batch(
        self,
        x: torch.Tensor,
        pad_id: int,
        *,
        position_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[Aligned]]:
        """Teacher input ids (B, T) right-padded, their attention mask, their positions
        (None without ``position_ids``) and each row's alignment (row-level positions), for
        student blocks x (B, N).

        A row's documents (``position_ids`` (B, N) restarting at 0: packed documents) and its
        kept tokens (``keep`` (B, N) False on padding) are re-tokenised one document at a
        time, and the teacher gets its own positions restarting with each (the caller builds
        the block-diagonal mask from them, as for the student): neither model reads across a
        document. Without them a row is one text, as before."""
        pos = position_ids.cpu() if position_ids is not None else None
        kept = keep.cpu().bool() if keep is not None else None
        rows, t_pos = [], []
        for b in range(x.shape[0]):
            ids = x[b].tolist()
            ids_b: list[int] = []
            pos_b: list[int] = []
            sp: list[int] = []
            tp: list[int] = []
            for s, e in _segments(
                len(ids),
                None if pos is None else pos[b].tolist(),
                None if kept is None else kept[b].tolist(),
            ):
                a = align(ids[s:e], self.student, self.teacher, self.teacher_max_len)
                off = len(ids_b)
                sp += [s + i for i in a.student_pos]
                tp += [off + j for j in a.teacher_pos]
                ids_b += a.teacher_ids
                pos_b += list(range(len(a.teacher_ids)))
            rows.append(Aligned(ids_b, sp, tp))
            t_pos.append(pos_b)
        T = max(1, max(len(a.teacher_ids) for a in rows))
        t_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        positions = torch.zeros((len(rows), T), dtype=torch.long)  # padding: a 0-length doc each
        for b, a in enumerate(rows):
            n = len(a.teacher_ids)
            t_ids[b, :n] = torch.tensor(a.teacher_ids, dtype=torch.long)
            mask[b, :n] = 1
            positions[b, :n] = torch.tensor(t_pos[b], dtype=torch.long)
        dev = x.device
        t_positions = None if pos is None else positions.to(dev)
        return t_ids.to(dev), mask.to(dev), t_positions, rows

    def divergence(
        self, s_rows: torch.Tensor, t_rows: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Per aligned position (M,): ULD or GOLD."""
        if self.mode == "uld":
            return uld_loss(s_rows, t_rows, temperature)
        dev = s_rows.device
        return gold_loss(
            s_rows, t_rows, self.teacher_ids.to(dev), self.student_ids.to(dev), temperature
        )

    def total(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        rows: list[Aligned],
        vocab: int,
        temperature: float,
        chunk: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """(Σ of ULD or GOLD over the aligned positions of a micro-batch, how many), chunked
        (`chunked_divergence`). student_logits (B, N, V_S'), teacher_logits (B, T, V_T')."""
        N, T = student_logits.shape[1], teacher_logits.shape[1]
        s_pos = [b * N + i for b, r in enumerate(rows) for i in r.student_pos]
        t_pos = [b * T + j for b, r in enumerate(rows) for j in r.teacher_pos]
        dev = student_logits.device
        fn = functools.partial(self.divergence, temperature=temperature)
        total = chunked_divergence(
            fn,
            student_logits,
            teacher_logits,
            torch.tensor(s_pos, dtype=torch.long, device=dev),
            torch.tensor(t_pos, dtype=torch.long, device=dev),
            (vocab, len(self.teacher)),
            chunk,
        )
        return total, len(s_pos)


# ------------------------------------------------------------------ fused (no whole logits)
def fused_cross_objective(
    ct: CrossTokenizer,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    aligned: list[Aligned],
    *,
    kd_weight: float,
    temperature: float,
    targets: int,
    n_tokens: int,
    vocab: int,
    chunk: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(loss, ce, kd, aligned positions): the dense cross-tokenizer term of
    `sharp_core.train.step._cross_step` from the models' last hidden states and heads, a
    chunk of target rows at a time (`sharp_core.objectives.fused.linear_chunked`), so neither
    model's (B, N, V) logits nor a (B·N, V) gradient buffer ever exist.

    Shapes: ``student_hidden`` (B, N-1, D_S) aligned with ``labels`` (B, N-1) (masked
    targets -100), ``teacher_hidden`` (B, T, D_T) (the teacher's whole rows), weights
    (V_S', D_S) and (V_T', D_T), sliced to ``vocab`` and the teacher tokenizer's length.
    ``aligned``: each row's aligned pairs, already limited to the targets. Per chunk: CE per
    row with its closed-form gradient; for the chunk's aligned rows the teacher's logits of
    those rows only and ULD / GOLD with its gradient by autograd on the (k, V_S) slice. D is
    scaled per row by targets / n_aligned so that, divided by ``n_tokens``, it is the dense
    kd = Σ D / n_aligned · (targets / n_tokens). ``chunk``: target rows per chunk (default
    the dense divergence's, a float32 chunk of the larger vocabulary within 256 MiB).
    ``student_softcap`` / ``teacher_softcap``: the heads' logit soft-caps (`fused.Head.softcap`),
    applied as the models' forwards apply them (`fused.softcapped`, `fused.softcap_logits`)."""
    from sharp_core.objectives import fused, losses

    a = float(kd_weight)
    V_S, V_T = vocab, len(ct.teacher)
    B, N1 = labels.shape
    T = teacher_hidden.shape[1]
    y = labels.reshape(-1)
    rows = (y != losses.IGNORE_INDEX).nonzero().squeeze(1)  # (R,), one host sync
    hs = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)  # (R, D_S)
    yv = y.index_select(0, rows)  # (R,)
    ws = student_weight[:V_S]
    bs = None if student_bias is None else student_bias[:V_S]
    # aligned pairs as (row index among the targets, teacher flat position), by row index
    where = {r: k for k, r in enumerate(rows.tolist())}
    pairs = sorted(
        (where[b * N1 + i], b * T + j)
        for b, r in enumerate(aligned)
        for i, j in zip(r.student_pos, r.teacher_pos, strict=True)
    )  # KeyError here: an aligned position that is not a target (the caller filters them)
    n_aligned = len(pairs)
    use_kd = a > 0 and n_aligned > 0
    scale = targets / max(1, n_aligned)
    dev = hs.device
    a_rows = [p[0] for p in pairs]  # host, for the chunks
    a_dev = torch.tensor(a_rows, dtype=torch.long, device=dev)
    t_pos = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dev)
    wt = teacher_weight.detach()[:V_T]
    bt = None if teacher_bias is None else teacher_bias.detach()[:V_T]
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # (B·T, D_T)
    step = _rows_per_chunk(chunk, max(V_S, V_T))
    div = functools.partial(ct.divergence, temperature=temperature)

    def chunk_fn(s: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # CE rows: g = (1 − a)·(softmax(s) − e_y), closed form, no graph
        ce, d, g = losses.objective_rows(
            s, None, yv[sl], divergence_rows=None, closed_form=True, kd_weight=a,
            temperature=1.0,
        )  # fmt: skip
        if not use_kd:
            return ce, d, g
        lo, hi = bisect.bisect_left(a_rows, sl.start), bisect.bisect_left(a_rows, sl.stop)
        if hi == lo:
            return ce, d, g
        local = a_dev[lo:hi] - sl.start  # (k,) the chunk's aligned rows
        # the teacher's logits of those rows only, in its dtype (as its lm_head), then float32
        ti = ht.index_select(0, t_pos[lo:hi])
        t_rows = fused.softcap_logits(F.linear(ti.to(wt.dtype), wt, bt), teacher_softcap).float()
        with torch.enable_grad():
            x = s.index_select(0, local).detach().requires_grad_(True)  # (k, V_S)
            dk = div(x, t_rows)  # (k,)
            (gd,) = torch.autograd.grad(dk.sum(), x)
        d = d.index_add(0, local, dk.detach() * scale)
        g.index_add_(0, local, gd.mul_(a * scale))
        return ce, d, g

    if not torch.is_grad_enabled():
        hs, ws = hs.detach(), ws.detach()
        bs = None if bs is None else bs.detach()
    lp = fused._autocast_dtype(hs)
    if lp is not None:  # the head's matmuls as autocast runs F.linear (gradients flow back)
        hs, ws = hs.to(lp), ws.to(lp)
        bs = None if bs is None else bs.to(lp)
    loss, ce, kd = fused.linear_chunked(
        hs, ws, bs, fused.softcapped(chunk_fn, student_softcap), kd_weight=a, denom=float(max(n_tokens, 1)),
        chunk=step,
    )  # fmt: skip
    return loss, ce, kd, n_aligned


class FusedCrossLoss(Protocol):
    """The fused cross-tokenizer term as the trainer calls it: `fused_cross_objective`'s
    signature. `sharp_core.train.setup.Setup.fused_cross` holds one (None: that function), so
    a test can hand the step a wrong one to see `check_cross_parity` fail."""

    def __call__(
        self,
        ct: CrossTokenizer,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor,
        aligned: list[Aligned],
        *,
        kd_weight: float,
        temperature: float,
        targets: int,
        n_tokens: int,
        vocab: int,
        chunk: int | None = ...,
        student_bias: torch.Tensor | None = ...,
        teacher_bias: torch.Tensor | None = ...,
        student_softcap: float | None = ...,
        teacher_softcap: float | None = ...,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]: ...


def _rel_or_zero(got: torch.Tensor | None, want: torch.Tensor | None, like: torch.Tensor) -> float:
    """`fused._rel` where a side gave no gradient (None: zero) or there is none to compare
    (no target rows: an empty one)."""
    from sharp_core.objectives import fused

    if (got is None and want is None) or like.numel() == 0:
        return 0.0
    return fused._rel(
        torch.zeros_like(like) if got is None else got,
        torch.zeros_like(like) if want is None else want,
    )


def check_cross_parity(
    kernel: FusedCrossLoss,
    ct: CrossTokenizer,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    aligned: list[Aligned],
    *,
    kd_weight: float,
    temperature: float,
    vocab: int,
    chunk: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    tokens: int | None = None,
    rtol: float | None = None,
) -> dict[str, float]:
    """Compare the fused cross-tokenizer ``kernel`` with the dense form on the micro-batch's
    first target rows (row-major, at most ``tokens``, default `fused.PARITY_TOKENS` within
    `fused.PARITY_BYTES` of float32 logits of the larger vocabulary: 65 rows at a 128k
    teacher) and their aligned pairs: the loss and its gradients w.r.t. the student's hidden
    states and head weight. The dense reference projects the same detached rows through both
    heads whole (soft-capped as the models' forwards cap them, biases included; the student's
    matmul in the kernel's dtype, autocast's as the dense forward's lm_head, and row chunks)
    and takes `losses.cross_entropy` and `CrossTokenizer.total`, as `_cross_step`'s dense
    path does. No target rows: both sides are 0 (errors 0).

    Shapes and arguments as `fused_cross_objective`'s; the rows are gathered into one row of
    targets (and the paired teacher rows into one teacher row), which both sides see as a
    micro-batch of their own (kd over its aligned pairs, CE over its targets). Raises
    `sharp_core.errors.LossParityError` (code ``loss_parity``, both values in the message)
    beyond ``rtol`` (default `fused.parity_rtol`); returns the relative errors otherwise.
    Works on detached copies: the training graph and the parameters' ``.grad`` are not
    touched."""
    from sharp_core.objectives import fused, losses

    V_S, V_T = vocab, len(ct.teacher)
    budget = fused.PARITY_BYTES // (4 * max(V_S, V_T))
    n_max = max(16, min(fused.PARITY_TOKENS if tokens is None else tokens, budget))
    N1, T = labels.shape[1], teacher_hidden.shape[1]
    y = labels.reshape(-1)
    flat = (y != losses.IGNORE_INDEX).nonzero().squeeze(1)[:n_max]  # (R,) the first targets
    R = flat.numel()
    where = {p: k for k, p in enumerate(flat.tolist())}
    pairs = sorted(
        (where[b * N1 + i], b * T + j)
        for b, r in enumerate(aligned)
        for i, j in zip(r.student_pos, r.teacher_pos, strict=True)
        if b * N1 + i in where
    )  # (target row among the R, teacher flat position)
    k = len(pairs)
    rows = [Aligned([], [p[0] for p in pairs], list(range(k)))]
    dev = student_hidden.device
    t_idx = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dev)
    hs = student_hidden.detach().reshape(-1, student_hidden.shape[-1]).index_select(0, flat)
    hs.requires_grad_(True)  # (R, D_S), a copy
    ws = student_weight.detach().requires_grad_(True)  # a new leaf on the head's storage
    bs = None if student_bias is None else student_bias.detach()
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, t_idx)
    wt = teacher_weight.detach()[:V_T]
    bt = None if teacher_bias is None else teacher_bias.detach()[:V_T]
    yc = y.index_select(0, flat)[None]  # (1, R)
    nv = max(1, R)
    a = float(kd_weight)
    with torch.enable_grad():
        got, _, _, _ = kernel(
            ct, hs[None], ws, ht[None], wt, yc, rows, kd_weight=a, temperature=temperature,
            targets=R, n_tokens=nv, vocab=V_S, chunk=chunk, student_bias=bs, teacher_bias=bt,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        )  # fmt: skip
        g_h, g_w = torch.autograd.grad(got, (hs, ws), allow_unused=True)
        # the student's head in the dtype the kernel's and the dense path's matmuls run in
        # (autocast's, as the dense forward's lm_head), over the kernel's row chunks (the
        # same GEMM shapes), then float32, capped there as the kernel caps: ULD's gradient is
        # a sign of sorted differences, so logits rounded otherwise (a float32 reference
        # against bf16 autocast) flip signs and refuse a right kernel (measured on CPU bf16:
        # grads 3.5e-2 plain, 1.2e-1 capped, against 3e-2)
        cd = fused._autocast_dtype(hs) or torch.promote_types(hs.dtype, ws.dtype)
        step = _rows_per_chunk(chunk, max(V_S, V_T))
        with torch.autocast(dev.type, enabled=False):
            wc, bc = ws[:V_S].to(cd), None if bs is None else bs[:V_S].to(cd)
            hc = hs.to(cd)
            s = torch.cat([F.linear(hc[i : i + step], wc, bc) for i in range(0, max(R, 1), step)])
            s = fused.softcap_logits(s.float(), student_softcap)[None]  # (1, R, V_S)
            want = (1 - a) * losses.cross_entropy(s, yc, num_valid=nv)
            if a > 0 and k:
                t = fused.softcap_logits(F.linear(ht.to(wt.dtype), wt, bt), teacher_softcap)
                total, _ = ct.total(s, t.float()[None], rows, V_S, temperature, chunk)
                want = want + a * total / k  # kd = Σ D / aligned · (targets / n_tokens = 1)
        r_h, r_w = torch.autograd.grad(want, (hs, ws), allow_unused=True)
    tol = fused.parity_rtol(student_hidden, teacher_weight, a) if rtol is None else rtol
    errs = {
        "loss": abs(got.item() - want.item()) / max(abs(want.item()), 1e-12),
        "grad_hidden": _rel_or_zero(g_h, r_h, hs),
        "grad_weight": _rel_or_zero(g_w, r_w, ws),
    }
    return fused.parity_verdict(
        errs, tol, f"the fused cross-tokenizer logit term disagrees with the dense one on the "
        f"first micro-batch ({R} target rows, {k} aligned): fused loss {got.item():.8g}, dense "
        f"loss {want.item():.8g}", "spec.method.cross_tokenizer",
    )  # fmt: skip
