"""What the API does with jobs: validate, create, list, cancel, retry, replay.

It returns rows and plain values; `api.schemas` shapes them into responses. Status changes go
through `service.lifecycle`, queries through `service.repositories`.

Services only ``flush()``; the request's session dependency commits (one transaction per
request). Side effects that must not happen for a rolled-back request — the scheduling pass
that may send the Celery message, the live notification — are registered with
`service.txn.after_commit`, so a job is queued only once its row is durable and nothing is queued
when validation fails. The API never sends a job's message itself: `service.scheduler` admits it
when its pool has a free worker and its team's quota allows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import lifecycle, pools, scheduler
from service.data_sources import check_s3_source
from service.dispatch import DeliveryDispatch, Dispatch
from service.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidStateError,
    NotFoundError,
    QuotaExceededError,
    SharpError,
    StoreUnavailableError,
)
from service.ids import new_id
from service.lifecycle import JobStatus
from service.live import LivePublisher
from service.models import Checkpoint, Job, Team, utcnow
from service.plans import Planner, plan_record
from service.repositories import (
    CheckpointRepository,
    EventRepository,
    JobRepository,
    MetricRepository,
    TeamRepository,
    UploadRepository,
)
from service.settings import Settings
from service.store import get_store
from service.txn import after_commit
from sharp_core.data.scan import ScanBudget, scan_files
from sharp_core.data.sources import is_s3, saved_dataset_kind
from sharp_core.errors import ModelNotFoundError
from sharp_core.evaluate.generation import read_prompt_set
from sharp_core.evaluate.harness import check_tasks
from sharp_core.files import local_model_path
from sharp_core.models.prune_shapes import check_prune_target
from sharp_core.spec import (
    DatasetSpec,
    EvalSetSpec,
    EvaluationJobSpec,
    EvaluationSpec,
    JobRef,
    JobSpec,
    ModelSpec,
    ResourcesSpec,
    parse_evaluation_spec,
    parse_spec,
)


def confine_dataset_files(
    files: Sequence[str], roots: Sequence[Path], param: str = "spec.dataset.files"
) -> list[Path]:
    """The real path of each ``spec.dataset.files`` entry, refusing any outside every root.

    Why real paths: a symlink (or ``..``) inside a root may point anywhere, and what matters
    is where the bytes are read from. Why no roots means no files: the server would otherwise
    read, and train a downloadable model on, whatever its own user can read (``/etc/passwd``,
    the deployment's secrets); ``sharp up`` and the compose file configure a root. Called at
    submission (422) and again by the training process just before it reads, which also
    catches a link swapped in after submission. A missing file is not refused here: the
    training process reports it as a data error naming the entry.

    Raises `InvalidRequestError` (422, ``file_not_allowed``, not retryable) naming
    ``spec.dataset.files`` when nothing may be read, else the entry (``spec.dataset.files.N``);
    `param` is the list's path (an evaluation set's: ``spec.dataset.eval.val.files``).
    """
    if not roots:
        raise InvalidRequestError(
            "this deployment reads no dataset files from the server: SHARP_DATASET_FILE_ROOTS "
            "is not set. Upload the data (POST /v1/uploads, then dataset.source 'upload') or "
            "ask the operator for a root.",
            param=param,
            code="file_not_allowed",
        )
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    out: list[Path] = []
    for i, f in enumerate(files):
        try:
            # The loader expands "~" too, so the check must see the same path it reads.
            real = Path(f).expanduser().resolve()
        # a symlink loop (RuntimeError before 3.13); a NUL byte in the path (ValueError)
        except (OSError, RuntimeError, ValueError) as e:
            raise InvalidRequestError(
                f"'{f}' cannot be resolved: {e}",
                param=f"{param}.{i}",
                code="file_not_allowed",
            ) from None
        if not any(real.is_relative_to(r) for r in real_roots):
            shown = f"'{f}'" if str(real) == f else f"'{f}' (really '{real}')"
            raise InvalidRequestError(
                f"{shown} is outside the directories this deployment reads from",
                param=f"{param}.{i}",
                code="file_not_allowed",
            )
        if real.is_dir():
            _confine_tree(real, real_roots, f, f"{param}.{i}")
        out.append(real)
    return out


def _confine_tree(folder: Path, roots: Sequence[Path], entry: str, param: str) -> None:
    """Every file and folder under `folder` (a ``save_to_disk`` folder), links followed,
    lies under a root too: a link inside it may point anywhere."""
    seen = {folder}
    for top, dirs, names in os.walk(folder, followlinks=True):
        for name in [*dirs, *names]:
            inner = (Path(top) / name).resolve()
            if not any(inner.is_relative_to(r) for r in roots):
                raise InvalidRequestError(
                    f"'{entry}' holds '{Path(top, name).relative_to(folder)}', which is really "
                    f"'{inner}', outside the directories this deployment reads from",
                    param=param,
                    code="file_not_allowed",
                )
        keep = [d for d in dirs if (Path(top) / d).resolve() not in seen]  # no link loops
        seen.update((Path(top) / d).resolve() for d in keep)
        dirs[:] = keep


def confine_eval_files(files: Sequence[str], roots: Sequence[Path], param: str) -> list[Path]:
    """`confine_dataset_files` for the files behind one evaluation field (a task file and
    its data, a prompt set): an error names that field, not a position in a list."""
    try:
        return confine_dataset_files(files, roots, param)
    except InvalidRequestError as e:
        e.param = param
        raise


def request_hash(body: dict[str, Any]) -> str:
    """Canonical JSON digest: the same body with keys in another order is the same request."""
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"id": job_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        pad = "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(cursor + pad))["id"]
        if not isinstance(value, str):
            raise ValueError
        return value
    except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidRequestError(
            "malformed cursor", param="after", code="invalid_cursor"
        ) from None


#: ``session.info`` key: the transaction that already owes a scheduling pass.
_PASS_OWED = "sharp_pass_owed"


@dataclass(frozen=True)
class TeamUsage:
    """A team with what its quotas are counted against right now."""

    team: Team
    running_gpus: int
    queued_jobs: int


#: What the student scored before any training, as recorded at step 0 (perplexity for
#: language models, accuracy and macro-F1 for classifiers).
STEP0_EVAL_METRICS = ("eval_ppl", "eval_accuracy", "eval_macro_f1")


def is_pruned(spec: dict[str, Any] | None) -> bool:
    """Whether a stored spec cuts its student from the teacher (``student.init: prune``)."""
    student = (spec or {}).get("student")
    return isinstance(student, dict) and student.get("init") == "prune"


@dataclass(frozen=True)
class MetricsPage:
    steps: list[tuple[int, dict[str, float]]]
    next_after: int | None


@dataclass
class JobService:
    session: Session
    settings: Settings
    live: LivePublisher | None = None
    dispatch: Dispatch | None = None
    #: Sends the Celery message of each webhook delivery a cancel enqueues.
    deliver: DeliveryDispatch | None = None

    @property
    def jobs(self) -> JobRepository:
        return JobRepository(self.session, self.live, self.deliver)

    # -- create ----------------------------------------------------------------------------
    def create(
        self, team: Team, body: dict[str, Any], idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Validate and queue a job. Returns (job, created); created is False on a replay."""
        digest = request_hash(body)
        if idempotency_key is not None:
            existing = self.jobs.get_by_idempotency_key(team.id, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False

        spec = self.validate(team, body.get("spec"))
        spec, plan = Planner(self.session, self.settings).admit(team, spec)
        self.check_queued_quota(team)
        try:
            job = self.enqueue(
                team, spec, idempotency_key=idempotency_key, digest=digest, plan=plan
            )
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race.
            if idempotency_key is None:
                raise
            existing = self.jobs.get_by_idempotency_key(team.id, idempotency_key)
            if existing is None:
                raise
            return self._replay(existing, digest), False
        return job, True

    def plan(self, team: Team, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/jobs/plan: the same validation as a submission, then the plan (a job
        that cannot fit is the same 422); error findings are returned, not raised."""
        spec = self.validate(team, body.get("spec"))
        p = Planner(self.session, self.settings).plan(team, spec)
        assert p.spec is not None
        return {"plan": plan_record(p), "spec": p.spec.model_dump(mode="json")}

    def validate(self, team: Team, raw_spec: Any, *, prefix: str = "spec") -> JobSpec:
        """Everything a submission checks before a row exists: the spec itself
        (`parse_spec`) and what only the service can check (`_check_references`). A sweep
        runs this for each of its cells (`service.sweeps`)."""
        spec = parse_spec(raw_spec, prefix=prefix)  # type: ignore[arg-type]
        self._check_references(team, spec)
        pools.check_resources(
            self.session,
            spec.resources,
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
            prefix=prefix,
        )
        return spec

    def create_evaluation(
        self, team: Team, body: dict[str, Any], idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """``POST /v1/evaluations``: an evaluation job (a job row whose spec has ``kind:
        evaluation``), validated, queued, idempotent and scheduled as every job."""
        digest = request_hash(body)
        if idempotency_key is not None:
            existing = self.jobs.get_by_idempotency_key(team.id, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
        spec = parse_evaluation_spec(body.get("spec"))
        for role, model in (("model", spec.model), ("teacher", spec.teacher)):
            if model is not None:
                self._check_model(team, model, role)
        if spec.tokenizer:
            self._check_allowed(spec.tokenizer, "spec.tokenizer")
        self._check_evaluation(spec.evaluation)
        self.check_queued_quota(team)
        return self.enqueue(team, spec, idempotency_key=idempotency_key, digest=digest), True

    def enqueue(
        self,
        team: Team,
        spec: JobSpec | EvaluationJobSpec,
        *,
        idempotency_key: str | None = None,
        digest: str | None = None,
        schedule: bool = True,
        plan: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a validated job: its row and first status event (in a savepoint, so an
        Idempotency-Key race rolls back only this job), the live notification and a
        scheduling pass after the commit. `schedule` False: the caller's own pass, or the
        workers' periodic one, admits it (a sweep's final stage created in a worker)."""
        now = utcnow()
        job = Job(
            id=new_id("job"),
            team_id=team.id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            queue=spec.resources.queue,
            gpus=pools.job_gpus(spec.resources),
            priority=spec.resources.priority,
            max_attempts=spec.resources.max_attempts,
            cancel_requested=False,
            idempotency_key=idempotency_key,
            request_hash=digest if idempotency_key is not None else None,
            step=0,
            # an evaluation job has one step: scored (1) or not yet (0)
            max_steps=spec.training.max_steps if isinstance(spec, JobSpec) else 1,
            latest_metrics={},
            plan=plan,
            created_at=now,
            enqueued_at=now,
            updated_at=now,
        )
        with self.session.begin_nested():
            # no live publish inside the savepoint
            event = lifecycle.start(JobRepository(self.session), job)
        if self.live is not None:
            after_commit(self.session, lambda: self.live.publish(job.id, 1, "status", event))  # type: ignore[union-attr]
        if schedule:
            self.schedule_after_commit()
        return job

    @staticmethod
    def _replay(existing: Job, digest: str) -> Job:
        if existing.request_hash != digest:
            raise IdempotencyConflictError(
                "this Idempotency-Key was used with a different request body",
                param="Idempotency-Key",
            )
        return existing

    def _check_references(self, team: Team, spec: JobSpec) -> None:
        """What only the service can check: ids that must exist for this team, operator limits.

        A pool no worker serves is not an error: the job waits, and its ``queue_reason`` says
        why (workers may join later)."""
        found: list[SharpError] = []  # every error, reported together (SharpError.errors)

        @contextmanager
        def collect() -> Iterator[None]:
            try:
                yield
            except SharpError as e:
                if e.status != 422:
                    raise  # not a fault of the spec (a store that did not answer)
                found.extend(e.errors or [e])

        roles: list[tuple[str, ModelSpec | None]] = [
            ("teacher", spec.teacher),
            ("student", spec.student),
        ]
        for role, model in roles:
            if model is not None:
                with collect():
                    self._check_model(team, model, role)
        if spec.tokenizer.name:
            with collect():
                self._check_allowed(spec.tokenizer.name, "spec.tokenizer.name")
        sources: list[tuple[str, DatasetSpec | EvalSetSpec]] = [("spec.dataset", spec.dataset)]
        sources += [(f"spec.dataset.eval.{n}", es) for n, es in spec.dataset.eval.named()]
        for where, ds in sources:  # the training data, then each evaluation set
            with collect():
                if ds.source == "upload":
                    assert ds.upload_id is not None  # the spec validator guarantees it
                    if UploadRepository(self.session).get_for_team(team.id, ds.upload_id) is None:
                        raise InvalidRequestError(
                            f"no upload '{ds.upload_id}' for this team",
                            param=f"{where}.upload_id",
                            code="unknown_upload",
                        )
                if ds.source == "files":
                    self._check_files(ds.files, f"{where}.files")
                    if spec.task == "causal_lm":
                        self._scan_rows(spec.dataset, ds, f"{where}.files")
            if ds.source == "files":
                for i, f in enumerate(ds.files):
                    if is_s3(f):
                        with collect():
                            check_s3_source(f, self.settings, f"{where}.files.{i}")
        if spec.student.init == "prune":
            with collect():
                self._check_prune_target(team, spec)
        with collect():
            self._check_evaluation(spec.evaluation)
        if found:
            raise SharpError.combined(found)

    def _check_files(self, files: Sequence[str], param: str) -> None:
        """The local entries of a ``files`` list: under the roots (`confine_dataset_files`),
        and a folder only if ``save_to_disk`` wrote it. Errors name the entry's place in
        the list (``spec.dataset.files.N``); ``s3://`` entries are `check_s3_source`'s."""
        local = [(i, f) for i, f in enumerate(files) if not is_s3(f)]
        if not local:
            return
        try:
            reals = confine_dataset_files(
                [f for _, f in local], self.settings.dataset_file_roots, param
            )
        except InvalidRequestError as e:
            if e.param and e.param != param:  # an entry of the local ones: its spec index
                e.param = f"{param}.{local[int(e.param.rsplit('.', 1)[1])][0]}"
            raise
        for (i, f), real in zip(local, reals, strict=True):
            if real.is_dir() and saved_dataset_kind(real) is None:
                raise InvalidRequestError(
                    f"'{f}' is a folder, but not one written by datasets' save_to_disk "
                    "(no dataset_info.json and state.json, nor dataset_dict.json)",
                    param=f"{param}.{i}",
                    code="invalid_data_folder",
                )

    def _scan_rows(self, train: DatasetSpec, ds: DatasetSpec | EvalSetSpec, param: str) -> None:
        """Read the first rows of a files source (within the settings' budget) and refuse a
        bad conversation or pair now, naming ``{param}.N``, the file, the row and the field
        (`sharp_core.data.scan`); the job checks every row again when it starts. An
        evaluation set is read with the training data's format and field names."""
        fields = {"text": train.text_field, "messages": train.messages_field,
                  "prompt": train.prompt_field, "completion": train.completion_field}  # fmt: skip
        budget = ScanBudget(self.settings.dataset_scan_rows, self.settings.dataset_scan_bytes)
        if budget.rows and budget.bytes:
            scan_files(list(ds.files), train.format, fields, param, budget)

    @staticmethod
    def _check_local_model(source: str, param: str) -> None:
        """A model source that is a local path must be a folder here (the API and the workers
        share the filesystem, as for dataset files); a hub id is the worker's to fetch."""
        folder = local_model_path(source)
        if folder is not None and not folder.is_dir():
            raise ModelNotFoundError(
                f"model folder not found: '{source}' is a local path (hub ids look like "
                "'org/name') and no folder is there",
                param=param,
            )

    def _check_evaluation(self, ev: EvaluationSpec) -> None:
        """`spec.evaluation`'s files, read now so that a bad one is a 422 naming its field:
        task files parse and read local data under the roots, harness task names exist in the
        installed harness's index, the prompt set has a reference on every line."""
        roots = self.settings.dataset_file_roots

        def confine(files: Sequence[str], param: str) -> list[Path]:
            return confine_eval_files(files, roots, param)

        if ev.harness is not None:
            check_tasks(ev.harness, param="spec.evaluation.harness.tasks", confine=confine)
        if ev.generation is not None:
            param = "spec.evaluation.generation.set"
            read_prompt_set(confine([ev.generation.set], param)[0], ev.generation, param)

    def _check_model(self, team: Team, model: ModelSpec, role: str) -> None:
        """A finished job of this team, or a source the operator allows."""
        if model.model is None:
            return
        if isinstance(model.model, JobRef):
            ref = self.jobs.get_for_team(team.id, model.model.job)
            if ref is None or ref.status != "succeeded":
                raise InvalidRequestError(
                    f"job '{model.model.job}' is not a succeeded job of this team",
                    param=f"spec.{role}.model.job",
                    code="unknown_job",
                )
        else:
            self._check_allowed(model.model, f"spec.{role}.model")
            self._check_local_model(model.model, f"spec.{role}.model")

    def _check_prune_target(self, team: Team, spec: JobSpec) -> None:
        """Refuse a pruning target that cannot fit the teacher, naming the field (422).

        The teacher's config is read where it is at hand without a download: an inline
        config, a local folder, or a finished job's checkpoint. A hub teacher is checked by
        the worker when the job starts (same error, same field)."""
        assert spec.teacher is not None and spec.student.prune is not None
        config = self._teacher_config(team, spec.teacher)
        if config is not None:
            check_prune_target(spec.student.prune, config)

    def _teacher_config(self, team: Team, teacher: ModelSpec) -> dict[str, Any] | None:
        config: dict[str, Any] | None = None
        folder: Path | None = None
        if teacher.config is not None:
            config = dict(teacher.config)
        elif isinstance(teacher.model, JobRef):
            ckpts = CheckpointRepository(self.session).list(teacher.model.job)  # by step
            store = get_store(self.settings)
            key = store.key_of(ckpts[-1].path) if ckpts else None
            if key is None and ckpts and not store.remote:
                folder = Path(ckpts[-1].path)  # a row from before the store: a plain folder
            else:
                try:
                    raw = store.read_bytes(f"{key}/config.json") if key else None
                    config = json.loads(raw) if raw else None
                except (OSError, ValueError):
                    return None  # the worker reports a missing or unreadable model
        elif teacher.model is not None and teacher.model.startswith(("/", "./", "../", "~")):
            folder = Path(teacher.model).expanduser()
        if folder is not None:
            try:
                config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None  # the worker reports a missing or unreadable model with its own error
        if config is None or not isinstance(config, dict):
            return None
        return {**config, **teacher.config_overrides}

    def _check_allowed(self, name: str, param: str) -> None:
        allow = self.settings.model_allowlist
        if allow and not any(name.startswith(prefix) for prefix in allow):
            raise InvalidRequestError(
                f"model '{name}' is not in this deployment's allow-list",
                param=param,
                code="model_not_allowed",
            )

    def check_queued_quota(self, team: Team, adding: int = 1) -> None:
        """Refuse `adding` jobs (one submission, or a sweep's cells: all or none) over the
        team's ``max_queued_jobs``. The team row is locked first, so concurrent submissions
        count one after the other (SQLite serialises them anyway).

        A team without the quota (as read by this request's authentication) takes no lock:
        every submission of a team used to wait for the row until the one before it
        committed, which serialised a team's POSTs (issue 17's profile)."""
        if team.max_queued_jobs is None:
            return
        limit = TeamRepository(self.session).lock_queued_quota(team.id)
        if limit is None:
            return
        queued = self.jobs.count_queued(team.id)
        if queued + adding > limit:
            need = "" if adding == 1 else f", and this sweep queues {adding}"
            raise QuotaExceededError(
                f"team quota: {queued} of {limit} queued jobs{need}; wait for some to start or "
                "cancel some (an operator sets the quota with `sharp admin teams quota`)",
                param="team.max_queued_jobs",
            )

    def schedule_after_commit(self) -> None:
        """A scheduling pass once this request's changes are visible to other processes;
        skipped if another pass is running (see `scheduler.admit`). One per transaction: a
        sweep's cancel cancels many jobs, and one pass after the commit sees them all."""
        tx = self.session.get_transaction()
        if tx is not None and self.session.info.get(_PASS_OWED) is tx:
            return
        self.session.info[_PASS_OWED] = tx
        factory = sessionmaker(bind=self.session.get_bind(), expire_on_commit=False)
        dispatch, timeout = self.dispatch, self.settings.heartbeat_timeout_s
        refresh_s = self.settings.queue_refresh_s
        after_commit(
            self.session,
            lambda: scheduler.run_pass(
                factory, dispatch, heartbeat_timeout_s=timeout, wait=False, refresh_s=refresh_s
            ),
        )

    # -- responses -------------------------------------------------------------------------
    def queue_info(self, job: Job) -> scheduler.QueueInfo | None:
        """The queue position and reason of a queued job (None for any other)."""
        return scheduler.queue_info(
            self.session, job, heartbeat_timeout_s=self.settings.heartbeat_timeout_s
        )

    def team_usage(self, team: Team) -> TeamUsage:
        row = TeamRepository(self.session).refresh(team.id)
        assert row is not None
        return TeamUsage(
            team=row,
            running_gpus=self.jobs.gpus_in_use(team.id),
            queued_jobs=self.jobs.count_queued(team.id),
        )

    # -- read ------------------------------------------------------------------------------
    def get(self, team: Team, job_id: str) -> Job:
        job = self.jobs.get_for_team(team.id, job_id)
        if job is None:
            raise NotFoundError(f"no job '{job_id}'", param="job_id")
        return job

    def list_jobs(
        self, team: Team, *, statuses: Sequence[str] | None, limit: int, after: str | None
    ) -> tuple[Sequence[Job], str | None]:
        before_id = decode_cursor(after) if after else None
        rows = self.jobs.list_for_team(
            team.id, statuses=statuses, limit=limit + 1, before_id=before_id
        )
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
        return page, next_cursor

    # -- cancel / retry --------------------------------------------------------------------
    def cancel(self, team: Team, job_id: str) -> Job:
        """Idempotent. queued → cancelled at once; running → cancelling (the worker finishes it)."""
        job = self.get(team, job_id)
        for _ in range(5):  # each lost race re-reads the row; a handful always suffices
            if job.status in (JobStatus.CANCELLING, JobStatus.CANCELLED):
                return job
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                raise InvalidStateError(f"job is already {job.status}", param="job_id")
            done = lifecycle.request_cancel(self.jobs, job)
            if done and job.status == JobStatus.QUEUED:
                self.schedule_after_commit()  # its slot, or its place in line, is free
            job = self.jobs.get(job.id)  # type: ignore[assignment]
            if done:
                return job
        raise InvalidStateError("the job changed state too often; try again", param="job_id")

    def retry(self, team: Team, job_id: str) -> Job:
        """A failed or cancelled job goes back to the queue with a fresh attempt budget (its
        spec's ``resources.max_attempts``); the trainer resumes from the newest checkpoint
        that verifies."""
        job = self.get(team, job_id)
        if job.status not in lifecycle.sources("retry"):
            raise InvalidStateError(
                f"only failed or cancelled jobs can be retried; this one is {job.status}",
                param="job_id",
            )
        budget = ResourcesSpec.model_validate((job.spec or {}).get("resources") or {}).max_attempts
        self.check_queued_quota(team)
        if not lifecycle.retry(self.jobs, job, budget):
            job = self.get(team, job_id)
            if job.status == JobStatus.QUEUED:
                return job  # a concurrent retry won; same outcome
            raise InvalidStateError(f"job is {job.status}", param="job_id")
        job = self.jobs.get(job.id)  # type: ignore[assignment]
        self.schedule_after_commit()
        return job

    def pruning(self, job: Job) -> dict[str, Any] | None:
        """What pruning kept and what it cost, for a job whose student is pruned: the latest
        'pruned' event's data (the trainer's report, `sharp_core.train.setup.PruneReport.event`)
        plus ``eval_at_step_0``, the student's evaluation before any training. None for any
        other job (asked nothing of the database) and before the report is written."""
        if not is_pruned(job.spec):
            return None
        event = EventRepository(self.session).latest_of_kind(job.id, "pruned")
        if event is None:
            return None
        step0 = MetricRepository(self.session).at_step(job.id, 0, STEP0_EVAL_METRICS)
        return {**event.data, "eval_at_step_0": step0}

    def teacher_cache(self, job: Job) -> list[dict[str, Any]] | None:
        """The teacher-logit caches the job built or read (`service.teacher_caches.of_job`);
        None for a job that asks for none (asked nothing of the database)."""
        method = (job.spec or {}).get("method") or {}
        if ((method.get("teacher_cache") or {}).get("mode") or "off") == "off":
            return None
        from service.teacher_caches import of_job

        return of_job(self.session, job.id)

    def evaluation(self, job: Job) -> dict[str, Any] | None:
        """Downstream scores beside the teacher's (`service.evaluation.job_evaluation`)."""
        from service.evaluation import job_evaluation

        return job_evaluation(self.session, job)

    # -- metrics and checkpoints -----------------------------------------------------------
    def metrics(
        self, team: Team, job_id: str, *, after: int | None, limit: int, names: Sequence[str]
    ) -> MetricsPage:
        job = self.get(team, job_id)
        rows = MetricRepository(self.session).replay(
            job.id, after_step=-1 if after is None else after, limit_steps=limit, names=names
        )
        return MetricsPage(steps=rows, next_after=rows[-1][0] if rows else after)

    def checkpoints(self, team: Team, job_id: str) -> list[Checkpoint]:
        """Checkpoints whose manifest is still in the store (retention deletes old ones)."""
        job = self.get(team, job_id)
        return [ck for ck in CheckpointRepository(self.session).list(job.id) if self._stored(ck)]

    def checkpoint(self, team: Team, job_id: str, step: int) -> Checkpoint:
        job = self.get(team, job_id)
        ck = CheckpointRepository(self.session).get(job.id, step)
        if ck is None or not self._stored(ck):
            raise NotFoundError(f"no checkpoint at step {step}", param="step")
        return ck

    def _stored(self, ck: Checkpoint) -> bool:
        store = get_store(self.settings)
        key = store.key_of(ck.path)
        if key is None:
            return False
        try:
            return store.exists(f"{key}/manifest.json")
        except OSError as e:
            raise StoreUnavailableError(f"the artifact store did not answer: {e}") from None
