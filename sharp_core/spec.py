"""The job spec: one versioned pydantic model shared by the CLI, the library and the service.

Why pydantic with ``extra="forbid"`` and a bound on every number: a typo in a field name or an
absurd learning rate must fail at submission time with the field's path, not after an hour on
a GPU. The same model validates ``POST /v1/jobs`` bodies, so the service and the library can
never disagree about what a valid job is.

Every model is frozen: the resolved spec saved beside a checkpoint is the one that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sharp_core.errors import SharpError, SpecError, UnsafeModelError
from sharp_core.methods import (
    ATTENTION_METHODS,
    DEFAULT_ATTENTION_WEIGHT,
    DEFAULT_DIVERGENCE,
    DivergenceName,
    MethodName,
)

SPEC_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class JobRef(_Strict):
    """A finished job of this service used as a model source (its last checkpoint)."""

    job: str = Field(min_length=1, max_length=64, description="Id of a succeeded job.")


class CalibrationSpec(_Strict):
    """The data the importance scores are computed on."""

    samples: int = Field(
        default=256,
        ge=1,
        le=1_000_000,
        description="Sequences (packed blocks of training.seq_len) in the calibration pass; "
        "fewer are used, with an event saying so, when the training data has fewer.",
    )
    source: Literal["train"] = Field(
        default="train", description="Where the blocks come from: the job's training data."
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="Blocks per forward pass.")


class PruneSpec(_Strict):
    """Target sizes of a student pruned from the teacher (Minitron); None keeps the teacher's.

    GPT-2, OPT and BERT compute head_dim as hidden/heads, so for them `heads` and `hidden` go
    together (give one, the other follows). docs/pruning.md has the details.
    """

    layers: int | list[int] | None = Field(
        default=None,
        description="How many layers to keep (the most important by Block Influence), or the "
        "teacher's layer indices to keep.",
    )
    heads: int | None = Field(default=None, ge=1, le=100_000, description="Query heads per layer.")
    kv_heads: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Key/value heads per layer (GQA models); fewer than the teacher's drops "
        "whole groups. Default: as many groups as the head count allows.",
    )
    ffn: int | None = Field(default=None, ge=1, le=10_000_000, description="MLP width.")
    hidden: int | None = Field(default=None, ge=1, le=1_000_000, description="Hidden size.")
    scoring: Literal["activation", "magnitude"] = Field(
        default="activation",
        description="'activation': Minitron's scores from a calibration pass; 'magnitude': "
        "weight norms, no data (layers kept evenly spread).",
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: int | list[int] | None) -> int | list[int] | None:
        if isinstance(v, int) and not 1 <= v <= 100_000:
            raise ValueError(f"a layer count must be at least 1, got {v}")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("layers must be a count or a non-empty list of distinct indices >= 0")
        return v


class ModelSpec(_Strict):
    """Where a model comes from and how it is initialised."""

    # max_length on the str member only: on the whole union pydantic applies it to a JobRef
    # too and raises TypeError (a 500 in the API) instead of validating {'job': id}.
    model: Annotated[str, Field(max_length=512)] | JobRef | None = Field(
        default=None,
        description="Hugging Face hub id, local folder, or {'job': id}. May be omitted only "
        "with init='config' and a `config` that names its model_type.",
    )
    revision: str = Field(default="main", max_length=128, description="Hub revision.")
    init: Literal["pretrained", "config", "prune"] = Field(
        default="pretrained",
        description="'pretrained' loads weights; 'config' builds a randomly initialised model "
        "from the model's config (or `config`) with `config_overrides` applied; 'prune' "
        "(student only) prunes the job's teacher to the sizes in `prune`.",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="A full config dict with 'model_type' (init='config' without `model`).",
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Config fields replaced before building."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype. 'auto': the student trains in float32 (autocast does "
        "bf16); the teacher runs in bf16 on CUDA and float32 on CPU.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Never honoured: must be false (remote code is refused)."
    )
    prune: PruneSpec | None = Field(
        default=None, description="Target sizes when init='prune' (docs/pruning.md)."
    )

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "trust_remote_code is refused: this service never runs model code "
                "downloaded with the weights"
            )
        return v

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if self.init == "prune" or self.prune is not None:
            if self.init != "prune":
                raise ValueError("`prune` is only read with init='prune'")
            if self.prune is None:
                raise ValueError("init='prune' needs a `prune` block with the target sizes")
            if self.model is not None or self.config is not None:
                raise ValueError(
                    "a pruned student is cut from the teacher: leave out model and config "
                    "(config_overrides may still set fields such as dropout)"
                )
            return self
        if self.model is None and not (self.init == "config" and self.config):
            raise ValueError("give `model`, or init='config' with a `config` that has model_type")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`config` must contain 'model_type'")
        for d in (self.config or {}, self.config_overrides):
            if d.get("trust_remote_code") or "auto_map" in d:
                raise ValueError("trust_remote_code / auto_map is refused")
        return self


class TokenizerTrainSpec(_Strict):
    """Train a small byte-level BPE tokenizer on the training corpus (for from-scratch models)."""

    vocab_size: int = Field(default=512, ge=260, le=262_144)


class TokenizerSpec(_Strict):
    name: str | None = Field(
        default=None,
        max_length=512,
        description="Hub id or folder. Default: the teacher's tokenizer, else the student's.",
    )
    train: TokenizerTrainSpec | None = Field(
        default=None, description="Train a byte-level BPE tokenizer instead of loading one."
    )


class _TextSource(_Strict):
    """Where a table of examples comes from: the hub, files on the server, or an upload.

    Shared by the training data (`DatasetSpec`) and each evaluation set (`EvalSetSpec`), so
    both are named, validated and loaded the same way."""

    source: Literal["hub", "files", "upload"] = "files"
    name: str | None = Field(default=None, max_length=256, description="Hub data set name.")
    config_name: str | None = Field(default=None, max_length=128)
    split: str = Field(
        default="train",
        max_length=64,
        description="The hub split, or the split of a DatasetDict folder in `files`.",
    )
    files: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description="txt/jsonl/parquet paths or globs of shards, read in sorted order; "
        "folders written by datasets' save_to_disk (of a DatasetDict, `split`); s3://bucket/key "
        "objects or globs over keys (s3://bucket/prefix/*.parquet), fetched with the service's "
        "S3 credentials (source 'files'). In the service, paths on the server are accepted "
        "only under its SHARP_DATASET_FILE_ROOTS (symlinks resolved), s3:// URLs only under "
        "its SHARP_DATASET_S3_ROOTS. docs/data.md, 'Sources'.",
    )
    upload_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _source_fields(self) -> _TextSource:
        if self.source == "hub" and not self.name:
            raise ValueError("source='hub' needs `name`")
        if self.source == "files" and not self.files:
            raise ValueError("source='files' needs at least one entry in `files`")
        if self.source == "upload" and not self.upload_id:
            raise ValueError("source='upload' needs `upload_id`")
        return self


#: The evaluation sets a job may name, in the order they are evaluated and reported.
EVAL_SPLITS = ("val", "test")


class EvalSetSpec(_TextSource):
    """A held-out set evaluated at every eval point and at the end, reported as metrics named
    after its split (`val_loss`, `val_ppl`; classification `val_loss`, `val_accuracy`,
    `val_f1`). It is read with the training data's field names, tokenised and packed (or
    padded) exactly as the training data: for a causal LM, the same format (text, chat,
    prompt_completion), chat template, loss mask (`loss_on`) and packing, so a chat set's
    perplexity counts the answers only."""

    split: str = Field(
        default="validation",
        max_length=64,
        description="The hub split, or the split of a DatasetDict folder in `files`.",
    )
    max_blocks: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="At most this many packed blocks of training.seq_len (causal_lm) or "
        "examples (sequence_classification) are evaluated: the first ones, in file order.",
    )


class EvalSets(_Strict):
    """Evaluation sets apart from the training data: `val` is the one to select settings on,
    `test` the one to report once a choice is made. Give each as its own file or upload (or
    hub split), so none of its documents is trained on."""

    val: EvalSetSpec | None = Field(default=None, description="Validation set (for selection).")
    test: EvalSetSpec | None = Field(default=None, description="Test set (for the final report).")

    def named(self) -> list[tuple[str, EvalSetSpec]]:
        """(split, set) of each set given, in `EVAL_SPLITS` order."""
        return [(n, s) for n in EVAL_SPLITS if (s := getattr(self, n)) is not None]


class DatasetSpec(_TextSource):
    """The training data; `eval_fraction` of it is held out as the `eval_*` metrics' set."""

    text_field: str = Field(default="text", min_length=1, max_length=128)
    text_pair_field: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Second text of a pair (sequence_classification, e.g. MRPC).",
    )
    label_field: str = Field(default="label", min_length=1, max_length=128)
    num_labels: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description="Number of classes (sequence_classification); default: from the labels.",
    )
    eval_fraction: float = Field(
        default=0.05,
        gt=0.0,
        le=0.5,
        description="Tail fraction of the packed blocks held out for evaluation "
        "(a contiguous tail, so no document straddles train and eval).",
    )
    max_eval_blocks: int = Field(default=64, ge=1, le=100_000)
    format: Literal["auto", "text", "chat", "prompt_completion"] = Field(
        default="auto",
        description="How rows become tokens: 'auto' detects it from the columns "
        "(`messages` → chat, `prompt` + `completion` → prompt_completion, else text).",
    )
    messages_field: str = Field(default="messages", min_length=1, max_length=128)
    prompt_field: str = Field(default="prompt", min_length=1, max_length=128)
    completion_field: str = Field(default="completion", min_length=1, max_length=128)
    chat_template: str | None = Field(
        default=None,
        max_length=65_536,
        description="A Jinja chat template for tokenizers without one (chat format); "
        "replaces the tokenizer's own when given.",
    )
    loss_on: Literal["auto", "assistant", "all"] = Field(
        default="auto",
        description="Which tokens carry the loss (CE, every divergence, the attention "
        "terms' queries, evaluation): 'auto' is 'assistant' for chat and prompt_completion "
        "(the answers only), 'all' for text.",
    )
    packing: Literal["auto", "documents", "concat", "none"] = Field(
        default="auto",
        description="'documents': documents packed into seq_len blocks, positions restarting "
        "and attention kept inside each document (long ones split); 'concat': EOS between "
        "documents, attention crosses them; 'none': one document per row, padded (a longer "
        "one is refused). 'auto': concat for text, documents for chat and prompt_completion.",
    )
    cache: bool = Field(
        default=True,
        description="Tokenise once per key into the tokenized cache (memory-mapped, shared "
        "by every rank, attempt and job with the same key); false: tokenise in memory.",
    )
    num_proc: int = Field(
        default=1, ge=1, le=256, description="Processes that tokenise a cache build."
    )
    streaming: bool = Field(
        default=False,
        description="Read a hub data set as a stream (source 'hub', causal_lm): the cache "
        "build tokenises it as it downloads, never materialising it. Files and uploads are "
        "always read as a stream by the build.",
    )
    eval: EvalSets = Field(
        default_factory=EvalSets,
        description="Separate evaluation sets (`val`, `test`), each evaluated at every eval "
        "point and at the end, with the training data's field names.",
    )

    def eval_source(self, split: str) -> DatasetSpec:
        """This data set with the source of its evaluation set `split`: the same field names,
        so `sharp_core.data.loading` loads it exactly as the training data."""
        es: EvalSetSpec = getattr(self.eval, split)
        src = es.model_dump(include=set(_TextSource.model_fields))
        return self.model_copy(update={**src, "eval": EvalSets(), "streaming": False})


class Granularities(_Strict):
    """Weights w_g of the SHARP terms; 0 drops a granularity (the ablation).

    Default 0.1 each: each relative-normalised term starts near 1, and at weight 1 the three
    together outweigh the logit term several times over, so with gradient clipping the
    student's classifier / LM head barely learns (seen in the first NLU and LM runs; see
    docs/results.md for the comparison that will settle the defaults).
    """

    layer: float = Field(default=0.1, ge=0.0, le=1000.0)
    head: float = Field(default=0.1, ge=0.0, le=1000.0)
    token: float = Field(default=0.1, ge=0.0, le=1000.0)
    residual: float = Field(default=0.0, ge=0.0, le=1000.0)


class OnPolicySpec(_Strict):
    """Distil on generated sequences (GKD on-policy, DistiLLM's adaptive replay); docs/method.md.

    A prompt is the first `prompt_tokens` tokens of a packed training block; the student (or
    the teacher, `seq_kd`) continues it for `max_new_tokens` tokens and the step's loss is
    taken on the generated tokens only. causal_lm only.
    """

    fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="λ: the chance that a step's whole batch is replaced by generated "
        "sequences (TRL GKD's lmbda); with `adaptive`, the starting generation probability. "
        "0 draws no random number: the run is the off-policy run.",
    )
    seq_kd: bool = Field(
        default=False,
        description="Sequences from the teacher instead of the student (sequence-level KD); "
        "the (1-a)·CE term then trains on them, as SeqKD does.",
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=131_072, description="Tokens generated after each prompt."
    )
    prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        le=131_072,
        description="P: prompt length, the block's first P tokens. Default: "
        "training.seq_len - max_new_tokens, so generated sequences are blocks' length.",
    )
    temperature: float = Field(default=1.0, gt=0.0, le=100.0, description="Sampling temperature.")
    top_k: int = Field(
        default=0, ge=0, le=1_000_000, description="Sample among the k likeliest tokens (0: all)."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1: no cut)."
    )
    adaptive: bool = Field(
        default=False,
        description="DistiLLM's adaptive off-policy: student generations go to a replay "
        "buffer; a step generates afresh or replays from the buffer, and the generation "
        "probability (starting at `fraction`) rises by `adaptive_increment` whenever the "
        "evaluation loss rises.",
    )
    replay_capacity: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Sequences the replay buffer holds (oldest dropped first); at least one "
        "optimizer step's batch (training.batch_size × grad_accum).",
    )
    adaptive_increment: float = Field(
        default=0.1, ge=0.0, le=1.0, description="DistiLLM's raise of the probability."
    )
    adaptive_tolerance: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="Rise of eval_loss (nats) over the previous evaluation that counts as "
        "rising (DistiLLM's loss_eps).",
    )


class TeacherCacheSpec(_Strict):
    """A teacher-logit cache shared by the team's jobs (docs/teacher-cache.md).

    With mode 'use', the job reads the team's cache for its key (teacher weights, tokenizer,
    data, packing, kind, k, temperature, dtype), building it first with one teacher pass over
    the training blocks when there is none, and takes its logit term from the cache instead
    of a teacher forward pass.
    """

    mode: Literal["off", "use"] = Field(
        default="off",
        description="'use': read the cache for this job's key, building it first when absent.",
    )
    kind: Literal["topk", "sampled"] = Field(
        default="topk",
        description="'topk': the teacher's k largest log-probs per token and their ids; "
        "'sampled': Random-Sampling KD (arXiv 2503.16870), `samples` tokens drawn from the "
        "teacher per position (forward KL only).",
    )
    k: int = Field(
        default=128,
        ge=1,
        le=262_144,
        description="Top-k entries per token (topk). 128: the smallest k measured within 0.5 % "
        "of dense kd's perplexity (docs/results.md, 'Teacher-logit cache').",
    )
    estimator: Literal["tail", "renormalized"] = Field(
        default="tail",
        description="How the top-k loss reads the cache: 'tail' keeps the rest of the "
        "vocabulary as one bucket with the teacher's exact tail mass (every divergence); "
        "'renormalized' rescales the top-k to sum to 1 (forward KL only, biased).",
    )
    samples: int = Field(
        default=12, ge=1, le=4096, description="Draws per position (sampled; ~12 in the paper)."
    )
    sample_seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Seed of the draws (sampled; part of the key)."
    )
    tail_samples: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="topk only: tokens drawn from the teacher's tail (outside the top-k) per "
        "position, which share the tail's mass: an unbiased estimate of the full forward KL "
        "(RS-KD on the tail only; forward KL only). 0: the tail is one bucket.",
    )
    dtype: Literal["float32", "float16"] = Field(
        default="float32", description="Stored log-prob precision (part of the key)."
    )
    shard_mb: float = Field(
        default=64.0,
        ge=0.001,
        le=4096.0,
        description="Target size of one shard file in MiB when the cache is built (not part "
        "of the key: readers follow the manifest). Under torchrun the shards are split over "
        "the ranks, so a cache needs at least as many shards as GPUs to use them all.",
    )

    @property
    def loss_estimator(self) -> str:
        """How the loss reads the cache: 'tail', 'renormalized', 'tail_sampled' or 'sampled'."""
        if self.kind == "sampled":
            return "sampled"
        return "tail_sampled" if self.tail_samples else self.estimator


class MethodSpec(_Strict):
    """The distillation objective: L = (1-a)·CE + a·D(p_T‖q_S; τ) + attention terms."""

    name: MethodName = "sharp"
    logit_divergence: DivergenceName | None = Field(
        default=None, description="Default: the method's own (kd→forward_kl, rkl→reverse_kl…)."
    )
    kd_weight: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="a in the objective. 0.9 for every method; the equal-budget sweep chose "
        "0.7–1.0 depending on the method (docs/results.md): tune it in a sweep.",
    )
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    skew_alpha: float = Field(default=0.1, ge=0.0, le=1.0, description="DistiLLM's α.")
    jsd_beta: float = Field(default=0.5, ge=0.0, le=1.0, description="GKD's β.")
    granularities: Granularities = Field(default_factory=Granularities)
    rank: int = Field(default=32, ge=1, le=8192, description="r: size of the key-axis basis.")
    basis: Literal["dct", "learned"] = "dct"
    decomposition: Literal["hierarchical", "direct"] = Field(
        default="hierarchical",
        description="'direct' is the ablation: one per-head MSE on whole (projected) maps.",
    )
    normalization: Literal["relative", "count"] = "relative"
    layer_map: list[int] | None = Field(
        default=None,
        max_length=1024,
        description="Teacher layer for each student layer; default: uniform, last with last.",
    )
    head_map: list[list[int]] | None = Field(
        default=None,
        max_length=1024,
        description="Teacher head of each student head, per student layer (one-hot rows); "
        "default: exact when the student was pruned from the teacher, else uniform.",
    )
    attention_weight: float | None = Field(
        default=None,
        ge=0.0,
        le=100_000.0,
        description="Weight of the single attention term (TinyBERT, MiniLM, SHARP 'direct'). "
        "Default: the method's own (tinybert 210, minilm 0.13, direct 0.26), which puts the "
        "term at step 0 level with SHARP's default term (docs/method.md, 'Default weights').",
    )
    attention_schedule: Literal["constant", "linear_decay", "cosine_decay"] = Field(
        default="constant", description="Multiplier on the attention terms over training."
    )
    attention_anneal_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Fraction of max_steps over which a decaying schedule reaches 0.",
    )
    conflict: Literal["none", "pcgrad"] = "none"
    interference_every: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Record per-term gradient cosines on the student every N steps (0: off).",
    )
    layer_distance: Literal["mse", "kl"] = Field(
        default="mse",
        description="Distance of the layer component: squared error of its projection (as the "
        "other granularities), or KL(teacher ‖ student) of the unprojected key distribution "
        "(distribution-aware; still orthogonal to the other terms).",
    )
    projection: Literal["auto", "sdpa", "chunked"] = Field(
        default="auto",
        description="How SHARP computes P·Q: 'chunked', query chunks of the float32 maps "
        "recomputed in backward (memory O(N·query_chunk) per layer); 'sdpa', one attention call "
        "with the basis as values (on CUDA float32 q/k leave it SDPA's math kernel, which keeps "
        "each layer's (B, H, N, N) float32 map for backward; 1.8× faster than chunked at "
        "B8×512 on an H200); 'auto': sdpa on a GPU where those maps take at most 10% of its "
        "memory, chunked otherwise and on the CPU (equal speed there). The plan says which. "
        "docs/method.md, 'Attention terms at long context'.",
    )
    query_chunk: int = Field(
        default=64,
        ge=1,
        le=65536,
        description="Query rows per chunk of the attention terms (SHARP, TinyBERT, MiniLM): "
        "each chunk holds a (B, H, query_chunk, N) float32 block.",
    )
    teacher_cache: TeacherCacheSpec = Field(default_factory=TeacherCacheSpec)
    logit_chunk: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="Tokens per chunk of the logit term. Default: as many as keep one chunk's "
        "float32 logits within 64 MiB (the fused loss) or 256 MiB (the dense one), e.g. 130 "
        "tokens at a 128k vocabulary.",
    )
    logit_kernel: Literal["auto", "torch", "liger"] = Field(
        default="auto",
        description="Fused linear loss of the logit term (no B×N×V logits): 'torch' "
        "(sharp_core.objectives.fused), 'liger' (Liger-Kernel, CUDA, optional 'gpu' extra), "
        "'auto': liger on CUDA when installed and it implements the divergence, else torch. "
        "Soft-capped heads (Gemma 2/3's final_logit_softcapping) always run on torch: "
        "Liger's kernels cannot soft-cap. "
        "Checked against the dense loss on the first micro-batch (error code loss_parity).",
    )
    on_policy: OnPolicySpec | None = Field(
        default=None,
        description="Train on generated sequences (docs/method.md, 'On-policy'); None: "
        "off-policy, the training text only.",
    )
    cross_tokenizer: Literal["uld", "gold"] | None = Field(
        default=None,
        description="Teacher and student with different tokenizers (docs/planning.md): "
        "'uld' (Universal Logit Distillation: L1 between the sorted probability vectors) or "
        "'gold' (exact mapping of the shared tokens, ULD on the rest), at the positions "
        "where both tokenizations start a token at the same byte of the text. None: one "
        "tokenizer.",
    )

    @property
    def divergence(self) -> DivergenceName:
        return self.logit_divergence or DEFAULT_DIVERGENCE[self.name]

    @property
    def effective_kd_weight(self) -> float:
        return 0.0 if self.name == "sft" else self.kd_weight

    @property
    def effective_attention_weight(self) -> float:
        if self.attention_weight is not None:
            return self.attention_weight
        return DEFAULT_ATTENTION_WEIGHT.get(self.name, 1.0)

    @property
    def uses_attention(self) -> bool:
        return self.name in ATTENTION_METHODS


class TrainingSpec(_Strict):
    max_steps: int = Field(default=2000, ge=1, le=10_000_000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    seq_len: int = Field(default=512, ge=8, le=131_072)
    lr: float = Field(default=5e-4, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=100, ge=0, le=10_000_000)
    weight_decay: float = Field(default=0.01, ge=0.0, le=10.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, ge=0.0, le=1e6, description="0 disables clipping.")
    eval_every: int = Field(default=200, ge=0, le=10_000_000, description="0: only at the end.")
    checkpoint_every: int = Field(
        default=500, ge=0, le=10_000_000, description="0: only at the end."
    )
    keep_checkpoints: int = Field(default=3, ge=1, le=1000)
    log_every: int = Field(default=1, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Autocast dtype on CUDA; CPU always trains in fp32."
    )
    compile: bool = Field(default=False, description="torch.compile student and teacher.")
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute each student block's activations in the backward pass instead "
        "of keeping them (about one block's activations live instead of every block's, for "
        "roughly a third more student compute). Same loss and gradients.",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be in [0, 1)")
        return v


class ResourcesSpec(_Strict):
    """Where and how the job runs: the scheduler reads these, the trainer reads `gpus` and
    `teacher_parallel`."""

    queue: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="GPU pool (each pool is its own queue), e.g. 'h100', 'a100-40g', 'cpu'.",
    )
    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="GPUs on one host; more than 1 runs the training under torchrun.",
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Hosts the job spans (a pool with a multi-node backend, e.g. Slurm): "
        "`gpus` per node, one torchrun per node; quotas count nodes × gpus.",
    )
    priority: int = Field(
        default=0, ge=-100, le=100, description="Order within the team's queued jobs; higher first."
    )
    teacher_parallel: Literal["auto", "replicate", "fsdp"] = Field(
        default="auto",
        description="Multi-GPU: replicate the teacher on every rank or shard it with FSDP; "
        "'auto' shards when a replica would not fit beside the student.",
    )
    student_parallel: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="Multi-GPU: the student as a DDP replica on every rank (whole weights, "
        "gradients and AdamW state per GPU) or sharded with FSDP2 (each rank holds 1/gpus of "
        "them); 'auto' uses DDP while the memory estimate fits comfortably, else FSDP.",
    )
    cpu_offload: bool = Field(
        default=False,
        description="Multi-GPU with a sharded student: keep its parameter shards, gradients "
        "and AdamW state in host memory (FSDP2 CPUOffloadPolicy); the optimizer step runs "
        "on the CPU. Needs gpus > 1 and student_parallel 'auto' or 'fsdp'.",
    )
    max_attempts: int = Field(default=3, ge=1, le=20)


class HarnessSpec(_Strict):
    """Downstream tasks run with lm-evaluation-harness (docs/evaluation.md)."""

    tasks: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        min_length=1,
        max_length=64,
        description="The harness's own task names (their data comes from the hub: network "
        "needed) or paths of local task files (a task YAML with `dataset_path: json` or "
        "`parquet` and `data_files` beside it or under the data roots; in the service, under "
        "SHARP_DATASET_FILE_ROOTS).",
    )
    num_fewshot: int = Field(default=0, ge=0, le=64, description="Examples in each prompt.")
    limit: int | None = Field(
        default=None, ge=1, le=1_000_000, description="At most this many examples per task."
    )
    batch_size: int = Field(default=8, ge=1, le=1024)
    every: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Also run every N evaluation points (training.eval_every); 0: at the end only.",
    )


class GenerationSpec(_Strict):
    """Answer quality: answers generated for a prompt set, scored against its references."""

    set: str = Field(
        min_length=1,
        max_length=1024,
        description="A jsonl file with a prompt and a reference per line (in the service, "
        "under SHARP_DATASET_FILE_ROOTS).",
    )
    prompt_field: str = Field(default="prompt", min_length=1, max_length=128)
    reference_field: str = Field(default="reference", min_length=1, max_length=128)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    decoding: Literal["greedy", "sample"] = Field(
        default="greedy", description="greedy, or sampling at temperature 1 (seeded)."
    )
    limit: int = Field(default=200, ge=1, le=100_000, description="At most this many prompts.")
    samples: int = Field(
        default=8,
        ge=0,
        le=100,
        description="Answers stored with the job for people to read (an event: kept small).",
    )
    short_reference_words: int = Field(
        default=5,
        ge=1,
        le=100,
        description="References of at most this many words are also scored by exact match.",
    )


class EvaluationSpec(_Strict):
    """What the finished student is scored on besides perplexity (docs/evaluation.md)."""

    harness: HarnessSpec | None = None
    generation: GenerationSpec | None = None


class JobSpec(_Strict):
    """A distillation (or fine-tuning, method 'sft' without teacher) job."""

    version: Literal[1] = 1
    name: str = Field(default="job", min_length=1, max_length=200)
    task: Literal["causal_lm", "sequence_classification"] = Field(
        default="causal_lm",
        description="causal_lm: next-token prediction on packed text; sequence_classification: "
        "encoder classifiers (BERT family), accuracy and macro-F1.",
    )
    teacher: ModelSpec | None = None
    student: ModelSpec
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    dataset: DatasetSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _teacher_needed(self) -> JobSpec:
        if self.method.name != "sft" and self.teacher is None:
            raise ValueError(
                f"method '{self.method.name}' needs a `teacher` (only 'sft' runs without one)"
            )
        if self.task == "sequence_classification" and self.tokenizer.train is not None:
            raise ValueError(
                "sequence_classification uses the models' tokenizer (no tokenizer.train)"
            )
        if self.method.basis == "learned" and self.method.rank > self.training.seq_len:
            raise ValueError("method.rank must not exceed training.seq_len")
        return self


def _is_union_tag(p: Any) -> bool:
    """pydantic's name of a union member in an error's loc ('str', 'constrained-str',
    'JobRef', 'function-after[...]'), which is no field: users think in field names only."""
    return isinstance(p, str) and (
        p[:1].isupper() or "[" in p or p in ("str", "int", "float") or p.startswith("constrained-")
    )


def _union_tag_at(loc: Any) -> int | None:
    return next((i for i, p in enumerate(loc) if _is_union_tag(p)), None)


class EvaluationJobSpec(_Strict):
    """``POST /v1/evaluations``: score a model without training it (docs/evaluation.md)."""

    version: Literal[1] = 1
    kind: Literal["evaluation"] = "evaluation"
    name: str = Field(default="evaluation", min_length=1, max_length=200)
    model: ModelSpec = Field(
        description="The model scored: {'job': id} (a finished job's last checkpoint), a "
        "local folder, or a hub id; init 'pretrained'."
    )
    teacher: ModelSpec | None = Field(
        default=None,
        description="Its teacher, for retained = model / teacher (its scores are computed once "
        "per key and shared with training jobs).",
    )
    tokenizer: str | None = Field(
        default=None, max_length=512, description="Tokenizer source; default: the model's own."
    )
    evaluation: EvaluationSpec
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _what(self) -> EvaluationJobSpec:
        if self.evaluation.harness is None and self.evaluation.generation is None:
            raise ValueError("evaluation needs `harness` tasks or a `generation` set")
        for m in (self.model, self.teacher):
            if m is not None and m.init != "pretrained":
                raise ValueError("an evaluation scores trained weights: init must be 'pretrained'")
        return self


def parse_evaluation_spec(data: Any, *, prefix: str = "spec") -> EvaluationJobSpec:
    """Validate ``POST /v1/evaluations``' spec; SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError("the spec must be a mapping", param=prefix)
    try:
        return EvaluationJobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError.combined(_spec_errors(e, prefix)) from None


def _loc_to_param(loc: tuple[Any, ...], prefix: str) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if _is_union_tag(p):
            continue
        parts.append(str(p))
    return ".".join(parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (through Optional, unions, lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model at `loc` inside JobSpec ([] where it cannot tell)."""
    models: list[type[BaseModel]] = [JobSpec]
    for part in loc:
        if not isinstance(part, str) or (_is_union_tag(part) and not part[:1].isupper()):
            continue  # a list index, or pydantic's tag of a union member that is not a model
        tagged = [m for m in models if m.__name__ == part]
        if tagged:
            models = tagged
            continue
        models = [
            m
            for model in models
            if part in model.model_fields
            for m in _models_in(model.model_fields[part].annotation)
        ]
        if not models:
            return []
    return sorted({name for m in models for name in m.model_fields})


def _spec_errors(e: ValidationError, prefix: str) -> list[SharpError]:
    """Every error pydantic found, one per field, each naming it; an unknown field gets the
    nearest known one (``did you mean `max_steps`?``)."""
    import difflib

    errors = e.errors()

    def wrong_type(err: Any, i: int) -> bool:  # the whole value has the wrong type
        return len(err["loc"]) == i + 1 and err["type"].endswith("_type")

    # A value that fails every member of a union gets one error per member; a member that
    # only says the value has the wrong type (a mapping given to `str`) is not what was meant
    # when another member complains about its content (a typo inside the mapping).
    meant: set[tuple[Any, ...]] = set()
    for err in errors:
        if (i := _union_tag_at(err["loc"])) is not None and not wrong_type(err, i):
            meant.add(tuple(err["loc"][:i]))
    out: dict[str, SharpError] = {}
    for err in errors:
        i = _union_tag_at(err["loc"])
        if i is not None and wrong_type(err, i) and tuple(err["loc"][:i]) in meant:
            continue
        param = _loc_to_param(tuple(err["loc"]), prefix)
        if param in out:
            continue  # the other members of a union, failing on the same value
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            name = str(err["loc"][-1])
            msg = f"unknown field '{name}'"
            near = difflib.get_close_matches(name, _fields_at(tuple(err["loc"][:-1])), n=1)
            if near:
                msg += f": did you mean `{near[0]}`?"
        unsafe = "trust_remote_code" in msg or "auto_map" in msg
        cls: type[SharpError] = UnsafeModelError if unsafe else SpecError
        out[param] = cls(f"{param}: {msg}", param=param)
    return list(out.values())


def parse_spec(data: dict[str, Any], *, prefix: str = "spec") -> JobSpec:
    """Validate a dict; raise SpecError naming the first offending field (``spec.training.lr``)
    and carrying every one found (`SharpError.errors`)."""
    if not isinstance(data, dict):
        raise SpecError("the spec must be a mapping", param=prefix)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError.combined(_spec_errors(e, prefix)) from None
    found: list[SpecError] = []
    for check in (
        _check_prune,
        _check_on_policy,
        _check_teacher_cache,
        _check_student_parallel,
        _check_batch_split,
        _check_cross_tokenizer,
        _check_evaluation_task,
        _check_streaming,
    ):
        try:
            check(spec, prefix)
        except SpecError as e:
            found.append(e)
    if found:
        raise SpecError.combined(found)
    return spec


def _check_streaming(spec: JobSpec, prefix: str) -> None:
    if spec.dataset.streaming and spec.dataset.source != "hub":
        raise SpecError(
            "dataset.streaming applies to hub data sets (source 'hub'); files and uploads are "
            "always read as a stream by the cache build",
            param=f"{prefix}.dataset.streaming" if prefix else "dataset.streaming",
        )


def _check_evaluation_task(spec: JobSpec, prefix: str) -> None:
    if spec.task != "causal_lm" and (spec.evaluation.harness or spec.evaluation.generation):
        param = f"{prefix}.evaluation" if prefix else "evaluation"
        raise SpecError(
            f"{param}: harness tasks and answer quality need task causal_lm", param=param
        )


def _check_batch_split(spec: JobSpec, prefix: str) -> None:
    gpus = spec.resources.gpus
    if spec.resources.nodes > 1:  # one process per GPU on every node (one on a CPU node)
        gpus = spec.resources.nodes * max(1, gpus)
    if gpus > 1 and spec.training.batch_size % gpus:
        # checked here rather than in a model validator so that the error names the field
        # (a model validator's errors carry no location); the trainer checks it again
        param = f"{prefix}.training.batch_size" if prefix else "training.batch_size"
        raise SpecError(
            f"{param}: {spec.training.batch_size} must be a multiple of resources.gpus "
            f"({gpus}): each GPU takes an equal slice of every batch",
            param=param,
        )


def per_term_field(spec: JobSpec) -> str | None:
    """The method field that asks for one backward pass per term (PCGrad, gradient
    cosines), if any: those passes use ``autograd.grad``, which a sharded (FSDP2) student
    cannot serve (its gradients exist only as reduce-scattered shards of ``.grad``)."""
    if spec.method.conflict != "none":
        return "method.conflict"
    if spec.method.interference_every > 0:
        return "method.interference_every"
    return None


def _check_student_parallel(spec: JobSpec, prefix: str) -> None:
    """A sharded student's options, checked here so that the error names its field; the
    trainer checks again once ``auto`` has been resolved (`sharp_core.train.distributed`)."""

    def fail(field: str, msg: str) -> None:
        param = f"{prefix}.{field}" if prefix else field
        raise SpecError(f"{param}: {msg}", param=param)

    r = spec.resources
    if r.cpu_offload and r.gpus <= 1:
        fail("resources.cpu_offload", "offloads a sharded student: needs resources.gpus > 1")
    if r.cpu_offload and r.student_parallel == "ddp":
        fail(
            "resources.cpu_offload",
            "offloads a sharded student: needs student_parallel 'fsdp' or 'auto', not 'ddp'",
        )
    per_term = per_term_field(spec)
    if per_term and r.gpus > 1 and (r.student_parallel == "fsdp" or r.cpu_offload):
        fail(
            per_term,
            "one backward pass per term (PCGrad, interference diagnostics) needs whole "
            "gradients, which a sharded student (resources.student_parallel 'fsdp') does "
            "not have: use student_parallel 'ddp', or turn this off",
        )


def _check_cross_tokenizer(spec: JobSpec, prefix: str) -> None:
    """Distillation across tokenizers: logit terms only, one process, off-policy, no cache."""
    ct = spec.method.cross_tokenizer
    if ct is None:
        return
    param = f"{prefix}.method.cross_tokenizer" if prefix else "method.cross_tokenizer"

    def fail(msg: str) -> None:
        raise SpecError(f"{param}: {msg}", param=param)

    m = spec.method
    if m.uses_attention:
        fail(
            f"method '{m.name}' compares attention maps position by position, which needs one "
            "tokenisation: with different tokenizers use a logit method (kd)"
        )
    if m.name == "sft" or spec.teacher is None:
        fail("needs a teacher and a distillation method (not sft)")
    if spec.task != "causal_lm":
        fail("covers causal_lm only")
    if m.on_policy is not None or m.teacher_cache.mode != "off":
        fail("cannot be combined with on_policy or a teacher-logit cache")
    if spec.student.init == "prune":
        fail("a pruned student keeps the teacher's tokenizer")
    if spec.resources.gpus > 1:
        fail("runs on one GPU (resources.gpus 1)")


def _check_prune(spec: JobSpec, prefix: str) -> None:
    """Cross-field rules of a pruned student, checked here so that the error names its field."""

    def fail(field: str, msg: str) -> None:
        param = f"{prefix}.{field}" if prefix else field
        raise SpecError(f"{param}: {msg}", param=param)

    if spec.teacher is not None and spec.teacher.init == "prune":
        fail("teacher.init", "only the student can be pruned (from the teacher)")
    if spec.student.init != "prune":
        return
    if spec.teacher is None:
        fail("student.init", "init='prune' cuts the student from the teacher: give a `teacher`")
    assert spec.teacher is not None
    if spec.tokenizer.train is not None:
        fail(
            "tokenizer.train",
            "a pruned student keeps the teacher's embeddings, so it keeps the teacher's tokenizer",
        )
    teacher_src = spec.teacher.model if isinstance(spec.teacher.model, str) else None
    if spec.tokenizer.name is not None and spec.tokenizer.name != teacher_src:
        fail(
            "tokenizer.name",
            f"a pruned student keeps the teacher's tokenizer ({teacher_src or 'the teacher job'}"
            f"'s), not '{spec.tokenizer.name}'",
        )


def _check_on_policy(spec: JobSpec, prefix: str) -> None:
    """Cross-field rules of `method.on_policy`, checked here so that the error names its field."""
    op = spec.method.on_policy
    if op is None:
        return
    base = f"{prefix}.method.on_policy" if prefix else "method.on_policy"

    def fail(field: str, msg: str) -> None:
        param = f"{base}.{field}" if field else base
        raise SpecError(f"{param}: {msg}", param=param)

    t = spec.training
    if op.max_new_tokens >= t.seq_len:
        fail(
            "max_new_tokens",
            f"{op.max_new_tokens} must be smaller than training.seq_len ({t.seq_len}): "
            "a prompt needs at least one token of the block",
        )
    if op.prompt_tokens is not None and op.prompt_tokens + op.max_new_tokens > t.seq_len:
        fail(
            "prompt_tokens",
            f"prompt_tokens + max_new_tokens = {op.prompt_tokens + op.max_new_tokens} exceeds "
            f"training.seq_len ({t.seq_len})",
        )
    length = (op.prompt_tokens or t.seq_len - op.max_new_tokens) + op.max_new_tokens
    if spec.method.basis == "learned" and spec.method.uses_attention and length != t.seq_len:
        fail(
            "prompt_tokens",
            f"a learned SHARP basis is tied to training.seq_len ({t.seq_len}): generated "
            f"sequences must have that length, not {length} (leave prompt_tokens out)",
        )
    if spec.task != "causal_lm":
        fail("", f"on-policy distillation generates text: task must be causal_lm, not {spec.task}")
    if spec.method.name == "sft":
        fail("", "on-policy distillation needs a teacher's distribution: not with method 'sft'")
    if spec.method.teacher_cache.mode != "off":
        fail(
            "",
            "generated sequences have no cached teacher logits: on_policy and "
            "teacher_cache.mode 'use' cannot be combined",
        )
    if op.adaptive and op.replay_capacity < t.batch_size * t.grad_accum:
        fail(
            "replay_capacity",
            f"{op.replay_capacity} is less than one step's batch "
            f"(training.batch_size × grad_accum = {t.batch_size * t.grad_accum})",
        )


#: The divergences each way of reading a teacher-logit cache supports (docs/teacher-cache.md):
#: the tail bucket keeps two proper distributions (every divergence is defined on them); a
#: renormalised top-k or a sample from p only estimates E_p[·], i.e. forward KL.
CACHE_DIVERGENCES: dict[str, tuple[str, ...]] = {
    "tail": ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"),
    "renormalized": ("forward_kl",),
    "sampled": ("forward_kl",),
    "tail_sampled": ("forward_kl",),
}


def _check_teacher_cache(spec: JobSpec, prefix: str) -> None:
    """Cross-field rules of the teacher-logit cache, checked here so the error names a field."""
    tc = spec.method.teacher_cache
    if tc.mode == "off":
        return

    def fail(field: str, msg: str) -> None:
        param = (
            f"{prefix}.method.teacher_cache.{field}" if prefix else f"method.teacher_cache.{field}"
        )
        raise SpecError(f"{param}: {msg}", param=param)

    if spec.method.name == "sft" or spec.teacher is None:
        fail("mode", "a teacher-logit cache needs a distillation method with a teacher (not sft)")
    if spec.task != "causal_lm":
        fail("mode", "the teacher-logit cache covers causal_lm packed blocks only")
    if tc.kind == "topk" and tc.tail_samples and tc.estimator != "tail":
        fail("tail_samples", "tail draws split the tail bucket: they need estimator 'tail'")
    how = tc.loss_estimator
    field = {"sampled": "kind", "tail_sampled": "tail_samples"}.get(how, "estimator")
    if spec.method.divergence not in CACHE_DIVERGENCES[how]:
        fail(
            field,
            f"'{how}' estimates forward KL only; method {spec.method.name} uses "
            f"{spec.method.divergence} (use kind 'topk' with estimator 'tail' for it)",
        )


def load_spec(path: str | Path) -> JobSpec:
    """Load a spec from a YAML or JSON file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}", param="spec")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"cannot parse {p}: {e}", param="spec") from None
    return parse_spec(data)
