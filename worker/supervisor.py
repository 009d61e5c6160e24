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
import datetime as dt
import json
import logging
import os
import signal
import socket
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
from service.models import utcnow
from service.repositories import JobRepository
from service.settings import Settings, settings_env
from worker.backends import Backend, End, Handle, Launch, LaunchRefused, LocalBackend
from worker.child import EXIT_ARTIFACT_WRITE_FAILED, log_path, result_path

log = logging.getLogger(__name__)

#: Set when the Celery worker starts a warm shutdown: the running job is checkpointed and
#: re-queued instead of holding the shutdown for hours.
PREEMPT = threading.Event()

POLL_S = 0.2


def backend_for(settings: Settings) -> Backend:
    """The backend ``SHARP_WORKER_BACKEND`` names (`worker.backends`)."""
    if settings.worker_backend == "slurm":
        from worker.slurm import SlurmBackend

        return SlurmBackend(settings)
    if settings.worker_backend == "kubernetes":
        from worker.k8s import KubernetesBackend

        if not settings.k8s_image:
            raise ValueError("SHARP_K8S_IMAGE must name the image the training pods run")
        return KubernetesBackend(settings, settings.k8s_image, settings.k8s_namespace)
    return LocalBackend(settings)


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
    detached: bool = False  # the worker shuts down; the backend job runs on (adopted later)


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
        self.backend = backend_for(settings)

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
            adopted = self.adopt(job_id)
            if adopted is None:
                log.info("job %s is not queued; duplicate or stale delivery ignored", job_id)
                return "not_claimed"
            claim, handle = adopted
            log.info("job %s attempt %d adopted by %s", job_id, claim.attempt, self.name)
        else:
            log.info("job %s attempt %d claimed by %s", job_id, claim.attempt, self.name)
            try:
                handle = self._spawn(claim)
            except (OSError, LaunchRefused) as e:
                refused = isinstance(e, LaunchRefused)
                outcome = self._finish(
                    claim,
                    Watch(exit_code=None),
                    None,
                    spawn_error=f"{self.backend.name} refused the job: {e}"
                    if refused
                    else f"cannot start the training process: {e}",
                    refused=refused,
                )
                self.schedule()
                return outcome
        watch = self._watch(handle, claim)
        result = self._read_result(claim)
        outcome = self._finish(claim, watch, result, end=handle.end())
        if result is not None and result.get("status") == "error":  # the operator's line
            log.info(
                "job %s attempt %d: %s (%s [%s]: %s)",
                claim.job_id,
                claim.attempt,
                outcome,
                result.get("code"),
                result.get("param"),
                result.get("message"),
            )
        self.schedule()
        return outcome

    def adopt(self, job_id: str) -> tuple[Claim, Handle] | None:
        """Take over an active job whose supervisor is gone (its heartbeat is stale) but whose
        backend job still runs (a Slurm job outlives the worker that submitted it): watch it
        instead of submitting it again. None: nothing to adopt."""
        cutoff = utcnow() - dt.timedelta(seconds=self.settings.heartbeat_timeout_s)
        with self.db.session() as s:
            repo = JobRepository(s)
            job = repo.get(job_id)
            if (
                job is None
                or job.status not in ACTIVE_STATUSES
                or not job.backend_job_id
                or job.queue != self.settings.pool
            ):
                return None
            claim = Claim(job.id, job.team_id, job.queue, job.attempt)
            backend_job_id = job.backend_job_id
        logfile = log_path(self.settings, claim.team_id, claim.job_id, claim.attempt)
        handle = self.backend.adopt(backend_job_id, logfile)
        if handle is None:
            return None
        with self.db.session() as s:
            seq = JobRepository(s, self.live).update_fenced(
                job_id,
                statuses=ACTIVE_STATUSES,
                attempt=claim.attempt,
                heartbeat_before=cutoff,
                values={"worker": self.name, "heartbeat_at": utcnow()},
                events=1,
            )
            if seq is None:
                return None  # its supervisor is alive after all, or another worker was faster
            JobRepository(s, self.live).add_event(
                job_id,
                seq,
                "backend",
                {
                    "attempt": claim.attempt,
                    "backend": self.backend.name,
                    "backend_job_id": backend_job_id,
                    "adopted_by": self.name,
                },
            )
        return claim, handle

    def schedule(self) -> None:
        """A scheduling pass: the slot this job held is free (or it is queued again)."""
        scheduler.run_pass(
            self.db.sessionmaker,
            self.dispatch,
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
        )

    def _spawn(self, claim: Claim) -> Handle:
        logfile = log_path(self.settings, claim.team_id, claim.job_id, claim.attempt)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        result_path(self.settings, claim.team_id, claim.job_id, claim.attempt).unlink(
            missing_ok=True
        )
        with self.db.session() as s:
            job = JobRepository(s).get(claim.job_id)
            spec = dict(job.spec) if job is not None else {}
        env = child_env(self.settings)
        handle = self.backend.launch(
            Launch(claim.job_id, claim.team_id, claim.attempt, spec, logfile, env)
        )
        if handle.backend_job_id is not None:
            with self.db.session() as s:
                repo = JobRepository(s, self.live)
                seq = repo.update_fenced(
                    claim.job_id,
                    statuses=ACTIVE_STATUSES,
                    attempt=claim.attempt,
                    values={"backend_job_id": handle.backend_job_id},
                    events=1,
                )
                if seq is not None:
                    repo.add_event(
                        claim.job_id,
                        seq,
                        "backend",
                        {
                            "attempt": claim.attempt,
                            "backend": self.backend.name,
                            "backend_job_id": handle.backend_job_id,
                        },
                    )
        return handle

    def _note_waiting(self, claim: Claim, reason: str | None) -> None:
        """The backend holds the job in its own queue (Slurm PENDING), or no longer (None):
        the API shows it ``queued`` with that reason, then ``running``
        (`service.lifecycle.backend_holds`)."""
        shown = f"{self.backend.name}: {reason}" if reason is not None else None
        with self.db.session() as s:
            lifecycle.backend_holds(
                JobRepository(s, self.live),
                claim.job_id,
                claim.attempt,
                shown,
                {"backend": self.backend.name},
            )

    def _watch(self, proc: Handle, claim: Claim) -> Watch:
        """Heartbeat while the job runs; escalate a cancel the job did not honour."""
        w = Watch(exit_code=None)
        next_beat = 0.0
        cancel_at: float | None = None  # when we first saw the cancel flag
        stop_at: float | None = None  # when we asked the child to stop (SIGTERM)
        waiting: str | None = None
        while True:
            code = proc.poll()
            if code is not None:
                w.exit_code = code
                break
            now = time.monotonic()
            reason = proc.waiting()
            if reason != waiting:
                waiting = reason
                with contextlib.suppress(Exception):
                    self._note_waiting(claim, reason)
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
                    proc.stop()
                elif cancel and cancel_at is None:
                    w.cancel_seen = True
                    cancel_at = now
                    if proc.stop_on_cancel and waiting is not None:
                        # Still in Slurm's queue (PENDING): nothing ran, nothing to save.
                        stop_at = now
                        proc.kill()
                    elif proc.stop_on_cancel:
                        # Slurm: scancel --signal=TERM now, the step's checkpoint-then-stop
                        # path; the hard scancel keeps the local timeline (grace + kill grace).
                        stop_at = now + self.settings.cancel_grace_s
                        proc.stop()
            if PREEMPT.is_set() and stop_at is None and not proc.stop_on_cancel:
                # A local child dies with this worker: checkpoint and re-queue it. A Slurm job
                # does not; another worker of the pool adopts it (`adopt`).
                w.preempted = True
                stop_at = now
                proc.stop()
            if PREEMPT.is_set() and proc.stop_on_cancel:
                w.detached = True
                return w
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
                proc.stop()
            if stop_at is not None and not w.killed and now - stop_at >= self.settings.kill_grace_s:
                log.warning(
                    "job %s still running %.0fs after SIGTERM; SIGKILL", claim.job_id, now - stop_at
                )
                w.killed = True
                proc.kill()
            time.sleep(POLL_S)
        # The job is gone; make sure nothing it started survives (GPU memory, data loaders).
        proc.kill()
        return w

    def _read_result(self, claim: Claim) -> dict[str, Any] | None:
        path = result_path(self.settings, claim.team_id, claim.job_id, claim.attempt)
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None

    # -- finish ----------------------------------------------------------------------------
    def _finish(
        self,
        claim: Claim,
        w: Watch,
        result: dict[str, Any] | None,
        spawn_error: str | None = None,
        *,
        end: End | None = None,
        refused: bool = False,
    ) -> str:
        """Decide the job's status from the training process's result, else the backend's
        end (`End`: Slurm's TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY, an outside
        scancel), else the exit status."""
        if w.fenced:
            return "fenced"
        if w.detached:
            return "detached"
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
            if refused:
                # The backend will refuse it again (sbatch's message says why): fail now.
                return to(
                    JobStatus.FAILED,
                    error={"code": "backend_refused", "message": spawn_error, "param": None},
                )
            if (
                end is not None
                and end.code is not None
                and (end.external_cancel or end.state != "FAILED")
            ):
                # What Slurm says (an outside scancel, a node failure, a time limit,
                # preemption, OOM) names the cause better than the processes it stopped.
                if not end.retryable:
                    return to(JobStatus.FAILED, error=end.error())
                if status == "stopped":  # checkpointed on the warning first
                    return requeue_or_fail(end.code, end.error())
                if status != "error" or (result or {}).get("retryable", True):
                    return requeue_or_fail(end.code, end.error())
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
            elif end is not None and end.code is not None:
                error = end.error()
            else:
                error = {
                    "code": "training_process_died",
                    "message": f"the training process exited with {_describe(w.exit_code)}"
                    " and left no result",
                    "param": None,
                }
            return requeue_or_fail("crash", error)


def child_env(settings: Settings) -> dict[str, str]:
    """The training process's environment: this worker's, its settings as ``SHARP_*``, and
    ``SHARP_HF_TOKEN`` as ``HF_TOKEN`` (what transformers, datasets and huggingface_hub read
    for gated models and data sets); without the setting an ``HF_TOKEN`` of the worker's own
    environment passes through."""
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    if settings.hf_token is not None:
        env["HF_TOKEN"] = settings.hf_token.get_secret_value()
    return env


def _describe(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
