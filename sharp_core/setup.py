"""Set-up of a run: everything the training step needs, loaded and validated up front.

Why separate from the loop: `setup` touches no file under the run's folder, so a bad spec
(unknown model, tokenizer mismatch, unreadable data) fails before anything is half-written;
and a benchmark or a test can build a `Setup` and call `sharp_core.step.micro_step` on it
without running the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging as hf_logging

from sharp_core import distributed, losses
from sharp_core.data import (
    ClassificationData,
    PackedData,
    build_classification_data,
    build_data,
    load_classification,
    load_texts,
)
from sharp_core.models import (
    LocalResolver,
    Resolver,
    check_vocab,
    load_model,
    model_shape,
    resolve_tokenizer,
)
from sharp_core.spec import JobSpec

if TYPE_CHECKING:
    from sharp_core.capture import AttentionCapture
    from sharp_core.sharp import AttentionObjective

__all__ = ["Setup", "autocast_dtype", "pick_device", "setup"]


@dataclass
class Setup:
    """Everything the training step needs, built and validated before any file is written."""

    spec: JobSpec
    device: torch.device
    tokenizer: Any
    vocab: int
    """Logit columns every loss sees: the tokenizer's size, or the number of classes."""
    teacher: torch.nn.Module | None
    """eval(), requires_grad off; None for 'sft'."""
    student: torch.nn.Module
    """The model being trained (under torchrun: its DDP wrapper, see `Context.prepare`)."""
    data: PackedData | ClassificationData
    objective: AttentionObjective | None
    """The attention terms (`make_attention_objective`); None for logit-only methods."""
    student_capture: AttentionCapture | None
    teacher_capture: AttentionCapture | None
    logit_loss: losses.LogitLoss = losses.logit_objective
    """(1 − a)·CE + a·D on the logits; another implementation can be passed in (benchmarks)."""


def pick_device(device: str | None) -> torch.device:
    """The given device, else the default one (under torchrun: cuda:LOCAL_RANK)."""
    if device:
        return torch.device(device)
    return distributed.context().default_device()


def autocast_dtype(spec: JobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes: bf16 / fp16 on CUDA, None (fp32) otherwise."""
    precision = spec.training.precision
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def setup(spec: JobSpec, *, resolver: Resolver | None = None, device: str | None = None) -> Setup:
    """Load tokenizer, models and data; build the attention objective and captures."""
    resolver = resolver or LocalResolver()
    dev = pick_device(device)
    hf_logging.disable_progress_bar()
    classify = spec.task == "sequence_classification"
    data: PackedData | ClassificationData
    if classify:
        rows = load_classification(spec.dataset, resolver)
        toks = resolve_tokenizer(spec, resolver, None)
        data = build_classification_data(
            spec.dataset, rows, toks.tokenizer, spec.training.seq_len, spec.training.seed
        )
        vocab = data.num_labels  # logits are over classes
        n_labels: int | None = data.num_labels
    else:
        texts = load_texts(spec.dataset, resolver)
        toks = resolve_tokenizer(spec, resolver, iter(texts) if spec.tokenizer.train else None)
        vocab = toks.vocab_size
        n_labels = None
    tok = toks.tokenizer
    kw = {
        "resolver": resolver,
        "device": dev,
        "tokenizer": tok,
        "task": spec.task,
        "num_labels": n_labels,
    }
    teacher = None
    if spec.teacher is not None and spec.method.name != "sft":
        t_dev = distributed.context().teacher_load_device(spec, dev)
        teacher = load_model(spec.teacher, role="teacher", **{**kw, "device": t_dev})  # type: ignore[arg-type]
        if not classify:
            check_vocab(teacher, vocab, "teacher")
        teacher.eval()
        teacher.requires_grad_(False)
    student = load_model(spec.student, role="student", **kw)  # type: ignore[arg-type]
    if classify:
        if isinstance(data, ClassificationData):
            names = data.label_names
            for m in (student, teacher):
                if m is not None:
                    m.config.id2label = dict(enumerate(names))
                    m.config.label2id = {n: i for i, n in enumerate(names)}
    else:
        check_vocab(student, vocab, "student")
        data = build_data(spec.dataset, texts, tok, spec.training.seq_len)

    objective = s_cap = t_cap = None
    if spec.method.uses_attention:
        from sharp_core.capture import AttentionCapture
        from sharp_core.sharp import make_attention_objective

        assert teacher is not None
        objective = make_attention_objective(
            spec.method,
            student_shape=model_shape(student),
            teacher_shape=model_shape(teacher),
            seq_len=spec.training.seq_len,
        ).to(dev)
        s_cap = AttentionCapture(student, objective.student_layers)
        t_cap = AttentionCapture(teacher, objective.teacher_layers)
    if spec.training.compile:
        student = torch.compile(student)  # type: ignore[assignment]
        if teacher is not None:
            teacher = torch.compile(teacher)  # type: ignore[assignment]
    return Setup(spec, dev, tok, vocab, teacher, student, data, objective, s_cap, t_cap)
