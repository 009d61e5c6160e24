"""Does SHARP beat the baselines? The comparison table of issue 6: ``python -m bench.quality``.

One teacher, one student architecture, and a grid of *cells* = methods × seeds, every cell
trained by the one trainer (`sharp_core.trainer.train`) for the same number of steps on the
same data, from the same initialisation and batch order for a given seed (the trainer seeds
the student's init and the batch stream from ``training.seed``), so two methods can be
compared *paired by seed*.

    python -m bench.quality --preset tiny-cpu [--out DIR] [--teacher HF_FOLDER]
                            [--methods kd sharp ...] [--seeds 3] [--split val|test]
                            [--sharp-set granularities.layer=0.1 ...] [--set method.kd_weight=0.9]
                            [--variant anneal attention_schedule=linear_decay ...]

Why each choice:

* **Splits are files** written into the run folder: ``train.txt`` (head of the corpus),
  ``val.txt`` (the next slice) and ``test.txt`` (the held-out tail), cut on paragraph
  boundaries. The trainer's own periodic evaluation (the ``eval_fraction`` tail of
  ``train.txt``) gives the eval-loss curves; the *reported* numbers are perplexities of each
  cell's final checkpoint on ``val.txt`` (while tuning) or ``test.txt`` (once, at the end),
  computed by `sharp_core.evaluate.perplexity`. Tuning never sees the test file: the test
  perplexity is only computed when ``--split test`` is asked for.
* **Cells are spec dicts** built from one base spec plus a table of per-method overrides
  (`method_table`), never copies of code: an ablation is exactly one spec flag away from
  ``sharp``. ``sharp`` itself is the spec's *default* SHARP (``MethodSpec()``), so when the
  variant search changes the defaults, this table follows; ``--sharp-set`` overrides the
  SHARP base of one run (for the search), and with it every ablation.
* **The teacher** is trained inside the run (method ``sft``, dropout, early stopping on the
  trainer's eval loss, best checkpoint kept) or is any Hugging Face folder (``--teacher``).
  The students always use the teacher's tokenizer, so every perplexity is per the same token.
* **Sanity check**: a comparison between distillation methods means nothing if the teacher
  is not clearly better than its students (the pilot of issue 6 showed every attention term
  hurting more with an over-fitted teacher). After each cell, the teacher's perplexity on
  the reported split must be below ``sanity_ratio`` (0.9) × that student's; the first cell
  is ``sft`` (the teacher-free student), so a useless teacher is refused after one cell.
  On refusal the run stops, writes the refusal into ``results.json`` / ``results.md`` and
  exits with status 2.
* **Resumable**: a cell whose ``result.json`` exists is skipped (counted in
  ``RunSummary.skipped``); an interrupted cell resumes from its last checkpoint (the
  trainer's own resume; the ``gpu`` preset checkpoints every 500 steps, a ``tiny-cpu`` cell
  of about a minute restarts), and its metrics log (``metrics.jsonl``) is appended to, later
  lines for a step replacing earlier ones.
* **Uncertainty**: a method's perplexity is the mean ± sample std over seeds. Its change
  against the best baseline (lowest mean perplexity among the baselines) is the *paired*
  per-seed difference Δ_s = 100·(ppl_m,s / ppl_b,s − 1), reported as mean, standard error and
  a 95% Student-t interval over seeds: same seed = same init and batches, so the pairing
  removes the seed-to-seed variance both share.
* **Speed** is the median of the trainer's per-step ``tokens_per_s`` over steps without
  diagnostics or evaluation (on a shared machine the median is robust to other jobs), plus
  the cell's wall and process CPU seconds.
* **Interference diagnostics**: ``sharp`` and ``sharp-direct`` set ``interference_every``
  to ~10% of the steps, so the per-term gradient cosines on the student's parameters
  (``cos_logit_sharp_layer`` …) are recorded over training; ``sharp-pcgrad`` computes them at
  every step (PCGrad needs the per-term gradients anyway) and they are kept too.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

BASELINES: tuple[str, ...] = ("sft", "kd", "rkl", "skl", "srkl", "jsd", "tinybert", "minilm")

#: Two-sided 95% Student-t quantiles by degrees of freedom (n − 1 seeds).
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


class SanityCheckError(RuntimeError):
    """The teacher is not clearly better than a student: the comparison is refused."""


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Everything one table depends on except the methods' own settings."""

    name: str
    description: str
    vocab_size: int  # byte-level BPE trained on train.txt by the teacher run (260 ≈ bytes)
    seq_len: int
    teacher_config: dict[str, Any]
    teacher_training: dict[str, Any]  # TrainingSpec fields of the teacher run
    student_config: dict[str, Any]
    training: dict[str, Any]  # TrainingSpec fields of every student cell
    seeds: int = 3
    corpus_chars: int | None = None  # use only the first N characters of the corpus
    split: tuple[float, float] = (0.90, 0.05)  # train, val fractions; test = the rest (tail)
    eval_fraction: float = 0.05  # trainer's eval tail of train.txt (curves only)
    max_eval_blocks: int = 32
    teacher_patience: int = 2  # evals without improvement before the teacher stops
    interference_points: int = 10  # diagnostics ~ this many times per sharp/direct cell
    sanity_ratio: float = 0.9
    other_ranks: tuple[int, ...] | None = None  # default: rank/4 and 2·rank (≤ seq_len)
    methods: tuple[str, ...] | None = None  # default: every method of `method_table`
    hidden: bool = False


def _gpt2(n_layer: int, n_head: int, n_embd: int, n_pos: int, dropout: float = 0.0) -> dict:
    return {
        "model_type": "gpt2",
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "n_positions": n_pos,
        "resid_pdrop": dropout,
        "attn_pdrop": dropout,
        "embd_pdrop": dropout,
    }


PRESETS: dict[str, Preset] = {
    # For tests/test_quality.py only: seconds on a CPU, numbers meaningless.
    "micro": Preset(
        name="micro",
        description="test preset: a few steps on 40k characters",
        hidden=True,
        vocab_size=300,
        seq_len=32,
        corpus_chars=40_000,
        seeds=1,
        teacher_config=_gpt2(2, 2, 32, 32),
        teacher_training={
            "max_steps": 40,
            "batch_size": 8,
            "lr": 5e-3,
            "warmup_steps": 4,
            "eval_every": 20,
        },
        student_config=_gpt2(1, 2, 16, 32),
        training={"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 3},
        methods=("sft", "sharp"),
        max_eval_blocks=8,
        teacher_patience=100,
    ),
    # 2 CPU cores, the whole table (teacher + 17 methods × 3 seeds) in ~30 minutes on an
    # idle machine; sized from measured cells (docs/results.md).
    "tiny-cpu": Preset(
        name="tiny-cpu",
        description="2 CPU cores: teacher GPT-2 4×4×128, student 2×2×64, BPE-512, seq 128",
        vocab_size=512,
        seq_len=128,
        seeds=3,
        teacher_config=_gpt2(4, 4, 128, 128, dropout=0.1),
        teacher_training={
            "max_steps": 1200,
            "batch_size": 16,
            "lr": 2e-3,
            "warmup_steps": 50,
            "eval_every": 100,
        },
        student_config=_gpt2(2, 2, 64, 128),
        training={
            "max_steps": 200,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_steps": 20,
            "eval_every": 25,
        },
    ),
    # The pilot's pair (issue 6), char level: one GPU, documented in docs/results.md.
    "gpu": Preset(
        name="gpu",
        description="1 GPU: teacher GPT-2 6×8×384 (dropout 0.2), student 2×4×192, "
        "byte-level (char) Shakespeare, 1500 steps of 64×256",
        vocab_size=260,
        seq_len=256,
        seeds=3,
        teacher_config=_gpt2(6, 8, 384, 256, dropout=0.2),
        teacher_training={
            "max_steps": 5000,
            "batch_size": 64,
            "lr": 1e-3,
            "warmup_steps": 100,
            "eval_every": 250,
        },
        student_config=_gpt2(2, 4, 192, 256),
        training={
            "max_steps": 1500,
            "batch_size": 64,
            "lr": 2e-3,
            "warmup_steps": 100,
            "eval_every": 100,
            "checkpoint_every": 500,  # an interrupted cell resumes (tiny-cpu cells restart)
        },
        max_eval_blocks=64,
        teacher_patience=3,
    ),
}


# --------------------------------------------------------------------------------------------
# Spec construction: one base spec + a table of method overrides
# --------------------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` merged in, dicts recursively."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """['granularities.layer=0.1', 'rank=16'] → {'granularities': {'layer': 0.1}, 'rank': 16}.

    Values are parsed as JSON when they parse (numbers, true/false, lists), else kept as text.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, last = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def sharp_base(sharp_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SHARP method dict every SHARP cell starts from: the spec's defaults + overrides."""
    from sharp_core.spec import MethodSpec

    d = MethodSpec().model_dump(mode="json")
    # fields every method shares (kd_weight, temperature…) stay in the base spec, so `--set
    # method.kd_weight=…` reaches every cell; only SHARP's own knobs live here
    keep = (
        "granularities",
        "rank",
        "basis",
        "decomposition",
        "normalization",
        "layer_map",
        "attention_weight",
        "attention_schedule",
        "attention_anneal_fraction",
        "conflict",
    )
    base = {"name": "sharp", **{k: d[k] for k in keep}}
    return deep_merge(base, sharp_overrides or {})


def method_table(
    preset: Preset,
    sharp_overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict]:
    """Method name → overrides of the base spec's ``method`` section.

    The SHARP ablations are each one flag away from ``sharp``:

    * ``sharp-no-{layer,head,token}``: that granularity's weight set to 0;
    * ``sharp-direct``: decomposition 'direct' (per-head MSE on the whole projected map),
      weighted by the *sum* of the granularity weights, so that if every component had the
      same relative error e, both objectives would equal (Σ w_g)·e;
    * ``sharp-rank{r}``: two other ranks (rank/4 and 2·rank unless the preset names them);
    * ``sharp-learned``: the learned orthonormal basis; ``sharp-pcgrad``: conflict 'pcgrad'.

    ``variants`` (name → overrides of the SHARP base) add ``var-<name>`` methods: the variant
    search runs them in the same run folder as the baselines, which are then not retrained.
    """
    sharp = sharp_base(sharp_overrides)
    n = int(preset.training["max_steps"])
    diag = {"interference_every": max(1, n // preset.interference_points)}
    table: dict[str, dict] = {b: {"name": b} for b in BASELINES}
    table["sharp"] = {**sharp, **diag}
    for g in ("layer", "head", "token"):
        table[f"sharp-no-{g}"] = deep_merge(sharp, {"granularities": {g: 0.0}})
    w = sharp["granularities"]
    direct_w = sum(float(w[g]) for g in ("layer", "head", "token", "residual"))
    table["sharp-direct"] = {
        **sharp,
        "decomposition": "direct",
        "attention_weight": direct_w,
        **diag,
    }
    rank = int(sharp["rank"])
    ranks = preset.other_ranks or (max(1, rank // 4), min(2 * rank, preset.seq_len))
    for r in ranks:
        if r != rank:
            table[f"sharp-rank{r}"] = {**sharp, "rank": int(r)}
    table["sharp-learned"] = {**sharp, "basis": "learned"}
    table["sharp-pcgrad"] = {**sharp, "conflict": "pcgrad"}
    for vname, over in (variants or {}).items():  # the search: SHARP + overrides, diagnosed
        table[f"var-{vname}"] = {**deep_merge(sharp, over), **diag}
    return table


def base_spec(
    preset: Preset, run_dir: Path, teacher: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The spec every student cell derives from (method and seed filled in per cell);
    `overrides` (``--set``) reach every cell, baselines included."""
    return deep_merge(_base_spec(preset, run_dir, teacher), overrides or {})


def _base_spec(preset: Preset, run_dir: Path, teacher: str) -> dict[str, Any]:
    return {
        "name": f"quality-{preset.name}",
        "teacher": {"model": teacher},
        "student": {"init": "config", "config": dict(preset.student_config)},
        "dataset": {
            "files": [str(run_dir / "train.txt")],
            "eval_fraction": preset.eval_fraction,
            "max_eval_blocks": preset.max_eval_blocks,
        },
        "method": {"name": "kd"},
        "training": {
            "seq_len": preset.seq_len,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "log_every": 1,
            **preset.training,
        },
    }


def cell_spec(base: dict[str, Any], method: dict[str, Any], seed: int) -> dict[str, Any]:
    return deep_merge(
        base,
        {
            "method": method,
            "training": {"seed": seed},
            "name": f"{base['name']}-{method['name']}-s{seed}",
        },
    )


def teacher_spec(preset: Preset, run_dir: Path) -> dict[str, Any]:
    t = {
        "seq_len": preset.seq_len,
        "log_every": 10,
        "seed": 0,
        "checkpoint_every": preset.teacher_training.get("eval_every", 0),
        "keep_checkpoints": 1000,
        **preset.teacher_training,
    }
    return {
        "name": f"quality-{preset.name}-teacher",
        "student": {"init": "config", "config": dict(preset.teacher_config)},
        "tokenizer": {"train": {"vocab_size": preset.vocab_size}},
        "dataset": {
            "files": [str(run_dir / "train.txt")],
            "eval_fraction": preset.eval_fraction,
            "max_eval_blocks": preset.max_eval_blocks,
        },
        "method": {"name": "sft"},
        "training": t,
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def corpus_text() -> tuple[str, str]:
    """(text, source): tiny Shakespeare when ../shared has it, else CPython's docs text."""
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8"), str(CORPUS)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"


def _cut(text: str, pos: int) -> int:
    """The first paragraph boundary at or after `pos` (so no paragraph straddles two splits)."""
    j = text.find("\n\n", pos)
    return len(text) if j < 0 else j + 2


def write_splits(preset: Preset, run_dir: Path) -> dict[str, Any]:
    """train.txt / val.txt / test.txt in `run_dir` (kept if already there: resumable)."""
    names = ("train", "val", "test")
    paths = {n: run_dir / f"{n}.txt" for n in names}
    info_path = run_dir / "splits.json"
    if info_path.is_file() and all(p.is_file() for p in paths.values()):
        return json.loads(info_path.read_text())
    text, source = corpus_text()
    if preset.corpus_chars:
        text = text[: preset.corpus_chars]
    a = _cut(text, int(len(text) * preset.split[0]))
    b = _cut(text, int(len(text) * (preset.split[0] + preset.split[1])))
    parts = {"train": text[:a], "val": text[a:b], "test": text[b:]}
    for n in names:
        if len(parts[n].strip()) == 0:
            raise ValueError(f"the {n} split is empty; corpus too small for preset {preset.name}")
        paths[n].write_text(parts[n], encoding="utf-8")
    info = {
        "source": source,
        "chars": {n: len(parts[n]) for n in names},
        "fractions": [preset.split[0], preset.split[1], 1 - sum(preset.split)],
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------------------------
# Running cells
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _make_callbacks(log_path: Path, patience: int | None = None) -> Any:
    from sharp_core.trainer import TrainCallbacks

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
            from sharp_core.checkpoint import list_checkpoints

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
    from sharp_core.spec import parse_spec

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


def _ppl(model_dir: Path, data: Path, seq_len: int, device: str | None) -> dict[str, float]:
    from sharp_core.evaluate import perplexity

    loss, tokens = perplexity(model_dir, data, seq_len=seq_len, device=device)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}


@dataclass
class RunContext:
    preset: Preset
    run_dir: Path
    split: str
    device: str | None
    log: Any = print


def run_cell(
    ctx: RunContext, name: str, seed: int, spec_dict: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Train (or resume, or skip) one cell; returns (result, skipped)."""
    from sharp_core.spec import parse_spec
    from sharp_core.trainer import train

    cdir = ctx.run_dir / "cells" / name / f"seed{seed}"
    res_path = cdir / "result.json"
    seq = ctx.preset.seq_len
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        if _comparable(res["spec"]) != _comparable(spec_dict):
            raise ValueError(
                f"{res_path} was trained from a different spec than this run would use "
                "(changed preset, --sharp-set or defaults?): use another --out"
            )
        if ctx.split not in res["ppl"]:  # e.g. test asked for after tuning
            res["ppl"][ctx.split] = _ppl(
                cdir / res["checkpoint"], ctx.run_dir / f"{ctx.split}.txt", seq, ctx.device
            )
            _atomic_write(res_path, json.dumps(res, indent=1))
        return res, True
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / "spec.json").write_text(json.dumps(spec_dict, indent=1))
    spec = parse_spec(spec_dict)
    cb = _make_callbacks(cdir / "metrics.jsonl")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        result = train(spec, cdir / "run", callbacks=cb, device=ctx.device)
    finally:
        cb.close()
    train_s, train_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if result.status != "completed" or result.checkpoint is None:
        raise RuntimeError(f"cell {name}/seed{seed} did not complete ({result.status})")
    ckpt = result.checkpoint
    ppl = {"val": _ppl(ckpt, ctx.run_dir / "val.txt", seq, ctx.device)}
    if ctx.split == "test":
        ppl["test"] = _ppl(ckpt, ctx.run_dir / "test.txt", seq, ctx.device)
    res = {
        "method": name,
        "seed": seed,
        "spec": spec_dict,
        "steps": result.step,
        "checkpoint": str(ckpt.relative_to(cdir)),
        "ppl": ppl,
        **summarise_metrics(read_metrics(cdir / "metrics.jsonl"), result.step),
        "final_eval_loss": result.metrics.get("eval_loss"),
        "train_wall_s": train_s,  # this process only: a resumed cell counts its last part
        "train_cpu_s": train_cpu,
        "wall_s": time.perf_counter() - t0,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write(res_path, json.dumps(res, indent=1))
    return res, False


def _best_checkpoint(run: Path, by_step: dict[int, dict[str, float]]) -> tuple[Path, int]:
    from sharp_core.checkpoint import list_checkpoints

    ckpts = dict(list_checkpoints(run))
    evals = {s: m["eval_loss"] for s, m in by_step.items() if "eval_loss" in m and s in ckpts}
    step = min(evals, key=lambda s: (evals[s], s)) if evals else max(ckpts)
    return ckpts[step], step


def prepare_teacher(ctx: RunContext, teacher: str | None) -> dict[str, Any]:
    """Train the run's teacher (or take `teacher`), and its perplexities. Resumable."""
    tdir = ctx.run_dir / "teacher"
    res_path = tdir / "result.json"
    seq = ctx.preset.seq_len
    res: dict[str, Any]
    if res_path.is_file():
        res = json.loads(res_path.read_text())
        if teacher is not None and res.get("source") != str(Path(teacher).resolve()):
            raise ValueError(f"{ctx.run_dir} was run with another teacher: use another --out")
        if ctx.split not in res["ppl"]:
            res["ppl"][ctx.split] = _ppl(
                ctx.run_dir / res["path"], ctx.run_dir / f"{ctx.split}.txt", seq, ctx.device
            )
            _atomic_write(res_path, json.dumps(res, indent=1))
        return res
    tdir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    if teacher is not None:
        path = Path(teacher).resolve()
        res = {"source": str(path), "path": str(path), "trained": False}
    else:
        from sharp_core.spec import parse_spec
        from sharp_core.trainer import train

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
    res["ppl"] = {"val": _ppl(path, ctx.run_dir / "val.txt", seq, ctx.device)}
    if ctx.split == "test":
        res["ppl"]["test"] = _ppl(path, ctx.run_dir / "test.txt", seq, ctx.device)
    res["wall_s"] = time.perf_counter() - t0
    res["cpu_s"] = _cpu_seconds() - c0
    _atomic_write(res_path, json.dumps(res, indent=1))
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


# --------------------------------------------------------------------------------------------
# Statistics and reports
# --------------------------------------------------------------------------------------------


def _t95(df: int) -> float:
    if df <= 0:
        return math.nan
    keys = sorted(_T95)
    for k in reversed(keys):
        if df >= k:
            return _T95[k]
    return _T95[1]


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def summarise(
    cells: dict[str, dict[int, dict[str, Any]]],
    split: str,
    baselines: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """Per-method statistics and the paired comparison with the best baseline (the lowest
    mean perplexity among `baselines`: every non-SHARP method, tuned variants included)."""
    methods: dict[str, dict[str, Any]] = {}
    for name, by_seed in cells.items():
        seeds = sorted(by_seed)
        ppl = [by_seed[s]["ppl"][split]["ppl"] for s in seeds]
        mean, std = _mean_std(ppl)
        speeds = [by_seed[s]["tokens_per_s"] for s in seeds if by_seed[s].get("tokens_per_s")]
        methods[name] = {
            "seeds": seeds,
            "ppl": dict(zip(map(str, seeds), ppl, strict=True)),
            "ppl_mean": mean,
            "ppl_std": std,
            "tokens_per_s": statistics.fmean(speeds) if speeds else None,
            "train_wall_s": statistics.fmean(by_seed[s]["train_wall_s"] for s in seeds),
            "train_cpu_s": statistics.fmean(by_seed[s]["train_cpu_s"] for s in seeds),
        }
    baselines = [m for m in baselines if m in methods]
    best = min(baselines, key=lambda m: methods[m]["ppl_mean"]) if baselines else None
    if best is not None:
        for name, st in methods.items():
            common = [s for s in st["seeds"] if s in methods[best]["seeds"]]
            d = [
                100
                * (cells[name][s]["ppl"][split]["ppl"] / cells[best][s]["ppl"][split]["ppl"] - 1)
                for s in common
            ]
            if not d:
                continue
            dm, ds = _mean_std(d)
            se = ds / math.sqrt(len(d)) if len(d) > 1 else math.nan
            half = _t95(len(d) - 1) * se
            st["delta_pct"] = {
                "mean": dm,
                "std": ds,
                "se": se,
                "ci95": [dm - half, dm + half],
                "n": len(d),
                "per_seed": dict(zip(map(str, common), d, strict=True)),
            }
    return {"best_baseline": best, "methods": methods}


def _fmt(x: float | None, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def cosine_summary(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and last-point cosine per term pair, averaged over seeds, for cells that have them."""
    out: dict[str, dict[str, Any]] = {}
    for name, by_seed in cells.items():
        keys = sorted({k for r in by_seed.values() for k in r.get("cosines", {})})
        if not keys:
            continue
        out[name] = {}
        for k in keys:
            series = [r["cosines"][k] for r in by_seed.values() if k in r.get("cosines", {})]
            means = [statistics.fmean(v for _, v in s) for s in series]
            lasts = [s[-1][1] for s in series]
            out[name][k] = {
                "mean": statistics.fmean(means),
                "last": statistics.fmean(lasts),
                "points": statistics.fmean(len(s) for s in series),
            }
    return out


def render_markdown(report: dict[str, Any]) -> str:
    split = report["split"]
    p = report["preset"]
    t = report["teacher"]
    lines = [
        f"# Quality table: preset `{p['name']}`, {split} split",
        "",
        f"{p['description']}. Corpus: `{report['splits']['source']}` "
        f"({report['splits']['chars']['train']} / {report['splits']['chars']['val']} / "
        f"{report['splits']['chars']['test']} characters train / val / test). "
        f"{p['training']['max_steps']} steps of {p['training']['batch_size']}×{p['seq_len']} "
        f"tokens per cell; seeds {report['seeds']}.",
        "",
        f"Teacher: {'trained in this run' if t.get('trained') else '`' + t['path'] + '`'}"
        + (
            f" (best eval at step {t['best_step']}, stopped at {t['stopped_at']})"
            if t.get("trained")
            else ""
        )
        + f"; {split} perplexity **{t['ppl'][split]['ppl']:.3f}**.",
        "",
    ]
    san = report["sanity"]
    if not san["ok"]:
        lines += [
            f"**REFUSED** — {san['message']}",
            "",
            "No comparison is reported. Perplexities of the cells that ran:",
            "",
        ]
    else:
        lines += [
            f"Sanity check passed: teacher perplexity < {san['ratio']} × every student's "
            f"(best student {san['best_student']}: {_fmt(san['best_student_ppl'], 3)}).",
            "",
        ]
    s = report["summary"]
    best = s["best_baseline"]
    lines += [
        f"| method | {split} ppl (mean ± std) | Δ vs best baseline ({best}) % | 95% CI | "
        "tokens/s | train s (wall / cpu) |",
        "|---|---|---|---|---|---|",
    ]
    for name in report["order"]:
        st = s["methods"].get(name)
        if st is None:
            continue
        d = st.get("delta_pct")
        if san["ok"] and d is not None:
            dtxt = f"{d['mean']:+.2f} ± {_fmt(d['se'])}"
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["n"] > 1 else "–"
        else:
            dtxt, ci = "–", "–"
        mark = " (best baseline)" if name == best else ""
        lines.append(
            f"| {name}{mark} | {st['ppl_mean']:.3f} ± {_fmt(st['ppl_std'], 3)} "
            f"(n={len(st['seeds'])}) | {dtxt} | {ci} | {_fmt(st['tokens_per_s'], 0)} | "
            f"{st['train_wall_s']:.0f} / {st['train_cpu_s']:.0f} |"
        )
    lines += [
        "",
        "Δ: paired by seed, 100·(ppl_method / ppl_best_baseline − 1) per seed, mean ± standard "
        "error; 95% CI from Student's t over seeds. Negative = better than the best baseline. "
        "tokens/s: median of plain training steps (no diagnostics, no eval) on this machine.",
        "",
    ]
    cs = report.get("cosines") or {}
    if cs:
        lines += [
            "Gradient cosines on the student's parameters (mean over training and seeds; "
            "last recorded point):",
            "",
            "| cell | pair | mean | last | points |",
            "|---|---|---|---|---|",
        ]
        for name, pairs in cs.items():
            for k, v in pairs.items():
                lines.append(
                    f"| {name} | {k[4:]} | {v['mean']:+.3f} | {v['last']:+.3f} | "
                    f"{v['points']:.0f} |"
                )
        lines.append("")
    for png in report.get("plots", []):
        lines.append(f"![{png}]({png})")
    lines.append("")
    return "\n".join(lines)


def make_plots(
    report: dict[str, Any], cells: dict[str, dict[int, dict[str, Any]]], run_dir: Path
) -> list[str]:
    """eval_curves.png and cosines.png (small, commit-friendly); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    out = []

    def mean_curve(series: list[list[list[float]]]) -> tuple[list[float], list[float]]:
        by: dict[float, list[float]] = {}
        for s in series:
            for x, y in s:
                by.setdefault(x, []).append(y)
        xs = sorted(by)
        return xs, [statistics.fmean(by[x]) for x in xs]

    # left: every baseline's eval loss; right: every other method's eval loss minus the
    # reference's (kd when present), paired by seed: the SHARP variants differ by a few
    # hundredths of a nat, invisible on an absolute scale.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    palette += [plt.get_cmap("Dark2")(i) for i in range(8)]
    t_curve = report["teacher"].get("eval_curve")
    t_best = report["teacher"].get("best_step")
    ax = axes[0]
    for i, name in enumerate(m for m in report["order"] if m in report["baselines"] and m in cells):
        xs, ys = mean_curve([r["eval_curve"] for r in cells[name].values()])
        ax.plot(xs[1:], ys[1:], label=name, lw=1.2, color=palette[i % len(palette)])
    if t_curve and t_best is not None:
        tl = dict((int(s), v) for s, v in t_curve).get(int(t_best))
        if tl is not None:
            ax.axhline(tl, color="k", ls=":", lw=1, label="teacher")
    ax.set_title("baselines (step 0 left out)", fontsize=9)
    ax.set_ylabel("eval loss (trainer's eval tail, mean over seeds)", fontsize=8)
    ref = "kd" if "kd" in cells else None
    ax = axes[1]
    if ref is not None:
        others = [
            m
            for m in report["order"]
            if m in cells and m != ref and m not in ("sft", "rkl", "skl", "srkl", "jsd", "minilm")
        ]
        for i, name in enumerate(others):
            diffs = []
            for seed, r in cells[name].items():
                if seed in cells[ref]:
                    base = dict((s, v) for s, v in cells[ref][seed]["eval_curve"])
                    diffs.append([[s, v - base[s]] for s, v in r["eval_curve"] if s in base])
            xs, ys = mean_curve(diffs)
            ax.plot(
                xs[1:],
                ys[1:],
                label=name,
                lw=1.2,
                color=palette[i % len(palette)],
                ls="--" if name in report["baselines"] else "-",
            )
        ax.axhline(0, color="k", lw=0.8, label=ref)
        ax.set_title(f"eval loss − {ref}'s, paired by seed (< 0: better than {ref})", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / "eval_curves.png", dpi=80)
    plt.close(fig)
    out.append("eval_curves.png")

    cos_cells = [
        n
        for n in ("sharp", "sharp-direct", "sharp-pcgrad")
        if n in cells and any(r.get("cosines") for r in cells[n].values())
    ]
    if cos_cells:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for name in cos_cells:
            keys = sorted({k for r in cells[name].values() for k in r.get("cosines", {})})
            for k in keys:
                xs, ys = mean_curve(
                    [r["cosines"][k] for r in cells[name].values() if k in r.get("cosines", {})]
                )
                if len(xs) > 30:  # every step (pcgrad): moving average over 10 steps
                    ys = [statistics.fmean(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))]
                logit = k.startswith("cos_logit_")
                if name == "sharp-pcgrad" and not logit:
                    continue
                ax = axes[0] if logit else axes[1]
                label = f"{name}: {k[4:].replace('sharp_', '')}"
                ax.plot(
                    xs,
                    ys,
                    label=label,
                    lw=1.2,
                    marker="o" if len(xs) < 30 else None,
                    ms=3,
                    ls="--" if name == "sharp-direct" else "-",
                    alpha=0.5 if name == "sharp-pcgrad" else 1.0,
                )
        axes[0].set_title("cos(logit term, attention term)", fontsize=9)
        axes[1].set_title("cos between SHARP granularities", fontsize=9)
        for ax in axes:
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0].set_ylabel("gradient cosine on student params")
        fig.tight_layout()
        fig.savefig(run_dir / "cosines.png", dpi=80)
        plt.close(fig)
        out.append("cosines.png")
    return out


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _cell_worker(
    preset: Preset,
    run_dir: Path,
    split: str,
    device: str | None,
    name: str,
    seed: int,
    spec_dict: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    import torch

    torch.set_num_threads(1)
    return run_cell(RunContext(preset, run_dir, split, device), name, seed, spec_dict)


def _run_parallel(
    ctx: RunContext, todo: list[tuple[str, int]], spec_of: Any, record: Any, jobs: int
) -> str | None:
    """Cells in `jobs` worker processes; finished (skipped) cells are read here. On a refusal
    the pending cells are cancelled (the running ones finish and keep their results)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = []
    for name, seed in todo:
        done_file = ctx.run_dir / "cells" / name / f"seed{seed}" / "result.json"
        if done_file.is_file():
            refusal = record(name, seed, *run_cell(ctx, name, seed, spec_of(name, seed)))
            if refusal:
                return refusal
        else:
            pending.append((name, seed))
    if not pending:
        return None
    refusal = None
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = {
            ex.submit(
                _cell_worker,
                ctx.preset,
                ctx.run_dir,
                ctx.split,
                ctx.device,
                name,
                seed,
                spec_of(name, seed),
            ): (name, seed)
            for name, seed in pending
        }
        waiting = set(futures)
        while waiting and refusal is None:
            finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for f in finished:
                name, seed = futures[f]
                refusal = record(name, seed, *f.result()) or refusal
        if refusal is not None:
            for f in waiting:
                f.cancel()
    return refusal


@dataclass
class RunSummary:
    run_dir: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


def run(
    preset: Preset,
    out: Path,
    *,
    teacher: str | None = None,
    methods: Sequence[str] | None = None,
    seeds: int | None = None,
    split: str = "val",
    sharp_overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    base_overrides: dict[str, Any] | None = None,
    device: str | None = None,
    jobs: int = 1,
    log: Any = print,
) -> RunSummary:
    """Build (or complete) the table in `out`. Raises SanityCheckError after writing the
    refusal into results.json / results.md.

    jobs > 1 trains that many cells at once, in worker processes of one torch thread each
    (small models use two cores better as two single-threaded runs than as one two-threaded
    one); the first cell (sft, seed 0) runs alone first, so the sanity check can refuse a
    useless teacher before any distillation cell starts."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = out.resolve()
    if split not in ("val", "test"):
        raise ValueError("split must be 'val' or 'test'")
    out.mkdir(parents=True, exist_ok=True)
    table = method_table(preset, sharp_overrides, variants)
    order = list(methods or preset.methods or [m for m in table if not m.startswith("var-")])
    order += [f"var-{v}" for v in variants or {} if f"var-{v}" not in order]
    # every method that is not SHARP is a baseline (a tuned TinyBERT variant included)
    baselines = [m for m in order if table[m]["name"] != "sharp"]
    unknown = [m for m in order if m not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(table)}")
    if "sft" in order:  # the teacher-free student first: a useless teacher is refused at once
        order.remove("sft")
        order.insert(0, "sft")
    n_seeds = seeds or preset.seeds
    ctx = RunContext(preset, out, split, device, log)
    splits = write_splits(preset, out)
    t = prepare_teacher(ctx, teacher)
    t_ppl = t["ppl"][split]["ppl"]
    log(f"teacher: {split} ppl {t_ppl:.3f} ({t['path']})")
    # an absolute teacher path stays absolute
    base = base_spec(preset, out, str(out / t["path"]), base_overrides)
    summary = RunSummary(out)
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    refusal = None
    best_student: tuple[str, float] | None = None
    # seed-major: a complete first seed early; sft/seed0 first and alone (sanity pre-check)
    todo = [(name, seed) for seed in range(n_seeds) for name in order]

    def record(name: str, seed: int, res: dict[str, Any], skipped: bool) -> str | None:
        nonlocal best_student
        key = f"{name}/seed{seed}"
        (summary.skipped if skipped else summary.trained).append(key)
        cells.setdefault(name, {})[seed] = res
        p = res["ppl"][split]["ppl"]
        log(
            f"{key}: {split} ppl {p:.3f}"
            + (
                " (done before, skipped)"
                if skipped
                else f", {res['train_wall_s']:.0f} s wall, {res['train_cpu_s']:.0f} s cpu, "
                f"{_fmt(res['tokens_per_s'], 0)} tok/s"
            )
        )
        if best_student is None or p < best_student[1]:
            best_student = (key, p)
        return sanity_message(t_ppl, key, p, preset.sanity_ratio, split)

    def spec_of(name: str, seed: int) -> dict[str, Any]:
        return cell_spec(base, table[name], seed)

    if jobs <= 1:
        for name, seed in todo:
            refusal = record(name, seed, *run_cell(ctx, name, seed, spec_of(name, seed)))
            if refusal:
                break
    else:
        refusal = record(*todo[0], *run_cell(ctx, *todo[0], spec_of(*todo[0])))
        if not refusal:
            refusal = _run_parallel(ctx, todo[1:], spec_of, record, jobs)

    report: dict[str, Any] = {
        "preset": {
            "name": preset.name,
            "description": preset.description,
            "seq_len": preset.seq_len,
            "training": preset.training,
            "student_config": preset.student_config,
            "teacher_config": preset.teacher_config if t.get("trained") else None,
        },
        "split": split,
        "splits": splits,
        "seeds": list(range(n_seeds)),
        "order": order,
        "methods": {m: table[m] for m in order},
        "sharp_overrides": sharp_overrides or {},
        "base_overrides": base_overrides or {},
        "variants": variants or {},
        "teacher": t,
        "sanity": {
            "ok": refusal is None,
            "message": refusal,
            "ratio": preset.sanity_ratio,
            "best_student": best_student[0] if best_student else None,
            "best_student_ppl": best_student[1] if best_student else None,
        },
        "machine": machine_info(),
        "baselines": baselines,
        "summary": summarise(cells, split, baselines),
        "cosines": cosine_summary(cells),
        "cells": {f"{m}/seed{s}": r for m, by in cells.items() for s, r in by.items()},
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    report["plots"] = make_plots(report, cells, out)
    _atomic_write(out / "results.json", json.dumps(report, indent=1))
    _atomic_write(out / "results.md", render_markdown(report))
    summary.report = report
    if refusal:
        summary.refused = refusal
        raise SanityCheckError(refusal)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="Does SHARP beat the baselines? methods × seeds on one teacher/student pair.",
    )
    visible = [k for k, v in PRESETS.items() if not v.hidden]
    ap.add_argument(
        "--preset", required=True, choices=list(PRESETS), metavar="NAME", help=f"one of {visible}"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default runs/quality-<preset>); rerunning completes it",
    )
    ap.add_argument(
        "--teacher",
        default=None,
        help="a Hugging Face model folder to use as the teacher instead of training one",
    )
    ap.add_argument(
        "--methods", nargs="+", default=None, help="subset of methods (default: all, see --list)"
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: preset's)")
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="split of the reported perplexities; 'test' only after tuning",
    )
    ap.add_argument(
        "--sharp-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the SHARP base of this run (and so every ablation), e.g. "
        "granularities.layer=0.1; repeatable",
    )
    ap.add_argument(
        "--variant",
        action="append",
        nargs="+",
        default=[],
        metavar="NAME [KEY=VALUE ...]",
        help="an extra method var-NAME = the SHARP base with these overrides (the variant "
        "search; baselines already in --out are reused); repeatable",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the base spec of every cell, e.g. method.kd_weight=0.9 or "
        "training.lr=0.002 (use a new --out); repeatable",
    )
    ap.add_argument("--steps", type=int, default=None, help="override the students' max_steps")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained at once, each in its own single-threaded process",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a machine shared with other "
        "jobs, 1 avoids OpenMP threads spinning against each other",
    )
    ap.add_argument("--list", action="store_true", help="print the method table and exit")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, training={**preset.training, "max_steps": args.steps})
    overrides = parse_assignments(args.sharp_set)
    variants = {}
    for name, *assignments in args.variant:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            ap.error(f"variant name {name!r}: letters, digits, '-', '_', '.' only")
        variants[name] = parse_assignments(assignments)
    if args.list:
        for name, m in method_table(preset, overrides, variants).items():
            print(f"{name:16s} {json.dumps(m)}")
        return 0
    out = args.out or Path("runs") / f"quality-{preset.name}"
    try:
        s = run(
            preset,
            out,
            teacher=args.teacher,
            methods=args.methods,
            seeds=args.seeds,
            split=args.split,
            sharp_overrides=overrides,
            variants=variants,
            base_overrides=parse_assignments(args.set),
            device=args.device,
            jobs=args.jobs,
        )
    except SanityCheckError as e:
        print(f"REFUSED: {e}\n(see {out / 'results.md'})", file=sys.stderr)
        return 2
    print(f"{len(s.trained)} cells trained, {len(s.skipped)} skipped; {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
