"""``kd_liger``: the ``kd`` step's loss from Liger Kernel (CUDA, optional dependency)."""

from __future__ import annotations

import torch
from torch import Tensor

from bench.step.models import Workload, maybe_compile
from bench.step.runners.base import Runner, StepSkipped
from sharp_core.spec import MethodSpec


def liger_unavailable(device: torch.device) -> str | None:
    """Why the ``kd_liger`` step cannot run here, or None when it can."""
    if device.type != "cuda":
        return (
            f"needs CUDA: Liger Kernel's fused linear losses are Triton kernels (device is "
            f"{device.type})"
        )
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not importable ({e}); pip install 'sharp[gpu]'"
    return None


class LigerKDRunner(Runner):
    """The ``kd`` step's loss from Liger Kernel: lm_head fused with CE and with forward KL.

    Why: issue 5 asks to compare a well-kept fused library against sharp_core's
    `logit_objective` before adopting anything on CUDA. Liger never materialises the
    (B·N, V) logits: `LigerFusedLinearCrossEntropyLoss` and `LigerFusedLinearJSD` take the
    final hidden states and the LM heads' weights and compute value and gradient chunk by
    chunk. ``jsd_beta=0`` is Liger's forward KL(p_T‖q_S); Liger does not multiply by τ², so
    this step does (sharp_core's divergence includes it). Liger normalises by the count of
    non-ignored labels, which is sharp_core's ``num_valid`` for one micro-batch. The student
    head is applied twice (once per loss): that is Liger's API, and part of what is measured.
    """

    def __init__(self, w: Workload) -> None:
        why = liger_unavailable(w.device)
        if why is not None:
            raise StepSkipped(why)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        super().__init__("kd_liger", w)
        m = MethodSpec(name="kd")
        if m.divergence != "forward_kl":
            raise StepSkipped(f"compares forward KL only, the default is {m.divergence!r}")
        # the decoders without their LM heads: final hidden states (B, N, H), norm included
        self.t_body = maybe_compile(w.teacher.base_model, w.compile_)
        self.s_body = maybe_compile(w.student.base_model, w.compile_)
        self.t_head = w.teacher.get_output_embeddings()
        self.s_head = w.student.get_output_embeddings()
        for head in (self.t_head, self.s_head):
            if getattr(head, "bias", None) is not None:
                raise StepSkipped("an LM head with a bias; the step passes weights only")
        self.method = m
        self.a = m.effective_kd_weight
        self.tau = m.temperature
        self.ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        self.kl = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=m.temperature)

    def hidden(self) -> tuple[Tensor, Tensor, Tensor]:
        """(student hidden (T, H_s), teacher hidden (T, H_t), labels (T,)), T = B·(N−1)."""
        x = self.x
        with self.autocast():
            with torch.inference_mode():
                t_h = self.t_body(input_ids=x).last_hidden_state[:, :-1]
            s_h = self.s_body(input_ids=x).last_hidden_state[:, :-1]
        # out of inference mode: Liger's autograd functions may save the teacher's input
        t_h = t_h.clone()
        return (
            s_h.reshape(-1, s_h.shape[-1]),
            t_h.reshape(-1, t_h.shape[-1]),
            x[:, 1:].reshape(-1),
        )

    def loss(self, s_h: Tensor, t_h: Tensor, y: Tensor) -> Tensor:
        V = self.vocab
        w_s, w_t = self.s_head.weight[:V], self.t_head.weight[:V]
        with self.autocast():
            ce = self.ce(w_s, s_h, y)
            kl = self.kl(s_h, w_s, t_h, w_t, y)
        return (1 - self.a) * ce + self.a * self.tau**2 * kl

    def forward(self) -> Tensor:
        return self.loss(*self.hidden())
