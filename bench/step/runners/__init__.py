"""The step kinds the benchmark times, one runner class per family.

* `trainer`: ce / kd / sharp and their variants (chunked projection, separate logit losses,
  compiled models), all through the trainer's own micro-step;
* `eager`: the ``output_attentions`` baseline;
* `liger`: Liger Kernel's fused linear losses (CUDA, optional).
"""

from __future__ import annotations

from bench.step.models import Workload
from bench.step.runners.base import Runner, StepSkipped
from bench.step.runners.eager import EagerRunner
from bench.step.runners.liger import LigerKDRunner
from bench.step.runners.trainer import VARIANTS, MicroStepRunner

__all__ = [
    "ALL_STEPS",
    "STEP_DESCRIPTIONS",
    "STEP_NAMES",
    "EagerRunner",
    "LigerKDRunner",
    "MicroStepRunner",
    "Runner",
    "StepSkipped",
    "make_runner",
]

#: Every step one may ask for with ``--steps``, in the order they run.
STEP_DESCRIPTIONS = {
    "ce": "student cross-entropy only",
    "kd": "teacher fwd (inference mode) + student fwd/bwd, (1-a)CE + a*forward KL fused",
    "kd_onpolicy": "kd on student generations: KV-cache sampling of min(64, N/2) tokens "
    "after the block's first tokens, loss on the generated tokens (lambda = 1)",
    "kd_cached": "kd with the teacher's top-32 read from a teacher-logit cache: no teacher "
    "fwd; (1-a)CE + a*forward KL with the tail as one bucket",
    "sharp": "kd + SHARP attention terms (default MethodSpec: SDPA capture, SDPA projection)",
    "sharp_cached": "sharp with the logit term from a top-32 cache: the teacher runs without "
    "its LM head, for its attention only",
    "eager": "kd + MSE on head-averaged maps, eager output_attentions",
    "sharp_chunked": "sharp with method.projection='chunked' (float32 reference)",
    "kd_separate": "kd with CE and D as two separate sharp_core.objectives.losses calls (before)",
    "kd_liger": "kd with Liger Kernel's fused linear CE + forward KL (CUDA)",
    "kd_compiled": "kd with torch.compile'd teacher and student",
    "sharp_compiled": "sharp with torch.compile'd teacher and student",
}
#: Steps run when ``--steps`` is not given, in this order.
STEP_NAMES: tuple[str, ...] = ("ce", "kd", "kd_onpolicy", "kd_cached", "sharp", "eager")
#: Steps one may ask for with ``--steps``.
ALL_STEPS: tuple[str, ...] = tuple(STEP_DESCRIPTIONS)


def make_runner(name: str, w: Workload) -> Runner:
    """The runner of step ``name`` on the shared workload (raises `StepSkipped`)."""
    if name in VARIANTS:
        return MicroStepRunner(name, VARIANTS[name], w)
    if name == "eager":
        return EagerRunner(w)
    if name == "kd_liger":
        return LigerKDRunner(w)
    raise ValueError(f"unknown step {name!r}; choose from {', '.join(ALL_STEPS)}")
