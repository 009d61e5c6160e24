"""What every step kind shares: a forward that returns the loss, then one backward and one
optimizer step, identical for all."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bench.step.models import GRAD_CLIP, Workload, set_attention
from sharp_core.spec import MethodSpec


class StepSkipped(Exception):
    """A step that cannot run on this machine (not an error: the run's exit status stays 0)."""


class Runner:
    """One step kind: `forward` returns the loss; backward and the optimizer are common.

    Split so that the profiler can label forward / backward / optimizer phases, and so that
    every step kind runs exactly the same backward and optimizer code. `activate` puts the
    models in the attention implementation this step needs (steps are interleaved).
    """

    #: attention implementation both models must use for this step
    impl = "sdpa"

    def __init__(self, name: str, w: Workload) -> None:
        self.name = name
        self.device = w.device
        self.models = (w.teacher, w.student)
        self.opt = w.opt
        self.params = [p for g in w.opt.param_groups for p in g["params"]]
        self.x = w.x
        self.vocab = w.vocab
        self.use_amp = w.use_amp

    def activate(self) -> None:
        for m in self.models:
            set_attention(m, self.impl)

    def autocast(self) -> torch.autocast:
        """bf16 autocast when the preset asks for it on CUDA (the trainer's precision)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def forward(self) -> Tensor:
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        loss = self.forward()
        self.backward(loss)
        self.optimizer_step()

    def close(self) -> None:
        """Drop gradients and references to captured tensors."""
        self.opt.zero_grad(set_to_none=True)


def logit_loss_kwargs(
    m: MethodSpec, num_valid: int, kd_weight: float | None = None
) -> dict[str, Any]:
    """Keyword arguments of a logit loss (`losses.logit_objective`'s contract) from the
    method spec, as the trainer passes them."""
    return {
        "kd_weight": m.effective_kd_weight if kd_weight is None else kd_weight,
        "temperature": m.temperature,
        "alpha": m.skew_alpha,
        "beta": m.jsd_beta,
        "num_valid": num_valid,
        "chunk_size": m.logit_chunk,
    }
