"""Training one cell (or the teacher), resumably, and measuring its perplexities."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import resource
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.quality.grid import teacher_spec
from bench.quality.presets import Preset
from sharp_core.cache.store import LocalCacheStore
from sharp_core.evaluate.perplexity import perplexity
from sharp_core.spec import parse_spec
from sharp_core.train.checkpoint import list_checkpoints
from sharp_core.train.loop import LocalResolver, TrainCallbacks, train


class _Resolver(LocalResolver):
    """The run's cells share one teacher-logit cache store (`teacher-caches/` in the run)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def teacher_cache_store(self) -> LocalCacheStore:
        return LocalCacheStore(self.run_dir / "teacher-caches")


class SanityCheckError(RuntimeError):
    """The teacher is not clearly better than a student: the comparison is refused."""


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _make_callbacks(log_path: Path, patience: int | None = None) -> Any:
    class MetricsLog(TrainCallbacks):
        """Appends every metrics record to a JSONL file (survives an interrupted cell).

        With `patience`, asks the trainer to stop once the eval loss has not improved for
        `patience` evaluations (early stopping of the teacher)."""

        def __init__(self) -> None:
            self.f = log_path.open("a", encoding="utf-8")
            self.best = math.inf
            self.best_step: int | None = None
            self.bad = 0

        def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
            self.f.write(json.dumps({"step": step, **metrics}) + "\n")
            self.f.flush()
            if patience is not None and "eval_loss" in metrics:
                if metrics["eval_loss"] < self.best - 1e-4:
                    self.best, self.best_step, self.bad = metrics["eval_loss"], step, 0
                else:
                    self.bad += 1

        def on_checkpoint(self, step: int, path: Path, manifest: dict[str, Any]) -> None:
            """Early stopping keeps only the best checkpoint so far and the newest one."""
            if patience is None:
                return

            for s, p in list_checkpoints(path.parent):
                if s not in (step, self.best_step):
                    shutil.rmtree(p, ignore_errors=True)

        def should_stop(self) -> bool:
            return patience is not None and self.bad >= patience

        def close(self) -> None:
            self.f.close()

    return MetricsLog()


def read_metrics(log_path: Path) -> dict[int, dict[str, float]]:
    """step → merged metrics; a later record of a key for a step replaces an earlier one."""
    out: dict[int, dict[str, float]] = {}
    if not log_path.is_file():
        return out
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        step = int(rec.pop("step"))
        out.setdefault(step, {}).update(rec)
    return out


def summarise_metrics(by_step: dict[int, dict[str, float]], max_step: int) -> dict[str, Any]:
    """Eval curve, cosines over training, median tokens/s of plain steps."""
    steps = sorted(s for s in by_step if s <= max_step)
    eval_curve = [[s, by_step[s]["eval_loss"]] for s in steps if "eval_loss" in by_step[s]]
    cos: dict[str, list[list[float]]] = {}
    speeds = []
    eval_steps = {s for s, _ in eval_curve}
    for s in steps:
        m = by_step[s]
        cs = {k: v for k, v in m.items() if k.startswith("cos_")}
        for k, v in cs.items():
            cos.setdefault(k, []).append([s, v])
        # a step's timer includes an evaluation done at its start (step − 1 was evaluated)
        if m.get("tokens_per_s") and not cs and (s - 1) not in eval_steps and s > 1:
            speeds.append(m["tokens_per_s"])
    train_curve = [[s, by_step[s]["loss"]] for s in steps if "loss" in by_step[s]]
    stride = max(1, len(train_curve) // 100)
    return {
        "eval_curve": eval_curve,
        "train_loss": train_curve[::stride],
        "cosines": cos,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """A cell's validated spec without the paths the run folder fixes anyway (its train.txt
    and its teacher, checked separately), so a moved run folder still resumes. Comparing
    validated specs means a changed *default* (say the spec's SHARP weights) is caught too."""

    d = parse_spec(spec).model_dump(mode="json")  # defaults filled in: representation-free
    d["dataset"].pop("files", None)
    d["teacher"].pop("model", None)
    return d


def _rel(path: Path, run_dir: Path) -> str:
    """`path` relative to the run folder when inside it (portable), else absolute."""
    p = path.resolve()
    try:
        return str(p.relative_to(run_dir.resolve()))
    except ValueError:
        return str(p)


@dataclass
class RunContext:
    preset: Preset
    run_dir: Path
    split: str
    device: str | None
    log: Any = print

    def ppl(self, model_dir: Path, split: str) -> dict[str, float]:
        """The model's loss, perplexity and token count on ``split``.txt of the run."""
        loss, tokens = perplexity(
            model_dir,
            self.run_dir / f"{split}.txt",
            seq_len=self.preset.seq_len,
            device=self.device,
        )
        return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}

    def perplexities(self, model_dir: Path) -> dict[str, dict[str, float]]:
        """val always; test only when the run reports it (tuning never sees the test file)."""
        splits = ("val", "test") if self.split == "test" else ("val",)
        return {s: self.ppl(model_dir, s) for s in splits}

    def add_split(self, res: dict[str, Any], model_dir: Path, res_path: Path) -> None:
        """A finished result measured on this run's split if it was not (test after tuning)."""
        if self.split not in res["ppl"]:
            res["ppl"][self.split] = self.ppl(model_dir, self.split)
            atomic_write(res_path, json.dumps(res, indent=1))


def run_cell(
    ctx: RunContext, name: str, seed: int, spec_dict: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Train (or resume, or skip) one cell; returns (result, skipped)."""
    cdir = ctx.run_dir / "cells" / name / f"seed{seed}"
    res_path = cdir / "result.json"
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        if _comparable(res["spec"]) != _comparable(spec_dict):
            raise ValueError(
                f"{res_path} was trained from a different spec than this run would use "
                "(changed preset, --sharp-set or defaults?): use another --out"
            )
        ctx.add_split(res, cdir / res["checkpoint"], res_path)
        return res, True
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "spec.json").write_text(json.dumps(spec_dict, indent=1))
    spec = parse_spec(spec_dict)
    cb = _make_callbacks(cdir / "metrics.jsonl")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        result = train(
            spec, cdir / "run", callbacks=cb, device=ctx.device, resolver=_Resolver(ctx.run_dir)
        )
    finally:
        cb.close()
    train_s, train_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if result.status != "completed" or result.checkpoint is None:
        raise RuntimeError(f"cell {name}/seed{seed} did not complete ({result.status})")
    ckpt = result.checkpoint
    res = {
        "method": name,
        "seed": seed,
        "spec": spec_dict,
        "steps": result.step,
        "checkpoint": str(ckpt.relative_to(cdir)),
        "ppl": ctx.perplexities(ckpt),
        **summarise_metrics(read_metrics(cdir / "metrics.jsonl"), result.step),
        "final_eval_loss": result.metrics.get("eval_loss"),
        "train_wall_s": train_s,  # this process only: a resumed cell counts its last part
        "train_cpu_s": train_cpu,
        "wall_s": time.perf_counter() - t0,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(res_path, json.dumps(res, indent=1))
    return res, False


def _best_checkpoint(run: Path, by_step: dict[int, dict[str, float]]) -> tuple[Path, int]:
    ckpts = dict(list_checkpoints(run))
    evals = {s: m["eval_loss"] for s, m in by_step.items() if "eval_loss" in m and s in ckpts}
    step = min(evals, key=lambda s: (evals[s], s)) if evals else max(ckpts)
    return ckpts[step], step


def prepare_teacher(ctx: RunContext, teacher: str | None) -> dict[str, Any]:
    """Train the run's teacher (or take `teacher`), and its perplexities. Resumable."""
    tdir = ctx.run_dir / "teacher"
    res_path = tdir / "result.json"
    res: dict[str, Any]
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        if teacher is not None and res.get("source") != str(Path(teacher).resolve()):
            raise ValueError(f"{ctx.run_dir} was run with another teacher: use another --out")
        ctx.add_split(res, ctx.run_dir / res["path"], res_path)
        return res
    tdir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    if teacher is not None:
        path = Path(teacher).resolve()
        res = {"source": str(path), "path": str(path), "trained": False}
    else:
        spec_dict = teacher_spec(ctx.preset, ctx.run_dir)
        (tdir / "spec.json").write_text(json.dumps(spec_dict, indent=1))
        cb = _make_callbacks(tdir / "metrics.jsonl", patience=ctx.preset.teacher_patience)
        try:
            result = train(parse_spec(spec_dict), tdir / "run", callbacks=cb, device=ctx.device)
        finally:
            cb.close()
        by_step = read_metrics(tdir / "metrics.jsonl")
        path, best = _best_checkpoint(tdir / "run", by_step)
        res = {
            "source": "trained",
            "path": _rel(path, ctx.run_dir),
            "trained": True,
            "spec": spec_dict,
            "stopped_at": result.step,
            "best_step": best,
            "eval_curve": [
                [s, m["eval_loss"]] for s, m in sorted(by_step.items()) if "eval_loss" in m
            ],
        }
    # res["path"]: relative to the run folder when inside it (a moved folder still works)
    res["ppl"] = ctx.perplexities(path)
    res["wall_s"] = time.perf_counter() - t0
    res["cpu_s"] = _cpu_seconds() - c0
    atomic_write(res_path, json.dumps(res, indent=1))
    return res


def sanity_message(
    teacher_ppl: float, cell: str, student_ppl: float, ratio: float, split: str
) -> str | None:
    """None when the teacher is clearly better than this student, else the refusal."""
    if teacher_ppl < ratio * student_ppl:
        return None
    return (
        f"teacher sanity check failed: teacher {split} perplexity {teacher_ppl:.3f} is not "
        f"below {ratio} × that of student {cell} ({student_ppl:.3f} → limit "
        f"{ratio * student_ppl:.3f}). A distillation comparison against a teacher that is not "
        "clearly better than its students means nothing: regularise the teacher (dropout, "
        "early stopping), train it longer, or give a better one with --teacher."
    )
