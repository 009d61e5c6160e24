"""The Celery task's body: claim a job, run its training process, decide how it ended.

Why a supervisor and a child instead of training inside the task: the task process keeps a
database connection, heartbeats and a Celery connection, which must survive the training
process running out of memory, hanging in a CUDA call or being killed. The child runs in its
own session (process group) with ``CUDA_VISIBLE_DEVICES`` set, so the supervisor can stop it
whole and the GPU is free when it exits.

Outcomes (the child's result file, else its exit status):

- completed → ``succeeded``
- stopped after a cancel request → ``cancelled`` (the trainer saved a checkpoint first)
- stopped otherwise (worker shutting down, preemption) → back to ``queued``
- a non-retryable `SharpError` (``model_not_found``, bad data…) → ``failed`` at once
- a retryable error or a crash → ``queued`` while ``attempt < max_attempts``, else ``failed``

Every write is fenced by attempt: if the reaper gave the job to someone else, we write
nothing.

Only a job the scheduler admitted (`service.scheduler`) can be claimed, so a stray or duplicate
message cannot start a job past its pool's capacity or its team's quota. A job going back to
``queued`` loses its admission and waits for the scheduler again; every way a job ends here
is followed by a scheduling pass, since its slot is free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import service.reactions  # noqa: F401  (registers the lifecycle's job-ended reactions)
from service import lifecycle, scheduler
from service.db import Database
from service.dispatch import DeliveryDispatch, Dispatch
from service.lifecycle import ACTIVE_STATUSES, JobStatus
from service.live import LivePublisher
from service.repositories import JobRepository
from service.settings import Settings, settings_env
from worker.child import EXIT_ARTIFACT_WRITE_FAILED, log_path, result_path

log = logging.getLogger(__name__)

#: Set when the Celery worker starts a warm shutdown: the running job is checkpointed and
#: re-queued instead of holding the shutdown for hours.
PREEMPT = threading.Event()

POLL_S = 0.2


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Claim:
    job_id: str
    team_id: str
    queue: str
    attempt: int


@dataclass
class Watch:
    exit_code: int | None
    fenced: bool = False
    cancel_seen: bool = False
    terminated: bool = False
    killed: bool = False
    preempted: bool = False


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        live: LivePublisher | None,
        dispatch: Dispatch,
        worker_name: str | None = None,
        deliver: DeliveryDispatch | None = None,
    ):
        self.settings = settings
        self.db = db
        self.live = live
        self.dispatch = dispatch
        self.deliver = deliver  # webhook deliveries of the job's end (`service.webhooks`)
        self.name = worker_name or settings.worker_name or default_worker_name()

    # -- claim -----------------------------------------------------------------------------
    def claim(self, job_id: str) -> Claim | None:
        """admitted queued → running with attempt+1, atomically. None: not queued and
        admitted (duplicate or stale delivery, cancelled meanwhile, another worker was
        faster) — then there is nothing to do."""
        with self.db.session() as s:
            job = lifecycle.claim(JobRepository(s, self.live), job_id, self.name)
            if job is None:
                return None
            return Claim(job_id=job.id, team_id=job.team_id, queue=job.queue, attempt=job.attempt)

    # -- run -------------------------------------------------------------------------------
    def run(self, job_id: str) -> str:
        claim = self.claim(job_id)
        if claim is None:
            log.info("job %s is not queued; duplicate or stale delivery ignored", job_id)
            return "not_claimed"
        log.info("job %s attempt %d claimed by %s", job_id, claim.attempt, self.name)
        try:
            proc = self._spawn(claim)
        except OSError as e:
            outcome = self._finish(
                claim,
                Watch(exit_code=None),
                None,
                spawn_error=f"cannot start the training process: {e}",
            )
            self.schedule()
            return outcome
        watch = self._watch(proc, claim)
        result = self._read_result(claim)
        outcome = self._finish(claim, watch, result)
        self.schedule()
        return outcome

    def schedule(self) -> None:
        """A scheduling pass: the slot this job held is free (or it is queued again)."""
        scheduler.run_pass(
            self.db.sessionmaker,
            self.dispatch,
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
        )

    def _spawn(self, claim: Claim) -> subprocess.Popen[bytes]:
        logfile = log_path(self.settings, claim.team_id, claim.job_id, claim.attempt)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        result_path(self.settings, claim.team_id, claim.job_id, claim.attempt).unlink(
            missing_ok=True
        )
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        if self.settings.worker_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.worker_gpus
        with logfile.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "worker.child", claim.job_id, str(claim.attempt)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killpg reaches data loaders too
                env=env,
            )

    def _signal_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _watch(self, proc: subprocess.Popen[bytes], claim: Claim) -> Watch:
        """Heartbeat while the child runs; escalate a cancel the child did not honour."""
        w = Watch(exit_code=None)
        next_beat = 0.0
        cancel_at: float | None = None  # when we first saw the cancel flag
        stop_at: float | None = None  # when we asked the child to stop (SIGTERM)
        while True:
            code = proc.poll()
            if code is not None:
                w.exit_code = code
                break
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.settings.heartbeat_interval_s
                try:
                    with self.db.session() as s:
                        cancel = lifecycle.heartbeat(JobRepository(s), claim.job_id, claim.attempt)
                except Exception:  # noqa: BLE001 - a database blip must not orphan the child
                    log.exception("heartbeat failed for %s", claim.job_id)
                    cancel = False
                if cancel is None and not w.fenced:
                    log.warning(
                        "job %s attempt %d was taken over; stopping", claim.job_id, claim.attempt
                    )
                    w.fenced = True
                    stop_at = now
                    self._signal_group(proc, signal.SIGTERM)
                elif cancel and cancel_at is None:
                    w.cancel_seen = True
                    cancel_at = now
            if PREEMPT.is_set() and stop_at is None:
                w.preempted = True
                stop_at = now
                self._signal_group(proc, signal.SIGTERM)
            if (
                cancel_at is not None
                and stop_at is None
                and now - cancel_at >= self.settings.cancel_grace_s
            ):
                log.warning(
                    "job %s ignored the cancel for %.0fs; SIGTERM", claim.job_id, now - cancel_at
                )
                w.terminated = True
                stop_at = now
                self._signal_group(proc, signal.SIGTERM)
            if stop_at is not None and not w.killed and now - stop_at >= self.settings.kill_grace_s:
                log.warning(
                    "job %s still running %.0fs after SIGTERM; SIGKILL", claim.job_id, now - stop_at
                )
                w.killed = True
                self._signal_group(proc, signal.SIGKILL)
            time.sleep(POLL_S)
        # The child is gone; make sure nothing it started survives (GPU memory, data loaders).
        self._signal_group(proc, signal.SIGKILL)
        return w

    def _read_result(self, claim: Claim) -> dict[str, Any] | None:
        path = result_path(self.settings, claim.team_id, claim.job_id, claim.attempt)
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None

    # -- finish ----------------------------------------------------------------------------
    def _finish(
        self, claim: Claim, w: Watch, result: dict[str, Any] | None, spawn_error: str | None = None
    ) -> str:
        if w.fenced:
            return "fenced"
        with self.db.session() as s:
            repo = JobRepository(s, self.live, self.deliver)
            job = repo.get(claim.job_id)
            if job is None or job.attempt != claim.attempt or job.status not in ACTIVE_STATUSES:
                return "fenced"
            cancel = job.cancel_requested
            status = (result or {}).get("status")
            common: dict[str, Any] = {"heartbeat_at": None}
            if result and "step" in result:
                common["step"] = int(result["step"])

            def to(
                final: JobStatus,
                error: dict[str, Any] | None = None,
                data: dict[str, Any] | None = None,
            ) -> str:
                extra = {**(data or {}), **({"step": common["step"]} if "step" in common else {})}
                done = lifecycle.finish(
                    repo, claim.job_id, claim.attempt, final, error=error, values=common, data=extra
                )
                return final.value if done else "fenced"

            def requeue_or_fail(reason: str, error: dict[str, Any]) -> str:
                outcome = lifecycle.requeue_or_fail(
                    repo, job, reason=reason, error=error, values=common
                )
                return outcome.value if outcome is not None else "fenced"

            if status == "completed":
                return to(JobStatus.SUCCEEDED)
            if cancel:
                # Stopped as asked (with a checkpoint), or killed after the grace period.
                return to(JobStatus.CANCELLED, data={"killed": True} if w.killed else None)
            if status == "stopped":
                return requeue_or_fail(
                    "preempted",
                    {"code": "preempted", "message": "the worker stopped the job", "param": None},
                )
            if status == "error":
                error = {k: (result or {}).get(k) for k in ("code", "message", "param")}
                if not (result or {}).get("retryable", True):
                    return to(JobStatus.FAILED, error=error)
                return requeue_or_fail("error", error)
            if result is None and w.exit_code == EXIT_ARTIFACT_WRITE_FAILED:
                # Another attempt would write to the same store: fail now, keep what is there.
                return to(
                    JobStatus.FAILED,
                    error={
                        "code": "artifact_write_failed",
                        "message": "the artifact store refused a write (full or read-only); "
                        "the training process could not even leave its result there",
                        "param": None,
                    },
                )
            if spawn_error is not None:
                error = {"code": "spawn_failed", "message": spawn_error, "param": None}
            else:
                error = {
                    "code": "training_process_died",
                    "message": f"the training process exited with {_describe(w.exit_code)}"
                    " and left no result",
                    "param": None,
                }
            return requeue_or_fail("crash", error)


def _describe(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
