"""The one training loop for every method (SFT, the logit baselines, TinyBERT, MiniLM, SHARP).

Read it top to bottom, nanoGPT style:  set LR → maybe eval / checkpoint → micro-steps →
clip → step → zero_grad → log.  Methods differ only in the loss they add
(`_micro_step`); there are no per-method copies of the loop.

Objective (sharp-method.md):  L = (1-a)·CE + a·D(p_T‖q_S; τ) + s(t)·Σ_g w_g·L_g
All terms are normalised by *global* counts of the optimizer step (valid tokens for CE and D,
sequences for the attention terms), so grad_accum=8 × batch 1 equals grad_accum=1 × batch 8.

Everything is loaded and validated *before* anything is written to `out_dir`, so a bad spec
leaves nothing half-written.
"""

from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from sharp_core import distributed, losses
from sharp_core.checkpoint import (
    clean_temporaries,
    latest_checkpoint,
    prune_checkpoints,
    step_dir_name,
    verify_manifest,
    write_checkpoint,
)
from sharp_core.data import (
    BatchStream,
    ClassificationData,
    PackedData,
    build_classification_data,
    build_data,
    eval_batches,
    load_classification,
    load_texts,
)
from sharp_core.errors import CheckpointError, OutOfMemoryError
from sharp_core.models import (
    LocalResolver,
    Resolver,
    check_vocab,
    load_model,
    model_shape,
    resolve_tokenizer,
)
from sharp_core.spec import JobSpec

__all__ = [
    "TrainCallbacks",
    "TrainResult",
    "Resolver",
    "LocalResolver",
    "train",
    "latest_checkpoint",
    "verify_manifest",
    "Setup",
    "setup",
]

STATE_FILE = "training_state.pt"
SPEC_FILE = "spec.json"

#: Dense bf16 peak of cards we know, for MFU (FLOP/s).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class TrainCallbacks:
    """Hooks the service (or the CLI) overrides. Defaults do nothing."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Called every `log_every` steps and after each evaluation."""

    def on_checkpoint(self, step: int, path: Path, manifest: dict[str, Any]) -> None:
        """Called once a checkpoint folder is atomically in place."""

    def on_checkpoint_removed(self, step: int) -> None:
        """Called when an old checkpoint is pruned (keep_checkpoints)."""

    def should_stop(self) -> bool:
        """Polled every step; True → the loop checkpoints and returns status 'stopped'."""
        return False


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped"
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Setup:
    """Everything the loop needs, built and validated before any file is written."""

    spec: JobSpec
    device: torch.device
    tokenizer: Any
    vocab: int
    teacher: torch.nn.Module | None
    student: torch.nn.Module
    data: PackedData | ClassificationData
    objective: torch.nn.Module | None
    student_capture: Any
    teacher_capture: Any


def _pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return distributed.context().default_device()  # under torchrun: cuda:LOCAL_RANK


def setup(spec: JobSpec, *, resolver: Resolver | None = None, device: str | None = None) -> Setup:
    """Load tokenizer, models and data; build the attention objective and captures."""
    resolver = resolver or LocalResolver()
    dev = _pick_device(device)
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


# ---------------------------------------------------------------------------- state


def _rng_state(device: torch.device) -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _unwrap(m: torch.nn.Module) -> Any:
    if isinstance(m, torch.nn.parallel.DistributedDataParallel):
        m = m.module
    return getattr(m, "_orig_mod", m)


def _warn_spec_diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "spec") -> list[str]:
    """Fields that differ between the checkpoint's spec and this run's (torchtune-style warning)."""
    diffs = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _warn_spec_diff(a, b, f"{prefix}.{k}")
        elif a != b:
            diffs.append(f"{prefix}.{k}: {a!r} -> {b!r}")
    return diffs


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
    cb: Any = callbacks or TrainCallbacks()
    if ctx.enabled:
        cb = distributed.RankCallbacks(cb, ctx)
    t = spec.training
    m = spec.method
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    S = prepared or setup(spec, resolver=resolver, device=device)
    dev, student, teacher = S.device, S.student, S.teacher
    # from here S.student may be the DDP wrapper (the micro-steps); `student` is the model
    S = ctx.prepare(S)
    a = m.effective_kd_weight

    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = [
        p for p in (S.objective.parameters() if S.objective is not None else []) if p.requires_grad
    ]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=dev.type == "cuda")
    classify = spec.task == "sequence_classification"
    stream = BatchStream(
        S.data.train["labels"] if isinstance(S.data, ClassificationData) else S.data.train, t.seed
    ).shard(ctx.rank, ctx.world_size)
    step = 0

    use_amp = dev.type == "cuda" and t.precision != "fp32"
    amp_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and t.precision == "fp16")

    # ---- resume from the newest checkpoint whose manifest verifies
    resume_from = None
    if ctx.is_main:  # rank 0 picks the checkpoint; every rank loads the same one
        clean_temporaries(out_dir)
        resume_from = latest_checkpoint(out_dir)
    resume_from = ctx.broadcast_object(resume_from)
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        from safetensors.torch import load_file

        weights = load_file(str(resume_from / "model.safetensors"), device=str(dev))
        missing, unexpected = _unwrap(student).load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not _tied(student, k)]:
            raise CheckpointError(
                f"{resume_from}: weights do not match the student "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        opt.load_state_dict(state["optimizer"])
        if S.objective is not None and state.get("objective") is not None:
            S.objective.load_state_dict(state["objective"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data"])
        _set_rng_state(ctx.own_rng(state), dev)
        step = int(state["step"])
        import json

        saved_spec = json.loads((resume_from / SPEC_FILE).read_text())
        for d in _warn_spec_diff(saved_spec, spec.model_dump(mode="json")) if ctx.is_main else []:
            print(f"warning: resuming {resume_from.name} with a different spec: {d}")
    resumed_step = step if resume_from is not None else None

    def save(step: int, metrics: dict[str, float]) -> Path:
        rngs = ctx.gather_objects(_rng_state(dev))  # every rank's; only rank 0 writes
        if not ctx.is_main:
            ctx.barrier()
            return out_dir / step_dir_name(step)

        def write(tmp: Path) -> None:
            _unwrap(student).save_pretrained(tmp, safe_serialization=True)
            S.tokenizer.save_pretrained(tmp)
            (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=1))
            torch.save(
                {
                    "step": step,
                    "optimizer": opt.state_dict(),
                    "objective": S.objective.state_dict() if S.objective is not None else None,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "data": stream.state_dict(),
                    "rng": rngs[0],
                    **({"rng_ranks": rngs} if ctx.enabled else {}),
                },
                tmp / STATE_FILE,
            )

        path, manifest = write_checkpoint(out_dir, step, write, metrics)
        cb.on_checkpoint(step, path, manifest)
        for removed in prune_checkpoints(out_dir, t.keep_checkpoints):
            cb.on_checkpoint_removed(removed)
        ctx.barrier()
        return path

    def evaluate() -> dict[str, float]:
        student.eval()
        try:
            with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                if isinstance(S.data, ClassificationData):
                    return _evaluate_classifier(student, S.data, t.batch_size, dev)
                return _evaluate_lm(student, S.data.eval, S.vocab, t.batch_size, dev)
        finally:
            student.train()

    flops_per_token = _flops_per_token(student, teacher)
    peak_flops = _peak_flops(dev)
    last_metrics: dict[str, float] = {}
    last_ckpt: Path | None = resume_from
    student.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()

    while True:
        # ---- set LR
        lr = lr_at(step, spec)
        for g in opt.param_groups:
            g["lr"] = lr
        done = step >= t.max_steps
        stop = not done and cb.should_stop()

        # ---- maybe eval / checkpoint (state after `step` optimizer steps)
        eval_due = bool(t.eval_every) and step % t.eval_every == 0
        if done or (eval_due and step != resumed_step):
            ev = evaluate()
            last_metrics.update(ev)
            cb.on_metrics(step, ev)
        periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0 and step > 0
        # a resumed step already has its checkpoint on disk; everything else that is due gets one
        if (periodic or done or stop) and (step != resumed_step or last_ckpt is None):
            last_ckpt = save(step, dict(last_metrics))
        if done or stop:
            return TrainResult("completed" if done else "stopped", step, last_ckpt, last_metrics)

        # ---- micro-steps
        batches = [_next_batch(S, stream, t.batch_size) for _ in range(t.grad_accum)]
        n_seqs = sum(b["input_ids"].shape[0] for b in batches)
        # targets: every next token of a packed block (no padding), or one label per example
        n_tokens = n_seqs if classify else sum(b["input_ids"][:, 1:].numel() for b in batches)
        want_diag = m.interference_every > 0 and step % m.interference_every == 0
        per_term = want_diag or m.conflict == "pcgrad"
        logs: dict[str, torch.Tensor] = {}
        cosines: dict[str, float] = {}
        try:
            for i, x in enumerate(batches):
                # multi-GPU: DDP all-reduces in the last micro-step's backward only
                with ctx.no_sync(S.student, sync=not per_term and i == len(batches) - 1):
                    terms, parts = _micro_step(
                        S,
                        x,
                        n_tokens,
                        n_seqs,
                        a,
                        attention_scale_at(step, spec),
                        use_amp,
                        amp_dtype,
                    )
                    for k, v in terms.items():
                        logs[k] = logs.get(k, 0) + v.detach()
                    if per_term:
                        cos = _backward_per_term(
                            parts, terms.get("basis_loss"), params, m.conflict == "pcgrad", scaler
                        )
                        for k, c in cos.items():
                            cosines[k] = cosines.get(k, 0.0) + c / len(batches)
                    else:
                        scaler.scale(terms["loss"]).backward()
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(f"out of memory at step {step}: {e}") from None
        ctx.average_grads(params + extra if per_term else extra)  # what DDP did not reduce

        # ---- clip, step, zero_grad
        scaler.unscale_(opt)
        all_params = params + extra
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(all_params, t.grad_clip)
            if t.grad_clip > 0
            else torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in all_params if p.grad is not None])
            )
        )
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1

        # ---- log (the only host sync of the step)
        if step % t.log_every == 0 or step == t.max_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            # input tokens processed per second (for classification: padded example tokens)
            n_in = sum(b["input_ids"].numel() for b in batches)
            tokens_s = n_in * t.log_every / max(dt, 1e-9) if step % t.log_every == 0 else 0.0
            tokens_s *= ctx.world_size  # every rank processes as many
            metrics = ctx.mean_metrics(logs, dev)
            metrics.update(
                lr=lr,
                grad_norm=float(grad_norm),
                tokens_per_s=tokens_s,
                peak_mem_mb=_peak_mem_mb(dev),
            )
            metrics.update(ctx.mean_metrics(cosines, dev))
            if peak_flops:
                metrics["mfu"] = tokens_s * flops_per_token / peak_flops
            last_metrics.update(metrics)
            cb.on_metrics(step, metrics)


def _next_batch(S: Setup, stream: BatchStream, batch_size: int) -> dict[str, torch.Tensor]:
    """input_ids (B, N), and for classification attention_mask (B, N) and labels (B,)."""
    if isinstance(S.data, ClassificationData):
        idx = stream.next_indices(batch_size)
        return {k: v[idx].to(S.device, non_blocking=True) for k, v in S.data.train.items()}
    return {"input_ids": stream.next(batch_size).to(S.device, non_blocking=True)}


def _evaluate_lm(
    model: torch.nn.Module, blocks: torch.Tensor, vocab: int, batch_size: int, dev: torch.device
) -> dict[str, float]:
    total, count = 0.0, 0
    for x in eval_batches(blocks, batch_size):
        x = x.to(dev)
        logits = model(input_ids=x).logits[:, :-1, :vocab]
        n = x[:, 1:].numel()
        total += losses.cross_entropy(logits, x[:, 1:], num_valid=n).item() * n
        count += n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _evaluate_classifier(
    model: torch.nn.Module, data: ClassificationData, batch_size: int, dev: torch.device
) -> dict[str, float]:
    """Accuracy, macro-F1 (unweighted mean of per-class F1, classes absent from both
    predictions and labels skipped) and the cross-entropy."""
    preds, golds, total = [], [], 0.0
    n = data.eval["labels"].shape[0]
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size].to(dev) for k, v in data.eval.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        total += torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        golds.append(b["labels"].cpu())
    p, g = torch.cat(preds), torch.cat(golds)
    f1s = []
    for c in range(data.num_labels):
        tp = int(((p == c) & (g == c)).sum())
        fp = int(((p == c) & (g != c)).sum())
        fn = int(((p != c) & (g == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "eval_loss": total / n,
        "eval_accuracy": float((p == g).float().mean()),
        "eval_macro_f1": sum(f1s) / max(len(f1s), 1),
    }


def _tied(model: torch.nn.Module, key: str) -> bool:
    """save_pretrained drops tied weights (lm_head = embeddings); they are not missing."""
    return "lm_head" in key or "embed_out" in key


def _micro_step(
    S: Setup,
    x: torch.Tensor | dict[str, torch.Tensor],
    n_tokens: int,
    n_seqs: int,
    a: float,
    attn_scale: float,
    use_amp: bool,
    amp_dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward both models on one micro-batch.

    Returns (terms, parts): every term already normalised by the step's global counts, with
    their weighted sum under 'loss'; and the weighted pieces of that sum, by name, which
    the per-term backward (diagnostics, PCGrad) differentiates one at a time."""
    m = S.spec.method
    V = S.vocab
    batch = x if isinstance(x, dict) else {"input_ids": x}
    classify = S.spec.task == "sequence_classification"
    x = batch["input_ids"]  # (B, N)
    # packed LM blocks: every position attends (causally); classification: padding masked
    # None for packed blocks: an all-ones mask would cost transformers a device-to-host
    # sync per forward to discover it can use SDPA's is_causal path
    mask = batch.get("attention_mask")  # (B, N) or None
    query_mask = mask.bool() if mask is not None else torch.ones_like(x, dtype=torch.bool)
    # labels aligned with logits rows: next tokens (B, N-1), or one class per example (B, 1)
    labels = batch["labels"][:, None] if classify else x[:, 1:]
    terms: dict[str, torch.Tensor] = {}
    with torch.autocast(S.device.type, dtype=amp_dtype, enabled=use_amp):
        t_logits = None
        if S.teacher is not None:
            # inference mode, not just no_grad: no version counters or view tracking on the
            # teacher's activations; its outputs (logits, captured q/k) are only ever read
            with torch.inference_mode():
                if S.teacher_capture is not None:
                    with S.teacher_capture:
                        t_logits = S.teacher(input_ids=x, attention_mask=mask).logits
                else:
                    t_logits = S.teacher(input_ids=x, attention_mask=mask).logits
            # (B, N-1, V): teacher rows beyond the tokenizer dropped; classes: (B, 1, C)
            t_logits = t_logits[:, None, :] if classify else t_logits[:, :-1, :V]
        if S.student_capture is not None:
            with S.student_capture:
                s_logits = S.student(input_ids=x, attention_mask=mask).logits
        else:
            s_logits = S.student(input_ids=x, attention_mask=mask).logits
        s_logits = s_logits[:, None, :] if classify else s_logits[:, :-1, :V]

    if t_logits is not None and a > 0:
        # (1-a)·CE + a·D in one fused pass over the logits (same value and gradient)
        logit_term, terms["ce"], terms["kd"] = losses.logit_objective(
            m.divergence,
            s_logits,
            t_logits,
            labels,
            kd_weight=a,
            temperature=m.temperature,
            alpha=m.skew_alpha,
            beta=m.jsd_beta,
            num_valid=n_tokens,
            chunk_size=m.logit_chunk,
        )
    else:
        ce = losses.cross_entropy(s_logits, labels, num_valid=n_tokens, chunk_size=m.logit_chunk)
        terms["ce"] = ce
        logit_term = (1 - a) * ce
    terms["logit"] = logit_term
    parts = {"logit": logit_term}  # the weighted pieces whose sum is the loss
    if S.objective is not None:
        att = S.objective(S.student_capture.layers, S.teacher_capture.layers, query_mask)
        S.student_capture.clear()
        S.teacher_capture.clear()
        weights: dict[str, float] = S.objective.weights  # type: ignore[assignment]
        for name, term in att.items():
            term = term / n_seqs
            terms[name] = term
            if name != "basis_loss":
                parts[name] = attn_scale * weights[name] * term
    total = torch.stack(list(parts.values())).sum()
    if "basis_loss" in terms:
        total = total + terms["basis_loss"]
    terms["loss"] = total
    return terms, parts


def _backward_per_term(
    parts: dict[str, torch.Tensor],
    basis_loss: torch.Tensor | None,
    params: list[torch.nn.Parameter],
    pcgrad: bool,
    scaler: Any,
) -> dict[str, float]:
    """One backward pass per term: gradient cosines between terms, optionally PCGrad.

    Why per term and not from the attention-level gradients: orthogonality of the SHARP
    terms w.r.t. the attention probabilities does not imply orthogonality on the shared
    student weights; this measures the latter (sharp-method.md, "interference").
    Terms: 'logit' ((1-a)CE + a·D) and each weighted attention term. Gradients are taken
    of the scaler-scaled terms (fp16), which changes no cosine.
    """
    names = list(parts)
    grads = []
    for n in names:
        g = torch.autograd.grad(
            scaler.scale(parts[n]), params, retain_graph=True, allow_unused=True
        )
        grads.append(
            torch.cat(
                [
                    (gi if gi is not None else torch.zeros_like(p)).reshape(-1).float()
                    for gi, p in zip(g, params, strict=True)
                ]
            )
        )
        del g
    cos: dict[str, float] = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            c = F.cosine_similarity(grads[i], grads[j], dim=0, eps=1e-20)
            cos[f"cos_{names[i]}_{names[j]}"] = float(c)
    if pcgrad:
        grads = _pcgrad(grads)
    total = torch.stack(grads).sum(0)
    offset = 0
    for p in params:
        size = p.numel()
        piece = total[offset : offset + size].view_as(p).to(p.dtype)
        p.grad = piece if p.grad is None else p.grad + piece
        offset += size
    if basis_loss is not None and basis_loss.requires_grad:
        scaler.scale(basis_loss).backward()
    return cos


def _pcgrad(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """PCGrad (Yu et al. 2020): project each gradient off every other one it conflicts with.

    Deterministic order (the terms' order) rather than the paper's random shuffle, so runs
    are reproducible; the projections use the original gradients, as in the paper.
    """
    out = []
    for i, gi in enumerate(grads):
        g = gi.clone()
        for j, gj in enumerate(grads):
            if i == j:
                continue
            dot = torch.dot(g, gj)
            if dot < 0:
                g = g - dot / (gj.dot(gj) + 1e-20) * gj
        out.append(g)
    return out


def _flops_per_token(student: torch.nn.Module, teacher: torch.nn.Module | None) -> float:
    """6·N_student (forward + backward) + 2·N_teacher (forward only), embeddings excluded."""

    def n(mod: torch.nn.Module) -> int:
        emb = sum(
            p.numel()
            for name, p in mod.named_parameters()
            if "embed" in name or "wte" in name or "wpe" in name
        )
        return sum(p.numel() for p in mod.parameters()) - emb

    return 6 * n(student) + (2 * n(teacher) if teacher is not None else 0)


def _peak_flops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for k, v in _PEAK_FLOPS.items():
        if k in name:
            return v
    return None


def _peak_mem_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
