"""``--profile``: a torch.profiler breakdown of one step by labelled ranges.

The ranges are the models' forwards, sharp_core's capture / projection / loss functions
(wrapped at run time by `core_api.instrumented`, never edited) and the step's own logit loss
when it substitutes one; each label is prefixed by the phase fwd/bwd/opt at call time, so a
function run again inside backward (the checkpoint's recompute of a chunk) is told apart from
its forward call.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from bench import core_api
from bench.step.runners import MicroStepRunner, Runner
from bench.step.timing import sync


@contextlib.contextmanager
def _instrumented(runner: Runner) -> Iterator[None]:
    """Profiler ranges around sharp_core's functions, the models' forwards and the phases."""
    from torch.autograd.profiler import record_function

    phase = ["fwd"]

    def label_range(label: str) -> Any:
        return record_function(f"{phase[0]}:{label}")

    micro = runner if isinstance(runner, MicroStepRunner) else None
    objective = micro.S.objective if micro is not None else None
    logit_loss = micro.logit_loss if micro is not None else None
    if micro is not None and logit_loss is not None:
        label = micro.logit_loss_label

        @functools.wraps(logit_loss)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with label_range(label):
                return logit_loss(*args, **kwargs)

        micro.logit_loss = labelled

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
        with core_api.instrumented(label_range, objective):
            yield
    finally:
        del runner.forward, runner.backward, runner.optimizer_step
        for h in handles:
            h.remove()
        if micro is not None:
            micro.logit_loss = logit_loss


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
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ":" not in ev.key or ev.key.split(":", 1)[0] not in ("fwd", "bwd", "opt"):
            continue
        us = ev.device_time_total if runner.device.type == "cuda" else ev.cpu_time_total
        out[ev.key] = round(us / 1e3 / steps, 3)
    return dict(sorted(out.items()))
