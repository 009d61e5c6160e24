"""The step benchmark's models, spec and optimizer, built the way the trainer builds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.step.presets import Preset
from sharp_core.models.loading import LocalResolver, load_model, model_shape
from sharp_core.spec import DatasetSpec, JobSpec, MethodSpec, ModelSpec, TrainingSpec
from sharp_core.train import perf

#: The trainer's default gradient clipping, read from the spec (its one home).
GRAD_CLIP: float = TrainingSpec.model_fields["grad_clip"].default


def model_spec(config: dict[str, Any]) -> ModelSpec:
    return ModelSpec(init="config", config=dict(config))


def job_spec(preset: Preset, method: str, compile_: bool, projection: str = "sdpa") -> JobSpec:
    """A real JobSpec so the micro-step reads the same MethodSpec defaults as a job would.

    ``projection`` is the one setting a step changes (``sharp_chunked``), through the spec,
    as a job would; every other field is the default."""
    return JobSpec(
        name=f"bench-{preset.name}-{method}",
        teacher=None if method == "sft" else model_spec(preset.teacher),
        student=model_spec(preset.student),
        # Never read: the benchmark feeds random token ids. A spec needs a source.
        dataset=DatasetSpec(source="files", files=["<random token ids: bench.step>"]),
        method=MethodSpec(name=method, projection=projection),
        training=TrainingSpec(
            batch_size=preset.batch,
            seq_len=preset.seq_len,
            precision="bf16",
            compile=compile_,
            grad_clip=GRAD_CLIP,
        ),
    )


def build_models(preset: Preset, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Teacher (eval, frozen) and student (train) exactly as `trainer.setup` loads them."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config sanity warnings about random-init models
    resolver = LocalResolver()
    torch.manual_seed(0)
    teacher = load_model(
        model_spec(preset.teacher), role="teacher", resolver=resolver, device=device
    )
    teacher.eval()
    teacher.requires_grad_(False)
    torch.manual_seed(1)
    student = load_model(
        model_spec(preset.student), role="student", resolver=resolver, device=device
    )
    student.train()
    return teacher, student


def make_optimizer(student: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's optimizer: AdamW, fused on CUDA, decay on matrices only.

    One optimizer is shared by every step kind: its state is the same size whatever the loss,
    so sharing it is fair, and it keeps the resident memory identical across steps.
    """
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )


@dataclass(frozen=True)
class Workload:
    """What every step kind shares: the preset, both models, the optimizer and the batch.

    The models are shared by all steps (each step switches them to the attention it needs),
    and so is one AdamW (its state is the same size whatever the loss)."""

    preset: Preset
    teacher: nn.Module
    student: nn.Module
    opt: torch.optim.Optimizer
    x: Tensor  # (B, N) token ids
    device: torch.device
    compile_: bool = False

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda" and self.preset.amp

    @property
    def vocab(self) -> int:
        return int(self.preset.student["vocab_size"])

    @classmethod
    def build(cls, preset: Preset, device: torch.device, compile_: bool = False) -> Workload:
        """Models, optimizer and a random batch (seeded) for ``preset`` on ``device``."""
        teacher, student = build_models(preset, device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(
            0, int(preset.student["vocab_size"]), (preset.batch, preset.seq_len), generator=gen
        ).to(device)
        return cls(preset, teacher, student, make_optimizer(student, device), x, device, compile_)


def set_attention(model: nn.Module, impl: str) -> None:
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


def maybe_compile(model: nn.Module, compile_: bool) -> nn.Module:
    return torch.compile(model) if compile_ else model  # type: ignore[return-value]


def shape(model: nn.Module) -> dict[str, Any]:
    """The model's shape, size and dtype, as the JSON document reports it."""
    c = model.config
    layers, heads = model_shape(model)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    ffn = getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) or 4 * int(hidden)
    p = next(model.parameters())
    return {
        "model_type": c.model_type,
        "layers": layers,
        "heads": heads,
        "hidden": int(hidden),
        "ffn": int(ffn),
        "vocab": int(c.vocab_size),
        "params": sum(x.numel() for x in model.parameters()),
        "non_embedding_params": int(perf.flops_per_token(model, None) // 6),
        "dtype": str(p.dtype).removeprefix("torch."),
    }
