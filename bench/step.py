"""Time one optimizer step of each distillation method side by side (issue 5, "Must have" 1).

    python -m bench.step --preset tiny-cpu [--json] [--repeats N] [--warmup N]
                         [--steps ce,kd,sharp,eager] [--compile] [--profile] [--device DEV]
                         [--threads N]

Steps (each a *full* optimizer step: forward, backward, gradient clipping at 1.0 as the trainer
does, AdamW, ``zero_grad(set_to_none=True)``), all on the same random-initialised models and
the same random batch:

* ``ce``    student cross-entropy only (the trainer's ``sft`` path).
* ``kd``    teacher forward under inference mode + student forward/backward,
            (1−a)·CE + a·forward KL in one fused pass (`losses.logit_objective`; the trainer's
            ``kd`` path, a = 0.9). Every ratio is relative to this step.
* ``sharp`` the full SHARP step with the default ``MethodSpec`` (q/k captured inside SDPA by
            ``AttentionCapture``; ``AttentionObjective`` with P·Q from one SDPA call per layer,
            ``method.projection="sdpa"``).
* ``eager`` the baseline SHARP replaces: both models in eager attention with
            ``output_attentions=True``, MSE on the head-averaged maps of the mapped layer pairs,
            plus the same logit loss as ``kd``.

Opt-in steps, the "before" of each fast path next to its "after" in the same run:

* ``sharp_chunked`` the ``sharp`` step with ``method.projection="chunked"`` set in the spec:
            sharp_core's float32 reference (query chunks of softmax rows, checkpointed).
            Selecting it also fills ``checks`` (below).
* ``kd_separate`` the ``kd`` step with CE and D computed by two separate calls,
            `losses.cross_entropy` then `losses.divergence`, as the trainer did before the
            fused loss: `_micro_step` runs with `losses.logit_objective` temporarily replaced
            by `separate_logit_objective` (see `separate_logit_losses` for why a substitution).
* ``kd_liger`` (CUDA, optional ``liger-kernel``) the ``kd`` loss from Liger Kernel's fused
            linear cross-entropy and fused linear forward KL, which never build the logits;
            skipped, with the reason, on CPU or when the package is missing (``pip install
            'sharp[gpu]'``). ``checks.liger_vs_logit_objective`` compares its value and
            gradient with sharp_core's.
* ``kd_compiled``, ``sharp_compiled`` ``kd`` / ``sharp`` with teacher and student wrapped in
            ``torch.compile`` as the trainer does with ``training.compile``, interleaved with
            the eager steps so that the paired ratio compares them in the same rounds
            (``--compile`` instead compiles every step, which leaves nothing uncompiled to
            compare with in that run). Compilation happens in the warm-up rounds.

Why the steps go through ``sharp_core.trainer._micro_step`` with a hand-built `Setup` (all but
``eager`` and ``kd_liger``, which have no trainer path) instead of re-implementing the losses:
the benchmark must time the code that trains, not a look-alike; the variants change only what
a spec setting (``projection``) or one substituted loss function changes. Data loading and
tokenisation (not part of a step) are left out: the batch is random token ids, the models are
built from configs (no downloads) with ``sharp_core.models.load_model``, so they get the
trainer's dtypes (teacher bf16 on CUDA, student float32 with bf16 autocast).

Timing: the steps are interleaved — round 1 runs ce, kd, sharp, eager once each, round 2
again, and so on — ``--warmup`` untimed rounds first (AdamW state, ``--compile``), then
``--repeats`` timed rounds; each step reports the median of its times. Interleaving makes a
drift of the machine's load hit every step alike (a shared CPU drifts a lot), and the
``ratio_to_kd_paired`` column (median over rounds of step/kd in the same round) cancels it.
The models are shared and so is one AdamW (its state is the same size whatever the loss);
each step first switches both models to the attention implementation it needs (outside the
timed region). On CUDA a step is timed on the device by a pair of ``torch.cuda.Event``s read
after a ``synchronize`` (so host syncs inside the step show up as device idle time); on CPU
by ``perf_counter``.

Memory: ``peak`` = everything resident before the step (both models' weights and buffers,
AdamW state) + the step's own high-water mark (``step MiB``). On CUDA that is
``torch.cuda.max_memory_allocated`` (reset before each step; max over the rounds). On CPU,
where no allocator keeps a resettable peak (RSS is polluted by glibc's caching and the
process's history), the step's high-water mark comes from one extra, untimed step under
``torch.profiler`` with ``profile_memory=True``: the maximum of the running sum of every CPU
tensor allocation and free during that step, plus the resident tensors' bytes. Both count
tensor bytes only (no allocator caching, no Python objects).

MFU (CUDA only) = tokens/s × (6·N_student + 2·N_teacher) / peak, N without embeddings (the
trainer's `_flops_per_token`), against both the card's dense bf16 peak from the trainer's
table and a bf16 matmul rate measured on the spot (8192³, the issue's reference did the same).

Host synchronisations inside a step (CUDA only) are counted with
``torch.cuda.set_sync_debug_mode("warn")`` over one extra step: the issue asks for none.

``--profile`` adds, per step, a torch.profiler breakdown by labelled ranges (the models'
forwards, sharp_core's capture / projection / loss functions, each prefixed by the phase
fwd/bwd/opt so the checkpoint's recompute in backward is told apart); sharp_core is wrapped
at run time only, never edited.

``checks`` in the JSON. With ``sharp_chunked`` selected, on the same captured q/k with the
objective switched between its two paths: the relative difference of each SHARP term, the
relative error of the projected maps P·Q, and the objective's own forward+backward time on
each path, measured alone and interleaved (SHARP's share of a step is below what whole-step
timings resolve on a loaded machine). With ``kd_separate`` and ``kd``: both steps' losses on
the same batch (a variant must change the cost, not the value) and the logit loss's own
forward+backward time, fused vs separate, measured alone the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ALL_STEPS",
    "PRESETS",
    "STEP_NAMES",
    "Preset",
    "main",
    "run_benchmark",
    "separate_logit_objective",
]

#: Steps run when ``--steps`` is not given, in this order.
STEP_NAMES: tuple[str, ...] = ("ce", "kd", "sharp", "eager")
#: Steps one may ask for with ``--steps``.
ALL_STEPS: tuple[str, ...] = (
    *STEP_NAMES,
    "sharp_chunked",
    "kd_separate",
    "kd_liger",
    "kd_compiled",
    "sharp_compiled",
)

STEP_DESCRIPTIONS = {
    "ce": "student cross-entropy only",
    "kd": "teacher fwd (inference mode) + student fwd/bwd, (1-a)CE + a*forward KL fused",
    "sharp": "kd + SHARP attention terms (default MethodSpec: SDPA capture, SDPA projection)",
    "eager": "kd + MSE on head-averaged maps, eager output_attentions",
    "sharp_chunked": "sharp with method.projection='chunked' (float32 reference)",
    "kd_separate": "kd with CE and D as two separate sharp_core.losses calls (before)",
    "kd_liger": "kd with Liger Kernel's fused linear CE + forward KL (CUDA)",
    "kd_compiled": "kd with torch.compile'd teacher and student",
    "sharp_compiled": "sharp with torch.compile'd teacher and student",
}

#: Weight a of the logit divergence in every step with a teacher (MethodSpec's default).
KD_WEIGHT = 0.9
#: The trainer's default gradient clipping (TrainingSpec.grad_clip).
GRAD_CLIP = 1.0


# --------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Shapes of one benchmark. Configs are transformers config dicts (with ``model_type``)."""

    name: str
    teacher: dict[str, Any]
    student: dict[str, Any]
    batch: int
    seq_len: int
    device: str  # default device
    amp: bool  # bf16 autocast on CUDA (the trainer's default precision)
    warmup: int
    repeats: int
    requires_cuda: bool = False
    hidden: bool = False
    targets: tuple[tuple[str, str, float], ...] = ()  # (metric, step, limit)
    note: str = ""


def _gpt2(layers: int, heads: int, hidden: int, vocab: int, positions: int) -> dict[str, Any]:
    # Dropout off: modern LM recipes train without it, and attention dropout would push SDPA
    # off its fused CPU/flash kernels in every step alike, which is not what we measure.
    return {
        "model_type": "gpt2",
        "n_layer": layers,
        "n_head": heads,
        "n_embd": hidden,
        "n_positions": positions,
        "vocab_size": vocab,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def _opt(layers: int, heads: int, hidden: int, ffn: int) -> dict[str, Any]:
    # As facebook/opt-*'s config.json (dropout 0.1, attention dropout 0, pre-LN, 2048 positions).
    return {
        "model_type": "opt",
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_size": hidden,
        "ffn_dim": ffn,
        "word_embed_proj_dim": hidden,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "do_layer_norm_before": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
    }


PRESETS: dict[str, Preset] = {
    "tiny-cpu": Preset(
        name="tiny-cpu",
        teacher=_gpt2(4, 8, 256, 4096, 256),
        student=_gpt2(2, 4, 128, 4096, 256),
        batch=8,
        seq_len=256,
        device="cpu",
        amp=False,
        warmup=2,
        repeats=7,
        targets=(("time_ratio", "sharp", 1.3),),
        note="GPT-2-shaped, vocab 4096: with GPT-2's 50k vocabulary the chunked logit losses "
        "would be nearly the whole CPU step and hide the attention path being measured",
    ),
    "opt-1.3b-125m": Preset(
        name="opt-1.3b-125m",
        teacher=_opt(24, 32, 2048, 8192),
        student=_opt(12, 12, 768, 3072),
        batch=8,
        seq_len=512,
        device="cuda",
        amp=True,
        warmup=5,
        repeats=20,
        requires_cuda=True,
        targets=(
            ("time_ratio", "sharp", 1.10),
            ("mem_ratio", "sharp", 1.10),
            ("mfu_min", "kd", 0.50),
        ),
        note="facebook/opt-1.3b and opt-125m shapes, random init, bf16 autocast",
    ),
    # Hidden: the test suite's preset (seconds, not minutes). Not listed in --help.
    "micro": Preset(
        name="micro",
        teacher=_gpt2(2, 4, 32, 128, 32),
        student=_gpt2(1, 2, 16, 128, 32),
        batch=2,
        seq_len=32,
        device="cpu",
        amp=False,
        warmup=1,
        repeats=2,
        hidden=True,
    ),
}


# --------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: recorded beside every number."""
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


# --------------------------------------------------------------------------------- models


def _model_spec(config: dict[str, Any]) -> Any:
    from sharp_core.spec import ModelSpec

    return ModelSpec(init="config", config=dict(config))


def _job_spec(preset: Preset, method: str, compile_: bool, projection: str = "sdpa") -> Any:
    """A real JobSpec so `_micro_step` reads the same MethodSpec defaults as a job would.

    ``projection`` is the one setting a step changes (``sharp_chunked``), through the spec,
    as a job would; every other field is the default."""
    from sharp_core.spec import DatasetSpec, JobSpec, MethodSpec, TrainingSpec

    return JobSpec(
        name=f"bench-{preset.name}-{method}",
        teacher=None if method == "sft" else _model_spec(preset.teacher),
        student=_model_spec(preset.student),
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

    from sharp_core.models import LocalResolver, load_model

    hf_logging.set_verbosity_error()  # config sanity warnings about random-init models
    resolver = LocalResolver()
    torch.manual_seed(0)
    teacher = load_model(
        _model_spec(preset.teacher), role="teacher", resolver=resolver, device=device
    )
    teacher.eval()
    teacher.requires_grad_(False)
    torch.manual_seed(1)
    student = load_model(
        _model_spec(preset.student), role="student", resolver=resolver, device=device
    )
    student.train()
    return teacher, student


def _non_embedding_params(model: nn.Module) -> int:
    from sharp_core.trainer import _flops_per_token

    return int(_flops_per_token(model, None) // 6)


def _shape(model: nn.Module) -> dict[str, Any]:
    from sharp_core.models import model_shape

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
        "non_embedding_params": _non_embedding_params(model),
        "dtype": str(p.dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------------- steps


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


class Runner:
    """One step kind: `forward` returns the loss; backward and the optimizer are common.

    Split so that the profiler can label forward / backward / optimizer phases, and so that
    every step kind runs exactly the same backward and optimizer code. `activate` puts the
    models in the attention implementation this step needs (steps are interleaved).
    """

    #: attention implementation both models must use for this step
    impl = "sdpa"

    def __init__(
        self,
        name: str,
        teacher: nn.Module,
        student: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        self.name = name
        self.device = device
        self.models = (teacher, student)
        self.opt = opt
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def activate(self) -> None:
        for m in self.models:
            _set_attention(m, self.impl)

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


class MicroStepRunner(Runner):
    """ce / kd / sharp (and their variants): the trainer's own `_micro_step` on a `Setup`.

    ``projection`` goes into the `MethodSpec` exactly as a job would set it. ``patches``
    (a context-manager factory) is entered around `_micro_step` only: the ``kd_separate``
    step uses it to swap the fused logit loss for the two separate calls.
    """

    def __init__(
        self,
        name: str,
        method: str,
        preset: Preset,
        teacher: nn.Module,
        student: nn.Module,
        opt: torch.optim.Optimizer,
        x: Tensor,
        device: torch.device,
        compile_: bool,
        projection: str = "sdpa",
        patches: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        from sharp_core.trainer import Setup

        super().__init__(name, teacher, student, opt, device)
        spec = _job_spec(preset, method, compile_, projection)
        objective = s_cap = t_cap = None
        if spec.method.uses_attention:
            from sharp_core.capture import ATTN_IMPLEMENTATION, AttentionCapture
            from sharp_core.models import model_shape
            from sharp_core.sharp import AttentionObjective

            objective = AttentionObjective(
                spec.method,
                student_shape=model_shape(student),
                teacher_shape=model_shape(teacher),
                seq_len=preset.seq_len,
            ).to(device)
            # Switches both models to the "sharp_capture" attention (SDPA + record).
            s_cap = AttentionCapture(student, objective.student_layers)
            t_cap = AttentionCapture(teacher, objective.teacher_layers)
            self.impl = ATTN_IMPLEMENTATION
        t_run = None if method == "sft" else _maybe_compile(teacher, compile_)
        s_run = _maybe_compile(student, compile_)
        self.S = Setup(
            spec,
            device,
            None,
            int(preset.student["vocab_size"]),
            t_run,
            s_run,
            None,
            objective,
            s_cap,
            t_cap,
        )  # type: ignore[arg-type]
        self.x = x
        self.a = spec.method.effective_kd_weight
        self.use_amp = device.type == "cuda" and preset.amp
        self.patches = patches

    def forward(self) -> Tensor:
        from sharp_core.trainer import _micro_step

        x = self.x
        n_tokens = x[:, 1:].numel()
        ctx = self.patches() if self.patches is not None else contextlib.nullcontext()
        with ctx:
            terms, _parts = _micro_step(
                self.S, x, n_tokens, x.shape[0], self.a, 1.0, self.use_amp, torch.bfloat16
            )
        return terms["loss"]

    def close(self) -> None:
        super().close()
        for cap in (self.S.student_capture, self.S.teacher_capture):
            if cap is not None:
                cap.clear()


class EagerRunner(Runner):
    """The baseline: eager attention, ``output_attentions=True``, MSE on head-averaged maps.

    The logit part is the `kd` step's (`losses.logit_objective`, same chunking, teacher under
    inference mode, no attention mask for the packed block), so the difference to `kd` is the
    attention part alone; it uses the same layer pairs as SHARP (uniform map, every student
    layer). Both models return *all* their layers' maps: that is what ``output_attentions``
    does, and its cost.
    """

    impl = "eager"

    def __init__(
        self,
        preset: Preset,
        teacher: nn.Module,
        student: nn.Module,
        opt: torch.optim.Optimizer,
        x: Tensor,
        device: torch.device,
        compile_: bool,
    ) -> None:
        from sharp_core.models import model_shape
        from sharp_core.sharp import layer_map
        from sharp_core.spec import MethodSpec

        super().__init__("eager", teacher, student, opt, device)
        self.teacher = _maybe_compile(teacher, compile_)
        self.student = _maybe_compile(student, compile_)
        l_s, _ = model_shape(student)
        l_t, _ = model_shape(teacher)
        self.pairs = list(enumerate(layer_map(l_s, l_t)))
        self.method = MethodSpec(name="kd")
        self.vocab = int(preset.student["vocab_size"])
        self.x = x
        self.use_amp = device.type == "cuda" and preset.amp

    def forward(self) -> Tensor:
        from sharp_core import losses

        x, V, m = self.x, self.vocab, self.method
        labels = x[:, 1:]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            with torch.inference_mode():
                t_out = self.teacher(input_ids=x, output_attentions=True)
            s_out = self.student(input_ids=x, output_attentions=True)
        loss, _ce, _d = losses.logit_objective(
            m.divergence,
            s_out.logits[:, :-1, :V],
            t_out.logits[:, :-1, :V],
            labels,
            kd_weight=m.effective_kd_weight,
            temperature=m.temperature,
            alpha=m.skew_alpha,
            beta=m.jsd_beta,
            num_valid=labels.numel(),
            chunk_size=m.logit_chunk,
        )
        attn = torch.zeros((), device=x.device)
        for js, jt in self.pairs:
            s_avg = s_out.attentions[js].float().mean(dim=1)  # (B, N, N)
            t_avg = t_out.attentions[jt].float().mean(dim=1)  # (B, N, N), an inference tensor
            attn = attn + F.mse_loss(s_avg, t_avg)
        return loss + attn / len(self.pairs)


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
    from sharp_core import losses

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


@contextlib.contextmanager
def separate_logit_losses() -> Iterator[None]:
    """`sharp_core.losses.logit_objective` replaced by `separate_logit_objective` (one step).

    Why a substitution rather than a copy of the old step: `_micro_step` looks the function
    up on the `losses` module at every call, so swapping that one attribute for the duration
    of the call times the trainer's very step — same forwards, slicing, capture, teacher
    under inference mode — with only the logit loss computed the old way, and nothing to
    drift out of date. The attribute is restored on exit, also on error.
    """
    from sharp_core import losses

    fused = losses.logit_objective
    # looked up here, at entry, so that `--profile`'s wrapper of this function is the one used
    losses.logit_objective = sys.modules[__name__].separate_logit_objective  # type: ignore[assignment]
    try:
        yield
    finally:
        losses.logit_objective = fused  # type: ignore[assignment]


class StepSkipped(Exception):
    """A step that cannot run on this machine (not an error: the run's exit status stays 0)."""


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

    def __init__(
        self,
        preset: Preset,
        teacher: nn.Module,
        student: nn.Module,
        opt: torch.optim.Optimizer,
        x: Tensor,
        device: torch.device,
        compile_: bool,
    ) -> None:
        why = liger_unavailable(device)
        if why is not None:
            raise StepSkipped(why)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        from sharp_core.spec import MethodSpec

        super().__init__("kd_liger", teacher, student, opt, device)
        m = MethodSpec(name="kd")
        if m.divergence != "forward_kl":
            raise StepSkipped(f"compares forward KL only, the default is {m.divergence!r}")
        # the decoders without their LM heads: final hidden states (B, N, H), norm included
        self.t_body = _maybe_compile(teacher.base_model, compile_)
        self.s_body = _maybe_compile(student.base_model, compile_)
        self.t_head = teacher.get_output_embeddings()
        self.s_head = student.get_output_embeddings()
        for head in (self.t_head, self.s_head):
            if getattr(head, "bias", None) is not None:
                raise StepSkipped("an LM head with a bias; the step passes weights only")
        self.a = m.effective_kd_weight
        self.tau = m.temperature
        self.ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
        self.kl = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=m.temperature)
        self.vocab = int(preset.student["vocab_size"])
        self.x = x
        self.use_amp = device.type == "cuda" and preset.amp

    def hidden(self) -> tuple[Tensor, Tensor, Tensor]:
        """(student hidden (T, H_s), teacher hidden (T, H_t), labels (T,)), T = B·(N−1)."""
        x = self.x
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            ce = self.ce(w_s, s_h, y)
            kl = self.kl(s_h, w_s, t_h, w_t, y)
        return (1 - self.a) * ce + self.a * self.tau**2 * kl

    def forward(self) -> Tensor:
        return self.loss(*self.hidden())


def compare_liger(runner: LigerKDRunner) -> dict[str, float]:
    """Liger's loss and student gradient against `losses.logit_objective` on the same rows.

    Relative difference of the value and of the gradient w.r.t. the student's final hidden
    states (the gradient sharp_core's path reaches through the LM head's matmul).
    """
    from sharp_core import losses
    from sharp_core.spec import MethodSpec

    m = MethodSpec(name="kd")
    s_h, t_h, y = runner.hidden()
    s_h = s_h.detach().requires_grad_(True)
    got = runner.loss(s_h, t_h, y)
    (g_got,) = torch.autograd.grad(got, s_h)
    V = runner.vocab
    with torch.autocast(runner.device.type, dtype=torch.bfloat16, enabled=runner.use_amp):
        s_logits = F.linear(s_h, runner.s_head.weight[:V])
        t_logits = F.linear(t_h, runner.t_head.weight[:V])
    ref, _, _ = losses.logit_objective(
        m.divergence,
        s_logits,
        t_logits,
        y,
        kd_weight=m.effective_kd_weight,
        temperature=m.temperature,
        num_valid=int((y != -100).sum()),
        chunk_size=m.logit_chunk,
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

    Why: as for the attention objective, the loss is a part of the step whose difference a
    loaded machine's whole-step timings blur; timed alone, interleaved, on the same logits
    (the runner's models, sliced as `_micro_step` slices them), it is resolved. The student's
    logits are a leaf, so backward stops there.
    """
    from sharp_core import losses

    S, x, dev, m = runner.S, runner.x, runner.device, runner.S.spec.method
    assert S.teacher is not None
    V = S.vocab
    runner.activate()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=runner.use_amp):
        t_logits = S.teacher(input_ids=x).logits[:, :-1, :V]
        s_logits = S.student(input_ids=x).logits[:, :-1, :V]
    s_logits = s_logits.detach().requires_grad_(True)
    labels = x[:, 1:]
    kw: dict[str, Any] = {
        "kd_weight": runner.a,
        "temperature": m.temperature,
        "alpha": m.skew_alpha,
        "beta": m.jsd_beta,
        "num_valid": labels.numel(),
        "chunk_size": m.logit_chunk,
    }

    def once(fn: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        loss, _ce, _d = fn(m.divergence, s_logits, t_logits, labels, **kw)
        loss.backward()
        _sync(dev)
        s_logits.grad = None
        return (time.perf_counter() - t0) * 1e3

    fused_fn, separate_fn = losses.logit_objective, separate_logit_objective
    once(fused_fn), once(separate_fn)  # warm-up
    fused, separate = [], []
    for _ in range(repeats):
        fused.append(once(fused_fn))
        separate.append(once(separate_fn))
    return {
        "fused_ms": statistics.median(fused),
        "separate_ms": statistics.median(separate),
        "separate_over_fused_paired": statistics.median(
            s / f for s, f in zip(separate, fused, strict=True)
        ),
        "repeats": repeats,
    }


def _set_attention(model: nn.Module, impl: str) -> None:
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


def _maybe_compile(model: nn.Module, compile_: bool) -> nn.Module:
    return torch.compile(model) if compile_ else model  # type: ignore[return-value]


# --------------------------------------------------- the two projection paths, side by side


@contextlib.contextmanager
def _projection(runner: MicroStepRunner, how: str) -> Iterator[None]:
    """The runner's objective switched to ``how`` ("sdpa" / "chunked") for a while.

    `AttentionObjective.forward` reads ``self.projection`` at every call: the same switch a
    spec's ``method.projection`` makes, with no patching of sharp_core.
    """
    obj = runner.S.objective
    assert obj is not None
    before = obj.projection
    obj.projection = how
    try:
        yield
    finally:
        obj.projection = before


def _captured(runner: MicroStepRunner) -> tuple[dict[int, Any], dict[int, Any]]:
    """Both models' captured q/k on the runner's batch (forwards as in `_micro_step`)."""
    S, x, dev = runner.S, runner.x, runner.device
    assert S.teacher is not None and S.student_capture is not None
    runner.activate()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=runner.use_amp):
        with S.teacher_capture:
            S.teacher(input_ids=x)
        with S.student_capture:
            S.student(input_ids=x)
    student, teacher = dict(S.student_capture.layers), dict(S.teacher_capture.layers)
    S.student_capture.clear()
    S.teacher_capture.clear()
    return student, teacher


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
    from sharp_core import sharp

    obj, x = runner.S.objective, runner.x
    assert obj is not None
    student, teacher = _captured(runner)
    valid = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        with _projection(runner, "chunked"):
            ref = obj(student, teacher, valid)
        with _projection(runner, "sdpa"):
            got = obj(student, teacher, valid)
        basis = sharp.dct_basis(x.shape[1], obj.rank, device=x.device)
        pq_err = {"student": 0.0, "teacher": 0.0}
        for side, layers in (("student", student), ("teacher", teacher)):
            for layer in layers.values():
                a = sharp.project(layer, basis, obj.query_chunk)
                b = sharp.project_sdpa(layer, basis)
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

    Why: SHARP's own cost is a few percent of a step, below what whole-step timings resolve
    on a loaded machine; timed alone (interleaved, same captured tensors) it is not. The
    student's captured q/k are detached into leaves that require grad, so backward stops at
    q/k (the model's projections' backward exists in every step anyway).
    """
    from sharp_core.capture import CapturedLayer

    obj, x, dev = runner.S.objective, runner.x, runner.device
    assert obj is not None
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

    def once(how: str) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        with _projection(runner, how):
            terms = obj(student, teacher, valid)
        sum(terms.values()).backward()
        _sync(dev)
        for c in student.values():
            c.query.grad = c.key.grad = None
        return (time.perf_counter() - t0) * 1e3

    once("chunked"), once("sdpa")  # warm-up
    chunked, sdpa = [], []
    for _ in range(repeats):
        chunked.append(once("chunked"))
        sdpa.append(once("sdpa"))
    return {
        "chunked_ms": statistics.median(chunked),
        "sdpa_ms": statistics.median(sdpa),
        "chunked_over_sdpa_paired": statistics.median(
            c / s for c, s in zip(chunked, sdpa, strict=True)
        ),
        "repeats": repeats,
    }


# --------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(runner: Runner) -> tuple[float, int | None, int | None]:
    """One step: (milliseconds, CUDA peak bytes, CUDA peak bytes above the step's start).

    CUDA: a pair of events around the step, read after a synchronize; the peak counter is
    reset just before, so it is this step's high-water mark (resident tensors included).
    CPU: perf_counter; memory is measured separately (`_cpu_step_peak_bytes`).
    """
    dev = runner.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        resident = torch.cuda.memory_allocated(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.step()
        end.record()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return start.elapsed_time(end), peak, peak - resident
    t0 = time.perf_counter()
    runner.step()
    return (time.perf_counter() - t0) * 1e3, None, None


def _resident_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages of the given modules' tensors and optimizers' state."""
    seen: set[tuple[int, str]] = set()
    total = 0

    def add(t: Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, Tensor):
            return
        st = t.untyped_storage()
        key = (st.data_ptr(), str(t.device))
        if key in seen or st.nbytes() == 0:
            return
        seen.add(key)
        total += st.nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in [*o.parameters(), *o.buffers()]:
                add(t)
                add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                for v in state.values():
                    add(v)
    return total


def _cpu_step_peak_bytes(runner: Runner) -> int:
    """High-water mark of tensor bytes allocated by one step above what was live before it.

    One extra, untimed step under ``torch.profiler`` with ``profile_memory=True``: every
    CPU allocation and free is an event with a signed byte count; their running sum in time
    order is the step's live-tensor total, whose maximum is the step's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() != torch._C._autograd.DeviceType.CPU:
            continue
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _count_host_syncs(runner: Runner) -> int:
    """Synchronising CUDA calls during one step, from torch's sync debug mode (CUDA only)."""
    torch.cuda.synchronize(runner.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def matmul_rate_bf16(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul rate (FLOP/s) of this card, n³ products, CUDA events."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    secs = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / secs


def _table_peak_flops(device: torch.device) -> float | None:
    from sharp_core.trainer import _peak_flops

    return _peak_flops(device)


# --------------------------------------------------------------------------------- profiling


#: (module path, attribute, label) of the sharp_core functions the profile wraps in ranges.
_PROFILED: tuple[tuple[str, str, str], ...] = (
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
def _instrumented(runner: Runner, teacher: nn.Module, student: nn.Module) -> Iterator[list[str]]:
    """Wrap sharp_core functions and the two models' forwards in profiler ranges.

    Labels are prefixed with the step's phase (``fwd:``/``bwd:``/``opt:``) at call time, so a
    function run again inside backward — the checkpoint's recompute of a chunk — is told
    apart from its forward call. Everything is restored on exit; sharp_core is not modified.
    """
    import importlib

    from torch.autograd.profiler import record_function

    from sharp_core.capture import CapturedLayer

    phase = ["fwd"]
    restore: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, label: str) -> None:
        orig = getattr(owner, attr)

        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"{phase[0]}:{label}"):
                return orig(*args, **kwargs)

        setattr(owner, attr, wrapper)
        restore.append((owner, attr, orig))

    for mod, attr, label in _PROFILED:
        wrap(importlib.import_module(mod), attr, label)
    # The kd_separate stand-in, in this very module (``__main__`` under ``python -m``).
    this = sys.modules[__name__]
    wrap(this, "separate_logit_objective", "bench.separate_logit_objective (CE, then D)")
    wrap(CapturedLayer, "probs", "CapturedLayer.probs (softmax rows)")
    objective = runner.S.objective if isinstance(runner, MicroStepRunner) else None
    if objective is not None:
        # An instance attribute shadows the class method for this one module.
        wrap(objective, "forward", "AttentionObjective.forward")

    stack: list[Any] = []
    handles = []
    for who, model in (("teacher", teacher), ("student", student)):

        def pre(_m: nn.Module, _a: Any, who: str = who) -> None:
            rf = record_function(f"{phase[0]}:{who}.forward")
            rf.__enter__()
            stack.append(rf)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            stack.pop().__exit__(None, None, None)

        handles += [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]

    orig_fwd, orig_bwd, orig_opt = runner.forward, runner.backward, runner.optimizer_step

    def phased(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            phase[0] = name
            with record_function(f"{name}:total"):
                return fn(*args)

        return run

    runner.forward = phased("fwd", orig_fwd)  # type: ignore[method-assign]
    runner.backward = phased("bwd", orig_bwd)  # type: ignore[method-assign]
    runner.optimizer_step = phased("opt", orig_opt)  # type: ignore[method-assign]
    try:
        yield phase
    finally:
        del runner.forward, runner.backward, runner.optimizer_step
        for h in handles:
            h.remove()
        for owner, attr, orig in reversed(restore):
            if owner is objective:
                delattr(owner, attr)  # back to the class method
            else:
                setattr(owner, attr, orig)


def profile_step(runner: Runner, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step inside each labelled range (inclusive of nested ranges).

    CPU: host time (which is the compute time there). CUDA: device time of the kernels
    launched inside each range.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    teacher, student = runner.models
    with _instrumented(runner, teacher, student), profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step()
        _sync(runner.device)
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ":" not in ev.key or ev.key.split(":", 1)[0] not in ("fwd", "bwd", "opt"):
            continue
        us = ev.device_time_total if runner.device.type == "cuda" else ev.cpu_time_total
        out[ev.key] = round(us / 1e3 / steps, 3)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------- the run


@dataclass
class StepResult:
    name: str
    description: str
    ms: list[float] = field(default_factory=list)
    ms_median: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mib: float | None = None
    step_mem_mib: float | None = None
    mfu_table: float | None = None
    mfu_measured: float | None = None
    host_syncs: int | None = None
    ratio_to_kd: float | None = None
    ratio_to_kd_paired: float | None = None
    mem_ratio_to_kd: float | None = None
    profile: dict[str, float] | None = None
    error: str | None = None
    skipped: str | None = None  # why the step cannot run on this machine (not an error)


def _make_runner(
    name: str,
    preset: Preset,
    teacher: nn.Module,
    student: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    device: torch.device,
    compile_: bool,
) -> Runner:
    methods = {
        "ce": "sft",
        "kd": "kd",
        "sharp": "sharp",
        "sharp_chunked": "sharp",
        "kd_separate": "kd",
        "kd_compiled": "kd",
        "sharp_compiled": "sharp",
    }
    if name in methods:
        return MicroStepRunner(
            name,
            methods[name],
            preset,
            teacher,
            student,
            opt,
            x,
            device,
            compile_ or name.endswith("_compiled"),
            projection="chunked" if name == "sharp_chunked" else "sdpa",
            patches=separate_logit_losses if name == "kd_separate" else None,
        )
    if name == "eager":
        return EagerRunner(preset, teacher, student, opt, x, device, compile_)
    if name == "kd_liger":
        return LigerKDRunner(preset, teacher, student, opt, x, device, compile_)
    raise ValueError(f"unknown step {name!r}; choose from {', '.join(ALL_STEPS)}")


def _targets(preset: Preset, results: dict[str, StepResult]) -> list[dict[str, Any]]:
    out = []
    for metric, step, limit in preset.targets:
        r = results.get(step)
        value: float | None = None
        if r is not None and r.error is None:
            if metric == "time_ratio":
                value = r.ratio_to_kd
            elif metric == "mem_ratio":
                value = r.mem_ratio_to_kd
            elif metric == "mfu_min":
                value = r.mfu_table if r.mfu_table is not None else r.mfu_measured
        paired = r.ratio_to_kd_paired if r is not None and metric == "time_ratio" else None
        met = None if value is None else (value >= limit if metric == "mfu_min" else value <= limit)
        out.append(
            {
                "metric": metric,
                "step": step,
                "limit": limit,
                "value": value,
                "value_paired": paired,
                "met": met,
            }
        )
    return out


def run_benchmark(
    preset_name: str,
    *,
    steps: tuple[str, ...] = STEP_NAMES,
    repeats: int | None = None,
    warmup: int | None = None,
    compile_: bool = False,
    profile: bool = False,
    device: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run the benchmark and return the JSON document (see the module docstring)."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}")
    preset = PRESETS[preset_name]
    dev = torch.device(device or preset.device)
    if preset.requires_cuda and dev.type != "cuda":
        raise RuntimeError(
            f"preset {preset.name!r} needs a CUDA GPU (bf16 autocast, "
            f"its shapes); --device {dev} is not one"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"preset {preset.name!r} needs a CUDA GPU and none is available "
            f"(torch {torch.__version__}); run it on a GPU machine, or use --preset tiny-cpu"
        )
    repeats = preset.repeats if repeats is None else repeats
    warmup = preset.warmup if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    for s in steps:
        if s not in ALL_STEPS:
            raise ValueError(f"unknown step {s!r}; choose from {', '.join(ALL_STEPS)}")

    log(f"building models for {preset.name} on {dev} ...")
    teacher, student = build_models(preset, dev)
    opt = make_optimizer(student, dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(
        0, int(preset.student["vocab_size"]), (preset.batch, preset.seq_len), generator=gen
    ).to(dev)
    tokens = preset.batch * preset.seq_len

    from sharp_core.trainer import _flops_per_token

    flops_per_token = _flops_per_token(student, teacher)
    lm_head = (
        6 * student.get_output_embeddings().weight.numel()
        + 2 * teacher.get_output_embeddings().weight.numel()
    )
    peak_table = _table_peak_flops(dev)
    peak_measured = matmul_rate_bf16(dev) if dev.type == "cuda" else None

    results = {name: StepResult(name, STEP_DESCRIPTIONS[name]) for name in steps}
    runners: dict[str, Runner] = {}
    peaks: dict[str, list[int]] = {name: [] for name in steps}
    step_peaks: dict[str, list[int]] = {name: [] for name in steps}

    def fail(name: str, e: BaseException) -> None:
        if isinstance(e, torch.OutOfMemoryError):
            results[name].error = f"out of memory: {str(e).splitlines()[0]}"
        else:
            results[name].error = f"{type(e).__name__}: {e}"
        r = runners.pop(name, None)
        if r is not None:
            r.close()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    for name in steps:
        try:
            runners[name] = _make_runner(name, preset, teacher, student, opt, x, dev, compile_)
        except StepSkipped as e:
            results[name].skipped = str(e)
            log(f"skipping {name}: {e}")
        except Exception as e:  # noqa: BLE001 - one failing step must not hide the others
            fail(name, e)

    # Interleaved rounds (ce, kd, sharp, eager, ce, kd, ...): a change of machine load or
    # clock during the run hits every step alike instead of one block of repeats, which
    # matters for the ratios on a shared CPU. Warm-up rounds first (AdamW state, compile).
    for rnd in range(warmup + repeats):
        timed = rnd >= warmup
        log(
            f"{'round' if timed else 'warm-up'} {rnd - warmup + 1 if timed else rnd + 1}"
            f"/{repeats if timed else warmup}"
        )
        for name in list(runners):
            runner = runners[name]
            try:
                runner.activate()
                ms, peak, above = _timed_step(runner)
            except Exception as e:  # noqa: BLE001
                fail(name, e)
                continue
            if timed:
                results[name].ms.append(ms)
                if peak is not None and above is not None:
                    peaks[name].append(peak)
                    step_peaks[name].append(above)

    for name in list(runners):
        runner, res = runners[name], results[name]
        try:
            runner.activate()
            if dev.type == "cuda":
                peak, step_mem = max(peaks[name]), max(step_peaks[name])
                res.host_syncs = _count_host_syncs(runner)
            else:
                runner.close()
                gc.collect()
                resident = _resident_bytes(teacher, student, opt)
                step_mem = _cpu_step_peak_bytes(runner)
                peak = resident + step_mem
            res.peak_mem_mib = round(peak / 2**20, 1)
            res.step_mem_mib = round(step_mem / 2**20, 1)
            res.ms_median = statistics.median(res.ms)
            res.tokens_per_s = tokens / (res.ms_median / 1e3)
            if dev.type == "cuda":
                # ce runs no teacher forward: 6·N_student only.
                fpt = flops_per_token if name != "ce" else _flops_per_token(student, None)
                if peak_table:
                    res.mfu_table = res.tokens_per_s * fpt / peak_table
                if peak_measured:
                    res.mfu_measured = res.tokens_per_s * fpt / peak_measured
            if profile:
                log(f"profiling {name}")
                res.profile = profile_step(runner)
            runner.close()
        except Exception as e:  # noqa: BLE001
            fail(name, e)

    checks: dict[str, Any] = {}
    chunked = runners.get("sharp_chunked")
    if isinstance(chunked, MicroStepRunner):
        # on the chunked step's own objective, switched between the two paths and restored
        try:
            checks["projection_term_rel_diff"] = compare_projection_terms(chunked)
            checks["objective_fwd_bwd"] = time_objective(chunked, max(5, repeats))
        except Exception as e:  # noqa: BLE001
            checks["projection_error"] = f"{type(e).__name__}: {e}"
        chunked.close()
    separate, kd_runner = runners.get("kd_separate"), runners.get("kd")
    if isinstance(separate, MicroStepRunner) and isinstance(kd_runner, MicroStepRunner):
        try:
            checks["kd_separate_vs_kd"] = compare_losses(kd_runner, separate)
            checks["logit_fwd_bwd"] = time_logit_losses(kd_runner, max(5, repeats))
        except Exception as e:  # noqa: BLE001
            checks["kd_separate_error"] = f"{type(e).__name__}: {e}"
    liger = runners.get("kd_liger")
    if isinstance(liger, LigerKDRunner):
        try:
            checks["liger_vs_logit_objective"] = compare_liger(liger)
        except Exception as e:  # noqa: BLE001
            checks["liger_error"] = f"{type(e).__name__}: {e}"

    kd = results.get("kd")
    if kd is not None and kd.ms_median:
        for r in results.values():
            if r.ms_median is not None:
                r.ratio_to_kd = r.ms_median / kd.ms_median
            if r.ms and len(r.ms) == len(kd.ms):
                # Median over rounds of this step's time / kd's time in the same round: the
                # steps of a round run back to back, so a slow drift of the machine's load
                # cancels in each quotient (a shared CPU drifts a lot).
                r.ratio_to_kd_paired = statistics.median(
                    t / k for t, k in zip(r.ms, kd.ms, strict=True)
                )
            if r.peak_mem_mib is not None and kd.peak_mem_mib:
                r.mem_ratio_to_kd = r.peak_mem_mib / kd.peak_mem_mib

    return {
        "benchmark": "bench.step",
        "schema": 2,
        "command": command,
        "preset": {
            "name": preset.name,
            "note": preset.note,
            "batch": preset.batch,
            "seq_len": preset.seq_len,
            "tokens_per_step": tokens,
            "device": str(dev),
            "autocast": "bf16" if dev.type == "cuda" and preset.amp else None,
            "compile": compile_,
            "warmup": warmup,
            "repeats": repeats,
            "teacher": _shape(teacher),
            "student": _shape(student),
            "method": _job_spec(preset, "sharp", compile_).method.model_dump(mode="json"),
        },
        "machine": machine_info(dev),
        "timing": "cuda events, median" if dev.type == "cuda" else "perf_counter, median",
        "memory": (
            "torch.cuda.max_memory_allocated over the timed steps (tensor bytes)"
            if dev.type == "cuda"
            else "resident tensors (weights, buffers, AdamW state) + one extra step's peak of "
            "live tensor bytes from torch.profiler(profile_memory=True)"
        ),
        "flops_per_token": {
            "non_embedding": flops_per_token,
            "with_lm_head": flops_per_token + lm_head,
        },
        "peak_flops": {"table": peak_table, "measured_bf16_matmul": peak_measured},
        "steps": [r.__dict__ for r in results.values()],
        "targets": _targets(preset, results),
        "checks": checks,
    }


# --------------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v * scale, spec)


def render_table(doc: dict[str, Any], file: Any = None) -> None:
    """Print the results as a rich table (plain text when the output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    p, m = doc["preset"], doc["machine"]
    where = (
        m["gpu"] or f"{m['cpu']} ({m['cpus_usable']} usable cores, {m['torch_threads']} threads)"
    )
    t = p["teacher"]
    s = p["student"]
    title = (
        f"{p['name']}: teacher {t['layers']}x{t['heads']}x{t['hidden']}, student "
        f"{s['layers']}x{s['heads']}x{s['hidden']}, vocab {s['vocab']}, batch {p['batch']} x "
        f"{p['seq_len']}, {p['device']}{', bf16 autocast' if p['autocast'] else ''}"
        f"{', compiled' if p['compile'] else ''}; median of {p['repeats']} "
        f"after {p['warmup']} warm-up"
    )
    table = Table(
        title=title, caption=f"{where}; torch {m['torch']}, transformers {m['transformers']}"
    )
    cols = [
        "step",
        "ms/step",
        "tokens/s",
        "peak MiB",
        "step MiB",
        "MFU table",
        "MFU meas.",
        "x kd time",
        "x kd paired",
        "x kd mem",
        "syncs",
    ]
    for c in cols:
        table.add_column(c, justify="left" if c == "step" else "right")
    for r in doc["steps"]:
        if r["error"]:
            table.add_row(r["name"], f"[red]{r['error'][:80]}[/red]", *[""] * (len(cols) - 2))
            continue
        if r.get("skipped"):
            table.add_row(r["name"], f"skipped: {r['skipped'][:100]}", *[""] * (len(cols) - 2))
            continue
        table.add_row(
            r["name"],
            _fmt(r["ms_median"], ".1f"),
            _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["peak_mem_mib"], ",.0f"),
            _fmt(r["step_mem_mib"], ",.0f"),
            _fmt(r["mfu_table"], ".1%"),
            _fmt(r["mfu_measured"], ".1%"),
            _fmt(r["ratio_to_kd"], ".3f"),
            _fmt(r["ratio_to_kd_paired"], ".3f"),
            _fmt(r["mem_ratio_to_kd"], ".3f"),
            "-" if r["host_syncs"] is None else str(r["host_syncs"]),
        )
    console.print(table)
    pf = doc["peak_flops"]
    if pf["table"] or pf["measured_bf16_matmul"]:
        console.print(
            f"FLOP/token {doc['flops_per_token']['non_embedding'] / 1e9:.3f} G (non-embedding; "
            f"{doc['flops_per_token']['with_lm_head'] / 1e9:.3f} G with the LM heads); peak "
            f"bf16: table {_fmt(pf['table'], '.0f', 1e-12)} TFLOP/s, measured "
            f"{_fmt(pf['measured_bf16_matmul'], '.0f', 1e-12)} TFLOP/s"
        )
    for tg in doc["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[tg["met"]]
        paired = (
            f" (paired per round: {_fmt(tg['value_paired'], '.3f')})"
            if tg.get("value_paired") is not None
            else ""
        )
        console.print(
            f"target {tg['metric']} of {tg['step']} "
            f"{'>=' if tg['metric'] == 'mfu_min' else '<='} {tg['limit']}: "
            f"{_fmt(tg['value'], '.3f')}{paired} -> {verdict}"
        )
    for name, check in doc.get("checks", {}).items():
        console.print(f"check {name}: {check}")
    for r in doc["steps"]:
        if r.get("profile"):
            prof = r["profile"]
            step_ms = sum(prof.get(f"{ph}:total", 0.0) for ph in ("fwd", "bwd", "opt"))
            pt = Table(title=f"profile of '{r['name']}' (per step, inclusive of nested ranges)")
            pt.add_column("range")
            pt.add_column("ms", justify="right")
            pt.add_column("share of step", justify="right")
            for k, v in prof.items():
                pt.add_row(k, f"{v:.2f}", f"{v / step_ms:.1%}" if step_ms else "-")
            console.print(pt)


def _parse_steps(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in ALL_STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown step(s) {bad or text!r}; choose from {', '.join(ALL_STEPS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    visible = [k for k, p in PRESETS.items() if not p.hidden]
    ap = argparse.ArgumentParser(
        prog="python -m bench.step",
        description="Time ce / kd / sharp / eager distillation steps side by side.",
    )
    ap.add_argument(
        "--preset", required=True, choices=list(PRESETS), metavar="{" + ",".join(visible) + "}"
    )
    ap.add_argument(
        "--json",
        action="store_true",
        help="print the JSON document on stdout (the table goes to stderr)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument(
        "--steps",
        type=_parse_steps,
        default=STEP_NAMES,
        help=f"comma list of {','.join(ALL_STEPS)} (default {','.join(STEP_NAMES)})",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing, a torch.profiler breakdown of each step by range",
    )
    ap.add_argument("--device", default=None, help="override the preset's device")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a CPU shared with other "
        "jobs use 1: OpenMP barriers spin on descheduled threads and a 2-thread "
        "step can run 50x slower than a 1-thread one",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        doc = run_benchmark(
            args.preset,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            compile_=args.compile,
            profile=args.profile,
            device=args.device,
            command=" ".join(
                ["python -m bench.step", *(argv if argv is not None else sys.argv[1:])]
            ),
            log=log,
        )
    except (RuntimeError, ValueError) as e:
        print(f"bench.step: {e}", file=sys.stderr)
        return 2
    if args.json:
        render_table(doc, file=sys.stderr)
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render_table(doc)
    return 0 if all(r["error"] is None for r in doc["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
