"""The fused logit paths under bf16 autocast, as a GPU step runs them (amp_dtype=bfloat16),
on the CPU: the cross-tokenizer step (`fused_cross_objective`) and soft-capped heads
(Gemma-2's ``final_logit_softcapping``), against the dense paths and float32.

CPU autocast runs the GEMMs (linear / matmul) in bf16 as CUDA's does; its list of ops kept
in float32 differs from CUDA's, which the loss code does not rely on (it runs with autocast
off and upcasts itself), so the numerics are checked here. Time and memory on the card are
docs/performance.md's (Remaining proposals, item 8).

Tolerances, from bf16's unit roundoff u = 2⁻⁸ ≈ 3.9e-3 (8 significant bits):

- **Kernels, inputs given** (the sharp tests): the fused kernel against a dense reference that
  rounds the student's logits as the kernel's bf16 head GEMM does and computes every other op
  in float32 (the teacher's logits and cap in the teacher's dtype, as its forward). Values
  within 1e-5 (float32 summation order; measured ≤ 2e-7); a single loss op in bf16 (softmax,
  tanh, the cap, a bf16 teacher chunk where the teacher is float32), injected, moved them by
  5e-5 to 1e-3.
  Gradients: both round the logits' gradient to bf16 before the backward GEMMs and their
  outputs to bf16, the kernel per chunk of rows (the weight's chunks summed in float32), the
  reference once; each rounding is within u of its value and chunk sums can cancel: 4u of the
  largest entry (measured ≤ 7.4e-3).
- **Steps** (both models' bf16 forwards, student gradients through the whole backbone): the
  values within u/2 of float32 on the fused path (it keeps every loss op in float32; what is
  left is the backbone's and the head GEMM's rounding) and 2u on the dense path (which also
  caps and takes a float32 teacher's logits in bf16); fused against dense within 2u.
  Gradients norm-wise over every student parameter, ‖g − g_ref‖ / ‖g_ref‖: each bf16 GEMM of
  the backbone rounds its output at u and a gradient passes through a handful of them forward
  and back, so 8u for the smooth objectives (GOLD, the same-vocabulary divergences).
  ULD is not smooth: its sorted L1 has gradient sign(p₍ᵢ₎ − q₍ᵢ₎) per rank, which flips
  wherever two sorted probabilities lie within a rounding of each other, so bf16 moves its
  gradient by far more than u (measured to 0.12 on the dense path with capped, tied heads):
  there the fused path is held to the dense path's own error (× 1.5), not to 8u.

Measured on the 2-vCPU VM (torch 2.13.0+cpu): see docs/performance.md, "Remaining proposals".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sharp_core.errors import LossParityError
from sharp_core.models.loading import train_bpe_tokenizer
from sharp_core.objectives import fused, losses
from sharp_core.objectives.cross_tokenizer import Aligned, CrossTokenizer, fused_cross_objective
from tests.test_cross_tokenizer import TEXT, _cross_setup, _packed_chat_batch
from tests.test_fused_loss import METHODS, _tiny_setup

U = 2.0**-8  # bf16's unit roundoff
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def toks():
    return train_bpe_tokenizer(TEXT, 320), train_bpe_tokenizer(TEXT, 270)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest entry's error over the largest entry."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _norm_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


# ------------------------------------------------------------ kernels, inputs given


def _head(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dt: torch.dtype):
    """h·Wᵀ + b as the fused kernels' GEMM makes it: in ``dt`` (bf16: autocast's for the
    student, the weight's own for the teacher), output in ``dt``."""
    with torch.autocast("cpu", enabled=False):
        return F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt))


CROSS_CASES = [  # mode, student cap, teacher cap, teacher dtype, τ
    ("uld", None, None, torch.float32, 1.0),
    ("gold", None, None, torch.float32, 2.0),
    ("gold", 3.0, None, torch.float32, 1.0),
    ("uld", None, 8.0, torch.float32, 1.0),
    ("gold", 3.0, 8.0, torch.float32, 1.0),
    ("gold", 3.0, 4.0, BF16, 2.0),
    ("uld", 3.0, 4.0, BF16, 1.0),
]


@pytest.mark.parametrize(("mode", "s_cap", "t_cap", "t_dtype", "tau"), CROSS_CASES)
def test_fused_cross_objective_under_autocast_keeps_the_loss_in_float32(
    toks, mode, s_cap, t_cap, t_dtype, tau
) -> None:
    """`fused_cross_objective` under CPU bf16 autocast against the dense cross loss on the
    logits its bf16 head GEMM makes, everything after it float32 (the student's cap on the
    upcast, the teacher's logits and cap in its dtype): loss, ce, kd within 1e-5, the
    gradients w.r.t. hidden states and head within 4u (module docstring)."""
    s_tok, t_tok = toks
    ct = CrossTokenizer.build(mode, s_tok, t_tok, 256)
    Vs, Vt = len(s_tok), len(t_tok)
    g = torch.Generator().manual_seed(3)
    B, N1, T, Ds, Dt = 2, 19, 23, 48, 40
    hs = torch.randn(B, N1, Ds, generator=g).requires_grad_(True)
    ws = (torch.randn(Vs + 5, Ds, generator=g) * 0.9).requires_grad_(True)  # logits std ≈ 6
    ht = torch.randn(B, T, Dt, generator=g)
    wt = (torch.randn(Vt + 3, Dt, generator=g) * 0.9).to(t_dtype)
    labels = torch.randint(0, Vs, (B, N1), generator=g)
    labels[0, :4] = losses.IGNORE_INDEX
    aligned = []  # every third target aligned with a teacher position
    for b in range(B):
        sp = [i for i in range(N1) if labels[b, i] != losses.IGNORE_INDEX and i % 3 != 1]
        aligned.append(Aligned([], sp, [min(T - 1, i + b) for i in sp]))
    targets = int((labels != losses.IGNORE_INDEX).sum())
    n_tokens, a = targets + 6, 0.7
    with torch.autocast("cpu", dtype=BF16):
        loss, ce, kd, n_al = fused_cross_objective(
            ct, hs, ws, ht, wt, labels, aligned, kd_weight=a, temperature=tau,
            targets=targets, n_tokens=n_tokens, vocab=Vs, chunk=5,
            student_softcap=s_cap, teacher_softcap=t_cap,
        )  # fmt: skip
    g_h, g_w = torch.autograd.grad(loss, (hs, ws))
    # the reference: bf16 student logits, float32 from there on
    s = fused.softcap_logits(_head(hs, ws[:Vs], None, BF16).float(), s_cap)
    t = fused.softcap_logits(_head(ht, wt[:Vt], None, t_dtype), t_cap).float()
    ref_ce = losses.cross_entropy(s, labels, num_valid=n_tokens)
    si = torch.tensor([b * N1 + i for b, r in enumerate(aligned) for i in r.student_pos])
    tj = torch.tensor([b * T + j for b, r in enumerate(aligned) for j in r.teacher_pos])
    d = ct.divergence(s.reshape(-1, Vs)[si], t.reshape(-1, Vt)[tj], tau).sum()
    ref_kd = d / si.numel() * (targets / n_tokens)
    ref = (1 - a) * ref_ce + a * ref_kd
    r_h, r_w = torch.autograd.grad(ref, (hs, ws))
    assert n_al == si.numel() > 10
    for got, want in ((loss, ref), (ce, ref_ce), (kd, ref_kd)):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert g_h.dtype == g_w.dtype == torch.float32
    assert _rel(g_h, r_h) <= 4 * U and _rel(g_w, r_w) <= 4 * U, (_rel(g_h, r_h), _rel(g_w, r_w))


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize(
    ("s_cap", "t_cap", "t_dtype"),
    [(3.0, None, torch.float32), (None, 4.0, torch.float32), (3.0, 4.0, BF16)],
)
def test_fused_softcap_under_autocast_keeps_the_loss_in_float32(name, s_cap, t_cap, t_dtype):
    """The same-vocabulary kernel with soft-capped heads under CPU bf16 autocast, against the
    dense loss on its bf16 head GEMM's logits, capped in float32 (student) and in the
    teacher's dtype (teacher): values within 1e-5, gradients within 4u."""
    g = torch.Generator().manual_seed(4)
    B, N, Ds, Dt, V = 2, 11, 48, 40, 300
    hs = torch.randn(B, N, Ds, generator=g).requires_grad_(True)
    ws = (torch.randn(V, Ds, generator=g) * 0.9).requires_grad_(True)
    bs = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    ht = torch.randn(B, N, Dt, generator=g)
    wt = (torch.randn(V + 4, Dt, generator=g) * 0.9).to(t_dtype)
    y = torch.randint(0, V, (B, N), generator=g)
    y[1, -3:] = losses.IGNORE_INDEX
    kw: dict[str, Any] = dict(kd_weight=0.6, temperature=2.0, alpha=0.1, beta=0.3, num_valid=25)
    caps = fused.softcap_kwargs(s_cap, t_cap)
    with torch.autocast("cpu", dtype=BF16):
        loss, ce, d = fused.fused_linear_objective(
            name, hs, ws, ht, wt, y, chunk_size=4, vocab=V, student_bias=bs, **kw, **caps
        )
    s = fused.softcap_logits(_head(hs, ws, bs, BF16).float(), s_cap)
    t = fused.softcap_logits(_head(ht, wt[:V], None, t_dtype), t_cap).float()
    ref, ref_ce, ref_d = losses.logit_objective(name, s, t, y, **kw)
    for got, want in ((loss, ref), (ce, ref_ce), (d, ref_d)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got_g = torch.autograd.grad(loss, (hs, ws, bs))
    for gg, rr in zip(got_g, torch.autograd.grad(ref, (hs, ws, bs)), strict=True):
        assert gg.dtype == torch.float32 and _rel(gg, rr) <= 4 * U, _rel(gg, rr)


def _parity(kernel: Any, scale: float, **caps: Any) -> dict[str, float]:
    """`check_parity` under CPU bf16 autocast on a micro-batch whose student logits have
    std ≈ ``scale`` (max ≈ 5·scale), a bf16 teacher, default tolerance."""
    g = torch.Generator().manual_seed(5)
    D, V = 64, 2000
    hs = torch.randn(2, 24, D, generator=g)
    ws = torch.randn(V, D, generator=g) * scale / D**0.5
    ht = torch.randn(2, 24, D, generator=g)
    wt = (torch.randn(V, D, generator=g) * 2 / D**0.5).to(BF16)
    y = torch.randint(0, V, (2, 24), generator=g)
    with torch.autocast("cpu", dtype=BF16):
        return fused.check_parity(
            kernel, "forward_kl", hs, ws, ht, wt, y, kd_weight=0.5, temperature=1.0, alpha=0.1,
            beta=0.5, vocab=V, **caps,
        )  # fmt: skip


@pytest.mark.parametrize("cap", [None, 30.0])
def test_parity_check_under_autocast_does_not_refuse_large_logits(cap) -> None:
    """Under bf16 autocast the dense reference rounds the student's logits as the dense
    path's lm_head does (and the kernel's GEMM): a correct kernel passes however large the
    logits, capped or not (std 12, max 59: bf16 rounds the largest by up to 0.12, which moved
    a float32 reference's softmax gradient by 4.4e-2 against the 3e-2 tolerance and refused
    the kernel: LossParityError); a kernel that drops the cap is still refused."""
    errs = _parity(fused.fused_linear_objective, 12.0, **fused.softcap_kwargs(cap, cap))
    assert max(errs.values()) <= 2 * U, errs

    def uncapped(*a, student_softcap=None, **k):
        return fused.fused_linear_objective(*a, **k)

    with pytest.raises(LossParityError):
        _parity(uncapped, 12.0, student_softcap=5.0)


# ------------------------------------------------------------------------ steps


def _step(S, batch, n_tokens: int, amp: torch.dtype | None):
    from sharp_core.train.step import micro_step

    S.student.zero_grad(set_to_none=True)
    terms, _ = micro_step(S, batch, n_tokens=n_tokens, n_seqs=2, amp_dtype=amp)
    terms["loss"].backward()
    grad = torch.cat([p.grad.reshape(-1) for p in S.student.parameters() if p.grad is not None])
    values = {k: float(v.detach()) for k, v in terms.items() if k in ("loss", "ce", "kd")}
    return values, grad, S.logit_path


def _three_ways(S, batch, n_tokens: int, fused_path: str):
    """(float32, dense bf16, fused bf16) of one step: values and the student's gradient."""
    ref = _step(replace(S, logit_path="dense"), batch, n_tokens, None)
    dense = _step(replace(S, logit_path="dense"), batch, n_tokens, BF16)
    got = _step(replace(S, logit_path=None), batch, n_tokens, BF16)
    assert dense[2] == "dense" and got[2] == fused_path
    assert set(got[0]) == set(dense[0]) == set(ref[0]) and "kd" in ref[0]
    return ref[:2], dense[:2], got[:2]


def _values_rel(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)


def _check(ref, dense, got, *, smooth: bool) -> dict[str, float]:
    e = {
        "fused_values": _values_rel(got[0], ref[0]),
        "dense_values": _values_rel(dense[0], ref[0]),
        "fused_vs_dense_values": _values_rel(got[0], dense[0]),
        "fused_grad": _norm_rel(got[1], ref[1]),
        "dense_grad": _norm_rel(dense[1], ref[1]),
        "fused_vs_dense_grad": _norm_rel(got[1], dense[1]),
    }
    print({k: f"{v:.1e}" for k, v in e.items()})
    assert e["fused_values"] <= U / 2, e
    assert e["dense_values"] <= 2 * U, e
    assert e["fused_vs_dense_values"] <= 2 * U, e
    if smooth:
        assert e["fused_grad"] <= 8 * U and e["dense_grad"] <= 8 * U, e
        assert e["fused_vs_dense_grad"] <= 8 * U, e
    else:  # ULD: not smooth (module docstring); no worse than the dense path's own bf16
        assert e["fused_grad"] <= 1.5 * e["dense_grad"], e
    assert e["fused_grad"] > 0  # bf16 did run
    return e


@pytest.mark.parametrize(
    ("mode", "capped", "tie", "method"),
    [
        ("gold", (False, False), False, {}),
        ("gold", (True, True), True, {}),
        ("gold", (True, False), False, {"kd_weight": 0.5, "temperature": 2.0}),
        ("gold", (False, True), True, {}),
        ("uld", (False, False), False, {"kd_weight": 0.5}),
        ("uld", (True, True), False, {"kd_weight": 0.5}),
        ("uld", (True, True), True, {}),
    ],
)
def test_the_cross_step_under_bf16_autocast(toks, mode, capped, tie, method) -> None:
    """`_cross_step` under CPU bf16 autocast, fused (`fused_cross_objective`) and dense, against
    the float32 step: loss, ce, kd and every student gradient within the module docstring's
    tolerances. Packed documents and a chat mask, heads padded past the tokenizers, chunks
    that split the aligned rows; plain Llama heads and Gemma-2 heads whose forwards soft-cap
    (teacher, student, both)."""
    s_tok, t_tok = toks
    S, _ = _cross_setup(mode, s_tok, t_tok, tie=tie, pad=5, capped=capped, logit_chunk=7, **method)
    batch = _packed_chat_batch(s_tok)
    n_tokens = int(batch["loss_mask"][:, 1:].sum())
    _check(*_three_ways(S, batch, n_tokens, "fused:cross"), smooth=mode == "gold")


@pytest.mark.parametrize(
    ("arch", "method"),
    [
        ("gemma2", METHODS[1]),
        ("gemma2", METHODS[2]),
        ("gemma2/llama", METHODS[4]),
        ("llama/gemma2", METHODS[1]),
    ],
    ids=lambda v: v if isinstance(v, str) else v["name"],
)
def test_the_softcapped_kd_step_under_bf16_autocast(arch, method, tmp_path: Path) -> None:
    """The same-vocabulary step with Gemma-2 heads (both capped, a capped teacher, a capped
    student) under CPU bf16 autocast, the parity check included (it must not refuse the
    kernel): fused and dense against the float32 step, tolerances as the module docstring."""
    S = _tiny_setup(arch, method, tmp_path)
    x = torch.randint(0, 33, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[0, :4] = False
    batch = {"input_ids": x, "loss_mask": loss_mask}
    n_tokens = int(loss_mask[:, 1:].sum()) + 5
    _check(*_three_ways(S, batch, n_tokens, "fused:fused_linear_objective"), smooth=True)
