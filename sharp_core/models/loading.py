"""Loading teacher, student and the shared tokenizer.

Why the checks live here: distillation silently produces garbage when the two models do not
share token ids, and the error would surface hours later as a bad perplexity. So a mismatch
is refused up front with both names in the message. Remote code is never run and, from the
hub, only safetensors weights are accepted (pickle is never loaded from an untrusted source).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from sharp_core.errors import (
    ModelNotFoundError,
    SharpError,
    TokenizerMismatchError,
    UnsafeModelError,
)
from sharp_core.files import local_model_path
from sharp_core.spec import JobRef, JobSpec, ModelSpec

if TYPE_CHECKING:
    pass

EOS_TOKEN = "<|endoftext|>"


class Resolver(Protocol):
    """How the library finds things the service owns (another job's output, an upload)."""

    def job_checkpoint(self, job_id: str) -> Path: ...

    def upload_path(self, upload_id: str, param: str = "spec.dataset.upload_id") -> Path:
        """The local file of an upload; a missing one is a `DataError` naming `param` (the
        field that named the upload: the training data's or an evaluation set's)."""
        ...


class LocalResolver:
    """Default resolver for the standalone CLI: job ids and uploads are not available."""

    def job_checkpoint(self, job_id: str) -> Path:
        raise ModelNotFoundError(
            f"model {{'job': '{job_id}'}} needs the service (job outputs are resolved there)",
            param="spec.teacher.model",
        )

    def upload_path(self, upload_id: str, param: str = "spec.dataset.upload_id") -> Path:
        from sharp_core.errors import DataError

        raise DataError(f"upload '{upload_id}' needs the service", param=param)


def model_source(ms: ModelSpec, resolver: Resolver, param: str) -> str | None:
    """A loadable name for `ms.model`: a hub id, a folder, or a finished job's checkpoint."""
    if ms.model is None:
        return None
    if isinstance(ms.model, JobRef):
        return str(resolver.job_checkpoint(ms.model.job))
    return ms.model


def _looks_local(src: str) -> bool:
    return local_model_path(src) is not None


def _check_source(src: str, param: str) -> None:
    p = local_model_path(src)
    if p is not None and not p.is_dir():
        raise ModelNotFoundError(f"model folder not found: {src}", param=param)


def weights_dtype(name: str, role: str, device: torch.device) -> torch.dtype:
    """The dtype a model's weights are held in: the spec's, or for 'auto' bf16 for a teacher
    on CUDA and float32 otherwise (the student trains in float32 under autocast)."""
    if name != "auto":
        return getattr(torch, name)
    if role == "teacher" and device.type == "cuda":
        return torch.bfloat16
    return torch.float32


def autocast_dtype(spec: JobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes: bf16 / fp16 on CUDA, None (fp32) otherwise."""
    precision = spec.training.precision
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _load_config(ms: ModelSpec, src: str | None, param: str, revision: str):
    try:
        if src is not None:
            config = AutoConfig.from_pretrained(src, revision=revision, trust_remote_code=False)
        else:
            assert ms.config is not None
            cfg = dict(ms.config)
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            raise UnsafeModelError(
                f"{src} needs remote code, which is refused", param=param
            ) from None
        raise ModelNotFoundError(
            f"cannot load a config from '{src or ms.config}': {e}", param=param
        ) from None
    if getattr(config, "auto_map", None):
        raise UnsafeModelError(
            f"{src} declares custom code (auto_map), which is refused", param=param
        )
    for k, v in ms.config_overrides.items():
        if not hasattr(config, k) and k not in config.to_dict():
            raise SharpError(
                f"unknown config field '{k}' for {config.model_type}",
                param=f"{param.rsplit('.', 1)[0]}.config_overrides.{k}",
                code="invalid_spec",
            )
        setattr(config, k, v)
    return config


def load_model(
    ms: ModelSpec,
    *,
    role: str,
    resolver: Resolver,
    device: torch.device,
    tokenizer: PreTrainedTokenizerBase | None = None,
    task: str = "causal_lm",
    num_labels: int | None = None,
) -> PreTrainedModel:
    """Load or build one model in SDPA attention (the capture wraps SDPA, never eager)."""
    param = f"spec.{role}.model"
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    src = model_source(ms, resolver, param)
    if src is not None:
        _check_source(src, param)
    revision = ms.revision if src is not None and not _looks_local(src) else None
    dtype = weights_dtype(ms.dtype, role, device)
    if ms.init == "config":
        config = _load_config(ms, src, param, ms.revision)
        if tokenizer is not None and "vocab_size" not in ms.config_overrides:
            config.vocab_size = len(tokenizer)
        if tokenizer is not None:
            for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
                tid = getattr(tokenizer, name, None)
                if tid is not None:
                    setattr(config, name, tid)
        _check_task(config, task, param, num_labels)
        # Built where it runs: parameters are allocated and initialised on `device` in
        # `dtype` (a torch.device context), not in float32 on the CPU and then copied. On
        # the CPU this is the same sequence of RNG draws as before, so a seed gives the same
        # weights (tests/test_model_build.py); on CUDA the draws come from the CUDA generator.
        with torch.device(device):
            model = auto.from_config(config, attn_implementation="sdpa", dtype=dtype)
    else:
        if src is None:
            raise ModelNotFoundError("init='pretrained' needs `model`", param=param)
        config = _load_config(ms, src, param, ms.revision)
        _check_task(config, task, param, num_labels)
        kwargs: dict[str, Any] = {"use_safetensors": True} if not _looks_local(src) else {}
        if device.type != "cpu" and _accelerate_available():
            # Weights go from the file straight to the device (transformers needs accelerate
            # for a device_map; without it they load on the CPU and move, as before).
            kwargs["device_map"] = {"": device}
        try:
            model = auto.from_pretrained(
                src,
                config=config,
                revision=revision or "main",
                trust_remote_code=False,
                attn_implementation="sdpa",
                dtype=dtype,
                **kwargs,
            )
        except OSError as e:
            raise ModelNotFoundError(f"cannot load model '{src}': {e}", param=param) from None
    return model.to(device)


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


def _check_task(config: Any, task: str, param: str, num_labels: int | None) -> None:
    """Refuse a causal LM for classification (and a classifier for language modelling).

    Why: transformers would happily put a fresh classification head on GPT-2 and train it,
    which is not what someone who named a causal LM for an encoder task meant.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if task == "sequence_classification":
        if getattr(config, "is_decoder", False) or (
            archs and all(a.endswith(_CAUSAL_HEADS) for a in archs)
        ):
            raise SharpError(
                f"{config.model_type} ({', '.join(archs) or 'decoder'}) is a causal language model; "
                "task sequence_classification needs an encoder classifier (BERT family)",
                param=param,
                code="invalid_spec",
            )
        if num_labels is not None:
            if (
                archs
                and any(a.endswith("ForSequenceClassification") for a in archs)
                and getattr(config, "num_labels", num_labels) != num_labels
            ):
                raise SharpError(
                    f"the model has {config.num_labels} classes but the data has {num_labels}",
                    param=param,
                    code="invalid_spec",
                )
            config.num_labels = num_labels
    elif archs and all(a.endswith("ForSequenceClassification") for a in archs):
        raise SharpError(
            f"{config.model_type} ({', '.join(archs)}) is a classifier; task causal_lm needs a language model",
            param=param,
            code="invalid_spec",
        )


# ---------------------------------------------------------------------------- tokenizers


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the corpus, for models built from scratch.

    Byte-level so that any text (any script, any byte) is encodable without an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
    )


def _load_tokenizer(src: str, param: str, revision: str | None) -> PreTrainedTokenizerBase:
    _check_source(src, param)
    try:
        tok = AutoTokenizer.from_pretrained(
            src, revision=revision or "main", trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"cannot load a tokenizer from '{src}': {e}", param=param
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Tokenizers:
    tokenizer: PreTrainedTokenizerBase
    source: str  # for messages

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def resolve_tokenizer(
    spec: JobSpec, resolver: Resolver, corpus: Iterator[str] | None
) -> Tokenizers:
    """The one tokenizer both models use.

    Order: an explicit `tokenizer.name`; a trained one; the teacher's; the student's. When
    both models come with their own tokenizer, they must have the same vocabulary.
    """
    ts = spec.tokenizer
    if ts.name:
        return Tokenizers(_load_tokenizer(ts.name, "spec.tokenizer.name", None), ts.name)
    if ts.train is not None:
        if corpus is None:
            raise SharpError("tokenizer.train needs the corpus", param="spec.tokenizer.train")
        return Tokenizers(train_bpe_tokenizer(corpus, ts.train.vocab_size), "trained BPE")
    t_src = model_source(spec.teacher, resolver, "spec.teacher.model") if spec.teacher else None
    s_src = model_source(spec.student, resolver, "spec.student.model")
    t_tok = _load_tokenizer(t_src, "spec.teacher.model", _rev(spec.teacher)) if t_src else None
    s_tok = None
    if s_src and (spec.student.init == "pretrained" or t_tok is None):
        s_tok = _load_tokenizer(s_src, "spec.student.model", _rev(spec.student))
    cross = spec.method.cross_tokenizer is not None
    if cross and s_tok is not None:
        return Tokenizers(s_tok, s_src or "?")  # the data is the student's tokens
    if t_tok is not None and s_tok is not None and t_tok.get_vocab() != s_tok.get_vocab():
        raise TokenizerMismatchError(
            f"teacher '{t_src}' and student '{s_src}' do not share a tokenizer "
            f"({len(t_tok)} vs {len(s_tok)} tokens); distillation needs identical token ids, "
            "or set method.cross_tokenizer 'gold' or 'uld' (docs/planning.md)",
            param="spec.student.model",
        )
    if cross:
        raise SharpError(
            "method.cross_tokenizer: the student's tokenizer is needed: a pretrained student "
            "with its own, tokenizer.name or tokenizer.train",
            param="spec.method.cross_tokenizer",
            code="invalid_spec",
        )
    tok = t_tok or s_tok
    if tok is None:
        raise SharpError(
            "no tokenizer: give tokenizer.name, tokenizer.train, or a model that has one",
            param="spec.tokenizer",
            code="invalid_spec",
        )
    return Tokenizers(tok, t_src or s_src or "?")


def teacher_tokenizer(spec: JobSpec, resolver: Resolver) -> PreTrainedTokenizerBase:
    """The teacher's own tokenizer (distillation across tokenizers: the job's tokenizer is the
    student's); a teacher without one is refused naming the teacher."""
    assert spec.teacher is not None
    src = model_source(spec.teacher, resolver, "spec.teacher.model")
    if src is None:
        raise SharpError(
            "method.cross_tokenizer needs the teacher's own tokenizer: give teacher.model",
            param="spec.teacher.model",
            code="invalid_spec",
        )
    return _load_tokenizer(src, "spec.teacher.model", _rev(spec.teacher))


def load_model_tokenizer(
    spec: JobSpec, resolver: Resolver, role: str
) -> PreTrainedTokenizerBase | None:
    """The tokenizer that ``spec.<role>``'s model brings (None: it names no source)."""
    ms = spec.teacher if role == "teacher" else spec.student
    if ms is None:
        return None
    src = model_source(ms, resolver, f"spec.{role}.model")
    return _load_tokenizer(src, f"spec.{role}.model", _rev(ms)) if src else None


def _rev(ms: ModelSpec | None) -> str | None:
    if ms is None or ms.model is None or isinstance(ms.model, JobRef) or _looks_local(ms.model):
        return None
    return ms.revision


def check_vocab(model: PreTrainedModel, vocab: int, role: str) -> None:
    """Logits are sliced to the tokenizer's size; a model with fewer rows cannot be used."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab:
        raise TokenizerMismatchError(
            f"the {role} has {rows} output rows but the tokenizer has {vocab} tokens",
            param=f"spec.{role}.model",
        )


def model_shape(model: PreTrainedModel) -> tuple[int, int]:
    """(layers, attention heads) from the config, whatever the family calls them."""
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    return int(layers), int(heads)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
