"""How much GPU memory one rank of a run needs, before the first step: the estimate behind
``resources.student_parallel: auto`` and the "cannot fit" errors.

Why an estimate and not a trial step: a step that does not fit is found out only by an
out-of-memory error minutes into a job (after loading an 8B teacher on every rank); the
estimate is arithmetic on the models' sizes and the spec, so a job that cannot fit fails at
once with the lever that would make it fit, and ``auto`` can pick DDP or FSDP2 for the student.

Everything is per rank, in bytes. The formulas (docs/multi-gpu.md has the derivation and
docs/performance.md the calibration against measured peaks):

- student weights: fp32 (its load dtype) masters, whole under DDP, ``1/W`` under FSDP plus the
  unsharded working copies FSDP gathers (the root unit and two blocks: current + prefetched,
  in the compute dtype); with ``cpu_offload`` the shards live on the host;
- gradients: whole plus DDP's buckets (another copy) under DDP, ``1/W`` (+ one unsharded block)
  under FSDP, none on the GPU with offload;
- AdamW: two fp32 moments per parameter, sharded like the weights, on the host with offload;
- activations: per block and token ``6h + 4I + 4·Hq·d + 3·Hkv·d`` elements (the tensors a
  Llama-style block saves for backward: norms, q/k/v before and after RoPE, attention out,
  the SwiGLU's gate, up and product), in the autocast dtype; with activation checkpointing
  only each block's input (``h``) is kept, plus one block's full set while it is recomputed;
- logits: the fused logit loss works on ``logit_chunk`` rows at a time: ``4 · chunk · V`` fp32
  (student and teacher rows, their softmaxes / gradient), plus the final hidden states;
- logits across tokenizers (``method.cross_tokenizer``, `CrossTokens`): the fused step holds no
  whole logits either: the target rows' hidden states and their gradient, the teacher's last
  hidden states over its own ``T`` tokens per row (``cross_hidden``), the head's float32
  gradient ``V_S·D`` (``head_grad``) and one chunk of rows' float32 work: the student's
  logits, their CE gradient, the teacher's logits of the aligned rows and ULD's / GOLD's
  work (``cross_chunk``);
- attention terms (SHARP and the attention baselines): one ``query_chunk × N`` fp32 block of
  probabilities per head, twice (student and teacher) per mapped layer kept for backward, plus
  the teacher's captured q/k;
- the teacher: its weights whole (replicated) or ``1/W`` plus gathered blocks (sharded), and
  one block's inference activations;
- a fixed reserve for the CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from sharp_core.errors import SpecError
from sharp_core.objectives.fused import default_chunk_tokens, head_of
from sharp_core.spec import per_term_field

if TYPE_CHECKING:
    from sharp_core.spec import JobSpec

__all__ = [
    "COMFORT",
    "FIT",
    "GB",
    "CE_CHUNK_ELEMENTS",
    "RESERVE_BYTES",
    "RATIO_SAMPLE",
    "SDPA_SHARE",
    "CrossTokens",
    "Estimate",
    "ModelSizes",
    "Plan",
    "cross_chunk_elements",
    "cross_chunk_rows",
    "cross_tokens_of",
    "estimate",
    "plan",
    "resolve_projection",
    "sdpa_map_bytes",
    "teacher_tokens",
]

GB = 1e9
#: CUDA context, NCCL/gloo buffers, allocator fragmentation (bytes).
RESERVE_BYTES = int(1.5 * GB)
#: ``auto`` keeps the student a DDP replica while its estimate takes at most this share of a GPU.
COMFORT = 0.75
#: A plan is refused when its estimate exceeds this share of a GPU (the estimate is an estimate).
FIT = 0.92
#: ``method.projection: auto`` takes SDPA on a GPU while its worst case (`sdpa_map_bytes`)
#: is at most this share of the card: the maps are then small next to the step, and SDPA ran
#: SHARP 1.8× faster than the chunked path on an H200 at B8×512 (docs/performance.md).
SDPA_SHARE = 0.10

StudentParallel = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class ModelSizes:
    """The shapes the estimate needs; `of` reads them from a model (a meta-device one is fine)."""

    params: int
    param_bytes: int  # the weights as loaded (fp32 student: 4·params)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    block_params: int  # the largest transformer block (one FSDP unit)
    positions: int | None = None  # max_position_embeddings (None: not in the config)
    plain_head: bool = True
    """The logits are a plain ``lm_head`` of the last hidden state (`fused.head_of`): the
    trainer's fused logit loss can run; False (a logit transform the fused path does not
    apply): the dense path, whose whole B×N×V logits the estimate then counts."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSizes:
        inner = getattr(model, "_orig_mod", model)
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        cfg = getattr(inner, "config", None)

        def get(*names: str, default: Any = None) -> Any:
            for n in names:
                v = getattr(cfg, n, None) if cfg is not None else None
                if v is not None:
                    return v
            return default

        hidden = int(get("hidden_size", "n_embd", "d_model", default=0))
        heads = int(get("num_attention_heads", "n_head", default=1))
        kinds = set(getattr(inner, "_no_split_modules", None) or [])
        blocks = [m for m in inner.modules() if m is not inner and type(m).__name__ in kinds]
        params = [p for p in inner.parameters()]
        numel = sum(_local_numel(p) for p in params)
        return cls(
            params=numel,
            param_bytes=sum(_local_numel(p) * p.element_size() for p in params),
            layers=int(get("num_hidden_layers", "n_layer", default=len(blocks) or 1)),
            hidden=hidden,
            intermediate=int(
                get("intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden
            ),
            heads=heads,
            kv_heads=int(get("num_key_value_heads", default=heads)),
            head_dim=int(get("head_dim", default=0) or hidden // max(1, heads)),
            vocab=int(get("vocab_size", default=0)),
            block_params=max(
                (sum(_local_numel(p) for p in b.parameters()) for b in blocks), default=0
            ),
            positions=_int_or_none(get("max_position_embeddings", "n_positions")),
            plain_head=head_of(inner)[0] is not None,
        )

    @classmethod
    def of_config(cls, config: Any, dtype: torch.dtype = torch.float32) -> ModelSizes:
        """From a transformers config alone, by building the model on the meta device (no
        memory, no weights): an 8B config takes seconds."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        return cls.of(model)


def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and v > 0 else None


def _local_numel(p: torch.Tensor) -> int:
    """The whole tensor's numel, also for a DTensor shard (DTensor.numel is the global one)."""
    return p.numel()


@dataclass(frozen=True)
class CrossTokens:
    """What the memory of a cross-tokenizer step depends on beyond the models' shapes.

    ``ratio``: the teacher's tokens per student token on the same text (its ``T`` per row is
    ``ratio·N``, capped by its positions); ``shared``: tokens both vocabularies have (GOLD's
    matched set; 0 bounds GOLD's work from above); ``aligned``: the share of the student's
    positions that align with a teacher position on the same text (the rows of a chunk that
    run the divergence; 1.0 bounds it from above); ``source``: where the ratio came from
    (`cross_tokens_of`, or an assumption when no tokenizer is readable).
    """

    ratio: float = 1.0
    shared: int = 0
    aligned: float = 1.0
    source: str = "assumed: teacher tokens = student tokens (tokenizers not readable)"


#: Float32 elements per aligned row of one chunk of the cross-tokenizer divergence, measured
#: with the profiler on one chunk's forward + backward (`tests/test_cross_tokenizer.py`
#: checks them): ULD holds 3·V_S + 2·V_T + 4·max(V_S, V_T) (the rows, softmaxes, sorts with
#: their int64 indices, the zero-padded sorted vectors and their difference); GOLD's hybrid
#: 5·V_S + 4·V_T + 4·max − 7·K with K the shared tokens (log-softmaxes, the matched gathers,
#: and ULD on the unmatched rest).
def cross_chunk_elements(mode: str, vs: int, vt: int, shared: int = 0) -> int:
    vmax = max(vs, vt)
    if mode == "gold":
        return max(0, 5 * vs + 4 * vt + 4 * vmax - 7 * min(shared, vs, vt))
    return 3 * vs + 2 * vt + 4 * vmax


#: Float32 elements per row of one CE chunk beyond its gradient buffer (the row's float copy,
#: log-softmax and its gradient; `sharp_core.objectives.losses._run_chunks`), measured.
CE_CHUNK_ELEMENTS = 5


def teacher_tokens(N: int, teacher: ModelSizes, cross: CrossTokens) -> int:
    """The teacher's tokens per row for a student row of N tokens: ratio·N, capped by the
    teacher's positions (`CrossTokenizer.teacher_batch` cuts the text there)."""
    T = max(1, math.ceil(cross.ratio * N))
    return min(T, teacher.positions) if teacher.positions else T


def cross_chunk_rows(spec: JobSpec, vs: int, vt: int) -> int:
    """Target rows of one chunk of the fused cross-tokenizer term: ``method.logit_chunk``, else
    a 256 MiB float32 chunk of the larger vocabulary (`fused_cross_objective`'s default)."""
    return spec.method.logit_chunk or max(1, 2**28 // (4 * max(vs, vt, 1)))


def _cross_logits_dense(
    spec: JobSpec,
    s: ModelSizes,
    teacher: ModelSizes,
    cross: CrossTokens,
    b: int,
    act: int,
) -> dict[str, int]:
    """The logit components of `sharp_core.train.step._cross_step`'s dense path, taken when
    a head is not plain (`ModelSizes.plain_head`): both models' whole logits, the CE's and
    the divergence's gradient buffers, one chunk's float32 work (measured at the shapes of
    docs/performance.md before the fused path existed: plan/measured 0.97–1.11)."""
    m, N = spec.method, spec.training.seq_len
    Vs, Vt = s.vocab, teacher.vocab
    rows, T = b * N, teacher_tokens(N, teacher, cross)
    ce_rows = b * (N - 1)
    # whole student logits + the CE's gradient buffer + the final hidden states
    student = (rows + ce_rows) * Vs * act + rows * s.hidden * act * 2
    # the divergence's gradient buffer (B·N, V_S) + one chunk of aligned rows' float32 work
    aligned = b * max(1, min(N, T) - 1)
    chunk = min(m.logit_chunk or max(1, 2**28 // (4 * max(Vs, Vt, 1))), aligned)
    mode = m.cross_tokenizer or "uld"
    div = rows * Vs * act + chunk * cross_chunk_elements(mode, Vs, Vt, cross.shared) * 4
    if act < 4:  # bf16 logits: a chunk's gathered rows exist in bf16 before `.float()`
        div += chunk * (Vs + Vt) * act
    # the CE before it (a flattened copy when B > 1, one chunk's work): the larger phase counts
    ce_chunk = min(m.logit_chunk or max(1, 2**28 // (4 * max(Vs, 1))), ce_rows)
    ce = (ce_rows * Vs * act if b > 1 else 0) + ce_chunk * Vs * CE_CHUNK_ELEMENTS * 4
    return {
        "student_logits": student,
        "teacher_logits": b * T * Vt * act,
        "cross_divergence": max(div, ce),
    }


#: Whole (B·N, V) tensors the dense same-vocabulary logit term holds at its peak, in the
#: logits' dtype, besides the flattened copies of the cut logits when B > 1: the student's
#: and the teacher's logits and the loss's gradient buffer (`losses.logit_objective`; with
#: one chunk of 256 MiB-of-logits rows' float32 work, measured by `bench.plan --shapes dense`
#: within 1 % at V 128256).
DENSE_LOGIT_TENSORS = 3


def _dense_logits(spec: JobSpec, s: ModelSizes, V: int, b: int, act: int, teacher: bool) -> int:
    """The dense same-vocabulary logit term (`losses.logit_objective` on whole logits), taken
    when a head is not plain: its whole B×N×V tensors plus one chunk's float32 work."""
    N = spec.training.seq_len
    rows = b * N
    whole = DENSE_LOGIT_TENSORS - (0 if teacher else 1)
    copies = (2 if teacher else 1) if b > 1 else 0
    chunk = min(spec.method.logit_chunk or max(1, 2**28 // (4 * max(V, 1))), rows)
    return (
        (whole + copies) * rows * V * act
        + chunk * V * CE_CHUNK_ELEMENTS * 4
        + rows * s.hidden * act * 2
    )


def _cross_logits(
    spec: JobSpec,
    s: ModelSizes,
    teacher: ModelSizes,
    cross: CrossTokens,
    b: int,
    act: int,
) -> dict[str, int]:
    """The logit components of `sharp_core.train.step._cross_step`'s fused path
    (`sharp_core.objectives.cross_tokenizer.fused_cross_objective`; the plan assumes plain
    heads, as the same-vocabulary plan assumes its fused loss): no whole logits of either
    model, but

    - ``cross_hidden``: the student's hidden states of the target rows gathered and their
      gradient (R·D_S each, R = B·(N−1)) and the teacher's last hidden states (B·T·D_T);
    - ``head_grad``: the student head's float32 gradient accumulator (V_S·D_S);
    - ``cross_chunk``: one chunk of rows' float32 work: the student's logits and their CE
      gradient (2·V_S a row) and, for its aligned rows (``CrossTokens.aligned`` of them), the
      teacher's logits of those rows and ULD's / GOLD's work (`cross_chunk_elements`); under autocast
      the logits exist in bf16 before ``.float()`` (V_S + V_T a row, read from the code)."""
    N = spec.training.seq_len
    Vs, Vt = s.vocab, teacher.vocab
    T = teacher_tokens(N, teacher, cross)
    rows = b * max(1, N - 1)
    chunk = min(cross_chunk_rows(spec, Vs, Vt), rows)
    mode = spec.method.cross_tokenizer or "uld"
    div_rows = math.ceil(chunk * min(1.0, max(0.0, cross.aligned)))
    work = (chunk * 2 * Vs + div_rows * cross_chunk_elements(mode, Vs, Vt, cross.shared)) * 4
    if act < 4:
        work += chunk * (Vs + Vt) * act
    return {
        "cross_hidden": rows * s.hidden * act * 2 + b * T * teacher.hidden * act,
        "head_grad": Vs * s.hidden * 4,
        "cross_chunk": work,
    }


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank by component; `total` includes `RESERVE_BYTES`."""

    student_parallel: StudentParallel
    teacher_parallel: str
    components: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)  # offloaded to CPU memory

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.3g}" for k, v in self.components.items() if v)
        return f"{self.total / GB:.3g} GB ({parts})"


def estimate(
    spec: JobSpec,
    student: ModelSizes,
    teacher: ModelSizes | None,
    *,
    world_size: int,
    student_parallel: StudentParallel,
    teacher_parallel: str = "replicate",
    cuda: bool = True,
    cross: CrossTokens | None = None,
) -> Estimate:
    """Per-rank GPU bytes of one training step of `spec` (see the module docstring).

    ``cuda``: the autocast dtype applies (bf16/fp16 activations, bf16 FSDP compute copies);
    False estimates a CPU run, all fp32 (what the calibration measures). ``cross``: the
    teacher's token ratio and shared vocabulary of a cross-tokenizer job (None there: ratio
    1.0, no shared tokens, as `CrossTokens` says); ignored for other jobs.
    """
    t, m, r = spec.training, spec.method, spec.resources
    W = max(1, world_size)
    b = max(1, t.batch_size // W)  # rows per rank per micro-step
    N = t.seq_len
    low = cuda and t.precision in ("bf16", "fp16")
    act = 2 if low else 4  # bytes per activation element
    fsdp = student_parallel == "fsdp" and W > 1
    offload = fsdp and r.cpu_offload
    P, s = student.params, student
    compute = 2 if (fsdp and low and t.precision == "bf16") else 4  # FSDP's gathered copies
    root = P - s.layers * s.block_params  # embeddings, head, final norm
    c: dict[str, int] = {}
    host: dict[str, int] = {}
    if fsdp:
        c["student_weights"] = (0 if offload else s.param_bytes // W) + (
            root + 2 * s.block_params
        ) * compute
        c["student_grads"] = (0 if offload else 4 * P // W) + 4 * s.block_params
        c["optimizer"] = 0 if offload else 8 * P // W
        if offload:
            host = {
                "student_weights": s.param_bytes // W,
                "grads": 4 * P // W,
                "optimizer": 8 * P // W,
            }
    else:
        c["student_weights"] = s.param_bytes
        c["student_grads"] = 4 * P * (2 if W > 1 else 1)  # + DDP's buckets
        c["optimizer"] = 8 * P
    per_block = (
        6 * s.hidden + 4 * s.intermediate + 4 * s.heads * s.head_dim + 3 * s.kv_heads * s.head_dim
    )
    tokens = b * N
    if t.activation_checkpointing:
        c["activations"] = (s.layers * s.hidden + per_block) * tokens * act
    else:
        c["activations"] = s.layers * per_block * tokens * act
    crossing = m.cross_tokenizer is not None and teacher is not None and m.name != "sft"
    t_tokens = tokens  # the teacher's tokens per rank and micro-step
    if crossing:
        assert teacher is not None
        cross = cross or CrossTokens()
        logits = _cross_logits if s.plain_head and teacher.plain_head else _cross_logits_dense
        c.update(logits(spec, s, teacher, cross, b, act))
        t_tokens = b * teacher_tokens(N, teacher, cross)
    else:
        V = s.vocab or (teacher.vocab if teacher else 0)
        # the teacher's head matters only where it computes the logit term (not sft, no cache)
        t_logits = teacher is not None and m.name != "sft" and m.teacher_cache.mode == "off"
        if s.plain_head and (not t_logits or teacher is None or teacher.plain_head):
            chunk = min(m.logit_chunk or default_chunk_tokens(max(V, 1)), tokens)
            c["logits"] = 4 * chunk * V * 4 + tokens * s.hidden * act * 2
        else:  # the dense path: whole logits (`sharp_core.train.step._fused_heads`)
            c["dense_logits"] = _dense_logits(spec, s, V, b, act, t_logits)
    if m.uses_attention and teacher is not None:
        qc = min(m.query_chunk, N)
        probs = 2 * s.layers * b * s.heads * qc * N * 4
        if cuda and m.name == "sharp" and m.projection == "sdpa":
            probs = sdpa_map_bytes(spec, s, teacher, b)
        t_qk = s.layers * tokens * (teacher.heads + teacher.kv_heads) * teacher.head_dim * act
        c["attention"] = probs + t_qk
    if teacher is not None and m.name != "sft":
        if teacher_parallel == "fsdp" and W > 1:
            troot = teacher.params - teacher.layers * teacher.block_params
            per = teacher.param_bytes / max(1, teacher.params)
            w = teacher.param_bytes // W + int((troot + 2 * teacher.block_params) * per)
        else:
            w = teacher.param_bytes
        t_block = (
            6 * teacher.hidden
            + 4 * teacher.intermediate
            + 4 * teacher.heads * teacher.head_dim
            + 3 * teacher.kv_heads * teacher.head_dim
        )
        c["teacher"] = w + t_block * t_tokens * act
    c["reserve"] = RESERVE_BYTES if cuda else 0
    return Estimate(student_parallel if W > 1 else "ddp", teacher_parallel, c, host)


def sdpa_map_bytes(spec: JobSpec, s: ModelSizes, t: ModelSizes, rows: int) -> int:
    """The worst case of ``projection: sdpa`` on CUDA, bytes per rank: float32 q/k with GQA
    leave SDPA only its math kernel, which keeps each mapped student layer's
    (rows, H_s, N, N) float32 map for backward and, while a layer is projected, its scores
    and softmax (the larger side's heads; the teacher's under no_grad). Measured on the CPU
    with the math kernel forced (`bench.memory.attention`): 926 MiB for one layer pair at
    N 4096, 4 heads, where this says 1 024."""
    N = spec.training.seq_len
    per_head = rows * N * N * 4
    return s.layers * s.heads * per_head + 3 * max(s.heads, t.heads) * per_head


def resolve_projection(
    spec: JobSpec,
    s: ModelSizes,
    t: ModelSizes | None,
    *,
    world_size: int,
    gpu_bytes: int | None,
) -> str:
    """``method.projection`` as the step will run it: 'auto' is 'sdpa' on a GPU where
    `sdpa_map_bytes` is within `SDPA_SHARE` of the card, else 'chunked' (and always on the
    CPU, where the two measured the same speed and chunked is memory-safe)."""
    m = spec.method
    if m.projection != "auto":
        return m.projection
    if m.name != "sharp" or t is None or gpu_bytes is None:
        return "chunked"
    rows = max(1, spec.training.batch_size // max(1, world_size))
    return "sdpa" if sdpa_map_bytes(spec, s, t, rows) <= SDPA_SHARE * gpu_bytes else "chunked"


@dataclass(frozen=True)
class Plan:
    student_parallel: StudentParallel
    estimate: Estimate
    projection: str = "chunked"
    """SHARP's P·Q path, ``method.projection: auto`` resolved (`resolve_projection`)."""


def plan(
    spec: JobSpec,
    student: ModelSizes,
    teacher: ModelSizes | None,
    *,
    world_size: int,
    gpu_bytes: int | None,
    teacher_parallel: str = "replicate",
    cross: CrossTokens | None = None,
) -> Plan:
    """DDP or FSDP2 for the student, and a SpecError when even the chosen plan cannot fit.

    The rule (``resources.student_parallel: auto``): DDP while its estimate is at most
    `COMFORT` of one GPU (no per-layer all-gathers; the whole state on every rank), else FSDP.
    ``cpu_offload`` implies FSDP. A sharded student cannot serve per-term backward passes
    (`sharp_core.spec.per_term_field`): refused, naming that field. Without a known GPU (CPU runs) nothing is refused and auto
    keeps DDP. A plan whose estimate exceeds `FIT` of the GPU is refused before the first
    step, naming the lever that would make it fit: activation checkpointing, a smaller batch
    (per rank), or more GPUs (which shards further).
    """
    r = spec.resources
    W = max(1, world_size)
    cuda = gpu_bytes is not None
    projection = resolve_projection(spec, student, teacher, world_size=W, gpu_bytes=gpu_bytes)
    if projection != spec.method.projection:
        spec = spec.model_copy(
            update={"method": spec.method.model_copy(update={"projection": projection})}
        )

    def est(mode: StudentParallel, s: JobSpec = spec) -> Estimate:
        return estimate(
            s,
            student,
            teacher,
            world_size=W,
            student_parallel=mode,
            teacher_parallel=teacher_parallel,
            cuda=cuda,
            cross=cross,
        )

    if W <= 1:
        mode: StudentParallel = "ddp"
    elif r.student_parallel in ("ddp", "fsdp"):
        mode = r.student_parallel  # type: ignore[assignment]
    elif r.cpu_offload:
        mode = "fsdp"
    elif gpu_bytes is None:
        mode = "ddp"
    else:
        mode = "ddp" if est("ddp").total <= COMFORT * gpu_bytes else "fsdp"
    e = est(mode)
    per_term = per_term_field(spec)
    if mode == "fsdp" and per_term:
        raise SpecError(
            f"{per_term}: one backward pass per term (PCGrad, interference diagnostics) needs "
            "whole gradients, which a sharded student does not have, and the memory estimate "
            f"({e.describe()} per GPU) chose to shard it: set resources.student_parallel: ddp "
            "or turn this off",
            param=f"spec.{per_term}",
        )
    if gpu_bytes is None or e.total <= FIT * gpu_bytes:
        return Plan(mode, e, projection)
    # it does not fit: name the first lever that would make it fit
    limit = FIT * gpu_bytes
    t = spec.training

    def with_training(**kw: Any) -> JobSpec:
        return spec.model_copy(update={"training": t.model_copy(update=kw)})

    hint = ""
    if not t.activation_checkpointing:
        ac = est(mode, with_training(activation_checkpointing=True))
        if ac.total <= limit:
            param = "spec.training.activation_checkpointing"
            hint = f"set training.activation_checkpointing: true (estimate {ac.total / GB:.1f} GB)"
    if not hint and t.batch_size > W:
        one = est(mode, with_training(batch_size=W, activation_checkpointing=True))
        if one.total <= limit:
            param = "spec.training.batch_size"
            hint = (
                f"lower training.batch_size to {W} and raise training.grad_accum "
                f"(one row per GPU with activation checkpointing: {one.total / GB:.1f} GB)"
            )
    if not hint:
        param = "spec.resources.gpus"
        hint = (
            "use more GPUs (resources.gpus) to shard the student further"
            + ("" if r.cpu_offload else ", or resources.cpu_offload: true")
            + (", with student_parallel 'fsdp'" if mode == "ddp" and W > 1 else "")
        )
    raise SpecError(
        f"the job cannot fit: estimated {e.describe()} per GPU with the student as "
        f"{mode.upper()} over {W} process(es), more than {FIT:.0%} of the GPU's "
        f"{gpu_bytes / GB:.1f} GB; {hint}",
        param=param,
    )


#: The text a cross-tokenizer plan measures the teacher's tokens per student token on, when
#: both tokenizers are readable: fixed, so one pair of tokenizers always gets one ratio.
#: English prose, numbers, punctuation and a little code, the mix most training text has.
RATIO_SAMPLE = """\
The committee met on Tuesday, 14 March, to review the quarterly figures. Revenue rose by
3.2 percent against the previous quarter, while operating costs fell slightly; the board
asked why the northern region had lagged behind, and whether the new warehouse would open
before the summer. "We expect delays," the director said, "but nothing we cannot absorb."
Rain had fallen all night. By morning the river had risen over its banks, and the old
bridge, which had stood for two hundred years, was closed to carts and travellers alike.
Children gathered on the hill to watch the water carry branches, barrels and a drowned sheep
towards the sea, and their parents argued about who should pay for the repairs.

def mean(values: list[float]) -> float:
    \"\"\"The arithmetic mean; raises ValueError on an empty list.\"\"\"
    if not values:
        raise ValueError("mean of nothing")
    return sum(values) / len(values)

for i in range(10):
    print(f"{i:>3}: {mean([i, i * 2, i ** 2]):.2f}")

Questions? Write to the address below, or call +1 (555) 010-7788 between 9:00 and 17:30.
"""


def cross_tokens_of(student_tok: Any, teacher_tok: Any, text: str = RATIO_SAMPLE) -> CrossTokens:
    """The teacher's tokens per student token on `text` (`RATIO_SAMPLE`), how many tokens
    both vocabularies share (GOLD's matched set) and the share of positions that align: what
    a cross-tokenizer step's memory needs beyond the models' shapes (`CrossTokens`)."""
    from sharp_core.objectives.cross_tokenizer import align, shared_vocabulary

    s_ids = student_tok(text, add_special_tokens=False)["input_ids"]
    n_s = len(s_ids)
    n_t = len(teacher_tok(text, add_special_tokens=False)["input_ids"])
    shared = int(shared_vocabulary(teacher_tok, student_tok)[0].numel())
    paired = len(align(s_ids, student_tok, teacher_tok).student_pos)
    return CrossTokens(
        ratio=n_t / max(1, n_s),
        shared=shared,
        aligned=paired / max(1, n_s - 1),
        source=f"tokenizers: {n_t} teacher / {n_s} student tokens on the built-in sample",
    )
