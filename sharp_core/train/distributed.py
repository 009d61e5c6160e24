"""Multi-GPU training on one host, under torchrun (`torch.distributed.run`).

A job with ``resources.gpus: N > 1`` runs N copies of the one training loop (the worker and
``python -m sharp_core train`` both exec ``python -m torch.distributed.run --standalone
--nproc-per-node N …``; see `torchrun_command`). Each rank:

- trains the **student as a DDP replica or sharded with FSDP2** (``resources.student_parallel``,
  `sharp_core.train.memory.plan`): DDP while the student's whole training state (fp32 weights,
  gradients, buckets, AdamW's moments: ~20 bytes/param) plus activations fits comfortably
  in one GPU, because it needs no per-layer communication; otherwise ``fully_shard`` with one
  unit per transformer block, each rank holding 1/N of the weights, gradients and AdamW
  state (bf16 compute copies with fp32 masters and fp32 gradient reduction under
  ``precision: bf16`` on CUDA; optionally offloaded to host memory). Either way rank 0
  saves the single-process checkpoint format (`full_model_state`, `full_optim_state`), so
  a checkpoint resumes under any number of processes, 1 included.
- optionally **recomputes each student block in backward** (`checkpoint_blocks`,
  ``training.activation_checkpointing``), in one process too.
- runs the **teacher replicated or sharded** (FSDP2 ``fully_shard``, one unit per block named
  in the model's ``_no_split_modules``), by `choose_teacher_parallel`. The teacher is
  frozen, so sharding only ever costs a forward all-gather, and the attention capture keeps
  working: it records the query/key *activations* inside each attention call, which FSDP
  leaves alone (it only gathers and frees parameters around each block's forward).
- draws its **disjoint slice of every global batch** (`sharp_core.data.loading.BatchStream.shard`):
  all ranks walk the same seeded permutation, so the global batch of a step is exactly the
  single-process batch and the data position in a checkpoint means the same for any N.
  Each rank normalises its loss by its own token count (every rank holds the same number
  of rows); DDP's (or FSDP's reduce-scatter's) gradient average then equals the
  single-process gradient.
- reports through rank 0 only: logged metrics are averaged over ranks first, the stop
  decision (cancel, SIGTERM, fencing) is OR-ed over ranks so every rank stops at the same
  step, and only rank 0 writes checkpoints (each rank's RNG state is gathered into it).

Control messages (stop flags, RNG states, the resume path) travel on a CPU gloo group so
they never force a GPU synchronisation.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from sharp_core.errors import SpecError
from sharp_core.train.launch import check_world, env_rank, torchrun_command, under_torchrun

if TYPE_CHECKING:
    from sharp_core.spec import JobSpec
    from sharp_core.train.setup import Setup

log = logging.getLogger(__name__)

__all__ = [
    "Context",
    "RankCallbacks",
    "check_world",
    "checkpoint_blocks",
    "choose_teacher_parallel",
    "context",
    "full_model_state",
    "full_optim_state",
    "is_sharded",
    "load_model_state",
    "shard_optim_state",
    "shard_student",
    "env_rank",
    "under_torchrun",
    "torchrun_command",
]

TeacherParallel = Literal["replicate", "fsdp"]

#: Bytes per student parameter while training: fp32 weights, fp32 gradients, AdamW's two fp32
#: moments, and DDP's gradient buckets (another copy of the gradients).
STUDENT_BYTES_PER_PARAM = 20
#: Share of a GPU's memory that weights and optimizer state may take when the teacher is
#: replicated; the rest is left for activations, the logits (B·N·V, twice: teacher and
#: student), captured attention, the CUDA context and allocator fragmentation.
WEIGHT_BUDGET = 0.6


def choose_teacher_parallel(
    mode: str,
    *,
    teacher_bytes: int,
    student_params: int,
    gpu_bytes: int | None,
    world_size: int,
) -> TeacherParallel:
    """Replicate the teacher on every rank, or shard it with FSDP.

    The rule (``resources.teacher_parallel: auto``): replicate when a whole teacher plus the
    student's training state fits in `WEIGHT_BUDGET` of one GPU's memory,
    ``teacher_bytes + 20·student_params ≤ 0.6·gpu_bytes``; otherwise shard. Replication is
    preferred whenever it fits because it needs no communication at all; sharding costs one
    all-gather of each teacher block per micro-step. With one process, or without a GPU whose
    memory is known (CPU), there is nothing to decide: replicate. An explicit
    ``replicate``/``fsdp`` is obeyed (with one process there is nothing to shard over).
    """
    if world_size <= 1:
        return "replicate"
    if mode in ("replicate", "fsdp"):
        return mode  # type: ignore[return-value]
    if mode != "auto":
        raise SpecError(
            f"teacher_parallel must be auto, replicate or fsdp, not {mode!r}",
            param="spec.resources.teacher_parallel",
        )
    if gpu_bytes is None:
        return "replicate"
    need = teacher_bytes + STUDENT_BYTES_PER_PARAM * student_params
    return "replicate" if need <= WEIGHT_BUDGET * gpu_bytes else "fsdp"


# ---------------------------------------------------------------------------- launching


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this rank when torchrun dies.

    Why: torchrun starts every rank in its own session, so a SIGKILL sent to the job's process
    group (the supervisor's last resort) reaches torchrun but not the ranks, which would
    live on holding their GPUs. Linux only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


# ---------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class Context:
    """This process's place in the job; ``Context()`` is the single-process case, where every
    method is a no-op or the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # gloo group for CPU-side control messages

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- devices ---------------------------------------------------------------------------
    def default_device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank) if self.enabled else torch.device("cuda")
        return torch.device("cpu")

    def teacher_load_device(self, spec: JobSpec, device: torch.device) -> torch.device:
        """Where `setup` loads the teacher: on CPU when it may be sharded, so a teacher that
        does not fit one GPU is never materialised whole on one (`prepare` moves it)."""
        if (
            self.enabled
            and device.type == "cuda"
            and spec.resources.teacher_parallel != "replicate"
        ):
            return torch.device("cpu")
        return device

    # -- wrapping --------------------------------------------------------------------------
    def check(self, spec: JobSpec) -> None:
        check_world(spec, self.world_size)

    def prepare(self, S: Setup) -> Setup:
        """Checkpoint the student's blocks (if asked), check the step fits the GPU
        (`sharp_core.train.memory.plan`), place the teacher (replicated or sharded) and wrap
        the student in DDP or shard it with FSDP2."""
        from sharp_core.train.memory import ModelSizes, plan

        spec = S.spec
        if spec.training.activation_checkpointing:
            checkpoint_blocks(S.student)
        dev = S.device
        gpu_bytes = (
            torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
        )
        cross = None
        if S.cross is not None:  # the teacher's logits are over its own tokens, whole
            from sharp_core.train.memory import cross_tokens_of

            cross = cross_tokens_of(S.cross.student, S.cross.teacher)
        if not self.enabled:
            p = plan(
                spec,
                ModelSizes.of(S.student),
                _sizes(S.teacher),
                world_size=1,
                gpu_bytes=gpu_bytes,
                cross=cross,
            )
            _use_projection(S, p.projection)
            return S
        self.check(spec)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from sharp_core.models.loading import weights_dtype

        teacher = S.teacher
        t_mode = "replicate"
        if teacher is not None:
            assert spec.teacher is not None
            teacher = teacher.to(dtype=weights_dtype(spec.teacher.dtype, "teacher", dev))
            t_mode = choose_teacher_parallel(
                spec.resources.teacher_parallel,
                teacher_bytes=sum(p.numel() * p.element_size() for p in teacher.parameters()),
                student_params=sum(p.numel() for p in S.student.parameters()),
                gpu_bytes=gpu_bytes,
                world_size=self.world_size,
            )
        p = plan(
            spec,
            ModelSizes.of(S.student),
            _sizes(teacher),
            world_size=self.world_size,
            gpu_bytes=gpu_bytes,
            teacher_parallel=t_mode,
            cross=cross,
        )
        _use_projection(S, p.projection)
        if self.is_main:
            print(
                f"teacher: {t_mode} over {self.world_size} processes; student: "
                f"{p.student_parallel}; estimate {p.estimate.describe()} per rank",
                file=sys.stderr,
            )
        if teacher is not None:
            teacher = shard_teacher(teacher, dev) if t_mode == "fsdp" else teacher.to(dev)
        if S.objective is not None:  # a learned basis: same start on every rank
            for q in S.objective.parameters():
                dist.broadcast(q.data, src=0)
        if p.student_parallel == "fsdp":
            student = shard_student(
                S.student,
                dev,
                bf16=dev.type == "cuda" and spec.training.precision == "bf16",
                offload=spec.resources.cpu_offload,
            )
        else:
            student = DDP(
                S.student,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                forward_sync_buffers=False,  # constant buffers: no collective in eval forwards
            )
        return replace(S, student=student, teacher=teacher)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """The micro-steps whose gradients are not reduced yet: DDP's ``no_sync``, or FSDP2's
        ``set_requires_gradient_sync(False)`` (unsharded gradients accumulate locally and
        are reduce-scattered once, in the last micro-step's backward)."""
        if not self.enabled:
            return contextlib.nullcontext()
        fsdp = _fsdp_root(model)
        if fsdp is not None:
            return _gradient_sync(fsdp, sync)
        if sync:
            return contextlib.nullcontext()
        return model.no_sync()  # type: ignore[operator]

    def average_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """All-reduce (mean) gradients DDP did not: the objective's learned basis, and the
        student's on steps that use per-term backward passes (`autograd.grad` bypasses DDP;
        never with a sharded student, see `prepare`). Sharded (DTensor) gradients are already
        reduced and are left alone."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None and not _is_dtensor(p.grad):
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    # -- reporting -------------------------------------------------------------------------
    def mean_metrics(self, values: dict[str, Any], device: torch.device) -> dict[str, float]:
        """Floats, averaged over ranks (every rank holds equally many rows, so the mean of the
        ranks' means is the global mean)."""
        if not self.enabled or not values:
            return {k: float(v) for k, v in values.items()}
        keys = sorted(values)
        t = torch.stack(
            [
                torch.as_tensor(values[k], dtype=torch.float32, device=device).reshape(())
                for k in keys
            ]
        )
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist(), strict=True))

    def shard_metrics(
        self, params: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer
    ) -> dict[str, float]:
        """Under FSDP: the largest and smallest per-rank count of student parameter elements
        and of AdamW state elements (exp_avg + exp_avg_sq) held locally, over all ranks, so a
        log shows each rank holds ~1/N. Empty with one process or a DDP student."""
        if not self.enabled or not any(_is_dtensor(p) for p in params):
            return {}
        local_p = sum(_local(p).numel() for p in params)
        local_o = 0
        for p in params:
            st = opt.state.get(p, {})
            local_o += sum(_local(st[k]).numel() for k in ("exp_avg", "exp_avg_sq") if k in st)
        t = torch.tensor([local_p, local_o, -local_p, -local_o], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return {
            "shard_params_max": t[0].item(),
            "shard_optim_max": t[1].item(),
            "shard_params_min": -t[2].item(),
            "shard_optim_min": -t[3].item(),
        }

    def any_rank(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control)

    def callbacks(self, inner: Any) -> Any:
        """The loop's callbacks: as given in one process, `RankCallbacks` under torchrun."""
        return RankCallbacks(inner, self) if self.enabled else inner

    def own_rng(self, state: dict[str, Any]) -> Any:
        """This rank's RNG state from a checkpoint: its own when the checkpoint was written by
        as many processes, else rank 0's (a 1-process checkpoint has only that one)."""
        ranks = state.get("rng_ranks")
        if ranks and len(ranks) == self.world_size:
            return ranks[self.rank]
        return state["rng"]

    # -- sums over ranks (evaluation, pruning scores, the teacher cache) -------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks, in place (on the default group: NCCL tensors on the GPU,
        gloo on the CPU); the identity in one process. Every rank must call it."""
        if self.enabled:
            dist.all_reduce(t)
        return t


class RankCallbacks:
    """`TrainCallbacks` seen through ranks: rank 0 reports, every rank votes on stopping."""

    def __init__(self, inner: Any, ctx: Context):
        self.inner = inner
        self.ctx = ctx

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.ctx.is_main:
            self.inner.on_metrics(step, metrics)

    def on_checkpoint(self, step: int, path: Path, manifest: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.inner.on_checkpoint(step, path, manifest)

    def on_checkpoint_removed(self, step: int) -> None:
        if self.ctx.is_main:
            self.inner.on_checkpoint_removed(step)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.inner.on_event(kind, data)

    def should_stop(self) -> bool:
        return self.ctx.any_rank(bool(self.inner.should_stop()))

    def on_teacher(self, data: dict[str, Any]) -> None:
        report = getattr(self.inner, "on_teacher", None)
        if self.ctx.is_main and report is not None:
            report(data)


def shard_teacher(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over all ranks: one unit per transformer block, the rest (embeddings, head) in the
    root unit, so tied input/output embeddings stay in one unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    inner = getattr(model, "_orig_mod", model)
    blocks = set(getattr(inner, "_no_split_modules", None) or [])
    for m in list(inner.modules()):
        if m is not inner and type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    return model


def _mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def _blocks(inner: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules whose class is in ``_no_split_modules``."""
    kinds = set(getattr(inner, "_no_split_modules", None) or [])
    return [m for m in inner.modules() if m is not inner and type(m).__name__ in kinds]


def shard_student(
    model: torch.nn.Module, device: torch.device, *, bf16: bool, offload: bool
) -> torch.nn.Module:
    """FSDP2 over all ranks, one unit per transformer block then the root (embeddings, final
    norm, head, so tied embeddings stay in one unit), in place: the module keeps its class
    and parameter names, its parameters become DTensor shards.

    ``bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the gathered
    copies used in forward/backward are bf16, the sharded masters and the gradient
    reduction stay fp32. ``offload``: ``CPUOffloadPolicy``: shards, gradients and so the
    AdamW state live in host memory and the optimizer step runs on the CPU.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": _mesh(device)}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    inner = getattr(model, "_orig_mod", model)
    if not offload:
        inner.to(device)
    for m in _blocks(inner):
        fully_shard(m, **kw)
    fully_shard(inner, **kw)
    return model


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Non-reentrant activation checkpointing on each transformer block; returns how many.

    Each block's ``forward`` is replaced (on the instance) by ``torch.utils.checkpoint`` of
    itself, so module names and the state dict are unchanged; torch.compile traces it as
    its checkpoint operator (the composable hook-based ``checkpoint`` would recompute an
    eager forward against a compiled one's saved tensors and fail). Under FSDP the block's
    hooks stay outside: its backward gathers the parameters, then the recompute runs.
    Why non-reentrant: the attention capture keeps the student's q/k *with* their graph
    from the first forward; a reentrant checkpoint runs that forward under no_grad. The
    recomputation runs outside any live capture, so it records nothing.
    """
    from torch.utils.checkpoint import checkpoint

    inner = getattr(model, "_orig_mod", model)
    blocks = _blocks(inner)
    for b in blocks:
        if getattr(b, "_sharp_checkpointed", False):
            continue

        def run(*args: Any, _forward: Any = b.forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        b.forward = run  # type: ignore[method-assign]
        b._sharp_checkpointed = True  # type: ignore[assignment]
    return len(blocks)


def _use_projection(S: Any, projection: str) -> None:
    """SHARP's P·Q path as the plan resolved it for this device (``projection: auto``); the
    objective was built with the memory-safe 'chunked' before the device was known."""
    obj = S.objective
    if obj is not None and hasattr(obj, "projection") and obj.projection != projection:
        log.info(
            "SHARP projection: %s (method.projection %s)", projection, S.spec.method.projection
        )
        obj.projection = projection


def _sizes(model: torch.nn.Module | None) -> Any:
    from sharp_core.train.memory import ModelSizes

    return None if model is None else ModelSizes.of(model)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]  # a DTensor


def _fsdp_root(model: torch.nn.Module) -> Any:
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, FSDPModule) else None


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a student `shard_student` sharded (FSDP2)."""
    return _fsdp_root(model) is not None


@contextlib.contextmanager
def _gradient_sync(fsdp: Any, sync: bool) -> Any:
    fsdp.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        fsdp.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------- checkpoints
# The existing checkpoint format (whole ``save_pretrained`` weights, ``optimizer.state_dict()``
# with whole tensors) for a sharded student: every rank takes part in the gathers, rank 0
# gets the tensors. A stop-gap until checkpoints move to torch.distributed.checkpoint.


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole student state dict on CPU at rank 0 (an empty dict elsewhere) when it is
    sharded; None when it is not (``save_pretrained`` reads the module itself). A collective:
    every rank must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = getattr(model, "_orig_mod", model)
    return get_model_state_dict(  # type: ignore[return-value]
        inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def full_optim_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with every sharded (DTensor) state tensor gathered whole onto the
    CPU: the single-process format, keyed by parameter index. A collective when any state
    is sharded (every rank walks the same parameters in the same order)."""
    sd = opt.state_dict()
    state = {}
    for idx, st in sd["state"].items():
        state[idx] = {k: (v.full_tensor().cpu() if _is_dtensor(v) else v) for k, v in st.items()}
    return {**sd, "state": state}


def shard_optim_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `full_optim_state` for this rank: each whole state tensor of a sharded
    parameter cut into that parameter's placement (local slicing, no communication), so that
    ``opt.load_state_dict`` gets DTensors shaped like the parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if not any(_is_dtensor(p) for p in params):
        return sd
    from torch.distributed.tensor import distribute_tensor

    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        if not _is_dtensor(p):
            state[idx] = st
            continue
        state[idx] = {
            k: distribute_tensor(
                v.to(_local(p).device), p.device_mesh, p.placements, src_data_rank=None
            )
            if torch.is_tensor(v) and v.shape == p.shape
            else v
            for k, v in st.items()
        }
    return {**sd, "state": state}


def load_model_state(
    model: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Load whole weights into the student, sharded or not; (missing, unexpected) keys."""
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    if not is_sharded(model):
        res = inner.load_state_dict(weights, strict=False)
        return list(res.missing_keys), list(res.unexpected_keys)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    res = set_model_state_dict(
        inner,
        weights,  # type: ignore[arg-type]
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    return list(res.missing_keys), list(res.unexpected_keys)


_CTX: Context | None = None


def context() -> Context:
    """The process's context; under torchrun, joins the process group on first call."""
    global _CTX
    if _CTX is not None:
        return _CTX
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        _CTX = Context()
        return _CTX
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    _die_with_parent()
    cuda = torch.cuda.is_available()
    if cuda:
        visible = torch.cuda.device_count()
        if visible < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
            raise SpecError(
                f"the job asks for {world} GPUs but this worker sees {visible} "
                "(CUDA_VISIBLE_DEVICES)",
                param="spec.resources.gpus",
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        control = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        control = dist.group.WORLD
    atexit.register(_shutdown)
    _CTX = Context(rank=rank, world_size=world, local_rank=local, control=control)
    return _CTX


def _shutdown() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
