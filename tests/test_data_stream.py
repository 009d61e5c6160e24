"""The streaming cache build and streaming hub data sets (sharp_core.data.tokenized, lm).

Reference: the former build — every row encoded at once (`formats.encode_rows`), the row
count taken from every length (`rows_needed`), `Packer` filling arrays of that size, saved
with ``np.save``. The streaming build (batches of a few rows, one or two tokenising
processes, rows appended to the files) must give the same arrays and the same file bytes.
A streaming hub data set (a local folder of shards loaded as the hub path loads one) must
give the rows of the same files read as ``source: files``, without writing Arrow files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharp_core.cache.store import LocalCacheStore
from sharp_core.data import formats, tokenized
from sharp_core.data.lm import LMSource, prepare_lm
from sharp_core.data.packing import Packer, rows_needed
from sharp_core.errors import DataError, SpecError
from sharp_core.models.loading import train_bpe_tokenizer
from sharp_core.spec import DatasetSpec, parse_spec
from tests.helpers import CHAT_TEMPLATE, chat_rows, corpus_text, spec_dict


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for r in chat_rows(40) for m in r["messages"]]
    return train_bpe_tokenizer([*texts, corpus_text(20_000), CHAT_TEMPLATE], 400)


def _rows(fmt: str) -> dict[str, list]:
    if fmt == "text":
        return {"text": [p for p in corpus_text(12_000).split("\n\n")] + ["", "  "]}
    chats = chat_rows(40, seed=1)
    if fmt == "chat":
        return {"messages": [r["messages"] for r in chats]}
    qa = [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in chats]
    return {"prompt": [q for q, _ in qa], "completion": [a for _, a in qa]}


def _parts(tok, fmt: str, packing: str, loss_on: str, seq_len: int) -> dict:
    ds = DatasetSpec(files=["x"], chat_template=CHAT_TEMPLATE)
    parts = tokenized.key_parts(ds, tokenizer="t", data="d", fmt=fmt, loss_on=loss_on,
                                packing=packing, seq_len=seq_len,
                                template=CHAT_TEMPLATE if fmt == "chat" else None)  # fmt: skip
    parts["fields"] = {"text": "text", "messages": "messages", "prompt": "prompt",
                       "completion": "completion"}  # fmt: skip
    parts["_template_text"] = CHAT_TEMPLATE
    return parts


def _reference(rows: dict, tok, parts: dict) -> tuple[np.ndarray, np.ndarray]:
    """The former build: all rows encoded, sized from every length, packed by `Packer`."""
    N, packing = parts["seq_len"], parts["packing"]
    enc = formats.encode_rows(rows, tokenizer=tok, fmt=parts["data_format"],
                              loss_on=parts["loss_on"], packing=packing,
                              fields=parts["fields"],
                              template=CHAT_TEMPLATE if parts["data_format"] == "chat" else None)  # fmt: skip
    lengths = np.array([len(x) for x in enc["input_ids"]])
    n = rows_needed(lengths, N, packing)
    tokens, flags = np.zeros((n, N), np.int32), np.zeros((n, N), np.uint8)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    p = Packer(tokens, flags, packing, int(pad or 0))
    p.add(enc["input_ids"], enc["loss_mask"])
    p.finish()
    return tokens, flags


def _npy_bytes(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


CASES = [
    ("text", "concat", "all", 48),
    ("text", "documents", "all", 40),
    ("chat", "documents", "assistant", 64),
    ("chat", "concat", "assistant", 64),
    ("prompt_completion", "none", "assistant", 96),
]


@pytest.mark.parametrize(("fmt", "packing", "loss_on", "seq_len"), CASES)
def test_streamed_build_equals_the_former_build(tmp_path, tok, fmt, packing, loss_on, seq_len):
    import datasets

    rows = _rows(fmt)
    parts = _parts(tok, fmt, packing, loss_on, seq_len)
    want_t, want_f = _reference(rows, tok, parts)
    assert want_t.shape[0] > 3
    table = datasets.Dataset.from_dict(rows)
    # batches of 7 rows: rows and documents cross every batch boundary; two processes once
    for num_proc in (1, 2) if fmt == "chat" else (1,):
        out = tmp_path / f"p{num_proc}"
        out.mkdir()
        entry = tokenized.build(table, tok, parts=parts, key="k", out_dir=out,
                                num_proc=num_proc, batch_rows=7)  # fmt: skip
        assert np.array_equal(entry.tokens, want_t) and np.array_equal(entry.flags, want_f)
        assert (out / "tokens.npy").read_bytes() == _npy_bytes(want_t)  # numpy's own header
        assert (out / "flags.npy").read_bytes() == _npy_bytes(want_f)
        m = entry.manifest
        assert m["rows"] == want_t.shape[0]
        assert m["targets"] == int(np.count_nonzero(want_f[:, 1:] & 1))
    mem = tokenized.build(table, tok, parts=parts, key="k", out_dir=None, batch_rows=5)
    assert np.array_equal(mem.tokens, want_t) and np.array_equal(mem.flags, want_f)


def test_a_build_that_fails_midway_leaves_no_entry(tmp_path, tok) -> None:
    parts = _parts(tok, "text", "concat", "all", 32)
    rows = _rows("text")

    def broken():
        yield {"text": rows["text"][:10]}
        raise DataError("the source broke", param="spec.dataset")

    store = LocalCacheStore(tmp_path / "store")
    with pytest.raises(DataError, match="the source broke"):
        tokenized.prepare(parts, broken, tok, store=store)
    key = tokenized.data_key({k: v for k, v in parts.items() if not k.startswith("_")})
    assert not store.exists(key)
    import datasets

    entry = tokenized.prepare(parts, lambda: datasets.Dataset.from_dict(rows), tok, store=store)
    assert entry.info["role"] == "built"
    assert np.array_equal(entry.tokens, _reference(rows, tok, parts)[0])


def test_bad_rows_are_named_while_streaming(tmp_path, tok) -> None:
    rows = chat_rows(30, seed=2)
    rows[17]["messages"][2]["role"] = "robot"
    for i, part in enumerate((rows[:10], rows[10:])):
        (tmp_path / f"s{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    ds = DatasetSpec(files=[str(tmp_path / "s*.jsonl")], chat_template=CHAT_TEMPLATE)
    src = LMSource(ds, None)
    with pytest.raises(DataError) as e:
        list(src.batches(batch_rows=4))
    assert e.value.param == "spec.dataset.files.1"
    assert "s1.jsonl: row 7: messages[2].role 'robot'" in str(e.value)


def _shards(folder: Path, rows: list[dict]) -> None:
    """A hub-style folder: data/train-0000N-of-00003.parquet, rows split in order."""
    (folder / "data").mkdir(parents=True)
    n = len(rows)
    for i in range(3):
        part = rows[i * n // 3 : (i + 1) * n // 3]
        t = pa.table({"messages": [r["messages"] for r in part]})
        pq.write_table(t, folder / "data" / f"train-{i:05d}-of-00003.parquet", row_group_size=7)


def test_streaming_hub_data_is_the_same_rows_and_writes_no_arrow_files(tmp_path, tok, monkeypatch):
    import datasets

    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_cache))
    rows = chat_rows(60, seed=4)
    hub = tmp_path / "team-chat"
    _shards(hub, rows)
    common = {"chat_template": CHAT_TEMPLATE, "eval_fraction": 0.1}
    streamed = DatasetSpec(source="hub", name=str(hub), streaming=True, **common)
    files = DatasetSpec(files=[str(hub / "data" / "*.parquet")], **common)
    store = LocalCacheStore(tmp_path / "store")
    src = LMSource(streamed, None)
    assert (src.format, src.columns) == ("chat", ["messages"])
    got = prepare_lm(streamed, src, tok, 64, store=store)
    want = prepare_lm(files, LMSource(files, None), tok, 64, store=None)
    assert got.info["role"] == "built" and got.info["tokens"] == want.info["tokens"]
    assert (got.train == want.train).all() and (got.train_flags == want.train_flags).all()
    assert not list(hf_cache.rglob("*.arrow"))  # nothing materialised
    # the second job reads the entry: its key is the folder's, not the bytes'
    again = prepare_lm(streamed, LMSource(streamed, None), tok, 64, store=store)
    assert again.info["role"] == "read" and again.key == got.key
    # the same folder without streaming: prepared as Arrow (the check above can fail)
    table = LMSource(streamed.model_copy(update={"streaming": False}), None)
    assert table.table_unchecked().num_rows == 60 and list(hf_cache.rglob("*.arrow"))


def test_streaming_is_for_hub_sources(tmp_path) -> None:
    with pytest.raises(SpecError) as e:
        d = spec_dict(tmp_path / "c.txt")
        d["dataset"]["streaming"] = True
        parse_spec(d)
    assert e.value.param == "spec.dataset.streaming"


def test_packing_none_names_a_long_document_across_batches(tmp_path, tok) -> None:
    import datasets

    rows = _rows("prompt_completion")
    rows["completion"][23] = " ".join(["word"] * 200)
    parts = _parts(tok, "prompt_completion", "none", "assistant", 96)
    with pytest.raises(DataError) as e:
        tokenized.build(datasets.Dataset.from_dict(rows), tok, parts=parts, key="k",
                        out_dir=tmp_path, batch_rows=5)  # fmt: skip
    assert e.value.param == "spec.dataset.packing" and "document 23 has" in str(e.value)
