"""``--profile``: a torch.profiler breakdown of one step by labelled ranges.

The ranges are the models' forwards, sharp_core's public capture / projection / loss
functions (`PROFILED`, wrapped at run time by `instrumented`, never edited), the attention
objective's forward and the step's logit loss (the function the runner hands the step as
``Setup.logit_loss``); each label is prefixed by the phase fwd/bwd/opt at call time, so a
function run again inside backward (the checkpoint's recompute of a chunk) is told apart from
its forward call. Only public names are wrapped, so a refactor of sharp_core's internals
cannot break the profile; private helpers show up inside the public range that calls them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from bench.step.runners import MicroStepRunner, Runner
from bench.step.runners.trainer import FUSED_LABEL, LINEAR_LABEL
from bench.step.timing import sync
from sharp_core.models.capture import CapturedLayer

#: (module path, attribute, label) of the public sharp_core functions the profile wraps.
#: Wrapped on their module: sharp_core calls them through its module's globals, and bench/
#: through the module (``losses.divergence``), so both calls run inside the range.
PROFILED: tuple[tuple[str, str, str], ...] = (
    ("sharp_core.objectives.sharp", "project_sdpa", "sharp.project_sdpa (P*Q by SDPA)"),
    ("sharp_core.objectives.sharp", "project", "sharp.project (chunked P*Q)"),
    ("sharp_core.objectives.sharp", "sharp_distances", "sharp.sharp_distances"),
    ("sharp_core.objectives.fused", "fused_linear_objective", LINEAR_LABEL),  # the trainer's
    ("sharp_core.objectives.losses", "logit_objective", FUSED_LABEL),  # as called by eager, checks
    ("sharp_core.objectives.losses", "cross_entropy", "losses.cross_entropy"),
    ("sharp_core.objectives.losses", "divergence", "losses.divergence"),
    (
        "sharp_core.cache.teacher_cache",
        "sparse_logit_objective",
        "teacher_cache.sparse_logit_objective (cached KD)",
    ),
)


@contextlib.contextmanager
def instrumented(
    label_range: Callable[[str], contextlib.AbstractContextManager[Any]],
    objective: nn.Module | None = None,
) -> Iterator[None]:
    """Every `PROFILED` function, `CapturedLayer.probs` and ``objective``'s forward run inside
    ``label_range(label)`` while the block runs; all restored on exit, also on error.

    The objective's forward is wrapped on the instance (an attribute shadowing the class
    method for that one module).
    """
    restore: list[tuple[Any, str, Any, bool]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        own = attr in vars(owner)
        orig = getattr(owner, attr)

        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with label_range(label):
                return orig(*args, **kwargs)

        setattr(owner, attr, wrapper)
        restore.append((owner, attr, orig, own))

    try:
        for mod, attr, label in PROFILED:
            wrap(importlib.import_module(mod), attr, label)
        wrap(CapturedLayer, "probs", "CapturedLayer.probs (softmax rows)")
        if objective is not None:
            wrap(objective, "forward", "AttentionObjective.forward")
        yield
    finally:
        for owner, attr, orig, own in reversed(restore):
            if own:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)  # back to the class's method


@contextlib.contextmanager
def _instrumented(runner: Runner) -> Iterator[None]:
    """Profiler ranges around sharp_core's functions, the models' forwards and the phases."""
    from torch.autograd.profiler import record_function

    phase = ["fwd"]

    def label_range(label: str) -> Any:
        return record_function(f"{phase[0]}:{label}")

    micro = runner if isinstance(runner, MicroStepRunner) else None
    objective = micro.S.objective if micro is not None else None
    # The step calls the logit loss it was handed (``Setup.logit_loss``), not the module's
    # attribute, so that function is wrapped where the step finds it.
    logit_loss = micro.S.logit_loss if micro is not None else None
    if micro is not None and logit_loss is not None:
        label = micro.logit_loss_label

        @functools.wraps(logit_loss)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with label_range(label):
                return logit_loss(*args, **kwargs)

        micro.S.logit_loss = labelled

    stack: list[Any] = []
    handles = []
    for who, model in zip(("teacher", "student"), runner.models, strict=True):

        def pre(_m: nn.Module, _a: Any, who: str = who) -> None:
            rf = label_range(f"{who}.forward")
            rf.__enter__()
            stack.append(rf)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            stack.pop().__exit__(None, None, None)

        handles += [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]

    def phased(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            phase[0] = name
            with record_function(f"{name}:total"):
                return fn(*args)

        return run

    runner.forward = phased("fwd", runner.forward)  # type: ignore[method-assign]
    runner.backward = phased("bwd", runner.backward)  # type: ignore[method-assign]
    runner.optimizer_step = phased("opt", runner.optimizer_step)  # type: ignore[method-assign]
    try:
        with instrumented(label_range, objective):
            yield
    finally:
        del runner.forward, runner.backward, runner.optimizer_step
        for h in handles:
            h.remove()
        if micro is not None and logit_loss is not None:
            micro.S.logit_loss = logit_loss


def profile_step(runner: Runner, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step inside each labelled range (inclusive of nested ranges).

    CPU: host time (which is the compute time there). CUDA: device time of the kernels
    launched inside each range.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with _instrumented(runner), profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step()
        sync(runner.device)
    ops_dir = os.environ.get("SHARP_PROFILE_OPS_DIR")
    if ops_dir:  # the kernels themselves, for what the labelled ranges do not say
        key = "device_time_total" if runner.device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
        Path(ops_dir, f"ops-{runner.name}.txt").write_text(table)
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ":" not in ev.key or ev.key.split(":", 1)[0] not in ("fwd", "bwd", "opt"):
            continue
        us = ev.device_time_total if runner.device.type == "cuda" else ev.cpu_time_total
        out[ev.key] = round(us / 1e3 / steps, 3)
    return dict(sorted(out.items()))
