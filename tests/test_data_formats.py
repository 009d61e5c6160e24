"""Formats, loss masks, bad input and the tokenized cache (sharp_core.data).

References: the chat template's own ``{% generation %}`` offsets
(``return_assistant_tokens_mask``) for the prefix-by-prefix mask; the decoded masked tokens
for what the loss covers (each answer and its end marker, nothing of the system or user
turns); a 2-process gloo run for "one rank builds".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sharp_core.cache.store import LocalCacheStore
from sharp_core.data import formats, tokenized
from sharp_core.data.lm import LMSource, prepare_lm
from sharp_core.data.packing import LOSS, START
from sharp_core.errors import DataError
from sharp_core.models.loading import train_bpe_tokenizer
from sharp_core.spec import DatasetSpec, parse_spec
from sharp_core.train.loop import train
from tests.helpers import (
    CHAT_TEMPLATE,
    Recorder,
    chat_rows,
    corpus_text,
    spec_dict,
    write_chat_jsonl,
)


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for r in chat_rows(50) for m in r["messages"]]
    return train_bpe_tokenizer([*texts, corpus_text(20_000), CHAT_TEMPLATE], 400)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", 120)


def _decoded_answers(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids, mask, strict=True) if m])


def test_assistant_mask_equals_the_templates_own_offsets(tok) -> None:
    tagged = formats.Rendering(CHAT_TEMPLATE, True)
    plain = formats.Rendering(
        CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", ""), False
    )
    for row in chat_rows(12, seed=3, turns=3):
        conv = row["messages"]
        ids_t, mask_t = formats.render_chat(tok, conv, tagged)  # the template's offsets
        ids_d, mask_d = formats.render_chat(tok, conv, tagged, prefix_diff=True)
        ids_p, mask_p = formats.render_chat(tok, conv, plain)  # a template without tags
        assert ids_t == ids_d == ids_p and mask_t == mask_d == mask_p
        answers = [m["content"] + "<|end|>" for m in conv if m["role"] == "assistant"]
        assert _decoded_answers(tok, ids_t, mask_t) == "".join(answers)
        assert 0 < sum(mask_t) < len(ids_t)


def test_prompt_completion_mask_covers_the_completion_and_eos(tok) -> None:
    out = formats.encode_rows(
        {"prompt": ["To be, or not", "Hello"], "completion": [" to be", " world"]},
        tokenizer=tok, fmt="prompt_completion", loss_on="assistant", packing="documents",
        fields={"prompt": "prompt", "completion": "completion"}, template=None,
    )  # fmt: skip
    for ids, mask, want in zip(out["input_ids"], out["loss_mask"], [" to be", " world"],
                               strict=True):  # fmt: skip
        assert _decoded_answers(tok, ids, mask) == want + tok.eos_token


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"role": "bot", "content": "hi"}, "messages[1].role 'bot' is not one of"),
        ({"role": "assistant", "content": "  "}, "messages[1].content: empty assistant turn"),
        ({"role": "user", "content": ["a", "b"]}, "messages[1].content is list, not a string"),
    ],
)
def test_bad_conversations_name_file_row_and_field(tmp_path, bad, says) -> None:
    good = chat_rows(3)
    rows = [*good[:2], {"messages": [good[0]["messages"][0], bad]}]
    a = _jsonl(tmp_path / "a.jsonl", good)
    b = _jsonl(tmp_path / "b.jsonl", rows)
    ds = DatasetSpec(files=[str(a), str(b)])
    with pytest.raises(DataError) as e:
        LMSource(ds, None).table()
    assert e.value.param == "spec.dataset.files.1"
    assert str(e.value).startswith("data_error [spec.dataset.files.1]: b.jsonl: row 2: " + says)


def test_no_trainable_token_and_loss_on_for_text_are_refused(tmp_path, tok) -> None:
    rows = [{"messages": [{"role": "user", "content": "only a question " * 5}]}] * 20
    ds = DatasetSpec(files=[str(_jsonl(tmp_path / "q.jsonl", rows))], chat_template=CHAT_TEMPLATE)
    with pytest.raises(DataError) as e:
        prepare_lm(ds, LMSource(ds, None), tok, 16, store=None)
    assert e.value.param == "spec.dataset.loss_on" and "no token" in str(e.value)
    (tmp_path / "t.txt").write_text("some text\n\nmore text\n")
    with pytest.raises(DataError) as e:
        LMSource(DatasetSpec(files=[str(tmp_path / "t.txt")], loss_on="assistant"), None)
    assert e.value.param == "spec.dataset.loss_on"


def test_teacher_and_student_render_differently_is_refused(tok) -> None:
    other = train_bpe_tokenizer([corpus_text(20_000)], 400)
    tok.chat_template, other.chat_template = CHAT_TEMPLATE, CHAT_TEMPLATE.replace("|>\\n", "|>")
    convs = [r["messages"] for r in chat_rows(2)]
    formats.check_render_identity(tok, tok, convs, None)  # same: fine
    with pytest.raises(DataError) as e:
        formats.check_render_identity(tok, other, convs, None)
    assert e.value.param == "spec.dataset.chat_template"
    assert "conversation 0" in str(e.value) and "first difference at token" in str(e.value)
    tok.chat_template = None


def test_cache_built_once_read_after_and_rebuilt_when_corrupt(tmp_path, tok, chat_file) -> None:
    ds = DatasetSpec(files=[str(chat_file)], chat_template=CHAT_TEMPLATE, eval_fraction=0.1)
    store = LocalCacheStore(tmp_path / "store")
    src = LMSource(ds, None)
    assert (src.format, src.loss_on, src.packing) == ("chat", "assistant", "documents")
    first = prepare_lm(ds, src, tok, 64, store=store)
    assert first.info["role"] == "built"
    again = prepare_lm(ds, LMSource(ds, None), tok, 64, store=store)
    assert again.info["role"] == "read" and again.key == first.key
    assert torch.equal(again.train, first.train) and torch.equal(
        again.train_flags, first.train_flags
    )
    mem = prepare_lm(ds.model_copy(update={"cache": False}), src, tok, 64, store=store)
    assert mem.info["role"] == "memory" and torch.equal(mem.train, first.train)
    # every target token is an answer token: the flags' LOSS bits decode to answers only
    x, f = first.train.long(), first.train_flags
    assert not ((f & LOSS).bool() & (f & START).bool()).any()
    said = tok.decode(x[(f & LOSS).bool()].tolist())
    assert "<|end|>" in said and "<|user|>" not in said and "Answer in reverse" not in said
    # a flipped byte: the manifest's sha256 catches it, the entry is rebuilt
    folder = store.get(first.key)
    with open(folder / "flags.npy", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    fixed = prepare_lm(ds, LMSource(ds, None), tok, 64, store=store)
    assert fixed.info["role"] == "built" and "did not verify" in fixed.info["note"]
    # half-written (no manifest, a crash mid-build): rebuilt
    (store.get(first.key) / "manifest.json").unlink()
    assert prepare_lm(ds, LMSource(ds, None), tok, 64, store=store).info["role"] == "built"
    # another seq_len, loss_on or packing is another key
    ds_all = ds.model_copy(update={"loss_on": "all"})
    other = prepare_lm(ds_all, LMSource(ds_all, None), tok, 64, store=store)
    assert other.key != first.key and int((other.train_flags & LOSS).sum()) > int(
        (first.train_flags & LOSS).sum()
    )


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from tests.test_data_formats import _GlooRanks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = Path(folder)
        tok = train_bpe_tokenizer([corpus_text(20_000)], 300)
        parts = json.loads((d / "parts.json").read_text())
        loads = d / f"loads-{rank}"

        def load():
            loads.write_text("loaded")
            import datasets

            return datasets.Dataset.from_dict({"text": corpus_text(30_000).split("\n\n")})

        entry = tokenized.prepare(parts, load, tok, store=LocalCacheStore(d / "store"),
                                  ranks=_GlooRanks())  # fmt: skip
        (d / f"out-{rank}.json").write_text(
            json.dumps({"role": entry.info["role"], "sum": int(np.asarray(entry.tokens).sum())})
        )
    finally:
        dist.destroy_process_group()


class _GlooRanks:
    """The Ranks protocol on an initialised torch.distributed group (gloo)."""

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    @property
    def world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size()

    def all_reduce_sum(self, t):
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def broadcast_object(self, obj):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj):
        import torch.distributed as dist

        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def test_two_ranks_tokenise_once(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    ds = DatasetSpec(files=["unused.txt"])
    parts = tokenized.key_parts(ds, tokenizer="t", data="d", fmt="text", loss_on="all",
                                packing="documents", seq_len=32, template=None)  # fmt: skip
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    outs = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]
    assert [o["role"] for o in outs] == ["built", "built"]  # rank 0 built, rank 1 was told
    assert outs[0]["sum"] == outs[1]["sum"] > 0  # both read the same rows
    assert (tmp_path / "loads-0").exists() and not (tmp_path / "loads-1").exists()


def test_a_chat_job_reads_the_cache_the_second_time_and_masking_matters(tmp_path, chat_file):
    def spec(loss_on: str) -> dict:
        return spec_dict(
            chat_file,
            dataset={
                "files": [str(chat_file)],
                "chat_template": CHAT_TEMPLATE,
                "loss_on": loss_on,
                "eval_fraction": 0.1,
            },  # fmt: skip
            training={
                "max_steps": 3,
                "batch_size": 4,
                "seq_len": 64,
                "warmup_steps": 1,
                "eval_every": 0,
                "checkpoint_every": 0,
                "lr": 3e-3,
            },  # fmt: skip
        )

    # job a stops after its first step; its second attempt resumes without tokenising
    first = Recorder(stop_at=1)
    assert train(parse_spec(spec("assistant")), tmp_path / "a", callbacks=first).status == "stopped"
    (ev,) = [e for k, e in first.events if k == "tokenized_data"]
    assert ev["role"] == "built"
    runs = {}
    for name, loss_on in (("a", "assistant"), ("b", "assistant"), ("all", "all")):
        rec = Recorder()
        res = train(parse_spec(spec(loss_on)), tmp_path / name, callbacks=rec)
        (ev,) = [e for k, e in rec.events if k == "tokenized_data"]
        runs[name] = (ev, rec.metrics, load_file(str(res.checkpoint / "model.safetensors")))
    assert runs["a"][0]["role"] == "read" and runs["b"][0]["role"] == "read"
    assert runs["all"][0]["role"] == "built"
    assert runs["a"][0]["key"] == runs["b"][0]["key"] != runs["all"][0]["key"]
    assert runs["a"][0]["format"] == "chat" and runs["a"][0]["packing"] == "documents"
    last = {
        k: v[1][max(s for s in v[1] if "eval_loss" in v[1][s])]["eval_loss"]
        for k, v in runs.items()
    }
    assert last["a"] == pytest.approx(last["b"], rel=1e-6)  # the cache changes nothing
    assert abs(last["a"] - last["all"]) > 1e-3  # the mask changes the result
    wa, wb, wall = (runs[k][2] for k in ("a", "b", "all"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)  # same data, same student
    assert max((wa[n] - wall[n]).abs().max().item() for n in wa) > 1e-4  # trained differently


def test_on_policy_prompts_are_the_conversation_up_to_the_answer(tmp_path, tok, chat_file):
    from sharp_core.train.onpolicy import answer_batch, real_prompts

    ds = DatasetSpec(files=[str(chat_file)], chat_template=CHAT_TEMPLATE)
    data = prepare_lm(ds, LMSource(ds, None), tok, 256, store=None)
    b = data.inputs("train", torch.arange(1, 5), torch.device("cpu"))
    prompts, am = real_prompts(b, 120, pad_id=tok.eos_token_id)
    for r in range(4):
        text = tok.decode(prompts[r][am[r].bool()].tolist())
        assert text.startswith("<|system|>") and text.endswith("<|assistant|>\n"), text
        assert text.count("<|assistant|>") == 1  # the first answer's prompt
    eos = tok.eos_token_id
    gen = torch.tensor([[5, 6, eos, 7], [5, 6, 7, 8], [eos, 5, 6, 7], [5, 5, 5, 5]])
    out = answer_batch(torch.cat([prompts, gen], 1), am, eos, pad_id=eos)
    assert out["loss_mask"][:, 120:].sum(1).tolist() == [3, 4, 1, 4]  # up to and with EOS
    assert (out["input_ids"][0, 123:] == eos).all()  # after EOS: padding, no target
    assert (out["position_ids"][:, :120][am.bool()] == 0).sum() == 4  # one real start per row

    d = spec_dict(
        chat_file,
        dataset={"files": [str(chat_file)], "chat_template": CHAT_TEMPLATE, "eval_fraction": 0.1},
        training={
            "max_steps": 2,
            "batch_size": 4,
            "seq_len": 128,
            "warmup_steps": 1,
            "eval_every": 0,
            "checkpoint_every": 0,
        },  # fmt: skip
    )
    d["student"]["config"]["n_positions"] = 128
    d["teacher"] = {"init": "config", "config": dict(d["student"]["config"])}
    d["method"] = {"name": "kd", "on_policy": {"fraction": 1.0, "max_new_tokens": 8}}
    rec = Recorder()
    train(parse_spec(d), tmp_path / "op", callbacks=rec)
    assert all(rec.metrics[s]["on_policy"] == 1.0 for s in (1, 2))
    assert all(np.isfinite(rec.metrics[s]["loss"]) for s in (1, 2))


def test_globs_of_shards_are_read_in_sorted_order(tmp_path, tok) -> None:
    rows = chat_rows(30, seed=5)
    for i in range(3):  # written out of order: the sorted order is the data's order
        _jsonl(tmp_path / f"shard-{2 - i}.jsonl", rows[(2 - i) * 10 : (3 - i) * 10])
    ds = DatasetSpec(files=[str(tmp_path / "shard-*.jsonl")], chat_template=CHAT_TEMPLATE)
    src = LMSource(ds, None)
    assert [Path(f).name for f in src.files] == ["shard-0.jsonl", "shard-1.jsonl", "shard-2.jsonl"]
    assert src.table()["messages"] == [r["messages"] for r in rows]
    with pytest.raises(DataError) as e:
        LMSource(DatasetSpec(files=[str(tmp_path / "none-*.parquet")]), None)
    assert e.value.param == "spec.dataset.files.0" and "no file matches" in str(e.value)
