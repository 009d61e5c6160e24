"""Tests of sharp_core.objectives.sharp: the decomposition, its orthogonality, the objective and baselines.

Tolerances: float64 checks are held to 1e-10 (relative), float32 ones to 1e-5 relative (a
few hundred ulps of the accumulated sums), as the design page asks.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp_core.models.capture import CapturedLayer
from sharp_core.objectives.sharp import (
    ATTENTION_OBJECTIVES,
    COMPONENTS,
    RELATIVE_EPS,
    AttentionObjective,
    AttentionProbs,
    DenseProbs,
    LearnedBasis,
    dct_basis,
    decompose,
    head_map,
    layer_map,
    make_attention_objective,
    project,
    project_recompute,
    projected_components,
    sharp_distances,
)
from sharp_core.spec import MethodSpec

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def random_probs(b, h, n, *, dtype=torch.float64, gen=None, causal=False, key_mask=None):
    """Row-stochastic (B, H, N, N); rows with no allowed key are zeros."""
    logits = torch.randn(b, h, n, n, generator=gen, dtype=torch.float64) * 2.0
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p.to(dtype)


def make_mask(b, n, kinds, gen=None):
    """(B, N) bool masks: 'all', 'left', 'right', 'one', 'none', 'random'."""
    m = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        kind = kinds[i % len(kinds)]
        pad = int(torch.randint(0, n, (1,), generator=gen))
        if kind == "left":
            m[i, :pad] = False
        elif kind == "right":
            m[i, n - pad :] = False
        elif kind == "one":
            m[i] = False
            m[i, int(torch.randint(0, n, (1,), generator=gen))] = True
        elif kind == "none":
            m[i] = False
        elif kind == "random":
            m[i] = torch.rand(n, generator=gen) < 0.6
    return m


def rows(mask):
    return mask[:, None, :, None]  # (B, 1, N, 1)


def vinner(a, b, mask, shape):
    """Frobenius inner product over valid query rows, both broadcast to (B, H, N, N)."""
    a, b = a.expand(shape), b.expand(shape)
    r = rows(mask).expand(shape)
    return (a * b * r).sum()


def vnorm(a, mask, shape):
    a = a.expand(shape)
    return torch.sqrt((a * a * rows(mask).expand(shape)).sum())


def assert_pairwise_orthogonal(vectors: dict[str, torch.Tensor], rel: float):
    for (ka, a), (kb, b) in itertools.combinations(vectors.items(), 2):
        na, nb = a.norm(), b.norm()
        assert na > 0 and nb > 0, f"zero gradient for {ka} or {kb}"
        cos = (a * b).sum() / (na * nb)
        assert abs(float(cos)) <= rel, f"<{ka},{kb}> cosine {float(cos):.3e} > {rel}"


def spec(**kw) -> MethodSpec:
    return MethodSpec(**kw)


class QKProbs:
    """A capture-like AttentionProbs: softmax rows recomputed from q, k per query chunk."""

    def __init__(self, q, k, key_mask):
        self.q, self.k, self.key_mask = q, k, key_mask  # (B,H,N,D), (B,H,N,D), (B,N)

    @property
    def num_heads(self):
        return self.q.shape[1]

    @property
    def seq_len(self):
        return self.q.shape[2]

    def probs(self, start=0, end=None):
        end = self.seq_len if end is None else end
        s = self.q[:, :, start:end] @ self.k.transpose(-1, -2) / math.sqrt(self.q.shape[-1])
        i = torch.arange(start, end)[:, None]
        j = torch.arange(self.seq_len)[None, :]
        allowed = (j <= i)[None, None] & self.key_mask[:, None, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        return torch.softmax(s.float(), dim=-1).nan_to_num(0.0)


# ------------------------------------------------------------------------------------------
# decomposition
# ------------------------------------------------------------------------------------------

mask_kinds = st.lists(
    st.sampled_from(["all", "left", "right", "one", "none", "random"]), min_size=1, max_size=4
)


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 4),
    h=st.integers(1, 5),
    n=st.integers(1, 9),
    kinds=mask_kinds,
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    causal=st.booleans(),
)
def test_decompose_sums_orthogonal_idempotent(b, h, n, kinds, seed, dtype, causal):
    gen = torch.Generator().manual_seed(seed)
    p = random_probs(b, h, n, dtype=dtype, gen=gen, causal=causal)
    m = make_mask(b, n, kinds, gen)
    c = decompose(p, m)
    assert c["layer"].shape == (b, 1, 1, n)
    assert c["head"].shape == (b, h, 1, n)
    assert c["token"].shape == (b, 1, n, n)
    assert c["residual"].shape == (b, h, n, n)
    for v in c.values():
        assert torch.isfinite(v).all()

    # sums to P on valid rows; token and residual vanish on invalid rows
    total = c["layer"] + c["head"] + c["token"] + c["residual"]
    r = rows(m).expand_as(p)
    torch.testing.assert_close(total[r], p[r], atol=1e-5, rtol=0)
    assert (c["token"].expand_as(p)[~r] == 0).all()
    assert (c["residual"][~r] == 0).all()

    # mutually orthogonal over valid rows
    # (1e-5 relative to the norms, plus rounding level 50·eps·‖P‖²: a component that is 0 in
    # exact arithmetic, e.g. the residual of a single valid query, is pure rounding noise)
    shape = p.shape
    rounding = 50 * torch.finfo(dtype).eps * float(vnorm(p, m, shape)) ** 2
    for ga, gb in itertools.combinations(COMPONENTS, 2):
        ip = vinner(c[ga], c[gb], m, shape)
        bound = 1e-5 * vnorm(c[ga], m, shape) * vnorm(c[gb], m, shape) + rounding
        assert abs(float(ip)) <= float(bound), (ga, gb, float(ip), float(bound))

    # idempotent: a component is its own decomposition
    for g in COMPONENTS:
        again = decompose(c[g].expand(shape).contiguous(), m)
        for g2 in COMPONENTS:
            want = c[g] if g2 == g else torch.zeros_like(c[g2])
            torch.testing.assert_close(again[g2], want.expand_as(again[g2]), atol=1e-5, rtol=0)


def test_decompose_without_valid_queries_is_zero():
    p = random_probs(2, 3, 5)
    m = torch.zeros(2, 5, dtype=torch.bool)
    for v in decompose(p, m).values():
        assert torch.isfinite(v).all() and (v == 0).all()
    # None means every query is valid
    c_all = decompose(p)
    c_mask = decompose(p, torch.ones(2, 5, dtype=torch.bool))
    for g in COMPONENTS:
        torch.testing.assert_close(c_all[g], c_mask[g])


def test_decompose_matches_definition():
    p = random_probs(1, 3, 4)
    m = torch.tensor([[False, True, True, True]])
    v = p[:, :, 1:]  # valid rows
    mu = v.mean(dim=(1, 2), keepdim=True)
    alpha = v.mean(dim=2, keepdim=True) - mu
    beta = v.mean(dim=1, keepdim=True) - mu
    c = decompose(p, m)
    torch.testing.assert_close(c["layer"], mu)
    torch.testing.assert_close(c["head"], alpha)
    torch.testing.assert_close(c["token"][:, :, 1:], beta)
    torch.testing.assert_close(c["residual"][:, :, 1:], v - mu - alpha - beta)


# ------------------------------------------------------------------------------------------
# THE property: gradients of the SHARP terms on P_s are pairwise orthogonal
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_gradients_orthogonal_directly_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, n = 3, 4, 7
    m = make_mask(b, n, ["left", "right", "one"], gen)
    p_s = random_probs(b, h, n, gen=gen).requires_grad_()
    target = random_probs(b, h, n, gen=gen)
    cs, ct = decompose(p_s, m), decompose(target, m)
    grads = {}
    for g in COMPONENTS:
        loss = ((cs[g] - ct[g]).expand(p_s.shape) * rows(m)).square().sum()
        (grad,) = torch.autograd.grad(loss, p_s, retain_graph=True)
        # ∇ L_g = 2·Π_g(P_s − target), zero on invalid rows
        want = 2 * decompose(p_s.detach() - target, m)[g].expand(p_s.shape) * rows(m)
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-10)
        grads[g] = grad
    assert_pairwise_orthogonal(grads, 1e-10)

    # the same on projected maps, both normalisations, through sharp_distances
    q = dct_basis(n, 3, dtype=torch.float64)
    for norm in ("relative", "count"):
        d = sharp_distances(p_s @ q, target @ q, m, COMPONENTS, norm)
        grads = {g: torch.autograd.grad(d[g].sum(), p_s, retain_graph=True)[0] for g in COMPONENTS}
        assert_pairwise_orthogonal(grads, 1e-10)


@pytest.mark.parametrize("layer_distance", ["mse", "kl"])
@pytest.mark.parametrize("normalization", ["relative", "count"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_gradients_orthogonal_through_objective(normalization, dtype, tol, layer_distance):
    """Also for the distribution-aware layer distance (KL of the unprojected key profile):
    the property that makes that variant admissible."""
    gen = torch.Generator().manual_seed(7)
    b, n, (l_s, h_s), (l_t, h_t) = 3, 12, (2, 3), (4, 6)
    method = spec(
        name="sharp",
        rank=5,
        normalization=normalization,
        layer_distance=layer_distance,
        query_chunk=5,
        granularities={"layer": 1.0, "head": 1.0, "token": 1.0, "residual": 1.0},
    )
    obj = make_attention_objective(
        method, student_shape=(l_s, h_s), teacher_shape=(l_t, h_t), seq_len=n
    )
    m = make_mask(b, n, ["left", "right", "all"], gen)
    leaves = [
        random_probs(b, h_s, n, dtype=dtype, gen=gen, causal=True).requires_grad_()
        for _ in range(l_s)
    ]
    student = {j: DenseProbs(p) for j, p in enumerate(leaves)}
    teacher = {
        j: DenseProbs(random_probs(b, h_t, n, dtype=dtype, gen=gen, causal=True))
        for j in range(l_t)
    }
    out = obj(student, teacher, m)
    assert set(out) == {"sharp_layer", "sharp_head", "sharp_token", "sharp_residual"}
    grads = {}
    for k, v in out.items():
        gs = torch.autograd.grad(v, leaves, retain_graph=True)
        grads[k] = torch.cat([g.reshape(-1) for g in gs]).double()
    assert all(g.norm() > 0 for g in grads.values())
    assert_pairwise_orthogonal(grads, tol)


# ------------------------------------------------------------------------------------------
# alignment
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h_s,h_t", [(1, 1), (4, 4), (2, 6), (4, 12), (5, 12), (12, 5), (3, 8), (8, 3), (7, 2)]
)
def test_head_map_row_stochastic_and_overlaps(h_s, h_t):
    w = head_map(h_s, h_t, dtype=torch.float64)
    assert w.shape == (h_s, h_t)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(h_s, dtype=torch.float64))
    # every teacher head carries the same total mass H_s/H_t (uniform intervals)
    torch.testing.assert_close(w.sum(0), torch.full((h_t,), h_s / h_t, dtype=torch.float64))
    for i, j in itertools.product(range(h_s), range(h_t)):
        lo, hi = Fraction(i * h_t, h_s), Fraction((i + 1) * h_t, h_s)
        ov = max(Fraction(0), min(hi, Fraction(j + 1)) - max(lo, Fraction(j)))
        assert math.isclose(float(w[i, j]), float(ov / (hi - lo)), abs_tol=1e-12)


def test_head_map_examples():
    w = head_map(2, 6)  # k = 3: exact means
    torch.testing.assert_close(w, torch.tensor([[1 / 3] * 3 + [0.0] * 3, [0.0] * 3 + [1 / 3] * 3]))
    w = head_map(5, 12)  # 12 teacher heads → 5 student heads: intervals of 2.4
    torch.testing.assert_close(w[0, :3], torch.tensor([5 / 12, 5 / 12, 1 / 6]))
    torch.testing.assert_close(
        w[2], torch.tensor([0, 0, 0, 0, 1 / 12, 5 / 12, 5 / 12, 1 / 12, 0, 0, 0, 0])
    )
    w = head_map(8, 3)  # 3 teacher heads → 8 student heads: intervals of 3/8
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(w[2], torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(w[7], torch.tensor([0.0, 0.0, 1.0]))
    w = head_map(3, 8)  # 8 teacher heads → 3 student heads: intervals of 8/3
    torch.testing.assert_close(w[1], torch.tensor([0, 0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0, 0]))
    with pytest.raises(ValueError):
        head_map(0, 4)


def test_layer_map():
    assert layer_map(2, 6) == [2, 5]
    assert layer_map(5, 5) == [0, 1, 2, 3, 4]
    assert layer_map(3, 12) == [3, 7, 11]
    assert layer_map(4, 2) == [0, 0, 1, 1]
    assert layer_map(1, 7) == [6]
    assert layer_map(2, 6, explicit=[1, 4]) == [1, 4]
    with pytest.raises(ValueError, match="2 layers"):
        layer_map(2, 6, explicit=[1, 2, 3])
    with pytest.raises(ValueError, match=r"layer_map\[1\]"):
        layer_map(2, 6, explicit=[1, 6])
    with pytest.raises(ValueError, match=r"layer_map\[0\]"):
        layer_map(2, 6, explicit=[-1, 2])
    with pytest.raises(ValueError, match="layer_map"):
        make_attention_objective(
            spec(name="sharp", layer_map=[0, 9]),
            student_shape=(2, 2),
            teacher_shape=(6, 2),
            seq_len=8,
        )


# ------------------------------------------------------------------------------------------
# bases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,r", [(1, 1), (8, 3), (16, 16), (37, 5), (256, 32)])
def test_dct_basis_orthonormal(n, r):
    q = dct_basis(n, r)
    assert q.shape == (n, r) and q.dtype == torch.float32
    torch.testing.assert_close(q.T @ q, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(q[:, 0], torch.full((n,), 1 / math.sqrt(n)))
    if r == n:  # complete: QQᵀ = I
        torch.testing.assert_close(q @ q.T, torch.eye(n), atol=1e-5, rtol=0)
    assert dct_basis(n, r) is q  # cached
    assert dct_basis(n, r, dtype=torch.float64).dtype == torch.float64


def test_dct_basis_rejects_bad_rank():
    with pytest.raises(ValueError):
        dct_basis(4, 5)
    with pytest.raises(ValueError):
        dct_basis(4, 0)


def test_learned_basis_stays_orthonormal():
    torch.manual_seed(0)
    n, r = 16, 4
    lb = LearnedBasis(n, r)
    torch.testing.assert_close(lb(), dct_basis(n, r), atol=1e-5, rtol=0)
    opt = torch.optim.Adam(lb.parameters(), lr=0.05)
    target = torch.randn(n, r)
    for _ in range(20):
        loss = (lb() - target).square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    q = lb()
    torch.testing.assert_close(q.T @ q, torch.eye(r), atol=1e-5, rtol=0)
    assert (q - dct_basis(n, r)).abs().max() > 1e-2  # it did move


def test_learned_basis_trained_by_teacher_energy_only():
    torch.manual_seed(1)
    b, n, h = 2, 10, 2
    obj = make_attention_objective(
        spec(name="sharp", basis="learned", rank=3),
        student_shape=(1, h),
        teacher_shape=(2, h),
        seq_len=n,
    )
    assert obj.basis is not None and "basis_loss" not in obj.weights
    p_s = random_probs(b, h, n, dtype=torch.float32, causal=True).requires_grad_()
    teacher = {
        j: DenseProbs(random_probs(b, h, n, dtype=torch.float32, causal=True)) for j in range(2)
    }
    m = torch.ones(b, n, dtype=torch.bool)
    params = list(obj.parameters())
    out = obj({0: DenseProbs(p_s)}, teacher, m)
    assert set(out) == {"sharp_layer", "sharp_head", "sharp_token", "basis_loss"}
    distill = out["sharp_layer"] + out["sharp_head"] + out["sharp_token"]
    # the distillation terms do not reach the basis; basis_loss does not reach the student
    assert all(
        g is None
        for g in torch.autograd.grad(distill, params, retain_graph=True, allow_unused=True)
    )
    assert (
        torch.autograd.grad(out["basis_loss"], p_s, retain_graph=True, allow_unused=True)[0] is None
    )
    # value: Σ over sequences of 1 − ‖P_t Q‖²/‖P_t‖² (teacher layer 1 is the only mapped one)
    q = obj.basis().detach()
    pt = teacher[1].probs()
    want = (1 - (pt @ q).square().sum((1, 2, 3)) / pt.square().sum((1, 2, 3))).sum()
    torch.testing.assert_close(out["basis_loss"].detach(), want, atol=1e-5, rtol=1e-5)
    # and its gradient is exact: the captured energy grows under plain gradient steps
    opt = torch.optim.SGD(params, lr=0.5)
    first = None
    for _ in range(15):
        loss = obj({0: DenseProbs(p_s)}, teacher, m)["basis_loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    last = float(obj({0: DenseProbs(p_s)}, teacher, m)["basis_loss"].detach())
    assert last < first - 1e-3
    q = obj.basis()
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# projection
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 100])
def test_project_chunked_equals_dense(chunk):
    gen = torch.Generator().manual_seed(chunk)
    b, h, n, r = 2, 3, 16, 5
    p = random_probs(b, h, n, dtype=torch.float32, gen=gen, causal=True).requires_grad_()
    q = dct_basis(n, r)
    up = torch.randn(b, h, n, r, generator=gen)
    got = project(DenseProbs(p), q, chunk)
    torch.testing.assert_close(got, p @ q, atol=1e-6, rtol=1e-5)
    (g_got,) = torch.autograd.grad((got * up).sum(), p)
    (g_ref,) = torch.autograd.grad(((p @ q) * up).sum(), p)
    torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(project(DenseProbs(p), q, chunk), p @ q, atol=1e-6, rtol=1e-5)


def test_project_through_recomputed_softmax_and_saves_no_maps():
    """A capture-like source (softmax rebuilt from q, k): same values and gradients as dense,
    and no (·, ·, c, N) probability chunk is kept for backward outside the checkpoints."""
    gen = torch.Generator().manual_seed(3)
    b, h, n, d, r = 2, 2, 12, 4, 4
    q_ = torch.randn(b, h, n, d, generator=gen, requires_grad=True)
    k_ = torch.randn(b, h, n, d, generator=gen, requires_grad=True)
    km = torch.ones(b, n, dtype=torch.bool)
    km[1, :3] = False
    src = QKProbs(q_, k_, km)
    basis = dct_basis(n, r)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = project(src, basis, 5)
    assert not any(len(s) == 4 and s[-1] == n for s in saved), saved
    up = torch.randn(b, h, n, r, generator=gen)
    g_got = torch.autograd.grad((got * up).sum(), (q_, k_))
    dense = src.probs() @ basis
    torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-5)
    g_ref = torch.autograd.grad((dense * up).sum(), (q_, k_))
    for a, bb in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, bb, atol=1e-6, rtol=1e-5)


def test_projected_components_equal_decompose_times_basis():
    gen = torch.Generator().manual_seed(11)
    b, h, n, r = 3, 4, 9, 4
    p = random_probs(b, h, n, gen=gen)
    m = make_mask(b, n, ["left", "one", "none"], gen)
    q = dct_basis(n, r, dtype=torch.float64)
    pc = projected_components(p @ q, m)
    c = decompose(p, m)
    torch.testing.assert_close(pc["layer"], (c["layer"] @ q)[:, 0, 0])
    torch.testing.assert_close(pc["head"], (c["head"] @ q)[:, :, 0])
    torch.testing.assert_close(pc["token"], (c["token"] @ q)[:, 0])
    torch.testing.assert_close(pc["residual"], c["residual"] @ q)


# ------------------------------------------------------------------------------------------
# the objective: references, invariants
# ------------------------------------------------------------------------------------------


def _setup(gen, b=3, n=10, s_shape=(2, 2), t_shape=(4, 4), dtype=torch.float32):
    m = make_mask(b, n, ["left", "right", "all"], gen)
    ps = [
        random_probs(b, s_shape[1], n, dtype=dtype, gen=gen, causal=True) for _ in range(s_shape[0])
    ]
    pt = [
        random_probs(b, t_shape[1], n, dtype=dtype, gen=gen, causal=True) for _ in range(t_shape[0])
    ]
    return m, ps, pt


def _dense(maps):
    return {j: DenseProbs(p) for j, p in enumerate(maps)}


@pytest.mark.parametrize("normalization", ["relative", "count"])
def test_sharp_terms_against_dense_reference(normalization):
    gen = torch.Generator().manual_seed(5)
    b, n, r = 3, 10, 4
    m, ps, pt = _setup(gen, b, n, (2, 2), (4, 6), dtype=torch.float64)
    method = spec(
        name="sharp",
        rank=r,
        normalization=normalization,
        query_chunk=3,
        granularities={"layer": 1.0, "head": 2.0, "token": 0.5, "residual": 1.0},
    )
    obj = make_attention_objective(method, student_shape=(2, 2), teacher_shape=(4, 6), seq_len=n)
    assert obj.weights == {
        "sharp_layer": 1.0,
        "sharp_head": 2.0,
        "sharp_token": 0.5,
        "sharp_residual": 1.0,
    }
    out = obj(_dense(ps), _dense(pt), m)
    q = dct_basis(n, r, dtype=torch.float64)
    w = head_map(2, 6, dtype=torch.float64)
    nv = m.sum(1).double()
    want = {g: torch.zeros(b, dtype=torch.float64) for g in COMPONENTS}
    for js, jt in zip(range(2), layer_map(2, 4), strict=True):
        tgt = torch.einsum("st,btij->bsij", w, pt[jt])  # dense W_H·P_t
        cs, ct = decompose(ps[js], m), decompose(tgt, m)
        e_tot = ((tgt @ q).square() * rows(m)).sum((1, 2, 3))
        mult = {
            "layer": 2 * nv,
            "head": nv,
            "token": torch.full_like(nv, 2.0),
            "residual": torch.ones_like(nv),
        }
        count = {
            "layer": torch.full_like(nv, r),
            "head": torch.full_like(nv, 2 * r),
            "token": nv * r,
            "residual": nv * 2 * r,
        }
        for g in COMPONENTS:
            zs, zt = cs[g] @ q, ct[g] @ q  # compact shapes
            d = (zs - zt).square().sum((1, 2, 3))
            if normalization == "relative":
                den = zt.square().sum((1, 2, 3)) + RELATIVE_EPS * e_tot / mult[g]
            else:
                den = count[g]
            want[g] += d / den
    for g in COMPONENTS:
        torch.testing.assert_close(out[f"sharp_{g}"], want[g].sum() / 2, rtol=1e-6, atol=1e-9)


def test_sharp_direct_is_sum_of_component_distances():
    gen = torch.Generator().manual_seed(6)
    m, ps, pt = _setup(gen, 3, 10, (2, 2), (2, 4), dtype=torch.float64)
    kw = dict(student_shape=(2, 2), teacher_shape=(2, 4), seq_len=10)
    direct = make_attention_objective(
        spec(
            name="sharp",
            decomposition="direct",
            rank=6,
            normalization="count",
            attention_weight=0.3,
        ),
        **kw,
    )
    assert direct.weights == {"sharp_direct": 0.3}
    out = direct(_dense(ps), _dense(pt), m)
    assert set(out) == {"sharp_direct"}
    # broadcast distances of the four components add up to the whole map's distance
    q = dct_basis(10, 6, dtype=torch.float64)
    w = head_map(2, 4, dtype=torch.float64)
    want = torch.zeros(3, dtype=torch.float64)
    for j in range(2):
        tgt = torch.einsum("st,btij->bsij", w, pt[j])
        cs, ct = decompose(ps[j], m), decompose(tgt, m)
        whole = sum(
            ((cs[g] - ct[g]) @ q).expand(3, 2, 10, 6).square().mul(rows(m)).sum((1, 2, 3))
            for g in COMPONENTS
        )
        direct_d = (((ps[j] - tgt) @ q).square() * rows(m)).sum((1, 2, 3))
        torch.testing.assert_close(whole, direct_d)
        want += direct_d / (2 * m.sum(1) * 6).clamp_min(1)
    torch.testing.assert_close(out["sharp_direct"], want.sum() / 2)


def test_tinybert_against_dense_reference():
    gen = torch.Generator().manual_seed(8)
    b, n = 3, 9
    m, ps, pt = _setup(gen, b, n, (2, 3), (6, 6))
    obj = make_attention_objective(
        spec(name="tinybert", query_chunk=4, attention_weight=2.0),
        student_shape=(2, 3),
        teacher_shape=(6, 6),
        seq_len=n,
    )
    assert obj.weights == {"tinybert_attn": 2.0}
    assert obj.student_layers == [0, 1] and obj.teacher_layers == [2, 5]
    out = obj(_dense(ps), _dense(pt), m)
    w = head_map(3, 6)
    want = torch.zeros(b)
    for js, jt in [(0, 2), (1, 5)]:
        tgt = torch.einsum("st,btij->bsij", w, pt[jt])
        se = ((ps[js] - tgt).square() * rows(m)).sum((1, 2, 3))
        want += se / (3 * m.sum(1).float().square()).clamp_min(1)
    torch.testing.assert_close(out["tinybert_attn"], want.sum() / 2, rtol=1e-5, atol=1e-7)


def test_minilm_against_dense_reference():
    gen = torch.Generator().manual_seed(9)
    b, n = 3, 9
    m, ps, pt = _setup(gen, b, n, (3, 2), (4, 4))
    obj = make_attention_objective(
        spec(name="minilm", query_chunk=2), student_shape=(3, 2), teacher_shape=(4, 4), seq_len=n
    )
    assert obj.student_layers == [2] and obj.teacher_layers == [3]
    out = obj(_dense(ps), _dense(pt), m)
    tgt = torch.einsum("st,btij->bsij", head_map(2, 4), pt[3])
    s = ps[2]
    kl_terms = torch.where(tgt > 0, tgt * (tgt.log() - s.log()), torch.zeros_like(tgt))
    kl = kl_terms.sum(-1)  # (B, H, N)
    want = (kl * m[:, None, :]).sum((1, 2)) / (2 * m.sum(1)).clamp_min(1)
    torch.testing.assert_close(out["minilm_attn"], want.sum(), rtol=1e-5, atol=1e-6)
    # explicit layer map: the last student layer goes with its mapped teacher layer
    obj = make_attention_objective(
        spec(name="minilm", layer_map=[0, 1, 1]),
        student_shape=(3, 2),
        teacher_shape=(4, 4),
        seq_len=n,
    )
    assert obj.teacher_layers == [1]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), kinds=mask_kinds)
def test_minilm_nonnegative(seed, n, kinds):
    gen = torch.Generator().manual_seed(seed)
    m, ps, pt = _setup(gen, 3, n, (1, 2), (1, 3))
    m = make_mask(3, n, kinds, gen)
    obj = make_attention_objective(
        spec(name="minilm"), student_shape=(1, 2), teacher_shape=(1, 3), seq_len=n
    )
    v = obj(_dense(ps), _dense(pt), m)["minilm_attn"]
    assert torch.isfinite(v) and float(v) >= 0.0


def test_baselines_ignore_padding():
    """A right-padded sequence costs what the unpadded one does (padded keys carry no mass)."""
    gen = torch.Generator().manual_seed(10)
    b, h, n, pad = 2, 2, 6, 3
    p6s, p6t = (
        random_probs(b, h, n, dtype=torch.float32, gen=gen, causal=True),
        random_probs(b, h, n, dtype=torch.float32, gen=gen, causal=True),
    )

    def padded(p):
        out = torch.zeros(b, h, n + pad, n + pad)
        out[:, :, :n, :n] = p
        junk = torch.randn(b, h, pad, n + pad, generator=gen)
        out[:, :, n:] = torch.softmax(junk, -1)  # padding rows: anything
        return out

    m = torch.zeros(b, n + pad, dtype=torch.bool)
    m[:, :n] = True
    for name in ("tinybert", "minilm"):
        kw = dict(student_shape=(1, h), teacher_shape=(1, h))
        short = make_attention_objective(spec(name=name), seq_len=n, **kw)(
            {0: DenseProbs(p6s)}, {0: DenseProbs(p6t)}
        )
        long = make_attention_objective(spec(name=name), seq_len=n + pad, **kw)(
            {0: DenseProbs(padded(p6s))}, {0: DenseProbs(padded(p6t))}, m
        )
        torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-7)


ALL_METHODS = [
    spec(name="sharp", rank=4, granularities={"residual": 1.0}),
    spec(name="sharp", rank=4, normalization="count", granularities={"residual": 1.0}),
    spec(name="sharp", rank=4, decomposition="direct"),
    spec(name="sharp", rank=4, basis="learned"),
    spec(name="tinybert"),
    spec(name="minilm"),
]


@pytest.mark.parametrize(
    "method", ALL_METHODS, ids=lambda s: f"{s.name}-{s.decomposition}-{s.normalization}-{s.basis}"
)
@pytest.mark.parametrize("h_s,h_t", [(2, 2), (2, 4)])
def test_identical_maps_give_zero_and_moving_towards_teacher_decreases(method, h_s, h_t):
    gen = torch.Generator().manual_seed(12)
    b, n = 3, 8
    m, ps, pt = _setup(gen, b, n, (2, h_s), (2, h_t))
    obj = make_attention_objective(
        method, student_shape=(2, h_s), teacher_shape=(2, h_t), seq_len=n
    )
    w = head_map(h_s, h_t)
    mapped = [torch.einsum("st,btij->bsij", w, p) for p in pt]  # what the student should match
    same = obj(_dense(mapped), _dense(pt), m)
    for k, v in same.items():
        if k != "basis_loss":
            assert abs(float(v)) < 1e-6, (k, float(v))
    previous = None
    for t in (0.0, 0.3, 0.6, 0.9):
        moved = [(1 - t) * s + t * g for s, g in zip(ps, mapped, strict=True)]
        with torch.no_grad():
            out = {
                k: float(v)
                for k, v in obj(_dense(moved), _dense(pt), m).items()
                if k != "basis_loss"
            }
        assert out and all(v >= 0 for v in out.values())
        if previous is not None:
            for k in out:
                assert out[k] < previous[k], (k, t, out[k], previous[k])
        previous = out


def test_zero_weight_terms_are_absent_and_layers_to_capture():
    kw = dict(student_shape=(2, 2), teacher_shape=(6, 4), seq_len=8)
    obj = make_attention_objective(spec(name="sharp", granularities={"head": 0.0}), **kw)
    from sharp_core.spec import Granularities

    d = Granularities()
    # head dropped, residual 0 by default; the others keep their spec defaults
    assert d.residual == 0.0
    assert obj.weights == {"sharp_layer": d.layer, "sharp_token": d.token}
    assert obj.student_layers == [0, 1] and obj.teacher_layers == [2, 5]
    gen = torch.Generator().manual_seed(13)
    m, ps, pt = _setup(gen, 2, 8, (2, 2), (6, 4))
    out = obj(_dense(ps), _dense(pt), m)
    assert set(out) == {"sharp_layer", "sharp_token"}
    for name in ("tinybert", "minilm"):
        off = make_attention_objective(spec(name=name, attention_weight=0.0), **kw)
        assert off.weights == {} and off.student_layers == [] and off.teacher_layers == []
        assert off({}, {}, m) == {}
    none = make_attention_objective(
        spec(name="sharp", granularities={"layer": 0, "head": 0, "token": 0}), **kw
    )
    assert none.weights == {} and none.student_layers == []


def test_terms_are_sums_over_sequences():
    """Accumulation is exact: the terms of a batch are the sums of the terms of its halves."""
    gen = torch.Generator().manual_seed(14)
    m, ps, pt = _setup(gen, 4, 8, (2, 2), (2, 4))
    for method in ALL_METHODS:
        obj = make_attention_objective(
            method, student_shape=(2, 2), teacher_shape=(2, 4), seq_len=8
        )
        full = obj(_dense(ps), _dense(pt), m)
        halves = [
            obj(_dense([p[sl] for p in ps]), _dense([p[sl] for p in pt]), m[sl])
            for sl in (slice(0, 1), slice(1, 4))
        ]
        for k in full:
            torch.testing.assert_close(full[k], halves[0][k] + halves[1][k], rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_errors_are_clear():
    gen = torch.Generator().manual_seed(15)
    m, ps, pt = _setup(gen, 2, 8, (1, 2), (1, 2))
    pt_leaf = pt[0].clone().requires_grad_()
    ps_leaf = ps[0].clone().requires_grad_()
    for method in ALL_METHODS:
        obj = make_attention_objective(
            method, student_shape=(1, 2), teacher_shape=(1, 2), seq_len=8
        )
        out = obj({0: DenseProbs(ps_leaf)}, {0: DenseProbs(pt_leaf)}, m)
        terms = [v for k, v in out.items() if k != "basis_loss"]
        assert torch.autograd.grad(sum(terms), pt_leaf, allow_unused=True)[0] is None
        with pytest.raises(ValueError, match="not captured"):
            obj({}, {0: DenseProbs(pt_leaf)}, m)
        with pytest.raises(ValueError, match="heads"):
            obj({0: DenseProbs(ps_leaf[:, :1])}, {0: DenseProbs(pt_leaf)}, m)
    with pytest.raises(ValueError, match="sharp"):
        make_attention_objective(
            spec(name="kd"), student_shape=(1, 2), teacher_shape=(1, 2), seq_len=8
        )


def test_factory_builds_one_class_per_attention_method():
    """Method names come from sharp_core.methods; each attention method has its own class."""
    from sharp_core import methods

    assert set(ATTENTION_OBJECTIVES) == set(methods.ATTENTION_METHODS)
    kw = dict(student_shape=(2, 2), teacher_shape=(4, 4), seq_len=8)
    built = {name: make_attention_objective(spec(name=name), **kw) for name in ATTENTION_OBJECTIVES}
    assert {n: type(o) for n, o in built.items()} == ATTENTION_OBJECTIVES
    assert len(set(ATTENTION_OBJECTIVES.values())) == len(ATTENTION_OBJECTIVES)
    assert all(isinstance(o, AttentionObjective) for o in built.values())


def test_dense_probs_is_attention_probs():
    p = random_probs(1, 2, 5, dtype=torch.float32)
    d = DenseProbs(p)
    assert isinstance(d, AttentionProbs)
    assert d.num_heads == 2 and d.seq_len == 5
    assert d.probs(1, 3).shape == (1, 2, 2, 5)
    torch.testing.assert_close(d.probs(), p)


# ------------------------------------------------------------------------------------------
# the distribution-aware layer distance (layer_distance = "kl")
# ------------------------------------------------------------------------------------------


def test_layer_kl_against_dense_reference_and_zero_at_teacher():
    """KL(μ_t ‖ μ_s) of the unprojected key profiles, μ = head mean (teacher: of W_H·P_t) of
    the mean over valid queries, averaged over layer pairs; 0 when the student is the target."""
    gen = torch.Generator().manual_seed(11)
    b, n = 3, 10
    m, ps, pt = _setup(gen, b, n, (2, 2), (4, 6), dtype=torch.float64)
    method = spec(
        name="sharp",
        rank=4,
        query_chunk=3,
        layer_distance="kl",
        granularities={"layer": 1.0, "head": 1.0, "token": 0.0},
    )
    obj = make_attention_objective(method, student_shape=(2, 2), teacher_shape=(4, 6), seq_len=n)
    out = obj(_dense(ps), _dense(pt), m)
    assert set(out) == {"sharp_layer", "sharp_head"}
    w = head_map(2, 6, dtype=torch.float64)
    rows_ = m[:, None, :, None].double()
    nv = m.sum(1).double().clamp_min(1)[:, None]
    want = torch.zeros(b, dtype=torch.float64)
    targets = {}
    for js, jt in zip(range(2), layer_map(2, 4), strict=True):
        tgt = torch.einsum("st,btij->bsij", w, pt[jt])
        targets[js] = tgt
        mu_s = (ps[js] * rows_).sum((1, 2)) / (2 * nv)
        mu_t = (tgt * rows_).sum((1, 2)) / (2 * nv)
        assert torch.allclose(
            mu_t.sum(-1)[m.any(1)], torch.ones(int(m.any(1).sum()), dtype=torch.float64)
        )
        want += torch.where(mu_t > 0, mu_t * (mu_t / mu_s).log(), 0.0).sum(-1)
    # rtol as the other dense references: the objective keeps its head map in float32
    torch.testing.assert_close(out["sharp_layer"], want.sum() / 2, rtol=1e-6, atol=1e-9)
    # the student equal to the (head-mapped) target: zero, and a non-negative value else
    same = obj(_dense([targets[0], targets[1]]), _dense(pt), m)
    assert abs(float(same["sharp_layer"])) < 1e-7 and float(out["sharp_layer"]) > 0


# ------------------------------------------------------------------------------------------
# long context: captured layers, softmax chunks recomputed in backward
# ------------------------------------------------------------------------------------------

MASK_KINDS = ("causal", "padded", "additive", "bidirectional")


def _captured(gen, b, h, h_kv, n, d, kind, grad):
    """A CapturedLayer from random q, k (GQA when h_kv < h) and the key mask it implies.

    'causal': SDPA's is_causal flag, no mask (every query valid); 'padded': bool causal mask
    with left padding in sequence 1 and right padding in sequence 0; 'additive': the same as
    a float mask; 'bidirectional': a (B, 1, 1, N) key-padding mask without causality, as a
    classification encoder uses.
    """
    q = (1.5 * torch.randn(b, h, n, d, generator=gen)).requires_grad_(grad)
    k = (1.5 * torch.randn(b, h_kv, n, d, generator=gen)).requires_grad_(grad)
    keys = torch.ones(b, n, dtype=torch.bool)
    if kind == "causal":
        return CapturedLayer(q, k, d**-0.5, None, True), keys
    keys[0, -3:] = False
    keys[1 % b, :4] = False
    if kind == "bidirectional":
        return CapturedLayer(q, k, d**-0.5, keys[:, None, None, :], False), keys
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & keys[:, None, None, :]
    if kind == "additive":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    return CapturedLayer(q, k, d**-0.5, mask, False), keys


def _long_context_case(kind, seed, n=24, h_s=(4, 2), h_t=(8, 2), d=8):
    """Student: 1 captured layer with grad; teacher: 2 captured layers without."""
    gen = torch.Generator().manual_seed(seed)
    student, keys = _captured(gen, 2, *h_s, n, d, kind, True)
    g2 = torch.Generator().manual_seed(seed + 1000)
    teacher = [_captured(g2, 2, *h_t, n, d, kind, False)[0] for _ in range(2)]
    return student, teacher, keys


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _against_dense(method, kind, seed=0, n=24):
    """(terms, grads) of the objective on captured layers and on their dense maps."""
    student, teacher, keys = _long_context_case(kind, seed, n)
    obj = make_attention_objective(method, student_shape=(1, 4), teacher_shape=(2, 8), seq_len=n)
    results = []
    for dense in (False, True):
        s = {0: DenseProbs(student.probs()) if dense else student}
        t = {j: DenseProbs(x.probs()) if dense else x for j, x in enumerate(teacher)}
        terms = obj(s, t, keys)
        weights = torch.linspace(0.5, 1.5, len(terms))
        loss = sum(w * v for w, v in zip(weights, terms.values(), strict=True))
        wrt = [student.query, student.key, *obj.parameters()]
        results.append((terms, torch.autograd.grad(loss, wrt)))
    return results


SHARP_VARIANTS = {
    "all-dct-relative": dict(granularities={"residual": 1.0}),
    "all-count": dict(granularities={"residual": 1.0}, normalization="count"),
    "learned-basis": dict(basis="learned", granularities={"residual": 0.5}),
    "direct": dict(decomposition="direct"),
    "layer-kl": dict(layer_distance="kl"),
}


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("variant", list(SHARP_VARIANTS))
def test_sharp_recomputed_equals_dense_maps_value_and_gradient(variant, kind):
    """The default path on captured q/k (chunks recomputed in backward, GQA with 2 kv heads)
    equals autograd through the dense (B, H, N, N) maps: values and gradients w.r.t. the
    student's q and k (and a learned basis) within 1e-5 relative, float32."""
    method = spec(name="sharp", rank=6, query_chunk=5, **SHARP_VARIANTS[variant])
    assert method.projection == "auto"  # chunked until a GPU's plan resolves it
    (got, g_got), (want, g_want) = _against_dense(method, kind)
    assert set(got) == set(want) and got
    for name in want:
        assert _rel_err(got[name], want[name]) <= 1e-5, name
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == b.dtype and _rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("name", ["tinybert", "minilm"])
def test_baselines_recomputed_equal_dense_maps_value_and_gradient(name, kind):
    (got, g_got), (want, g_want) = _against_dense(spec(name=name, query_chunk=7), kind)
    term = f"{name}_attn"
    assert set(got) == {term} == set(want)
    assert _rel_err(got[term], want[term]) <= 1e-5
    for a, b in zip(g_got, g_want, strict=True):
        assert _rel_err(a, b) <= 1e-5


def test_recompute_handles_bf16_inputs_in_float32():
    """bf16 q/k (a bf16 model's capture): gradients come back in bf16 and match float32
    autograd through the dense maps of the same (bf16-valued) inputs to bf16 rounding."""
    gen = torch.Generator().manual_seed(4)
    layer, keys = _captured(gen, 2, 4, 2, 20, 8, "padded", False)
    q = layer.query.bfloat16().requires_grad_()
    k = layer.key.bfloat16().requires_grad_()
    rec = CapturedLayer(q, k, layer.scaling, layer.mask, False)
    basis = dct_basis(20, 5)
    up = torch.randn(2, 4, 20, 5, generator=gen)
    got = project_recompute(rec, basis, 6)
    g_got = torch.autograd.grad((got * up).sum(), (q, k))
    q32 = q.detach().float().requires_grad_()
    k32 = k.detach().float().requires_grad_()
    dense = CapturedLayer(q32, k32, layer.scaling, layer.mask, False).probs() @ basis
    g_want = torch.autograd.grad((dense * up).sum(), (q32, k32))
    assert got.dtype == torch.float32 and _rel_err(got, dense) <= 1e-5
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == torch.bfloat16 and _rel_err(a.float(), b) <= 1e-2


@pytest.mark.parametrize("method", ["sharp", "tinybert", "minilm"])
def test_attention_terms_keep_no_quadratic_maps_for_backward(method):
    """Bytes saved for backward by one layer pair's terms at N=1024 (B=1, 4 query heads, 2 kv
    heads, head dim 64), with SDPA restricted to its math kernel (what CUDA runs for float32
    with GQA), stay O(N·(D + r)): far below one (B, H, N, N) float32 map (16 MiB).

    On the code before the recomputed path, SHARP's default SDPA projection fails this (the
    math kernel saves the (B, H, N, N) maps); TinyBERT / MiniLM already met it through
    activation checkpointing, so for them it guards against a regression."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, h_kv, n, d = 1, 4, 2, 1024, 64
    gen = torch.Generator().manual_seed(0)
    student, keys = _captured(gen, b, h, h_kv, n, d, "padded", True)
    teacher = [_captured(gen, b, h, h_kv, n, d, "padded", False)[0] for _ in range(2)]
    obj = make_attention_objective(
        spec(name=method, granularities={"residual": 1.0}),
        student_shape=(1, h),
        teacher_shape=(2, h),
        seq_len=n,
    )
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with sdpa_kernel(SDPBackend.MATH), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = obj({0: student}, dict(enumerate(teacher)), keys)
    full_map = b * h * n * n * 4
    qk = (student.query.numel() + student.key.numel()) * 4
    assert sum(saved) <= 2 * qk and sum(saved) < full_map / 4, (sum(saved), qk, full_map)
    assert max(saved) <= qk
    g = torch.autograd.grad(sum(terms.values()), (student.query, student.key))
    assert all(x.abs().sum() > 0 for x in g)


@pytest.mark.parametrize(
    "method",
    [spec(name="tinybert", query_chunk=7), spec(name="minilm", query_chunk=7)],
    ids=["tinybert", "minilm"],
)
def test_trimmed_student_rows_against_a_teacher_with_a_full_mask(method):
    """Student under the causal flag (its chunks read only the attended key prefix), teacher
    with an explicit causal mask (its rows span every key): the student's rows are padded,
    and value and gradient still equal the dense reference."""
    gen = torch.Generator().manual_seed(7)
    n = 20
    student, keys = _captured(gen, 2, 4, 2, n, 8, "causal", True)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    teacher = []
    for _ in range(2):
        t, _ = _captured(gen, 2, 8, 2, n, 8, "causal", False)
        teacher.append(CapturedLayer(t.query, t.key, t.scaling, causal, False))
    obj = make_attention_objective(method, student_shape=(1, 4), teacher_shape=(2, 8), seq_len=n)
    got = sum(obj({0: student}, dict(enumerate(teacher)), keys).values())
    dense_t = {j: DenseProbs(t.probs()) for j, t in enumerate(teacher)}
    want = sum(obj({0: DenseProbs(student.probs())}, dense_t, keys).values())
    assert _rel_err(got, want) <= 1e-5
    wrt = (student.query, student.key)
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(want, wrt), strict=True):
        assert _rel_err(a, b) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_recomputed_and_sdpa_projections_at_4k(dtype):
    """On CUDA at N=4096 (4 query heads, 2 kv heads): the default path's peak memory for
    forward + backward stays far below one (B, H, N, N) float32 map, and it agrees with the
    SDPA projection (GQA heads repeated, so a fused kernel may serve) within TF32 rounding."""
    from sharp_core.objectives.sharp import project_sdpa

    dev = torch.device("cuda")
    b, h, h_kv, n, d = 1, 4, 2, 4096, 64
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, h, n, d, device=dev, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, h_kv, n, d, device=dev, generator=gen).to(dtype).requires_grad_()
    layer = CapturedLayer(q, k, d**-0.5, None, True)
    basis = dct_basis(n, 32, device=dev)
    up = torch.randn(b, h, n, 32, device=dev, generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = project_recompute(layer, basis, 64)
    g_got = torch.autograd.grad((got * up).sum(), (q, k))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < b * h * n * n * 4 / 4
    ref = project_sdpa(layer, basis)
    g_ref = torch.autograd.grad((ref * up).sum(), (q, k))
    assert _rel_err(got, ref) <= 1e-2
    for a, bb in zip(g_got, g_ref, strict=True):
        assert a.dtype == dtype and _rel_err(a.float(), bb.float()) <= 2e-2
