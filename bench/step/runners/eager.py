"""The baseline SHARP replaces: eager attention with ``output_attentions=True``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.step.models import Workload, maybe_compile
from bench.step.runners.base import Runner, logit_loss_kwargs
from sharp_core.models.loading import model_shape
from sharp_core.objectives import losses
from sharp_core.objectives.sharp import layer_map
from sharp_core.spec import MethodSpec


class EagerRunner(Runner):
    """MSE on head-averaged maps, plus the `kd` step's logit loss.

    The logit part is the `kd` step's (`losses.logit_objective`, same chunking, teacher under
    inference mode, no attention mask for the packed block), so the difference to `kd` is the
    attention part alone; it uses the same layer pairs as SHARP (uniform map, every student
    layer). Both models return *all* their layers' maps: that is what ``output_attentions``
    does, and its cost.
    """

    impl = "eager"

    def __init__(self, w: Workload) -> None:
        super().__init__("eager", w)
        self.teacher = maybe_compile(w.teacher, w.compile_)
        self.student = maybe_compile(w.student, w.compile_)
        l_s, _ = model_shape(w.student)
        l_t, _ = model_shape(w.teacher)
        self.pairs = list(enumerate(layer_map(l_s, l_t)))
        self.method = MethodSpec(name="kd")

    def forward(self) -> Tensor:
        x, V, m = self.x, self.vocab, self.method
        labels = x[:, 1:]
        with self.autocast():
            with torch.inference_mode():
                t_out = self.teacher(input_ids=x, output_attentions=True)
            s_out = self.student(input_ids=x, output_attentions=True)
        loss, _ce, _d = losses.logit_objective(
            m.divergence,
            s_out.logits[:, :-1, :V],
            t_out.logits[:, :-1, :V],
            labels,
            **logit_loss_kwargs(m, labels.numel()),
        )
        attn = torch.zeros((), device=x.device)
        for js, jt in self.pairs:
            s_avg = s_out.attentions[js].float().mean(dim=1)  # (B, N, N)
            t_avg = t_out.attentions[jt].float().mean(dim=1)  # (B, N, N), an inference tensor
            attn = attn + F.mse_loss(s_avg, t_avg)
        return loss + attn / len(self.pairs)
