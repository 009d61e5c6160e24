"""Fused linear losses (sharp_core.objectives.fused) against the dense path, in float32.

Reference: the logits built whole (hidden · Wᵀ + b), then ``(1 − a)·cross_entropy + a·divergence``
of sharp_core.objectives.losses (themselves checked against closed forms in test_losses.py).
Tolerance: 1e-5 relative (float32, both sides accumulate the same sums in another order).
"""

from __future__ import annotations

from dataclasses import replace as _replace

import pytest
import torch
import torch.nn.functional as F

from sharp_core.objectives import fused, losses

DIVS = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"]
RTOL = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"max abs err {err:.3e} vs scale {scale:.3e}"


def _inputs(seed: int = 0, B=2, N=7, Ds=12, Dt=10, V=33, Vt=40, bias=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, N, Ds, generator=g, requires_grad=True)
    ws = (torch.randn(V, Ds, generator=g) * 0.5).requires_grad_(True)
    ht = torch.randn(B, N, Dt, generator=g)
    wt = torch.randn(Vt, Dt, generator=g) * 0.5  # padded beyond the tokenizer's V
    bs = (torch.randn(V, generator=g) * 0.1).requires_grad_(True) if bias else None
    bt = torch.randn(Vt, generator=g) * 0.1 if bias else None
    y = torch.randint(0, V, (B, N), generator=g)
    y[0, :3] = losses.IGNORE_INDEX
    y[1, -1] = losses.IGNORE_INDEX
    return hs, ws, bs, ht, wt, bt, y


def _dense(name, hs, ws, bs, ht, wt, bt, y, *, a, tau, num_valid, V):
    s = hs @ ws.T + (bs if bs is not None else 0.0)  # (B, N, V)
    ce = losses.cross_entropy(s, y, num_valid=num_valid)
    if a == 0:
        return (1 - a) * ce, ce
    t = (ht @ wt.T + (bt if bt is not None else 0.0))[..., :V]
    d = losses.divergence(name, s, t, y, temperature=tau, alpha=0.2, beta=0.3, num_valid=num_valid)
    return (1 - a) * ce + a * d, ce


def _grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None])


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_dense_value_and_grads(name: str, tau: float, bias: bool) -> None:
    hs, ws, bs, ht, wt, bt, y = _inputs(bias=bias)
    V = ws.shape[0]
    n = 20  # a global count larger than this call's 10 valid tokens
    kw = dict(kd_weight=0.7, temperature=tau, alpha=0.2, beta=0.3, num_valid=n)
    loss, ce, d = fused.fused_linear_objective(
        name, hs, ws, ht, wt, y, chunk_size=3, vocab=V, student_bias=bs, teacher_bias=bt, **kw
    )
    ref, ref_ce = _dense(name, hs, ws, bs, ht, wt, bt, y, a=0.7, tau=tau, num_valid=n, V=V)
    _close(loss, ref)
    _close(ce, ref_ce)
    for g, r in zip(_grads(loss, hs, ws, bs), _grads(ref, hs, ws, bs), strict=True):
        _close(g, r)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_under_autocast_the_head_matmuls_run_in_its_dtype_like_dense(name: str) -> None:
    """Autocast's F.linear runs the head in bf16; the fused kernel casts its float32 inputs
    the same way (an H200 run showed float32 head GEMMs taking half a KD step). Against the
    dense loss under the same autocast: bf16 rounding (tolerance 2e-2), and a strictly
    different value from the float32 kernel, so the cast is real."""
    hs, ws, bs, ht, wt, bt, y = _inputs(bias=True, Ds=64, Dt=48, V=500, Vt=512, N=9)
    V = ws.shape[0]
    kw = dict(kd_weight=0.7, temperature=1.0, alpha=0.2, beta=0.3, num_valid=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = fused.fused_linear_objective(
            name, hs, ws, ht, wt, y, chunk_size=4, vocab=V, student_bias=bs, teacher_bias=bt, **kw
        )
        s = F.linear(hs, ws, bs).float()
        t = F.linear(ht, wt, bt).float()[..., :V]
    ref = 0.3 * losses.cross_entropy(s, y, num_valid=16) + 0.7 * losses.divergence(
        name, s, t, y, temperature=1.0, alpha=0.2, beta=0.3, num_valid=16
    )
    f32, _, _ = fused.fused_linear_objective(
        name, hs, ws, ht, wt, y, chunk_size=4, vocab=V, student_bias=bs, teacher_bias=bt, **kw
    )
    _close(loss, ref, rtol=2e-2)
    assert loss.item() != f32.item()
    for g, r in zip(_grads(loss, hs, ws, bs), _grads(ref, hs, ws, bs), strict=True):
        assert g.dtype == torch.float32  # back to the float32 leaves through the casts
        _close(g, r, rtol=2e-2)


def test_cross_entropy_alone_sft() -> None:
    hs, ws, _, _, _, _, y = _inputs(1)
    loss, ce, d = fused.fused_linear_objective(
        "forward_kl", hs, ws, None, None, y, kd_weight=0.0, num_valid=10, chunk_size=4
    )
    ref = losses.cross_entropy(hs @ ws.T, y, num_valid=10)
    _close(loss, ref)
    assert d.item() == 0.0
    for g, r in zip(_grads(loss, hs, ws), _grads(ref, hs, ws), strict=True):
        _close(g, r)


def test_tied_embeddings_gradient_reaches_the_shared_weight() -> None:
    """Student head = embedding (one Parameter): its gradient is the sum of both uses."""
    torch.manual_seed(0)
    V, D = 29, 8
    emb = torch.nn.Parameter(torch.randn(V, D) * 0.3)
    ids = torch.randint(0, V, (2, 6))
    y = torch.randint(0, V, (2, 6))
    ht, wt = torch.randn(2, 6, 5), torch.randn(V, 5)

    def run(use_fused: bool) -> torch.Tensor:
        h = torch.tanh(emb[ids])  # (B, N, D): the "backbone" reads the same weight
        if use_fused:
            loss = fused.fused_linear_objective(
                "jsd", h, emb, ht, wt, y, kd_weight=0.5, beta=0.3, num_valid=12, chunk_size=5
            )[0]
        else:
            loss = _dense("jsd", h, emb, None, ht, wt, None, y, a=0.5, tau=1.0, num_valid=12, V=V)[
                0
            ]
        (g,) = torch.autograd.grad(loss, emb)
        return g

    _close(run(True), run(False))


def test_grad_accumulation_two_halves_equal_one_batch() -> None:
    """num_valid is the step's global count: 2 micro-batches × 1 == 1 batch × 2."""
    hs, ws, _, ht, wt, _, y = _inputs(2)
    n = losses.count_valid(y)
    kw = dict(kd_weight=0.6, temperature=1.5, num_valid=n, chunk_size=4)
    whole = fused.fused_linear_objective("reverse_kl", hs, ws, ht, wt, y, **kw)[0]
    g_whole = _grads(whole, hs, ws)
    halves = sum(
        fused.fused_linear_objective(
            "reverse_kl", hs[i : i + 1], ws, ht[i : i + 1], wt, y[i : i + 1], **kw
        )[0]
        for i in range(2)
    )
    _close(halves, whole)
    for g, r in zip(_grads(halves, hs, ws), g_whole, strict=True):
        _close(g, r)


def test_all_masked_gives_zero_not_nan() -> None:
    hs, ws, _, ht, wt, _, y = _inputs(3)
    y = torch.full_like(y, losses.IGNORE_INDEX)
    loss, ce, d = fused.fused_linear_objective(
        "forward_kl", hs, ws, ht, wt, y, kd_weight=0.5, num_valid=0
    )
    assert loss.item() == 0.0 and ce.item() == 0.0 and d.item() == 0.0
    gh, gw = _grads(loss, hs, ws)
    assert torch.equal(gh, torch.zeros_like(hs)) and torch.equal(gw, torch.zeros_like(ws))


def test_num_valid_smaller_than_this_calls_count_is_refused() -> None:
    hs, ws, _, ht, wt, _, y = _inputs(4)
    with pytest.raises(ValueError, match="global count"):
        fused.fused_linear_objective("forward_kl", hs, ws, ht, wt, y, kd_weight=0.5, num_valid=3)


def test_default_chunk_budget() -> None:
    assert fused.default_chunk_tokens(128256) == fused.FUSED_CHUNK_BYTES // (4 * 128256)
    assert fused.default_chunk_tokens(128256) * 128256 * 4 <= fused.FUSED_CHUNK_BYTES
    assert fused.default_chunk_tokens(10**12) == 1


def test_head_of_refuses_softcapped_and_scaled_logits() -> None:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    llama = transformers.LlamaForCausalLM(cfg)
    head, why = fused.head_of(llama)
    assert head is not None and head.weight is llama.lm_head.weight and why == ""
    llama.config.final_logit_softcapping = 30.0
    head, why = fused.head_of(llama)
    assert head is None and "final_logit_softcapping" in why
    llama.config.final_logit_softcapping = None
    llama.config.logit_scale = 0.5
    assert fused.head_of(llama)[0] is None


def test_capture_hidden_gives_the_heads_input() -> None:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 32, (2, 5))
    ref = llama(input_ids=x).logits
    head, _ = fused.head_of(llama)
    assert head is not None
    with fused.capture_hidden(head) as seen:
        out = llama(input_ids=x).logits
    assert out.shape == (2, 5, 0)
    _close(seen[0] @ head.weight.T, ref)
    _close(llama(input_ids=x).logits, ref)  # the override is gone


# ------------------------------------------------------------ the trainer's micro-step


def _gemma2(vocab: int, hidden: int, layers: int, tie: bool, cap: float | None = 5.0):
    """A tiny Gemma-2 (transformers caps its logits: cap·tanh(lm_head(h)/cap)) whose head is
    scaled up so its raw logits (std ≈ 6, max ≈ 27 at cap 5) reach the cap: the cap bites."""
    import transformers

    cfg = transformers.Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, tie_word_embeddings=tie, final_logit_softcapping=cap,
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def _tiny_setup(arch: str, method: dict, tmp_path):
    """A hand-built Setup: tiny teacher and student (student head tied to its embedding,
    teacher vocabulary padded beyond the tokenizer's 33 entries), no data, no capture.
    ``arch``: both models' architecture, or "teacher/student" (e.g. "gemma2/llama")."""
    import transformers

    from sharp_core.spec import parse_spec
    from sharp_core.train.setup import Setup

    V = 33
    if "/" in arch:
        t_arch, s_arch = arch.split("/")
        S_t = _tiny_setup(t_arch, method, tmp_path)
        S_s = _tiny_setup(s_arch, method, tmp_path)
        return S_s if S_t.teacher is None else _replace(S_s, teacher=S_t.teacher)
    torch.manual_seed(0)
    if arch == "gemma2":
        make = _gemma2
    elif arch == "llama":

        def make(vocab, hidden, layers, tie):
            cfg = transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=tie,
            )  # fmt: skip
            return transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":

        def make(vocab, hidden, layers, tie):
            cfg = transformers.GPT2Config(
                vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=32,
                tie_word_embeddings=tie, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
            return transformers.GPT2LMHeadModel(cfg)

    teacher = make(40, 24, 2, False).eval().requires_grad_(False)
    student = make(V, 16, 1, True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    spec = parse_spec(
        {
            "student": {"init": "config", "config": {"model_type": "gpt2"}},
            "teacher": {"model": str(tmp_path)},
            "tokenizer": {"train": {"vocab_size": 300}},
            "dataset": {"files": [str(corpus)]},
            "method": method,
            "training": {"seq_len": 16},
        }
    )
    return Setup(
        spec=spec, device=torch.device("cpu"), tokenizer=None, vocab=V,
        teacher=None if method["name"] == "sft" else teacher, student=student, data=None,
        objective=None, student_capture=None, teacher_capture=None,
    )  # fmt: skip


def _run_step(S, batch, n_tokens):
    from sharp_core.train.step import micro_step

    S.student.zero_grad(set_to_none=True)
    terms, _ = micro_step(S, batch, n_tokens=n_tokens, n_seqs=batch["input_ids"].shape[0])
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in S.student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in terms.items()}, grads


METHODS = [
    {"name": "sft"},
    {"name": "kd", "temperature": 2.0},
    {"name": "rkl", "kd_weight": 0.6},
    {"name": "skl", "temperature": 1.5},
    {"name": "jsd", "jsd_beta": 0.3, "temperature": 2.0},
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_micro_step_fused_equals_dense(arch, method, tmp_path) -> None:
    """The trainer's step on the fused path (hidden states and heads) gives the dense
    path's terms and student gradients (tied embedding included), with a loss_mask."""
    from dataclasses import replace

    S = _tiny_setup(arch, method, tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 33, (2, 12), generator=g)
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[0, :4] = False  # a prompt: no loss there
    batch = {"input_ids": x, "loss_mask": loss_mask}
    n_tokens = int(loss_mask[:, 1:].sum()) + 5  # a global count over other micro-batches too
    dense = replace(S, logit_path="dense")
    ref, g_ref = _run_step(dense, batch, n_tokens)
    got, g_got = _run_step(S, batch, n_tokens)
    assert S.logit_path == "fused:fused_linear_objective"  # the fused path did run
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=RTOL, abs=1e-9), k
    assert set(g_got) == set(g_ref)
    for n in g_ref:
        _close(g_got[n], g_ref[n], rtol=1e-5)


def test_parity_check_fails_a_wrong_kernel(tmp_path) -> None:
    """A kernel 1% off is caught on the first micro-batch: loss_parity, both values named."""
    from dataclasses import replace

    from sharp_core.errors import LossParityError

    S = _tiny_setup("llama", {"name": "kd"}, tmp_path)

    def wrong(*args, **kw):
        loss, ce, d = fused.fused_linear_objective(*args, **kw)
        return loss * 1.01, ce, d

    x = torch.randint(0, 33, (2, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(LossParityError) as e:
        _run_step(replace(S, fused_loss=wrong), {"input_ids": x}, 22)
    assert e.value.code == "loss_parity" and e.value.param == "spec.method.logit_kernel"
    assert "kernel loss" in e.value.message and "dense loss" in e.value.message
    # the correct kernel passes, and the check runs once (the first micro-batch)
    _run_step(S, {"input_ids": x}, 22)
    assert S.logit_path == "fused:fused_linear_objective"


def test_select_kernel() -> None:
    from sharp_core.errors import SpecError

    k, name = fused.select_kernel("auto", "jsd", torch.device("cpu"))
    assert k is fused.fused_linear_objective and name == "torch"
    assert fused.select_kernel("torch", "jsd", torch.device("cpu"))[1] == "torch"
    with pytest.raises(SpecError) as e:
        fused.select_kernel("liger", "jsd", torch.device("cpu"))
    assert e.value.param == "spec.method.logit_kernel"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["jsd", "forward_kl", "reverse_kl"])
def test_liger_kernel_passes_the_parity_check(name) -> None:
    pytest.importorskip("liger_kernel")
    hs, ws, _, ht, wt, _, y = _inputs(5, N=64, Ds=64, Dt=64, V=512, Vt=512)
    dev = torch.device("cuda")
    errs = fused.check_parity(
        fused.liger_linear_objective, name, hs.detach().to(dev), ws.detach().to(dev),
        ht.to(dev), wt.to(dev), y.to(dev), kd_weight=0.5, temperature=1.0, alpha=0.1,
        beta=0.5, vocab=512,
    )  # fmt: skip
    assert max(errs.values()) <= fused.PARITY_RTOL[torch.float32]


# ------------------------------------------------------------ the teacher-logit cache


@pytest.mark.parametrize(
    "name,estimator,extra",
    [
        ("forward_kl", "tail", {"k": 5}),
        ("jsd", "tail", {"k": 5}),
        ("forward_kl", "renormalized", {"k": 5}),
        ("forward_kl", "sampled", {"kind": "sampled", "samples": 6}),
        ("forward_kl", "tail_sampled", {"k": 4, "tail_samples": 3}),
    ],
)
def test_sparse_linear_equals_sparse_on_logits(name, estimator, extra) -> None:
    """The cache's loss chunked over the student's head == the same loss on whole logits."""
    _sparse_linear_against_logits(name, extra, seed=6, cap=None)


def _sparse_linear_against_logits(name: str, extra: dict, *, seed: int, cap: float | None) -> None:
    """`sparse_linear_objective` (the student's head chunked, capped at ``cap``) against
    `sparse_logit_objective` on the whole, capped, logits: loss, ce, d and the gradients.
    The cache's targets come from the teacher's logits capped the same way, as a capped
    teacher's forward builds them."""
    from sharp_core.cache.teacher_cache import (
        SparseTargets,
        sparse_linear_objective,
        sparse_logit_objective,
        teacher_targets,
    )
    from sharp_core.spec import TeacherCacheSpec

    hs, ws, bs, ht, wt, _, y = _inputs(seed, bias=True)
    V = ws.shape[0]
    cfg = TeacherCacheSpec(**extra)
    t_cap = None if cap is None else 2.5
    t = _cap(ht @ wt.T, t_cap)[..., :V]
    out = teacher_targets(t, cfg, 2.0, list(range(t.shape[0])))
    tgt = SparseTargets(
        out["ids"].long(), out["logp"], out.get("tail"),
        None if "tids" not in out else out["tids"].long(), out.get("tlogp"),
    )  # fmt: skip
    kw = dict(estimator=cfg.loss_estimator, kd_weight=0.7, temperature=2.0, num_valid=14)
    ref, ref_ce, ref_d = sparse_logit_objective(name, _cap(hs @ ws.T + bs, cap), tgt, y, **kw)
    caps = {} if cap is None else {"student_softcap": cap}
    got, ce, d = sparse_linear_objective(
        name, hs, ws, tgt, y, student_bias=bs, chunk_size=4, vocab=V, **caps, **kw
    )
    _close(got, ref)
    _close(ce, ref_ce)
    _close(d, ref_d)
    for g, r in zip(_grads(got, hs, ws, bs), _grads(ref, hs, ws, bs), strict=True):
        _close(g, r)


# ------------------------------------------------------------ soft-capped heads (Gemma 2 / 3)

CAPS = [(2.0, None), (None, 2.5), (2.0, 2.5)]  # (student cap, teacher cap): each side, both


def _cap(x: torch.Tensor, c: float | None) -> torch.Tensor:
    """transformers' Gemma2ForCausalLM.forward: logits / c, tanh, · c."""
    return x if c is None else torch.tanh(x / c) * c


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("caps", CAPS, ids=lambda c: f"s{c[0]}-t{c[1]}")
def test_fused_softcap_equals_dense_value_and_grads(name, caps) -> None:
    """Soft-capped student and / or teacher logits: loss, ce, d and the gradients w.r.t. the
    student's hidden states, weight and bias equal the dense loss on capped logits (rel 1e-5),
    and differ from the uncapped loss (the cap bites: raw logits reach ±6, caps 2 and 2.5)."""
    sc, tc = caps
    hs, ws, bs, ht, wt, bt, y = _inputs(3, bias=True)
    V = ws.shape[0]
    kw = dict(kd_weight=0.7, temperature=2.0, alpha=0.2, beta=0.3, num_valid=20)
    loss, ce, d = fused.fused_linear_objective(
        name, hs, ws, ht, wt, y, chunk_size=3, vocab=V, student_bias=bs, teacher_bias=bt,
        student_softcap=sc, teacher_softcap=tc, **kw,
    )  # fmt: skip
    s = _cap(hs @ ws.T + bs, sc)
    t = _cap(ht @ wt.T + bt, tc)[..., :V]
    ref, ref_ce, ref_d = losses.logit_objective(name, s, t, y, **kw)
    _close(loss, ref)
    _close(ce, ref_ce)
    _close(d, ref_d)
    for g, r in zip(_grads(loss, hs, ws, bs), _grads(ref, hs, ws, bs), strict=True):
        _close(g, r)
    plain, _, _ = fused.fused_linear_objective(
        name, hs, ws, ht, wt, y, chunk_size=3, vocab=V, student_bias=bs, teacher_bias=bt, **kw
    )
    assert abs(plain.item() - loss.item()) > 1e-3 * abs(loss.item())


def test_fused_softcap_sft_cross_entropy_alone() -> None:
    hs, ws, _, _, _, _, y = _inputs(4)
    loss, ce, _ = fused.fused_linear_objective(
        "forward_kl", hs, ws, None, None, y, kd_weight=0.0, num_valid=10, chunk_size=4,
        student_softcap=1.5,
    )  # fmt: skip
    ref = losses.cross_entropy(_cap(hs @ ws.T, 1.5), y, num_valid=10)
    _close(loss, ref)
    for g, r in zip(_grads(loss, hs, ws), _grads(ref, hs, ws), strict=True):
        _close(g, r)


def test_head_of_carries_gemma2s_softcap() -> None:
    """A Gemma-2 head is fused with its final_logit_softcapping; attn_logit_softcapping (the
    attention's) is not the head's; any other logit transform is still refused."""
    student = _gemma2(40, 32, 1, True, cap=5.0)
    head, why = fused.head_of(student)
    assert head is not None and why == "" and head.softcap == 5.0
    assert head.weight is student.lm_head.weight
    assert student.config.attn_logit_softcapping == 50.0  # set, and not taken for the head's
    plain = _gemma2(40, 32, 1, True, cap=None)
    head, why = fused.head_of(plain)
    assert head is not None and head.softcap is None
    student.config.logit_scale = 2.0
    head, why = fused.head_of(student)
    assert head is None and "logit_scale" in why


def test_capped_model_logits_are_what_the_fused_loss_sees() -> None:
    """The model's own forward logits (transformers caps them) against the fused loss on the
    captured hidden states: the same CE (rel 1e-5), and the cap bites (raw logits beyond it)."""
    model = _gemma2(40, 32, 2, True, cap=5.0).eval()
    x = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    y = x[:, 1:]
    logits = model(x).logits[:, :-1]  # (B, N-1, V), capped by the model
    head, _ = fused.head_of(model)
    assert head is not None
    with fused.capture_hidden(head) as seen:
        model(x)
    h = seen[0][:, :-1]
    raw = h @ head.weight.T
    assert raw.abs().max() > 2 * 5.0 and logits.abs().max() < 5.0  # the cap bites
    ref = losses.cross_entropy(logits, y, num_valid=y.numel())
    got, _, _ = fused.fused_linear_objective(
        "forward_kl", h, head.weight, None, None, y, kd_weight=0.0, num_valid=y.numel(),
        chunk_size=7, student_softcap=head.softcap,
    )  # fmt: skip
    _close(got, ref)


@pytest.mark.parametrize("arch", ["gemma2", "gemma2/llama", "llama/gemma2"])
@pytest.mark.parametrize("method", [METHODS[0], METHODS[1], METHODS[4]], ids=lambda m: m["name"])
def test_micro_step_fused_equals_dense_with_softcapped_heads(arch, method, tmp_path) -> None:
    """The trainer's step with Gemma-2 heads (both capped, a capped teacher, a capped student):
    the fused path (parity check included) gives the dense path's terms (the models' own
    capped logits) and every student gradient, rel 1e-5."""
    S = _tiny_setup(arch, method, tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 33, (2, 12), generator=g)
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[0, :4] = False
    batch = {"input_ids": x, "loss_mask": loss_mask}
    n_tokens = int(loss_mask[:, 1:].sum()) + 5
    ref, g_ref = _run_step(_replace(S, logit_path="dense"), batch, n_tokens)
    got, g_got = _run_step(S, batch, n_tokens)
    assert S.logit_path == "fused:fused_linear_objective"
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=RTOL, abs=1e-9), k
    assert set(g_got) == set(g_ref)
    for n in g_ref:
        _close(g_got[n], g_ref[n], rtol=1e-5)


def test_another_logit_transform_keeps_the_dense_step(tmp_path, caplog) -> None:
    """A Gemma-2 student whose config also sets logit_scale: the step takes the dense path
    and says why."""
    import logging

    S = _tiny_setup("gemma2", METHODS[1], tmp_path)
    S.student.config.logit_scale = 2.0
    x = torch.randint(0, 33, (2, 12), generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="sharp_core.train.step"):
        _run_step(S, {"input_ids": x}, 22)
    assert S.logit_path == "dense"
    assert any("logit_scale" in r.getMessage() for r in caplog.records)


def test_parity_check_catches_a_kernel_that_ignores_the_cap(tmp_path) -> None:
    """The first-micro-batch check compares against dense logits capped as the model caps
    them: a kernel that drops the student's cap fails it."""
    from sharp_core.errors import LossParityError

    S = _tiny_setup("gemma2", METHODS[1], tmp_path)

    def uncapped(*args, student_softcap=None, **kw):
        return fused.fused_linear_objective(*args, **kw)

    x = torch.randint(0, 33, (2, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(LossParityError):
        _run_step(_replace(S, fused_loss=uncapped), {"input_ids": x}, 22)
    errs = fused.check_parity(
        fused.fused_linear_objective, "jsd", torch.randn(2, 6, 12), torch.randn(33, 12) * 2,
        torch.randn(2, 6, 10), torch.randn(40, 10) * 2, torch.randint(0, 33, (2, 6)),
        kd_weight=0.5, temperature=1.0, alpha=0.1, beta=0.5, vocab=33, student_softcap=2.0,
        teacher_softcap=3.0,
    )  # fmt: skip
    assert max(errs.values()) <= 1e-5


def test_select_kernel_never_picks_liger_for_a_capped_head() -> None:
    for kernel in ("auto", "liger", "torch"):
        k, name = fused.select_kernel(kernel, "jsd", torch.device("cuda"), softcap=True)
        assert k is fused.fused_linear_objective and name == "torch"
    with pytest.raises(ValueError, match="soft-cap"):
        hs, ws, _, ht, wt, _, y = _inputs()
        fused.liger_linear_objective(
            "jsd", hs, ws, ht, wt, y, kd_weight=0.5, num_valid=10, student_softcap=2.0
        )


@pytest.mark.parametrize(
    "name,estimator,extra",
    [("forward_kl", "tail", {"k": 5}), ("jsd", "tail", {"k": 5}), ("forward_kl", "sampled",
     {"kind": "sampled", "samples": 6})],
)  # fmt: skip
def test_sparse_linear_with_a_softcapped_student(name, estimator, extra) -> None:
    """The cache's chunked loss with the student's cap == the sparse loss on capped logits."""
    _sparse_linear_against_logits(name, extra, seed=7, cap=2.0)


def test_a_capped_step_says_once_that_it_runs_on_the_torch_kernel(tmp_path, caplog) -> None:
    """With soft-capped heads and logit_kernel 'auto' / 'liger' the step logs, once, that
    the fused loss runs capped on our kernel (Liger's cannot soft-cap)."""
    import logging

    S = _tiny_setup("gemma2", {"name": "kd", "logit_kernel": "auto"}, tmp_path)
    x = torch.randint(0, 33, (2, 12), generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="sharp_core.train.step"):
        _run_step(S, {"input_ids": x}, 22)
        _run_step(S, {"input_ids": x}, 22)
    said = [r.getMessage() for r in caplog.records if "soft-capped" in r.getMessage()]
    assert len(said) == 1, said
    assert "student cap 5.0, teacher cap 5.0" in said[0] and "cannot soft-cap" in said[0]
    assert S.logit_path == "fused:fused_linear_objective"


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_softcap_under_autocast_matches_dense_to_bf16_rounding(name: str) -> None:
    """Under bf16 autocast the dense path caps bf16 logits (the model's forward), the fused
    kernel caps its float32 upcast of the same bf16 GEMM: equal to bf16 rounding (2e-2)."""
    hs, ws, bs, ht, wt, bt, y = _inputs(8, bias=True, Ds=64, Dt=48, V=500, Vt=512, N=9)
    V = ws.shape[0]
    kw = dict(kd_weight=0.7, temperature=1.0, alpha=0.2, beta=0.3, num_valid=16)
    caps = dict(student_softcap=3.0, teacher_softcap=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = fused.fused_linear_objective(
            name, hs, ws, ht, wt, y, chunk_size=4, vocab=V, student_bias=bs, teacher_bias=bt,
            **kw, **caps,
        )  # fmt: skip
        s = _cap(F.linear(hs, ws, bs), 3.0).float()
        t = _cap(F.linear(ht, wt, bt), 4.0).float()[..., :V]
    ref, _, _ = losses.logit_objective(name, s, t, y, **kw)
    _close(loss, ref, rtol=2e-2)
    for g, r in zip(_grads(loss, hs, ws, bs), _grads(ref, hs, ws, bs), strict=True):
        assert g.dtype == torch.float32
        _close(g, r, rtol=2e-2)


def test_micro_step_on_a_cache_with_a_softcapped_student(tmp_path) -> None:
    """The teacher-cache step (targets from a Gemma-2 teacher's own capped forward logits)
    with a capped Gemma-2 student: the fused sparse loss equals the dense one on the
    student's capped logits, terms and every gradient, rel 1e-5."""
    from sharp_core.cache.teacher_cache import as_batch, teacher_targets

    method = {"name": "kd", "temperature": 2.0, "teacher_cache": {"k": 6}}
    S = _tiny_setup("gemma2", method, tmp_path)
    x = torch.randint(0, 33, (2, 12), generator=torch.Generator().manual_seed(4))
    assert S.teacher is not None
    with torch.no_grad():
        t = S.teacher(input_ids=x).logits[:, :-1, :33]  # capped by the teacher's forward
    cfg = S.spec.method.teacher_cache
    batch = {"input_ids": x, **as_batch(teacher_targets(t, cfg, 2.0, [0, 1]), S.device)}
    ref, g_ref = _run_step(_replace(S, logit_path="dense"), batch, 22)
    got, g_got = _run_step(S, batch, 22)
    assert S.logit_path is None  # the cache's fused loss (no parity check there)
    assert set(got) == set(ref) and "kd" in got
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=RTOL, abs=1e-9), k
    for n in g_ref:
        _close(g_got[n], g_ref[n], rtol=1e-5)
