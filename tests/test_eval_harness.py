"""Downstream evaluation with the real lm-evaluation-harness, offline: local task files on a
tiny model, checked against hand computations; answer quality; bad task files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sharp_core.errors import SpecError
from sharp_core.evaluate.generation import (
    answer_quality,
    generate_answers,
    read_prompt_set,
    score_answers,
)
from sharp_core.evaluate.harness import check_tasks, flatten_results, run_harness
from sharp_core.models.loading import train_bpe_tokenizer
from sharp_core.spec import GenerationSpec, HarnessSpec
from tests.helpers import corpus_text

NAMES = ["Richard", "Henry", "the duke", "Romeo", "Juliet", "a friar", "my lord", "the king"]


@pytest.fixture(scope="module")
def lm() -> tuple[GPT2LMHeadModel, object]:
    tok = train_bpe_tokenizer([corpus_text(40_000)], 300)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=4, n_embd=32, n_positions=128)
    return GPT2LMHeadModel(cfg).eval(), tok


def write_mc(root: Path, n: int = 16) -> Path:
    """A multiple-choice task: a harness task YAML and its jsonl, data path relative."""
    rows = [
        {
            "question": f"Who speaks in scene {i}?",
            "choices": [NAMES[(i + k) % len(NAMES)] for k in range(3 + i % 2)],
            "answer": i % 3,
        }
        for i in range(n)
    ]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    task = root / "tiny_mc.yaml"
    task.write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: mc.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: answer\n"
        "doc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    return task


def hand_mc_acc(model: GPT2LMHeadModel, tok: object, root: Path) -> float:
    """argmax over choices of the summed log-likelihood of ' ' + choice after the prompt."""
    hits = []
    for line in (root / "mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        ctx = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            c_ids = tok(ctx)["input_ids"]  # type: ignore[operator]
            w_ids = tok(ctx + " " + choice)["input_ids"]  # type: ignore[operator]
            assert w_ids[: len(c_ids)] == c_ids  # the continuation's tokens follow the context's
            x = torch.tensor([w_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            cont = range(len(c_ids), len(w_ids))
            scores.append(sum(logp[i - 1, w_ids[i]].item() for i in cont))
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return sum(hits) / len(hits)


def test_multiple_choice_acc_equals_hand_computation(lm, tmp_path: Path) -> None:
    model, tok = lm
    task = write_mc(tmp_path)
    spec = HarnessSpec(tasks=[str(task)], batch_size=4)
    scores = run_harness(model, tok, spec, device="cpu", workdir=tmp_path / "w")
    want = hand_mc_acc(model, tok, tmp_path)
    assert scores["harness/tiny_mc/acc"] == pytest.approx(want, abs=1e-12)
    assert 0.0 < want < 1.0  # not a degenerate all-or-nothing case
    # the harness's stderr of a mean of 0/1 outcomes: sqrt(p(1-p)/(n-1))
    n = 16
    assert scores["harness/tiny_mc/acc_stderr"] == pytest.approx(
        (want * (1 - want) / (n - 1)) ** 0.5, rel=1e-9
    )
    # limit: the first 5 examples only
    five = run_harness(
        model, tok, HarnessSpec(tasks=[str(task)], limit=5), device="cpu", workdir=tmp_path / "x"
    )
    (tmp_path / "mc5").mkdir()
    rows = (tmp_path / "mc.jsonl").read_text().splitlines()[:5]
    (tmp_path / "mc5" / "mc.jsonl").write_text("\n".join(rows))
    assert five["harness/tiny_mc/acc"] == pytest.approx(hand_mc_acc(model, tok, tmp_path / "mc5"))


def test_generation_task_exact_match(lm, tmp_path: Path) -> None:
    """A generate_until task: references set to the model's own greedy answer for half the
    prompts and to a string it cannot produce for the rest, so exact match must be 0.5."""
    model, tok = lm
    prompts = ["ROMEO:", "JULIET:", "KING HENRY:", "First Citizen:"]
    own = generate_answers(
        model, tok, prompts, max_new_tokens=6, decoding="greedy", device="cpu", batch_size=1
    )
    refs = [own[0].split("\n")[0], own[1].split("\n")[0], "\u2603\u2603", "\u2603\u2603"]
    rows = [{"prompt": p, "reference": r} for p, r in zip(prompts, refs, strict=True)]
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = tmp_path / "gen.yaml"
    task.write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: reference\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
        encoding="utf-8",
    )
    scores = run_harness(
        model, tok, HarnessSpec(tasks=[str(task)]), device="cpu", workdir=tmp_path / "w"
    )
    assert scores["harness/tiny_gen/exact_match"] == pytest.approx(0.5)


def test_bad_task_entries_name_the_field(tmp_path: Path) -> None:
    good = write_mc(tmp_path)

    def check(*tasks: str, **kw: object) -> None:
        check_tasks(HarnessSpec(tasks=list(tasks)), param="spec.evaluation.harness.tasks", **kw)  # type: ignore[arg-type]

    with pytest.raises(SpecError, match="neither a task of lm-evaluation-harness") as e:
        check(str(good), "no_such_task_xyz")
    assert e.value.param == "spec.evaluation.harness.tasks.1"
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    with pytest.raises(SpecError, match="does not parse") as e:
        check(str(broken), known=None)
    assert e.value.param == "spec.evaluation.harness.tasks.0"
    fn = tmp_path / "fn.yaml"
    fn.write_text(good.read_text() + "process_docs: !function utils.process\n")
    with pytest.raises(SpecError, match="!function"):
        check(str(fn), known=None)
    hub = tmp_path / "hub.yaml"
    hub.write_text(good.read_text().replace("dataset_path: json", "dataset_path: allenai/ai2_arc"))
    with pytest.raises(SpecError, match="dataset_path must be one of"):
        check(str(hub), known=None)
    missing = tmp_path / "missing.yaml"
    missing.write_text(good.read_text().replace("mc.jsonl", "nope.jsonl"))
    with pytest.raises(SpecError, match="does not exist"):
        check(str(missing), known=None)
    with pytest.raises(SpecError, match="no task file"):
        check(str(tmp_path / "absent.yaml"), known=None)
    with pytest.raises(SpecError, match="listed twice"):
        check(str(good), str(good), known=None)

    def confine(files: object, param: str) -> list[Path]:
        raise SpecError(f"{param}: outside the roots", param=param)

    with pytest.raises(SpecError, match="outside the roots") as e:
        check(str(good), known=None, confine=confine)
    assert e.value.param == "spec.evaluation.harness.tasks.0"
    # a harness task name is known from its index, offline
    assert check_tasks(HarnessSpec(tasks=["arc_easy"])) == ["arc_easy"]


def test_flatten_results_names() -> None:
    out = flatten_results(
        {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        }
    )
    assert out == {
        "harness/arc_easy/acc": 0.5,
        "harness/arc_easy/acc_stderr": 0.1,
        "harness/gsm8k/exact_match@strict-match": 0.25,
    }


def test_answer_quality_rouge_and_exact_match(lm, tmp_path: Path) -> None:
    model, tok = lm
    prompts = ["ROMEO:", "JULIET:", "KING HENRY:"]
    own = generate_answers(model, tok, prompts, max_new_tokens=8, decoding="greedy", device="cpu")
    # batched (left-padded) generation gives the same greedy answers as one prompt at a time
    assert own == generate_answers(
        model, tok, prompts, max_new_tokens=8, decoding="greedy", device="cpu", batch_size=1
    )
    rows = [
        {"prompt": prompts[0], "reference": own[0]},
        {"prompt": prompts[1], "reference": own[1]},
        {"prompt": prompts[2], "reference": "zebra quantum xylophone"},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = GenerationSpec(set=str(path), max_new_tokens=8, short_reference_words=100, samples=2)
    res = answer_quality(model, tok, spec, device="cpu")
    # an untrained model's answers: exactly its own for 2 of 3 prompts
    assert res.metrics["gen/exact_match"] == pytest.approx(2 / 3)
    assert 0.0 <= res.metrics["gen/rougeL"] <= 1.0
    assert res.metrics["gen/answers"] == 3
    assert [s["answer"] for s in res.samples] == own[:2]
    assert score_answers(["The Duke."], ["duke"], 5)["gen/exact_match"] == 1.0
    # ROUGE-L by hand: LCS("the cat sat on the mat", "the cat on the mat") = 5 words,
    # P = 5/5, R = 5/6, F1 = 2PR/(P+R) = 10/11; stemming: "cats" matches "cat"
    two = score_answers(["the cat on the mat", "cats"], ["the cat sat on the mat", "cat"], 0)
    assert two["gen/rougeL"] == pytest.approx((10 / 11 + 1.0) / 2)
    assert "gen/exact_match" not in two  # no reference is short enough (0 words)

    bad = tmp_path / "noref.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SpecError, match="no reference") as e:
        read_prompt_set(bad, spec, "spec.evaluation.generation.set")
    assert e.value.param == "spec.evaluation.generation.set"


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_answer_quality_from_chat_and_prompt_completion_sets(lm, tmp_path: Path) -> None:
    """The data issue's formats as prompt sets: a chat row's prompt is the conversation up to
    its last assistant turn through the chat template with the generation prompt, and its
    reference that turn; a prompt_completion row's reference is the completion."""
    model, base_tok = lm
    tok = copy.deepcopy(base_tok)
    tok.chat_template = CHAT_TEMPLATE  # type: ignore[attr-defined]
    convs = [
        [{"role": "user", "content": "Who speaks first?"}, {"role": "assistant", "content": "?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a king."},
            {"role": "assistant", "content": "Henry."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "?"},
        ],
    ]
    # the prompts by hand: every turn before the last assistant one, then the generation prompt
    rendered = [
        "<|user|>Who speaks first?\n<|assistant|>",
        "<|system|>Be brief.\n<|user|>Name a king.\n<|assistant|>Henry.\n<|user|>Another?\n"
        "<|assistant|>",
    ]
    own = generate_answers(
        model,
        tok,
        rendered,
        max_new_tokens=6,
        decoding="greedy",
        device="cpu",
        add_special_tokens=False,
    )
    convs[0][-1]["content"] = own[0]  # the model's own answer: an exact match
    convs[1][-1]["content"] = "zebra quantum xylophone"
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": c}) for c in convs))
    spec = GenerationSpec(set=str(chat), max_new_tokens=6, short_reference_words=100, samples=2)
    pairs = read_prompt_set(chat, spec)
    assert [r for _, r in pairs] == [own[0], "zebra quantum xylophone"]
    assert pairs[1][0] == convs[1][:4]
    res = answer_quality(model, tok, spec, device="cpu")
    assert [s["prompt"] for s in res.samples] == rendered
    assert [s["answer"] for s in res.samples] == own
    assert res.metrics["gen/exact_match"] == pytest.approx(1 / 2)
    assert res.metrics["gen/answers"] == 2
    # a tokenizer without a template takes the job's (dataset.chat_template); none is an error
    res2 = answer_quality(model, base_tok, spec, device="cpu", chat_template=CHAT_TEMPLATE)
    assert [s["answer"] for s in res2.samples] == own
    with pytest.raises(SpecError, match="no chat template") as e:
        answer_quality(model, base_tok, spec, device="cpu")
    assert e.value.param == "spec.evaluation.generation.set"

    # prompt_completion rows: the completion is the reference
    plain = generate_answers(
        model, tok, ["ROMEO:"], max_new_tokens=6, decoding="greedy", device="cpu"
    )
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "ROMEO:", "completion": plain[0]}))
    res3 = answer_quality(model, tok, GenerationSpec(set=str(pc), max_new_tokens=6), device="cpu")
    assert res3.samples[0]["reference"] == plain[0] == res3.samples[0]["answer"]
    assert res3.metrics == score_answers(plain, plain, 5)

    # sets without references name the field; a bad conversation is the data issue's message
    bad_rows = {
        "no-assistant": {"messages": [{"role": "user", "content": "hi"}]},
        "empty completion": {"prompt": "x", "completion": " "},
        "bad role": {"messages": [{"role": "narrator", "content": "hi"}]},
    }
    for want, row in zip(
        ["no assistant turn", "no reference \\('completion'\\)", "is not one of"],
        bad_rows.values(),
        strict=True,
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(SpecError, match=want) as e:
            read_prompt_set(bad, spec, "spec.evaluation.generation.set")
        assert e.value.param == "spec.evaluation.generation.set"


@pytest.mark.slow
def test_trainer_runs_tasks_every_n_evals_and_the_teacher_once(tmp_path: Path) -> None:
    """The library path: harness scores at every `every`-th evaluation point and at the end
    (into the last checkpoint's manifest); the teacher's scores computed by the first run and
    read by the second from the store beside the runs; retained = student / teacher."""
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import train
    from tests.helpers import GPT2_TEACHER, Recorder, spec_dict, write_corpus

    corpus = write_corpus(tmp_path, 30_000)
    task = write_mc(tmp_path)
    d = spec_dict(
        corpus,
        teacher={"init": "config", "config": dict(GPT2_TEACHER)},
        method={"name": "kd"},
        evaluation={"harness": {"tasks": [str(task)], "every": 2, "batch_size": 8}},
    )
    first = Recorder()
    res = train(parse_spec(d), tmp_path / "runs" / "a", callbacks=first)
    with_acc = sorted(s for s, m in first.metrics.items() if "harness/tiny_mc/acc" in m)
    assert with_acc == [3, 6]  # eval points 0, 3, 6: the 2nd (every 2) and the end
    reports = [e for k, e in first.events if k == "teacher_scores"]
    assert [e["reused"] for e in reports] == [False]  # once per run, not per evaluation
    t_acc = reports[0]["scores"]["harness/tiny_mc/acc"]
    final = first.metrics[6]
    if t_acc:
        assert final["retained/tiny_mc/acc"] == pytest.approx(final["harness/tiny_mc/acc"] / t_acc)
    manifest = json.loads((Path(res.checkpoint) / "manifest.json").read_text())  # type: ignore[arg-type]
    assert manifest["metrics"]["harness/tiny_mc/acc"] == final["harness/tiny_mc/acc"]

    d["training"] = {**d["training"], "max_steps": 2, "eval_every": 0}  # another student
    d["evaluation"]["harness"]["every"] = 0
    second = Recorder()
    train(parse_spec(d), tmp_path / "runs" / "b", callbacks=second)
    again = [e for k, e in second.events if k == "teacher_scores"]
    assert [e["reused"] for e in again] == [True] and again[0]["scores"] == reports[0]["scores"]
    assert again[0]["key"] == reports[0]["key"]


def test_results_prompt_set_is_held_out(tmp_path: Path) -> None:
    """bench.quality.answers: the prompt set comes from the corpus's last part, apart from the
    training and val text, and every reference is the line after its prompt."""
    from bench.quality.answers import split_corpus
    from tests.helpers import SHARED_CORPUS

    if not SHARED_CORPUS.is_file():
        pytest.skip("needs tiny Shakespeare (../shared/data): its speeches make the prompts")
    text = corpus_text()
    paths = split_corpus(text, tmp_path, 20)
    train, val = paths["train"].read_text(), paths["val"].read_text()
    rows = [json.loads(x) for x in paths["prompts"].read_text().splitlines()]
    assert len(rows) == 20
    tail = text[len(train) + len(val) :]
    assert train + val + tail == text
    for r in rows:
        assert r["reference"] and (r["prompt"] + r["reference"]) in tail
        assert (r["prompt"] + r["reference"]) not in train + val
