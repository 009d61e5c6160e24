"""Tokenisation throughput and the memory of reading a tokenized data set.

    python -m bench.data [--mb 200] [--scale 10,100] [--num-proc 2] [--vocab 8192]
                         [--read 10,30,100] [--json]

1. **Build**: the same ``--mb`` MB of text (tiny Shakespeare repeated, one document per
   paragraph) through the in-memory path (`load_texts` + `build_data`: one tokenizer
   call into Python lists, then packing) and through the tokenized cache's build
   (`sharp_core.data.tokenized.build`: the files streamed a batch at a time, encoded by
   ``num_proc`` processes, packed and appended to the ``.npy`` files, manifest last), side
   by side: wall seconds, tokens/s and the peak resident memory of each, each in its own
   process (so one's peak is not the other's).
1b. **Build memory against size** (``--scale``, millions of tokens): text of about that many
   tokens through the former cache build (the whole file loaded into memory,
   `datasets.map(batched, num_proc)` into an in-memory Arrow table, then packed into
   memory maps sized from every length: reproduced here from the library's public pieces)
   and through today's streaming build, each in a fresh process: the former's peak grows
   with the data, the streaming one's should stay flat.
2. **Read**: cached entries of 10M … 100M tokens (``--read``, millions; synthetic tokens
   written with the library's own `commit`), each opened and verified in a fresh process
   as a job does (`tokenized.prepare` finds the entry, `BatchStream` draws 500 batches of
   8 rows of 1024): the peak resident memory and its anonymous part (what the process owns,
   page cache excluded) should stay flat as the data set grows.

Both use a byte-level BPE tokenizer trained on tiny Shakespeare (``--vocab``), so nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _source_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _anon_kb() -> int:
    """The process's anonymous resident memory now (kB): what it owns, page cache aside."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that
    over an exec from the forking parent, whose own peak would then be reported."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokenizer(folder: Path, vocab: int) -> Any:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        from sharp_core.models.loading import train_bpe_tokenizer

        train_bpe_tokenizer([_source_text()], vocab).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------------ child processes


def _child_build(work: Path, mode: str, num_proc: int, vocab: int) -> dict[str, Any]:
    from sharp_core.spec import DatasetSpec

    tok = _tokenizer(work / "tok", vocab)
    ds = DatasetSpec(files=[str(work / "corpus.txt")], eval_fraction=0.01)
    t0 = time.perf_counter()
    if mode == "today":
        from sharp_core.data.loading import build_data, load_texts

        data = build_data(ds, load_texts(ds), tok, 1024)
        n_tokens = (data.train.shape[0] + data.eval.shape[0]) * 1024
    else:
        from sharp_core.data import tokenized
        from sharp_core.data.lm import LMSource

        src = LMSource(ds, None)
        parts = tokenized.key_parts(ds, tokenizer="bench", data="bench", fmt="text",
                                    loss_on="all", packing="concat", seq_len=1024,
                                    template=None)  # fmt: skip
        parts["fields"] = src.fields
        out = work / f"built-{os.getpid()}"
        out.mkdir()
        entry = tokenized.build(src.batches(), tok, parts=parts, key="bench",
                                out_dir=out, num_proc=num_proc)  # fmt: skip
        n_tokens = int(entry.manifest["rows"]) * 1024
    seconds = time.perf_counter() - t0
    return {
        "path": mode,
        "seconds": round(seconds, 2),
        "tokens": n_tokens,
        "tokens_per_s": round(n_tokens / seconds),
        "peak_rss_mb": round(_peak_mb()),
    }


def _former_cache_build(src: Any, tok: Any, parts: dict[str, Any], out: Path, num_proc: int) -> int:
    """The cache build before it streamed (issue 23's first version), for the comparison:
    the files loaded whole (`load_table`, kept in memory), `datasets.map(batched,
    num_proc)` into an in-memory Arrow table, every length read to size the memory maps,
    then `Packer` fills them. Returns the rows."""
    import numpy as np
    import pyarrow.compute as pc

    from sharp_core.data import formats
    from sharp_core.data.packing import Packer, rows_needed

    table = src.table_unchecked()
    N = parts["seq_len"]
    enc = table.map(
        formats.encode_rows,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc > 1 and len(table) > num_proc else None,
        remove_columns=table.column_names,
        fn_kwargs={
            "tokenizer": tok,
            "fmt": "text",
            "loss_on": "all",
            "packing": "concat",
            "fields": parts["fields"],
            "template": None,
        },  # fmt: skip
        load_from_cache_file=False,
    )
    lengths = np.asarray(
        pc.list_value_length(enc.data.column("input_ids")).to_numpy(zero_copy_only=False)
    )
    n = rows_needed(lengths, N, "concat")
    tokens = np.lib.format.open_memmap(out / "tokens.npy", "w+", np.int32, (n, N))
    flags = np.lib.format.open_memmap(out / "flags.npy", "w+", np.uint8, (n, N))
    packer = Packer(tokens, flags, "concat", int(tok.eos_token_id))
    for start in range(0, len(enc), 10_000):
        chunk = enc[start : start + 10_000]
        packer.add(chunk["input_ids"], chunk["loss_mask"])
    packer.finish()
    tokens.flush()
    flags.flush()
    return int(n)


def _child_scale(work: Path, mode: str, num_proc: int, vocab: int, corpus: Path) -> dict[str, Any]:
    """One build of ``corpus`` by the former (``former``) or streaming (``stream``) build."""
    from sharp_core.data import tokenized
    from sharp_core.data.lm import LMSource
    from sharp_core.spec import DatasetSpec

    tok = _tokenizer(work / "tok", vocab)
    ds = DatasetSpec(files=[str(corpus)])
    src = LMSource(ds, None)
    parts = tokenized.key_parts(ds, tokenizer="bench", data="bench", fmt="text",
                                loss_on="all", packing="concat", seq_len=1024,
                                template=None)  # fmt: skip
    parts["fields"] = src.fields
    out = work / f"built-{os.getpid()}"
    out.mkdir()
    t0 = time.perf_counter()
    if mode == "former":
        rows = _former_cache_build(src, tok, parts, out, num_proc)
    else:
        entry = tokenized.build(src.batches(), tok, parts=parts, key="bench", out_dir=out,
                                num_proc=num_proc)  # fmt: skip
        rows = int(entry.manifest["rows"])
    seconds = time.perf_counter() - t0
    import shutil

    shutil.rmtree(out)
    return {
        "path": mode,
        "seconds": round(seconds, 1),
        "tokens": rows * 1024,
        "tokens_per_s": round(rows * 1024 / seconds),
        "peak_rss_mb": round(_peak_mb()),
    }


def _child_read(root: Path, key: str) -> dict[str, Any]:
    import torch

    from sharp_core.cache.store import LocalCacheStore
    from sharp_core.data import tokenized
    from sharp_core.data.loading import BatchStream

    before = _peak_mb()
    store = LocalCacheStore(root)
    parts = json.loads((root / key / "manifest.json").read_text())["parts"]
    t0 = time.perf_counter()

    def never() -> Any:
        raise AssertionError("the entry should have been read, not built")

    entry = tokenized.prepare(parts, never, None, store=store)
    opened = time.perf_counter() - t0
    rows = tokenized.as_tensor(entry.tokens)
    stream = BatchStream(rows, seed=0)
    total = 0
    for _ in range(500):
        total += int(stream.next(8).to(torch.long).sum() % 7)
    return {
        "tokens": int(entry.manifest["tokens"]),
        "role": entry.info["role"],
        "open_verify_s": round(opened, 2),
        "peak_rss_mb": round(_peak_mb()),
        "peak_rss_before_open_mb": round(before),
        "anon_rss_mb": round(_anon_kb() / 1024),
    }


def _synthetic_entry(root: Path, millions: int, seq_len: int = 1024) -> str:
    import numpy as np

    from sharp_core.data import tokenized
    from sharp_core.data.packing import LOSS

    rows = millions * 1_000_000 // seq_len
    parts = {"format": tokenized.FORMAT, "bench": f"{millions}M", "seq_len": seq_len,
             "data_format": "text", "packing": "concat", "loss_on": "all"}  # fmt: skip
    key = tokenized.data_key(parts)
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    tok = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.int32, (rows, seq_len))
    flg = np.lib.format.open_memmap(folder / "flags.npy", "w+", np.uint8, (rows, seq_len))
    rng = np.random.default_rng(millions)
    for s in range(0, rows, 8192):
        e = min(rows, s + 8192)
        tok[s:e] = rng.integers(0, 8192, (e - s, seq_len), dtype=np.int32)
        flg[s:e] = LOSS
    tok.flush()
    flg.flush()
    del tok, flg
    tokenized.commit(folder, {"format": tokenized.FORMAT, "key": key, "parts": parts,
                              "rows": rows, "seq_len": seq_len, "documents": rows,
                              "tokens": rows * seq_len, "targets": rows * (seq_len - 1),
                              "masked": False})  # fmt: skip
    return key


def _run_child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.data", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "true"},
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=200.0, help="MB of text for the build (0: none)")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--read", default="10,30,100", help="cached sizes to read, M tokens")
    p.add_argument("--scale", default="10,100", help="build memory at these M tokens ('': none)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["today", "cache", "read", "former", "stream"],
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child in ("former", "stream"):
        print(json.dumps(_child_scale(a.work, a.child, a.num_proc, a.vocab, a.corpus)))
        return 0
    if a.child in ("today", "cache"):
        print(json.dumps(_child_build(a.work, a.child, a.num_proc, a.vocab)))
        return 0
    if a.child == "read":
        print(json.dumps(_child_read(a.work, a.key)))
        return 0

    import torch

    from bench.machine import machine_info

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        text = _source_text()
        reps = max(0, round(a.mb * 1e6 / len(text.encode())))
        with open(work / "corpus.txt", "w", encoding="utf-8") as f:
            for _ in range(reps):
                f.write(text)
                f.write("\n\n")
        size_mb = (work / "corpus.txt").stat().st_size / 1e6
        _tokenizer(work / "tok", a.vocab)
        common = ["--work", str(work), "--num-proc", str(a.num_proc), "--vocab", str(a.vocab)]
        build = [_run_child([*common, "--child", m]) for m in ("today", "cache") if a.mb > 0]
        scale = []
        if a.scale:
            tok = _tokenizer(work / "tok", a.vocab)
            per_byte = len(tok(text)["input_ids"]) / len(text.encode())
            for m in (int(x) for x in a.scale.split(",") if x):
                corpus = work / f"scale-{m}M.txt"
                with open(corpus, "w", encoding="utf-8") as f:
                    for _ in range(max(1, round(m * 1e6 / per_byte / len(text.encode())))):
                        f.write(text)
                        f.write("\n\n")
                mb = corpus.stat().st_size / 1e6
                for mode in ("former", "stream"):
                    r = _run_child([*common, "--child", mode, "--corpus", str(corpus)])
                    scale.append({"millions": m, "text_mb": round(mb, 1), **r})
                corpus.unlink()
        reads = []
        root = work / "store"
        for m in (int(x) for x in a.read.split(",") if x):
            key = _synthetic_entry(root, m)
            reads.append({"millions": m, **_run_child(["--work", str(root), "--child", "read",
                                                       "--key", key])})  # fmt: skip
            import shutil

            shutil.rmtree(root / key)
    doc = {
        "benchmark": "bench.data",
        "command": "python -m bench.data " + " ".join(argv if argv is not None else sys.argv[1:]),
        "text_mb": round(size_mb, 1),
        "num_proc": a.num_proc,
        "build": build,
        "scale": scale,
        "read": reads,
        "machine": machine_info(torch.device("cpu")),
    }
    if a.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"build: {size_mb:.0f} MB of text, vocab {a.vocab}, num_proc {a.num_proc}")
    print(f"  {'path':<8}{'seconds':>10}{'tokens':>14}{'tokens/s':>12}{'peak RSS MB':>14}")
    for b in build:
        print(f"  {b['path']:<8}{b['seconds']:>10}{b['tokens']:>14}{b['tokens_per_s']:>12}"
              f"{b['peak_rss_mb']:>14}")  # fmt: skip
    if scale:
        print("build memory against size (former: whole table in memory; stream: today):")
        print(f"  {'M tokens':>9}{'text MB':>9}  {'path':<8}{'seconds':>9}{'tokens':>12}"
              f"{'tokens/s':>10}{'peak RSS MB':>13}")  # fmt: skip
        for r in scale:
            print(f"  {r['millions']:>9}{r['text_mb']:>9}  {r['path']:<8}{r['seconds']:>9}"
                  f"{r['tokens']:>12}{r['tokens_per_s']:>10}{r['peak_rss_mb']:>13}")  # fmt: skip
    print("read (open + verify + 500 batches of 8×1024):")
    print(f"  {'tokens':>12}{'open+verify s':>15}{'peak RSS MB':>13}{'anon RSS MB':>13}")
    for r in reads:
        print(f"  {r['tokens']:>12}{r['open_verify_s']:>15}{r['peak_rss_mb']:>13}"
              f"{r['anon_rss_mb']:>13}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
