"""Students pruned from the teacher: importance scores and structured trimming (Minitron).

Why: a student that starts from the teacher's most important weights closes most of the gap to
the teacher in a fraction of the steps a randomly initialised one needs (Minitron, arXiv
2407.14679 / 2408.11796). The recipe here follows that work:

- scores come from forward hooks during one calibration pass under ``inference_mode``; only
  running statistics are kept, so peak extra memory is O(parameters), never
  O(activations × samples);
- a head scores by the norm of its output at the input of the attention output projection, an
  MLP neuron by its activation at the input of the second MLP projection, a hidden channel by
  the LayerNorm outputs summed over every norm of the model, and a layer by Block Influence,
  1 − cos(layer input, layer output) (ShortGPT);
- per-sample scores are the mean over the sequence, aggregated over the batch by the L2 norm
  (Minitron's best "(batch=L2, seq=mean)"); Block Influence is averaged instead, since it is a
  bounded per-token quantity;
- trimming slices the teacher's state dict and loads it into a fresh model of the same class
  built from the updated config, so the result is an ordinary Hugging Face model that
  ``from_pretrained`` loads with no custom code.

The long story (what is exact, what is not, GQA rules) is in docs/pruning.md.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sharp_core.models.prune_shapes import (
    _F,
    _H,
    _KV,
    _Q,
    _QKV,
    ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    PruneError,
    PruneTarget,
    Shape,
    _Arch,
    _Rule,
    arch_for,
    resolve_target,
    shape_of,
)
from sharp_core.ranks import ONE, Ranks

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Importance",
    "PruneError",
    "PruneResult",
    "PruneTarget",
    "Selection",
    "Shape",
    "activation_importance",
    "arch_for",
    "head_maps",
    "magnitude_importance",
    "prune",
    "resolve_target",
    "select",
    "shape_of",
    "streamed",
    "trim",
]

Scoring = Literal["activation", "magnitude"]


# --------------------------------------------------------------------------- scores
@dataclass
class Importance:
    """Scores of every prunable unit of one model; higher is more important."""

    layer: Tensor  # (L,)
    head: Tensor  # (L, H)
    ffn: Tensor  # (L, F)
    hidden: Tensor  # (D,)
    samples: int = 0  # calibration sequences seen (0 for magnitude)
    seconds: float = 0.0


def _get(root: nn.Module, dotted: str) -> Any:
    out: Any = root
    for part in dotted.split("."):
        out = getattr(out, part)
    return out


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every LayerNorm/RMSNorm over the residual stream (hidden-channel scores read these)."""
    hidden = shape_of(model.config).hidden
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        name = type(m).__name__.lower()
        if ("norm" in name) and isinstance(w, Tensor) and w.dim() == 1 and w.numel() == hidden:
            out.append(m)
    return out


class _SumSq:
    """Σ over samples of (per-sample seq-mean)²: the L2-over-batch statistic, kept running."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def add(self, per_token: Tensor, weights: Tensor) -> None:
        # per_token: (B, N, K), or (B·N, K) where a model flattens tokens (OPT's MLP);
        # weights: (B, N) 1 for real tokens, 0 for padding
        if per_token.dim() == 2:
            per_token = per_token.reshape(*weights.shape, -1)
        w = weights.to(per_token.dtype)
        mean = (per_token * w.unsqueeze(-1)).sum(1) / w.sum(1).clamp_min(1).unsqueeze(-1)
        sq = mean.float().pow(2).sum(0)  # (K,)
        self.value = sq if self.value is None else self.value + sq

    def l2(self) -> Tensor:
        assert self.value is not None
        return self.value.sqrt()


def _capped(
    batches: Iterable[dict[str, Tensor]], max_samples: int | None
) -> list[dict[str, Tensor]]:
    """The batches truncated to the first `max_samples` rows (in order)."""
    out, seen = [], 0
    for batch in batches:
        if max_samples is not None:
            left = max_samples - seen
            if left <= 0:
                break
            batch = {k: v[:left] for k, v in batch.items()}
        out.append(batch)
        seen += batch["input_ids"].shape[0]
    return out


def activation_importance(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    *,
    max_samples: int | None = None,
    ranks: Ranks = ONE,
    device: torch.device | None = None,
) -> Importance:
    """Minitron activation scores from one calibration pass (see the module docstring).

    `batches` yields dicts with `input_ids` (B, N) and optionally `attention_mask`; for a
    classifier the other keys (token_type_ids) are passed through. Deterministic for a given
    model and set of batches: nothing here draws random numbers, and dropout is off.

    Under several `ranks` (every rank passing the same batches), rank r runs batches r, r+W,
    … and the running sums are all-reduced: every rank gets the scores of the whole set (up
    to the order of float additions). ``device``: where the pass runs when the model is
    parked elsewhere (a teacher left on the CPU of a GPU box): its decoder layers visit the
    device one at a time (`streamed`), so a teacher bigger than one GPU still calibrates there.
    """
    todo = _capped(batches, max_samples)
    if not todo:
        raise PruneError("the calibration set is empty", param="spec.student.prune.calibration")
    total_rows = sum(b["input_ids"].shape[0] for b in todo)
    todo = todo[ranks.rank :: ranks.world_size]
    a = arch_for(model.config)
    s = shape_of(model.config)
    layers: nn.ModuleList = _get(model, a.layers)
    head_stats = [_SumSq() for _ in layers]
    ffn_stats = [_SumSq() for _ in layers]
    norms = _norm_modules(model)
    norm_stats = [_SumSq() for _ in norms]
    bi_sum = torch.zeros(len(layers), dtype=torch.float64)
    bi_count = torch.zeros(len(layers), dtype=torch.float64)
    mask_box: dict[str, Tensor] = {}
    hooks = []

    def pre_head(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]  # (B, N, H·hd), the heads' outputs side by side
            b, n = mask_box["m"].shape
            per_head = x.reshape(b, n, s.heads, -1).float().norm(dim=-1)  # (B, N, H)
            head_stats[i].add(per_head, mask_box["m"])

        return hook

    def pre_ffn(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            ffn_stats[i].add(args[0].float().abs(), mask_box["m"])  # (B, N, F)

        return hook

    def post_norm(k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            norm_stats[k].add(out.float().abs(), mask_box["m"])  # (B, N, D)

        return hook

    def layer_bi(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # (B, N, D)
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, N)
            m = mask_box["m"].to(cos.dtype)
            bi_sum[i] += float(((1 - cos) * m).sum())
            bi_count[i] += float(m.sum())

        return hook

    for i, layer in enumerate(layers):
        hooks.append(_get(layer, a.attn_out).register_forward_pre_hook(pre_head(i)))
        hooks.append(_get(layer, a.mlp_out).register_forward_pre_hook(pre_ffn(i)))
        hooks.append(layer.register_forward_hook(layer_bi(i), with_kwargs=True))
    for k, m in enumerate(norms):
        hooks.append(m.register_forward_hook(post_norm(k)))

    was_training = model.training
    model.eval()
    run_on = device or next(model.parameters()).device
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), streamed(model, run_on):
            for batch in todo:
                batch = {k: v.to(run_on) for k, v in batch.items()}
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                mask_box["m"] = mask if mask is not None else torch.ones_like(ids)
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if ranks.world_size > 1:  # Σ over ranks of every running sum (float64), unpacked again
        stats = [(st, s.heads) for st in head_stats] + [(st, s.ffn) for st in ffn_stats]
        stats += [(st, s.hidden) for st in norm_stats]
        flat = torch.cat(
            [
                torch.zeros(k, dtype=torch.float64, device=run_on)
                if st.value is None  # a rank that ran no batch
                else st.value.to(run_on, torch.float64)
                for st, k in stats
            ]
            + [bi_sum.to(run_on), bi_count.to(run_on)]
        )
        flat = ranks.all_reduce_sum(flat).cpu()
        at = 0
        for st, k in stats:
            st.value, at = flat[at : at + k].float(), at + k
        L = len(layers)
        bi_sum, bi_count = flat[at : at + L], flat[at + L : at + 2 * L]
    hidden = torch.stack([st.l2() for st in norm_stats]).sum(0)
    return Importance(
        layer=(bi_sum / bi_count.clamp_min(1)).float().cpu(),
        head=torch.stack([st.l2() for st in head_stats]).cpu(),
        ffn=torch.stack([st.l2() for st in ffn_stats]).cpu(),
        hidden=hidden.cpu(),
        samples=total_rows,
        seconds=time.perf_counter() - t0,
    )


@contextlib.contextmanager
def streamed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run `model`'s forward on `device` while its weights live elsewhere (the CPU): the
    modules outside the decoder layers (embeddings, final norm, head, rotary tables) move
    for the pass, each decoder layer only for its own forward. Peak device memory: those
    modules plus one layer (plus activations). Weights are moved, never cast, so they come
    back bit for bit. A no-op when the model is already on `device`."""
    first = next(model.parameters(), None)
    if first is None or first.device == device:
        yield
        return
    home = first.device
    layers: nn.ModuleList = _get(model, arch_for(model.config).layers)
    inside = {id(m) for layer in layers for m in layer.modules()} | {id(layers)}
    outside = [m for m in model.modules() if id(m) not in inside]

    def move(modules: Iterable[nn.Module], where: torch.device, recurse: bool) -> None:
        # outside inference mode: moved weights must stay ordinary tensors for training
        with torch.inference_mode(False), torch.no_grad():
            for m in modules:
                m._apply(lambda t: t.to(where), recurse=recurse)

    def arrive(m: nn.Module, _args: Any) -> None:
        move([m], device, True)

    def leave(m: nn.Module, _args: Any, _out: Any) -> None:
        move([m], home, True)

    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(arrive))
        hooks.append(layer.register_forward_hook(leave))
    try:
        move(outside, device, False)
        yield
    finally:
        for h in hooks:
            h.remove()
        move(outside, home, False)
        move(layers, home, True)


def _weight_io(module: nn.Module) -> Tensor:
    """A projection's weight as (out, in) whatever its class (GPT-2's Conv1D is (in, out))."""
    w: Tensor = module.weight.detach().float()  # type: ignore[operator]
    return w.t() if type(module).__name__ == "Conv1D" else w


def magnitude_importance(model: Any) -> Importance:
    """Data-free scores: the norms of the weights that read each unit's output.

    Layers have no weight-only analogue of Block Influence, so every layer scores the same and
    a layer count keeps them evenly spread (first and last included), like the layer map.
    """
    a = arch_for(model.config)
    s = shape_of(model.config)
    layers: nn.ModuleList = _get(model, a.layers)
    heads, ffn = [], []
    t0 = time.perf_counter()
    hidden = torch.zeros(s.hidden)
    for layer in layers:
        o = _weight_io(_get(layer, a.attn_out))  # (D, H·hd)
        heads.append(o.reshape(o.shape[0], s.heads, -1).pow(2).sum((0, 2)).sqrt())
        down = _weight_io(_get(layer, a.mlp_out))  # (D, F)
        ffn.append(down.norm(dim=0))
        hidden += o.norm(dim=1) + down.norm(dim=1)
    emb = model.get_input_embeddings().weight.detach().float()  # (V, D)
    hidden += emb.norm(dim=0)
    n = len(layers)
    return Importance(
        layer=torch.zeros(n),
        head=torch.stack(heads),
        ffn=torch.stack(ffn),
        hidden=hidden,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """Teacher indices the student keeps, each list sorted (order preserved)."""

    layers: list[int]
    heads: list[list[int]]  # per kept layer: teacher query heads
    kv_heads: list[list[int]]  # per kept layer: teacher KV heads
    ffn: list[list[int]]  # per kept layer: teacher neurons
    hidden: list[int]


def _top(scores: Tensor, k: int) -> list[int]:
    # stable: ties go to the lower index, so a constant score keeps the first k
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def _spread(n: int, k: int) -> list[int]:
    """k of n layers evenly spread with the first and last kept (the uniform layer map)."""
    if k == 1:
        return [n - 1]
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def select(config: Any, imp: Importance, target: PruneTarget) -> Selection:
    s = shape_of(config)
    new = resolve_target(config, target)
    if target.layers is not None and not isinstance(target.layers, int):
        layers = sorted(target.layers)
    elif new.layers == s.layers:
        layers = list(range(s.layers))
    elif bool((imp.layer == 0).all()):
        layers = _spread(s.layers, new.layers)
    else:
        layers = _top(imp.layer, new.layers)
    group = s.heads // s.kv_heads
    keep_group = new.heads // new.kv_heads
    heads, kv_heads, ffn = [], [], []
    for i in layers:
        hs = imp.head[i]
        if s.kv_heads == s.heads and new.kv_heads == new.heads:  # plain multi-head attention
            q = _top(hs, new.heads)
            kv = q
        else:  # GQA: keep whole groups by summed score, then heads within each kept group
            by_group = hs.reshape(s.kv_heads, group)
            kv = _top(by_group.sum(1), new.kv_heads)
            q = [g * group + h for g in kv for h in _top(by_group[g], keep_group)]
        heads.append(q)
        kv_heads.append(kv)
        ffn.append(_top(imp.ffn[i], new.ffn))
    return Selection(layers, heads, kv_heads, ffn, _top(imp.hidden, new.hidden))


# --------------------------------------------------------------------------- trimming
def _expand(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _slice(t: Tensor, rule: _Rule, idx: dict[str, list[int]]) -> Tensor:
    for axis, kind in rule:
        t = t.index_select(axis, torch.tensor(idx[kind], dtype=torch.long, device=t.device))
    return t


def _new_config(config: Any, a: _Arch, shape: Shape) -> Any:
    cfg = copy.deepcopy(config)
    setattr(cfg, a.n_layers, shape.layers)
    setattr(cfg, a.n_heads, shape.heads)
    setattr(cfg, a.hidden, shape.hidden)
    setattr(cfg, a.ffn, shape.ffn)
    if a.n_kv_heads:
        setattr(cfg, a.n_kv_heads, shape.kv_heads)
    if a.explicit_head_dim:
        cfg.head_dim = shape.head_dim
    for f in a.extra_hidden_fields:
        setattr(cfg, f, shape.hidden)
    return cfg


def _shape_from_selection(config: Any, sel: Selection) -> Shape:
    s = shape_of(config)
    return Shape(
        len(sel.layers),
        len(sel.heads[0]),
        len(sel.kv_heads[0]),
        s.head_dim,
        len(sel.hidden),
        len(sel.ffn[0]),
    )


def trim(
    model: nn.Module, sel: Selection, config_overrides: dict[str, Any] | None = None
) -> nn.Module:
    """A fresh model of the same class holding the selected slice of `model`'s weights.

    ``config_overrides`` change fields that do not shape the weights (dropout, say); a
    shape field there is refused, since the pruning target decides those."""
    a = arch_for(model.config)
    s = shape_of(model.config)
    new_shape = _shape_from_selection(model.config, sel)
    cfg = _new_config(model.config, a, new_shape)
    shape_fields = {a.n_layers, a.n_heads, a.hidden, a.ffn, a.n_kv_heads, "head_dim", "vocab_size"}
    shape_fields |= set(a.extra_hidden_fields)
    for k, v in (config_overrides or {}).items():
        if k in shape_fields:
            raise PruneError(
                f"'{k}' is set by the pruning target, not by config_overrides",
                param=f"spec.student.config_overrides.{k}",
            )
        setattr(cfg, k, v)
    if hasattr(cfg, "layer_types") and isinstance(cfg.layer_types, list):
        cfg.layer_types = [cfg.layer_types[i] for i in sel.layers]
    rules = [
        (re.compile(pat.replace("{L}", re.escape(a.layers) + r"\.(\d+)") + "$"), r)
        for pat, r in a.rules
    ]
    layer_key = re.compile(re.escape(a.layers) + r"\.(\d+)\.")
    new_index = {old: new for new, old in enumerate(sel.layers)}
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        m = layer_key.match(key)
        j = None
        if m:
            old = int(m.group(1))
            if old not in new_index:
                continue
            j = new_index[old]
        rule = next((r for pat, r in rules if pat.match(key)), None)
        if rule is None:
            raise PruneError(
                f"pruning does not know how to slice '{key}' of {cfg.model_type}",
                code="prune_failed",
            )
        idx: dict[str, list[int]] = {_H: sel.hidden}
        if j is not None:
            q = _expand(sel.heads[j], s.head_dim)
            idx[_Q] = q
            idx[_KV] = _expand(sel.kv_heads[j], s.head_dim)
            idx[_QKV] = [blk * s.hidden + c for blk in range(3) for c in q]
            idx[_F] = sel.ffn[j]
        new_key = layer_key.sub(f"{a.layers}.{j}.", key, count=1) if j is not None else key
        out[new_key] = _slice(t, rule, idx).clone()
    student: Any = type(model)(cfg)
    missing, unexpected = student.load_state_dict(out, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and cfg.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise PruneError(
            f"pruned weights do not fit the pruned config: missing {sorted(set(missing) - tied)}"
            f", unexpected {sorted(unexpected)}",
            code="prune_failed",
        )
    if tied:
        student.tie_weights()
    dtype = next(model.parameters()).dtype
    return student.to(dtype=dtype, device=next(model.parameters()).device)


# --------------------------------------------------------------------------- one call
@dataclass
class PruneResult:
    """The pruned student and what the job records about it."""

    model: nn.Module
    selection: Selection
    params_before: int
    params_after: int
    calibration_samples: int
    calibration_seconds: float
    seconds: float
    scoring: str
    extra: dict[str, Any] = field(default_factory=dict)


def _params(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def prune(
    teacher: nn.Module,
    target: PruneTarget,
    *,
    scoring: Scoring = "activation",
    batches: Iterable[dict[str, Tensor]] | None = None,
    max_samples: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    ranks: Ranks = ONE,
    device: torch.device | None = None,
) -> PruneResult:
    """Score `teacher`, choose what to keep and trim: the student before any training.

    Under several `ranks` the calibration batches are split over them and the scores
    all-reduced (`activation_importance`); rank 0's selection is broadcast, so every rank
    trims the same student even if a near-tie rounded differently on another rank.
    ``device``: where calibration runs if the teacher is parked elsewhere (`streamed`)."""
    t0 = time.perf_counter()
    resolve_target(teacher.config, target)
    if scoring == "activation":
        if batches is None:
            raise PruneError(
                "activation scoring needs calibration data", param="spec.student.prune.scoring"
            )
        imp = activation_importance(
            teacher, batches, max_samples=max_samples, ranks=ranks, device=device
        )
    else:
        imp = magnitude_importance(teacher)
    sel = ranks.broadcast_object(select(teacher.config, imp, target))
    student = trim(teacher, sel, config_overrides)
    return PruneResult(
        model=student,
        selection=sel,
        params_before=_params(teacher),
        params_after=_params(student),
        calibration_samples=imp.samples,
        calibration_seconds=imp.seconds,
        seconds=time.perf_counter() - t0,
        scoring=scoring,
    )


def head_maps(sel: Selection, teacher_heads: int) -> list[Tensor]:
    """One-hot head maps (H_s × H_t), one per kept layer: student head i *is* teacher head h_i."""
    maps = []
    for heads in sel.heads:
        w = torch.zeros(len(heads), teacher_heads)
        w[torch.arange(len(heads)), torch.tensor(heads)] = 1.0
        maps.append(w)
    return maps
