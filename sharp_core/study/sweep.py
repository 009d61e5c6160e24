"""A sweep: one base spec, axes and per-method tuning, expanded into cells (docs/sweeps.md).

The service (`service.sweeps`) and the benchmark (`bench.quality`) both expand sweeps here and
compare their results with `sharp_core.study.compare`, so the numbers in docs/results.md come from
the code users run. Everything is plain data: a cell is a spec dict plus where it came from.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sharp_core.errors import SharpError, SpecError
from sharp_core.spec import JobSpec, parse_spec

__all__ = [
    "Cell",
    "FinalSpec",
    "ParamRange",
    "SweepSpec",
    "TuneSpec",
    "check_cells",
    "check_path",
    "config_key",
    "count_cells",
    "expand",
    "final_cells",
    "parse_sweep",
    "set_path",
]

SEED_PATH = "training.seed"
METHOD_PATH = "method.name"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamRange(_Strict):
    """A continuous knob for random search: uniform, or log-uniform with ``log``."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _order(self) -> ParamRange:
        if not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


Knob = ParamRange | Annotated[list[Any], Field(min_length=1, max_length=100)]


class TuneSpec(_Strict):
    """The same number of trials for every method, each over that method's own knobs."""

    trials: int = Field(default=8, ge=1, le=500, description="Configurations per method.")
    search: Literal["random", "grid"] = Field(
        default="random",
        description="random: seeded draws (lists: a choice, ranges: uniform/log-uniform); "
        "grid: every combination of the lists (its size must not exceed `trials`).",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the random search.")
    space: dict[str, dict[str, Knob]] = Field(
        min_length=1,
        max_length=64,
        description="method name → {spec path → list of values or {low, high, log}}; "
        "{} tunes nothing (one configuration).",
    )


class FinalSpec(_Strict):
    """Re-train each method's configuration chosen on val on fresh seeds; report test once."""

    seeds: list[int] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _unique(self) -> FinalSpec:
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError("seeds must be distinct non-negative integers")
        return self


#: What a sweep may select on (docs/sweeps.md, "Selecting on a task score").
SELECTION_PATTERN = (
    r"^((harness|retained)/[A-Za-z0-9_.@-]+/[A-Za-z0-9_.@-]+"
    r"|gen/(rougeL|exact_match)"
    r"|(eval|val|test)_(ppl|loss|accuracy|f1))$"
)


class SweepSpec(_Strict):
    """``POST /v1/sweeps``: the base job spec, the grid axes, tuning and the final stage."""

    version: Literal[1] = 1
    name: str = Field(default="sweep", min_length=1, max_length=200)
    base: dict[str, Any] = Field(description="A job spec that every cell starts from.")
    axes: dict[str, Annotated[list[Any], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict,
        max_length=32,
        description="spec path → values; the cells are every combination "
        "(e.g. {'training.seed': [0, 1, 2]}).",
    )
    tune: TuneSpec | None = None
    reference: str | None = Field(
        default=None,
        max_length=64,
        description="Method that the others are compared with (paired by seed); default kd "
        "when present, else the first method.",
    )
    final: FinalSpec | None = None
    selection_metric: str | None = Field(
        default=None,
        pattern=SELECTION_PATTERN,
        description="The metric both stages compare on instead of val_ppl / test_ppl: a "
        "harness score ('harness/arc_easy/acc', needs base evaluation.harness), answer quality "
        "('gen/rougeL', needs evaluation.generation) or a perplexity / loss / accuracy.",
    )


@dataclass
class Cell:
    """One job of a sweep: its configuration (everything but the seed), seed and spec."""

    stage: Literal["tune", "final"]
    method: str
    config: str  # config_key(overrides)
    seed: int
    overrides: dict[str, Any]  # spec path → value, without the seed
    spec: dict[str, Any] = field(repr=False)


def _unwrap(tp: Any) -> list[Any]:
    """The model classes an annotation may hold (Optional/Union/Annotated unwrapped)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _unwrap(a)]
    return [tp]


def check_path(path: str, *, param: str) -> None:
    """Refuse a dotted spec path that names no field of JobSpec (the 422 names `param`)."""
    model: Any = JobSpec
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i]) or "the spec"
            raise SpecError(
                f"{param}: '{path}' is not a field of the job spec ('{part}' is not in {where})",
                param=param,
            )
        if i == len(parts) - 1:
            return
        nested = [
            t
            for t in _unwrap(fields[part].annotation)
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if not nested:
            raise SpecError(f"{param}: '{path}': '{part}' has no sub-fields", param=param)
        model = nested[0]


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    node = spec
    *head, last = path.split(".")
    for p in head:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[last] = copy.deepcopy(value)


def get_path(spec: dict[str, Any], path: str, default: Any = None) -> Any:
    node: Any = spec
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def config_key(method: str, overrides: dict[str, Any]) -> str:
    """A short stable name of a configuration: the method and a hash of its overrides."""
    body = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
    return f"{method}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"


def _draw(rng: random.Random, knob: Any) -> Any:
    if isinstance(knob, ParamRange):
        if knob.log:
            x = math.exp(rng.uniform(math.log(knob.low), math.log(knob.high)))
        else:
            x = rng.uniform(knob.low, knob.high)
        return round(x) if knob.integer else float(f"{x:.4g}")
    return copy.deepcopy(rng.choice(knob))


def _grid_size(knobs: dict[str, Any]) -> int:
    return math.prod(len(v) for v in knobs.values())


def _n_trials(tune: TuneSpec, knobs: dict[str, Any]) -> int:
    """How many configurations `_trials` returns, without building them (a grid of lists of
    100 values over many paths is astronomically large: it is counted, never enumerated)."""
    if not knobs:
        return 1
    if tune.search == "grid":
        return _grid_size(knobs)
    if all(not isinstance(v, ParamRange) for v in knobs.values()):
        return min(_grid_size(knobs), tune.trials)
    return tune.trials


def _combo(paths: list[str], knobs: dict[str, Any], index: int) -> dict[str, Any]:
    """The `index`-th combination of the lists in `itertools.product` order."""
    out: dict[str, Any] = {}
    for p in reversed(paths):
        index, i = divmod(index, len(knobs[p]))
        out[p] = copy.deepcopy(knobs[p][i])
    return {p: out[p] for p in paths}


def _trials(tune: TuneSpec, method: str, knobs: dict[str, Any]) -> list[dict[str, Any]]:
    """The `tune.trials` configurations of one method (fewer only for a smaller grid)."""
    paths = sorted(knobs)
    if not paths:
        return [{}]
    discrete = all(not isinstance(knobs[p], ParamRange) for p in paths)
    if tune.search == "grid" or discrete:
        size = _grid_size(knobs)
        if tune.search == "grid" or size <= tune.trials:
            return [_combo(paths, knobs, i) for i in range(size)]
        # random search over a finite space: distinct draws (no configuration twice); the
        # same indices `sample(grid, k)` would pick, without building the grid
        picks = random.Random(f"{tune.seed}:{method}").sample(range(size), tune.trials)
        return [_combo(paths, knobs, i) for i in picks]
    rng = random.Random(f"{tune.seed}:{method}")
    return [{p: _draw(rng, knobs[p]) for p in paths} for _ in range(tune.trials)]


def count_cells(sweep: SweepSpec) -> tuple[int, int]:
    """(tune cells, final cells) of a parsed sweep, counted without expanding it, so a limit
    can refuse a huge sweep before anything is built."""
    n_axes = math.prod(len(v) for p, v in sweep.axes.items() if p != SEED_PATH)
    n_seeds = len(_seeds(sweep))
    if sweep.tune is None:
        methods = sweep.axes.get(METHOD_PATH, [get_path(sweep.base, METHOD_PATH, "sharp")])
        n_configs, n_methods = n_axes, len({str(m) for m in methods})
    else:
        n_configs = n_axes * sum(_n_trials(sweep.tune, k) for k in sweep.tune.space.values())
        n_methods = len(sweep.tune.space)
    n_final = n_methods * len(sweep.final.seeds) if sweep.final is not None else 0
    return n_configs * n_seeds, n_final


def parse_sweep(data: Any) -> SweepSpec:
    """Validate a sweep request; a SpecError names the offending field (``sweep.axes``)."""
    if not isinstance(data, dict):
        raise SpecError("the sweep must be a mapping", param="sweep")
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper())]
        loc = [
            p
            for p in loc
            if p not in ("list[any]", "ParamRange", "function-after[_order(), ParamRange]")
        ]
        param = ".".join(["sweep", *loc])
        msg = (
            f"unknown field '{err['loc'][-1]}'" if err["type"] == "extra_forbidden" else err["msg"]
        )
        raise SpecError(f"{param}: {msg}", param=param) from None
    for path in sweep.axes:
        check_path(path, param=f"sweep.axes.{path}")
    if sweep.tune is not None:
        if METHOD_PATH in sweep.axes:
            raise SpecError(
                f"sweep.axes.{METHOD_PATH}: give the methods as the keys of tune.space, not "
                "as an axis too",
                param=f"sweep.axes.{METHOD_PATH}",
            )
        for method, knobs in sweep.tune.space.items():
            for path, knob in knobs.items():
                param = f"sweep.tune.space.{method}.{path}"
                check_path(path, param=param)
                if path in (METHOD_PATH, SEED_PATH) or path in sweep.axes:
                    raise SpecError(
                        f"{param}: '{path}' is set by the sweep itself (method / seed / axis)",
                        param=param,
                    )
                if sweep.tune.search == "grid" and isinstance(knob, ParamRange):
                    raise SpecError(f"{param}: a grid search needs a list of values", param=param)
            n = _n_trials(sweep.tune, knobs)
            if sweep.tune.search == "grid" and n > sweep.tune.trials:
                raise SpecError(
                    f"sweep.tune.space.{method}: its grid has {n} combinations, more than "
                    f"tune.trials ({sweep.tune.trials}): every method gets the same budget",
                    param=f"sweep.tune.space.{method}",
                )
    _check_selection(sweep)
    if sweep.final is not None and SEED_PATH in sweep.axes:
        overlap = set(sweep.final.seeds) & set(sweep.axes[SEED_PATH])
        if overlap:
            raise SpecError(
                f"sweep.final.seeds: {sorted(overlap)} also tune; the final seeds must be fresh",
                param="sweep.final.seeds",
            )
    return sweep


def _check_selection(sweep: SweepSpec) -> None:
    """A task score to select on must be one the base spec computes (the field is named)."""
    name = sweep.selection_metric
    if name is None:
        return
    param = "sweep.selection_metric"
    ev = get_path(sweep.base, "evaluation", None) or {}
    if name.startswith(("harness/", "retained/")):
        tasks = (ev.get("harness") or {}).get("tasks") or []
        if not tasks:
            raise SpecError(f"{param}: '{name}' needs base evaluation.harness", param=param)
        task = name.split("/")[1]
        files = [
            t for t in tasks if isinstance(t, str) and (t.endswith((".yaml", ".yml")) or "/" in t)
        ]
        if task not in tasks and not files:
            raise SpecError(
                f"{param}: task '{task}' is not in base evaluation.harness.tasks", param=param
            )
    if name.startswith("gen/") and not ev.get("generation"):
        raise SpecError(f"{param}: '{name}' needs base evaluation.generation", param=param)


def _seeds(sweep: SweepSpec) -> list[int]:
    return list(sweep.axes.get(SEED_PATH, [get_path(sweep.base, SEED_PATH, 0)]))


def _cell(
    sweep: SweepSpec, stage: Literal["tune", "final"], overrides: dict[str, Any], seed: int
) -> Cell:
    spec = copy.deepcopy(sweep.base)
    for path, value in overrides.items():
        set_path(spec, path, value)
    set_path(spec, SEED_PATH, seed)
    if stage == "tune":  # selection never sees the test set
        ev = get_path(spec, "dataset.eval")
        if isinstance(ev, dict):
            ev.pop("test", None)
    method = str(get_path(spec, METHOD_PATH, "sharp"))
    return Cell(stage, method, config_key(method, overrides), seed, overrides, spec)


def expand(sweep: SweepSpec) -> list[Cell]:
    """The tuning cells: (tune trials per method, or one) × every combination of the axes.

    The seed axis is crossed last, so the cells of one configuration are adjacent."""
    axes = {p: v for p, v in sweep.axes.items() if p != SEED_PATH}
    paths = sorted(axes)
    grid = [dict(zip(paths, c, strict=True)) for c in itertools.product(*(axes[p] for p in paths))]
    configs: list[dict[str, Any]] = []
    if sweep.tune is None:
        configs = grid
    else:
        for method, knobs in sweep.tune.space.items():
            for trial in _trials(sweep.tune, method, knobs):
                for g in grid:
                    configs.append({METHOD_PATH: method, **trial, **g})
    return [_cell(sweep, "tune", o, s) for o in configs for s in _seeds(sweep)]


def final_cells(sweep: SweepSpec, chosen: dict[str, dict[str, Any]]) -> list[Cell]:
    """Each method's chosen configuration (method → overrides) on the fresh seeds."""
    assert sweep.final is not None
    return [_cell(sweep, "final", o, s) for o in chosen.values() for s in sweep.final.seeds]


def check_cells(
    cells: list[Cell], check: Callable[[dict[str, Any]], Any] = parse_spec, *, limit: int = 5
) -> tuple[list[Any], int, list[dict[str, Any]]]:
    """Run `check` (a submission's validation) on every cell: (what it returned for each
    cell, None for an invalid one; how many are invalid; the first `limit` errors, naming
    the cell and the field). Errors other than a 422 propagate."""
    results: list[Any] = []
    bad: list[dict[str, Any]] = []
    count = 0
    for i, c in enumerate(cells):
        try:
            results.append(check(c.spec))
        except SharpError as e:
            if e.status != 422:
                raise
            results.append(None)
            count += 1
            if len(bad) < limit:
                bad.append(
                    {
                        "cell": i,
                        "stage": c.stage,
                        "method": c.method,
                        "config": c.config,
                        "seed": c.seed,
                        "overrides": c.overrides,
                        "param": e.param,
                        "code": e.code,
                        "message": e.message,
                    }
                )
    return results, count, bad


def validate_cells(cells: list[Cell], *, limit: int = 5) -> tuple[int, list[dict[str, Any]]]:
    """(how many cells have an invalid spec, the first `limit` errors): `check_cells` with
    the spec's own validation, what a client can check before it sends a sweep."""
    _, count, bad = check_cells(cells, limit=limit)
    return count, bad
