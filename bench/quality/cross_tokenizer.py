"""Distillation across tokenizers, on the CPU: ULD and GOLD students against a student trained
without a teacher (sft), an equal tuning budget per method, chosen on validation, reported on a
separate test text over fresh seeds, paired (docs/results.md)::

    python -m bench.quality.cross_tokenizer --out docs/results/cross_tokenizer_tuned.json

The teacher: a Llama (hidden 64, 2 layers) trained on the corpus with its own byte-level BPE
(vocabulary `--teacher-vocab`). The students: a smaller Llama (hidden 32, 2 layers) with
another BPE trained on the same text (`--student-vocab`), from the same random start per
seed, for the same steps, batch and data order; only the objective differs (sft: CE only;
uld / gold: (1 − a)·CE + a·D across tokenizers at temperature τ).

Protocol. Text: Python's pydoc topics, joined in key order. Training corpus: its first
`--corpus-chars` characters; validation: the job's own held-out tail of that corpus
(`eval_fraction` 0.1, the job's `eval_ppl`); test: the next `--test-chars` characters, never
seen in training nor in tuning. Tuning (seed `--tune-seed`, one run per trial, chosen on the
validation perplexity): sft gets its trials on the learning rate; uld and gold the same number
of trials on their own knobs (a, τ) at the learning rate sft chose. Test: the chosen
configuration of each method on `--seeds` fresh seeds, its test perplexity in the student's
tokens (one tokenizer for every student, so one scale), bits per byte, and the student's mean
predictive entropy and top-1 probability against its top-1 accuracy (calibration). Every
cell is written to `--out` as it finishes.

``--teacher-text N_CHARS`` is the ULD paper's setting (Boizard et al. 2024 distil on answers
the teacher generated): after the teacher is trained, it samples N_CHARS of text
(`teacher_samples`: temperature 1, prompts of 16 teacher tokens cut from the training corpus)
and every arm trains on that text instead of the corpus; the student tokenizer is still the
one trained on the corpus (`real_corpus_tokenizer`), so the student is the same model as in
the main study. Validation is the held-out tail of the sampled text; the test cells are
measured on the real test text and on ``--gen-test-chars`` of held-out teacher samples
(prompts cut from the test text), both paired::

    python -m bench.quality.cross_tokenizer --teacher-text 200000 --control \\
        --out docs/results/cross_tokenizer_teacher_text.json

``--pretrain-student STEPS`` tests ULD where calibration could be the student's problem: a
*pretrained* student fine-tuned on a new domain, as the paper's students are. Before tuning,
one student (the same model, the student tokenizer of `real_corpus_tokenizer`) is trained with
sft for STEPS steps on ``--pretrain-text`` (default: tinyshakespeare from the shared data when
present, else the standard library's own source, `pretrain_text`), tested on the test text
(its perplexity before fine-tuning), and every arm, tuning and test cells alike, starts from
that checkpoint (``student: {model: <it>, init: pretrained}``) instead of a random init::

    python -m bench.quality.cross_tokenizer --pretrain-student 2000 \\
        --out docs/results/cross_tokenizer_pretrained_student.json

``--student-chars N`` tests ULD where the student overfits: the teacher still trains on the
whole corpus, but every student arm trains on its first N characters only (validation: the
held-out tail of those N), for the same steps, so sft sees each token many times; the student
tokenizer is the one trained on the whole corpus (`real_corpus_tokenizer`), the same model and
vocabulary as the main study, and the test text is unchanged::

    python -m bench.quality.cross_tokenizer --student-chars 20000 --first-seed 30 \\
        --out docs/results/cross_tokenizer_low_data.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

TEACHER = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
STUDENT = {**TEACHER, "hidden_size": 32, "intermediate_size": 64}

#: Each method's trials (the same number each). sft's only knob is the learning rate; uld and
#: gold tune (kd_weight a, temperature τ) at the learning rate sft chose.
GRIDS: dict[str, list[dict[str, float]]] = {
    "sft": [{"lr": 3e-3}, {"lr": 6e-3}, {"lr": 1e-2}, {"lr": 1.5e-2}],
    "uld": [{"kd_weight": a, "temperature": 1.0} for a in (0.01, 0.03, 0.1, 0.3)],
    "gold": [{"kd_weight": a, "temperature": 1.0} for a in (0.3, 0.5, 0.7, 0.9)],
}


def _spec(corpus: Path, method: dict[str, Any], seed: int, steps: int, lr: float, **over: Any):
    d = {
        "name": "xtok",
        "student": {"init": "config", "config": dict(STUDENT)},
        "dataset": {"files": [str(corpus)], "eval_fraction": 0.1},
        "method": method,
        "training": {
            "max_steps": steps,
            "batch_size": 8,
            "seq_len": 64,
            "lr": lr,
            "warmup_steps": 10,
            "eval_every": 0,
            "checkpoint_every": 0,
            "seed": seed,
        },
    }
    d.update(over)
    return d


def _train(spec: dict, out: Path) -> tuple[dict[str, float], Path]:
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import train

    class Rec:
        def __init__(self) -> None:
            self.metrics: dict[int, dict[str, float]] = {}

        def on_metrics(self, step: int, m: dict[str, float]) -> None:
            self.metrics.setdefault(step, {}).update(m)

        def on_checkpoint(self, *a: Any) -> None: ...
        def on_event(self, *a: Any) -> None: ...
        def should_stop(self) -> bool:
            return False

    rec = Rec()
    res = train(parse_spec(spec), out, callbacks=rec)  # type: ignore[arg-type]
    last = max(s for s in rec.metrics if "eval_ppl" in rec.metrics[s])
    m = rec.metrics[last]
    fractions = [v["aligned_fraction"] for v in rec.metrics.values() if "aligned_fraction" in v]
    # the training CE of the last 20 steps, beside the validation loss: the overfitting gap
    ces = [rec.metrics[s]["ce"] for s in sorted(rec.metrics) if "ce" in rec.metrics[s]][-20:]
    assert res.checkpoint is not None
    return {
        "val_ppl": m["eval_ppl"],
        "val_loss": m["eval_loss"],
        "train_ce_last20": sum(ces) / len(ces) if ces else float("nan"),
        "steps": float(res.step),
        "aligned_fraction": sum(fractions) / len(fractions) if fractions else float("nan"),
    }, Path(res.checkpoint)


def test_metrics(folder: Path, text: str, seq_len: int = 64) -> dict[str, float]:
    """The model in ``folder`` on ``text`` cut into blocks of ``seq_len`` of its own tokens:
    perplexity, bits per byte (comparable across tokenizers), mean predictive entropy (nats),
    mean top-1 probability and top-1 accuracy (a calibrated model has the two close)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharp_core.objectives.cross_tokenizer import token_bytes

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len * seq_len
    blocks = torch.tensor(ids[:n]).view(-1, seq_len)  # (B, N)
    nbytes = [len(b) for b in token_bytes(tok, ids[:n])]
    pred_bytes = sum(nb for k, nb in enumerate(nbytes) if k % seq_len != 0)
    nll = ent = top1 = acc = 0.0
    count = 0
    with torch.no_grad():
        for chunk in blocks.split(32):
            logits = model(input_ids=chunk).logits[:, :-1, : len(tok)].float()  # (b, N-1, V)
            logp = torch.log_softmax(logits, -1)
            y = chunk[:, 1:]
            nll += float(-logp.gather(-1, y[..., None]).sum())
            ent += float(-(logp.exp() * logp).sum())
            p1, a1 = logp.max(-1)
            top1 += float(p1.exp().sum())
            acc += float((a1 == y).sum())
            count += y.numel()
    return {
        "test_ppl": math.exp(nll / count),
        "test_bpb": nll / (pred_bytes * math.log(2)),
        "test_entropy": ent / count,
        "test_top1_prob": top1 / count,
        "test_top1_acc": acc / count,
        "test_tokens": float(count),
    }


def teacher_samples(
    folder: Path,
    prompts_from: str,
    n_chars: int,
    seed: int,
    prompt_tokens: int = 16,
    new_tokens: int = 160,
    window: int = 64,
    batch: int = 64,
) -> tuple[str, dict[str, Any]]:
    """Text sampled from the model in ``folder`` (sequence-level distillation data, as in
    Boizard et al. 2024, whose students learn from the teacher's answers): each sample starts
    from ``prompt_tokens`` of the model's own tokens cut at a random place of ``prompts_from``
    and continues for ``new_tokens`` drawn at temperature 1 from the whole vocabulary (no
    top-k / top-p), each one conditioned on the last ``window`` − 1 tokens (the teacher's
    training length: it never saw longer contexts). Only the continuations are kept, decoded
    by the model's tokenizer (its special tokens dropped) and joined by blank lines, until
    ``n_chars`` characters; the text is cut there. Returns the text and its statistics."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompts_from, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    samples: list[str] = []
    total = drawn = n_special = 0
    with torch.no_grad():
        while total < n_chars:
            starts = [rng.randrange(len(ids) - prompt_tokens) for _ in range(batch)]
            seqs = torch.tensor([ids[s : s + prompt_tokens] for s in starts])  # (b, P)
            for _ in range(new_tokens):
                ctx = seqs[:, -(window - 1) :]
                logits = model(input_ids=ctx).logits[:, -1, : len(tok)].float()  # (b, V)
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                seqs = torch.cat([seqs, nxt], 1)
            for row in seqs[:, prompt_tokens:].tolist():
                n_special += sum(t in special for t in row)
                drawn += len(row)
                text = tok.decode(row, skip_special_tokens=True)
                samples.append(text)
                total += len(text) + 2
    text = "\n\n".join(samples)[:n_chars]
    return text, {
        "samples": len(samples),
        "tokens_drawn": drawn,
        "special_tokens_drawn": n_special,
        "replacement_chars": text.count("\ufffd"),
        "chars": len(text),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "window": window,
        "seed": seed,
    }


#: ../shared/data beside the repository, as tests/helpers.SHARED_CORPUS
SHARED_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def pretrain_text(path: Path | None) -> tuple[str, str]:
    """The pretraining text of ``--pretrain-student`` and where it came from: ``path``, else
    tinyshakespeare from the shared data when present, else the source code of five standard
    library modules (a second real text every CPython has; tests/test_nlu.py's fallback)."""
    if path is None and SHARED_TEXT.is_file():
        path = SHARED_TEXT
    if path is not None:
        return path.read_text(encoding="utf-8"), str(path)
    import argparse as m1
    import inspect
    import logging as m2
    import os as m3
    import subprocess as m4

    mods = (m3, m1, m2, m4, inspect)
    return "\n\n".join(inspect.getsource(m) for m in mods), "stdlib:" + ",".join(
        m.__name__ for m in mods
    )


def real_corpus_tokenizer(corpus: Path, vocab: int, out: Path) -> Path:
    """The student's BPE trained on the real corpus exactly as a job's ``tokenizer.train``
    does (the same rows, the same trainer), saved to ``out``: with ``--teacher-text`` the
    students train on generated text but keep the tokenizer of the main study."""
    from sharp_core.data.lm import LMSource, training_texts
    from sharp_core.models.loading import LocalResolver, train_bpe_tokenizer
    from sharp_core.spec import parse_spec

    ds = parse_spec(_spec(corpus, {"name": "sft"}, 0, 1, 1e-3)).dataset
    src = LMSource(ds, LocalResolver())
    tok = train_bpe_tokenizer(iter(training_texts(src.table(), src.format, src.fields)), vocab)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/xtok"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=5, help="how many test seeds")
    ap.add_argument("--first-seed", type=int, default=10, help="the first test seed")
    ap.add_argument("--tune-seed", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--teacher-vocab", type=int, default=512)
    ap.add_argument("--student-vocab", type=int, default=384)
    ap.add_argument("--corpus-chars", type=int, default=200_000)
    ap.add_argument("--test-chars", type=int, default=50_000)
    ap.add_argument("--teacher", type=Path, default=None, help="reuse a trained teacher folder")
    ap.add_argument("--methods", default="sft,uld,gold", help="uld / gold need sft")
    ap.add_argument(
        "--teacher-text",
        type=int,
        default=0,
        metavar="N_CHARS",
        help="the paper's setting: every student trains on N_CHARS of text sampled from the "
        "teacher (temperature 1, prompts cut from the training corpus; `teacher_samples`) "
        "instead of the corpus, with the student tokenizer still trained on the corpus; the "
        "students are also tested on --gen-test-chars of held-out teacher samples (prompts "
        "cut from the test text)",
    )
    ap.add_argument("--gen-test-chars", type=int, default=50_000)
    ap.add_argument(
        "--pretrain-student",
        type=int,
        default=0,
        metavar="STEPS",
        help="first train one student (sft, STEPS steps) on --pretrain-text with the student "
        "tokenizer of the real corpus, and start every arm from it instead of a random init",
    )
    ap.add_argument(
        "--pretrain-text",
        type=Path,
        default=None,
        help="default: the shared tinyshakespeare when present, else standard library source",
    )
    ap.add_argument("--pretrain-lr", type=float, default=6e-3)
    ap.add_argument(
        "--grids",
        type=Path,
        default=None,
        help="a JSON file of the tuning grids instead of GRIDS ({method: [knobs, ...]}); "
        "every method must get as many trials as the others (an equal budget)",
    )
    ap.add_argument(
        "--student-chars",
        type=int,
        default=0,
        metavar="N",
        help="the students (not the teacher) train on the first N characters of the corpus "
        "only, with the student tokenizer trained on the whole corpus (0: the whole corpus)",
    )
    ap.add_argument(
        "--control",
        action="store_true",
        help="also the same-tokenizer control on the test seeds: students with the teacher's "
        "tokenizer, sft against uld (its chosen knobs) and kd (forward KL, gold's chosen a)",
    )
    ap.add_argument(
        "--reuse-tuning",
        type=Path,
        default=None,
        help="take the tuning and the chosen configurations from this earlier --out file "
        "(same teacher, grids and tuning seed) instead of tuning again: more test seeds",
    )
    ap.add_argument(
        "--finish",
        type=Path,
        default=None,
        help="only add the missing test metrics of an --out file from the checkpoints under "
        "--work, and its comparisons",
    )
    a = ap.parse_args(argv)
    grids = GRIDS if a.grids is None else json.loads(a.grids.read_text())
    if len({len(v) for v in grids.values()}) != 1:
        ap.error(f"--grids: every method needs the same number of trials, not {grids}")
    if a.pretrain_student and a.control:
        ap.error("--control gives students the teacher's tokenizer: not with --pretrain-student")
    import torch

    torch.set_num_threads(1)
    if a.finish is not None:
        finish(a.finish, a.work, a.test_chars)
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    from pydoc_data.topics import topics

    full = "\n\n".join(topics[k] for k in sorted(topics))
    corpus = a.work / "corpus.txt"
    corpus.write_text(full[: a.corpus_chars], "utf-8")
    test_text = full[a.corpus_chars : a.corpus_chars + a.test_chars]
    assert len(test_text) == a.test_chars, "the pydoc topics are shorter than asked"
    t0 = time.time()
    train_corpus = corpus
    doc: dict[str, Any] = {
        "command": "python -m bench.quality.cross_tokenizer "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "teacher_config": TEACHER,
        "student_config": STUDENT,
        "grids": grids,
        "tuning": {},
        "chosen": {},
        "test": {},
    }

    def save() -> None:
        doc["wall_s"] = time.time() - t0
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(doc, indent=1, default=str))

    teacher = a.teacher
    if teacher is None:
        spec = _spec(
            corpus,
            {"name": "sft"},
            0,
            a.teacher_steps,
            3e-3,
            student={"init": "config", "config": dict(TEACHER)},
            tokenizer={"train": {"vocab_size": a.teacher_vocab}},
        )
        from sharp_core.spec import parse_spec
        from sharp_core.train.loop import train

        teacher = train(parse_spec(spec), a.work / "teacher").checkpoint
    assert teacher is not None
    doc["teacher"] = {"folder": str(teacher), **test_metrics(Path(teacher), test_text)}
    student_tok: Path | None = None
    gen_test = ""
    if a.teacher_text:
        text, stats = teacher_samples(Path(teacher), full[: a.corpus_chars], a.teacher_text, 1)
        gen_test, test_stats = teacher_samples(Path(teacher), test_text, a.gen_test_chars, 2)
        train_corpus = a.work / "teacher_text.txt"
        train_corpus.write_text(text, "utf-8")
        (a.work / "teacher_text_test.txt").write_text(gen_test, "utf-8")
        student_tok = real_corpus_tokenizer(corpus, a.student_vocab, a.work / "student_tok")
        doc["teacher_text"] = {
            "train": stats,
            "gen_test": test_stats,
            "train_head": text[:600],
            "student_tokenizer": str(student_tok),
            "wall_s": time.time() - t0,
        }
        doc["teacher"] |= _prefixed(test_metrics(Path(teacher), gen_test), "gen_")
    if a.student_chars:
        if a.teacher_text:
            ap.error("--student-chars cuts the corpus: not with --teacher-text")
        student_tok = real_corpus_tokenizer(corpus, a.student_vocab, a.work / "student_tok")
        train_corpus = a.work / "student_corpus.txt"
        train_corpus.write_text(full[: a.student_chars], "utf-8")
        doc["student_corpus"] = {"chars": a.student_chars, "student_tokenizer": str(student_tok)}
    pretrained: Path | None = None
    if a.pretrain_student:
        if student_tok is None:
            student_tok = real_corpus_tokenizer(corpus, a.student_vocab, a.work / "student_tok")
        text, source = pretrain_text(a.pretrain_text)
        pre_file = a.work / "pretrain.txt"
        pre_file.write_text(text, "utf-8")
        t1 = time.time()
        spec = _spec(
            pre_file,
            {"name": "sft"},
            0,
            a.pretrain_student,
            a.pretrain_lr,
            tokenizer={"name": str(student_tok)},
        )
        r, pretrained = _train(spec, a.work / "pretrain")
        doc["pretrained_student"] = {
            "folder": str(pretrained),
            "text": source,
            "chars": len(text),
            "steps": a.pretrain_student,
            "lr": a.pretrain_lr,
            "val_ppl_on_pretrain_text": r["val_ppl"],
            "train_wall_s": time.time() - t1,
            "student_tokenizer": str(student_tok),
            **test_metrics(pretrained, test_text),
        }
        if gen_test:
            doc["pretrained_student"] |= _prefixed(test_metrics(pretrained, gen_test), "gen_")
        print(f"pretrained student: {doc['pretrained_student']}", flush=True)
    print(f"teacher {teacher}: {doc['teacher']} after {time.time() - t0:.0f} s", flush=True)
    save()

    def cell(
        method: str, knobs: dict[str, float], lr: float, seed: int, tag: str, same: bool = False
    ) -> dict:
        """One student: ``same`` gives it the teacher's tokenizer (the control); method 'kd'
        is forward KL over that one vocabulary."""
        m: dict[str, Any] = {"name": "sft"}
        tokenizer = {"name": str(teacher)} if same else {"train": {"vocab_size": a.student_vocab}}
        if student_tok is not None and not same:
            tokenizer = {"name": str(student_tok)}
        over: dict[str, Any] = {"tokenizer": tokenizer}
        if pretrained is not None and not same:
            over["student"] = {"model": str(pretrained), "init": "pretrained"}
        if method != "sft":
            m = {"name": "kd", **knobs}
            if method != "kd":
                m["cross_tokenizer"] = method
            over["teacher"] = {"model": str(teacher)}
        t1 = time.time()
        r, ckpt = _train(_spec(train_corpus, m, seed, a.steps, lr, **over), a.work / tag)
        if not tag.startswith("tune"):
            r |= test_metrics(ckpt, test_text)
            r |= _prefixed(test_metrics(ckpt, gen_test), "gen_") if gen_test else {}
        r |= {"knobs": knobs, "lr": lr, "seed": seed, "wall_s": time.time() - t1}
        print(f"{tag}: {r}", flush=True)
        return r

    methods = a.methods.split(",")
    if a.reuse_tuning is not None:
        earlier = json.loads(a.reuse_tuning.read_text())
        doc["tuning"], doc["chosen"] = earlier["tuning"], earlier["chosen"]
        doc["tuning_from"] = str(a.reuse_tuning)
        methods = [m for m in methods if m in doc["chosen"]]
    for method in [m for m in methods if m not in doc["chosen"]]:
        lr = 3e-3 if method == "sft" else doc["chosen"]["sft"]["lr"]
        trials = []
        for k, knobs in enumerate(grids[method]):
            lr_k = knobs["lr"] if method == "sft" else lr
            trials.append(cell(method, knobs, lr_k, a.tune_seed, f"tune-{method}-{k}"))
            doc["tuning"][method] = trials
            save()
        best = min(trials, key=lambda r: r["val_ppl"])
        doc["chosen"][method] = {"knobs": best["knobs"], "lr": best["lr"]}
        save()
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    for seed in seeds:
        for method in methods:
            c = doc["chosen"][method]
            r = cell(method, c["knobs"], c["lr"], seed, f"test-{method}-{seed}")
            doc["test"].setdefault(method, {})[str(seed)] = r
            save()
    if a.control:  # the same-tokenizer control: is it the loss or the alignment?
        ch = doc["chosen"]
        arms = {
            "sft": ({}, ch["sft"]["lr"]),
            "uld": (ch["uld"]["knobs"], ch["sft"]["lr"]),
            "kd": (ch["gold"]["knobs"], ch["sft"]["lr"]),
        }
        doc["control"] = {}
        for seed in seeds:
            for method, (knobs, lr) in arms.items():
                r = cell(method, knobs, lr, seed, f"control-{method}-{seed}", same=True)
                doc["control"].setdefault(method, {})[str(seed)] = r
                save()

    summarise(doc)
    save()
    return 0


def _prefixed(d: dict[str, float], prefix: str) -> dict[str, float]:
    return {prefix + k: v for k, v in d.items()}


def summarise(doc: dict[str, Any]) -> None:
    """The paired comparisons of the test cells' perplexities (and of the control's), and
    each arm's mean ± std of the test metrics, into ``doc``; printed."""
    from sharp_core.study.compare import mean_std, paired

    def compare(
        table: dict[str, dict[str, dict]], pairs: list[tuple[str, str]], key: str = "test_ppl"
    ) -> dict:
        ppl = {m: {int(s): r[key] for s, r in rs.items()} for m, rs in table.items()}
        return {
            f"{x}_vs_{y}": paired(ppl[x], ppl[y], relative=True)
            for x, y in pairs
            if x in ppl and y in ppl
        }

    keys = ("test_ppl", "test_bpb", "test_entropy", "test_top1_prob", "test_top1_acc")
    pairs = [("uld", "sft"), ("gold", "sft"), ("gold", "uld")]
    doc["paired_test_ppl_percent"] = compare(doc["test"], pairs)
    gen = all("gen_test_ppl" in r for rs in doc["test"].values() for r in rs.values())
    if gen:  # --teacher-text: also on held-out teacher samples
        doc["paired_gen_test_ppl_percent"] = compare(doc["test"], pairs, "gen_test_ppl")
        keys += tuple("gen_" + k for k in keys)
    doc["summary"] = {
        m: {k: mean_std([r[k] for r in rs.values()]) for k in keys} for m, rs in doc["test"].items()
    }
    if doc.get("control"):
        doc["control_paired_test_ppl_percent"] = compare(
            doc["control"], [("uld", "sft"), ("kd", "sft")]
        )
        doc["control_summary"] = {
            m: {k: mean_std([r[k] for r in rs.values()]) for k in keys}
            for m, rs in doc["control"].items()
        }
    shown = {
        "test ppl": doc["paired_test_ppl_percent"],
        "gen test ppl": doc.get("paired_gen_test_ppl_percent", {}),
        "control test ppl": doc.get("control_paired_test_ppl_percent", {}),
    }
    for what, table in shown.items():
        for k, c in table.items():
            ci = c["ci"] or [float("nan")] * 2
            print(
                f"{k:<12} Δ {what} {c['mean']:+.2f} % "
                f"(95% CI {ci[0]:+.2f}, {ci[1]:+.2f}; p {c['p']})"
            )


def finish(path: Path, work: Path, test_chars: int = 50_000) -> None:
    """A results file whose cells lack their test metrics (the control cells of a run made
    before they were computed for every non-tuning cell): each one's saved final checkpoint
    under ``work`` evaluated on the same test text, then `summarise`; written back."""
    from pydoc_data.topics import topics

    doc = json.loads(path.read_text())
    full = "\n\n".join(topics[k] for k in sorted(topics))
    chars = int(doc["settings"]["corpus_chars"])
    test_text = full[chars : chars + test_chars]
    for stage in ("test", "control"):
        for m, rs in (doc.get(stage) or {}).items():
            for seed, r in rs.items():
                if "test_ppl" not in r:
                    [ckpt] = sorted((work / f"{stage}-{m}-{seed}").glob("step_*"))[-1:]
                    r |= test_metrics(ckpt, test_text)
                    r["test_metrics_added_after_the_run"] = True
    summarise(doc)
    path.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
