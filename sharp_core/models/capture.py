"""Capture attention probabilities without eager attention and without `output_attentions`.

Why: SHARP needs each mapped layer's exact softmax P (B×H×N×N), but eager attention plus
`output_attentions=True` costs +60% time and memory (design doc, "Efficiency requirements").
Instead a custom attention function, registered with transformers' `AttentionInterface` under
the name ``"sharp_capture"``, wraps `sdpa_attention_forward` (the forward is bit-identical to
plain SDPA) and, for the layers a live `AttentionCapture` asked for, keeps a reference to the
post-positional query and key tensors it receives (RoPE already applied), the scaling, and the
mask / causal flag SDPA used. `CapturedLayer.probs(start, end)` recomputes the softmax for a
block of queries on demand, so the loss can be computed in query chunks and never holds every
layer's H×N×N maps at once.

Masks are built by `sdpa_mask` (registered for ``"sharp_capture"`` in `AttentionMaskInterface`),
i.e. exactly as for SDPA: a boolean (B, 1, N, N) mask (True = attend) when there is padding, or
None with SDPA's `is_causal` fast path when there is not.

Layer indices: an attention module that carries an integer `layer_idx` (GPT-2, OPT, Llama and
BERT all do in transformers 5) is indexed by it; otherwise the self-attention modules are
numbered in `named_modules()` order. Attention modules are the modules whose class `forward`
calls `ALL_ATTENTION_FUNCTIONS` (GPT2Attention, OPTAttention, LlamaAttention,
BertSelfAttention); cross-attention modules are skipped.

Limitations (documented, not silently wrong):
- a model whose attention does not go through `ALL_ATTENTION_FUNCTIONS` (old-style custom
  attention classes) raises `UnsupportedModelError` at construction;
- modules that share one attention module across layers (ALBERT-style) are not distinguished:
  the first call in a forward is recorded;
- `probs()` is the pre-dropout softmax; attention sinks (`s_aux`) and softcapping are not
  modelled (SDPA rejects softcapping anyway);
- with *reentrant* gradient checkpointing the student's forward runs under no_grad, so the
  captured q/k carry no graph; use non-reentrant checkpointing (recomputation in backward is
  not re-recorded: the first record of a forward wins).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import (
    create_position_bias_mask,
    sdpa_attention_forward,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sharp_core.errors import SharpError, SpecError

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionCapture",
    "CapturedLayer",
    "UnsupportedModelError",
    "attention_shape",
    "find_attention_modules",
    "register_capture_attention",
    "sharp_capture_attention",
]

ATTN_IMPLEMENTATION = "sharp_capture"

# Name of the per-module slot holding the live captures for that module: a list of
# (AttentionCapture, layer index). Read through `module.__dict__` so that an unarmed module
# costs one dict lookup (nn.Module.__getattr__ would raise and catch an AttributeError).
_SLOT = "_sharp_capture_sinks"

# Path components and class-name fragments that mark cross-attention (encoder-decoder models:
# GPT-2 `crossattention`, BERT `crossattention.self`, BART/Whisper `encoder_attn`).
_CROSS_NAMES = frozenset({"crossattention", "cross_attention", "cross_attn", "encoder_attn"})


class UnsupportedModelError(SharpError):
    """The model's attention cannot be captured (it does not use `AttentionInterface`)."""

    code = "unsupported_model"
    status = 422
    retryable = False


@dataclass
class CapturedLayer:
    """One layer's attention inputs, as the attention function received them.

    Nothing is detached: the student's query/key keep their autograd graph, so a loss on
    `probs()` backpropagates into the student's projections (and RoPE has no parameters).
    The teacher runs under no_grad, where no graph exists in the first place.
    """

    query: Tensor  # (B, H, Nq, D) post-positional (RoPE applied; OPT: already scaled)
    key: Tensor  # (B, H_kv, Nk, D) post-positional; cropped to Nq if SDPA cropped it
    scaling: float  # the softmax scale SDPA used (1/sqrt(D) when the model passed None)
    mask: Tensor | None  # bool (True = attend) or additive float, broadcastable to (B, H, Nq, Nk)
    is_causal: bool  # effective flag SDPA used (upper-left aligned causal mask when True)

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def seq_len(self) -> int:
        """Number of query rows (= key length N in the usual no-cache forward)."""
        return self.query.shape[2]

    def key_extent(self, end: int) -> int:
        """How many leading keys queries before ``end`` can attend: ``end`` under SDPA's
        causal flag (upper-left aligned, no mask), every key otherwise. Keys past it carry
        exactly zero probability, so chunked consumers may skip them (half the work)."""
        n_k = self.key.shape[2]
        return min(end, n_k) if self.is_causal and self.mask is None else n_k

    def probs(self, start: int = 0, end: int | None = None, keys: int | None = None) -> Tensor:
        """(B, H, end-start, Nk) float32: the exact softmax the model computes for queries [start, end).

        ``keys``: return only the first ``keys`` columns, (B, H, end-start, keys); it must be
        at least `key_extent` (end) so that the dropped columns are zeros of the full rows.

        Rows with no attendable key (e.g. left-padding queries under a causal mask) are all
        zeros, not NaN. Masked logits are filled with float32's finite minimum instead of -inf
        so that such rows stay finite in the backward pass too (a NaN there would poison the
        student's gradients even where it is multiplied by zero). Computed in float32 with
        autocast off: with bf16 inputs this matches a fused kernel's fp32 accumulation.
        No host synchronisation happens here.
        """
        n_q = self.query.shape[2]
        end = n_q if end is None else end
        if not 0 <= start <= end <= n_q:
            raise ValueError(f"query range [{start}, {end}) outside [0, {n_q})")
        n_all = self.key.shape[2]
        keys = n_all if keys is None else keys
        if not self.key_extent(end) <= keys <= n_all:
            raise ValueError(
                f"keys={keys} would drop attended keys: queries before {end} attend "
                f"{self.key_extent(end)} of {n_all}"
            )
        with torch.autocast(device_type=self.query.device.type, enabled=False):
            q = self.query[:, :, start:end].float() * self.scaling  # (B, H, n, D)
            k = self.key[:, :, :keys].float()  # (B, H_kv, Nk, D)
            b, h, n, d = q.shape
            h_kv, n_k = k.shape[1], k.shape[2]
            if h == h_kv:
                scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, n, Nk)
            else:
                # GQA, repeat_kv semantics: query head i uses key head i // (H / H_kv). The
                # query heads of one key head are stacked as rows of one batched matmul, so keys
                # are never repeated (nor broadcast, which matmul would copy).
                if h % h_kv:
                    raise ValueError(f"{h} query heads not a multiple of {h_kv} key heads")
                rep = h // h_kv
                scores = torch.matmul(
                    q.reshape(b, h_kv, rep * n, d),  # (B, H_kv, rep·n, D)
                    k.transpose(-1, -2),  # (B, H_kv, D, Nk)
                ).reshape(b, h, n, n_k)  # (B, H, n, Nk)

            lowest = torch.finfo(torch.float32).min
            valid: Tensor | None = None  # (B|1, H|1, n, 1): row has at least one attendable key
            if self.mask is not None:
                m = self.mask
                while m.dim() < 4:
                    m = m.unsqueeze(0)
                if m.shape[-2] != 1:
                    m = m[..., start:end, :]  # (B|1, H|1, n, Nk)
                m = m[..., :keys]
                if m.dtype == torch.bool:
                    scores = scores.masked_fill_(~m, lowest)  # in place: matmul keeps no output
                    valid = m.any(dim=-1, keepdim=True)
                else:
                    # Additive mask (transformers uses finfo(dtype).min for "masked").
                    valid = (m > torch.finfo(m.dtype).min).any(dim=-1, keepdim=True)
                    scores = (scores + m.float()).clamp_min(lowest)
            elif self.is_causal and n_k > start:
                # upper-left aligned as SDPA's is_causal; keys before `start` are kept by every
                # row of the chunk, so only the columns from `start` on need masking
                q_pos = torch.arange(start, end, device=scores.device)  # (n,)
                k_pos = torch.arange(start, n_k, device=scores.device)  # (Nk - start,)
                drop = k_pos[None, :] > q_pos[:, None]  # (n, Nk - start)
                scores[..., start:].masked_fill_(drop, lowest)

            p = torch.softmax(scores, dim=-1)  # (B, H, n, Nk)
            if valid is not None:
                # fully masked rows -> 0 (finite uniform row before); softmax's backward needs
                # its output, so in place only without a graph
                p = p * valid if p.requires_grad else p.mul_(valid)
        return p


def _record(
    sinks: list[tuple[AttentionCapture, int]],
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    position_bias: Tensor | None,
) -> None:
    """Store what SDPA is about to use, replicating `sdpa_attention_forward`'s own decisions."""
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    mask = attention_mask
    if causal and key.shape[2] > q_len:
        # SDPA crops keys for a prefill into an empty static cache (upper-left causal alignment)
        key = key[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        # Models with a learned bias (T5-like) fold it into a float mask exactly as SDPA does.
        mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    rec = CapturedLayer(
        query=query,
        key=key,
        scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
        mask=mask,
        is_causal=causal,
    )
    for capture, layer in sinks:
        # First record of a forward wins: a gradient-checkpointing recompute in backward (or a
        # shared module called twice) must not replace the forward's tensors.
        if layer not in capture.layers:
            capture.layers[layer] = rec


def sharp_capture_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """`AttentionInterface` function: SDPA, plus a record for armed layers.

    Unarmed modules cost one dict lookup; the SDPA call is the very same as plain "sdpa", so
    outputs are bit-identical. No host synchronisation.
    """
    sinks = module.__dict__.get(_SLOT)
    if sinks:
        _record(
            sinks,
            module,
            query,
            key,
            attention_mask,
            scaling,
            is_causal,
            kwargs.get("position_bias"),
        )
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def register_capture_attention() -> None:
    """Register "sharp_capture" (attention + SDPA mask builder) once; idempotent."""
    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not sharp_capture_attention:
        AttentionInterface.register(ATTN_IMPLEMENTATION, sharp_capture_attention)
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not sdpa_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


register_capture_attention()


_USES_INTERFACE: dict[type, bool] = {}


def _uses_attention_interface(cls: type) -> bool:
    """Whether `cls.forward` dispatches through `ALL_ATTENTION_FUNCTIONS` (cached per class)."""
    cached = _USES_INTERFACE.get(cls)
    if cached is None:
        forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
        try:
            cached = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
        except (OSError, TypeError):
            cached = False
        _USES_INTERFACE[cls] = cached
    return cached


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    if "crossattention" in type(module).__name__.lower():
        return True
    return any(part in _CROSS_NAMES for part in name.split("."))


def find_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Map layer index -> self-attention module whose forward calls the attention interface.

    Uses each module's `layer_idx` when all of them carry distinct integer ones (GPT-2,
    OPT, Llama, BERT); otherwise numbers them in `named_modules()` order (e.g. models without
    `layer_idx`, or encoder-decoders whose encoder and decoder both count from 0).
    """
    found = [
        module
        for name, module in model.named_modules()
        if _uses_attention_interface(type(module)) and not _is_cross_attention(name, module)
    ]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention module using transformers' "
            "AttentionInterface; its attention cannot be captured without eager attention"
        )
    idxs = [getattr(m, "layer_idx", None) for m in found]
    if all(isinstance(i, int) for i in idxs) and len(set(idxs)) == len(idxs):
        return dict(zip(idxs, found, strict=True))  # type: ignore[arg-type]
    return dict(enumerate(found))


class AttentionCapture:
    """Context manager recording chosen layers' attention inputs on every forward of `model`.

    Construction switches `model` (and its sub-models) to the "sharp_capture" attention
    implementation once; it stays switched, costing one dict lookup per attention call when
    nothing is armed. While the context is active, each forward of the model clears `.layers`
    first and then fills `.layers[i]` for the requested layer indices only. State lives on the
    model's own attention modules (a list of (capture, layer) per module), so a teacher and a
    student captured at the same time never mix their records.
    """

    def __init__(self, model: PreTrainedModel, layers: Iterable[int]):
        register_capture_attention()
        self.model = model
        self.layers: dict[int, CapturedLayer] = {}
        modules = find_attention_modules(model)
        wanted = sorted(set(int(i) for i in layers))
        missing = [i for i in wanted if i not in modules]
        if missing:
            raise SpecError(
                f"layers {missing} not in {type(model).__name__}'s attention layers "
                f"0..{max(modules)}"
            )
        self._modules = {i: modules[i] for i in wanted}
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._switch_implementation()

    def _switch_implementation(self) -> None:
        if self.model.config._attn_implementation != ATTN_IMPLEMENTATION:
            self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for i, module in self._modules.items():
            config = getattr(module, "config", None)
            if config is None:
                config = self.model.config
            if config._attn_implementation != ATTN_IMPLEMENTATION:
                raise UnsupportedModelError(
                    f"could not switch attention layer {i} of {type(self.model).__name__} to "
                    f"{ATTN_IMPLEMENTATION!r} (it uses {config._attn_implementation!r})"
                )

    def clear(self) -> None:
        """Drop the records (and with them the references to q/k and their graphs)."""
        self.layers.clear()

    def __enter__(self) -> AttentionCapture:
        if self._hook is not None:
            raise RuntimeError("AttentionCapture is already active")
        # Clear at the start of every forward. Hooked on the base model so that calling the
        # head model or the bare base model both clear (the head model calls the base model).
        root = getattr(self.model, "base_model", None)
        root = self.model if root is None else root
        self._hook = root.register_forward_pre_hook(lambda _module, _args: self.clear())
        for i, module in self._modules.items():
            module.__dict__.setdefault(_SLOT, []).append((self, i))
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self._modules.values():
            sinks = module.__dict__.get(_SLOT, [])
            sinks[:] = [s for s in sinks if s[0] is not self]
            if not sinks:
                module.__dict__.pop(_SLOT, None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def attention_shape(model: PreTrainedModel | PreTrainedConfig) -> tuple[int, int]:
    """(num_layers, num_attention_heads) from the config (GPT-2's n_layer/n_head included)."""
    config = model if isinstance(model, PreTrainedConfig) else model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise UnsupportedModelError(f"{type(config).__name__} has none of {names}")

    return (
        first("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        first("num_attention_heads", "n_head", "num_heads", "n_heads"),
    )
