"""Fused linear losses (sharp_core.objectives.fused) against the dense path, in float32.

Reference: the logits built whole (hidden · Wᵀ + b), then ``(1 − a)·cross_entropy + a·divergence``
of sharp_core.objectives.losses (themselves checked against closed forms in test_losses.py).
Tolerance: 1e-5 relative (float32, both sides accumulate the same sums in another order).
"""

from __future__ import annotations

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


def _tiny_setup(arch: str, method: dict, tmp_path):
    """A hand-built Setup: tiny teacher and student (student head tied to its embedding,
    teacher vocabulary padded beyond the tokenizer's 33 entries), no data, no capture."""
    import transformers

    from sharp_core.spec import parse_spec
    from sharp_core.train.setup import Setup

    V = 33
    torch.manual_seed(0)
    if arch == "llama":

        def make(vocab, hidden, layers, tie):
            cfg = transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=tie,
            )  # fmt: skip
            return transformers.LlamaForCausalLM(cfg)
    else:

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
    from sharp_core.cache.teacher_cache import (
        SparseTargets,
        sparse_linear_objective,
        sparse_logit_objective,
        teacher_targets,
    )
    from sharp_core.spec import TeacherCacheSpec

    hs, ws, bs, ht, wt, _, y = _inputs(6, bias=True)
    V = ws.shape[0]
    cfg = TeacherCacheSpec(**extra)
    t = (ht @ wt.T)[..., :V]
    out = teacher_targets(t, cfg, 2.0, list(range(t.shape[0])))
    tgt = SparseTargets(
        out["ids"].long(), out["logp"], out.get("tail"),
        None if "tids" not in out else out["tids"].long(), out.get("tlogp"),
    )  # fmt: skip
    kw = dict(estimator=cfg.loss_estimator, kd_weight=0.7, temperature=2.0, num_valid=14)
    ref, ref_ce, ref_d = sparse_logit_objective(name, hs @ ws.T + bs, tgt, y, **kw)
    got, ce, d = sparse_linear_objective(
        name, hs, ws, tgt, y, student_bias=bs, chunk_size=4, vocab=V, **kw
    )
    _close(got, ref)
    _close(ce, ref_ce)
    _close(d, ref_d)
    for g, r in zip(_grads(got, hs, ws, bs), _grads(ref, hs, ws, bs), strict=True):
        _close(g, r)
