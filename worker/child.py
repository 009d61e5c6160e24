"""The training process: ``python -m worker.child JOB_ID ATTEMPT``.

Why a separate process, started fresh (never forked from the worker): CUDA cannot be used
in a forked child of a process that touched it, GPU memory is only reliably returned when
the process that allocated it exits, and a process group can be killed whole (data-loader
workers included) when a cancel is not honoured in time.

What it does: load the job, run `sharp_core.train.loop.train` with callbacks that write
metric batches, checkpoints and one-off events (the pruning report) to the database (and
the live Redis Stream), poll the cancel flag, and leave a result file
(``logs/attempt_N.result.json``) for the supervising task, which alone decides the job's
final status.

Fencing: every write is ``UPDATE jobs … WHERE attempt = :mine AND status IN
('running','cancelling')``; when it matches nothing, another attempt owns the job (the
reaper re-queued it after our heartbeat went stale) and this process stops writing and
stops training. It also stops if its supervisor died (our parent pid changes).

Multi-GPU (``resources.gpus: N > 1``): this process execs
``python -m torch.distributed.run --standalone --nproc-per-node N -m worker.child JOB ATTEMPT``
(same pid, so the supervisor's process-group signals reach torchrun, which forwards SIGTERM
to every rank and SIGKILLs them after ``kill_grace_s``; a SIGKILLed torchrun takes its ranks
with it, `sharp_core.train.distributed`). Each rank then runs `run`: rank 0 is the one described
above (metrics, checkpoints, cancel polling, the result file); the other ranks write nothing
and only vote on stopping (SIGTERM, a dead parent), which the trainer OR-s over ranks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from service import redact
from service.caches import tracked_store
from service.data_sources import fetch_s3_source
from service.db import Database
from service.jobs import confine_eval_files
from service.lifecycle import ACTIVE_STATUSES, RUNNING
from service.live import LivePublisher
from service.models import Job
from service.progress import progress
from service.repositories import (
    CheckpointRepository,
    JobRepository,
    MetricRepository,
    TeacherScoreRepository,
    UploadRepository,
)
from service.settings import Settings, get_settings
from service.store import (
    ArtifactStore,
    checkpoint_key,
    complete_steps,
    delete_checkpoint,
    fetch_checkpoint,
    fetch_file,
    get_store,
    job_key,
    sync_for_resume,
    upload_checkpoint,
    with_retries,
)
from service.teacher_caches import record as record_teacher_cache
from sharp_core.data.sources import expand_entry, is_s3
from sharp_core.errors import (
    ArtifactWriteError,
    CheckpointError,
    DataError,
    ModelNotFoundError,
    SharpError,
)
from sharp_core.spec import DatasetSpec, EvalSetSpec, JobSpec, parse_evaluation_spec, parse_spec
from sharp_core.train.checkpoint import retained_steps, step_dir_name
from sharp_core.train.launch import env_rank, torchrun_command, under_torchrun  # no torch

log = logging.getLogger("worker.child")

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FENCED = 3
#: The run failed and even its result file could not be written: the artifact store (where
#: the logs and result live) is full or read-only. The exit status is the only channel left.
EXIT_ARTIFACT_WRITE_FAILED = 4


def job_dir(settings: Settings, team_id: str, job_id: str) -> Path:
    return Path(settings.artifact_root) / team_id / job_id


def log_path(settings: Settings, team_id: str, job_id: str, attempt: int) -> Path:
    return job_dir(settings, team_id, job_id) / "logs" / f"attempt_{attempt}.log"


def result_path(settings: Settings, team_id: str, job_id: str, attempt: int) -> Path:
    return job_dir(settings, team_id, job_id) / "logs" / f"attempt_{attempt}.result.json"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Atomically: the supervisor must never read half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(redact.scrub_data(result)))
    os.replace(tmp, path)


def _is_disconnect(e: BaseException) -> bool:
    return isinstance(e, OperationalError | InterfaceError) or (
        isinstance(e, DBAPIError) and e.connection_invalidated
    )


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[str(k)[:64]] = float(v)
    return out


class Uploader:
    """Uploads committed checkpoints to the S3 store on a background thread, oldest first.

    Why: an upload of a multi-gigabyte student took seconds to minutes while every rank
    waited. Now `submit` hard-links the checkpoint's files into a hidden staging folder
    beside it (so the trainer may prune its local copy meanwhile), queues it and returns;
    the thread uploads it (files, then the manifest: `upload_checkpoint`, retried by
    `with_retries`) and leaves the result for the training process's main thread, which
    records it (`Reporter.collect_uploads`): database writes stay on one thread. The queue
    is bounded, so a store slower than the checkpoints holds the loop back instead of
    filling the disk. The first failure is kept and raised by `collect`; later checkpoints
    are then dropped, not uploaded out of order.
    """

    def __init__(self, settings: Settings, store: ArtifactStore, skip: Callable[[], bool]):
        self.settings, self.store, self.skip = settings, store, skip
        self.todo: queue.Queue[tuple[int, Path, str, dict[str, Any]] | None] = queue.Queue(
            maxsize=2
        )
        self.done: queue.Queue[tuple[int, str, dict[str, Any]]] = queue.Queue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def submit(self, step: int, path: Path, key: str, manifest: dict[str, Any]) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
            self.thread.start()
        self.todo.put((step, stage_for_upload(path, manifest), key, manifest))

    def collect(self) -> list[tuple[int, str, dict[str, Any]]]:
        """Uploads finished since the last call (step, location, manifest); raises the
        upload's error once one failed."""
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                break
        if self.error is not None and not out:
            raise self.error
        return out

    def join(self) -> None:
        """Wait until every submitted upload is done (or failed)."""
        if self.thread is not None:
            self.todo.put(None)
            self.thread.join()
            self.thread = None

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            step, staged, key, manifest = item
            try:
                if self.error is None and not self.skip():
                    with_retries(
                        self.settings,
                        f"upload checkpoint {step} to {self.store.describe()}",
                        functools.partial(upload_checkpoint, self.store, key, staged, manifest),
                    )
                    self.done.put((step, self.store.location(key), manifest))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
            finally:
                shutil.rmtree(staged, ignore_errors=True)


def stage_for_upload(path: Path, manifest: dict[str, Any]) -> Path:
    """Hard links to a checkpoint's manifest-listed files in ``.upload-step_N-…/`` beside it
    (copies where links fail): the upload reads them even after the trainer pruned ``path``."""
    staged = path.parent / f".upload-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        for name in [*manifest.get("files", {}), "manifest.json"]:
            dst = staged / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path / name, dst)
            except OSError:
                shutil.copyfile(path / name, dst)
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise ArtifactWriteError(f"cannot stage checkpoint {path.name} for upload: {e}") from e
    return staged


class Reporter:
    """Everything the training loop tells the service, batched and fenced by attempt."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        live: LivePublisher | None,
        job: Job,
        attempt: int,
    ):
        self.settings = settings
        self.db = db
        self.live = live
        self.job_id = job.id
        self.team_id = job.team_id
        self.attempt = attempt
        self.spec = job.spec
        self.max_steps = job.max_steps
        self.latest: dict[str, float] = dict(_finite(job.latest_metrics or {}))
        self.peak_mem_mb: float | None = job.peak_mem_mb
        self.buffer: dict[int, dict[str, float]] = {}
        self.last_flush = time.monotonic()
        self.last_poll = 0.0
        self.fenced = False
        self.cancel = False
        self.stop_signal = False
        self.ppid = os.getppid()
        self.checkpoints: set[int] = set()
        self.store: ArtifactStore = get_store(settings)
        self.uploads = Uploader(settings, self.store, lambda: self.fenced)
        try:
            self.keep = parse_spec(job.spec).training.keep_checkpoints
        except SharpError:
            self.keep = 1_000_000  # a bad spec never trains: nothing to retain

    def _retrying(self, transaction: Callable[[], T]) -> T:
        """Run one transaction, again while the database is unreachable (a Postgres restart
        or failover takes seconds), for up to the heartbeat timeout: by then the reaper
        would have given the job away and the fenced write is refused anyway. Without this,
        a database blip kills the training process and costs the job an attempt."""
        retrying = Retrying(
            retry=retry_if_exception(_is_disconnect),
            stop=stop_after_delay(self.settings.heartbeat_timeout_s),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=lambda rs: log.warning("database unreachable, retrying: %s", rs.outcome),
            reraise=True,
        )
        return retrying(transaction)

    # -- metrics ---------------------------------------------------------------------------
    def add_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.buffer.setdefault(int(step), {}).update(_finite(metrics))
        if time.monotonic() - self.last_flush >= self.settings.metrics_flush_s:
            self.flush()

    def flush(self) -> bool:
        """Write buffered metrics as one event; False if fenced off (nothing written)."""
        self.last_flush = time.monotonic()
        if not self.buffer or self.fenced:
            return not self.fenced
        batch = sorted(self.buffer.items())
        for _, step_values in batch:
            self.latest.update(step_values)
        values: dict[str, Any] = {"step": batch[-1][0], "latest_metrics": dict(self.latest)}
        if "tokens_per_s" in self.latest:
            values["tokens_per_s"] = self.latest["tokens_per_s"]
        peaks = [v["peak_mem_mb"] for _, v in batch if "peak_mem_mb" in v]
        if peaks:  # the highest this attempt reported, beside the plan's (GET /v1/jobs/{id})
            self.peak_mem_mb = max([self.peak_mem_mb or 0.0, *peaks])
            values["peak_mem_mb"] = self.peak_mem_mb
        if not self._retrying(lambda: self._write_batch(batch, values)):
            self.fenced = True
            return False
        self.buffer.clear()
        return True

    def _write_batch(self, batch: list[tuple[int, dict[str, float]]], values: dict) -> bool:
        with self.db.session() as s:
            repo = JobRepository(s, self.live)
            seq = repo.update_fenced(
                self.job_id,
                statuses=ACTIVE_STATUSES,
                attempt=self.attempt,
                values=values,
                events=1,
            )
            if seq is None:
                return False
            MetricRepository(s).insert_ignore(
                [
                    {
                        "job_id": self.job_id,
                        "step": step,
                        "name": name,
                        "value": value,
                        "attempt": self.attempt,
                    }
                    for step, vals in batch
                    for name, value in vals.items()
                ]
            )
            repo.add_event(
                self.job_id,
                seq,
                "metrics",
                {
                    "attempt": self.attempt,
                    "metrics": [{"step": step, "values": vals} for step, vals in batch],
                    # The server's ETA (`service.progress`), which clients show as is.
                    "progress": progress(
                        RUNNING.value,
                        values["step"],
                        self.max_steps,
                        values.get("tokens_per_s"),
                        self.spec,
                    ),
                },
            )
        return True

    # -- checkpoints and one-off events ----------------------------------------------------
    def add_checkpoint(self, step: int, path: Path, manifest: dict[str, Any]) -> bool:
        """A committed checkpoint. S3 store: queued for the background upload, recorded once
        uploaded (`collect_uploads`); local store: recorded now. False if fenced off."""
        if self.store.remote:
            if not self.fenced:
                key = checkpoint_key(self.team_id, self.job_id, int(step))
                self.uploads.submit(int(step), Path(path), key, manifest)
            self.collect_uploads()
            return not self.fenced
        return self._add_row(int(step), str(Path(path).resolve()), manifest)

    def collect_uploads(self) -> None:
        """Record the checkpoints uploaded since the last call; raise the upload's error
        (ArtifactWriteError) if one failed. Called from the main thread every step."""
        for step, location, manifest in self.uploads.collect():
            self._add_row(step, location, manifest)

    def finish_uploads(self) -> None:
        """Wait for every queued upload and record it: the job is not done before."""
        self.uploads.join()
        self.collect_uploads()

    def _add_row(self, step: int, location: str, manifest: dict[str, Any]) -> bool:
        """Record the checkpoint (row and event), then apply retention."""
        metrics = _finite(manifest.get("metrics") or {})

        def upsert(s: Session) -> None:
            CheckpointRepository(s).upsert(
                job_id=self.job_id,
                step=step,
                path=location,
                manifest=manifest,
                metrics=metrics,
                attempt=self.attempt,
            )

        data = {
            "attempt": self.attempt,
            "step": step,
            "metrics": metrics,
            "files": len(manifest.get("files", {})),
        }
        if not self._record("checkpoint", data, upsert):
            return False
        self.checkpoints.add(step)
        if self.store.remote:
            self._retain()
        return True

    def _retain(self) -> None:
        """Retention in the S3 store (`retained_steps`: the newest keep_checkpoints and the
        best by eval). The row goes first, so a failed delete leaves only unlisted objects
        (``sharp admin storage prune`` removes them)."""
        with self.db.session() as s:
            rows = [
                (c.step, dict(c.metrics or {}), c.path)
                for c in CheckpointRepository(s).list(self.job_id)
            ]
        kept = retained_steps([(step, m) for step, m, _ in rows], self.keep)
        for step, _, location in rows:
            if step in kept:
                continue
            self._forget(step)
            key = self.store.key_of(location)
            if self.fenced or key is None:
                continue
            try:
                delete_checkpoint(self.store, key)
            except OSError:
                log.warning("could not delete checkpoint %s from the store", step, exc_info=True)

    def add_event(self, kind: str, data: dict[str, Any]) -> bool:
        """A one-off fact about the run for the job's event log (the trainer's 'pruned' report),
        fenced by attempt like every write; False if fenced off (nothing written). A
        'teacher_cache' event also records the cache and this job's use of it; a 'preflight'
        one (the findings at job start) goes on the job's plan too, as
        ``preflight_at_start``."""
        write: Callable[[Session], None] | None = None
        if kind == "teacher_cache":

            def write(s: Session) -> None:
                record_teacher_cache(
                    s, team_id=self.team_id, job_id=self.job_id, attempt=self.attempt, data=data
                )

        elif kind == "preflight":  # the plan made at submission, completed at job start

            def write(s: Session) -> None:
                job = s.get(Job, self.job_id)
                plan = dict((job.plan if job is not None else None) or {})
                plan["preflight_at_start"] = {**data, "attempt": self.attempt}
                JobRepository(s).update_fenced(
                    self.job_id,
                    statuses=ACTIVE_STATUSES,
                    attempt=self.attempt,
                    values={"plan": plan},
                )

        elif kind in ("teacher", "evaluation_failed"):  # columns the leaderboard and API read
            column = "teacher_digest" if kind == "teacher" else "evaluation_error"
            value: Any = (
                data.get("digest")
                if kind == "teacher"
                else {k: data.get(k) for k in ("code", "message", "param")}
            )

            def write(s: Session) -> None:
                JobRepository(s).update_fenced(
                    self.job_id,
                    statuses=ACTIVE_STATUSES,
                    attempt=self.attempt,
                    values={column: value},
                )

        return self._record(kind, {**data, "attempt": self.attempt}, write)

    def _record(
        self, kind: str, data: dict[str, Any], write: Callable[[Session], None] | None = None
    ) -> bool:
        """An event (and the row `write` adds beside it), after the metrics logged before it,
        fenced by attempt and retried through a database outage; False if fenced off."""
        self.flush()  # the metrics up to this point come first in the event log
        if self.fenced:
            return False
        if not self._retrying(lambda: self._write_event(kind, data, write)):
            self.fenced = True
            return False
        return True

    def _write_event(
        self, kind: str, data: dict[str, Any], write: Callable[[Session], None] | None
    ) -> bool:
        with self.db.session() as s:
            repo = JobRepository(s, self.live)
            seq = repo.update_fenced(
                self.job_id, statuses=ACTIVE_STATUSES, attempt=self.attempt, events=1
            )
            if seq is None:
                return False
            if write is not None:
                write(s)
            repo.add_event(self.job_id, seq, kind, data)
        return True

    def remove_checkpoint(self, step: int) -> None:
        """The trainer pruned an old checkpoint (keep_checkpoints): forget it, if still ours.
        With an S3 store that was only the local copy; the store's retention is `_retain`."""
        if not self.store.remote:
            self._forget(step)

    def _forget(self, step: int) -> None:
        if self.fenced:
            return
        with self.db.session() as s:
            if (
                JobRepository(s).update_fenced(
                    self.job_id, statuses=ACTIVE_STATUSES, attempt=self.attempt
                )
                is None
            ):
                self.fenced = True
                return
            CheckpointRepository(s).delete(self.job_id, int(step))
        self.checkpoints.discard(int(step))

    # -- stopping --------------------------------------------------------------------------
    def should_stop(self) -> bool:
        self.collect_uploads()  # uploads done meanwhile are recorded; a failed one raises
        if self.stop_signal or self.fenced or self.cancel:
            return True
        if os.getppid() != self.ppid:
            log.warning("supervisor is gone; stopping at the next checkpoint")
            self.stop_signal = True
            return True
        now = time.monotonic()
        if now - self.last_flush >= self.settings.metrics_flush_s:
            self.flush()
        if now - self.last_poll >= self.settings.cancel_poll_s:
            self.last_poll = now

            def poll() -> Any:
                with self.db.session() as s:
                    return JobRepository(s).fence_state(self.job_id)

            row = self._retrying(poll)
            if row is None or row.attempt != self.attempt or row.status not in ACTIVE_STATUSES:
                self.fenced = True
            elif row.cancel_requested:
                self.cancel = True
        return self.fenced or self.cancel


def make_callbacks(base: type, reporter: Reporter) -> Any:
    """A `TrainCallbacks` subclass bound to `reporter` (the base is imported lazily)."""

    class ServiceCallbacks(base):  # type: ignore[misc, valid-type]
        def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
            reporter.add_metrics(step, metrics)

        def on_checkpoint(self, step: int, path: Path, manifest: dict) -> None:
            reporter.add_checkpoint(step, path, manifest)

        def on_checkpoint_removed(self, step: int) -> None:
            reporter.remove_checkpoint(step)

        def on_event(self, kind: str, data: dict[str, Any]) -> None:
            reporter.add_event(kind, data)

        def on_teacher(self, data: dict[str, Any]) -> None:
            reporter.add_event("teacher", data)  # also sets the job's teacher_digest

        def should_stop(self) -> bool:
            return reporter.should_stop()

    return ServiceCallbacks()


def cache_dir(settings: Settings) -> Path:
    """Where this host keeps what it fetched from an S3 store (corpora, teacher checkpoints)."""
    return Path(settings.artifact_root) / ".cache"


def make_resolver(
    base: type, db: Database, team_id: str, settings: Settings, job_id: str | None = None
) -> Any:
    """A `Resolver` that finds this team's finished jobs and uploads in the database, and
    its teacher-logit caches in the artifact store."""

    class ServiceResolver(base):  # type: ignore[misc, valid-type]
        def teacher_cache_store(self) -> Any:
            return tracked_store(settings, db, team_id, "teacher-caches", job_id)

        def teacher_score_store(self) -> Any:
            return TeacherScoreStore(db, team_id, job_id)

        def confine_files(self, files: list[str], param: str) -> list[Path]:
            # evaluation files (task files, their data, prompt sets): under the data roots
            return confine_eval_files(files, settings.dataset_file_roots, param)

        def data_cache_store(self) -> Any:
            return tracked_store(settings, db, team_id, "data-caches", job_id)

        def job_checkpoint(self, job_id: str) -> Path:
            return resolve_job_checkpoint(db, team_id, job_id, settings)

        def upload_path(self, upload_id: str, param: str = "spec.dataset.upload_id") -> Path:
            with db.session() as s:
                upload = UploadRepository(s).get_for_team(team_id, upload_id)
            missing = DataError(f"upload '{upload_id}' not found", param=param)
            if upload is None:
                raise missing
            store = get_store(settings, uploads=True)
            if not store.remote:
                if not Path(upload.path).is_file():
                    raise missing
                return Path(upload.path)
            # S3: fetched once per host into the local scratch, checked against its sha256
            dest = cache_dir(settings) / "uploads" / f"{upload.sha256}.{upload.format}"
            try:
                return with_retries(
                    settings,
                    f"fetch upload {upload_id}",
                    lambda: fetch_file(store, upload.path, dest, upload.sha256),
                    error=CheckpointError,
                )
            except CheckpointError as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    raise missing from None
                raise

    return ServiceResolver()


class TeacherScoreStore:
    """The team's teacher scores in the database (`sharp_core.train.downstream.ScoreStore`)."""

    def __init__(self, db: Database, team_id: str, job_id: str | None = None):
        self.db, self.team_id, self.job_id = db, team_id, job_id

    def get(self, key: str) -> dict[str, float] | None:
        with self.db.session() as s:
            row = TeacherScoreRepository(s).get(self.team_id, key)
            return None if row is None else {k: float(v) for k, v in row.scores.items()}

    def put(self, key: str, teacher_digest: str, scores: dict[str, float], meta: dict) -> None:
        with self.db.session() as s:
            TeacherScoreRepository(s).put(
                team_id=self.team_id,
                key=key,
                teacher_digest=teacher_digest,
                scores=scores,
                meta=meta,
                job_id=self.job_id,
            )


def resolve_job_checkpoint(db: Database, team_id: str, job_id: str, settings: Settings) -> Path:
    """The final checkpoint of a succeeded job of this team (its highest step still stored;
    from an S3 store, fetched into this host's cache first)."""
    with db.session() as s:
        job = JobRepository(s).get_for_team(team_id, job_id)
        if job is None or job.status != "succeeded":
            raise ModelNotFoundError(f"job '{job_id}' is not a succeeded job of this team")
        ckpts = CheckpointRepository(s).list(job_id)
    store = get_store(settings)
    if store.remote:
        jk = job_key(team_id, job_id)
        steps = with_retries(
            settings, f"list {jk}", lambda: complete_steps(store, jk), error=CheckpointError
        )
        if not steps:
            raise ModelNotFoundError(f"job '{job_id}' has no checkpoint left in the store")
        name = step_dir_name(steps[-1])
        dest = cache_dir(settings) / "checkpoints" / job_id / name
        if not (dest / "manifest.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with_retries(
                settings,
                f"fetch {jk}/{name}",
                lambda: fetch_checkpoint(store, f"{jk}/{name}", dest),
                error=CheckpointError,
            )
        return dest
    for ck in sorted(ckpts, key=lambda c: c.step, reverse=True):
        if (Path(ck.path) / "manifest.json").is_file():
            return Path(ck.path)
    raise ModelNotFoundError(f"job '{job_id}' has no checkpoint left on disk")


def _error_result(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SharpError):
        return {"status": "error", **e.to_dict(), "retryable": e.retryable}
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: another try won't fit
        return {
            "status": "error",
            "code": "out_of_memory",
            "message": str(e)[:2000],
            "param": None,
            "retryable": False,
        }
    return {
        "status": "error",
        "code": "internal_error",
        "message": f"{type(e).__name__}: {e}"[:2000],
        "param": None,
        "retryable": True,
    }


def make_follower_callbacks(base: type, reporter: Reporter) -> Any:
    """Callbacks of a rank other than 0: nothing to report, only its own reasons to stop."""

    class FollowerCallbacks(base):  # type: ignore[misc, valid-type]
        def should_stop(self) -> bool:
            if not reporter.stop_signal and os.getppid() != reporter.ppid:
                reporter.stop_signal = True  # torchrun is gone
            return reporter.stop_signal

    return FollowerCallbacks()


_Src = TypeVar("_Src", DatasetSpec, EvalSetSpec)


def confine_spec_files(spec: JobSpec, settings: Settings) -> JobSpec:
    """The spec with the real path of every dataset file, the training data's and each
    evaluation set's, refusing any outside the roots; ``s3://`` entries fetched into this
    host's cache (`service.data_sources.fetch_s3_source`) and replaced by their local copies.
    Checked at submission too; again here, where the files are read (a link swapped in
    since then, another root list, an object gone). Errors name the entry
    (``spec.dataset.files.N``)."""

    def confined(src: _Src, param: str) -> _Src:
        if src.source != "files":
            return src
        out: list[str] = []
        for i, entry in enumerate(src.files):
            where = f"{param}.{i}"
            if is_s3(entry):
                out += fetch_s3_source(entry, settings, cache_dir(settings) / "data", where)
                continue
            # globs are expanded here, so every file they match is confined (a link inside
            # a root matched by a pattern may point anywhere)
            real = confine_eval_files(
                expand_entry(entry, where), settings.dataset_file_roots, where
            )
            out += [str(p) for p in real]
        return src.model_copy(update={"files": out})

    ds = confined(spec.dataset, "spec.dataset.files")
    sets = {n: confined(es, f"spec.dataset.eval.{n}.files") for n, es in ds.eval.named()}
    if sets:
        ds = ds.model_copy(update={"eval": ds.eval.model_copy(update=sets)})
    return spec.model_copy(update={"dataset": ds})


def ranks_needed(job_id: str, attempt: int, settings: Settings) -> int:
    """How many training processes the job asks for (1 when it is not ours to run or its
    spec is invalid: `run` then reports that as for any job)."""
    db = Database(settings, poolclass=NullPool)
    try:
        with db.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.attempt != attempt or job.status not in ACTIVE_STATUSES:
                return 1
            raw = job.spec
        try:
            return max(1, parse_spec(raw).resources.gpus)
        except SharpError:
            return 1
    finally:
        db.dispose()


def run(job_id: str, attempt: int, settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    main_rank = env_rank() == 0
    db = Database(settings, poolclass=NullPool)
    live = LivePublisher(settings)
    try:
        with db.session() as s:
            job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status not in ACTIVE_STATUSES:
            log.warning("job %s attempt %s is not ours to run; exiting", job_id, attempt)
            return EXIT_FENCED
        out_dir = job_dir(settings, job.team_id, job_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        if main_rank:
            for leftover in out_dir.glob(".upload-step_*"):  # staged by a killed attempt
                shutil.rmtree(leftover, ignore_errors=True)
        result_file = result_path(settings, job.team_id, job_id, attempt)
        reporter = Reporter(settings, db, live, job, attempt)

        def _on_sigterm(_sig: int, _frame: Any) -> None:
            # Graceful: the loop sees should_stop(), saves a checkpoint and returns "stopped".
            reporter.stop_signal = True

        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            if (job.spec or {}).get("kind") == "evaluation":  # POST /v1/evaluations: no training
                return _run_evaluation(job, reporter, db, settings, out_dir, result_file)
            spec = confine_spec_files(parse_spec(job.spec), settings)
            if main_rank and reporter.store.remote:
                # Another host may have run the earlier attempts: resume from the store.
                jk = job_key(job.team_id, job_id)
                resumed = with_retries(
                    settings,
                    f"fetch the last checkpoint of {jk}",
                    lambda: sync_for_resume(reporter.store, jk, out_dir),
                    error=CheckpointError,
                )
                if resumed is not None:
                    log.info("resuming from %s in the store", step_dir_name(resumed))
            from sharp_core.train.loop import Resolver, TrainCallbacks, train  # torch: import late

            result = train(
                spec,
                out_dir,
                callbacks=make_callbacks(TrainCallbacks, reporter)
                if main_rank
                else make_follower_callbacks(TrainCallbacks, reporter),
                resolver=make_resolver(Resolver, db, job.team_id, settings, job_id),
                device=None,
            )
            if not main_rank:
                return EXIT_OK
            if result.metrics:
                reporter.add_metrics(result.step, result.metrics)
            reporter.flush()
            reporter.finish_uploads()
            ckpt = getattr(result, "checkpoint", None)
            if ckpt is not None and int(result.step) not in reporter.checkpoints:
                manifest_file = Path(ckpt) / "manifest.json"
                if manifest_file.is_file():
                    reporter.add_checkpoint(
                        result.step, Path(ckpt), json.loads(manifest_file.read_text())
                    )
                    reporter.finish_uploads()
            if reporter.fenced:
                return EXIT_FENCED
            write_result(
                result_file,
                {
                    "status": result.status,
                    "step": int(result.step),
                    "checkpoint": str(ckpt) if ckpt else None,
                    "metrics": _finite(result.metrics or {}),
                    "cancel": reporter.cancel,
                },
            )
            return EXIT_OK
        except Exception as e:  # noqa: BLE001 - every failure becomes a result for the supervisor
            log.exception("training failed")
            if not main_rank:
                return EXIT_ERROR  # rank 0 writes the result (torchrun stops it if it hangs)
            try:
                reporter.finish_uploads()  # what was uploaded is listed (and resumed from)
            except Exception:  # noqa: BLE001
                log.exception("a checkpoint upload failed too")
            try:
                reporter.flush()
            except Exception:  # noqa: BLE001
                log.exception("could not flush metrics after the failure")
            try:
                write_result(result_file, _error_result(e))
            except OSError:
                log.exception("cannot write the result file either")
                return EXIT_ARTIFACT_WRITE_FAILED
            return EXIT_ERROR
    finally:
        live.close()
        db.dispose()


def _run_evaluation(
    job: Job, reporter: Reporter, db: Database, settings: Settings, out_dir: Path, result: Path
) -> int:
    """An evaluation job: score the model once (`sharp_core.train.downstream.evaluate_model`),
    report it at step 1 and leave the result file; its errors are the job's, as training's."""
    from sharp_core.train.downstream import evaluate_model  # torch: import late
    from sharp_core.train.loop import Resolver, TrainCallbacks

    spec = parse_evaluation_spec(job.spec)
    metrics = evaluate_model(
        spec,
        callbacks=make_callbacks(TrainCallbacks, reporter),
        resolver=make_resolver(Resolver, db, job.team_id, settings, job.id),
        out_dir=out_dir,
    )
    reporter.flush()
    if reporter.fenced:
        return EXIT_FENCED
    write_result(
        result,
        {
            "status": "stopped" if reporter.cancel or reporter.stop_signal else "completed",
            "step": 1 if metrics else 0,
            "checkpoint": None,
            "metrics": _finite(metrics),
            "cancel": reporter.cancel,
        },
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m worker.child JOB_ID ATTEMPT", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # HF_TOKEN (from the supervisor, `worker.supervisor.child_env`) never reaches the log
    # file, the result or the database as text (`service.redact`)
    redact.register_settings(get_settings())
    redact.install()
    redact.redact_std_streams()
    if not under_torchrun():
        settings = get_settings()
        n = ranks_needed(args[0], int(args[1]), settings)
        if n > 1:
            cmd = torchrun_command(
                n,
                ["worker.child", args[0], args[1]],
                shutdown_timeout_s=math.ceil(settings.kill_grace_s),
            )
            log.info("job %s: %d processes under torchrun", args[0], n)
            sys.stderr.flush()
            os.execv(cmd[0], cmd)  # same pid: the supervisor keeps watching it
    return run(args[0], int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
