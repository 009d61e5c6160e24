"""The loop's state, saved and restored whole: checkpoint writing and resuming.

One state for the loop (litgpt's ``fit``): the student's weights (``model.safetensors``, the
``save_pretrained`` layout) plus ``training_state.pt`` with the step, the optimizer, the
objective's learned basis, the grad scaler, the data position and every rank's RNG states.
Resuming restores all of it, so a resumed run follows the uninterrupted run's trajectory;
resuming with a different spec warns and names each field that differs (torchtune's
``_update_recipe_state``). The file layout is `sharp_core.train.checkpoint`'s.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharp_core.data.loading import BatchStream, ClassificationData
from sharp_core.errors import CheckpointMismatchError
from sharp_core.spec import TrainingSpec
from sharp_core.train import distributed
from sharp_core.train.checkpoint import (
    clean_temporaries,
    latest_checkpoint,
    prune_checkpoints,
    step_dir_name,
    write_checkpoint,
)
from sharp_core.train.distributed import Context
from sharp_core.train.setup import Setup

__all__ = [
    "SPEC_FILE",
    "STATE_FILE",
    "TrainState",
    "adamw",
    "check_weights",
    "resume",
    "save_checkpoint",
    "spec_diff",
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

    def state_dict(
        self, rngs: list[dict[str, Any]], per_rank: bool, optimizer: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``rngs``: every rank's RNG states (rank 0's first); kept per rank when ``per_rank``.
        ``optimizer``: its state dict when already gathered (a sharded student)."""
        return {
            "step": self.step,
            "optimizer": optimizer if optimizer is not None else self.optimizer.state_dict(),
            "objective": self.objective.state_dict() if self.objective is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "data": self.stream.state_dict(),
            "rng": rngs[0],
            **({"rng_ranks": rngs} if per_rank else {}),
            **({"onpolicy": self.onpolicy.state_dict()} if self.onpolicy is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything but the RNG states (per rank: see `resume`)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.objective is not None and state.get("objective") is not None:
            self.objective.load_state_dict(state["objective"])
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
    where = {p.device.type for g in groups for p in g["params"]} or {device.type}
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


def save_checkpoint(
    out_dir: Path,
    S: Setup,
    state: TrainState,
    model: torch.nn.Module,
    ctx: Context,
    callbacks: Any,
    metrics: dict[str, float],
) -> Path:
    """Write ``step_NNNNNN/`` atomically (rank 0), report it, prune old ones; every rank
    takes part (the RNG states are gathered) and waits for the write."""
    rngs = ctx.gather_objects(rng_state(S.device))  # every rank's; only rank 0 writes
    # a sharded student: every rank takes part in gathering the whole weights and AdamW state
    weights = distributed.full_model_state(model)
    optim = distributed.full_optim_state(state.optimizer) if weights is not None else None
    if not ctx.is_main:
        ctx.barrier()
        return out_dir / step_dir_name(state.step)

    def write(tmp: Path) -> None:
        unwrap(model).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        S.tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(S.spec.model_dump_json(indent=1))
        torch.save(state.state_dict(rngs, ctx.enabled, optimizer=optim), tmp / STATE_FILE)

    path, manifest = write_checkpoint(out_dir, state.step, write, metrics)
    callbacks.on_checkpoint(state.step, path, manifest)
    for removed in prune_checkpoints(out_dir, S.spec.training.keep_checkpoints):
        callbacks.on_checkpoint_removed(removed)
    ctx.barrier()
    return path


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


def resume(
    out_dir: Path, S: Setup, state: TrainState, model: torch.nn.Module, ctx: Context
) -> Path | None:
    """Load the newest checkpoint under ``out_dir`` whose manifest verifies into ``model``
    and ``state`` (and this rank's RNG states); return it, or None to start fresh.

    Rank 0 picks the checkpoint (after removing interrupted writes); every rank loads it.
    """
    path = None
    if ctx.is_main:
        clean_temporaries(out_dir)
        path = latest_checkpoint(out_dir)
    path = ctx.broadcast_object(path)
    if path is None:
        return None
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"), device=str(S.device))
    missing, unexpected = distributed.load_model_state(model, weights)
    check_weights(model, missing, unexpected, path)
    saved["optimizer"] = distributed.shard_optim_state(state.optimizer, saved["optimizer"])
    state.load_state_dict(saved)
    set_rng_state(ctx.own_rng(saved), S.device)
    if ctx.is_main:
        saved_spec = json.loads((path / SPEC_FILE).read_text())
        for d in spec_diff(saved_spec, S.spec.model_dump(mode="json")):
            print(f"warning: resuming {path.name} with a different spec: {d}")
    return path
