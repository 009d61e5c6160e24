"""The job's downstream evaluation: harness tasks and answer quality on the student, the
teacher's scores once per key, and the retained ratio (docs/evaluation.md).

Why here, beside the loop: the scores must reach the last checkpoint's manifest (they are
computed before it is saved) and the job's metrics, and the teacher is already loaded. Why a
failure is only an event: a trained student is worth keeping even when a task file is wrong
or a hub task has no network; the job succeeds and records ``evaluation_failed``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from sharp_core.errors import SharpError
from sharp_core.evaluate.generation import answer_quality
from sharp_core.evaluate.harness import prepare_tasks, retained, run_harness, score_key

log = logging.getLogger(__name__)


class ScoreStore(Protocol):
    """Where a team's teacher scores are kept (the service: a database table)."""

    def get(self, key: str) -> dict[str, float] | None: ...

    def put(self, key: str, teacher_digest: str, scores: dict[str, float], meta: dict) -> None: ...


class LocalScoreStore:
    """One JSON file per key in a folder (the library's default, beside the run folders)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, key: str) -> dict[str, float] | None:
        p = self.root / f"{key}.json"
        if not p.is_file():
            return None
        return {k: float(v) for k, v in json.loads(p.read_text())["scores"].items()}

    def put(self, key: str, teacher_digest: str, scores: dict[str, float], meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"teacher_digest": teacher_digest, "scores": scores, **meta}))
        os.replace(tmp, self.root / f"{key}.json")


def score_store(resolver: Any, out_dir: Path) -> ScoreStore:
    """The resolver's store (the service: the team's table), else a ``teacher-scores``
    folder beside the run's folder (runs side by side share it)."""
    get = getattr(resolver, "teacher_score_store", None)
    store = get() if get is not None else None
    return store or LocalScoreStore(Path(out_dir).parent / "teacher-scores")


def confiner(resolver: Any) -> Callable[[Sequence[str], str], list[Path]] | None:
    """The resolver's path check (the service: SHARP_DATASET_FILE_ROOTS), if it has one."""
    return getattr(resolver, "confine_files", None)


class Downstream:
    """Runs `spec.evaluation` on the student at the end (and every `harness.every` eval
    points), reporting metrics, events and, on failure, ``evaluation_failed``."""

    def __init__(
        self,
        spec: Any,
        *,
        student: Any,
        teacher: Any | None,
        tokenizer: Any,
        device: Any,
        teacher_digest: str | None,
        store: ScoreStore,
        on_event: Callable[[str, dict[str, Any]], None],
        confine: Callable[[Sequence[str], str], list[Path]] | None = None,
    ):
        self.ev = spec.evaluation
        training = getattr(spec, "training", None)  # an evaluation job has a plain seed
        self.seed = training.seed if training is not None else spec.seed
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.device = str(device)
        self.teacher_digest = teacher_digest
        self.store, self.on_event, self.confine = store, on_event, confine
        self.teacher_scores: dict[str, float] | None = None
        self.evals = 0
        # a chat prompt set is rendered with the job's chat template when it gives one
        self.chat_template = getattr(getattr(spec, "dataset", None), "chat_template", None)

    @property
    def enabled(self) -> bool:
        return self.ev.harness is not None or self.ev.generation is not None

    def due(self, final: bool) -> bool:
        """At the end always; every `harness.every`-th evaluation point otherwise."""
        self.evals += 0 if final else 1
        h = self.ev.harness
        return self.enabled and (
            final or (h is not None and h.every > 0 and self.evals % h.every == 0)
        )

    def run(self, step: int, *, final: bool) -> dict[str, float]:
        """The scores at `step` as metrics; {} and an ``evaluation_failed`` event when any
        part fails (the training result is never touched)."""
        try:
            with tempfile.TemporaryDirectory(prefix="sharp-eval-") as tmp:
                return self._run(step, Path(tmp), final=final)
        except Exception as e:  # noqa: BLE001 - reported, never raised into the loop
            log.exception("evaluation failed at step %d", step)
            err = (
                e.to_dict()
                if isinstance(e, SharpError)
                else {"code": "evaluation_failed", "message": f"{type(e).__name__}: {e}"[:2000]}
            )
            self.on_event("evaluation_failed", {"step": step, **err})
            return {}

    def _run(self, step: int, workdir: Path, *, final: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        h = self.ev.harness
        if h is not None:
            scores = run_harness(
                self.student,
                self.tokenizer,
                h,
                device=self.device,
                workdir=workdir / "student",
                confine=self.confine,
                seed=self.seed,
            )
            metrics.update(scores)
            teacher = self._teacher(workdir / "teacher")
            if teacher:
                metrics.update(retained(scores, teacher))
        g = self.ev.generation
        if g is not None and final:
            res = answer_quality(
                self.student,
                self.tokenizer,
                g,
                device=self.device,
                resolve=self._resolve_one if self.confine is not None else None,
                seed=self.seed,
                chat_template=self.chat_template,
            )
            metrics.update(res.metrics)
            self.on_event("answers", {"step": step, "metrics": res.metrics, "samples": res.samples})
        return metrics

    def _resolve_one(self, path: str, param: str) -> Path:
        assert self.confine is not None
        return self.confine([path], param)[0]

    def _teacher(self, workdir: Path) -> dict[str, float] | None:
        """The teacher's scores: computed once per key (teacher weights, tasks with their
        files' content, few-shot, limit) and stored; later jobs read them."""
        if self.teacher_scores is not None:
            return self.teacher_scores
        h = self.ev.harness
        if h is None or self.teacher_digest is None:
            return None
        tasks = prepare_tasks(h, workdir, self.confine)
        key = score_key(self.teacher_digest, tasks.digest, h)
        found = self.store.get(key)
        if found is not None:
            self.teacher_scores = found
            self.on_event(
                "teacher_scores",
                {
                    "key": key,
                    "teacher_digest": self.teacher_digest,
                    "reused": True,
                    "scores": found,
                },
            )
            return found
        if self.teacher is None:
            self.on_event(
                "teacher_scores",
                {
                    "key": key,
                    "teacher_digest": self.teacher_digest,
                    "reused": False,
                    "note": "the teacher is not loaded in this job (teacher cache): no scores",
                },
            )
            return None
        scores = run_harness(
            self.teacher,
            self.tokenizer,
            h,
            device=self.device,
            workdir=workdir,
            confine=self.confine,
            seed=self.seed,
        )
        meta = {"tasks": list(h.tasks), "num_fewshot": h.num_fewshot, "limit": h.limit}
        self.store.put(key, self.teacher_digest, scores, meta)
        self.teacher_scores = scores
        self.on_event(
            "teacher_scores",
            {"key": key, "teacher_digest": self.teacher_digest, "reused": False, "scores": scores},
        )
        return scores


def evaluate_model(
    spec: Any,
    *,
    callbacks: Any,
    resolver: Any,
    out_dir: Path,
    device: str | None = None,
) -> dict[str, float]:
    """An evaluation job (`sharp_core.spec.EvaluationJobSpec`): load the model (and its
    teacher, when given), run `spec.evaluation` once and report it at step 1. Unlike the end
    of a training job, a failure here is the job's failure (there is no student to keep)."""
    import torch

    from sharp_core.cache.teacher_cache import teacher_digest
    from sharp_core.models.loading import _load_tokenizer, load_model, model_source

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = model_source(spec.model, resolver, "spec.model.model")
    tok_src = spec.tokenizer or src
    if tok_src is None:
        raise SharpError(
            "no tokenizer: give `tokenizer`", param="spec.tokenizer", code="invalid_spec"
        )
    tokenizer = _load_tokenizer(
        tok_src, "spec.tokenizer" if spec.tokenizer else "spec.model.model", None
    )
    model = load_model(spec.model, role="model", resolver=resolver, device=dev, tokenizer=tokenizer)
    model.eval()
    teacher = None
    digest = None
    if spec.teacher is not None:
        teacher = load_model(
            spec.teacher, role="teacher", resolver=resolver, device=dev, tokenizer=tokenizer
        )
        teacher.eval()
        digest = teacher_digest(teacher)
        callbacks.on_teacher(
            {
                "digest": digest,
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "student_params": sum(p.numel() for p in model.parameters()),
            },
        )
    if callbacks.should_stop():
        return {}
    runner = Downstream(
        spec,
        student=model,
        teacher=teacher,
        tokenizer=tokenizer,
        device=dev,
        teacher_digest=digest,
        store=score_store(resolver, out_dir),
        on_event=callbacks.on_event,
        confine=confiner(resolver),
    )
    with tempfile.TemporaryDirectory(prefix="sharp-eval-") as tmp:
        metrics = runner._run(1, Path(tmp), final=True)
    metrics["model_params"] = float(sum(p.numel() for p in model.parameters()))
    callbacks.on_metrics(1, metrics)
    return metrics
