"""Starting a job's processes under torchrun, without importing torch.

Why its own module: the process that decides to launch (``worker.child`` before it execs,
``python -m sharp_core train`` before it waits) never trains, and importing torch there
would add seconds to every multi-GPU start for nothing. `sharp_core.train.distributed` re-exports
these.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sharp_core.errors import SpecError

if TYPE_CHECKING:
    from sharp_core.spec import JobSpec

__all__ = ["check_world", "env_rank", "torchrun_command", "under_torchrun"]


def under_torchrun() -> bool:
    """True inside a process torchrun started (it sets these for every rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def torchrun_command(
    nproc: int, module_args: Sequence[str], *, shutdown_timeout_s: int | None = None
) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGS…``.

    ``--standalone``: a single-host rendezvous on a free local port, so jobs on one host never
    collide. ``--shutdown-timeout``: how long torchrun waits, after forwarding a SIGTERM to the
    ranks, before it SIGKILLs them; it must cover a final checkpoint (torchrun's default is
    30 s). ``--max-restarts 0``: a failed rank fails the attempt, and the service decides
    whether to retry (from the last checkpoint), as for one GPU.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
    ]
    if shutdown_timeout_s is not None:
        cmd += ["--shutdown-timeout", str(int(shutdown_timeout_s))]
    return [*cmd, "-m", *module_args]


def check_world(spec: JobSpec, world_size: int) -> None:
    """What a spec must satisfy to run on `world_size` processes (checked before launching)."""
    if world_size > 1 and spec.training.batch_size % world_size:
        raise SpecError(
            f"training.batch_size {spec.training.batch_size} must be a multiple of the "
            f"{world_size} processes (each takes an equal slice of every batch)",
            param="spec.training.batch_size",
        )
