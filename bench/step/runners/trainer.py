"""ce / kd / sharp and their variants: the trainer's own micro-step on a hand-built Setup.

Why the trainer's step and not a re-implementation of the losses: the benchmark must time the
code that trains, not a look-alike. A variant changes only what a spec setting
(``projection``), the models' compilation or one substituted logit loss changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench import core_api
from bench.step.models import Workload, job_spec, maybe_compile
from bench.step.runners.base import Runner
from sharp_core.capture import ATTN_IMPLEMENTATION


def separate_logit_objective(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kd_weight: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int | Tensor,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`losses.logit_objective`'s contract from two separate calls, as the trainer did before.

    `losses.cross_entropy` then `losses.divergence`: each gathers the valid rows, builds a
    float32 graph per chunk and differentiates it, so the student's log-softmax is computed
    twice. Returns (loss, ce, d) with ce and d detached, like the fused function.
    """
    ce = core_api.cross_entropy(student_logits, labels, num_valid=num_valid, chunk_size=chunk_size)
    d = core_api.divergence(
        name,
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        num_valid=num_valid,
        chunk_size=chunk_size,
    )
    return (1 - kd_weight) * ce + kd_weight * d, ce.detach(), d.detach()


@dataclass(frozen=True)
class Variant:
    """One trainer step kind: the method, and what it changes against the default step."""

    method: str  # MethodSpec.name
    projection: str = "sdpa"  # MethodSpec.projection
    compiled: bool = False  # torch.compile teacher and student, as training.compile does
    logit_loss: core_api.LogitLoss | None = None  # instead of the fused logit_objective
    logit_loss_label: str = ""  # its profiler range


VARIANTS: dict[str, Variant] = {
    "ce": Variant("sft"),
    "kd": Variant("kd"),
    "sharp": Variant("sharp"),
    "sharp_chunked": Variant("sharp", projection="chunked"),
    "kd_separate": Variant(
        "kd",
        logit_loss=separate_logit_objective,
        logit_loss_label="bench.separate_logit_objective (CE, then D)",
    ),
    "kd_compiled": Variant("kd", compiled=True),
    "sharp_compiled": Variant("sharp", compiled=True),
}


class MicroStepRunner(Runner):
    """The trainer's own micro-step on a `Setup` built from a real JobSpec.

    ``variant.projection`` goes into the `MethodSpec` exactly as a job would set it;
    ``variant.logit_loss`` replaces the fused logit loss inside the step.
    """

    def __init__(self, name: str, variant: Variant, w: Workload) -> None:
        super().__init__(name, w)
        compile_ = w.compile_ or variant.compiled
        spec = job_spec(w.preset, variant.method, compile_, variant.projection)
        objective = s_cap = t_cap = None
        if spec.method.uses_attention:
            # the captures switch both models to the "sharp_capture" attention (SDPA + record)
            objective, s_cap, t_cap = core_api.attention_objective(
                spec.method, w.student, w.teacher, w.preset.seq_len, w.device
            )
            self.impl = ATTN_IMPLEMENTATION
        self.S = core_api.make_setup(
            spec,
            w.device,
            w.vocab,
            None if variant.method == "sft" else maybe_compile(w.teacher, compile_),
            maybe_compile(w.student, compile_),
            objective,
            s_cap,
            t_cap,
        )
        self.a = spec.method.effective_kd_weight
        self.logit_loss = variant.logit_loss
        self.logit_loss_label = variant.logit_loss_label

    def forward(self) -> Tensor:
        x = self.x
        terms, _parts = core_api.micro_step(
            self.S,
            x,
            x[:, 1:].numel(),
            x.shape[0],
            self.a,
            1.0,
            self.use_amp,
            torch.bfloat16,
            logit_loss=self.logit_loss,
        )
        return terms["loss"]

    def close(self) -> None:
        super().close()
        for cap in (self.S.student_capture, self.S.teacher_capture):
            if cap is not None:
                cap.clear()
