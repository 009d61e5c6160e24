"""The one place where bench/ touches sharp_core names that are private or about to change.

Why an adapter: the benchmarks must time the trainer's own step, which today is reachable only
through private names (`trainer._micro_step`, `trainer._flops_per_token`, `trainer._peak_flops`)
and, for the ``kd_separate`` step, through a substitution of `losses.logit_objective` on its
module. Issue 13 refactors sharp_core so that bench/ can use public names instead; until that
lands, every such use lives here and nowhere else in bench/, so the switch is one file.

What switches once the sharp_core refactor (issue 13) lands:

* `micro_step` → `sharp_core.trainer.micro_step`, with the logit loss passed in (its
  ``logit_loss`` argument, or the ``Setup.logit_loss`` field built by `make_setup`) instead
  of `substituted_logit_loss`'s temporary replacement of `losses.logit_objective`; that
  context manager is then deleted (and its test in tests/test_bench.py with it).
* `flops_per_token` → `sharp_core.trainer.flops_per_token`; `peak_flops` → the public name
  the refactor gives `trainer._peak_flops`.
* `make_setup` → `Setup(...)` with its new ``logit_loss`` field.
* `attention_objective`, `set_projection`, `project_both`, `layer_map` → the attention
  objectives' factory and classes in `sharp_core.sharp` (bench/ otherwise only calls an
  objective as the trainer does: ``objective(student_layers, teacher_layers, valid)``).
* `logit_objective`, `cross_entropy`, `divergence` → the losses registry (``{name: loss}``).
* `PROFILED` → the functions' new names (the labels, which tests/test_bench.py reads, stay).

Everything else in bench/ imports only this module or stable public sharp_core names (`spec`,
`models`, `capture`, `data`, `evaluate.perplexity`, `checkpoint.list_checkpoints`,
`trainer.train` / `TrainCallbacks`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from sharp_core import losses
from sharp_core import sharp as _sharp
from sharp_core import trainer as _trainer
from sharp_core.capture import AttentionCapture, CapturedLayer
from sharp_core.models import model_shape
from sharp_core.spec import JobSpec, MethodSpec

#: The signature of `losses.logit_objective`: (name, student_logits, teacher_logits, labels,
#: **kw) → (loss, ce, d), ce and d detached.
LogitLoss = Callable[..., tuple[Tensor, Tensor, Tensor]]


# ------------------------------------------------------------------------------ the step


def make_setup(
    spec: JobSpec,
    device: torch.device,
    vocab: int,
    teacher: nn.Module | None,
    student: nn.Module,
    objective: nn.Module | None = None,
    student_capture: Any = None,
    teacher_capture: Any = None,
) -> Any:
    """A trainer `Setup` without tokenizer or data (the benchmark feeds its own batch)."""
    return _trainer.Setup(
        spec=spec,
        device=device,
        tokenizer=None,
        vocab=vocab,
        teacher=teacher,
        student=student,
        data=None,  # type: ignore[arg-type]
        objective=objective,
        student_capture=student_capture,
        teacher_capture=teacher_capture,
    )


def micro_step(
    setup: Any,
    x: Tensor,
    n_tokens: int,
    n_seqs: int,
    kd_weight: float,
    attn_scale: float,
    use_amp: bool,
    amp_dtype: torch.dtype,
    *,
    logit_loss: LogitLoss | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The trainer's micro-step (forwards + loss terms); ``logit_loss`` replaces the fused one.

    The signature is the public `micro_step`'s to come; today the substitution is made by
    `substituted_logit_loss` around the private function.
    """
    ctx = substituted_logit_loss(logit_loss) if logit_loss is not None else contextlib.nullcontext()
    with ctx:
        return _trainer._micro_step(
            setup, x, n_tokens, n_seqs, kd_weight, attn_scale, use_amp, amp_dtype
        )


def substituted_logit_loss(fn: LogitLoss) -> contextlib.AbstractContextManager[None]:
    """`losses.logit_objective` replaced by ``fn`` for the duration of one step.

    Why a substitution rather than a copy of the old step: `_micro_step` looks the function
    up on the `losses` module at every call, so swapping that one attribute times the
    trainer's very step (same forwards, slicing, capture, teacher under inference mode) with
    only the logit loss changed. The attribute is restored on exit, also on error.
    """
    return _swapped(losses, "logit_objective", fn)


@contextlib.contextmanager
def _swapped(owner: Any, attr: str, value: Any) -> Iterator[None]:
    """``owner.attr`` set to ``value`` while the block runs, restored on exit (also on error)."""
    before = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, before)


def flops_per_token(student: nn.Module, teacher: nn.Module | None) -> float:
    """6·N_student + 2·N_teacher, embeddings excluded (the trainer's MFU numerator)."""
    return _trainer._flops_per_token(student, teacher)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak from the trainer's table (None off CUDA or if unknown)."""
    return _trainer._peak_flops(device)


# ------------------------------------------------------------------------------ losses
# Looked up on the module at each call, so `instrumented`'s wrappers are the ones timed.


def logit_objective(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(1−a)·CE + a·D fused (`losses.logit_objective`)."""
    return losses.logit_objective(*args, **kwargs)


def cross_entropy(*args: Any, **kwargs: Any) -> Tensor:
    return losses.cross_entropy(*args, **kwargs)


def divergence(*args: Any, **kwargs: Any) -> Tensor:
    return losses.divergence(*args, **kwargs)


# ------------------------------------------------------------------------------ attention


def attention_objective(
    method: MethodSpec,
    student: nn.Module,
    teacher: nn.Module,
    seq_len: int,
    device: torch.device,
) -> tuple[nn.Module, AttentionCapture, AttentionCapture]:
    """The trainer's attention objective for ``method`` on these two models, and the two
    captures of the layers it reads (which switch both models to the capturing attention)."""
    objective = _sharp.AttentionObjective(
        method,
        student_shape=model_shape(student),
        teacher_shape=model_shape(teacher),
        seq_len=seq_len,
    ).to(device)
    return (
        objective,
        AttentionCapture(student, objective.student_layers),
        AttentionCapture(teacher, objective.teacher_layers),
    )


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer of each student layer, uniform (SHARP's default mapping)."""
    return _sharp.layer_map(student_layers, teacher_layers)


def set_projection(objective: nn.Module, how: str) -> contextlib.AbstractContextManager[None]:
    """The objective's P·Q path switched to ``how`` ("sdpa" / "chunked") for a while.

    The objective reads ``projection`` at every call: the same switch a spec's
    ``method.projection`` makes, with no patching of sharp_core."""
    return _swapped(objective, "projection", how)


def project_both(objective: nn.Module, layer: CapturedLayer, n: int) -> tuple[Tensor, Tensor]:
    """(chunked float32 reference P·Q, SDPA P·Q) of one captured layer, the objective's rank."""
    basis = _sharp.dct_basis(n, objective.rank, device=layer.query.device)  # type: ignore[arg-type]
    chunked = _sharp.project(layer, basis, objective.query_chunk)  # type: ignore[arg-type]
    return chunked, _sharp.project_sdpa(layer, basis)


# ------------------------------------------------------------------------------ profiling

#: (module path, attribute, label) of the sharp_core functions the profile wraps in ranges.
PROFILED: tuple[tuple[str, str, str], ...] = (
    ("sharp_core.capture", "_record", "capture.record (q/k kept)"),
    ("sharp_core.sharp", "project_sdpa", "sharp.project_sdpa (P*Q by SDPA)"),
    ("sharp_core.sharp", "project", "sharp.project (chunked P*Q)"),
    ("sharp_core.sharp", "_project_chunk", "sharp._project_chunk (student chunk)"),
    ("sharp_core.sharp", "_project_teacher", "sharp._project_teacher (teacher P*Q)"),
    ("sharp_core.sharp", "sharp_distances", "sharp.sharp_distances"),
    ("sharp_core.losses", "logit_objective", "losses.logit_objective (fused CE+D)"),
    ("sharp_core.losses", "cross_entropy", "losses.cross_entropy"),
    ("sharp_core.losses", "divergence", "losses.divergence"),
)


@contextlib.contextmanager
def instrumented(
    label_range: Callable[[str], contextlib.AbstractContextManager[Any]],
    objective: nn.Module | None = None,
) -> Iterator[None]:
    """Every `PROFILED` function, `CapturedLayer.probs` and ``objective``'s forward run inside
    ``label_range(label)`` while the block runs; all restored on exit, also on error.

    Run time only: sharp_core's files are never edited. The objective's forward is wrapped on
    the instance (an attribute shadowing the class method for that one module).
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
