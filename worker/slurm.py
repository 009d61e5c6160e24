"""The Slurm backend: one attempt of a job is one sbatch job whose step runs
``srun torchrun --nnodes $SLURM_NNODES --rdzv-backend c10d --rdzv-endpoint HEAD:PORT``.

Why this shape: it is how the projects we follow launch multi-node training on Slurm
(torchtune's ``full_finetune_multinode.slurm``, NeMo-Run's ``SlurmExecutor``), and it keeps
Slurm the one that places the job. The step runs the same training process as a local job
(``python -m worker.child JOB ATTEMPT`` on every rank), so rank 0 streams metrics, events and
checkpoints to the database and the artifact store exactly as it does on one host. The
nodes therefore need the service's Python environment (or a container: Pyxis
``--container-image``), the database, Redis and the artifact root (a shared filesystem or
S3).

The batch script:

- ``--nodes K --ntasks-per-node 1`` (``--gpus-per-node G`` on GPU partitions); after a
  failure (attempt > 1) ``--nodes 1-K``, so the job resumes on the nodes Slurm gives next,
  even fewer (the DCP checkpoint reshards, `sharp_core.train.state`).
- ``--signal=B:USR1@grace``: Slurm warns the batch shell before a time limit or a
  preemption; the shell's trap sends SIGTERM to the step (``scancel --signal=TERM``), which
  is the training process's checkpoint-then-stop path. The attempt ends "stopped" and the
  job resumes as attempt + 1 (`Supervisor._finish`). ``--no-requeue``: the service, not
  Slurm, decides about another attempt.
- The head address is the first node's ``NodeAddr`` from ``scontrol show node``.

State is read with ``squeue`` while Slurm knows the job as active, then ``sacct`` (when
accounting runs) or ``scontrol show job`` (kept for ``MinJobAge`` seconds).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.pools import procs_per_node
from service.settings import Settings
from sharp_core.spec import ResourcesSpec
from worker.backends import End, Launch, LaunchRefused

log = logging.getLogger(__name__)

#: Slurm's terminal states (``squeue``'s and ``sacct``'s long names).
TERMINAL = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)

#: state -> (error code, retryable): what the lifecycle records when the training process's
#: own result does not say better.
STATE_ERRORS: dict[str, tuple[str, bool]] = {
    "FAILED": ("training_process_died", True),
    "TIMEOUT": ("slurm_timeout", True),
    "NODE_FAIL": ("slurm_node_fail", True),
    "PREEMPTED": ("preempted", True),
    "OUT_OF_MEMORY": ("out_of_memory", False),
    "BOOT_FAIL": ("slurm_boot_fail", True),
    "DEADLINE": ("slurm_deadline", False),
    "CANCELLED": ("slurm_cancelled", False),
}


def _run(cmd: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def job_name(job_id: str, attempt: int) -> str:
    return f"sharp-{job_id}-a{attempt}"


def batch_script(settings: Settings, job: Launch) -> str:
    """The sbatch script of one attempt (the ``#SBATCH`` lines carry every option)."""
    res = ResourcesSpec.model_validate(job.spec.get("resources") or {})
    nodes = str(res.nodes) if job.attempt <= 1 or res.nodes == 1 else f"1-{res.nodes}"
    opts = [
        f"--job-name={job_name(job.job_id, job.attempt)}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--signal=B:USR1@{settings.slurm_signal_grace_s}",
        "--no-requeue",
        f"--output={job.logfile}",
        "--open-mode=append",
        f"--chdir={os.getcwd()}",
    ]
    if settings.slurm_gpus_per_node > 0 and res.gpus > 0:
        opts.append(f"--gpus-per-node={res.gpus}")
    for flag, value in (
        ("partition", settings.slurm_partition),
        ("account", settings.slurm_account),
        ("qos", settings.slurm_qos),
        ("time", settings.slurm_time_limit),
    ):
        if value:
            opts.append(f"--{flag}={value}")
    opts += settings.slurm_sbatch_args
    python = settings.slurm_python or sys.executable
    srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    if settings.slurm_container_image:
        srun.append(f"--container-image={settings.slurm_container_image}")
        if settings.slurm_container_mounts:
            srun.append(f"--container-mounts={settings.slurm_container_mounts}")
    # Expanded by each task's shell, so every node gets its own SLURM_NODEID. No core files:
    # a killed agent would leave hundreds of MB in the working directory.
    torchrun = " ".join(
        [
            "ulimit -c 0;",
            "exec",
            shlex.quote(python),
            "-m torch.distributed.run",
            '--nnodes "$SLURM_NNODES"',
            '--node-rank "$SLURM_NODEID"',
            f"--nproc-per-node {procs_per_node(res)}",
            "--rdzv-backend c10d",
            '--rdzv-endpoint "$SHARP_RDZV_ENDPOINT"',
            f"--rdzv-id {shlex.quote(job_name(job.job_id, job.attempt))}",
            "--max-restarts 0",
            f"--shutdown-timeout {int(settings.kill_grace_s) + 1}",
            f"-m worker.child {shlex.quote(job.job_id)} {job.attempt}",
        ]
    )
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {o}" for o in opts),
        "set -u",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head=$(scontrol show node "$first" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        f'export SHARP_RDZV_ENDPOINT="$head:$(({settings.slurm_rdzv_port} + SLURM_JOB_ID % 1000))"',
        'echo "sharp: Slurm job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, head $SHARP_RDZV_ENDPOINT"',
        # USR1 (time limit or preemption ahead): the step checkpoints and stops.
        'trap \'echo "sharp: USR1 from Slurm, checkpoint and stop";'
        ' scancel --signal=TERM "$SLURM_JOB_ID"\' USR1',
        f"{' '.join(srun)} bash -c {shlex.quote(torchrun)} &",
        "step=$!",
        "while true; do wait $step; rc=$?; kill -0 $step 2>/dev/null || break; done",
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class SlurmHandle:
    """One Slurm job. `poll` asks Slurm at most every ``slurm_poll_s``."""

    settings: Settings
    backend_job_id: str | None
    stop_on_cancel: bool = True
    signalled: bool = False
    state: str = "PENDING"
    reason: str = ""
    exit_code: int | None = None
    _next: float = 0.0
    _info: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        assert self.backend_job_id is not None
        return self.backend_job_id

    def refresh(self) -> None:
        state, reason, code = query(self.id)
        if state:
            self.state, self.reason, self.exit_code = state, reason, code

    def poll(self) -> int | None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.settings.slurm_poll_s
            try:
                self.refresh()
            except (OSError, subprocess.SubprocessError):
                log.exception("cannot ask Slurm about job %s", self.backend_job_id)
        if self.state in TERMINAL:
            return self.exit_code if self.exit_code is not None else 1
        return None

    def stop(self) -> None:
        self.signalled = True
        _run(["scancel", "--signal=TERM", self.id])

    def kill(self) -> None:
        if self.state in TERMINAL:
            return
        self.signalled = True
        _run(["scancel", self.id])

    def end(self) -> End | None:
        code, retryable = STATE_ERRORS.get(self.state, (None, True))
        if code is None:
            return End(self.state)
        if self.state == "CANCELLED":
            if self.signalled:
                return End(self.state)
            return End(
                self.state,
                code,
                f"Slurm job {self.id} was cancelled outside the service (scancel)",
                retryable=False,
                external_cancel=True,
            )
        why = f", reason {self.reason}" if self.reason and self.reason != "None" else ""
        return End(
            self.state,
            code,
            f"Slurm job {self.id} ended {self.state} (exit code {self.exit_code}{why})",
            retryable,
        )

    def waiting(self) -> str | None:
        if self.state != "PENDING":
            return None
        return self.reason if self.reason and self.reason != "None" else "Priority"


def query(job: str) -> tuple[str, str, int | None]:
    """(state, reason, exit code) of a Slurm job: squeue while it is active, then sacct, then
    scontrol. ('', '', None): no source knows the job (yet)."""
    r = _run(["squeue", "-h", "-j", job, "-o", "%T|%r"])
    line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    if line:
        state, _, reason = line.partition("|")
        if state not in TERMINAL:
            return state, reason, None
    r = _run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State,ExitCode,Reason"])
    if r.returncode == 0 and r.stdout.strip():
        state, code, reason = (r.stdout.strip().splitlines()[0].split("|") + ["", "", ""])[:3]
        state = state.split()[0] if state else ""
        if state in TERMINAL:
            return state, reason, _exit(code)
    r = _run(["scontrol", "show", "job", job])
    if r.returncode == 0:
        fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
        state = fields.get("JobState", "")
        if state:
            return state, fields.get("Reason", ""), _exit(fields.get("ExitCode", ""))
    return "", "", None


def _exit(code: str) -> int | None:
    """Slurm's ``EXIT:SIGNAL`` as a process status (negative for a signal)."""
    m = re.match(r"(\d+):(\d+)", code or "")
    if not m:
        return None
    status, sig = int(m.group(1)), int(m.group(2))
    return -sig if sig and not status else status


@dataclass
class SlurmBackend:
    settings: Settings
    name: str = "slurm"

    def launch(self, job: Launch) -> SlurmHandle:
        script = batch_script(self.settings, job)
        job.logfile.parent.mkdir(parents=True, exist_ok=True)
        (job.logfile.parent / f"attempt_{job.attempt}.sbatch").write_text(script)
        r = subprocess.run(
            ["sbatch", "--parsable"],
            input=script,
            capture_output=True,
            text=True,
            timeout=60,
            env=job.env,
            check=False,
        )
        if r.returncode != 0:
            raise LaunchRefused((r.stderr or r.stdout).strip()[:2000] or f"exit {r.returncode}")
        slurm_id = r.stdout.strip().split(";")[0]
        log.info("job %s attempt %d is Slurm job %s", job.job_id, job.attempt, slurm_id)
        return SlurmHandle(self.settings, slurm_id)

    def adopt(self, backend_job_id: str, logfile: Path) -> SlurmHandle | None:
        state, _, _ = query(backend_job_id)
        if not state:
            return None
        h = SlurmHandle(self.settings, backend_job_id)
        h.refresh()
        return h

    def describe(self) -> dict[str, Any]:
        return describe_partition(self.settings)


def describe_partition(settings: Settings) -> dict[str, Any]:
    """The ``workers`` row's backend fields: the partition's nodes, their state and GPUs."""
    part = settings.slurm_partition
    info: dict[str, Any] = {"partition": part, "partition_exists": True, "nodes": []}
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%t|%c|%G|%P"]
    if part:
        cmd[1:1] = ["-p", part]
    try:
        r = _run(cmd, timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        info.update(partition_exists=False, error=str(e)[:200])
        r = None
    nodes: dict[str, dict[str, Any]] = {}
    if r is not None and r.returncode == 0:
        for line in r.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 5:
                continue
            name, state, cpus, gres, partition = parts[:5]
            if name in nodes:
                continue
            nodes[name] = {
                "name": name,
                "state": state,
                "cpus": int(cpus) if cpus.isdigit() else 0,
                "gres": gres,
                "partition": partition.rstrip("*"),
            }
    if part and not nodes:
        # sinfo -p of an unknown partition prints nothing; ask scontrol to be sure.
        check = _run(["scontrol", "show", "partition", part], timeout=15)
        info["partition_exists"] = check.returncode == 0
    info["nodes"] = list(nodes.values())
    info["cpus_per_node"] = min((n["cpus"] for n in nodes.values()), default=0)
    max_nodes = max(1, len(nodes))
    per_node = settings.slurm_gpus_per_node or max(1, info["cpus_per_node"])
    return {
        "backend": "slurm",
        "max_nodes": max_nodes,
        "gpus_per_node": settings.slurm_gpus_per_node or None,
        "backend_info": info,
        "gpus": settings.worker_gpu_count or max_nodes * per_node,
    }
