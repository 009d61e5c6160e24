"""Multi-GPU training on one host, under torchrun (`torch.distributed.run`).

A job with ``resources.gpus: N > 1`` runs N copies of the one training loop (the worker and
``python -m sharp_core train`` both exec ``python -m torch.distributed.run --standalone
--nproc-per-node N …``; see `torchrun_command`). Each rank:

- trains the **student data-parallel with DDP**. Why DDP and not FSDP2 ``fully_shard``: a
  distilled student is small by construction (it is the model being compressed *into*),
  so its weights, gradients and AdamW state fit one GPU with room to spare; DDP keeps every
  rank's parameters and optimizer state whole and identical, so rank 0 saves exactly the
  single-process checkpoint (``save_pretrained`` weights, ``optimizer.state_dict()``) and a
  checkpoint resumes under any number of processes, 1 included. Sharding a small student
  would buy little memory and cost an all-gather per layer per micro-step.
- runs the **teacher replicated or sharded** (FSDP2 ``fully_shard``, one unit per block named
  in the model's ``_no_split_modules``), by `choose_teacher_parallel`. The teacher is
  frozen, so sharding only ever costs a forward all-gather, and the attention capture keeps
  working: it records the query/key *activations* inside each attention call, which FSDP
  leaves alone (it only gathers and frees parameters around each block's forward).
- draws its **disjoint slice of every global batch** (`sharp_core.data.loading.BatchStream.shard`):
  all ranks walk the same seeded permutation, so the global batch of a step is exactly the
  single-process batch and the data position in a checkpoint means the same for any N.
  Each rank normalises its loss by its own token count (every rank holds the same number
  of rows); DDP's gradient average then equals the single-process gradient.
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
    "choose_teacher_parallel",
    "context",
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
        """Place the teacher (replicated or sharded) and wrap the student in DDP."""
        if not self.enabled:
            return S
        self.check(S.spec)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from sharp_core.models.loading import weights_dtype

        dev = S.device
        teacher = S.teacher
        if teacher is not None:
            assert S.spec.teacher is not None
            teacher = teacher.to(dtype=weights_dtype(S.spec.teacher.dtype, "teacher", dev))
            mode = choose_teacher_parallel(
                S.spec.resources.teacher_parallel,
                teacher_bytes=sum(p.numel() * p.element_size() for p in teacher.parameters()),
                student_params=sum(p.numel() for p in S.student.parameters()),
                gpu_bytes=torch.cuda.get_device_properties(dev).total_memory
                if dev.type == "cuda"
                else None,
                world_size=self.world_size,
            )
            if self.is_main:
                print(f"teacher: {mode} over {self.world_size} processes", file=sys.stderr)
            teacher = shard_teacher(teacher, dev) if mode == "fsdp" else teacher.to(dev)
        if S.objective is not None:  # a learned basis: same start on every rank
            for p in S.objective.parameters():
                dist.broadcast(p.data, src=0)
        student = DDP(
            S.student,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            forward_sync_buffers=False,  # constant buffers: no collective in eval forwards
        )
        return replace(S, student=student, teacher=teacher)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync`` for the micro-steps whose gradients are not all-reduced yet."""
        if not self.enabled or sync:
            return contextlib.nullcontext()
        return model.no_sync()  # type: ignore[operator]

    def average_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """All-reduce (mean) gradients DDP did not: the objective's learned basis, and the
        student's on steps that use per-term backward passes (`autograd.grad` bypasses DDP)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
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
