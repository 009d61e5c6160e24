"""What the API does with sweeps (docs/sweeps.md): create, list, read, cancel, advance, report.

A sweep is a set of ordinary jobs (its cells) plus the facts only the sweep owns. Why ordinary
jobs: quotas, fair share, priority, cancel and retry then apply to each cell with no second
code path; the cells are created through `service.jobs.JobService` (`validate`, `enqueue`), the
same calls ``POST /v1/jobs`` makes.

Why the sweep's status is derived, not stored: the job lifecycle is the one writer of job
statuses, so a sweep is ``running`` while any cell's job is not terminal, and ``completed`` or
``cancelled`` once all are (with counts per status). The sweep writes two facts of its own,
each once, by a conditional UPDATE: ``final_started_at`` (the final stage is created by one
caller only) and ``finished_at`` (``sweep.finished`` is enqueued once, in the same
transaction).

Who advances a sweep (`SweepService.advance`, idempotent): the job lifecycle's terminal
transition (`cell_ended`, after its commit), every ``GET /v1/sweeps/{id}``, and the reaper's
periodic pass (`advance_unfinished`), so a crash between a cell's end and the advance never
strands a sweep.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.dispatch import DeliveryDispatch, Dispatch
from service.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    InvalidStateError,
    NotFoundError,
    SharpError,
)
from service.evaluation import PPL_METRICS, scores_of
from service.ids import new_id
from service.jobs import JobService, decode_cursor, encode_cursor, request_hash
from service.lifecycle import TERMINAL_STATUSES
from service.live import LivePublisher
from service.models import Job, Sweep, SweepCell, Team, utcnow
from service.plans import Planner
from service.repositories import (
    JobRepository,
    SweepRepository,
    TeacherScoreRepository,
    TeamRepository,
)
from service.settings import Settings, get_settings
from service.txn import after_commit
from service.webhooks import enqueue_event
from sharp_core.spec import parse_spec
from sharp_core.study.compare import compare, gaps_closed, metric_for, metric_named
from sharp_core.study.sweep import (
    Cell,
    FinalSpec,
    SweepSpec,
    check_cells,
    count_cells,
    expand,
    final_cells,
    get_path,
    parse_sweep,
)

log = logging.getLogger(__name__)

#: How many invalid cells a 422 lists (it also says how many there are in all).
INVALID_CELLS_SHOWN = 5
#: Sweep statuses, derived from the cells' jobs (`derive_status`).
SWEEP_STATUSES = ("running", "cancelling", "completed", "cancelled")


class InvalidCellsError(SharpError):
    """Some cells' specs are invalid: the first few are listed, and nothing was created."""

    code = "invalid_sweep_cells"
    status = 422
    retryable = False

    def __init__(self, message: str, *, param: str | None, cells: list[dict[str, Any]], count: int):
        super().__init__(message, param=param)
        self.cells = cells
        self.count = count

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "invalid_cells": self.count, "cells": self.cells}


def count_by_stage(rows: Sequence[tuple[SweepCell, Job]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for cell, job in rows:
        by = out.setdefault(cell.stage, {})
        by[job.status] = by.get(job.status, 0) + 1
    return out


def derive_status(sweep: Sweep, counts: dict[str, dict[str, int]]) -> str:
    """running while a cell is not terminal or the final stage is still owed; then
    cancelled (a cancel was asked) or completed. Failed cells do not fail the sweep: the
    report lists them."""
    pending = sum(n for by in counts.values() for s, n in by.items() if s not in TERMINAL_STATUSES)
    if pending:
        return "cancelling" if sweep.cancel_requested_at is not None else "running"
    if sweep.cancel_requested_at is not None:
        return "cancelled"
    if (sweep.request or {}).get("final") is not None and sweep.final_started_at is None:
        return "running"  # every tune cell ended; the final stage is being created
    return "completed"


@dataclass(frozen=True)
class Selection:
    """What a stage is compared on: the metric (`sharp_core.study.compare.metric_for`), the names
    to read from the metrics table, and a note when it is the training tail's fallback."""

    metric: dict[str, Any]
    reads: tuple[str, ...]
    note: str | None

    def value(self, last: dict[str, float]) -> float | None:
        name = self.metric["name"]
        if name in last:
            return last[name]
        if name == "eval_ppl" and "eval_loss" in last:
            return math.exp(min(last["eval_loss"], 50.0))
        return None


def selection(base: dict[str, Any], split: str, chosen: str | None = None) -> Selection:
    """The metric of a stage: the sweep's `selection_metric` when it names one (both stages:
    a harness score has no val / test split); else ``val_*`` (tune) / ``test_*`` (final) when
    the base spec names that evaluation set (``dataset.eval.<split>``), else the training
    tail's eval (ppl = exp(eval_loss) for language models, eval_accuracy for classifiers),
    said in the note."""
    if chosen is not None:
        names = (chosen, "eval_loss") if chosen == "eval_ppl" else (chosen,)
        return Selection(metric_named(chosen), names, None)
    task = str(base.get("task") or "causal_lm")
    metric = metric_for(task, split)
    if get_path(base, f"dataset.eval.{split}") is not None:
        return Selection(metric, (metric["name"],), None)
    if task == "sequence_classification":
        fallback = {**metric, "name": "eval_accuracy"}
        reads: tuple[str, ...] = ("eval_accuracy",)
    else:
        fallback = {**metric, "name": "eval_ppl"}
        reads = ("eval_ppl", "eval_loss")
    note = (
        f"the base spec names no dataset.eval.{split}: compared on the training data's "
        f"held-out tail ({fallback['name']}"
        + (", = exp(eval_loss)" if fallback["name"] == "eval_ppl" else "")
        + f") instead of {metric['name']}"
    )
    return Selection(fallback, reads, note)


def curve_metric(base: dict[str, Any]) -> str:
    return "val_loss" if get_path(base, "dataset.eval.val") is not None else "eval_loss"


@dataclass(frozen=True)
class SweepView:
    """A sweep with its cells (and their jobs) and derived status, as one read saw them."""

    sweep: Sweep
    cells: list[tuple[SweepCell, Job]]
    counts: dict[str, dict[str, int]]
    status: str
    values: dict[str, float | None]  # job id → the value its stage is compared on


@dataclass
class SweepService:
    session: Session
    settings: Settings
    live: LivePublisher | None = None
    dispatch: Dispatch | None = None
    deliver: DeliveryDispatch | None = None

    @property
    def repo(self) -> SweepRepository:
        return SweepRepository(self.session)

    @property
    def jobs(self) -> JobService:
        return JobService(self.session, self.settings, self.live, self.dispatch, self.deliver)

    # -- create ----------------------------------------------------------------------------
    def create(
        self, team: Team, body: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[SweepView, bool]:
        """Validate the whole sweep, then create it and every tune cell's job in this
        request's transaction: any refusal (too many cells, an invalid cell, the team's
        queued-jobs quota) creates nothing. Returns (sweep, created); created is False for a
        replay of the same `idempotency_key` and body (another body: 409)."""
        digest = request_hash(body)
        if idempotency_key is not None:
            existing = self.repo.get_by_idempotency_key(team.id, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
        spec = parse_sweep(body)
        n_tune, n_final = count_cells(spec)  # before expanding: it may be astronomical
        limit = self.settings.sweep_max_cells
        if n_tune + n_final > limit:
            raise InvalidRequestError(
                f"this sweep has {n_tune} tune cells"
                + (f" and {n_final} final cells" if n_final else "")
                + f", more than this deployment's limit of {limit} (SHARP_SWEEP_MAX_CELLS)",
                param="sweep",
                code="too_many_cells",
            )
        cells = expand(spec)
        methods = list(dict.fromkeys(str(c.method) for c in cells))
        if spec.reference is not None and spec.reference not in methods:
            raise InvalidRequestError(
                f"the reference '{spec.reference}' is not one of this sweep's methods "
                f"({', '.join(methods)})",
                param="sweep.reference",
            )
        name_cells(spec.name, cells)
        admitted = self._validate(team, spec, cells)
        self.jobs.check_queued_quota(team, adding=len(cells))
        sweep = Sweep(
            id=new_id("swp"),
            team_id=team.id,
            name=spec.name,
            request=spec.model_dump(mode="json"),
            reference=spec.reference,
            idempotency_key=idempotency_key,
            request_hash=digest if idempotency_key is not None else None,
            created_at=utcnow(),
        )
        try:
            # The sweep row first: a concurrent request with the same key fails here, before
            # any of this request's jobs exist.
            with self.session.begin_nested():
                self.repo.add(sweep)
        except IntegrityError:
            existing = (
                self.repo.get_by_idempotency_key(team.id, idempotency_key)
                if idempotency_key is not None
                else None
            )
            if existing is None:
                raise
            return self._replay(existing, digest), False
        self.repo.add_cells(self._insert_cells(team, sweep.id, cells, admitted, start=0))
        self.jobs.schedule_after_commit()
        return self.view(sweep), True

    def _replay(self, existing: Sweep, digest: str) -> SweepView:
        if existing.request_hash != digest:
            raise IdempotencyConflictError(
                "this Idempotency-Key was used with a different request body",
                param="Idempotency-Key",
            )
        return self.view(existing)

    def _admit(self, team: Team, raw: Any) -> tuple[Any, dict[str, Any]]:
        """One cell as ``POST /v1/jobs`` admits it: validated, then planned (a cell that
        cannot fit, or with an error finding, is a 422 naming the field); the spec with the
        levers the plan pulled, and the plan to store on the cell's job."""
        job_spec = self.jobs.validate(team, raw)
        return Planner(self.session, self.settings).admit(team, job_spec)

    def _validate(
        self, team: Team, spec: SweepSpec, cells: list[Cell]
    ) -> list[tuple[Any, dict[str, Any]]]:
        """Every cell admitted as a job submission is (`_admit`: validation and the plan);
        422 listing the first few refused ones. The final stage's variant of each
        configuration (the test set kept, a final seed) is checked too, so the stage created
        later cannot be refused. Returns (spec with levers, plan) per cell."""
        checks = list(cells)
        if spec.final is not None:
            one_seed = spec.model_copy(update={"final": FinalSpec(seeds=spec.final.seeds[:1])})
            seen: dict[str, dict[str, Any]] = {}
            for c in cells:
                seen.setdefault(c.config, c.overrides)
            checks += final_cells(one_seed, seen)
        parsed, count, bad = check_cells(
            checks, lambda raw: self._admit(team, raw), limit=INVALID_CELLS_SHOWN
        )
        for b in bad:  # a final-stage variant is not a cell of the request
            if b["cell"] >= len(cells):
                b["cell"] = None
        if count:
            first = bad[0]
            raise InvalidCellsError(
                f"{count} cell(s) of this sweep have an invalid spec or cannot run; nothing "
                f"was created. First: cell {first['cell']} ({first['config']}, seed "
                f"{first['seed']}): {first['message']}",
                param=first["param"],
                cells=bad,
                count=count,
            )
        return parsed[: len(cells)]

    def _insert_cells(
        self,
        team: Team,
        sweep_id: str,
        cells: list[Cell],
        admitted: Sequence[tuple[Any, dict[str, Any] | None]],
        *,
        start: int,
        schedule: bool = False,
    ) -> list[SweepCell]:
        rows = []
        for i, (c, (job_spec, plan)) in enumerate(zip(cells, admitted, strict=True)):
            job = self.jobs.enqueue(team, job_spec, schedule=schedule, plan=plan)
            rows.append(
                SweepCell(
                    sweep_id=sweep_id,
                    index=start + i,
                    stage=c.stage,
                    method=job_spec.method.name,  # as validated (a request may say 1.0)
                    config=c.config,
                    seed=job_spec.training.seed,
                    overrides=c.overrides,
                    job_id=job.id,
                )
            )
        return rows

    # -- read ------------------------------------------------------------------------------
    def _get(self, team: Team, sweep_id: str) -> Sweep:
        sweep = self.repo.get_for_team(team.id, sweep_id)
        if sweep is None:
            raise NotFoundError(f"no sweep '{sweep_id}'", param="sweep_id")
        return sweep

    def view(self, sweep: Sweep) -> SweepView:
        rows = self.repo.cells([sweep.id])
        counts = count_by_stage(rows)
        base = (sweep.request or {}).get("base") or {}
        values: dict[str, float | None] = {}
        chosen = (sweep.request or {}).get("selection_metric")
        sels = {"tune": selection(base, "val", chosen), "final": selection(base, "test", chosen)}
        reads = sorted({n for s in sels.values() for n in s.reads})
        last = self.repo.last_values([j.id for _, j in rows], reads)
        for cell, job in rows:
            values[job.id] = sels[cell.stage].value(last.get(job.id, {}))
        return SweepView(sweep, rows, counts, derive_status(sweep, counts), values)

    def get(self, team: Team, sweep_id: str) -> SweepView:
        """The sweep and its cells; advances it first (idempotent), so a lost trigger is
        repaired by the next reader."""
        sweep = self._get(team, sweep_id)
        self.advance(sweep.id)
        return self.view(self._get(team, sweep_id))

    def list_sweeps(
        self, team: Team, *, limit: int, after: str | None
    ) -> tuple[list[tuple[Sweep, dict[str, dict[str, int]], str]], str | None]:
        """Newest first: (sweep, counts per stage and status, status) per sweep."""
        before = decode_cursor(after) if after else None
        rows = self.repo.list_for_team(team.id, limit=limit + 1, before_id=before)
        page = list(rows[:limit])
        counts = self.repo.counts([s.id for s in page])
        out = [(s, counts[s.id], derive_status(s, counts[s.id])) for s in page]
        return out, (encode_cursor(page[-1].id) if len(rows) > limit else None)

    # -- cancel ----------------------------------------------------------------------------
    def cancel(self, team: Team, sweep_id: str) -> SweepView:
        """Idempotent: marks the sweep cancelled (the final stage then never starts) and
        cancels every cell's job that has not ended, through the job lifecycle."""
        sweep = self._get(team, sweep_id)
        # First, under the sweep row's lock: a concurrent advance either created the final
        # stage before (its cells are read below) or sees the cancel and creates nothing.
        self.repo.mark_cancel_requested(sweep.id, utcnow())
        jobs = self.jobs
        for _, job in self.repo.cells([sweep.id]):
            if job.status in TERMINAL_STATUSES or job.status == "cancelling":
                continue
            with contextlib.suppress(InvalidStateError):  # it ended meanwhile
                jobs.cancel(team, job.id)
        self.advance(sweep.id)
        return self.view(self._get(team, sweep_id))

    # -- advance ---------------------------------------------------------------------------
    def advance(self, sweep_id: str, *, schedule: bool = True) -> bool:
        """Idempotent: create the final stage once every tune cell has ended (each method's
        configuration with the best val mean), and mark the sweep finished once every cell
        has ended (enqueuing ``sweep.finished``). Each happens once, whoever calls and however
        often: the conditional UPDATEs of `SweepRepository` pick one winner. Returns whether
        anything changed. `schedule` False: no scheduling pass after the commit (the job
        lifecycle's hook, in a worker that runs one next)."""
        sweep = self.repo.get(sweep_id)
        if sweep is None or sweep.finished_at is not None:
            return False
        changed = False
        rows = self.repo.cells([sweep.id])
        spec = SweepSpec.model_validate(sweep.request)
        tune = [(c, j) for c, j in rows if c.stage == "tune"]
        if (
            spec.final is not None
            and sweep.final_started_at is None
            and sweep.cancel_requested_at is None
            and all(j.status in TERMINAL_STATUSES for _, j in tune)
        ):
            changed = self._start_final(sweep, spec, tune, start=len(rows), schedule=schedule)
            sweep = self.repo.get(sweep_id)  # another caller may have won: read it again
            assert sweep is not None
            rows = self.repo.cells([sweep.id])
        ended = all(j.status in TERMINAL_STATUSES for _, j in rows)
        final_done = (
            spec.final is None
            or sweep.final_started_at is not None
            or sweep.cancel_requested_at is not None
        )
        if ended and final_done and self.repo.mark_finished(sweep.id, utcnow()):
            counts = count_by_stage(rows)
            enqueue_event(
                self.session,
                sweep.team_id,
                "sweep.finished",
                sweep_summary(sweep, counts, derive_status(sweep, counts)),
                self.deliver,
            )
            changed = True
        return changed

    def _start_final(
        self,
        sweep: Sweep,
        spec: SweepSpec,
        tune: list[tuple[SweepCell, Job]],
        *,
        start: int,
        schedule: bool,
    ) -> bool:
        sel = selection(spec.base, "val", spec.selection_metric)
        last = self.repo.last_values([j.id for _, j in tune], sel.reads)
        results = [_result(c, j, sel.value(last[j.id])) for c, j in tune]
        found = compare(results, metric=sel.metric, reference=spec.reference)["best"]
        order = list(dict.fromkeys(c.method for c, _ in tune))  # the sweep's method order
        best: dict[str, str] = {m: found[m] for m in order if m in found}
        if not self.repo.start_final(sweep.id, utcnow(), chosen=best):
            return False
        overrides = {c.config: c.overrides for c, _ in tune}
        # A method none of whose cells completed has no chosen configuration: no final cells
        # (its tune cells are listed as failed in the report).
        cells = name_cells(spec.name, final_cells(spec, {m: overrides[k] for m, k in best.items()}))
        team = TeamRepository(self.session).get(sweep.team_id)
        assert team is not None
        admitted = [self._final_admit(team, c) for c in cells]  # checked at creation
        self.repo.add_cells(
            self._insert_cells(team, sweep.id, cells, admitted, start=start, schedule=False)
        )
        if cells and schedule:
            self.jobs.schedule_after_commit()
        log.info("sweep %s: final stage created (%d cells) with %s", sweep.id, len(cells), best)
        return True

    def _final_admit(self, team: Team, cell: Cell) -> tuple[Any, dict[str, Any] | None]:
        """A final cell planned as at creation (its variant was admitted then). Should the
        plan refuse it now (a pool that shrank since), the cell is still created, unplanned,
        and its job start says why: the final stage is created once and never half."""
        job_spec = parse_spec(cell.spec, prefix="spec")
        try:
            return Planner(self.session, self.settings).admit(team, job_spec)
        except SharpError as e:
            log.warning("final cell %s not planned: %s", cell.spec.get("name"), e)
            return job_spec, None

    # -- report and curves -----------------------------------------------------------------
    def report(self, team: Team, sweep_id: str) -> dict[str, Any]:
        """Both stages compared (`sharp_core.study.compare.compare`): tune on the val metric (the
        best configuration per method chosen there), final on the test metric with the
        configurations chosen on val. Failed cells are counted per configuration and listed."""
        view = self.get(team, sweep_id)
        sweep = view.sweep
        base = (sweep.request or {}).get("base") or {}
        chosen = (sweep.request or {}).get("selection_metric")
        sel_val, sel_test = selection(base, "val", chosen), selection(base, "test", chosen)

        def results(stage: str) -> list[dict[str, Any]]:
            return [_result(c, j, view.values[j.id]) for c, j in view.cells if c.stage == stage]

        tune = compare(results("tune"), metric=sel_val.metric, reference=sweep.reference)
        final = None
        if sweep.final_started_at is not None:
            final = compare(
                results("final"),
                metric=sel_test.metric,
                reference=sweep.reference,
                best=dict(sweep.chosen or {}),
            )
        # the gap each method closed between the baseline student (the reference) and the
        # teacher, per downstream score the teacher has (docs/evaluation.md)
        teacher = TeacherScoreRepository(self.session).latest_events(
            [j.id for _, j in view.cells], "teacher_scores"
        )

        def scored(stage: str) -> list[dict[str, Any]]:
            return [
                {
                    "method": c.method,
                    "config": c.config,
                    "status": _status_for_compare(j),
                    "scores": scores_of(j.latest_metrics or {}),
                    "teacher": (teacher.get(j.id) or {}).get("scores") or {},
                }
                for c, j in view.cells
                if c.stage == stage
            ]

        tune["gap_closed"] = gaps_closed(
            scored("tune"), best=tune["best"], reference=tune["reference"]
        )
        if final is not None:
            final["gap_closed"] = gaps_closed(
                scored("final"), best=final["best"], reference=final["reference"]
            )
        return {
            "sweep_id": sweep.id,
            "status": view.status,
            "counts": view.counts,
            "selection_metric": sel_val.metric["name"],
            "selection_metric_note": sel_val.note,
            "final_metric": sel_test.metric["name"],
            "final_metric_note": sel_test.note,
            "tune": tune,
            "final": final,
            "failed_cells": [
                {**_cell_ref(c, j), "error": j.error}
                for c, j in view.cells
                if j.status in ("failed", "cancelled")
            ],
            # the leaderboard's columns per cell: perplexity, harness scores with retained,
            # answer quality (docs/evaluation.md)
            "cells": [{**_cell_ref(c, j), **cell_scores(j)} for c, j in view.cells],
        }

    def curves(self, team: Team, sweep_id: str) -> dict[str, Any]:
        """Every cell's eval curve, read with one query for all cells."""
        sweep = self._get(team, sweep_id)
        rows = self.repo.cells([sweep.id])
        name = curve_metric((sweep.request or {}).get("base") or {})
        series = self.repo.series([j.id for _, j in rows], name)
        return {
            "metric": name,
            "cells": [
                {**_cell_ref(c, j), "points": [[s, v] for s, v in series[j.id]]} for c, j in rows
            ],
        }


def name_cells(sweep_name: str, cells: list[Cell]) -> list[Cell]:
    """Each cell's job is named after its sweep, configuration and seed (job lists show it)."""
    for c in cells:
        suffix = f"/{c.config}/seed{c.seed}"
        c.spec["name"] = sweep_name[: max(1, 200 - len(suffix))] + suffix[:199]
    return cells


def _status_for_compare(job: Job) -> str:
    """`sharp_core.study.compare` counts ``completed`` cells' values; a job says ``succeeded``."""
    return "completed" if job.status == "succeeded" else job.status


def _result(cell: SweepCell, job: Job, value: float | None) -> dict[str, Any]:
    return {
        "method": cell.method,
        "config": cell.config,
        "seed": cell.seed,
        "status": _status_for_compare(job),
        "value": value,
        "overrides": cell.overrides,
    }


def _cell_ref(cell: SweepCell, job: Job) -> dict[str, Any]:
    return {
        "index": cell.index,
        "job_id": job.id,
        "stage": cell.stage,
        "method": cell.method,
        "config": cell.config,
        "seed": cell.seed,
        "status": job.status,
    }


def cell_scores(job: Job) -> dict[str, Any]:
    """A cell's perplexity and downstream scores, as the teacher leaderboard shows them."""
    metrics = job.latest_metrics or {}
    ppl_name = next((n for n in PPL_METRICS if n in metrics), None)
    return {
        "ppl": float(metrics[ppl_name]) if ppl_name else None,
        "ppl_metric": ppl_name,
        "scores": scores_of(metrics),
        "evaluation_error": job.evaluation_error,
    }


def sweep_summary(sweep: Sweep, counts: dict[str, dict[str, int]], status: str) -> dict[str, Any]:
    """The sweep in the ``sweep.finished`` event's ``data``."""
    return {
        "object": "sweep",
        "id": sweep.id,
        "name": sweep.name,
        "status": status,
        "counts": counts,
        "url": f"/v1/sweeps/{sweep.id}",
        "report_url": f"/v1/sweeps/{sweep.id}/report",
    }


# --------------------------------------------------------------------------- the triggers
_PENDING = "sharp_sweeps_to_advance"


def cell_ended(repo: JobRepository, job_id: str) -> None:
    """The job lifecycle's hook: `job_id` has just ended in `repo`'s transaction. If it is a
    sweep's cell (one indexed lookup), advance that sweep once this transaction commits,
    in a session of its own (once per sweep per transaction)."""
    session = repo.session
    sweep_id = SweepRepository(session).sweep_of_job(job_id)
    if sweep_id is None:
        return
    pending: set[str] = session.info.setdefault(_PENDING, set())
    if sweep_id in pending:
        return
    pending.add(sweep_id)
    factory = sessionmaker(bind=session.get_bind(), expire_on_commit=False)
    live, deliver = repo.live, repo.deliver

    def run() -> None:
        pending.discard(sweep_id)
        advance_one(factory, sweep_id, live=live, deliver=deliver)

    after_commit(session, run)


def advance_one(
    factory: sessionmaker[Session],
    sweep_id: str,
    *,
    settings: Settings | None = None,
    live: LivePublisher | None = None,
    dispatch: Dispatch | None = None,
    deliver: DeliveryDispatch | None = None,
) -> bool:
    """`SweepService.advance` in its own transaction. Never raises: a failure is logged and
    the next trigger (a GET, the reaper) advances the sweep."""
    try:
        with factory() as session:
            service = SweepService(session, settings or get_settings(), live, dispatch, deliver)
            changed = service.advance(sweep_id, schedule=dispatch is not None)
            session.commit()
            return changed
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("advancing sweep %s failed; the next trigger will", sweep_id)
        return False


def advance_unfinished(
    factory: sessionmaker[Session],
    settings: Settings,
    *,
    dispatch: Dispatch | None = None,
    deliver: DeliveryDispatch | None = None,
    limit: int = 100,
) -> list[str]:
    """The reaper's pass: advance each unfinished sweep whose cells have all ended (oldest
    first; a running sweep is advanced by its cells' ends). Returns those that changed."""
    with factory() as session:
        ids = list(SweepRepository(session).stalled(TERMINAL_STATUSES, limit))
    return [
        s
        for s in ids
        if advance_one(factory, s, settings=settings, dispatch=dispatch, deliver=deliver)
    ]
