"""``checks`` in the JSON: each "before" variant against its "after" on the same tensors.

Why: a variant must change the cost, not the value; and a part of the step that is a few
percent of it (the attention objective, the logit loss) is below what whole-step timings
resolve on a loaded machine, so it is also timed alone, interleaved, on the same inputs.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.step.runners import LigerKDRunner, MicroStepRunner, Runner
from bench.step.runners.base import logit_loss_kwargs
from bench.step.runners.trainer import separate_logit_objective
from bench.step.timing import paired_ratio, side_by_side
from sharp_core.models.capture import CapturedLayer
from sharp_core.objectives import losses
from sharp_core.objectives.sharp import (
    AttentionObjective,
    SharpObjective,
    dct_basis,
    make_attention_objective,
    project,
    project_sdpa,
)


def _captured(runner: MicroStepRunner) -> tuple[dict[int, Any], dict[int, Any]]:
    """Both models' captured q/k on the runner's batch (forwards as in the micro-step)."""
    S, x = runner.S, runner.x
    assert S.teacher is not None and S.student_capture is not None
    runner.activate()
    with torch.no_grad(), runner.autocast():
        with S.teacher_capture:
            S.teacher(input_ids=x)
        with S.student_capture:
            S.student(input_ids=x)
    student, teacher = dict(S.student_capture.layers), dict(S.teacher_capture.layers)
    S.student_capture.clear()
    S.teacher_capture.clear()
    return student, teacher


def with_projection(runner: MicroStepRunner, how: str) -> AttentionObjective:
    """The runner's attention objective as a job with ``method.projection = how`` builds it.

    Why a second objective rather than a switch on the runner's: the two paths are then two
    objectives built from specs, exactly as two jobs would get them (same shapes, layer map
    and rank: the DCT basis is fixed, so nothing random differs between them).
    """
    obj = runner.S.objective
    assert obj is not None
    method = runner.S.spec.method.model_copy(update={"projection": how})
    return make_attention_objective(
        method,
        student_shape=obj.student_shape,
        teacher_shape=obj.teacher_shape,
        seq_len=obj.seq_len,
    ).to(runner.device)


def project_both(obj: SharpObjective, layer: CapturedLayer, n: int) -> tuple[Tensor, Tensor]:
    """(chunked float32 reference P·Q, SDPA P·Q) of one captured layer, the objective's rank."""
    basis = dct_basis(n, min(obj.rank, n), device=layer.query.device)
    return project(layer, basis, obj.query_chunk), project_sdpa(layer, basis)


def compare_projection_terms(runner: MicroStepRunner) -> dict[str, float]:
    """Relative difference of each SHARP term, SDPA projection vs chunked, same captured q/k.

    Also the terms' values (``<term>_value``: random-init models attend almost uniformly, so
    the terms can be tiny and their relative difference mostly cancellation) and the relative
    error of the projected maps themselves (``pq_student`` / ``pq_teacher``: max over the
    mapped layers of ‖PQ_sdpa − PQ_chunked‖ / ‖PQ_chunked‖), which do not cancel.

    Why: the default (SDPA) path goes through a fused attention kernel where the reference
    rebuilds float32 softmax rows; this measures what that costs in the loss itself, on the
    benchmark's own captured tensors (float32 on CPU; on CUDA the models' bf16 q/k).
    """
    x = runner.x
    chunked, sdpa = with_projection(runner, "chunked"), with_projection(runner, "sdpa")
    assert isinstance(chunked, SharpObjective)
    student, teacher = _captured(runner)
    valid = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        ref = chunked(student, teacher, valid)
        got = sdpa(student, teacher, valid)
        pq_err = {"student": 0.0, "teacher": 0.0}
        for side, layers in (("student", student), ("teacher", teacher)):
            for layer in layers.values():
                a, b = project_both(chunked, layer, x.shape[1])
                err = float((b - a).norm() / a.norm().clamp_min(1e-30))
                pq_err[side] = max(pq_err[side], err)
    out: dict[str, float] = {
        k: float((got[k] - ref[k]).abs() / ref[k].abs().clamp_min(1e-30)) for k in ref
    }
    out.update({f"{k}_value": float(v) for k, v in ref.items()})
    out.update({f"pq_{k}": v for k, v in pq_err.items()})
    return out


def time_objective(runner: MicroStepRunner, repeats: int) -> dict[str, float]:
    """Median ms of the attention objective alone, forward + backward, on both paths.

    The student's captured q/k are detached into leaves that require grad, so backward stops
    at q/k (the model's projections' backward exists in every step anyway).
    """
    x, dev = runner.x, runner.device
    objectives = {how: with_projection(runner, how) for how in ("chunked", "sdpa")}
    student0, teacher = _captured(runner)
    student = {
        i: CapturedLayer(
            query=c.query.detach().requires_grad_(True),
            key=c.key.detach().requires_grad_(True),
            scaling=c.scaling,
            mask=c.mask,
            is_causal=c.is_causal,
        )
        for i, c in student0.items()
    }
    valid = torch.ones_like(x, dtype=torch.bool)

    def fwd_bwd(how: str) -> None:
        terms = objectives[how](student, teacher, valid)
        sum(terms.values()).backward()
        for c in student.values():
            c.query.grad = c.key.grad = None

    chunked, sdpa = side_by_side(lambda: fwd_bwd("chunked"), lambda: fwd_bwd("sdpa"), repeats, dev)
    return {
        "chunked_ms": statistics.median(chunked),
        "sdpa_ms": statistics.median(sdpa),
        "chunked_over_sdpa_paired": paired_ratio(chunked, sdpa),
        "repeats": repeats,
    }


def compare_losses(before: Runner, after: Runner) -> dict[str, float]:
    """The two steps' losses on the same batch and weights: a variant must change the cost only.

    With autograd on, as in a step (with it off `logit_objective` takes its no-grad path, not
    the fused one); the graphs are dropped without a backward.
    """
    values = {}
    for r in (before, after):
        r.activate()
        values[r.name] = float(r.forward().detach())
        r.close()
    a, b = values[before.name], values[after.name]
    return {
        f"loss_{before.name}": a,
        f"loss_{after.name}": b,
        "rel_diff": abs(b - a) / max(abs(a), 1e-30),
    }


def time_logit_losses(runner: MicroStepRunner, repeats: int) -> dict[str, float]:
    """Median ms of the logit loss alone, forward + backward: fused vs two separate calls.

    On the same logits (the runner's models, sliced as the micro-step slices them); the
    student's logits are a leaf, so backward stops there.
    """
    S, x, m = runner.S, runner.x, runner.S.spec.method
    assert S.teacher is not None
    V = S.vocab
    runner.activate()
    with torch.no_grad(), runner.autocast():
        t_logits = S.teacher(input_ids=x).logits[:, :-1, :V]
        s_logits = S.student(input_ids=x).logits[:, :-1, :V]
    s_logits = s_logits.detach().requires_grad_(True)
    labels = x[:, 1:]
    kw = logit_loss_kwargs(m, labels.numel(), kd_weight=runner.a)

    def fwd_bwd(fn: losses.LogitLoss) -> None:
        loss, _ce, _d = fn(m.divergence, s_logits, t_logits, labels, **kw)
        loss.backward()
        s_logits.grad = None

    fused, separate = side_by_side(
        lambda: fwd_bwd(losses.logit_objective),
        lambda: fwd_bwd(separate_logit_objective),
        repeats,
        runner.device,
    )
    return {
        "fused_ms": statistics.median(fused),
        "separate_ms": statistics.median(separate),
        "separate_over_fused_paired": paired_ratio(separate, fused),
        "repeats": repeats,
    }


def compare_liger(runner: LigerKDRunner) -> dict[str, float]:
    """Liger's loss and student gradient against `losses.logit_objective` on the same rows.

    Relative difference of the value and of the gradient w.r.t. the student's final hidden
    states (the gradient sharp_core's path reaches through the LM head's matmul).
    """
    m = runner.method
    s_h, t_h, y = runner.hidden()
    s_h = s_h.detach().requires_grad_(True)
    got = runner.loss(s_h, t_h, y)
    (g_got,) = torch.autograd.grad(got, s_h)
    V = runner.vocab
    with runner.autocast():
        s_logits = F.linear(s_h, runner.s_head.weight[:V])
        t_logits = F.linear(t_h, runner.t_head.weight[:V])
    ref, _, _ = losses.logit_objective(
        m.divergence, s_logits, t_logits, y, **logit_loss_kwargs(m, int((y != -100).sum()))
    )
    (g_ref,) = torch.autograd.grad(ref, s_h)
    runner.opt.zero_grad(set_to_none=True)
    return {
        "loss_liger": float(got),
        "loss_sharp_core": float(ref),
        "loss_rel_diff": float((got - ref).abs() / ref.abs().clamp_min(1e-30)),
        "grad_rel_err": float(
            (g_got - g_ref).float().norm() / g_ref.float().norm().clamp_min(1e-30)
        ),
    }
