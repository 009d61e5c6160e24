"""A job's plan before a GPU is spent: memory per GPU by component, the strategy that makes it
fit, the expected throughput and cost, and the compatibility findings (docs/planning.md).

Why here and not in the service: the same arithmetic decides at submission (the API's plan
and admission), at job start (`sharp_core.train.memory.plan`, which this builds on) and in
the benchmark that checks it against measurement (`bench/plan.py`). Everything is plain
arithmetic on the models' configs and the spec; nothing is loaded but configs and, where at
hand, tokenizers.

A model whose config cannot be read (a hub id at submission, an unreadable folder) is not
guessed at: the components that need it are listed in ``unknown`` and left out of the total.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sharp_core.errors import SpecError
from sharp_core.models.compat import Finding, check_dtype, check_positions
from sharp_core.spec import JobSpec, per_term_field
from sharp_core.train.memory import (
    COMFORT,
    FIT,
    GB,
    RATIO_SAMPLE,
    CrossTokens,
    Estimate,
    ModelSizes,
    cross_chunk_rows,
    cross_tokens_of,
    estimate,
    resolve_projection,
    teacher_tokens,
)

__all__ = [
    "GPU_TYPES",
    "Finding",
    "GpuType",
    "JobPlan",
    "PoolInfo",
    "StepCost",
    "RATIO_SAMPLE",
    "check_fits",
    "cross_tokens_of",
    "make_plan",
    "preflight",
    "sizes_of_config",
    "step_flops_per_token",
    "strategy_estimate",
    "throughput",
]


@dataclass(frozen=True)
class GpuType:
    """A card's memory (bytes), dense bf16 peak (FLOP/s; None: unknown) and bf16 support."""

    memory_bytes: int | None
    peak_flops: float | None
    bf16: bool


#: Cards a pool may declare (``SHARP_WORKER_GPU_TYPE``); a pool's own memory setting wins.
GPU_TYPES: dict[str, GpuType] = {
    "h200": GpuType(int(141e9), 989e12, True),
    "h100": GpuType(int(80e9), 989e12, True),
    "a100-80g": GpuType(int(80e9), 312e12, True),
    "a100": GpuType(int(40e9), 312e12, True),
    "l40s": GpuType(int(48e9), 362e12, True),
    "a10": GpuType(int(24e9), 125e12, True),
    "l4": GpuType(int(24e9), 121e12, True),
    "v100": GpuType(int(32e9), 125e12, False),
    "t4": GpuType(int(16e9), 65e12, False),
    "cpu": GpuType(None, None, True),  # trains in fp32; no card peak
}

#: MFU assumed when no finished job on the pool's card is comparable (FLOP fallback), and its
#: range (the uncertainty). Measured on an H200 (docs/performance.md): the 8B → 3B KD step
#: with activation checkpointing at 0.18, a 1.3B → 125M KD step at 0.10; the issue's
#: reference KD at 0.35. 0.35 alone (the earlier guess) planned 8B → 3B 2× too fast.
FALLBACK_MFU = (0.2, 0.1, 0.35)
#: Relative half-width used when one measured row is all there is (timing noise of one job).
ONE_ROW_SPREAD = 0.25


@dataclass(frozen=True)
class PoolInfo:
    """What the service knows of a pool: its card and memory per GPU (None: not declared)."""

    name: str
    gpu_type: str | None = None
    gpu_memory_bytes: int | None = None

    @property
    def card(self) -> GpuType | None:
        return GPU_TYPES.get((self.gpu_type or "").lower())

    @property
    def memory(self) -> int | None:
        if self.gpu_memory_bytes:
            return self.gpu_memory_bytes
        return self.card.memory_bytes if self.card else None

    @property
    def is_cpu(self) -> bool:
        return (self.gpu_type or "").lower() == "cpu"


@dataclass(frozen=True)
class StepCost:
    """One finished job's measured speed on a card: a row of the step-cost table."""

    gpu_type: str
    method: str
    student_params: int
    seq_len: int
    world_size: int
    tokens_per_s: float
    flops_per_token: float
    mfu: float | None = None

    @property
    def flops_per_s_per_gpu(self) -> float:
        return self.tokens_per_s * self.flops_per_token / max(1, self.world_size)


@dataclass
class JobPlan:
    """What `make_plan` returns; `as_dict` is the API's ``plan`` object."""

    pool: dict[str, Any]
    strategy: dict[str, Any]
    memory: dict[str, Any]
    throughput: dict[str, Any]
    cost: dict[str, Any]
    levers: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    fits: bool | None = None
    spec: JobSpec | None = None  # the spec with the levers applied (what would run)
    models: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "fits": self.fits,
            "strategy": self.strategy,
            "memory": self.memory,
            "throughput": self.throughput,
            "cost": self.cost,
            "levers": self.levers,
            "findings": [asdict(f) for f in self.findings],
            "unknown": self.unknown,
            "models": self.models,
        }


# ------------------------------------------------------------------------------- model sizes
@functools.lru_cache(maxsize=64)
def _sizes_cached(config_json: str, dtype_name: str) -> ModelSizes:
    import torch
    from transformers import AutoConfig

    cfg = json.loads(config_json)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return ModelSizes.of_config(config, getattr(torch, dtype_name))


def sizes_of_config(config: dict[str, Any] | None, dtype: str = "float32") -> ModelSizes | None:
    """Shapes of a model from its config dict (a meta-device build, no weights); None when
    there is no config or transformers cannot build it (the plan then says it is unknown)."""
    if not config or "model_type" not in config:
        return None
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    try:
        return _sizes_cached(json.dumps(keep, sort_keys=True, default=str), dtype)
    except Exception:  # noqa: BLE001 - any config transformers cannot build is "unknown"
        return None


def _weights_dtype(dtype: str, role: str, cuda: bool) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if role == "teacher" and cuda else "float32"


# ------------------------------------------------------------------------------------- FLOPs
def step_flops_per_token(spec: JobSpec, s: ModelSizes, t: ModelSizes | None) -> float:
    """Training FLOPs per input token: 6·(matmul params) + attention for the student
    (8· with activation checkpointing: its forward runs twice), 2·(…) for the teacher's forward.

    Matmul params are the blocks plus the LM head (V·h; the input embedding is a lookup);
    attention is 6·L·N·H·d per token (QKᵀ and AV, causal: half of N on average, ×3 for
    backward). This counts the head, which `sharp_core.train.perf.flops_per_token` leaves out
    with the embeddings, because at small models the head is most of the step.
    """
    N = spec.training.seq_len
    mult = 8 if spec.training.activation_checkpointing else 6

    def model(m: ModelSizes, factor: int) -> float:
        body = m.layers * m.block_params + m.vocab * m.hidden
        attn = m.layers * N * m.heads * m.head_dim
        return factor * body + factor * attn

    out = model(s, mult)
    uses_teacher = spec.method.name != "sft" and spec.method.teacher_cache.mode == "off"
    if t is not None and uses_teacher:
        out += model(t, 2)
    return float(out)


def throughput(
    spec: JobSpec,
    flops_per_token: float,
    pool: PoolInfo,
    costs: Sequence[StepCost],
    *,
    student_params: int,
) -> dict[str, Any]:
    """Expected tokens/s on the pool's card (all GPUs), with a low–high range.

    From the step-cost table first: the achieved FLOP/s per GPU of the most comparable
    finished jobs on the same card (same method first, then nearest in model size and
    sequence length), times the GPUs, over this job's FLOPs per token; the range is the
    spread of those rows (±25 % with one row). Without comparable rows: the card's peak ×
    an assumed MFU (`FALLBACK_MFU`). Without either: unknown (None).
    """
    W = max(1, spec.resources.gpus)
    gpu = (pool.gpu_type or "").lower()
    rows = [c for c in costs if c.gpu_type.lower() == gpu and c.tokens_per_s > 0]
    if rows and flops_per_token > 0:
        method = spec.method.name

        def distance(c: StepCost) -> tuple[int, float]:
            d = abs(math.log(max(1, c.student_params) / max(1, student_params)))
            d += abs(math.log(max(1, c.seq_len) / max(1, spec.training.seq_len)))
            d += 0.5 * abs(math.log(max(1, c.world_size) / W))
            return (0 if c.method == method else 1, d)

        rows.sort(key=distance)
        best = [c for c in rows if distance(c)[0] == distance(rows[0])[0]][:5]
        rates = sorted(c.flops_per_s_per_gpu for c in best)
        mid = statistics.median(rates)
        lo, hi = rates[0], rates[-1]
        if len(rates) == 1:
            lo, hi = mid * (1 - ONE_ROW_SPREAD), mid * (1 + ONE_ROW_SPREAD)
        per = W / flops_per_token
        return {
            "tokens_per_s": mid * per,
            "low": lo * per,
            "high": hi * per,
            "source": "measured",
            "based_on": [
                {
                    "method": c.method,
                    "student_params": c.student_params,
                    "seq_len": c.seq_len,
                    "world_size": c.world_size,
                    "tokens_per_s": c.tokens_per_s,
                }
                for c in best
            ],
            "flops_per_token": flops_per_token,
        }
    card = pool.card
    if card is not None and card.peak_flops and flops_per_token > 0:
        mfu, lo, hi = FALLBACK_MFU
        per = W * card.peak_flops / flops_per_token
        return {
            "tokens_per_s": mfu * per,
            "low": lo * per,
            "high": hi * per,
            "source": f"flops: {pool.gpu_type} peak {card.peak_flops / 1e12:.0f} TFLOP/s × MFU "
            f"{mfu} ({lo}–{hi})",
            "flops_per_token": flops_per_token,
        }
    return {
        "tokens_per_s": None,
        "low": None,
        "high": None,
        "source": "unknown: no finished job on this card and no known peak"
        if flops_per_token > 0
        else "unknown: model sizes unknown",
        "flops_per_token": flops_per_token or None,
    }


def _cost(spec: JobSpec, tp: dict[str, Any]) -> dict[str, Any]:
    t = spec.training
    tokens = t.max_steps * t.batch_size * t.grad_accum * t.seq_len
    W = max(1, spec.resources.gpus)

    def hours(rate: float | None) -> float | None:
        return None if not rate else tokens / rate / 3600

    wall = hours(tp.get("tokens_per_s"))
    slow, fast = hours(tp.get("low")), hours(tp.get("high"))
    return {
        "tokens": tokens,
        "wall_hours": wall,
        "wall_hours_range": [fast, slow] if wall is not None else None,
        "gpu_hours": None if wall is None else wall * W,
        "gpu_hours_range": [fast * W, slow * W] if fast and slow else None,
    }


# ------------------------------------------------------------------------------------ memory
def _cache_read_bytes(spec: JobSpec) -> int:
    """One micro-batch of cached teacher log-probs and ids on the device (and the next one
    prefetched): B·N·k·(4 or 2 value bytes + 4 id bytes), twice."""
    tc = spec.method.teacher_cache
    if tc.mode == "off":
        return 0
    W = max(1, spec.resources.gpus)
    rows = max(1, spec.training.batch_size // W) * spec.training.seq_len
    k = tc.samples if tc.kind == "sampled" else tc.k + tc.tail_samples + 1
    per = (4 if tc.dtype == "float32" else 2) + 4
    return 2 * rows * k * per


def _teacher_mode(spec: JobSpec, s: ModelSizes, t: ModelSizes | None, gpu: int | None) -> str:
    from sharp_core.train.distributed import choose_teacher_parallel

    if t is None:
        return "replicate"
    return choose_teacher_parallel(
        spec.resources.teacher_parallel,
        teacher_bytes=t.param_bytes,
        student_params=s.params,
        gpu_bytes=gpu,
        world_size=max(1, spec.resources.gpus),
    )


def strategy_estimate(
    spec: JobSpec,
    s: ModelSizes,
    t: ModelSizes | None,
    mode: str,
    t_mode: str,
    cuda: bool,
    cross: CrossTokens | None = None,
) -> Estimate:
    """Per-rank bytes of `spec` with the student as `mode` ('ddp'/'fsdp') and the teacher as
    `t_mode`, plus the teacher-cache reads (`sharp_core.train.memory.estimate` underneath).
    ``cross``: a cross-tokenizer job's teacher token ratio (`CrossTokens`)."""
    e = estimate(
        spec,
        s,
        t if spec.method.name != "sft" else None,
        world_size=max(1, spec.resources.gpus),
        student_parallel=mode,  # type: ignore[arg-type]
        teacher_parallel=t_mode,
        cuda=cuda,
        cross=cross,
    )
    cache = _cache_read_bytes(spec)
    if cache:
        e.components["teacher_cache_reads"] = cache
    return e


def _with(spec: JobSpec, section: str, **kw: Any) -> JobSpec:
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=kw)})


def _memory_dict(e: Estimate, gpu: int | None) -> dict[str, Any]:
    return {
        "per_gpu_bytes": e.total,
        "per_gpu_gb": round(e.total / GB, 3),
        "gpu_bytes": gpu,
        "components": dict(e.components),
        "host_components": dict(e.host),
    }


def _gb(x: float) -> str:
    """GB as a person reads them: whole above 10, one decimal below, three digits below 1."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def check_fits(
    spec: JobSpec,
    s: ModelSizes,
    t: ModelSizes | None,
    pool: PoolInfo,
    cross: CrossTokens | None = None,
) -> tuple[JobSpec, str, Estimate, list[dict[str, Any]], bool | None]:
    """The strategy: (spec with levers applied, teacher mode, estimate, levers, fits).

    Follows `sharp_core.train.memory.plan` for the student (DDP while within `COMFORT` of a
    GPU, else FSDP), then pulls the levers the spec did not ask for, cheapest first, until
    the estimate is within `FIT` of the pool's memory: FSDP for the student (``auto`` only),
    then activation checkpointing. Raises SpecError naming the field to change, with the
    numbers, when even that does not fit. ``fits`` None: the pool's memory is unknown.
    """
    gpu = pool.memory
    cuda = not pool.is_cpu
    W = max(1, spec.resources.gpus)
    # memory counted with SHARP's projection as the worker resolves 'auto' on this card; the
    # returned spec keeps what was asked (the strategy reports the choice)
    asked = spec.method.projection
    gpu_known = gpu if cuda else None
    proj = resolve_projection(spec, s, t, world_size=W, gpu_bytes=gpu_known)
    spec = _with(spec, "method", projection=proj)
    t_mode = _teacher_mode(spec, s, t, gpu)
    r = spec.resources
    levers: list[dict[str, Any]] = []
    if W <= 1:
        mode = "ddp"
    elif r.student_parallel in ("ddp", "fsdp"):
        mode = r.student_parallel
    elif r.cpu_offload:
        mode = "fsdp"
    else:
        mode = "ddp"
    e = strategy_estimate(spec, s, t, mode, t_mode, cuda, cross)
    if gpu is None:
        return _with(spec, "method", projection=asked), t_mode, e, levers, None
    limit = FIT * gpu
    per_term = per_term_field(spec)
    can_shard = W > 1 and r.student_parallel == "auto" and not per_term
    if mode == "ddp" and can_shard and e.total > COMFORT * gpu:
        f = strategy_estimate(spec, s, t, "fsdp", t_mode, cuda, cross)
        spec = _with(spec, "resources", student_parallel="fsdp")
        levers.append(
            {
                "field": "resources.student_parallel",
                "value": "fsdp",
                "reason": f"a DDP replica needs {e.total / GB:.1f} GB per GPU, more than "
                f"{COMFORT:.0%} of {gpu / GB:.0f} GB; sharded: {f.total / GB:.1f} GB",
            }
        )
        mode, e = "fsdp", f
    if e.total > limit and not spec.training.activation_checkpointing:
        ac_spec = _with(spec, "training", activation_checkpointing=True)
        ac = strategy_estimate(ac_spec, s, t, mode, t_mode, cuda, cross)
        if ac.total < e.total:
            levers.append(
                {
                    "field": "training.activation_checkpointing",
                    "value": True,
                    "reason": f"needs {e.total / GB:.1f} GB per GPU without it, "
                    f"{ac.total / GB:.1f} GB with it (limit {limit / GB:.1f} GB)",
                }
            )
            spec, e = ac_spec, ac
    if e.total <= limit:
        return _with(spec, "method", projection=asked), t_mode, e, levers, True
    # even with the levers it does not fit: the field to change, with numbers
    need, have = e.total / GB, gpu / GB
    head = (
        f"needs {_gb(need)} GB per GPU, the {pool.name} pool has {_gb(have)} "
        f"({FIT:.0%} usable: {_gb(limit / GB)})"
    )
    t_ = spec.training
    fits_at = None
    b = t_.batch_size - W
    while b >= W:
        if (
            strategy_estimate(
                _with(spec, "training", batch_size=b), s, t, mode, t_mode, cuda, cross
            ).total
            <= limit
        ):
            fits_at = b
            break
        b -= W
    if fits_at is not None:
        one = strategy_estimate(
            _with(spec, "training", batch_size=fits_at), s, t, mode, t_mode, cuda, cross
        )
        raise SpecError(
            f"spec.training.batch_size: {head}; batch {fits_at} needs {_gb(one.total / GB)} "
            f"(raise training.grad_accum to keep the tokens per step)",
            param="spec.training.batch_size",
        )
    one = strategy_estimate(_with(spec, "training", batch_size=W), s, t, mode, t_mode, cuda, cross)
    if t_.seq_len > 512 and one.total > limit:
        n = t_.seq_len // 2
        while n >= 256:
            sh = _with(spec, "training", batch_size=W, seq_len=n)
            if strategy_estimate(sh, s, t, mode, t_mode, cuda, cross).total <= limit:
                raise SpecError(
                    f"spec.training.seq_len: {head}; even one sequence per GPU needs "
                    f"{_gb(one.total / GB)}; seq_len {n} at batch {W} fits",
                    param="spec.training.seq_len",
                )
            n //= 2
    hint = "more GPUs (resources.gpus)"
    if per_term and W > 1:
        hint += f", or turn off {per_term} so the student can be sharded"
    elif W > 1 and r.student_parallel == "ddp":
        hint += ", or resources.student_parallel 'fsdp'"
    if W > 1 and not r.cpu_offload:
        hint += ", or resources.cpu_offload: true"
    raise SpecError(
        f"spec.resources.gpus: {head} ({e.describe()}) with the student as "
        f"{mode.upper()} over {W} GPU(s); even one sequence per GPU needs "
        f"{_gb(one.total / GB)}: use {hint}",
        param="spec.resources.gpus",
    )


# --------------------------------------------------------------------------------- the plan
def make_plan(
    spec: JobSpec,
    *,
    student_config: dict[str, Any] | None,
    teacher_config: dict[str, Any] | None,
    pool: PoolInfo,
    costs: Sequence[StepCost] = (),
    findings: Sequence[Finding] = (),
    vocab: int | None = None,
    cross: CrossTokens | None = None,
) -> JobPlan:
    """The plan of `spec` on `pool` (see the module docstring). Raises SpecError when the job
    cannot fit even with the levers (`check_fits`); error findings are returned, not raised
    (the caller decides: the API refuses them at submission).

    ``cross``: for a ``method.cross_tokenizer`` job, the teacher's tokens per student token
    and the shared vocabulary (`cross_tokens_of`, when both tokenizers are readable); None
    there plans with a ratio of 1.0 and lists ``teacher_tokens`` as unknown."""
    cuda = not pool.is_cpu
    unknown: list[str] = []
    crossing = spec.method.cross_tokenizer is not None and spec.method.name != "sft"
    if crossing and spec.teacher is not None and cross is None:
        cross = CrossTokens()
        unknown.append("teacher_tokens")
    s_cfg = dict(student_config) if student_config else None
    overridden = "vocab_size" in spec.student.config_overrides
    if s_cfg is not None and vocab and not overridden and spec.student.init == "config":
        s_cfg["vocab_size"] = vocab  # built with the tokenizer's size
    s = sizes_of_config(s_cfg, _weights_dtype(spec.student.dtype, "student", cuda))
    t = None
    needs_teacher = spec.teacher is not None and spec.method.name != "sft"
    if needs_teacher:
        assert spec.teacher is not None
        t = sizes_of_config(teacher_config, _weights_dtype(spec.teacher.dtype, "teacher", cuda))
        if t is None:
            unknown += ["teacher"] + (["cross_hidden", "cross_chunk"] if crossing else [])
    if s is None:
        unknown += [
            "student_weights",
            "student_grads",
            "optimizer",
            "activations",
            *(["cross_hidden", "head_grad", "cross_chunk"] if crossing else ["logits"]),
            *(["attention"] if spec.method.uses_attention else []),
        ]
    pool_d = {
        "name": pool.name,
        "gpu_type": pool.gpu_type,
        "gpu_memory_bytes": pool.memory,
        "gpus": spec.resources.gpus,
    }
    if pool.memory is None:
        unknown.append("pool_memory")
    if s is None:
        return JobPlan(
            pool=pool_d,
            strategy={"student_parallel": spec.resources.student_parallel},
            memory={"per_gpu_bytes": None, "components": {}, "partial": True},
            throughput={"tokens_per_s": None, "source": "unknown: student sizes unknown"},
            cost=_cost(spec, {}),
            findings=list(findings),
            unknown=unknown,
            fits=None,
            spec=spec,
        )
    if needs_teacher and t is None:
        # what is known, without the teacher (listed as unknown): no admission decision on it
        e = strategy_estimate(spec, s, None, "ddp", "replicate", cuda)
        levers: list[dict[str, Any]] = []
        fits: bool | None = None
        run_spec, t_mode = spec, "unknown"
    else:
        run_spec, t_mode, e, levers, fits = check_fits(spec, s, t, pool, cross)
    W = max(1, spec.resources.gpus)
    mode = "ddp"
    if W > 1:
        rp = run_spec.resources
        mode = rp.student_parallel if rp.student_parallel != "auto" else "ddp"
        if rp.cpu_offload:
            mode = "fsdp"
    from sharp_core.objectives.fused import default_chunk_tokens

    V = s.vocab or (t.vocab if t else 0)
    chunk = spec.method.logit_chunk or default_chunk_tokens(max(1, V))
    flops = step_flops_per_token(run_spec, s, t) if not (needs_teacher and t is None) else 0.0
    tp = throughput(run_spec, flops, pool, costs, student_params=s.params)
    strategy: dict[str, Any] = {
        "student_parallel": mode,
        "teacher_parallel": t_mode if needs_teacher else None,
        "activation_checkpointing": run_spec.training.activation_checkpointing,
        "logit_chunk_tokens": chunk,
        "query_chunk": spec.method.query_chunk if spec.method.uses_attention else None,
        # SHARP's P·Q path, 'auto' resolved as the worker will on this card
        "projection": resolve_projection(
            spec, s, t, world_size=W, gpu_bytes=pool.memory if cuda else None
        )
        if spec.method.name == "sharp" and t is not None
        else None,
        "rows_per_gpu": max(1, spec.training.batch_size // W),
        # fused (chunks of hidden states, no B×N×V logits) unless a head is not a plain
        # lm_head (`fused.head_of`): then the step builds whole logits and the plan counts them
        "logit_path": "dense"
        if {"dense_logits", "student_logits"} & set(e.components)
        else "fused",
    }
    if crossing and cross is not None:
        strategy["cross_tokenizer"] = {
            "teacher_token_ratio": round(cross.ratio, 4),
            "teacher_tokens_per_row": teacher_tokens(run_spec.training.seq_len, t, cross)
            if t is not None
            else None,
            "shared_tokens": cross.shared,
            "aligned_fraction": round(cross.aligned, 4),
            # target rows of one chunk of the fused term (`fused_cross_objective`'s default,
            # or logit_chunk)
            "divergence_chunk_rows": cross_chunk_rows(spec, s.vocab, t.vocab if t else 0),
            "source": cross.source,
        }
    mem = _memory_dict(e, pool.memory)
    mem["partial"] = bool(needs_teacher and t is None)
    return JobPlan(
        pool=pool_d,
        strategy=strategy,
        memory=mem,
        throughput=tp,
        cost=_cost(run_spec, tp),
        levers=levers,
        findings=list(findings),
        unknown=unknown,
        fits=fits,
        spec=run_spec,
        models={
            "student_params": s.params,
            "teacher_params": t.params if t is not None else None,
            "vocab": V,
        },
    )


def preflight(
    spec: JobSpec,
    *,
    student_config: dict[str, Any] | None,
    teacher_config: dict[str, Any] | None,
    pool: PoolInfo,
) -> list[Finding]:
    """The checks that need configs only (positions, the card's dtype); the tokenizer checks
    (`sharp_core.models.compat.compare_tokenizers`) need tokenizers and are added by callers
    that have them."""
    out: list[Finding] = []
    out += check_positions(spec.training.seq_len, "student", student_config)
    if spec.teacher is not None and spec.method.name != "sft":
        out += check_positions(spec.training.seq_len, "teacher", teacher_config)
    card = pool.card
    if not pool.is_cpu:
        out += check_dtype(spec.training.precision, pool.gpu_type, card.bf16 if card else None)
    return out
