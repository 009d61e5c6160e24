"""Compatibility preflight of a teacher and a student (docs/planning.md, "Preflight").

Why before the job runs: tokenizers that differ, embeddings padded to different sizes, a
``seq_len`` past a model's positions and bf16 on a card without it are each known from the
configs and tokenizers alone, and each otherwise surfaces as a crash or a silently bad
student hours into a run. Every check returns `Finding`s with a code and a message; the plan
returns them all, and the API refuses the 'error' ones at submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Finding",
    "check_dtype",
    "check_positions",
    "compare_chat_templates",
    "compare_tokenizers",
    "max_positions",
]


@dataclass(frozen=True)
class Finding:
    """A preflight result: ``severity`` 'error' refuses the job (422 naming ``param``)."""

    code: str
    severity: str  # "error" | "warning" | "info"
    message: str
    param: str | None = None


#: Families whose position embeddings are a learned table: past it the model cannot run.
_ABSOLUTE = ("gpt2", "opt", "gpt_neo", "bert", "roberta", "distilbert", "gptj", "bloom")


def max_positions(config: dict[str, Any]) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = config.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_positions(seq_len: int, role: str, config: dict[str, Any] | None) -> list[Finding]:
    """``training.seq_len`` against the model's positions: an error for learned position
    tables (an index past the table), a warning for rotary models (they run, but past the
    trained length quality falls)."""
    if not config:
        return []
    n = max_positions(config)
    if n is None or seq_len <= n:
        return []
    mt = str(config.get("model_type", ""))
    if mt in _ABSOLUTE or mt == "opt":
        return [
            Finding(
                "seq_len_exceeds_positions",
                "error",
                f"training.seq_len {seq_len} exceeds the {role}'s {n} positions ({mt} has a "
                "learned position table)",
                "spec.training.seq_len",
            )
        ]
    return [
        Finding(
            "seq_len_exceeds_positions",
            "warning",
            f"training.seq_len {seq_len} exceeds the {role}'s max_position_embeddings {n} "
            "(rotary positions run past it, with degraded quality)",
            "spec.training.seq_len",
        )
    ]


def check_dtype(
    precision: str, gpu_type: str | None, bf16: bool | None, where: str = "the pool's"
) -> list[Finding]:
    """bf16 asked on a card without it (``bf16`` False; None: not known). ``where``: whose
    card, in the message ("the pool's" at submission, "this worker's" at job start)."""
    if precision == "bf16" and bf16 is False:
        return [
            Finding(
                "bf16_unsupported",
                "error",
                f"{where} {gpu_type} has no bfloat16: use training.precision 'fp16' or "
                "'fp32', or another pool",
                "spec.training.precision",
            )
        ]
    return []


def compare_tokenizers(
    teacher: Any,
    student: Any,
    *,
    teacher_rows: int | None,
    student_rows: int | None,
    cross_tokenizer: str | None,
) -> list[Finding]:
    """Identical / same vocabulary with padded embeddings / overlapping / disjoint.

    Same vocabulary (token → id) is what distillation over one vocabulary needs; embedding
    matrices padded past the tokenizer's length (Qwen2.5: 151 936 vs 152 064 rows for a
    151 665-token tokenizer) are then fine: the logits are sliced to the tokenizer's length.
    Different vocabularies need ``method.cross_tokenizer``.
    """
    out: list[Finding] = []
    tv, sv = teacher.get_vocab(), student.get_vocab()
    n = len(teacher)
    if tv == sv:
        rows = {r for r in (teacher_rows, student_rows) if r is not None}
        if len(rows) > 1:
            out.append(
                Finding(
                    "vocab_padded",
                    "info",
                    f"one tokenizer ({n} tokens); embeddings padded to {teacher_rows} "
                    f"(teacher) and {student_rows} (student) rows: distilled over the "
                    f"tokenizer's {n} tokens (logits sliced)",
                )
            )
        else:
            out.append(Finding("tokenizers_identical", "info", f"one tokenizer ({n} tokens)"))
        for role, r in (("teacher", teacher_rows), ("student", student_rows)):
            if r is not None and r < n:
                out.append(
                    Finding(
                        "embeddings_too_small",
                        "error",
                        f"the {role} has {r} embedding rows but the tokenizer has {n} tokens",
                        f"spec.{role}.model",
                    )
                )
        if cross_tokenizer:
            out.append(
                Finding(
                    "cross_tokenizer_unneeded",
                    "info",
                    f"method.cross_tokenizer '{cross_tokenizer}' with one tokenizer: its "
                    "alignment is the identity",
                )
            )
        return out
    shared = set(tv) & set(sv)
    share = len(shared) / max(1, len(tv))
    code = "tokenizers_overlap" if shared else "tokenizers_disjoint"
    what = (
        f"different tokenizers: teacher {len(teacher)} tokens, student {len(student)}; "
        f"{len(shared)} token strings shared ({share:.0%} of the teacher's)"
    )
    if cross_tokenizer is None:
        out.append(
            Finding(
                code,
                "error",
                f"{what}: distillation over one vocabulary needs identical token ids; set "
                "method.cross_tokenizer 'gold' (exact mapping of the shared tokens, ULD on the "
                "rest) or 'uld'",
                "spec.method.cross_tokenizer",
            )
        )
    else:
        sev = "warning" if (not shared and cross_tokenizer == "gold") else "info"
        note = " (nothing shared: GOLD is plain ULD here)" if sev == "warning" else ""
        out.append(Finding(code, sev, f"{what}; distilled with {cross_tokenizer}{note}"))
    return out


_SAMPLE_CHAT = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def compare_chat_templates(teacher: Any, student: Any) -> list[Finding]:
    """Both tokenizers' own ``apply_chat_template`` on a fixed conversation: same text (and,
    with one vocabulary, same ids) or a warning; nothing to compare when either has none."""
    t_tpl = getattr(teacher, "chat_template", None)
    s_tpl = getattr(student, "chat_template", None)
    if not t_tpl or not s_tpl:
        if t_tpl or s_tpl:
            who = "teacher" if t_tpl else "student"
            return [
                Finding(
                    "chat_template_one_sided",
                    "info",
                    f"only the {who}'s tokenizer has a chat template; chat data is rendered "
                    "with the job's template",
                )
            ]
        return []
    try:
        t_text = teacher.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
        s_text = student.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that fails to render is a finding
        return [Finding("chat_template_error", "warning", f"a chat template fails to render: {e}")]
    if t_text != s_text:
        return [
            Finding(
                "chat_template_differs",
                "warning",
                "the teacher's and the student's chat templates render a conversation "
                f"differently ({t_text[:60]!r}… vs {s_text[:60]!r}…): the teacher sees other "
                "text than the student",
            )
        ]
    if teacher.get_vocab() == student.get_vocab():
        t_ids = teacher(t_text, add_special_tokens=False)["input_ids"]
        s_ids = student(s_text, add_special_tokens=False)["input_ids"]
        if t_ids != s_ids:
            return [
                Finding(
                    "chat_template_tokens_differ",
                    "warning",
                    "the chat templates render the same text but different token ids",
                )
            ]
    return [Finding("chat_template_same", "info", "the chat templates render the same tokens")]
