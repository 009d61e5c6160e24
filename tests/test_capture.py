"""sharp_core.models.capture: probabilities from the "sharp_capture" attention function vs eager.

Tiny random models (no downloads) of the four attention families the library must handle:
GPT-2 (fused c_attn, learned positions), OPT (query pre-scaled, scaling=1.0, its own
position ids), Llama (RoPE + GQA: 4 query heads over 2 key/value heads) and BERT
(bidirectional padding mask). The reference is the same weights run with eager attention and
`output_attentions=True`, i.e. the softmax the model actually computes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from sharp_core.errors import SpecError
from sharp_core.models.capture import (
    ATTN_IMPLEMENTATION,
    AttentionCapture,
    CapturedLayer,
    attention_shape,
    find_attention_modules,
)

VOCAB, B, N, LAYERS, HEADS = 100, 3, 12, 2, 4


def _gpt2(**kw) -> nn.Module:
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=32,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return GPT2LMHeadModel(cfg)


def _opt() -> nn.Module:
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return OPTForCausalLM(cfg)


def _llama() -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _bert() -> nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return BertModel(cfg)


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": _gpt2,
    "opt": _opt,
    "llama": _llama,
    "bert": _bert,
}
CAUSAL = {"gpt2": True, "opt": True, "llama": True, "bert": False}


def _qk_weights(arch: str, model: nn.Module, layer: int) -> list[Tensor]:
    """The parameters producing that layer's queries and keys."""
    if arch == "gpt2":
        return [model.transformer.h[layer].attn.c_attn.weight]
    if arch == "opt":
        attn = model.model.decoder.layers[layer].self_attn
        return [attn.q_proj.weight, attn.k_proj.weight]
    if arch == "llama":
        attn = model.model.layers[layer].self_attn
        return [attn.q_proj.weight, attn.k_proj.weight]
    attn = model.encoder.layer[layer].attention.self
    return [attn.query.weight, attn.key.weight]


def _models(arch: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(model to capture, eager twin, plain-sdpa twin), same weights, eval mode."""
    torch.manual_seed(0)
    model = FACTORIES[arch]().eval()
    assert model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    plain = copy.deepcopy(model)
    return model, eager, plain


def _inputs(arch: str, padding: str) -> dict[str, Tensor]:
    """Batch of 3: row 0 unpadded, rows 1-2 padded by 4 and 2 tokens on the given side."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, N), generator=g)
    if padding == "none":
        return {"input_ids": ids}
    mask = torch.ones(B, N, dtype=torch.long)
    for row, pad in ((1, 4), (2, 2)):
        if padding == "right":
            mask[row, N - pad :] = 0
        else:
            mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, 1 if arch == "opt" else 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if arch in ("gpt2", "llama"):
        # Left padding needs shifted positions (OPT derives them from the mask itself).
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    return out


def _output(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _valid_rows(inputs: dict[str, Tensor]) -> Tensor:
    """(B, 1, N, 1) bool: query rows of real tokens."""
    mask = inputs.get("attention_mask", torch.ones(B, N, dtype=torch.long))
    return mask.bool()[:, None, :, None]


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_probs_match_eager_and_output_matches_sdpa(arch: str, padding: str) -> None:
    model, eager, plain = _models(arch)
    inputs = _inputs(arch, padding)
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True)
        plain_out = _output(plain(**inputs))
        with AttentionCapture(model, range(LAYERS)) as cap:
            out = _output(model(**inputs))
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    # (1) the capture function is SDPA: same outputs as the plain-sdpa twin
    torch.testing.assert_close(out, plain_out, atol=1e-6, rtol=0)

    assert sorted(cap.layers) == list(range(LAYERS))
    valid = _valid_rows(inputs)
    for layer in range(LAYERS):
        rec = cap.layers[layer]
        assert isinstance(rec, CapturedLayer)
        assert rec.num_heads == HEADS and rec.seq_len == N
        if padding == "none":
            # no mask materialised: causal models ride SDPA's is_causal flag
            assert rec.mask is None and rec.is_causal == CAUSAL[arch]
        else:
            assert rec.mask is not None and rec.mask.dtype == torch.bool and not rec.is_causal
        p = rec.probs()
        assert p.shape == (B, HEADS, N, N) and p.dtype == torch.float32
        assert torch.isfinite(p).all()
        expected = ref.attentions[layer]
        assert expected.shape == p.shape
        diff = (p - expected).abs() * valid
        assert diff.max() <= 1e-5, f"{arch}/{padding} layer {layer}: {diff.max():.2e}"
        # every row is a distribution, or all zeros when no key is attendable
        sums = p.sum(-1)
        assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
        if padding == "left" and CAUSAL[arch]:
            assert torch.equal(p[1, :, :4], torch.zeros_like(p[1, :, :4]))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_gradient_flows_into_student_qk_like_eager(arch: str) -> None:
    """(2) A loss on probs() gives the same q/k gradients as the same loss on eager attentions."""
    model, eager, _ = _models(arch)
    inputs = _inputs(arch, "right")
    layer = 1
    weight = torch.randn(B, HEADS, N, N, generator=torch.Generator().manual_seed(2))
    weight = weight * _valid_rows(inputs)  # pad query rows are not compared (eager: noise)

    with AttentionCapture(model, [layer]) as cap:
        model(**inputs)
    (cap.layers[layer].probs() * weight).sum().backward()
    grads = [w.grad for w in _qk_weights(arch, model, layer)]

    ref = eager(**inputs, output_attentions=True)
    (ref.attentions[layer] * weight).sum().backward()
    ref_grads = [w.grad for w in _qk_weights(arch, eager, layer)]

    for g, r in zip(grads, ref_grads, strict=True):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # nothing flows into layers after the captured one from this loss
    if arch == "llama":
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        assert model.lm_head.weight.grad is None


def test_only_requested_layers_and_only_inside_context() -> None:
    """(3) Unrequested layers carry nothing; nothing is recorded outside the context."""
    model, _, _ = _models("llama")
    inputs = _inputs("llama", "none")
    cap = AttentionCapture(model, [1])
    modules = find_attention_modules(model)
    with torch.no_grad():
        model(**inputs)  # switched to sharp_capture, but not armed
        assert cap.layers == {}
        with cap:
            assert "_sharp_capture_sinks" not in modules[0].__dict__
            model(**inputs)
            assert list(cap.layers) == [1]
            first = cap.layers[1]
            model(**inputs)  # each forward replaces the previous records
            assert list(cap.layers) == [1] and cap.layers[1] is not first
            cap.clear()
            assert cap.layers == {}
        model(**inputs)
    assert cap.layers == {}
    assert all("_sharp_capture_sinks" not in m.__dict__ for m in modules.values())
    with pytest.raises(SpecError):
        AttentionCapture(model, [LAYERS])


def test_two_models_captured_at_once_do_not_mix() -> None:
    """(4) Teacher and student (same architecture, different shapes) captured simultaneously."""
    torch.manual_seed(0)
    teacher = _gpt2().eval()
    student = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_layer=3,
            n_head=2,
            n_embd=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    refs = []
    for m in (teacher, student):
        e = copy.deepcopy(m)
        e.set_attn_implementation("eager")
        refs.append(e)
    inputs = _inputs("gpt2", "left")
    with AttentionCapture(teacher, [0, 1]) as ct, AttentionCapture(student, [2]) as cs:
        with torch.no_grad():
            teacher(**inputs)
        student(**inputs)  # must not clear or overwrite the teacher's records
        # a second capture of the same student layer sees the same record
        with AttentionCapture(student, [2, 0]) as cs2:
            student(**inputs)
    assert sorted(ct.layers) == [0, 1] and list(cs.layers) == [2] and sorted(cs2.layers) == [0, 2]
    assert cs2.layers[2] is cs.layers[2]
    assert ct.layers[0].num_heads == 4 and cs.layers[2].num_heads == 2
    assert not ct.layers[0].query.requires_grad and cs.layers[2].query.requires_grad
    valid = _valid_rows(inputs)
    with torch.no_grad():
        ref_t = refs[0](**inputs, output_attentions=True).attentions
        ref_s = refs[1](**inputs, output_attentions=True).attentions
        for layer, rec in ct.layers.items():
            assert ((rec.probs() - ref_t[layer]).abs() * valid).max() <= 1e-5
        assert ((cs.layers[2].probs() - ref_s[2]).abs() * valid).max() <= 1e-5


@pytest.mark.parametrize("padding", ["none", "left"])
def test_chunks_concatenate_to_full(padding: str) -> None:
    """(5) probs(start, end) blocks are exactly the rows of probs()."""
    model, _, _ = _models("llama")
    inputs = _inputs("llama", padding)
    with torch.no_grad(), AttentionCapture(model, [0]) as cap:
        model(**inputs)
    rec = cap.layers[0]
    full = rec.probs()
    chunks = [rec.probs(0, 5), rec.probs(5, 9), rec.probs(9), rec.probs(12, 12)]
    assert chunks[-1].shape == (B, HEADS, 0, N)
    torch.testing.assert_close(torch.cat(chunks, dim=2), full, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        rec.probs(4, 13)


def test_additive_float_mask_and_decode_step_match_eager() -> None:
    """A user-supplied 4D additive mask, and a one-token decode step over a KV cache (GQA)."""
    model, eager, _ = _models("llama")
    inputs = _inputs("llama", "left")
    keep = (
        torch.tril(torch.ones(N, N, dtype=torch.bool))[None, None]
        & inputs["attention_mask"].bool()[:, None, None, :]
    )  # (B, 1, N, N)
    additive = torch.zeros(B, 1, N, N).masked_fill(~keep, torch.finfo(torch.float32).min)
    four_d = {**inputs, "attention_mask": additive}
    with torch.no_grad():
        ref = eager(**four_d, output_attentions=True)
        with AttentionCapture(model, [0, 1]) as cap:
            model(**four_d)
        valid = _valid_rows(inputs)
        for layer in range(LAYERS):
            rec = cap.layers[layer]
            assert rec.mask is not None and rec.mask.dtype == torch.float32
            p = rec.probs()
            assert ((p - ref.attentions[layer]).abs() * valid).max() <= 1e-5
            assert torch.equal(p[1, :, :4], torch.zeros_like(p[1, :, :4]))

        ids = _inputs("llama", "none")["input_ids"]
        past = eager(input_ids=ids, use_cache=True).cache
        ref_step = eager(input_ids=ids[:, :1], cache=past, output_attentions=True)
        with AttentionCapture(model, [1]) as cap:
            past = model(input_ids=ids, use_cache=True).cache
            model(input_ids=ids[:, :1], cache=past)
        rec = cap.layers[1]
        assert rec.seq_len == 1 and rec.key.shape[2] == N + 1 and not rec.is_causal
        torch.testing.assert_close(rec.probs(), ref_step.attentions[1], atol=1e-5, rtol=0)


def test_layer_discovery_and_attention_shape() -> None:
    torch.manual_seed(0)
    cross = _gpt2(add_cross_attention=True)
    found = find_attention_modules(cross)
    assert sorted(found) == [0, 1]
    assert all(found[i] is cross.transformer.h[i].attn for i in range(2))
    bert = _bert()
    found = find_attention_modules(bert)
    assert [type(found[i]).__name__ for i in range(2)] == ["BertSelfAttention"] * 2
    assert found[1] is bert.encoder.layer[1].attention.self
    for arch, factory in FACTORIES.items():
        model = factory()
        assert attention_shape(model) == (LAYERS, HEADS), arch
        assert attention_shape(model.config) == (LAYERS, HEADS), arch


# --------------------------------------------------------------- P·Q through one SDPA call


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_project_sdpa_equals_chunked_projection_and_its_gradient(arch: str, padding: str) -> None:
    """`sharp.project_sdpa` (fused attention with the basis as values) is the chunked
    float32 reference `sharp.project`, in value and in the q/k gradient, on every family and
    padding (left padding under a causal mask has rows with no key: both give zeros)."""
    from sharp_core.objectives.sharp import dct_basis, project, project_sdpa

    model, _, _ = _models(arch)
    inputs = _inputs(arch, padding)
    layer = 1
    basis = dct_basis(N, 5)
    weight = torch.randn(B, HEADS, N, 5, generator=torch.Generator().manual_seed(3))

    def run(fn: Callable[[CapturedLayer], Tensor]) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad(set_to_none=True)
        with AttentionCapture(model, [layer]) as cap:
            model(**inputs)
        pq = fn(cap.layers[layer])
        (pq * weight).sum().backward()
        return pq.detach(), [w.grad.clone() for w in _qk_weights(arch, model, layer)]

    ref, ref_grads = run(lambda rec: project(rec, basis, 4))
    got, grads = run(lambda rec: project_sdpa(rec, basis))
    assert got.shape == (B, HEADS, N, 5) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)
    if padding == "left" and CAUSAL[arch]:
        assert torch.equal(got[1, :, :4], torch.zeros_like(got[1, :, :4]))


def test_project_sdpa_additive_mask_rank_above_head_dim_and_bf16() -> None:
    """An additive float mask; r > head dim (no fused kernel: the pad logic must still hold);
    and bf16 q/k under autocast, where the fused path must upcast like the reference does."""
    from sharp_core.objectives.sharp import dct_basis, project, project_sdpa

    model, _, _ = _models("llama")
    inputs = _inputs("llama", "left")
    keep = (
        torch.tril(torch.ones(N, N, dtype=torch.bool))[None, None]
        & inputs["attention_mask"].bool()[:, None, None, :]
    )
    additive = torch.zeros(B, 1, N, N).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad(), AttentionCapture(model, [0]) as cap:
        model(**{**inputs, "attention_mask": additive})
    rec = cap.layers[0]
    assert rec.mask is not None and rec.mask.dtype == torch.float32
    head_dim = rec.query.shape[-1]
    basis = dct_basis(N, N)  # r = 12 > head dim 8
    assert basis.shape[1] > head_dim
    torch.testing.assert_close(
        project_sdpa(rec, basis), project(rec, basis, 5), atol=1e-6, rtol=1e-5
    )

    half = CapturedLayer(
        rec.query.bfloat16(), rec.key.bfloat16(), rec.scaling, rec.mask, rec.is_causal
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = project_sdpa(half, basis)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, project(half, basis, 5), atol=1e-5, rtol=1e-4)


def test_key_extent_and_key_prefix_of_probs() -> None:
    """Under SDPA's causal flag, queries before `end` attend `end` keys: the key prefix
    `probs(start, end, keys)` returns is the full rows' prefix and the rest of them is zero.
    With a mask the extent is every key, and a prefix that would drop attended keys is refused."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 2, 10, 8, generator=gen)
    causal = CapturedLayer(q, k, 8**-0.5, None, True)
    assert [causal.key_extent(e) for e in (1, 4, 10)] == [1, 4, 10]
    full = causal.probs(3, 7)  # (2, 4, 4, 10)
    # equal to float32 rounding, not bitwise: the softmax sums 7 columns here and 10 (3 of
    # them exp(-inf) = 0) in `full`, and how a CPU's vector lanes split those sums differs
    # (bitwise on one VM, 1 ulp apart on another)
    torch.testing.assert_close(causal.probs(3, 7, 7), full[..., :7], rtol=2e-6, atol=2e-7)
    assert torch.equal(full[..., 7:], torch.zeros_like(full[..., 7:]))
    with pytest.raises(ValueError, match="would drop attended keys"):
        causal.probs(3, 7, 6)
    masked = CapturedLayer(q, k, 8**-0.5, torch.ones(2, 1, 10, 10, dtype=torch.bool), False)
    assert masked.key_extent(4) == 10
    with pytest.raises(ValueError, match="would drop attended keys"):
        masked.probs(0, 4, 4)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_recomputed_projection_equals_eager_maps_and_their_gradient(
    arch: str, padding: str
) -> None:
    """The default SHARP projection (`project_recompute`: softmax chunks recomputed in
    backward) of a capture equals P·Q of the eager model's own maps, on valid rows, and so
    do the gradients on the q/k weights (Llama: 2 kv heads; BERT: bidirectional padding)."""
    from sharp_core.objectives.sharp import dct_basis, project_recompute

    model, eager, _ = _models(arch)
    inputs = _inputs(arch, padding)
    layer, basis = 1, dct_basis(N, 5)
    rows = _valid_rows(inputs).float()  # (B, 1, N, 1)
    weight = torch.randn(B, HEADS, N, 5, generator=torch.Generator().manual_seed(3)) * rows
    with AttentionCapture(model, [layer]) as cap:
        model(**inputs)
    got = project_recompute(cap.layers[layer], basis, 5)
    (got * weight).sum().backward()
    want = eager(**inputs, output_attentions=True).attentions[layer] @ basis
    (want * weight).sum().backward()
    torch.testing.assert_close(got * rows, want * rows, atol=1e-6, rtol=1e-5)
    for g, r in zip(_qk_weights(arch, model, layer), _qk_weights(arch, eager, layer), strict=True):
        assert r.grad.abs().sum() > 0
        torch.testing.assert_close(g.grad, r.grad, atol=1e-6 * r.grad.abs().max().item(), rtol=1e-5)
