"""Rows to tokens: the text, chat and prompt/completion formats, and which tokens are trained.

Every format gives, per row, ``input_ids`` and a ``loss_mask`` of the same length (1 = the
token is a training target). One mask is the single source for the CE term, every divergence,
the attention terms' query masks, the teacher-logit cache and the evaluation (docs/data.md).

Chat rows go through the tokenizer's chat template (`apply_chat_template`; ``dataset.
chat_template`` for a tokenizer without one). The assistant tokens are the template's own
``{% generation %}`` spans where it marks them (``return_assistant_tokens_mask``); otherwise
each assistant turn is located by rendering the conversation prefix by prefix (up to the
turn with ``add_generation_prompt``, then through it) and taking the characters between,
mapped to tokens by their offsets: the answer and the template's end-of-turn marker, which is
what the model must learn to emit to stop (TRL's ``assistant_only_loss`` does the same).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sharp_core.errors import DataError

__all__ = [
    "ROLES",
    "Rendering",
    "check_render_identity",
    "check_rows",
    "detect_format",
    "encode_rows",
    "needed_columns",
    "render_chat",
    "resolve_loss_on",
    "special_ids",
    "template_of",
    "tokenizer_digest",
    "validate_chat_rows",
    "validate_pairs",
]

#: The roles a conversation may use.
ROLES = ("system", "user", "assistant", "tool")


def detect_format(columns: Sequence[str], fmt: str, fields: dict[str, str]) -> str:
    """The data's format: ``fmt`` when given, else from the columns (`messages` → chat,
    `prompt` + `completion` → prompt_completion, else text)."""
    if fmt != "auto":
        return fmt
    if fields["messages"] in columns:
        return "chat"
    if fields["prompt"] in columns and fields["completion"] in columns:
        return "prompt_completion"
    return "text"


def resolve_loss_on(fmt: str, loss_on: str) -> str:
    """'assistant' or 'all'; 'auto' is 'assistant' for conversations and pairs, 'all' for text."""
    if loss_on == "auto":
        return "all" if fmt == "text" else "assistant"
    if fmt == "text" and loss_on == "assistant":
        raise DataError(
            "loss_on='assistant' needs chat or prompt_completion data; this data set is text",
            param="spec.dataset.loss_on",
        )
    return loss_on


def template_of(tokenizer: Any, given: str | None) -> str:
    """The chat template used: the spec's, else the tokenizer's; none is an error."""
    template = given or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise DataError(
            "the data is chat but the tokenizer has no chat template: give one in "
            "spec.dataset.chat_template",
            param="spec.dataset.chat_template",
        )
    return str(template)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser) when it has
    one (fast tokenizers), else of its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(
            [sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map], default=str
        )
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


# ------------------------------------------------------------------------- validation


def validate_chat_rows(rows: Sequence[Any], where: str, param: str, first_row: int = 0) -> None:
    """Refuse a conversation with an unknown role, a non-string content or an empty
    assistant turn; the error names the file (`where`), the row and the field."""
    for i, conv in enumerate(rows):
        row = first_row + i

        def bad(msg: str, row: int = row) -> DataError:
            return DataError(f"{where}: row {row}: {msg}", param=param)

        if not isinstance(conv, list) or not conv:
            raise bad("'messages' must be a non-empty list of {role, content}")
        for j, m in enumerate(conv):
            if not isinstance(m, dict):
                raise bad(f"messages[{j}] is not an object with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise bad(f"messages[{j}].role {role!r} is not one of {list(ROLES)}")
            if not isinstance(content, str):
                raise bad(f"messages[{j}].content is {type(content).__name__}, not a string")
            if role == "assistant" and not content.strip():
                raise bad(f"messages[{j}].content: empty assistant turn")


def validate_pairs(
    prompts: Sequence[Any], completions: Sequence[Any], where: str, param: str, first_row: int = 0
) -> None:
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        for name, v in (("prompt", p), ("completion", c)):
            if not isinstance(v, str):
                raise DataError(
                    f"{where}: row {first_row + i}: {name} is {type(v).__name__}, not a string",
                    param=param,
                )
        if not c.strip():
            raise DataError(f"{where}: row {first_row + i}: empty completion", param=param)


def needed_columns(fmt: str, fields: dict[str, str]) -> list[str]:
    """The columns a format reads (``fields``: the spec's field names, resolved)."""
    return {
        "text": [fields["text"]],
        "chat": [fields["messages"]],
        "prompt_completion": [fields["prompt"], fields["completion"]],
    }[fmt]


def check_rows(
    batch: Mapping[str, Sequence[Any]],
    fmt: str,
    fields: dict[str, str],
    where: str,
    param: str,
    first_row: int = 0,
    text_param: str = "spec.dataset.text_field",
) -> None:
    """A batch of rows (column → values) of the file `where`, starting at row `first_row`:
    its format's columns are there, and every conversation or pair is well formed (an
    unknown role, a non-string content, an empty answer); errors name the file and row
    (`param`; a missing text column: `text_param`). The job's loader and the submission's
    scan (`sharp_core.data.scan`) both check with this."""
    for col in needed_columns(fmt, fields):
        if col not in batch:
            field = next(k for k, v in fields.items() if v == col)
            raise DataError(
                f"{where}: column '{col}' (spec.dataset.{field}_field) not in the data set "
                f"(columns: {list(batch)}); format is {fmt}",
                param=param if fmt != "text" else text_param,
            )
    if fmt == "chat":
        validate_chat_rows(batch[fields["messages"]], where, param, first_row)
    elif fmt == "prompt_completion":
        validate_pairs(
            batch[fields["prompt"]], batch[fields["completion"]], where, param, first_row
        )


# ------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class Rendering:
    """How conversations are rendered: the template, and whether it marks assistant spans."""

    template: str
    generation_tags: bool

    @classmethod
    def of(cls, tokenizer: Any, given: str | None) -> Rendering:
        t = template_of(tokenizer, given)
        return cls(t, "{% generation %}" in t or "{%- generation %}" in t)


def _clean(conv: list[dict[str, Any]]) -> list[dict[str, str]]:
    """role and content only (parquet rows may carry null extra keys)."""
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def render_chat(
    tokenizer: Any, conv: list[dict[str, Any]], r: Rendering, *, prefix_diff: bool = False
) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of one conversation. ``prefix_diff`` forces the prefix-by-
    prefix method even where the template has generation tags (tests compare the two)."""
    conv = _clean(conv)
    if r.generation_tags and not prefix_diff:
        out = tokenizer.apply_chat_template(
            conv,
            chat_template=r.template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return list(out["input_ids"]), [int(v) for v in out["assistant_masks"]]

    def text(msgs: list[dict[str, str]], gen: bool) -> str:
        s = tokenizer.apply_chat_template(
            msgs, chat_template=r.template, tokenize=False, add_generation_prompt=gen
        )
        return str(s)

    full = text(conv, False)
    spans = []
    for j, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        before, through = text(conv[:j], True), text(conv[: j + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                "the chat template does not render a conversation's prefixes as prefixes of "
                "it, so the assistant tokens cannot be found: use a template with "
                "{% generation %} tags",
                param="spec.dataset.chat_template",
            )
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s < b for a, b in spans):
            mask[t] = 1
    return ids, mask


def check_render_identity(
    teacher_tok: Any, student_tok: Any, convs: Sequence[list[dict[str, Any]]], template: str | None
) -> None:
    """Teacher and student must turn each conversation into the same tokens (one sequence
    feeds both); the error gives the row and the first position where they differ."""
    rt, rs = Rendering.of(teacher_tok, template), Rendering.of(student_tok, template)
    for row, conv in enumerate(convs):
        a, _ = render_chat(teacher_tok, conv, rt)
        b, _ = render_chat(student_tok, conv, rs)
        if a != b:
            pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            pos = min(len(a), len(b)) if pos is None else pos
            raise DataError(
                f"teacher and student render conversation {row} differently: first difference "
                f"at token {pos} (teacher {a[pos : pos + 1]}, student {b[pos : pos + 1]}; lengths "
                f"{len(a)} and {len(b)}); give one spec.dataset.chat_template for both",
                param="spec.dataset.chat_template",
            )


# ------------------------------------------------------------------------- batched encoding


def special_ids(tokenizer: Any, packing: str) -> tuple[list[int], list[int]]:
    """(ids before, ids after) each text or pair document: 'documents' and 'none' frame a
    document as the tokenizer does (its BOS when encoding adds one), then its EOS; 'concat'
    puts EOS between documents, as before."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to end documents", param="spec.tokenizer")
    if packing == "concat":
        return [], [int(eos)]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    head = [int(bos)] if bos is not None and len(probe) > len(bare) and probe[0] == bos else []
    return head, [int(eos)]


def encode_rows(
    batch: dict[str, list[Any]],
    *,
    tokenizer: Any,
    fmt: str,
    loss_on: str,
    packing: str,
    fields: dict[str, str],
    template: str | None,
) -> dict[str, list[list[int]]]:
    """A `datasets.map(batched=True)` function: rows → ``input_ids`` and ``loss_mask``."""
    head, tail = special_ids(tokenizer, packing)
    ids_out: list[list[int]] = []
    mask_out: list[list[int]] = []
    every = loss_on == "all"
    if fmt == "text":
        # blank rows (and non-strings) are no documents
        texts = [t for t in batch[fields["text"]] if isinstance(t, str) and t.strip()]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
            doc = head + list(ids) + tail
            ids_out.append(doc)
            mask_out.append([1] * len(doc))
    elif fmt == "prompt_completion":
        p_ids = tokenizer(batch[fields["prompt"]], add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(batch[fields["completion"]], add_special_tokens=False)["input_ids"]
        for p, c in zip(p_ids, c_ids, strict=True):
            prompt, answer = head + list(p), list(c) + tail
            ids_out.append(prompt + answer)
            mask_out.append([int(every)] * len(prompt) + [1] * len(answer))
    else:
        r = Rendering.of(tokenizer, template)
        for conv in batch[fields["messages"]]:
            ids, mask = render_chat(tokenizer, conv, r)
            ids_out.append(ids)
            mask_out.append([1] * len(ids) if every else mask)
    return {"input_ids": ids_out, "loss_mask": mask_out}
