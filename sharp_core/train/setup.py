"""Set-up of a run: everything the training step needs, loaded and validated up front.

Why separate from the loop: `setup` touches no file under the run's folder, so a bad spec
(unknown model, tokenizer mismatch, unreadable data) fails before anything is half-written;
and a benchmark or a test can build a `Setup` and call `sharp_core.train.step.micro_step` on it
without running the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging as hf_logging

from sharp_core.data.lm import LMSource, eval_data, prepare_lm, training_texts
from sharp_core.data.loading import (
    ClassificationData,
    PackedData,
    build_classification_data,
    build_classification_eval,
    load_classification,
)
from sharp_core.models.loading import (
    LocalResolver,
    Resolver,
    Tokenizers,
    autocast_dtype,
    check_vocab,
    load_model,
    model_shape,
    resolve_tokenizer,
    weights_dtype,
)
from sharp_core.objectives import fused, losses
from sharp_core.spec import JobSpec
from sharp_core.train import distributed

if TYPE_CHECKING:
    from sharp_core.cache.teacher_cache import TeacherCache
    from sharp_core.models.capture import AttentionCapture
    from sharp_core.objectives.cross_tokenizer import CrossTokenizer, FusedCrossLoss
    from sharp_core.objectives.sharp import AttentionObjective

__all__ = ["Setup", "autocast_dtype", "load_eval_sets", "pick_device", "setup"]


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
    fused_loss: fused.FusedLinearLoss | None = None
    """The fused logit term (hidden states and heads, no B×N×V logits); None: chosen from
    ``method.logit_kernel`` (`fused.select_kernel`) at the first micro-step. A test can pass a
    wrong one here to see the parity check fail."""
    fused_cross: FusedCrossLoss | None = None
    """The fused cross-tokenizer logit term; None: `fused_cross_objective`. As ``fused_loss``,
    a test can pass a wrong one to see the parity check (`check_cross_parity`) fail."""
    logit_path: str | None = None
    """'fused:<kernel>' ('fused:cross' across tokenizers) or 'dense' once the first micro-step
    chose, after its parity check."""
    pruned: PruneReport | None = None
    """What pruning kept, when the student was pruned from the teacher (init='prune')."""
    build_seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds to load or build each model on its device, as metrics
    (``build_teacher_s``, ``build_student_s``; the trainer records them at step 0 of a run that
    starts fresh, not again when an attempt resumes)."""
    dataset_sha256: str | None = None
    """The tokenized data's key (`sharp_core.data.tokenized.data_key`), when a teacher cache
    is asked for: the teacher-logit cache's key includes it."""
    teacher_cache: TeacherCache | None = None
    """The verified teacher-logit cache the logit term reads (`sharp_core.cache.teacher_cache.attach`)."""
    eval_sets: dict[str, PackedData | ClassificationData] = field(default_factory=dict)
    """The job's evaluation sets (``dataset.eval``) by split name (``val``, ``test``), each
    with its examples in ``eval``; empty when it names none."""
    cross: CrossTokenizer | None = None
    """Teacher and student tokenizers when they differ (``method.cross_tokenizer``)."""
    preflight: list[dict[str, Any]] = field(default_factory=list)
    """The compatibility findings made at job start (`preflight_models`), as dicts: the
    trainer reports them as a 'preflight' event."""


@dataclass(frozen=True)
class PruneReport:
    """What a pruned job records: kept units, sizes, timings (events and step-0 metrics)."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    ffn: int
    hidden: int
    params_before: int
    params_after: int
    calibration_samples: int
    calibration_requested: int
    calibration_seconds: float
    seconds: float
    scoring: str

    def metrics(self) -> dict[str, float]:
        return {
            "prune_params_before": float(self.params_before),
            "prune_params_after": float(self.params_after),
            "prune_calibration_samples": float(self.calibration_samples),
            "prune_calibration_s": self.calibration_seconds,
            "prune_s": self.seconds,
        }

    def event(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kept_layers": self.layers,
            "heads_per_layer": {str(t): h for t, h in zip(self.layers, self.heads, strict=True)},
            "ffn": self.ffn,
            "hidden": self.hidden,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "scoring": self.scoring,
            "calibration_samples": self.calibration_samples,
            "calibration_s": round(self.calibration_seconds, 3),
        }
        if self.kv_heads != self.heads:
            out["kv_heads_per_layer"] = {
                str(t): h for t, h in zip(self.layers, self.kv_heads, strict=True)
            }
        if self.scoring == "activation" and self.calibration_samples < self.calibration_requested:
            out["note"] = (
                f"the training data has {self.calibration_samples} blocks: calibrated on those, "
                f"not the {self.calibration_requested} asked for"
            )
        return out


def pick_device(device: str | None) -> torch.device:
    """The given device, else the default one (under torchrun: cuda:LOCAL_RANK)."""
    if device:
        return torch.device(device)
    return distributed.context().default_device()


def _timed_load(out: dict[str, float], role: str, **kw: Any) -> Any:
    """`load_model`, its wall time (the device's queued work included) put in `out`."""
    t0 = time.perf_counter()
    model = load_model(role=role, **kw)
    dev = kw["device"]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out[f"build_{role}_s"] = time.perf_counter() - t0
    return model


def setup(
    spec: JobSpec,
    *,
    resolver: Resolver | None = None,
    device: str | None = None,
    data_store: Any = None,
) -> Setup:
    """Load tokenizer, models and data; build the attention objective and captures.

    ``data_store``: where the tokenized cache lives (`sharp_core.data.tokenized`); None
    tokenises in memory."""
    resolver = resolver or LocalResolver()
    data_kw = {"store": data_store, "ranks": distributed.context()}
    dev = pick_device(device)
    hf_logging.disable_progress_bar()
    classify = spec.task == "sequence_classification"
    # the models' own tokenizers compared before anything heavy is loaded (a hub model's are
    # readable only here, not at submission)
    own = preflight_tokenizers(spec, resolver)
    data: PackedData | ClassificationData
    if classify:
        rows = load_classification(spec.dataset, resolver)
        toks = _job_tokenizer(spec, resolver, None, own)
        data = build_classification_data(
            spec.dataset, rows, toks.tokenizer, spec.training.seq_len, spec.training.seed
        )
        vocab = data.num_labels  # logits are over classes
        n_labels: int | None = data.num_labels
        eval_sets = load_eval_sets(spec, resolver, toks.tokenizer, data)
    else:
        source = LMSource(spec.dataset, resolver)
        corpus = None
        if spec.tokenizer.train:  # the tokenizer is trained on the rows' strings
            corpus = iter(training_texts(source.table(), source.format, source.fields))
        toks = _job_tokenizer(spec, resolver, corpus, own)
        if source.format == "chat" and spec.teacher is not None:
            _check_chat_rendering(spec, resolver, source, toks.tokenizer, own)
        vocab = toks.vocab_size
        n_labels = None
        eval_sets = load_eval_sets(spec, resolver, toks.tokenizer, None, source)
    tok = toks.tokenizer
    kw = {
        "resolver": resolver,
        "device": dev,
        "tokenizer": tok,
        "task": spec.task,
        "num_labels": n_labels,
    }
    teacher = None
    cross = None
    built: dict[str, float] = {}
    pruning = spec.student.init == "prune"
    if spec.teacher is not None and (spec.method.name != "sft" or pruning):
        t_dev = distributed.context().teacher_load_device(spec, dev)
        t_spec = spec.teacher
        if t_dev != dev and t_spec.dtype == "auto":  # parked on the CPU for a GPU run: held
            # in the dtype it computes in there (bf16), never as an fp32 copy on every rank
            name = str(weights_dtype("auto", "teacher", dev)).removeprefix("torch.")
            t_spec = t_spec.model_copy(update={"dtype": name})
        teacher = _timed_load(built, "teacher", ms=t_spec, **{**kw, "device": t_dev})
        if spec.method.cross_tokenizer is not None:
            from sharp_core.models.loading import teacher_tokenizer
            from sharp_core.objectives.cross_tokenizer import CrossTokenizer

            # preflight_tokenizers loaded the same one (same source and revision)
            t_tok = own.teacher if own is not None else teacher_tokenizer(spec, resolver)
            check_vocab(teacher, len(t_tok), "teacher")
            positions = getattr(teacher.config, "max_position_embeddings", None)
            cross = CrossTokenizer.build(spec.method.cross_tokenizer, tok, t_tok, positions)
        elif not classify:
            check_vocab(teacher, vocab, "teacher")
        teacher.eval()
        teacher.requires_grad_(False)
    report = None
    if pruning:
        assert teacher is not None  # the spec refuses init='prune' without a teacher
        if not classify:
            data = prepare_lm(spec.dataset, source, tok, spec.training.seq_len, **data_kw)
        student, report = _prune_student(spec, teacher, data, dev)
        if spec.method.name == "sft":
            teacher = None  # loaded only to be pruned
    else:
        student = _timed_load(built, "student", ms=spec.student, **kw)
    if classify:
        if isinstance(data, ClassificationData):
            names = data.label_names
            for m in (student, teacher):
                if m is not None:
                    m.config.id2label = dict(enumerate(names))
                    m.config.label2id = {n: i for i, n in enumerate(names)}
    else:
        check_vocab(student, vocab, "student")
        if not pruning:
            data = prepare_lm(spec.dataset, source, tok, spec.training.seq_len, **data_kw)

    findings = preflight_models(
        spec, student, teacher, own, device_name=_device_name(dev), bf16=_bf16_supported(dev)
    )
    objective = s_cap = t_cap = None
    if spec.method.uses_attention:
        from sharp_core.models.capture import AttentionCapture
        from sharp_core.objectives.sharp import AlignmentMaps, make_attention_objective

        assert teacher is not None
        objective = make_attention_objective(
            spec.method,
            student_shape=model_shape(student),
            teacher_shape=model_shape(teacher),
            seq_len=spec.training.seq_len,
            maps=AlignmentMaps(report.layers, report.heads) if report is not None else None,
        ).to(dev)
        s_cap = AttentionCapture(student, objective.student_layers)
        t_cap = AttentionCapture(teacher, objective.teacher_layers)
    if spec.training.compile:
        student = torch.compile(student)  # type: ignore[assignment]
        if teacher is not None:
            teacher = torch.compile(teacher)  # type: ignore[assignment]
    digest = None
    if spec.method.teacher_cache.mode != "off" and isinstance(data, PackedData):
        digest = data.key  # the tokenized data's key: the teacher-logit cache's includes it
    return Setup(
        spec,
        dev,
        tok,
        vocab,
        teacher,
        student,
        data,
        objective,
        s_cap,
        t_cap,
        pruned=report,
        build_seconds=built,
        dataset_sha256=digest,
        eval_sets=eval_sets,
        cross=cross,
        preflight=findings,
    )


def _job_tokenizer(
    spec: JobSpec, resolver: Resolver, corpus: Any, own: OwnTokenizers | None
) -> Tokenizers:
    """The job's tokenizer, taken from the two the preflight already loaded when it did
    (the student's across tokenizers, else the teacher's, which the preflight found to be the
    same vocabulary) rather than loading them again; `resolve_tokenizer` otherwise."""
    if own is None:
        return resolve_tokenizer(spec, resolver, corpus)
    cross = spec.method.cross_tokenizer is not None
    return Tokenizers(own.student if cross else own.teacher, own.sources[1 if cross else 0])


@dataclass(frozen=True)
class OwnTokenizers:
    """The teacher's and the student's own tokenizers, when a distillation job has both."""

    teacher: Any
    student: Any
    sources: tuple[str, str]


def preflight_tokenizers(spec: JobSpec, resolver: Resolver) -> OwnTokenizers | None:
    """At job start, before any model is loaded: the two models' own tokenizers compared
    (identical, same vocabulary, overlapping, disjoint) and their chat templates, as at
    submission where they were readable (docs/planning.md, "Preflight"). A fatal finding
    raises `TokenizerPreflightError` naming both sources. None: one tokenizer for both."""
    from sharp_core.errors import TokenizerPreflightError
    from sharp_core.models.compat import compare_chat_templates, compare_tokenizers
    from sharp_core.models.loading import load_model_tokenizer, model_source

    distils = spec.teacher is not None and spec.method.name != "sft"
    if not distils or spec.tokenizer.name or spec.tokenizer.train:
        return None
    if spec.student.init != "pretrained":
        return None
    t_tok = load_model_tokenizer(spec, resolver, "teacher")
    s_tok = load_model_tokenizer(spec, resolver, "student")
    if t_tok is None or s_tok is None:
        return None
    assert spec.teacher is not None
    srcs = (
        model_source(spec.teacher, resolver, "spec.teacher.model") or "?",
        model_source(spec.student, resolver, "spec.student.model") or "?",
    )
    found = compare_tokenizers(
        t_tok,
        s_tok,
        teacher_rows=None,
        student_rows=None,
        cross_tokenizer=spec.method.cross_tokenizer,
    ) + compare_chat_templates(t_tok, s_tok)
    for f in found:
        if f.severity == "error":
            raise TokenizerPreflightError(
                f"{f.param}: teacher '{srcs[0]}' and student '{srcs[1]}': {f.message}",
                param=f.param,
                code=f.code,
                findings=[_as_dict(x) for x in found],
            )
    return OwnTokenizers(t_tok, s_tok, srcs)


def preflight_models(
    spec: JobSpec,
    student: Any,
    teacher: Any,
    own: OwnTokenizers | None,
    *,
    device_name: str | None,
    bf16: bool | None,
) -> list[dict[str, Any]]:
    """The preflight at job start, with the models loaded (docs/planning.md, "Preflight"):
    the tokenizers (with the embeddings' rows), the chat templates, ``training.seq_len``
    against each model's positions, and bf16 on this device (``bf16`` None: not a CUDA
    device, nothing to check). Why here too: a hub model's config and tokenizer are readable
    only once the worker has them, so the submission could not say. Returns every finding
    (dicts with code, severity, message, param); raises `PreflightError` at the first fatal
    one, carrying them all."""
    from sharp_core.errors import PreflightError
    from sharp_core.models.compat import (
        check_dtype,
        check_positions,
        compare_chat_templates,
        compare_tokenizers,
    )

    def rows(model: Any) -> int | None:
        emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return int(emb.weight.shape[0]) if emb is not None else None

    found = []
    if own is not None and teacher is not None:
        found += compare_tokenizers(
            own.teacher,
            own.student,
            teacher_rows=rows(teacher),
            student_rows=rows(student),
            cross_tokenizer=spec.method.cross_tokenizer,
        )
        found += compare_chat_templates(own.teacher, own.student)
    if spec.task == "causal_lm":
        # the teacher of a cross-tokenizer job reads its own tokens, cut to its positions
        roles = [("student", student)]
        if teacher is not None and spec.method.cross_tokenizer is None:
            roles.append(("teacher", teacher))
        for role, model in roles:
            found += check_positions(spec.training.seq_len, role, model.config.to_dict())
    if bf16 is not None:
        found += check_dtype(spec.training.precision, device_name, bf16, "this worker's")
    out = [_as_dict(f) for f in found]
    for f in found:
        if f.severity == "error":
            raise PreflightError(
                f"{f.param}: {f.message}", param=f.param, code=f.code, findings=out
            )
    return out


def _as_dict(f: Any) -> dict[str, Any]:
    return {"code": f.code, "severity": f.severity, "message": f.message, "param": f.param}


def _device_name(dev: torch.device) -> str | None:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def _bf16_supported(dev: torch.device) -> bool | None:
    """Whether this CUDA device computes in bfloat16; None off CUDA (the CPU trains fp32)."""
    return bool(torch.cuda.is_bf16_supported()) if dev.type == "cuda" else None


def load_eval_sets(
    spec: JobSpec,
    resolver: Resolver,
    tokenizer: Any,
    train: ClassificationData | None,
    source: LMSource | None = None,
) -> dict[str, PackedData | ClassificationData]:
    """Load, tokenise and pack (or pad) each evaluation set the spec names, once, as the
    training data is: same loader, tokenizer, seq_len, and a language model's with the
    training data's format, chat template, loss mask and packing (`source`, `eval_data`);
    a classifier's with the training data's classes (`train`). Before any model is loaded,
    so a bad set fails fast."""
    out: dict[str, PackedData | ClassificationData] = {}
    seq_len = spec.training.seq_len
    for split, es in spec.dataset.eval.named():
        where, ds = f"spec.dataset.eval.{split}", spec.dataset.eval_source(split)
        if train is not None:
            rows = load_classification(ds, resolver, where=where)
            out[split] = build_classification_eval(
                rows, train, tokenizer, seq_len, es.max_blocks, where
            )
        else:
            src = source if source is not None else LMSource(spec.dataset, resolver)
            out[split] = eval_data(ds, src, tokenizer, seq_len, es.max_blocks, where, resolver)
    return out


def _calibration_batches(
    spec: JobSpec, data: PackedData | ClassificationData, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The first `samples` training examples of a permutation seeded by the job's seed, in
    batches: deterministic for a seed and a data set. Returns (batches, examples used)."""
    cal = spec.student.prune.calibration  # type: ignore[union-attr]
    rows = data.train if isinstance(data, ClassificationData) else {"input_ids": data.train}
    n = rows["input_ids"].shape[0]
    g = torch.Generator().manual_seed(spec.training.seed)
    idx = torch.randperm(n, generator=g)[: cal.samples]
    out = []
    for start in range(0, len(idx), cal.batch_size):
        sel = idx[start : start + cal.batch_size]
        batch = {k: v[sel].to(device) for k, v in rows.items() if k != "labels"}
        batch["input_ids"] = batch["input_ids"].long()  # memory-mapped rows are int32
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        out.append(batch)
    return out, len(idx)


def _prune_student(
    spec: JobSpec,
    teacher: torch.nn.Module,
    data: PackedData | ClassificationData,
    device: torch.device,
) -> tuple[Any, PruneReport]:
    """The student cut from the teacher, in the student's dtype on the training device."""
    from sharp_core.models.loading import weights_dtype
    from sharp_core.models.prune import prune
    from sharp_core.models.prune_shapes import target_of

    ps = spec.student.prune
    assert ps is not None
    batches, used = (
        _calibration_batches(spec, data, device) if ps.scoring == "activation" else ([], 0)
    )
    # calibration runs on the training device (a teacher parked on the CPU visits it layer
    # by layer), its batches split over the ranks; every rank trims rank 0's selection
    res = prune(
        teacher,
        target_of(ps),
        scoring=ps.scoring,
        batches=batches,
        config_overrides=dict(spec.student.config_overrides),
        ranks=distributed.context(),
        device=device,
    )
    student = res.model.to(
        device=device, dtype=weights_dtype(spec.student.dtype, "student", device)
    )
    student.requires_grad_(True)
    sel = res.selection
    report = PruneReport(
        layers=sel.layers,
        heads=sel.heads,
        kv_heads=sel.kv_heads,
        ffn=len(sel.ffn[0]),
        hidden=len(sel.hidden),
        params_before=res.params_before,
        params_after=res.params_after,
        calibration_samples=used,
        calibration_requested=ps.calibration.samples,
        calibration_seconds=res.calibration_seconds,
        seconds=res.seconds,
        scoring=ps.scoring,
    )
    return student, report


def _check_chat_rendering(
    spec: JobSpec, resolver: Resolver, source: LMSource, tok: Any, own: OwnTokenizers | None
) -> None:
    """Teacher and student must render conversations to the same tokens: when both models
    bring their own tokenizer (and chat template), the first conversations are rendered by
    each and compared (`formats.check_render_identity`). Across tokenizers the data is the
    student's rendering and the teacher reads its text: nothing to compare."""
    from sharp_core.data.formats import check_render_identity
    from sharp_core.models.loading import load_model_tokenizer

    if spec.tokenizer.name or spec.tokenizer.train or spec.student.init != "pretrained":
        return  # one tokenizer for both
    if spec.method.cross_tokenizer is not None:
        return
    other = own.student if own is not None else load_model_tokenizer(spec, resolver, "student")
    if other is None:
        return
    convs = source.head(16).get(source.fields["messages"], [])
    check_render_identity(tok, other, convs, spec.dataset.chat_template)
