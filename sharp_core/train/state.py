"""The loop's state, saved and restored whole: checkpoint writing and resuming.

One state for the loop (litgpt's ``fit``): the student's weights, the optimizer and the
objective's learned basis, sharded with ``torch.distributed.checkpoint`` (``dcp/``, any world
size can read it), plus ``training_state.pt`` with the step, the grad scaler, the data
position and every rank's RNG states, and the consolidated student users download
(``save_pretrained``). `Checkpointer` writes it in the background while training goes on.
Resuming restores all of it, so a resumed run follows the uninterrupted run's trajectory;
resuming with a different spec warns and names each field that differs (torchtune's
``_update_recipe_state``). The file layout is `sharp_core.train.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sharp_core.data.loading import BatchStream, ClassificationData
from sharp_core.errors import ArtifactWriteError, CheckpointMismatchError
from sharp_core.spec import TrainingSpec
from sharp_core.train import distributed
from sharp_core.train.checkpoint import (
    DCP_DIR,
    clean_temporaries,
    commit_checkpoint,
    latest_checkpoint,
    prune_checkpoints,
    step_dir_name,
    temporary_dir,
)
from sharp_core.train.distributed import Context
from sharp_core.train.setup import Setup

__all__ = [
    "SPEC_FILE",
    "STATE_FILE",
    "Checkpointer",
    "TrainState",
    "adamw",
    "check_weights",
    "full_weights",
    "load_sharded",
    "resume",
    "spec_diff",
    "train_modules",
    "unwrap",
]

STATE_FILE = "training_state.pt"
SPEC_FILE = "spec.json"


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights; ``step`` = optimizer steps taken."""

    step: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stream: BatchStream
    objective: torch.nn.Module | None
    onpolicy: Any = None  # sharp_core.train.onpolicy.OnPolicy when the spec has method.on_policy

    @classmethod
    def start(
        cls,
        S: Setup,
        params: list[torch.nn.Parameter],
        extra: list[torch.nn.Parameter],
        ctx: Context,
        amp_dtype: torch.dtype | None,
    ) -> TrainState:
        """Step 0: `adamw` over ``params`` (the student's) and ``extra`` (the objective's), a
        grad scaler (active for fp16 only), this rank's shard of the shuffled training data."""
        t = S.spec.training
        data = S.data
        rows = data.train["labels"] if isinstance(data, ClassificationData) else data.train
        return cls(
            step=0,
            optimizer=adamw(params, extra, t, S.device),
            scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
            stream=BatchStream(rows, t.seed).shard(ctx.rank, ctx.world_size),
            objective=S.objective,
        )

    def loop_state_dict(self, rngs: list[dict[str, Any]], per_rank: bool) -> dict[str, Any]:
        """The state besides the weights and the optimizer (those are sharded: `Checkpointer`).
        ``rngs``: every rank's RNG states (rank 0's first); kept per rank when ``per_rank``."""
        return {
            "step": self.step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "data": self.stream.state_dict(),
            "rng": rngs[0],
            **({"rng_ranks": rngs} if per_rank else {}),
            **({"onpolicy": self.onpolicy.state_dict()} if self.onpolicy is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The `loop_state_dict` but the RNG states (per rank: see `resume`)."""
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        if self.onpolicy is not None and state.get("onpolicy") is not None:
            self.onpolicy.load_state_dict(state["onpolicy"])
        self.step = int(state["step"])


def adamw(
    params: list[torch.nn.Parameter],
    extra: list[torch.nn.Parameter],
    t: TrainingSpec,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW with weight decay on the student's matrices only (not on biases and norms) and
    none on ``extra`` (the objective's learned basis, kept orthonormal by construction)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    # fused (one kernel per step) wherever torch has the kernel: CUDA, and the CPU since 2.4;
    # with an offloaded FSDP student the parameters (and so the step) are on the CPU
    where = {p.device.type for g in groups for p in g["params"]} or {device.type}  # type: ignore[attr-defined]
    fused = where <= set(_get_fused_kernels_supported_devices())
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused)


def unwrap(model: torch.nn.Module) -> Any:
    """The Hugging Face model under a DDP and/or torch.compile wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------- RNG states


def rng_state(device: torch.device) -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ---------------------------------------------------------------------------- save


def train_modules(model: torch.nn.Module, objective: torch.nn.Module | None) -> torch.nn.Module:
    """The student (plain, DDP or FSDP2) and the objective's learned basis under one root, so
    that one `get_state_dict` call names every parameter the optimizer holds
    (``student.…``, ``objective.…``); DDP's ``module.`` prefix is dropped by torch."""
    mods = {"student": model}
    if objective is not None:
        mods["objective"] = objective
    return torch.nn.ModuleDict(mods)


def full_weights(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The student's whole state dict on CPU, for rank 0's ``save_pretrained`` export: every
    rank must call it (FSDP2 gathers); the tensors are returned where ``keep`` (rank 0).

    Copied (training goes on while it is written), with tied weights still sharing one
    tensor: ``save_pretrained`` recognises tied weights by their shared storage.
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    sd = get_model_state_dict(
        inner,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    if not keep:
        return {}
    names: dict[int, list[str]] = {}  # parameter id -> every name it has (tied weights)
    for n, t in unwrap(inner).named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(n)
    alias = {n: ns[0] for ns in names.values() for n in ns if n != ns[0]}
    # on CPU, cpu_offload hands back the live tensors: copy; from a GPU it already copied
    live = any(p.device.type == "cpu" and not hasattr(p, "to_local") for p in inner.parameters())
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in alias and alias[k] in sd:
            continue
        assert isinstance(v, torch.Tensor), k
        out[k] = v.detach().clone() if live else v.detach()
    for k, first in alias.items():
        if k in sd and first in out:
            out[k] = out[first]
    return out


@dataclass
class _Pending:
    step: int
    shards: Future[Any]  # this rank's DCP write
    commit: Future[Any] | None  # rank 0: export, manifest, rename -> (path, manifest)
    reported: bool = False


class Checkpointer:
    """Saves the loop's state at a step; at most one save in flight.

    Layout of ``step_NNNNNN/`` (`sharp_core.train.checkpoint`):

    * ``dcp/``: the student, the objective's basis and the optimizer, sharded with
      ``torch.distributed.checkpoint`` (`get_state_dict`: plain module, DDP or FSDP2; every
      rank writes its own ``__R_0.distcp``, rank 0 the ``.metadata``). Resume reads it at any
      world size.
    * ``training_state.pt``: the loop's small state (step, grad scaler, data position, every
      rank's RNG, on-policy buffer), plain tensors and numbers (``torch.load(weights_only=True)``).
    * the consolidated student: ``save_pretrained`` (``model.safetensors``, config) and the
      tokenizer, gathered on rank 0, what users download; ``spec.json``.
    * ``manifest.json``, written last: the folder is renamed into place only then.

    Asynchronous (``asynchronous=True``): `save` copies the state to CPU (the only part the
    loop waits for) and returns; ``dcp.async_save`` writes the shards in a thread on every
    rank, and a thread on rank 0 then writes the export, hashes everything and commits. The
    callbacks (``on_checkpoint``, pruning) run on the loop's thread, in `poll` once the commit
    is done; `save` and `wait` first finish the pending save. The background collectives
    run on their own gloo group so they never interleave with the loop's. In one process
    there is no group: ``async_save`` runs its thread without one.
    """

    def __init__(
        self,
        out_dir: Path,
        S: Setup,
        ctx: Context,
        callbacks: Any,
        *,
        asynchronous: bool = True,
    ):
        self.out_dir, self.S, self.ctx, self.cb = out_dir, S, ctx, callbacks
        self.asynchronous = asynchronous
        # all ranks create it here, in the same order: DCP's collectives in the background
        self.group = dist.new_group(backend="gloo") if ctx.enabled else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.pending: _Pending | None = None

    # -- the loop's three calls ------------------------------------------------------------
    def save(self, state: TrainState, model: torch.nn.Module, metrics: dict[str, float]) -> Path:
        """Start saving ``state`` (after ``state.step`` optimizer steps); every rank calls it.
        Returns the folder the checkpoint will have; in sync mode it is there on return."""
        self.wait()
        S, ctx, step = self.S, self.ctx, state.step
        rngs = ctx.gather_objects(rng_state(S.device))  # every rank's; rank 0 writes them
        tmp = ctx.broadcast_object(temporary_dir(self.out_dir, step) if ctx.is_main else None)
        msd, osd = get_state_dict(train_modules(model, state.objective), state.optimizer)
        sharded = {"model": msd, "optim": osd}
        writer = FileSystemWriter(str(tmp / DCP_DIR))
        solo = not ctx.enabled  # one process: no collectives
        if self.asynchronous:
            started = dcp.async_save(
                sharded, storage_writer=writer, process_group=self.group, no_dist=solo
            )
            assert isinstance(started, Future)  # AsyncSaveResponse only with a custom stager
            shards: Future[Any] = started
        else:
            dcp.save(sharded, storage_writer=writer, process_group=self.group, no_dist=solo)
            shards = Future()
            shards.set_result(None)
        # the export's weights: a collective under FSDP2; rank 0 holds the copy
        weights = full_weights(model, ctx.is_main)
        commit = None
        if ctx.is_main:
            loop_state = copy_tensors(state.loop_state_dict(rngs, per_rank=ctx.enabled))
            args = (step, tmp, shards, weights, loop_state, dict(metrics))
            commit = self.pool.submit(self._write_and_commit, *args)
        self.pending = _Pending(step, shards, commit)
        if not self.asynchronous:
            self.wait()
        return self.out_dir / step_dir_name(step)

    def poll(self) -> None:
        """Report the pending save if it is committed (rank 0); never blocks."""
        p = self.pending
        if p is not None and p.commit is not None and not p.reported and p.commit.done():
            self._report(p)

    def wait(self) -> None:
        """Finish the pending save (every rank) and report it (rank 0)."""
        p, self.pending = self.pending, None
        if p is None:
            return
        if p.commit is not None:  # rank 0: its thread waits for the shards, cleans up on error
            p.commit.result()  # an ArtifactWriteError in the thread surfaces here
        try:
            p.shards.result()
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise ArtifactWriteError(f"cannot write the sharded checkpoint {p.step}: {e}") from e
        self.ctx.barrier()
        if p.commit is not None and not p.reported:
            self._report(p)

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()

    def settle(self) -> None:
        """On the way out of a failed step: let this rank's pending save finish and commit
        (rank 0 reports it), with no collective, since the other ranks may be stuck in one.
        A save that itself fails is dropped: the error being raised matters more."""
        p, self.pending = self.pending, None
        if p is None:
            return
        with contextlib.suppress(Exception, CheckpointException):
            p.shards.result()
            if p.commit is not None:
                p.commit.result()
                if not p.reported:
                    self._report(p)

    # -- rank 0's background part ----------------------------------------------------------
    def _write_and_commit(
        self,
        step: int,
        tmp: Path,
        shards: Future[Any],
        weights: dict[str, torch.Tensor],
        loop_state: dict[str, Any],
        metrics: dict[str, float],
    ) -> tuple[Path, dict[str, Any]]:
        """Rank 0's thread: the export beside the shards, then the manifest (last) and the
        rename. Rank 0's DCP save completes only after every rank's shard is written (its
        ``.metadata`` follows the gathered write results), so the commit covers them all."""
        try:
            unwrap(self.S.student).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            self.S.tokenizer.save_pretrained(tmp)
            (tmp / SPEC_FILE).write_text(self.S.spec.model_dump_json(indent=1))
            torch.save(loop_state, tmp / STATE_FILE)
            shards.result()
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            with contextlib.suppress(Exception, CheckpointException):
                shards.result()  # DCP's thread is done with the folder before it goes
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactWriteError(f"cannot write checkpoint {step}: {e}") from e
        return commit_checkpoint(self.out_dir, step, tmp, metrics)

    def _report(self, p: _Pending) -> None:
        assert p.commit is not None
        path, manifest = p.commit.result()
        p.reported = True
        self.cb.on_checkpoint(p.step, path, manifest)
        for removed in prune_checkpoints(self.out_dir, self.S.spec.training.keep_checkpoints):
            self.cb.on_checkpoint_removed(removed)


def copy_tensors(obj: Any) -> Any:
    """``obj`` with every tensor copied (the loop mutates the originals while a thread saves)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: copy_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_tensors(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------- resume


def check_weights(
    model: torch.nn.Module, missing: list[str], unexpected: list[str], where: Path
) -> None:
    """Refuse a checkpoint whose weights do not fit the model (CheckpointMismatchError).

    ``save_pretrained`` writes a tied parameter once (GPT-2's lm_head is its token
    embedding), so a missing key is fine only when its tensor really is tied, in this model,
    to a parameter the checkpoint does hold: loading that one fills both. Any other missing
    key (an untied head, say) would resume with freshly initialised weights.
    """
    names: dict[int, list[str]] = {}  # tensor id -> every name it is registered under
    inner = unwrap(model)
    for n, t in [
        *inner.named_parameters(remove_duplicate=False),
        *inner.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(t), []).append(n)
    by_name = {n: ns for ns in names.values() for n in ns}
    gone = set(missing)
    untied = [k for k in missing if not any(o not in gone for o in by_name.get(k, []) if o != k)]
    if untied or unexpected:
        raise CheckpointMismatchError(
            f"{where}: weights do not match the student: missing {untied[:3]} "
            f"(not tied to any weight in the checkpoint), unexpected {unexpected[:3]}"
        )


def spec_diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "spec") -> list[str]:
    """Fields that differ between the checkpoint's spec and this run's (torchtune-style warning)."""
    diffs = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += spec_diff(a, b, f"{prefix}.{k}")
        elif a != b:
            diffs.append(f"{prefix}.{k}: {a!r} -> {b!r}")
    return diffs


def load_sharded(path: Path, model: torch.nn.Module, state: TrainState, group: Any = None) -> None:
    """Load ``path``'s sharded weights and optimizer into ``model`` (plain, DDP or FSDP2) and
    ``state`` at this run's world size, whatever the saving run's was (DCP reshards)."""
    mods = train_modules(model, state.objective)
    msd, osd = get_state_dict(mods, state.optimizer)  # this run's layout, filled in place
    sharded = {"model": msd, "optim": osd}
    try:
        reader = FileSystemReader(str(path / DCP_DIR))
        dcp.load(
            sharded, storage_reader=reader, process_group=group, no_dist=not dist.is_initialized()
        )
    except CheckpointException as e:
        raise CheckpointMismatchError(
            f"{path}: the sharded state does not match the student or its optimizer: "
            f"{str(e)[-500:]}"
        ) from None
    set_state_dict(mods, state.optimizer, model_state_dict=msd, optim_state_dict=osd)


def load_legacy(path: Path, model: torch.nn.Module, state: TrainState, saved: dict) -> None:
    """A checkpoint written before the sharded format: ``model.safetensors`` and the optimizer
    inside ``training_state.pt`` (one process's full state)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"), device=str(state_device(model)))
    missing, unexpected = distributed.load_model_state(model, weights)  # sharded or not
    check_weights(model, missing, unexpected, path)
    state.optimizer.load_state_dict(
        distributed.shard_optim_state(state.optimizer, saved["optimizer"])
    )
    if state.objective is not None and saved.get("objective") is not None:
        state.objective.load_state_dict(saved["objective"])


def state_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def resume(
    out_dir: Path,
    S: Setup,
    state: TrainState,
    model: torch.nn.Module,
    ctx: Context,
    group: Any = None,
) -> Path | None:
    """Load the newest checkpoint under ``out_dir`` whose manifest verifies into ``model``
    and ``state`` (and this rank's RNG states); return it, or None to start fresh.

    Rank 0 picks the checkpoint (after removing interrupted writes); every rank loads it:
    the sharded format (``dcp/``) at any world size, or the older single-file format.
    ``group``: the process group for DCP's collectives (`Checkpointer.group`).
    """
    path = None
    if ctx.is_main:
        clean_temporaries(out_dir)
        path = latest_checkpoint(out_dir)
    path = ctx.broadcast_object(path)
    if path is None:
        return None
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if (path / DCP_DIR).is_dir():
        load_sharded(path, model, state, group)
    else:
        load_legacy(path, model, state, saved)
    state.load_state_dict(saved)
    set_rng_state(ctx.own_rng(saved), S.device)
    if ctx.is_main:
        saved_spec = json.loads((path / SPEC_FILE).read_text())
        for d in spec_diff(saved_spec, S.spec.model_dump(mode="json")):
            print(f"warning: resuming {path.name} with a different spec: {d}")
    return path
