"""Downstream evaluation as the API shows it: a job's scores beside its teacher's, and the
leaderboard of a teacher's students (docs/evaluation.md).

The training process writes the facts (metrics ``harness/<task>/<metric>``, ``retained/…``,
``gen/…``; events ``teacher``, ``teacher_scores``, ``answers``, ``evaluation_failed``; the job's
``teacher_digest`` and ``evaluation_error`` columns); this module only reads and shapes them.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm import Session

from service.errors import NotFoundError
from service.models import Job, Team
from service.repositories import EventRepository, TeacherScoreRepository

#: Metric name prefixes a leaderboard row carries.
SCORE_PREFIXES = ("harness/", "retained/", "gen/")
#: Perplexities a row shows (the first present): the val set's, else the held-out tail's.
PPL_METRICS = ("val_ppl", "test_ppl", "eval_ppl")


def scores_of(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if k.startswith(SCORE_PREFIXES) and isinstance(v, (int, float)) and math.isfinite(v)
    }


def wants_evaluation(spec: dict[str, Any] | None) -> bool:
    ev = (spec or {}).get("evaluation") or {}
    return bool(ev.get("harness") or ev.get("generation"))


def job_evaluation(session: Session, job: Job) -> dict[str, Any] | None:
    """The job's downstream scores, its teacher's (and whether they were reused), the
    retained ratios, answer quality with sample answers, and the failure if any; None for a
    job that asks for no evaluation and has no teacher digest (no query made)."""
    if not wants_evaluation(job.spec) and job.teacher_digest is None:
        return None
    events = EventRepository(session)
    teacher = events.latest_of_kind(job.id, "teacher_scores")
    answers = events.latest_of_kind(job.id, "answers")
    scores = scores_of(job.latest_metrics or {})
    return {
        "teacher_digest": job.teacher_digest,
        "scores": {k: v for k, v in scores.items() if k.startswith("harness/")},
        "teacher_scores": (teacher.data.get("scores") if teacher else None),
        "teacher_scores_reused": (bool(teacher.data.get("reused")) if teacher else None),
        "retained": {k: v for k, v in scores.items() if k.startswith("retained/")},
        "answer_quality": {k: v for k, v in scores.items() if k.startswith("gen/")},
        "answer_samples": (answers.data.get("samples") if answers else []),
        "error": job.evaluation_error,
    }


def tokens_seen(spec: dict[str, Any] | None, step: int) -> int:
    """Training tokens the student saw: step × batch × grad_accum × seq_len."""
    t = (spec or {}).get("training") or {}
    return (
        int(step)
        * int(t.get("batch_size", 8))
        * int(t.get("grad_accum", 1))
        * int(t.get("seq_len", 512))
    )


def leaderboard(session: Session, team: Team, digest: str, limit: int = 200) -> dict[str, Any]:
    """Every student of this team distilled from the teacher with this digest: method, init,
    parameters, tokens seen, perplexity, each harness score with retained %, answer quality;
    and the teacher's own scores. 404 when the team has no job with that teacher."""
    repo = TeacherScoreRepository(session)
    jobs = repo.students(team.id, digest, limit)
    if not jobs:
        raise NotFoundError(f"no job of this team has teacher '{digest}'", param="digest")
    info = repo.latest_events([j.id for j in jobs], "teacher")
    rows = []
    for j in jobs:
        spec = j.spec or {}
        metrics = j.latest_metrics or {}
        ppl_name = next((n for n in PPL_METRICS if n in metrics), None)
        rows.append(
            {
                "job_id": j.id,
                "name": j.name,
                "status": j.status,
                "method": ((spec.get("method") or {}).get("name")) or "sharp",
                "init": ((spec.get("student") or {}).get("init")) or "pretrained",
                "params": info.get(j.id, {}).get("student_params"),
                "tokens_seen": tokens_seen(spec, j.step),
                "ppl": float(metrics[ppl_name]) if ppl_name else None,
                "ppl_metric": ppl_name,
                "scores": scores_of(metrics),
                "evaluation_error": j.evaluation_error,
                "created_at": j.created_at,
            }
        )
    teacher_params = next((d.get("teacher_params") for d in info.values() if d), None)
    teacher = [
        {
            "key": r.key,
            "scores": r.scores,
            "tasks": (r.meta or {}).get("tasks"),
            "num_fewshot": (r.meta or {}).get("num_fewshot"),
            "limit": (r.meta or {}).get("limit"),
            "computed_by_job_id": r.computed_by_job_id,
            "created_at": r.created_at,
        }
        for r in repo.for_teacher(team.id, digest)
    ]
    return {
        "teacher_digest": digest,
        "teacher_params": teacher_params,
        "teacher_scores": teacher,
        "students": rows,
    }


def teachers(session: Session, team: Team, limit: int = 100) -> list[dict[str, Any]]:
    """The teachers this team distilled from, with their number of students."""
    return [
        {"teacher_digest": d, "students": n}
        for d, n in TeacherScoreRepository(session).teachers(team.id, limit)
    ]
