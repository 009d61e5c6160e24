"""sharp_core.objectives.losses against closed forms, invariants, chunking and accumulation.

Tolerances, stated once:
- against the float64 closed-form references: 1e-5 relative (our math is float32);
- chunked vs unchunked and 8×1 vs 1×8 accumulation: 1e-6 (same float32 math, only the
  order of the final sums changes);
- "identical inputs → 0" and nonnegativity: 1e-6 absolute (a mixture log(α·p + (1−α)·p)
  equals log p only up to rounding).
"""

from __future__ import annotations

import pytest
import torch

from sharp_core import methods
from sharp_core.objectives import losses
from sharp_core.objectives.losses import (
    DIVERGENCES,
    count_valid,
    cross_entropy,
    divergence,
    logit_objective,
)

REL = 1e-5  # closed-form references (float64) vs our float32 math
TIGHT = 1e-6  # chunked vs unchunked, accumulation

B, N, V = 3, 5, 37


def make_inputs(seed: int, *, b: int = B, n: int = N, v: int = V, scale: float = 3.0):
    """Random student/teacher logits (float32, student requires grad) and ragged labels."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, n, v, generator=g) * scale).requires_grad_(True)
    t = torch.randn(b, n, v, generator=g) * scale
    y = torch.randint(0, v, (b, n), generator=g)
    mask = torch.rand(b, n, generator=g) < 0.3
    mask[0, 0] = False  # at least one valid token
    y[mask] = -100
    return s, t, y


# ------------------------------------------------------------------ float64 references


def _probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.softmax(logits.double() / tau, dim=-1)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a log(a / b), per row, the textbook way."""
    return (a * torch.log(a / b)).sum(-1)


def ref_per_token(name: str, s, t, temperature=1.0, alpha=0.1, beta=0.5) -> torch.Tensor:
    tau = temperature
    q, p = _probs(s, tau), _probs(t, tau)
    if name == "forward_kl":
        d = _kl(p, q)
    elif name == "reverse_kl":
        d = _kl(q, p)
    elif name == "skew_forward_kl":
        d = _kl(p, alpha * p + (1 - alpha) * q)
    elif name == "skew_reverse_kl":
        d = _kl(q, (1 - alpha) * p + alpha * q)
    elif name == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    else:
        raise AssertionError(name)
    return d * tau**2


def ref_loss(name, s, t, y, **kw) -> torch.Tensor:
    valid = y != -100
    return ref_per_token(name, s, t, **kw)[valid].sum() / valid.sum()


def ref_ce(s, y) -> torch.Tensor:
    logq = torch.log_softmax(s.double(), dim=-1)
    valid = y != -100
    picked = logq.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -picked[valid].sum() / valid.sum()


def call(name, s, t, y, **kw):
    """The reduced loss of the registry entry `name` (what the trainer's objective uses)."""
    return divergence(name, s, t, y, **kw)


def forward_kl(s, t, y, **kw):
    return divergence("forward_kl", s, t, y, **kw)


def reverse_kl(s, t, y, **kw):
    return divergence("reverse_kl", s, t, y, **kw)


def skew_forward_kl(s, t, y, **kw):
    return divergence("skew_forward_kl", s, t, y, **kw)


def skew_reverse_kl(s, t, y, **kw):
    return divergence("skew_reverse_kl", s, t, y, **kw)


def generalized_jsd(s, t, y, **kw):
    return divergence("jsd", s, t, y, **kw)


NAMES = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"]

CASES = [
    ("forward_kl", {}),
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {}),
    ("reverse_kl", {"temperature": 0.7}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.5, "temperature": 2.0}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3, "temperature": 1.5}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1, "temperature": 2.0}),
    ("jsd", {"beta": 0.9, "temperature": 0.5}),
]


def _assert_close(actual, expected, rel, atol=0.0):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rel, atol=atol)


# ----------------------------------------------------------------- against references


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_divergence_matches_closed_form(name, kw):
    for seed in range(3):
        s, t, y = make_inputs(seed)
        out = call(name, s, t, y, **kw)
        assert out.dtype == torch.float32 and out.dim() == 0
        s64 = s.detach().double().requires_grad_(True)
        ref = ref_loss(name, s64, t, y, **kw)
        _assert_close(out, ref, REL)
        # Gradients too: the losses use a custom autograd Function, so check it against
        # float64 autograd through the reference. atol covers near-zero entries: the
        # largest entries are ~1e-2, whose float32 rounding is ~1e-9 per operation, and the
        # softmax's V-term sums add up to ~1e-7 depending on the CPU's vector width
        # (1.3e-7 was seen on one machine for reverse KL at τ = 0.7).
        out.backward()
        ref.backward()
        _assert_close(s.grad, s64.grad, REL, atol=1e-6)


def test_cross_entropy_matches_closed_form():
    s, _, y = make_inputs(0)
    out = cross_entropy(s, y)
    s64 = s.detach().double().requires_grad_(True)
    ref = ref_ce(s64, y)
    _assert_close(out, ref, REL)
    out.backward()
    ref.backward()
    _assert_close(s.grad, s64.grad, REL, atol=1e-7)
    # and agrees with torch's own masked mean
    torch.testing.assert_close(
        out, torch.nn.functional.cross_entropy(s.detach().reshape(-1, V), y.reshape(-1))
    )


# ----------------------------------------------------------------------- invariants


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    s, t, y = make_inputs(1)
    for tau in (1.0, 2.0):
        assert torch.equal(
            generalized_jsd(s, t, y, beta=0.0, temperature=tau),
            forward_kl(s, t, y, temperature=tau),
        )
        assert torch.equal(
            generalized_jsd(s, t, y, beta=1.0, temperature=tau),
            reverse_kl(s, t, y, temperature=tau),
        )
    # The interior formula tends to 0 at the endpoints: that is why they are special-cased.
    assert generalized_jsd(s, t, y, beta=1e-6) < 1e-3 * forward_kl(s, t, y)


def test_jsd_half_is_symmetric():
    s, t, y = make_inputs(2)
    a = generalized_jsd(s, t, y, beta=0.5, temperature=1.5)
    b = generalized_jsd(t, s, y, beta=0.5, temperature=1.5)
    torch.testing.assert_close(a, b, rtol=TIGHT, atol=0.0)


def test_skew_limits():
    s, t, y = make_inputs(3)
    assert torch.equal(skew_forward_kl(s, t, y, alpha=0.0), forward_kl(s, t, y))
    assert torch.equal(skew_reverse_kl(s, t, y, alpha=0.0), reverse_kl(s, t, y))
    # alpha = 1 compares a distribution with itself
    assert skew_forward_kl(s, t, y, alpha=1.0).item() == 0.0
    assert skew_reverse_kl(s, t, y, alpha=1.0).item() == 0.0
    # continuity towards alpha = 0
    torch.testing.assert_close(
        skew_forward_kl(s, t, y, alpha=1e-12), forward_kl(s, t, y), rtol=1e-5, atol=0.0
    )


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_identical_inputs_give_zero(name, kw):
    s, _, y = make_inputs(4)
    out = call(name, s, s.detach().clone(), y, **kw)
    assert abs(out.item()) < 1e-6


def test_nonnegative_over_random_inputs():
    for seed in range(20):
        scale = [0.1, 1.0, 5.0, 30.0][seed % 4]  # 30: near one-hot, tiny probabilities
        s, t, y = make_inputs(100 + seed, scale=scale)
        with torch.no_grad():
            for name, kw in CASES:
                out = call(name, s, t, y, **kw)
                assert torch.isfinite(out), (name, kw, seed)
                assert out.item() >= -1e-6, (name, kw, seed, out.item())


def test_extreme_logits_stay_finite():
    """Probabilities that underflow to 0 (and -inf logits) give no NaN in value or gradient."""
    s, t, y = make_inputs(5, scale=1.0)
    with torch.no_grad():
        s[..., 0] = 200.0  # softmax underflows every other entry at float32
        t[..., 1] = -float("inf")  # a vocabulary entry the teacher forbids
    for name, kw in CASES:
        s.grad = None
        out = call(name, s, t, y, **kw)
        out.backward()
        assert torch.isfinite(out), (name, kw)
        assert torch.isfinite(s.grad).all(), (name, kw)


# ---------------------------------------------------------------------------- masking


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_do_not_matter(name):
    s, t, y = make_inputs(6)
    masked = y == -100
    assert masked.any()
    base = call(name, s, t, y, temperature=1.3)
    base.backward()
    grad = s.grad.clone()
    assert (grad[masked] == 0).all()

    s2 = s.detach().clone()
    t2 = t.clone()
    s2[masked] = torch.randn_like(s2[masked]) * 100
    t2[masked] = torch.randn_like(t2[masked]) * 100
    s2.requires_grad_(True)
    other = call(name, s2, t2, y, temperature=1.3)
    assert torch.equal(base, other)
    other.backward()
    assert torch.equal(s2.grad, grad)


def test_cross_entropy_masked_positions_do_not_matter():
    s, _, y = make_inputs(7)
    masked = y == -100
    base = cross_entropy(s, y)
    base.backward()
    assert (s.grad[masked] == 0).all()
    s2 = s.detach().clone()
    s2[masked] = 1e4
    assert torch.equal(cross_entropy(s2, y), base)


@pytest.mark.parametrize("name", [*NAMES, "ce"])
def test_all_masked_gives_zero_and_zero_grad(name):
    s, t, _ = make_inputs(8)
    y = torch.full((B, N), -100)
    out = cross_entropy(s, y) if name == "ce" else call(name, s, t, y)
    assert out.dtype == torch.float32
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    # also with a global count from other micro-batches, and without autograd
    assert cross_entropy(s, y, num_valid=7).item() == 0.0
    with torch.no_grad():
        assert divergence("jsd", s, t, y, num_valid=0).item() == 0.0


def test_count_valid():
    y = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    assert count_valid(y) == 3 and isinstance(count_valid(y), int)
    assert count_valid(torch.full((2, 4), -100)) == 0


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize(("name", "kw"), [*CASES, ("ce", {})])
def test_chunked_equals_unchunked(name, kw):
    s, t, y = make_inputs(9, b=4, n=6)

    def run(chunk_size):
        x = s.detach().clone().requires_grad_(True)
        if name == "ce":
            out = cross_entropy(x, y, chunk_size=chunk_size)
        else:
            out = call(name, x, t, y, chunk_size=chunk_size, **kw)
        out.backward()
        return out, x.grad

    ref_val, ref_grad = run(None)
    for chunk_size in (1, 3, 7, 1000):
        val, grad = run(chunk_size)
        torch.testing.assert_close(val, ref_val, rtol=TIGHT, atol=0.0)
        torch.testing.assert_close(grad, ref_grad, rtol=TIGHT, atol=1e-9)


def test_default_chunking_splits_large_vocab(monkeypatch):
    """The default chunk is derived from V; force a tiny budget to exercise it."""
    s, t, y = make_inputs(10)
    ref = forward_kl(s, t, y)
    monkeypatch.setattr(losses, "_CHUNK_BYTES", 4 * V * 2)  # two rows per chunk
    assert losses._default_chunk_rows(V) == 2
    torch.testing.assert_close(forward_kl(s, t, y), ref, rtol=TIGHT, atol=0.0)


def test_bf16_inputs():
    s, t, y = make_inputs(11)
    s16 = s.detach().bfloat16().requires_grad_(True)
    t16 = t.bfloat16()
    for name, kw in CASES:
        s16.grad = None
        out = call(name, s16, t16, y, chunk_size=2, **kw)
        assert out.dtype == torch.float32
        # math is float32 on the bf16 values: same as float32 inputs holding those values
        ref = call(name, s16.detach().float(), t16.float(), y, **kw)
        torch.testing.assert_close(out, ref, rtol=TIGHT, atol=1e-7)
        out.backward()
        assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()
    s16.grad = None
    cross_entropy(s16, y).backward()
    assert s16.grad.dtype == torch.bfloat16


def test_no_grad_and_teacher_gets_no_grad():
    s, t, y = make_inputs(12)
    t.requires_grad_(True)
    out = forward_kl(s, t, y)
    out.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        val = forward_kl(s, t, y)
    assert not val.requires_grad
    assert torch.equal(val, out.detach())


# ----------------------------------------------------------------------- accumulation


@pytest.mark.parametrize(("name", "kw"), [*CASES, ("ce", {})])
def test_accumulation_8x1_equals_1x8(name, kw):
    g = torch.Generator().manual_seed(13)
    s = torch.randn(8, 9, V, generator=g) * 2
    t = torch.randn(8, 9, V, generator=g) * 2
    y = torch.randint(0, V, (8, 9), generator=g)
    for i in range(8):  # ragged: sequence i has i + 1 valid tokens, then padding
        y[i, i + 1 :] = -100
    y[3] = -100  # and one micro-batch with none at all

    def loss(x, tt, yy, num_valid=None):
        if name == "ce":
            return cross_entropy(x, yy, num_valid=num_valid)
        return call(name, x, tt, yy, num_valid=num_valid, **kw)

    x_big = s.clone().requires_grad_(True)
    big = loss(x_big, t, y)
    big.backward()

    total = count_valid(y)
    x_small = s.clone().requires_grad_(True)
    acc = torch.zeros(())
    for i in range(8):
        part = loss(x_small[i : i + 1], t[i : i + 1], y[i : i + 1], num_valid=total)
        part.backward()
        acc = acc + part.detach()

    torch.testing.assert_close(acc, big.detach(), rtol=TIGHT, atol=0.0)
    torch.testing.assert_close(x_small.grad, x_big.grad, rtol=TIGHT, atol=1e-9)
    # a tensor count (e.g. all-reduced across ranks) normalises the same way
    torch.testing.assert_close(
        loss(s, t, y, num_valid=torch.tensor(total)), big.detach(), rtol=TIGHT, atol=0.0
    )


def test_num_valid_smaller_than_local_count_is_an_error():
    s, t, y = make_inputs(14)
    with pytest.raises(ValueError, match="num_valid"):
        forward_kl(s, t, y, num_valid=count_valid(y) - 1)


# --------------------------------------------------------------------------- dispatch


def test_registry_covers_every_divergence_name():
    """One list of names (sharp_core.methods), one implementation each."""
    assert tuple(DIVERGENCES) == methods.DIVERGENCES == tuple(NAMES)
    assert set(methods.DEFAULT_DIVERGENCE.values()) <= set(DIVERGENCES)


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_registry_entries_are_the_per_token_equations(name, kw):
    """Each entry on log-probabilities equals its closed form per token (no τ², no mask)."""
    s, t, _ = make_inputs(15)
    tau = kw.get("temperature", 1.0)
    log_q = torch.log_softmax(s.detach() / tau, dim=-1).reshape(-1, V)
    log_p = torch.log_softmax(t / tau, dim=-1).reshape(-1, V)
    got = DIVERGENCES[name](log_p, log_q, alpha=kw.get("alpha", 0.1), beta=kw.get("beta", 0.5))
    assert got.shape == (B * N,)
    ref = ref_per_token(name, s.detach(), t, **kw).reshape(-1) / tau**2
    _assert_close(got, ref, REL, atol=1e-6)


def test_divergence_unknown_name():
    s, t, y = make_inputs(16)
    with pytest.raises(ValueError, match="'kl_forward'"):
        divergence("kl_forward", s, t, y)


def test_argument_validation():
    s, t, y = make_inputs(17)
    with pytest.raises(ValueError, match="alpha"):
        skew_forward_kl(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, y, beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, y, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        forward_kl(s, t[..., :-1], y)
    with pytest.raises(ValueError, match="labels"):
        forward_kl(s, t, y[:, :-1])


# ------------------------------------------------------------- fused CE + D (the trainer's)


@pytest.mark.parametrize(("name", "kw"), [*CASES, ("jsd", {"beta": 0.0})])
@pytest.mark.parametrize("a", [0.5, 1.0, 0.2])
def test_logit_objective_equals_separate_ce_and_divergence(name, kw, a):
    """One fused pass = (1 − a)·CE + a·D in value and gradient, and its two reported parts
    are the separate calls' values (closed-form gradient for forward KL, autograd else)."""
    s, t, y = make_inputs(21)
    total = count_valid(y) + 3  # a global count larger than this micro-batch's
    chunk = 4  # several chunks, one of them partial
    ref_s = s.detach().clone().requires_grad_(True)
    ce = cross_entropy(ref_s, y, num_valid=total, chunk_size=chunk)
    d = call(name, ref_s, t, y, num_valid=total, chunk_size=chunk, **kw)
    ((1 - a) * ce + a * d).backward()

    extra = {"temperature": kw.get("temperature", 1.0)}
    extra.update(alpha=kw.get("alpha", 0.1), beta=kw.get("beta", 0.5))
    loss, ce_f, d_f = logit_objective(
        name, s, t, y, kd_weight=a, num_valid=total, chunk_size=chunk, **extra
    )
    assert not ce_f.requires_grad and not d_f.requires_grad
    torch.testing.assert_close(ce_f, ce.detach(), rtol=TIGHT, atol=0.0)
    torch.testing.assert_close(d_f, d.detach(), rtol=TIGHT, atol=1e-9)
    torch.testing.assert_close(loss.detach(), ((1 - a) * ce + a * d).detach(), rtol=TIGHT, atol=0)
    (loss * 3.0).backward()  # an upstream scale (the loss scaler, a weight) reaches the grad
    torch.testing.assert_close(s.grad, 3.0 * ref_s.grad, rtol=1e-5, atol=1e-8)
    assert torch.all(s.grad[y == -100] == 0)


def test_logit_objective_bf16_and_no_grad_and_tensor_count():
    s, t, y = make_inputs(22)
    total = count_valid(y)
    sb, tb = s.detach().bfloat16().requires_grad_(True), t.bfloat16()
    loss, ce, d = logit_objective("forward_kl", sb, tb, y, kd_weight=0.5, num_valid=total)
    assert loss.dtype == torch.float32
    ref = 0.5 * cross_entropy(sb, y) + 0.5 * forward_kl(sb, tb, y)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=0.0)
    loss.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()
    with torch.no_grad():
        nl, nce, nd = logit_objective(
            "skew_forward_kl", s, t, y, kd_weight=0.3, num_valid=torch.tensor(total)
        )
    torch.testing.assert_close(nce, cross_entropy(s, y).detach(), rtol=TIGHT, atol=0.0)
    torch.testing.assert_close(nd, skew_forward_kl(s, t, y).detach(), rtol=TIGHT, atol=0.0)
    torch.testing.assert_close(nl, 0.7 * nce + 0.3 * nd, rtol=TIGHT, atol=0.0)
    with pytest.raises(ValueError, match="kd_weight"):
        logit_objective("forward_kl", s, t, y, kd_weight=1.5, num_valid=total)
    with pytest.raises(ValueError, match="'kl'"):
        logit_objective("kl", s, t, y, kd_weight=0.5, num_valid=total)
