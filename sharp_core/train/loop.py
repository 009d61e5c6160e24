"""The one training loop for every method (SFT, the logit baselines, TinyBERT, MiniLM, SHARP).

`train` reads top to bottom like a short training script (nanoGPT's ``train.py``): set-up,
then per step  set LR → maybe eval / checkpoint → micro-steps → clip → step → zero_grad → log.
Methods differ only in the terms `sharp_core.train.step.micro_step` computes; there are no
per-method copies of the loop. The pieces it calls live beside it:

* `sharp_core.train.setup`: `setup` loads and validates models, tokenizer and data before anything
  is written to ``out_dir`` (a bad spec leaves nothing half-written);
* `sharp_core.train.step`: `micro_step` (the objective on one micro-batch), the per-term backward;
* `sharp_core.train.state`: the loop's state, the `Checkpointer` (sharded, saved in the background) and `resume`;
* `sharp_core.evaluate.perplexity`: `evaluate`, the one held-out loop (also behind `perplexity`);
* `sharp_core.train.perf`: tokens/s, MFU and peak memory for the step line.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from sharp_core.cache import teacher_cache
from sharp_core.data.loading import ClassificationData, PackedData
from sharp_core.errors import DataError, OutOfMemoryError, PreflightError
from sharp_core.evaluate.perplexity import evaluate, evaluate_sets
from sharp_core.models.loading import LocalResolver, Resolver
from sharp_core.spec import JobSpec
from sharp_core.train import distributed
from sharp_core.train.checkpoint import latest_checkpoint, verify_manifest
from sharp_core.train.downstream import Downstream, confiner, score_store
from sharp_core.train.onpolicy import OnPolicy
from sharp_core.train.perf import Throughput, flops_per_token, peak_mem_mb
from sharp_core.train.setup import Setup, autocast_dtype, setup
from sharp_core.train.state import (
    SPEC_FILE,
    STATE_FILE,
    Checkpointer,
    TrainState,
    resume,
)
from sharp_core.train.step import backward_per_term, micro_step, next_batch, step_counts

__all__ = [
    "SPEC_FILE",
    "STATE_FILE",
    "LocalResolver",
    "Resolver",
    "Setup",
    "TrainCallbacks",
    "TrainResult",
    "attention_scale_at",
    "latest_checkpoint",
    "lr_at",
    "setup",
    "train",
    "verify_manifest",
]


class TrainCallbacks:
    """Hooks the service (or the CLI) overrides. Defaults do nothing."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Called every `log_every` steps and after each evaluation."""

    def on_checkpoint(self, step: int, path: Path, manifest: dict[str, Any]) -> None:
        """Called once a checkpoint folder is atomically in place."""

    def on_checkpoint_removed(self, step: int) -> None:
        """Called when an old checkpoint is pruned (keep_checkpoints)."""

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """A one-off fact about the run for the job's event log (e.g. 'pruned')."""

    def should_stop(self) -> bool:
        """Polled every step; True → the loop checkpoints and returns status 'stopped'."""
        return False

    def on_teacher(self, data: dict[str, Any]) -> None:
        """The teacher's identity at the start of a fresh run: ``digest`` (sha256 of its
        weights and config), ``teacher_params``, ``student_params`` (the service records it:
        the leaderboard of a teacher's students)."""


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped"
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def cache_store(resolver: Resolver | None, out_dir: Path) -> teacher_cache.CacheStore:
    """The resolver's teacher-cache store (the service: the team's, in the artifact store),
    else a ``teacher-caches`` folder beside the run's folder (runs side by side share it)."""
    get = getattr(resolver, "teacher_cache_store", None)
    store = get() if get is not None else None
    return store or teacher_cache.LocalCacheStore(out_dir.parent / "teacher-caches")


def data_cache_store(resolver: Resolver | None, out_dir: Path) -> Any:
    """The resolver's tokenized-data store (the service: the team's, in the artifact store),
    else a ``data-caches`` folder beside the run's folder (runs side by side share it)."""
    get = getattr(resolver, "data_cache_store", None)
    store = get() if get is not None else None
    return store or teacher_cache.LocalCacheStore(out_dir.parent / "data-caches")


# ---------------------------------------------------------------------------- schedules


def lr_at(step: int, spec: JobSpec) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio·lr at max_steps."""
    t = spec.training
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def attention_scale_at(step: int, spec: JobSpec) -> float:
    """s(t): multiplier on the attention terms (constant, or annealed to 0)."""
    m = spec.method
    if m.attention_schedule == "constant":
        return 1.0
    horizon = max(1, round(m.attention_anneal_fraction * spec.training.max_steps))
    x = min(1.0, step / horizon)
    if m.attention_schedule == "linear_decay":
        return 1.0 - x
    return 0.5 * (1 + math.cos(math.pi * x))


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: no clipping); the total gradient norm before clipping."""
    sharded = [p for p in params if isinstance(p.grad, DTensor)]
    if sharded:  # an FSDP student (DTensor grads) beside the objective's plain ones
        plain = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
        grads = [p.grad for p in sharded if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).full_tensor()  # type: ignore[attr-defined]
        if plain:
            rest = torch.nn.utils.get_total_norm([p.grad for p in plain if p.grad is not None])
            norm = torch.linalg.vector_norm(torch.stack([norm, rest.to(norm.device)]))
        if max_norm > 0:
            for group in (sharded, plain) if plain else (sharded,):
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
        return norm
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in params if p.grad is not None])
    )


# ---------------------------------------------------------------------------- the loop


def train(
    spec: JobSpec,
    out_dir: Path | str,
    *,
    callbacks: TrainCallbacks | None = None,
    resolver: Resolver | None = None,
    device: str | None = None,
    prepared: Setup | None = None,
) -> TrainResult:
    """Train (or resume) the job described by `spec`, writing checkpoints under `out_dir`."""
    out_dir = Path(out_dir)
    ctx = distributed.context()  # single process unless started by torchrun
    ctx.check(spec)
    cb = ctx.callbacks(callbacks or TrainCallbacks())  # under torchrun: rank 0 reports
    t, m = spec.training, spec.method
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    try:
        S = prepared or setup(
            spec, resolver=resolver, device=device, data_store=data_cache_store(resolver, out_dir)
        )
    except PreflightError as e:  # the findings beside the error, in the job's events
        cb.on_event("preflight", {"findings": e.findings, "fatal": e.code})
        raise
    if S.preflight:
        cb.on_event("preflight", {"findings": S.preflight, "fatal": None})
    if m.teacher_cache.mode != "off" and S.teacher_cache is None:  # build or read it first
        S = teacher_cache.attach(S, cache_store(resolver, out_dir), cb.on_event, ctx)
    if isinstance(S.data, PackedData) and S.data.info:  # built, read from the cache, in memory
        cb.on_event("tokenized_data", dict(S.data.info))
    model, teacher = S.student, S.teacher  # unwrapped: under torchrun S gets DDP / FSDP ones
    # the teacher's identity (leaderboards, teacher scores): hashed before any sharding
    t_digest = (
        teacher_cache.teacher_digest(teacher) if teacher is not None and ctx.rank == 0 else None
    )
    S = ctx.prepare(S)
    dev, amp = S.device, autocast_dtype(spec, S.device)  # amp: bf16 / fp16 on CUDA, or None
    classify = isinstance(S.data, ClassificationData)
    params = [p for p in model.parameters() if p.requires_grad]  # the student's
    extra = [p for p in (S.objective.parameters() if S.objective else []) if p.requires_grad]
    state = TrainState.start(S, params, extra, ctx, amp)  # step 0: AdamW, scaler, data stream
    if m.on_policy is not None:  # generated batches: its RNG and replay buffer are state too
        state.onpolicy = OnPolicy(spec, ctx.rank, ctx.world_size, ctx.gather_objects)
        eos, pad = S.tokenizer.eos_token_id, S.tokenizer.pad_token_id
        state.onpolicy.eos_id = eos
        state.onpolicy.pad_id = int(pad if pad is not None else eos or 0)
        data = S.data
        prompted = isinstance(data, PackedData) and data.packing == "documents" and data.masked
        if prompted and m.on_policy.adaptive:
            raise DataError(
                "adaptive on-policy (replay) is not available for conversations or "
                "prompt/completion data yet: use adaptive: false",
                param="spec.method.on_policy.adaptive",
            )
    opt, scaler = state.optimizer, state.scaler
    ckpt = Checkpointer(out_dir, S, ctx, cb)  # saves in the background; reports when committed
    last_ckpt = resume(out_dir, S, state, model, ctx, ckpt.group)  # newest verified, if any
    resumed_step = state.step if last_ckpt is not None else None
    # Evaluation runs on the wrapped student (FSDP needs every rank in every forward): each
    # rank takes its share of the blocks at the per-rank batch, the sums are all-reduced, and
    # every rank gets the single-process metrics; rank 0 reports. The held-out tail gives
    # eval_*, the named evaluation sets val_* and test_*.
    eval_kw: dict[str, Any] = dict(
        vocab=S.vocab,
        batch_size=t.batch_size // ctx.world_size,
        device=dev,
        amp_dtype=amp,
        ranks=ctx,
    )
    run_eval = functools.partial(evaluate, S.student, S.data, **eval_kw)
    run_eval_sets = functools.partial(evaluate_sets, S.student, S.eval_sets, **eval_kw)
    last_metrics: dict[str, float] = {}
    if S.build_seconds and resumed_step is None:  # at step 0, beside the first evaluation
        cb.on_metrics(0, dict(S.build_seconds))
    if t_digest is not None and teacher is not None and resumed_step is None:
        n_params = {
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in model.parameters()),
        }
        on_teacher = getattr(cb, "on_teacher", None)  # not an event: the service keeps it
        if on_teacher is not None:
            on_teacher({"digest": t_digest, **n_params})
    # harness tasks and answer quality (single process: the harness drives whole models)
    downstream = Downstream(
        spec,
        student=model,
        teacher=teacher,
        tokenizer=S.tokenizer,
        device=dev,
        teacher_digest=t_digest,
        store=score_store(resolver, out_dir),
        on_event=cb.on_event,
        confine=confiner(resolver),
    )
    if downstream.enabled and (ctx.world_size > 1 or classify):
        why = "multi-GPU jobs" if ctx.world_size > 1 else "sequence_classification jobs"
        cb.on_event(
            "evaluation_failed",
            {
                "code": "evaluation_failed",
                "message": f"spec.evaluation is not run in {why}: evaluate the checkpoint with "
                "an evaluation job",
                "param": "spec.evaluation",
            },
        )
        downstream.ev = spec.evaluation.model_copy(update={"harness": None, "generation": None})
    if S.pruned is not None and resumed_step is None:  # what pruning kept, before any step
        cb.on_event("pruned", S.pruned.event())
        cb.on_metrics(0, S.pruned.metrics())
    pcgrad = m.conflict == "pcgrad"
    model.train()
    meter = Throughput(
        dev, flops_per_token(model, teacher), world_size=ctx.world_size, log_every=t.log_every
    )

    while True:
        step = state.step
        # ---- set LR
        lr = lr_at(step, spec)
        for g in opt.param_groups:
            g["lr"] = lr
        done = step >= t.max_steps
        stop = not done and cb.should_stop()

        # ---- maybe eval / checkpoint (the state after `step` optimizer steps)
        due = bool(t.eval_every) and step % t.eval_every == 0
        if done or ((due or (step == 0 and S.pruned)) and step != resumed_step):
            ev = {**run_eval(), **run_eval_sets()}
            if downstream.due(final=done):  # harness scores, answer quality, retained %
                ev.update(downstream.run(step, final=done))
            if state.onpolicy is not None:
                state.onpolicy.observe_eval(ev)  # adaptive: p rises with the eval loss
            last_metrics.update(ev)
            cb.on_metrics(step, ev)
        periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0 and step > 0
        ckpt.poll()  # a background save that has committed is reported now
        # a resumed step already has its checkpoint on disk; everything else that is due gets one
        if (periodic or done or stop) and (step != resumed_step or last_ckpt is None):
            last_ckpt = ckpt.save(state, model, dict(last_metrics))
        if done or stop:
            ckpt.close()  # the last save is written, committed and reported before returning
            return TrainResult("completed" if done else "stopped", step, last_ckpt, last_metrics)

        # ---- micro-steps: forward, loss, backward; gradients accumulate over grad_accum
        batches = [next_batch(S, state.stream, t.batch_size) for _ in range(t.grad_accum)]  # (B, N)
        kind, a = "data", None  # on-policy: maybe generated or replayed (B, P+T) sequences
        if state.onpolicy is not None:
            batches, kind = state.onpolicy.batches(
                step, batches, student=model, teacher=S.teacher, vocab=S.vocab, amp_dtype=amp
            )
            a = state.onpolicy.kd_weight(kind)
        n_seq, n_tok = step_counts(batches, classify)  # the global counts every term divides by
        diagnose = m.interference_every > 0 and step % m.interference_every == 0
        per_term = diagnose or pcgrad  # one backward pass per term
        s_t = attention_scale_at(step, spec)
        logs: dict[str, torch.Tensor] = {}
        cosines: dict[str, float] = {}
        try:  # the step's first AdamW update allocates its state: inside too
            for i, x in enumerate(batches):
                # multi-GPU: DDP all-reduces in the last micro-step's backward only
                with ctx.no_sync(S.student, sync=not per_term and i == len(batches) - 1):
                    terms, parts = micro_step(
                        S,
                        x,
                        n_tokens=n_tok,
                        n_seqs=n_seq,
                        kd_weight=a,
                        attn_scale=s_t,
                        amp_dtype=amp,
                    )
                    for k, v in terms.items():
                        logs[k] = logs.get(k, 0) + v.detach()
                    if per_term:  # gradient cosines between terms; PCGrad
                        basis = terms.get("basis_loss")
                        cos = backward_per_term(parts, basis, params, pcgrad, scaler)
                        for k, c in cos.items():
                            cosines[k] = cosines.get(k, 0.0) + c / len(batches)
                    else:
                        scaler.scale(terms["loss"]).backward()
            ctx.average_grads(params + extra if per_term else extra)  # what DDP did not reduce

            # ---- clip, step, zero_grad
            scaler.unscale_(opt)
            grad_norm = _clip(params + extra, t.grad_clip)
            scaler.step(opt)
        except torch.OutOfMemoryError as e:  # the last checkpoint on disk stays the one to resume
            ckpt.settle()  # a save still in the background is finished first, never lost
            raise OutOfMemoryError(
                f"out of memory at step {step} (peak {peak_mem_mb(dev) / 1024:.2f} GiB): {e}"
            ) from None
        scaler.update()
        opt.zero_grad(set_to_none=True)
        state.step = step = step + 1

        # ---- log (the only host sync of the step)
        if step % t.log_every == 0 or step == t.max_steps:
            n_in = sum(b["input_ids"].numel() for b in batches)  # input tokens, padding included
            metrics = ctx.mean_metrics(logs, dev)
            metrics.update(lr=lr, grad_norm=float(grad_norm), **meter.read(step, n_in))
            metrics.update(ctx.mean_metrics(cosines, dev))
            if "shard_params_max" not in last_metrics:  # a sharded student: each rank's share
                metrics.update(ctx.shard_metrics(params, opt))
            if state.onpolicy is not None:
                metrics.update(state.onpolicy.metrics(kind))
            last_metrics.update(metrics)
            cb.on_metrics(step, metrics)
