"""Downstream tasks with lm-evaluation-harness: what a student kept of the teacher's skills.

Why the harness and not our own loop: the anchors (Minitron, Model-Optimizer, torchtune's KD
recipe) report MMLU, HellaSwag, ARC through it; its prompts, normalisations and stderr are the
ones people compare against. We only (1) check and prepare the task list, (2) hand the harness
our model through its Hugging Face wrapper (`HFLM(pretrained=<model>)`) and (3) flatten its
results into metric names ``harness/<task>/<metric>``.

Local task files are ordinary harness task YAMLs whose data are local files
(``dataset_path: json|parquet`` with ``dataset_kwargs.data_files``), so teams evaluate on private
sets and tests run offline. Their data paths are resolved (relative to the YAML) and confined
by the caller (the service: to SHARP_DATASET_FILE_ROOTS); the rewritten copies the harness
reads point at those real paths. ``!function`` tags (Python imported from beside the YAML) and
``include`` are refused: a task file is data, not code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sharp_core.errors import SharpError, SpecError
from sharp_core.spec import HarnessSpec

log = logging.getLogger(__name__)

#: The harness's output types a local task may use.
OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
#: Local data only: the `datasets` builders that read files.
LOCAL_DATASETS = ("json", "parquet", "csv")
#: Metric names are stored in a 64-character column (`service.models.Metric.name`).
MAX_METRIC_NAME = 64
#: Longest local task name: ``harness/<task>/<metric>_stderr`` must fit the column.
MAX_TASK_NAME = 32

#: Resolves data file entries (as written, relative entries already joined to the YAML's
#: folder) to real paths, refusing those outside the allowed roots; raises with `param`.
Confine = Callable[[Sequence[str], str], list[Path]]


class EvaluationError(SharpError):
    """An evaluation could not run (the harness's message); never fails a trained student."""

    code = "evaluation_failed"
    status = 422
    retryable = False


def is_task_file(entry: str) -> bool:
    """A local task file (a path) rather than one of the harness's task names."""
    return entry.endswith((".yaml", ".yml")) or "/" in entry or os.sep in entry


class _FunctionTag:
    pass


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML that parses the harness's ``!function`` tag into a marker we then refuse."""


_TaskLoader.add_constructor("!function", lambda _loader, _node: _FunctionTag())


@dataclass(frozen=True)
class TaskFile:
    """A checked local task: its name, its config with real data paths, and a digest of the
    YAML and its data (the teacher-score key changes when either does)."""

    path: Path
    name: str
    config: dict[str, Any]
    digest: str


def _data_entries(config: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """(where in dataset_kwargs.data_files, entry) of every data file a task names."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    out: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(files, str):
        out.append(((), files))
    elif isinstance(files, list):
        out += [((i,), f) for i, f in enumerate(files) if isinstance(f, str)]
    elif isinstance(files, dict):
        for split, v in files.items():
            if isinstance(v, str):
                out.append(((split,), v))
            elif isinstance(v, list):
                out += [((split, i), f) for i, f in enumerate(v) if isinstance(f, str)]
    return out


def _set_entry(files: Any, where: tuple[Any, ...], value: str) -> Any:
    if not where:
        return value
    files[where[0]] = _set_entry(files[where[0]], where[1:], value)
    return files


def read_task_file(path: str, param: str, confine: Confine | None = None) -> TaskFile:
    """Check a local task file and resolve its data files; SpecError naming `param` (the
    entry of ``evaluation.harness.tasks``) when it is missing, does not parse, is not a
    task, reads no local data, or its data is missing or (with `confine`) outside the roots."""
    p = confine([path], param)[0] if confine is not None else Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"{param}: no task file at '{path}'", param=param)
    raw = p.read_bytes()
    try:
        config = yaml.load(raw, Loader=_TaskLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpecError(f"{param}: task file '{path}' does not parse: {e}", param=param) from None
    if not isinstance(config, dict):
        raise SpecError(f"{param}: task file '{path}' is not a mapping", param=param)

    def fail(msg: str) -> SpecError:
        return SpecError(f"{param}: task file '{path}': {msg}", param=param)

    if any(isinstance(v, _FunctionTag) for v in _walk(config)):
        raise fail("'!function' (Python beside the task) is not run by the service")
    if "include" in config or "group" in config:
        raise fail("'include' and 'group' are not supported in local task files: one task per file")
    name = config.get("task")
    if not isinstance(name, str) or not name or len(name) > MAX_TASK_NAME or "/" in name:
        raise fail(f"'task' must be a name of 1 to {MAX_TASK_NAME} characters without '/'")
    if config.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise fail(f"output_type must be one of {', '.join(OUTPUT_TYPES)}")
    if config.get("dataset_path") not in LOCAL_DATASETS:
        raise fail(
            f"dataset_path must be one of {', '.join(LOCAL_DATASETS)} (local files; a hub data "
            "set is named by the harness's own task names)"
        )
    entries = _data_entries(config)
    if not entries:
        raise fail("dataset_kwargs.data_files names no file")
    joined = [str(Path(e) if Path(e).is_absolute() else (p.parent / e)) for _, e in entries]
    real = confine(joined, param) if confine is not None else [Path(j).resolve() for j in joined]
    h = hashlib.sha256(raw)
    files = config["dataset_kwargs"]["data_files"]
    for (where, _), rp in zip(entries, real, strict=True):
        if not rp.is_file():
            raise fail(f"data file '{rp}' does not exist")
        h.update(_file_sha256(rp).encode())
        files = _set_entry(files, where, str(rp))
    config["dataset_kwargs"]["data_files"] = files
    return TaskFile(path=p, name=name, config=config, digest=h.hexdigest())


def _walk(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [v for item in x.values() for v in [item, *_walk(item)]]
    if isinstance(x, list):
        return [v for item in x for v in [item, *_walk(item)]]
    return []


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def harness_task_names() -> frozenset[str]:
    """Every task and group name the installed harness knows (its YAML index; no network,
    about 10 s the first time in a process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


@dataclass(frozen=True)
class PreparedTasks:
    """What `simple_evaluate` is given: task names and the folder of local task copies."""

    names: list[str]
    include_path: Path | None
    hub: bool  # some task comes from the harness's index (its data from the hub)
    digest: str  # of the task list: names and every local file's content and data


def check_tasks(
    spec: HarnessSpec,
    *,
    param: str = "evaluation.harness.tasks",
    confine: Confine | None = None,
    known: Callable[[], frozenset[str]] | None = harness_task_names,
) -> list[TaskFile | str]:
    """Each entry of `spec.tasks` checked: a local file (`TaskFile`) or a harness task name.
    SpecError naming ``<param>.<i>``. `known` None: names are not checked here (the harness
    reports an unknown one when it runs)."""
    out: list[TaskFile | str] = []
    seen: set[str] = set()
    for i, entry in enumerate(spec.tasks):
        where = f"{param}.{i}"
        if is_task_file(entry):
            tf = read_task_file(entry, where, confine)
            name: str = tf.name
            out.append(tf)
        else:
            if known is not None and entry not in known():
                raise SpecError(
                    f"{where}: '{entry}' is neither a task of lm-evaluation-harness nor a task "
                    "file (a path ending in .yaml)",
                    param=where,
                )
            name = entry
            out.append(entry)
        if name in seen:
            raise SpecError(f"{where}: task '{name}' is listed twice", param=where)
        seen.add(name)
    return out


def prepare_tasks(
    spec: HarnessSpec, workdir: Path, confine: Confine | None = None
) -> PreparedTasks:
    """Check the tasks again (where they are read) and write the local ones, with their real
    data paths, into ``workdir/tasks`` for the harness's `TaskManager(include_path=...)`."""
    checked = check_tasks(spec, confine=confine, known=None)
    include = workdir / "tasks"
    names: list[str] = []
    parts: list[str] = []
    local = False
    for t in checked:
        if isinstance(t, TaskFile):
            include.mkdir(parents=True, exist_ok=True)
            (include / f"{t.name}.yaml").write_text(yaml.safe_dump(t.config), encoding="utf-8")
            names.append(t.name)
            parts.append(f"{t.name}:{t.digest}")
            local = True
        else:
            names.append(t)
            parts.append(t)
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    hub = any(not isinstance(t, TaskFile) for t in checked)
    return PreparedTasks(names, include if local else None, hub, digest)


def score_key(teacher_digest: str, tasks_digest: str, spec: HarnessSpec) -> str:
    """What a teacher's scores are stored under: its weights, the tasks (with their files'
    content), few-shot and limit. Batch size is left out: it does not change the scores."""
    parts = [teacher_digest, tasks_digest, spec.num_fewshot, spec.limit]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The harness's ``results`` as ``harness/<task>/<metric>`` (and ``…_stderr``). The
    filter name is kept after an '@' when it is not the default 'none'
    (``harness/gsm8k/exact_match@strict-match``). Names longer than the metrics column allows
    and non-finite values are left out."""
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, v in values.items():
            if "," not in key or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            suffix = ""
            if metric.endswith("_stderr"):
                metric, suffix = metric[: -len("_stderr")], "_stderr"
            name = f"harness/{task}/{metric}" + ("" if filt == "none" else f"@{filt}") + suffix
            if len(name) <= MAX_METRIC_NAME and math.isfinite(float(v)):
                out[name] = float(v)
    return out


def run_harness(
    model: Any,
    tokenizer: Any,
    spec: HarnessSpec,
    *,
    device: str,
    workdir: Path,
    confine: Confine | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Run the tasks on `model` (a transformers model, already on `device`) with the
    harness's own `HFLM` wrapper and `simple_evaluate`; returns the flattened scores.
    Any failure (a hub task without network, a task the harness rejects) is raised as an
    `EvaluationError` carrying the harness's message."""
    prepared = prepare_tasks(spec, workdir, confine)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        was_training = model.training
        model.eval()
        try:
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=spec.batch_size,
                device=device,
                max_length=_max_length(model),
            )
            tm = TaskManager(
                include_path=str(prepared.include_path) if prepared.include_path else None,
                include_defaults=prepared.hub,
            )
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=prepared.names,
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=tm,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)
    except SharpError:
        raise
    except Exception as e:  # noqa: BLE001 - the harness's own message, kept whole
        raise EvaluationError(
            f"lm-evaluation-harness failed: {type(e).__name__}: {e}"[:2000],
            param="spec.evaluation.harness",
        ) from e
    if not out or not out.get("results"):
        raise EvaluationError("lm-evaluation-harness returned no results")
    return flatten_results(out["results"])


def _max_length(model: Any) -> int | None:
    """The model's context (GPT-2 names it n_positions; the harness would assume 2048)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def retained(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """``retained/<task>/<metric>`` = student / teacher for every harness score both have
    (stderr left out; a teacher score of 0 has no ratio)."""
    out: dict[str, float] = {}
    for name, v in student.items():
        if not name.startswith("harness/") or name.endswith("_stderr"):
            continue
        t = teacher.get(name)
        if t:
            out["retained/" + name[len("harness/") :]] = v / t
    return out
