"""ce / kd / sharp and their variants: the trainer's own micro-step on a hand-built Setup.

Why the trainer's step and not a re-implementation of the losses: the benchmark must time the
code that trains, not a look-alike. A variant changes only what a spec setting
(``projection``), the models' compilation or the logit loss handed to the step changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.step.models import Workload, job_spec, maybe_compile
from bench.step.runners.base import Runner
from sharp_core.cache import teacher_cache
from sharp_core.models.capture import ATTN_IMPLEMENTATION, AttentionCapture
from sharp_core.models.loading import model_shape
from sharp_core.objectives import losses
from sharp_core.objectives.sharp import make_attention_objective
from sharp_core.spec import TeacherCacheSpec
from sharp_core.train.onpolicy import generate, loss_mask
from sharp_core.train.setup import Setup
from sharp_core.train.step import micro_step


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
    twice. Returns (loss, ce, d) with ce and d detached, like the fused function. Both are
    looked up on the module at each call, so ``--profile``'s labelled wrappers are the ones run.
    """
    ce = losses.cross_entropy(student_logits, labels, num_valid=num_valid, chunk_size=chunk_size)
    d = losses.divergence(
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


#: ``--profile``'s range of the trainer's default logit loss (tests/test_bench.py reads it).
FUSED_LABEL = "losses.logit_objective (fused CE+D)"
LINEAR_LABEL = "fused.fused_linear_objective (head + CE+D, chunked)"


@dataclass(frozen=True)
class Variant:
    """One trainer step kind: the method, and what it changes against the default step."""

    method: str  # MethodSpec.name
    projection: str = "sdpa"  # MethodSpec.projection
    compiled: bool = False  # torch.compile teacher and student, as training.compile does
    #: the step's logit loss on whole logits, handed to it as ``Setup.logit_loss``; the
    #: trainer calls it only on the dense path (``logit_path="dense"``)
    logit_loss: losses.LogitLoss = losses.logit_objective
    logit_loss_label: str = LINEAR_LABEL  # the profiler range of the step's logit term
    #: ``Setup.logit_path``: None is the trainer's default (the fused head + loss), "dense"
    #: builds the whole logits and calls ``logit_loss``
    logit_path: str | None = None
    #: λ = 1 on-policy: the student continues the batch's first half (at most 64 new tokens)
    #: with its KV cache, then the step trains on the generated tokens only
    on_policy: bool = False
    #: read the logit term from a teacher-logit cache of this top-k (tail bucket) instead of
    #: running the teacher: the targets are computed once, outside the timed steps, and
    #: copied to the device each step as `TeacherCache.batch` does
    cache_k: int | None = None


VARIANTS: dict[str, Variant] = {
    "ce": Variant("sft"),
    "kd": Variant("kd"),
    "kd_onpolicy": Variant("kd", on_policy=True),
    "sharp": Variant("sharp"),
    "sharp_chunked": Variant("sharp", projection="chunked"),
    "kd_separate": Variant(
        "kd",
        logit_loss=separate_logit_objective,
        logit_loss_label="bench.separate_logit_objective (CE, then D)",
        logit_path="dense",
    ),
    "kd_cached": Variant("kd", cache_k=32),
    "sharp_cached": Variant("sharp", cache_k=32),
    "kd_compiled": Variant("kd", compiled=True),
    "sharp_compiled": Variant("sharp", compiled=True),
}


class MicroStepRunner(Runner):
    """The trainer's own micro-step on a `Setup` built from a real JobSpec.

    ``variant.projection`` goes into the `MethodSpec` exactly as a job would set it;
    ``variant.logit_loss`` is the step's logit loss (``Setup.logit_loss``), as a caller of
    `sharp_core.train.step.micro_step` hands it one.
    """

    def __init__(self, name: str, variant: Variant, w: Workload) -> None:
        super().__init__(name, w)
        compile_ = w.compile_ or variant.compiled
        spec = job_spec(w.preset, variant.method, compile_, variant.projection)
        objective = s_cap = t_cap = None
        if spec.method.uses_attention:
            # built as `sharp_core.train.setup.setup` builds it; the captures switch both models to
            # the "sharp_capture" attention (SDPA + record)
            objective = make_attention_objective(
                spec.method,
                student_shape=model_shape(w.student),
                teacher_shape=model_shape(w.teacher),
                seq_len=w.preset.seq_len,
            ).to(w.device)
            s_cap = AttentionCapture(w.student, objective.student_layers)
            t_cap = AttentionCapture(w.teacher, objective.teacher_layers)
            self.impl = ATTN_IMPLEMENTATION
        # no tokenizer or data: the benchmark feeds its own batch to `micro_step`
        self.S = Setup(
            spec=spec,
            device=w.device,
            tokenizer=None,
            vocab=w.vocab,
            teacher=None if variant.method == "sft" else maybe_compile(w.teacher, compile_),
            student=maybe_compile(w.student, compile_),
            data=None,  # type: ignore[arg-type]
            objective=objective,
            student_capture=s_cap,
            teacher_capture=t_cap,
            logit_loss=variant.logit_loss,
            logit_path=variant.logit_path,
        )
        self.cached: dict[str, Tensor] | None = None
        if variant.cache_k is not None:
            if not spec.method.uses_attention:
                self.S.teacher = None  # the cache replaces the teacher's forward pass
            amp = torch.bfloat16 if self.use_amp else None
            x = w.x
            with (
                torch.inference_mode(),
                torch.autocast(w.device.type, dtype=amp, enabled=amp is not None),
            ):
                logits = w.teacher(input_ids=x).logits[:, :-1, : w.vocab]  # (B, N-1, V)
                targets = teacher_cache.teacher_targets(
                    logits, TeacherCacheSpec(k=variant.cache_k), 1.0, list(range(x.shape[0]))
                )
            self.cached = {k: v.cpu() for k, v in targets.items()}  # as read from a shard
        self.a = spec.method.effective_kd_weight
        self.logit_loss_label = variant.logit_loss_label
        self.on_policy = variant.on_policy
        n = w.preset.seq_len
        self.new_tokens = min(64, n // 2)  # T; the prompt is the block's first N - T tokens

    def forward(self) -> Tensor:
        x = self.x
        amp = torch.bfloat16 if self.use_amp else None
        if self.on_policy:
            b, t = x.shape[0], self.new_tokens
            p = x.shape[1] - t
            seq = generate(  # (B, P + T), as the trainer's on-policy batches are made
                self.S.student,
                x[:, :p],
                max_new_tokens=t,
                vocab=self.vocab,
                seeds=list(range(b)),
                amp_dtype=amp,
            )
            batch = {"input_ids": seq, "loss_mask": loss_mask(b, p, t, x.device)}
            # student samples: the divergence alone (a = 1), as the trainer does
            terms, _parts = micro_step(
                self.S, batch, n_tokens=b * t, n_seqs=b, kd_weight=1.0, amp_dtype=amp
            )
            return terms["loss"]
        batch: Tensor | dict[str, Tensor] = x
        if self.cached is not None:
            batch = {"input_ids": x, **teacher_cache.as_batch(self.cached, x.device)}
        terms, _parts = micro_step(
            self.S,
            batch,
            n_tokens=x[:, 1:].numel(),
            n_seqs=x.shape[0],
            amp_dtype=amp,
        )
        return terms["loss"]

    def close(self) -> None:
        super().close()
        for cap in (self.S.student_capture, self.S.teacher_capture):
            if cap is not None:
                cap.clear()
