"""What a pruned student keeps: architecture tables, target sizes and their checks (torch-free).

Why a module of its own: the API refuses a target that cannot fit the teacher at submission
(a 422 naming the field), and the API process never imports torch. The scoring and trimming
that need torch live in `sharp_core.models.prune`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sharp_core.errors import SharpError, SpecError


class PruneError(SpecError):
    """The pruning target does not fit the teacher (invalid_spec, 422), or pruning itself failed
    (code prune_failed); neither is worth a retry."""


# --------------------------------------------------------------------------- architectures
# A rule slices one state-dict tensor: a list of (axis, kind). Kinds: "hidden" (channels of the
# residual stream), "q" (query-head rows, head_dim each), "kv" (key/value-head rows), "qkv"
# (GPT-2's fused c_attn: three blocks of query heads), "ffn" (MLP neurons).
_Rule = list[tuple[int, str]]


@dataclass(frozen=True)
class _Arch:
    """Where an architecture keeps its layers, projections and sizes."""

    layers: str  # dotted path of the ModuleList of blocks
    attn_out: str  # module (in a block) whose input is the concatenated head outputs
    mlp_out: str  # module (in a block) whose input is the MLP's neurons
    n_layers: str
    n_heads: str
    hidden: str
    ffn: str
    rules: tuple[tuple[str, _Rule], ...]  # (regex on the key with the layer as "{L}", rule)
    n_kv_heads: str | None = None  # GQA families only
    explicit_head_dim: bool = False  # head_dim is a config field (else hidden / heads)
    extra_hidden_fields: tuple[str, ...] = ()  # config fields that must follow hidden size


_H, _Q, _KV, _QKV, _F = "hidden", "q", "kv", "qkv", "ffn"

_GPT2 = _Arch(
    layers="transformer.h",
    attn_out="attn.c_proj",
    mlp_out="mlp.c_proj",
    n_layers="n_layer",
    n_heads="n_head",
    hidden="n_embd",
    ffn="n_inner",
    rules=(
        (r"transformer\.(wte|wpe)\.weight", [(1, _H)]),
        (r"transformer\.ln_f\.(weight|bias)", [(0, _H)]),
        (r"lm_head\.weight", [(1, _H)]),
        (r"{L}\.ln_[12]\.(weight|bias)", [(0, _H)]),
        # Conv1D stores (in, out)
        (r"{L}\.attn\.c_attn\.weight", [(0, _H), (1, _QKV)]),
        (r"{L}\.attn\.c_attn\.bias", [(0, _QKV)]),
        (r"{L}\.attn\.c_proj\.weight", [(0, _Q), (1, _H)]),
        (r"{L}\.attn\.c_proj\.bias", [(0, _H)]),
        (r"{L}\.mlp\.c_fc\.weight", [(0, _H), (1, _F)]),
        (r"{L}\.mlp\.c_fc\.bias", [(0, _F)]),
        (r"{L}\.mlp\.c_proj\.weight", [(0, _F), (1, _H)]),
        (r"{L}\.mlp\.c_proj\.bias", [(0, _H)]),
    ),
)

_OPT = _Arch(
    layers="model.decoder.layers",
    attn_out="self_attn.out_proj",
    mlp_out="fc2",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    hidden="hidden_size",
    ffn="ffn_dim",
    extra_hidden_fields=("word_embed_proj_dim",),
    rules=(
        (r"model\.decoder\.(embed_tokens|embed_positions)\.weight", [(1, _H)]),
        (r"model\.decoder\.final_layer_norm\.(weight|bias)", [(0, _H)]),
        (r"lm_head\.weight", [(1, _H)]),
        (r"{L}\.self_attn\.(q|k|v)_proj\.weight", [(0, _Q), (1, _H)]),
        (r"{L}\.self_attn\.(q|k|v)_proj\.bias", [(0, _Q)]),
        (r"{L}\.self_attn\.out_proj\.weight", [(0, _H), (1, _Q)]),
        (r"{L}\.self_attn\.out_proj\.bias", [(0, _H)]),
        (r"{L}\.(self_attn_layer_norm|final_layer_norm)\.(weight|bias)", [(0, _H)]),
        (r"{L}\.fc1\.weight", [(0, _F), (1, _H)]),
        (r"{L}\.fc1\.bias", [(0, _F)]),
        (r"{L}\.fc2\.weight", [(0, _H), (1, _F)]),
        (r"{L}\.fc2\.bias", [(0, _H)]),
    ),
)

_LLAMA = _Arch(
    layers="model.layers",
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads",
    hidden="hidden_size",
    ffn="intermediate_size",
    explicit_head_dim=True,
    rules=(
        (r"model\.embed_tokens\.weight", [(1, _H)]),
        (r"model\.norm\.weight", [(0, _H)]),
        (r"lm_head\.weight", [(1, _H)]),
        (r"{L}\.(input_layernorm|post_attention_layernorm)\.weight", [(0, _H)]),
        (r"{L}\.self_attn\.q_proj\.weight", [(0, _Q), (1, _H)]),
        (r"{L}\.self_attn\.q_proj\.bias", [(0, _Q)]),
        (r"{L}\.self_attn\.(k|v)_proj\.weight", [(0, _KV), (1, _H)]),
        (r"{L}\.self_attn\.(k|v)_proj\.bias", [(0, _KV)]),
        (r"{L}\.self_attn\.o_proj\.weight", [(0, _H), (1, _Q)]),
        (r"{L}\.self_attn\.o_proj\.bias", [(0, _H)]),
        (r"{L}\.self_attn\.(q|k)_norm\.weight", []),  # Qwen3: over head_dim, unchanged
        (r"{L}\.mlp\.(gate|up)_proj\.weight", [(0, _F), (1, _H)]),
        (r"{L}\.mlp\.down_proj\.weight", [(0, _H), (1, _F)]),
    ),
)

_BERT = _Arch(
    layers="bert.encoder.layer",
    attn_out="attention.output.dense",
    mlp_out="output.dense",
    n_layers="num_hidden_layers",
    n_heads="num_attention_heads",
    hidden="hidden_size",
    ffn="intermediate_size",
    rules=(
        (
            r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight",
            [(1, _H)],
        ),
        (r"bert\.embeddings\.LayerNorm\.(weight|bias)", [(0, _H)]),
        (r"bert\.pooler\.dense\.weight", [(0, _H), (1, _H)]),
        (r"bert\.pooler\.dense\.bias", [(0, _H)]),
        (r"classifier\.weight", [(1, _H)]),
        (r"classifier\.bias", []),
        (r"{L}\.attention\.self\.(query|key|value)\.weight", [(0, _Q), (1, _H)]),
        (r"{L}\.attention\.self\.(query|key|value)\.bias", [(0, _Q)]),
        (r"{L}\.attention\.output\.dense\.weight", [(0, _H), (1, _Q)]),
        (r"{L}\.attention\.output\.dense\.bias", [(0, _H)]),
        (r"{L}\.(attention\.output|output)\.LayerNorm\.(weight|bias)", [(0, _H)]),
        (r"{L}\.intermediate\.dense\.weight", [(0, _F), (1, _H)]),
        (r"{L}\.intermediate\.dense\.bias", [(0, _F)]),
        (r"{L}\.output\.dense\.weight", [(0, _H), (1, _F)]),
        (r"{L}\.output\.dense\.bias", [(0, _H)]),
    ),
)

ARCHITECTURES: dict[str, _Arch] = {
    "gpt2": _GPT2,
    "opt": _OPT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "bert": _BERT,
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


def arch_for(config: Any, param: str = "spec.student.prune") -> _Arch:
    """The architecture table of a config, or a clear error listing the supported types."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise PruneError(
            f"pruning supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"the teacher is '{mt}'",
            param=param,
        )
    if mt == "opt" and getattr(config, "word_embed_proj_dim", None) != config.hidden_size:
        raise PruneError(
            "pruning an OPT model whose word_embed_proj_dim differs from hidden_size "
            "(project_in/project_out, as in opt-350m) is not supported",
            param=param,
        )
    if mt == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise PruneError(
            "pruning a post-LayerNorm OPT model (do_layer_norm_before=false) is not supported",
            param=param,
        )
    return ARCHITECTURES[mt]


@dataclass(frozen=True)
class Shape:
    """The sizes pruning can change, read from a config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int


def shape_of(config: Any) -> Shape:
    a = arch_for(config)
    heads = int(getattr(config, a.n_heads))
    hidden = int(getattr(config, a.hidden))
    kv = int(getattr(config, a.n_kv_heads) or heads) if a.n_kv_heads else heads
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    ffn = getattr(config, a.ffn, None) or 4 * hidden  # GPT-2's n_inner=None means 4·n_embd
    return Shape(int(getattr(config, a.n_layers)), heads, kv, head_dim, hidden, int(ffn))


@dataclass(frozen=True)
class PruneTarget:
    """What the student keeps. None keeps the teacher's size on that axis.

    `layers` is a count (the highest-scoring layers are kept) or the explicit teacher layer
    indices to keep. `kv_heads` (GQA only) below the teacher's count drops whole KV groups.
    """

    layers: int | Sequence[int] | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    hidden: int | None = None


def resolve_target(config: Any, target: PruneTarget, param: str = "spec.student.prune") -> Shape:
    """The student's shape, or a PruneError naming the offending field.

    Why here and not only at training time: the API calls this at submission with the teacher's
    config so a target that cannot fit is a 422, not a failed job an hour later.
    """
    a = arch_for(config, param)
    t = shape_of(config)
    # Each axis is checked on its own and every misfit reported at once (a target with too
    # many layers and too many heads names both); the cross-axis rules below need them sane.
    found: list[SharpError] = []
    layers = t.layers
    if isinstance(target.layers, int):
        layers = target.layers
    elif target.layers is not None:
        kept = list(target.layers)
        if len(set(kept)) != len(kept) or any(not 0 <= i < t.layers for i in kept):
            found.append(
                PruneError(
                    f"layers must be distinct teacher layer indices in [0, {t.layers})",
                    param=f"{param}.layers",
                )
            )
        layers = len(kept)
    if not found and not 1 <= layers <= t.layers:
        found.append(
            PruneError(
                f"layers must be between 1 and the teacher's {t.layers}, got {layers}",
                param=f"{param}.layers",
            )
        )

    def size(name: str, value: int | None, full: int) -> int:
        if value is None:
            return full
        if not 1 <= value <= full:
            found.append(
                PruneError(
                    f"{name} must be between 1 and the teacher's {full}, got {value}",
                    param=f"{param}.{name}",
                )
            )
            return full
        return value

    heads = size("heads", target.heads, t.heads)
    kv = size("kv_heads", target.kv_heads, t.kv_heads) if a.n_kv_heads else heads
    ffn = size("ffn", target.ffn, t.ffn)
    hidden = size("hidden", target.hidden, t.hidden)
    if found:
        raise SharpError.combined(found)
    if a.n_kv_heads:
        group = t.heads // t.kv_heads
        if target.kv_heads is None:  # keep as many KV groups as the head count allows
            fits = [d for d in range(1, t.kv_heads + 1) if heads % d == 0 and heads // d <= group]
            kv = max(fits, default=t.kv_heads)
        if heads % kv or heads // kv > group:
            raise PruneError(
                f"{heads} query heads do not fit {kv} KV groups of at most {group} heads "
                f"(the teacher has {t.heads} heads in {t.kv_heads} groups): heads must be a "
                f"multiple of kv_heads and heads/kv_heads at most {group}",
                param=f"{param}.heads",
            )
    elif target.kv_heads is not None:
        raise PruneError(
            f"kv_heads applies to grouped-query models only ({config.model_type} has none)",
            param=f"{param}.kv_heads",
        )
    if not a.explicit_head_dim:
        # GPT-2, OPT and BERT derive head_dim = hidden / heads: heads and hidden go together.
        if target.hidden is None and target.heads is not None:
            hidden = heads * t.head_dim
        elif target.heads is None and target.hidden is not None:
            if hidden % t.head_dim:
                raise PruneError(
                    f"hidden must be a multiple of the teacher's head size {t.head_dim} for "
                    f"{config.model_type}, got {hidden}",
                    param=f"{param}.hidden",
                )
            heads = hidden // t.head_dim
        if heads * t.head_dim != hidden:
            raise PruneError(
                f"{config.model_type} computes head_dim as hidden/heads, so hidden must equal "
                f"heads × {t.head_dim} (the teacher's head size): {heads} heads need hidden "
                f"{heads * t.head_dim}, got {hidden}",
                param=f"{param}.heads",
            )
        kv = heads
    return Shape(layers, heads, kv, t.head_dim, hidden, ffn)


# Transformers' defaults for the fields above, for a config given as a plain dict (a spec's
# inline `config` or a config.json) without importing transformers (and so torch) in the API.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_inner": None},
    "opt": {
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_size": 768,
        "ffn_dim": 3072,
        "word_embed_proj_dim": None,  # None: the same as hidden_size
        "do_layer_norm_before": True,
    },
    "llama": {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "head_dim": None,
    },
    "bert": {
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_size": 768,
        "intermediate_size": 3072,
    },
}
for _alias in ("mistral", "qwen2", "qwen3"):
    _DEFAULTS[_alias] = _DEFAULTS["llama"]


class ConfigView:
    """Attribute access to a config dict, with transformers' defaults for the shape fields."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = dict(data)
        mt = self._data.get("model_type")
        if mt == "opt" and self._data.get("word_embed_proj_dim") is None:
            self._data["word_embed_proj_dim"] = self._data.get("hidden_size", 768)

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__["_data"]
        if name in data:
            return data[name]
        return _DEFAULTS.get(data.get("model_type", ""), {}).get(name)


def target_of(prune: Any) -> PruneTarget:
    """The PruneTarget of a spec's `student.prune` block."""
    return PruneTarget(
        layers=prune.layers,
        heads=prune.heads,
        kv_heads=prune.kv_heads,
        ffn=prune.ffn,
        hidden=prune.hidden,
    )


def check_prune_target(prune: Any, teacher_config: Mapping[str, Any] | Any) -> Shape:
    """Refuse a `student.prune` block that cannot fit the teacher (a 422 naming the field).

    `teacher_config` is a transformers config or a plain dict (config.json, inline config
    with its overrides applied).
    """
    cfg = ConfigView(teacher_config) if isinstance(teacher_config, Mapping) else teacher_config
    return resolve_target(cfg, target_of(prune))
