"""Time one optimizer step of each distillation method side by side (issue 5, "Must have" 1).

    python -m bench.step --preset tiny-cpu [--json] [--repeats N] [--warmup N]
                         [--steps ce,kd,kd_onpolicy,sharp,eager] [--compile] [--profile] [--device DEV]
                         [--threads N]

Steps (each a *full* optimizer step: forward, backward, gradient clipping at 1.0 as the trainer
does, AdamW, ``zero_grad(set_to_none=True)``), all on the same random-initialised models and
the same random batch:

* ``ce``    student cross-entropy only (the trainer's ``sft`` path).
* ``kd``    teacher forward under inference mode + student forward/backward,
            (1−a)·CE + a·forward KL in one fused pass (`losses.logit_objective`; the trainer's
            ``kd`` path, a = 0.9). Every ratio is relative to this step.
* ``kd_onpolicy`` the ``kd`` step on the student's own samples (issue 15, λ = 1): the
            student continues the batch's first N − T tokens for T = min(64, N/2) tokens with
            its KV cache (`sharp_core.train.onpolicy.generate`: inference mode, eval mode, the
            training dtype), then the trainer's micro-step on the (B, N) generated sequences
            with the prompt masked (`sharp_core.train.onpolicy.loss_mask`), a = 1 as the trainer
            uses for student samples. Its ratio to ``kd`` is the price of a generated batch.
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
            fused loss: the trainer's micro-step runs with `separate_logit_objective` as its
            logit loss (handed to `sharp_core.train.step.micro_step` as ``Setup.logit_loss``).
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

Why the steps go through the trainer's micro-step with a hand-built `Setup` (all but
``eager`` and ``kd_liger``, which have no trainer path) instead of re-implementing the losses:
the benchmark must time the code that trains, not a look-alike; the variants change only what
a spec setting (``projection``) or the logit loss handed to the step changes. Data loading and
tokenisation (not part of a step) are left out: the batch is random token ids, the models are
built from configs (no downloads) with ``sharp_core.models.loading.load_model``, so they get the
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
trainer's flops per token), against both the card's dense bf16 peak from the trainer's
table and a bf16 matmul rate measured on the spot (8192³, the issue's reference did the same).

Host synchronisations inside a step (CUDA only) are counted with
``torch.cuda.set_sync_debug_mode("warn")`` over one extra step: the issue asks for none.

``--profile`` adds, per step, a torch.profiler breakdown by labelled ranges (the models'
forwards, sharp_core's public projection / loss functions, the attention objective and the
step's logit loss, each prefixed by the phase fwd/bwd/opt so the checkpoint's recompute in
backward is told apart); sharp_core is wrapped at run time only, never edited
(`bench.step.profiling.instrumented`).

``checks`` in the JSON. With ``sharp_chunked`` selected, on the same captured q/k, with the
objective built once per path (``method.projection``): the relative difference of each SHARP
term, the relative error of the projected maps P·Q, and the objective's own forward+backward
time on each path, measured alone and interleaved (SHARP's share of a step is below what whole-step
timings resolve on a loaded machine). With ``kd_separate`` and ``kd``: both steps' losses on
the same batch (a variant must change the cost, not the value) and the logit loss's own
forward+backward time, fused vs separate, measured alone the same way.

Modules: `presets` (shapes), `models` (spec, models, optimizer, the shared `Workload`),
`runners` (one module per family of step), `timing` and `memory` (the measurements),
`checks` (before vs after on the same tensors), `profiling` (``--profile``), `run` (one run,
the JSON document), `report` (the table), `cli` (the command line). Only sharp_core's public
names are used (`sharp_core.train.step.micro_step` on a `sharp_core.train.setup.Setup`,
`sharp_core.train.perf`, `sharp_core.objectives.sharp.make_attention_objective`, `sharp_core.objectives.losses`), so a
refactor of its internals cannot break the benchmark (issue 13).
"""

from bench.step.cli import main
from bench.step.presets import PRESETS, Preset
from bench.step.run import run_benchmark
from bench.step.runners import ALL_STEPS, STEP_NAMES
from bench.step.runners.trainer import separate_logit_objective

__all__ = [
    "ALL_STEPS",
    "PRESETS",
    "STEP_NAMES",
    "Preset",
    "main",
    "run_benchmark",
    "separate_logit_objective",
]
