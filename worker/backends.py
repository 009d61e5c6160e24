"""Where a job's training processes run: this host (torchrun --standalone), a Slurm cluster
(sbatch + srun torchrun), or Kubernetes (a Kubeflow PyTorchJob manifest).

Why an interface: the supervisor (`worker.supervisor`) does the same things whatever runs
the training: claim, start, heartbeat, escalate a cancel, read the result file rank 0 left,
decide the job's status. Only "start", "is it still running", "stop it gracefully", "kill
it" and "how did it end" differ, so those are a `Handle`, made by a `Backend`. The training
process itself (`worker.child`) is the same everywhere, so metrics, events, checkpoints and
their fencing by attempt do not know where the job ran.

``SHARP_WORKER_BACKEND`` picks one (`worker.supervisor.backend_for`); ``local`` is the
default.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.settings import Settings


@dataclass
class Launch:
    """What a backend needs to start one attempt of a job."""

    job_id: str
    team_id: str
    attempt: int
    spec: dict[str, Any]
    logfile: Path
    env: dict[str, str]


@dataclass
class End:
    """How a backend job ended, in the lifecycle's words: the error to record when the
    training process's result does not say better (`Supervisor._finish`)."""

    state: str
    code: str | None = None
    message: str = ""
    retryable: bool = True
    external_cancel: bool = False

    def error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": None}


class LaunchRefused(Exception):
    """The backend refused the job (sbatch's error): the job fails with this message."""


class Handle(Protocol):
    #: The backend's id for this attempt (a Slurm job id), stored on the job row.
    backend_job_id: str | None
    #: Send the graceful stop at once on a cancel (Slurm: `scancel --signal=TERM`), besides
    #: the cancel flag the training process polls.
    stop_on_cancel: bool

    def poll(self) -> int | None:
        """The exit status once the job ended, else None."""

    def stop(self) -> None:
        """Ask the training processes to checkpoint and stop (SIGTERM)."""

    def kill(self) -> None:
        """Stop them now."""

    def end(self) -> End | None:
        """After `poll` returned: how the backend says the job ended (None: nothing to add)."""

    def waiting(self) -> str | None:
        """Why the job waits in the backend's own queue (Slurm's reason), None if not."""


class Backend(Protocol):
    name: str

    def launch(self, job: Launch) -> Handle: ...

    def adopt(self, backend_job_id: str, logfile: Path) -> Handle | None:
        """A handle on a job another supervisor started (None: the backend forgot it)."""

    def describe(self) -> dict[str, Any]:
        """The ``workers`` row's backend fields (`service.scheduler.register_worker`)."""


# --------------------------------------------------------------------------- local
@dataclass
class LocalHandle:
    """The training process on this host, in its own session (process group)."""

    proc: subprocess.Popen[bytes]
    backend_job_id: str | None = None
    stop_on_cancel: bool = False

    def poll(self) -> int | None:
        return self.proc.poll()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def end(self) -> End | None:
        return None

    def waiting(self) -> str | None:
        return None


@dataclass
class LocalBackend:
    settings: Settings
    name: str = "local"

    def launch(self, job: Launch) -> LocalHandle:
        env = dict(job.env)
        if self.settings.worker_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.worker_gpus
        with job.logfile.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.child", job.job_id, str(job.attempt)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaches data loaders too
                env=env,
            )
        return LocalHandle(proc)

    def adopt(self, backend_job_id: str, logfile: Path) -> None:
        return None  # a local child dies with its supervisor's host; nothing to adopt

    def describe(self) -> dict[str, Any]:
        return {"backend": "local", "max_nodes": 1, "gpus_per_node": None, "backend_info": None}
