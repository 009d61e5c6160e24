"""Pruning a student from the teacher: exactness where it is exact, round trips, errors.

References: pruning to the teacher's own sizes must return the teacher (logits equal to 0
tolerance: the same weights in the same order); width pruning must equal the teacher with the
pruned heads / neurons zeroed (exact in real arithmetic; float32 tolerance 1e-5 because the
summation order of the shortened matmul differs); depth pruning must equal the teacher run
with only the kept blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sharp_core.models.prune import (
    PruneError,
    PruneTarget,
    activation_importance,
    arch_for,
    head_maps,
    magnitude_importance,
    prune,
    resolve_target,
    shape_of,
)

V, N = 97, 24
ATOL = 1e-5


def _gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=4,
            n_head=4,
            n_embd=64,
            n_inner=128,
            vocab_size=V,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )


def _opt() -> torch.nn.Module:
    return OPTForCausalLM(
        OPTConfig(
            num_hidden_layers=4,
            num_attention_heads=4,
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            vocab_size=V,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
            dropout=0.0,
        )
    )


def _llama() -> torch.nn.Module:  # GQA: 8 query heads in 4 KV groups
    return LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            hidden_size=64,
            intermediate_size=96,
            vocab_size=V,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def _qwen2() -> torch.nn.Module:  # GQA with q/k/v biases, tied embeddings
    return Qwen2ForCausalLM(
        Qwen2Config(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=64,
            intermediate_size=96,
            vocab_size=V,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def _bert() -> torch.nn.Module:
    return BertForSequenceClassification(
        BertConfig(
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_size=64,
            intermediate_size=128,
            vocab_size=V,
            max_position_embeddings=64,
            num_labels=3,
            hidden_dropout_prob=0,
            attention_probs_dropout_prob=0,
        )
    )


BUILDERS = {"gpt2": _gpt2, "opt": _opt, "llama": _llama, "qwen2": _qwen2, "bert": _bert}


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = BUILDERS[kind]().eval()
    with torch.no_grad():  # random (not default-initialised) norms and biases, so slicing shows
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _batches(n_batches: int = 3, b: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2, V, (b, N), generator=g)
        mask = torch.ones(b, N, dtype=torch.long)
        mask[0, N - 5 :] = 0  # some padding, excluded from every statistic
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_prune_to_own_sizes_returns_the_teacher(kind: str) -> None:
    teacher = _model(kind)
    res = prune(teacher, PruneTarget(), batches=_batches())
    batch = _batches(1, seed=9)[0]
    assert torch.equal(_out(res.model, batch), _out(teacher, batch))
    assert res.params_after == res.params_before
    assert res.calibration_samples == 12


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_ffn_pruning_equals_zeroed_neurons(kind: str) -> None:
    teacher = _model(kind)
    res = prune(teacher, PruneTarget(ffn=40), batches=_batches())
    ref = copy.deepcopy(teacher)
    arch = arch_for(teacher.config)
    layers = ref.get_submodule(arch.layers)
    with torch.no_grad():
        for layer, kept in zip(layers, res.selection.ffn, strict=True):
            out = layer.get_submodule(arch.mlp_out)
            drop = [j for j in range(shape_of(teacher.config).ffn) if j not in kept]
            w = out.weight
            if type(out).__name__ == "Conv1D":  # (in, out)
                w[drop, :] = 0
            else:
                w[:, drop] = 0
    batch = _batches(1, seed=9)[0]
    torch.testing.assert_close(_out(res.model, batch), _out(ref, batch), atol=ATOL, rtol=0)
    assert all(len(k) == 40 for k in res.selection.ffn)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("heads,kv", [(4, None), (4, 2), (2, 1)])
def test_gqa_head_pruning_equals_zeroed_heads(kind: str, heads: int, kv: int | None) -> None:
    teacher = _model(kind)
    s = shape_of(teacher.config)
    if kv is None and heads % s.kv_heads:
        pytest.skip("does not fit this model's groups")
    res = prune(teacher, PruneTarget(heads=heads, kv_heads=kv), batches=_batches())
    ref = copy.deepcopy(teacher)
    group = s.heads // s.kv_heads
    with torch.no_grad():
        for layer, kept, kept_kv in zip(
            ref.model.layers, res.selection.heads, res.selection.kv_heads, strict=True
        ):
            assert all(h // group in kept_kv for h in kept)  # a query head stays in its group
            for h in range(s.heads):
                if h not in kept:
                    layer.self_attn.o_proj.weight[:, h * s.head_dim : (h + 1) * s.head_dim] = 0
    batch = _batches(1, seed=9)[0]
    torch.testing.assert_close(_out(res.model, batch), _out(ref, batch), atol=ATOL, rtol=0)
    new = shape_of(res.model.config)
    assert (new.heads, new.kv_heads, new.head_dim) == (heads, kv or s.kv_heads, s.head_dim)


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama", "bert"])
def test_depth_pruning_equals_the_kept_blocks(kind: str) -> None:
    teacher = _model(kind)
    res = prune(teacher, PruneTarget(layers=[0, 2]), batches=_batches())
    arch = arch_for(teacher.config)
    ref = copy.deepcopy(teacher)
    parent, _, name = arch.layers.rpartition(".")
    blocks = ref.get_submodule(arch.layers)
    setattr(ref.get_submodule(parent), name, torch.nn.ModuleList([blocks[0], blocks[2]]))
    for j, blk in enumerate(ref.get_submodule(arch.layers)):  # the cache index follows
        attn = getattr(blk, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j
    batch = _batches(1, seed=9)[0]
    kw = {"use_cache": False} if kind != "bert" else {}
    with torch.no_grad():
        got = res.model(**batch, **kw).logits
        want = ref(**batch, **kw).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert res.selection.layers == [0, 2]


def test_gpt2_hidden_and_heads_go_together_and_stay_tied() -> None:
    teacher = _model("gpt2")
    res = prune(teacher, PruneTarget(layers=2, heads=2, ffn=64), batches=_batches())
    c = res.model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner) == (2, 2, 32, 64)
    assert res.model.lm_head.weight.data_ptr() == res.model.transformer.wte.weight.data_ptr()
    assert res.params_after < res.params_before
    out = _out(res.model, _batches(1)[0])
    assert out.shape == (4, N, V) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_pruned_model_round_trips_through_from_pretrained(kind: str, tmp_path) -> None:
    teacher = _model(kind)
    target = PruneTarget(layers=2, heads=2, ffn=48)
    res = prune(teacher, target, batches=_batches())
    res.model.save_pretrained(tmp_path)
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(teacher)
    batch = _batches(1, seed=9)[0]
    assert torch.equal(_out(loaded, batch), _out(res.model, batch))


# --------------------------------------------------------------------------- scores
def test_scores_are_deterministic_and_ignore_padding() -> None:
    teacher = _model("llama")
    a = activation_importance(teacher, _batches())
    b = activation_importance(teacher, _batches())
    for x, y in ((a.layer, b.layer), (a.head, b.head), (a.ffn, b.ffn), (a.hidden, b.hidden)):
        assert torch.equal(x, y)
    assert a.head.shape == (4, 8) and a.ffn.shape == (4, 96) and a.hidden.shape == (64,)
    assert a.samples == 12
    # changing only padded positions changes no score
    batches = _batches()
    batches[0]["input_ids"][0, N - 5 :] = 3
    c = activation_importance(teacher, batches)
    torch.testing.assert_close(c.head, a.head, atol=1e-6, rtol=1e-6)


def test_a_silenced_head_scores_zero_and_is_pruned_first() -> None:
    teacher = _model("llama")
    hd = shape_of(teacher.config).head_dim
    with torch.no_grad():  # KV group 2 (query heads 4, 5) of layer 1 gets all-zero values,
        # so both heads output exactly zero whatever they attend to
        teacher.model.layers[1].self_attn.v_proj.weight[2 * hd : 3 * hd] = 0
    imp = activation_importance(teacher, _batches())
    assert float(imp.head[1, 4]) == 0.0 and float(imp.head[1, 5]) == 0.0  # both heads of group 2
    assert float(imp.head[1].min()) == 0.0 and float(imp.head[0].min()) > 0
    res = prune(teacher, PruneTarget(heads=6, kv_heads=3), batches=_batches())
    assert 2 not in res.selection.kv_heads[1]
    assert 2 in res.selection.kv_heads[0] or len(res.selection.kv_heads[0]) == 3


def test_block_influence_ranks_an_identity_layer_last() -> None:
    teacher = _model("gpt2")
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: cos(in, out) = 1
        blk = teacher.transformer.h[2]
        blk.attn.c_proj.weight.zero_()
        blk.attn.c_proj.bias.zero_()
        blk.mlp.c_proj.weight.zero_()
        blk.mlp.c_proj.bias.zero_()
    imp = activation_importance(teacher, _batches())
    assert float(imp.layer[2]) < 1e-6 < float(imp.layer.max())
    res = prune(teacher, PruneTarget(layers=3), batches=_batches())
    assert res.selection.layers == [0, 1, 3]


def test_magnitude_scoring_needs_no_data_and_spreads_layers() -> None:
    teacher = _model("opt")
    imp = magnitude_importance(teacher)
    assert imp.samples == 0 and imp.head.shape == (4, 4)
    res = prune(teacher, PruneTarget(layers=2, ffn=64), scoring="magnitude")
    assert res.selection.layers == [0, 3]
    assert shape_of(res.model.config).ffn == 64


def test_config_overrides_set_non_shape_fields_only() -> None:
    teacher = _model("gpt2")
    res = prune(
        teacher, PruneTarget(layers=2), scoring="magnitude", config_overrides={"resid_pdrop": 0.3}
    )
    assert res.model.config.resid_pdrop == 0.3
    assert res.model.transformer.h[0].mlp.dropout.p == 0.3
    with pytest.raises(PruneError) as e:
        prune(teacher, PruneTarget(layers=2), scoring="magnitude", config_overrides={"n_head": 2})
    assert e.value.param == "spec.student.config_overrides.n_head"


def test_max_samples_caps_the_calibration_pass() -> None:
    imp = activation_importance(_model("gpt2"), _batches(), max_samples=6)
    assert imp.samples == 6


def test_head_maps_are_one_hot_rows_of_the_kept_heads() -> None:
    teacher = _model("llama")
    res = prune(teacher, PruneTarget(heads=4, kv_heads=2, layers=2), batches=_batches())
    maps = head_maps(res.selection, 8)
    assert len(maps) == 2
    for w, kept in zip(maps, res.selection.heads, strict=True):
        assert w.shape == (4, 8)
        assert torch.equal(w.sum(1), torch.ones(4))
        assert w.argmax(1).tolist() == kept


# --------------------------------------------------------------------------- bad targets
@pytest.mark.parametrize(
    "kind,target,param",
    [
        ("gpt2", PruneTarget(layers=5), "spec.student.prune.layers"),
        ("gpt2", PruneTarget(layers=0), "spec.student.prune.layers"),
        ("gpt2", PruneTarget(layers=[0, 0]), "spec.student.prune.layers"),
        ("gpt2", PruneTarget(layers=[4]), "spec.student.prune.layers"),
        ("gpt2", PruneTarget(heads=8), "spec.student.prune.heads"),
        ("gpt2", PruneTarget(heads=2, hidden=48), "spec.student.prune.heads"),
        ("gpt2", PruneTarget(hidden=40), "spec.student.prune.hidden"),
        ("gpt2", PruneTarget(ffn=1000), "spec.student.prune.ffn"),
        ("gpt2", PruneTarget(kv_heads=2), "spec.student.prune.kv_heads"),
        ("llama", PruneTarget(heads=3, kv_heads=2), "spec.student.prune.heads"),  # 3 in 2 groups
        ("llama", PruneTarget(heads=6, kv_heads=2), "spec.student.prune.heads"),  # 3 per group
        ("llama", PruneTarget(kv_heads=5), "spec.student.prune.kv_heads"),
    ],
)
def test_bad_targets_name_the_field(kind: str, target: PruneTarget, param: str) -> None:
    with pytest.raises(PruneError) as e:
        resolve_target(_model(kind).config, target)
    assert e.value.param == param, e.value.message
    assert e.value.status == 422


def test_unsupported_model_type_lists_the_supported_ones() -> None:
    m = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            num_hidden_layers=1,
            num_attention_heads=2,
            hidden_size=32,
            intermediate_size=64,
            vocab_size=V,
        )
    )
    with pytest.raises(PruneError, match="gpt2, opt, llama.*'gpt_neox'"):
        prune(m, PruneTarget(layers=1), scoring="magnitude")


def test_empty_calibration_set_is_an_error() -> None:
    with pytest.raises(PruneError, match="empty"):
        prune(_model("gpt2"), PruneTarget(layers=2), batches=[])


# --------------------------------------------------------------------------- the spec
def _spec(**student: object) -> dict:
    return {
        "teacher": {"model": "./teacher"},
        "student": {"init": "prune", "prune": {"layers": 2, "heads": 2}, **student},
        "dataset": {"source": "files", "files": ["a.txt"]},
        "method": {"name": "kd"},
    }


def test_spec_accepts_a_prune_block() -> None:
    from sharp_core.spec import parse_spec

    spec = parse_spec(_spec())
    assert spec.student.init == "prune" and spec.student.prune is not None
    assert spec.student.prune.calibration.samples == 256
    assert spec.student.prune.scoring == "activation"


@pytest.mark.parametrize(
    "change,param",
    [
        (lambda d: d.pop("teacher") and d["method"].update(name="sft"), "spec.student.init"),
        (
            lambda d: d["teacher"].update(init="prune", model=None, prune={"layers": 1}),
            "spec.teacher.init",
        ),
        (lambda d: d.update(tokenizer={"name": "gpt2"}), "spec.tokenizer.name"),
        (lambda d: d.update(tokenizer={"train": {"vocab_size": 300}}), "spec.tokenizer.train"),
        (lambda d: d["student"]["prune"].update(layers=0), "spec.student.prune.layers"),
        (lambda d: d["student"]["prune"].update(heads=0), "spec.student.prune.heads"),
        (lambda d: d["student"]["prune"].update(layers=[1, 1]), "spec.student.prune.layers"),
        (lambda d: d["student"].pop("prune"), "spec.student"),
        (lambda d: d["student"].update(model="gpt2"), "spec.student"),
        (lambda d: d["student"].update(init="config"), "spec.student"),
        (lambda d: d["student"].update(config={"model_type": "gpt2"}), "spec.student"),
    ],
)
def test_spec_refuses_bad_prune_input_naming_the_field(change, param: str) -> None:
    from sharp_core.errors import SpecError
    from sharp_core.spec import parse_spec

    d = _spec()
    change(d)
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.param == param, e.value.message


def test_target_checked_against_a_plain_config_dict_with_hf_defaults() -> None:
    from types import SimpleNamespace

    from sharp_core.models.prune_shapes import check_prune_target

    block = SimpleNamespace(layers=2, heads=None, kv_heads=None, ffn=None, hidden=None)
    s = check_prune_target(block, {"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4})
    assert (s.layers, s.heads, s.hidden, s.ffn, s.head_dim) == (2, 4, 128, 512, 32)
    big = SimpleNamespace(layers=13, heads=None, kv_heads=None, ffn=None, hidden=None)
    with pytest.raises(PruneError) as e:
        check_prune_target(big, {"model_type": "opt"})  # OPT's default: 12 layers
    assert e.value.param == "spec.student.prune.layers" and "12" in e.value.message
    gqa = SimpleNamespace(layers=None, heads=12, kv_heads=8, ffn=None, hidden=None)
    with pytest.raises(PruneError) as e:
        check_prune_target(gqa, {"model_type": "llama", "num_key_value_heads": 8})
    assert e.value.param == "spec.student.prune.heads"
