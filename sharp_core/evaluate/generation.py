"""Answer quality: answers generated for a prompt set, scored with ROUGE-L against references.

ROUGE-L F1 (Google's `rouge-score`, with stemming) is what DistiLLM and MiniLLM report for
distilled students' answers; exact match is added where references are short (a name, a
number), where ROUGE's partial credit would flatter a wrong answer. A sample of the answers is
kept for people to read: the numbers alone never say *how* a student is wrong.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharp_core.data.formats import detect_format, template_of, validate_chat_rows, validate_pairs
from sharp_core.errors import DataError, SpecError
from sharp_core.spec import GenerationSpec

if TYPE_CHECKING:
    import torch

#: Sample answers keep at most this many characters of each field.
SAMPLE_CHARS = 2000


@dataclass
class GenerationResult:
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


#: A prompt: text, or a conversation (rendered with the tokenizer's chat template when the
#: answers are generated: the service checks a set without loading a tokenizer).
Prompt = str | list[dict[str, str]]


def _set_format(row: dict[str, Any], spec: GenerationSpec) -> str:
    """'reference' (the set's `prompt_field`/`reference_field`), or the data issue's 'chat'
    (`messages`) and 'prompt_completion' (`prompt` + `completion`), told apart as
    `sharp_core.data.formats.detect_format` tells training data (docs/data.md)."""
    if spec.reference_field in row:
        return "reference"
    fields = {"messages": "messages", "prompt": spec.prompt_field, "completion": "completion"}
    fmt = detect_format(list(row), "auto", fields)
    return "reference" if fmt == "text" else fmt


def _chat_row(conv: Any, where: str, param: str, row: int) -> tuple[Prompt, str]:
    """A conversation → (the turns before its last assistant turn, that turn's content)."""
    try:
        validate_chat_rows([conv], where, param, first_row=row)
    except DataError as e:
        raise SpecError(e.message, param=param) from None
    last = max((j for j, m in enumerate(conv) if m["role"] == "assistant"), default=None)
    if last is None:
        raise SpecError(
            f"{where}: row {row}: no assistant turn: the reference is the conversation's last "
            "assistant turn, and answer quality needs one per prompt",
            param=param,
        )
    if last == 0:
        raise SpecError(f"{where}: row {row}: no turn before the assistant's", param=param)
    prompt = [{"role": m["role"], "content": m["content"]} for m in conv[:last]]
    return prompt, str(conv[last]["content"])


def read_prompt_set(
    path: str | Path, spec: GenerationSpec, param: str = "evaluation.generation.set"
) -> list[tuple[Prompt, str]]:
    """(prompt, reference) pairs of a jsonl file, the first `spec.limit`: `prompt_field` /
    `reference_field` rows, `prompt` / `completion` rows (reference = completion) or
    `messages` rows (prompt = the conversation up to its last assistant turn, reference = that
    turn). One format per file. SpecError naming `param` when the file is missing, a line does
    not parse, or a line has no reference."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{param}: no prompt set at '{path}'", param=param)
    where = f"{param}: '{path}'"
    pairs: list[tuple[Prompt, str]] = []
    fmt: str | None = None
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpecError(
                    f"{param}: line {n} of '{path}' is not JSON: {e}", param=param
                ) from None
            if not isinstance(row, dict):
                raise SpecError(f"{param}: line {n} of '{path}' is not an object", param=param)
            fmt = fmt or _set_format(row, spec)
            if fmt == "chat":
                pairs.append(_chat_row(row.get("messages"), where, param, n))
            else:
                ref_field = spec.reference_field if fmt == "reference" else "completion"
                prompt, ref = row.get(spec.prompt_field), row.get(ref_field)
                if not isinstance(prompt, str) or not prompt:
                    raise SpecError(
                        f"{param}: line {n} of '{path}' has no '{spec.prompt_field}' text",
                        param=param,
                    )
                if not isinstance(ref, str) or not ref.strip():
                    raise SpecError(
                        f"{param}: line {n} of '{path}' has no reference ('{ref_field}'): "
                        "answer quality needs one per prompt",
                        param=param,
                    )
                if fmt == "prompt_completion":
                    try:
                        validate_pairs([prompt], [ref], where, param, first_row=n)
                    except DataError as e:
                        raise SpecError(e.message, param=param) from None
                pairs.append((prompt, ref))
            if len(pairs) >= spec.limit:
                break
    if not pairs:
        raise SpecError(f"{param}: '{path}' holds no prompt", param=param)
    return pairs


def render_prompts(
    tokenizer: Any, prompts: list[Prompt], chat_template: str | None, param: str
) -> tuple[list[str], bool]:
    """The prompts as text, and whether that text already holds the special tokens (chat:
    each conversation through the chat template with its generation prompt, as a chat model
    is asked; the template's BOS is not added twice)."""
    if not any(isinstance(p, list) for p in prompts):
        return [str(p) for p in prompts], False
    try:
        template = template_of(tokenizer, chat_template)
    except DataError:
        raise SpecError(
            f"{param}: the set is chat but the tokenizer has no chat template: give one in "
            "spec.dataset.chat_template",
            param=param,
        ) from None
    out = [
        str(
            tokenizer.apply_chat_template(
                p, chat_template=template, tokenize=False, add_generation_prompt=True
            )
        )
        for p in prompts
    ]
    return out, True


def normalize(text: str) -> str:
    """Lower case, no punctuation, articles or extra spaces (SQuAD's answer normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_answers(answers: list[str], references: list[str], short_words: int) -> dict[str, float]:
    """``gen/rougeL`` (mean ROUGE-L F1, stemmed), and over references of at most
    `short_words` words ``gen/exact_match`` (normalised answer's first line == reference) with
    ``gen/exact_match_n``; ``gen/answers`` counts the prompts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references, strict=True)
    ]
    out = {"gen/rougeL": sum(rouge) / len(rouge), "gen/answers": float(len(rouge))}
    short = [
        (a, r) for a, r in zip(answers, references, strict=True) if len(r.split()) <= short_words
    ]
    if short:
        hits = [normalize(a.strip().split("\n")[0]) == normalize(r) for a, r in short]
        out["gen/exact_match"] = sum(hits) / len(hits)
        out["gen/exact_match_n"] = float(len(hits))
    return out


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    decoding: str,
    device: torch.device | str,
    seed: int = 0,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> list[str]:
    """Continuations of each prompt (left-padded batches; the prompt cut from the left to
    leave room for the answer in the model's context). `add_special_tokens` False for text
    that holds them already (a rendered chat template)."""
    import torch  # late: the service validates prompt sets without loading torch

    cfg = getattr(model, "config", None)
    ctx = next(
        (
            v
            for a in ("max_position_embeddings", "n_positions")
            if isinstance(v := getattr(cfg, a, None), int)
        ),
        2048,
    )
    keep = max(1, ctx - max_new_tokens)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                ids = [
                    tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"][-keep:]
                    for p in prompts[i : i + batch_size]
                ]
                width = max(len(x) for x in ids)
                x = torch.full((len(ids), width), pad, dtype=torch.long)
                mask = torch.zeros_like(x)
                for r, seq in enumerate(ids):  # left padding: every prompt ends at the last column
                    x[r, width - len(seq) :] = torch.tensor(seq)
                    mask[r, width - len(seq) :] = 1
                if decoding == "sample":
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                y = model.generate(  # type: ignore[operator]
                    input_ids=x.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=decoding == "sample",
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for row in y[:, width:].tolist():
                    out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def answer_quality(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: GenerationSpec,
    *,
    device: torch.device | str,
    resolve: Callable[[str, str], Path] | None = None,
    seed: int = 0,
    chat_template: str | None = None,
) -> GenerationResult:
    """Generate and score the answers of the prompt set `spec.set` (`resolve` maps the path
    to a real one, refusing paths outside the roots, in the service; `chat_template` the
    job's ``dataset.chat_template``, for a chat set and a tokenizer without one)."""
    param = "spec.evaluation.generation.set"
    path = resolve(spec.set, param) if resolve is not None else Path(spec.set)
    pairs = read_prompt_set(path, spec, param)
    prompts, special = render_prompts(tokenizer, [p for p, _ in pairs], chat_template, param)
    refs = [r for _, r in pairs]
    answers = generate_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=spec.max_new_tokens,
        decoding=spec.decoding,
        device=device,
        seed=seed,
        add_special_tokens=not special,
    )
    metrics = score_answers(answers, refs, spec.short_reference_words)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    samples = [
        {
            "prompt": p[-SAMPLE_CHARS:],
            "reference": r[:SAMPLE_CHARS],
            "answer": a[:SAMPLE_CHARS],
            "rougeL": round(scorer.score(r, a)["rougeL"].fmeasure, 4),
        }
        for p, r, a in list(zip(prompts, refs, answers, strict=True))[: spec.samples]
    ]
    return GenerationResult(metrics, samples)
