"""The teacher-logit cache under torchrun: two gloo ranks build one cache together (rank r
writes shards r, r+2, …; rank 0 commits the manifest after every shard is on disk), and the
cache does not depend on the world size that built it.

References: a single process reading the 2-rank-built cache trains the 2-rank trajectory
(within test_distributed's RTOL, 1e-5: the same targets, the batch split over ranks); the
2-rank build holds the same shards as a 1-process build of the same key (top-k ids equal,
log-probs within 1e-5: the teacher ran on other batch groupings); and two ranks read a
1-process-built cache without rebuilding it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sharp_core.spec import parse_spec
from sharp_core.train.loop import train
from tests.helpers import Recorder, train_tiny_teacher, write_corpus
from tests.test_distributed import RTOL, assert_same_trajectory, cli_train, distil_spec, read_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory) -> Path:
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher"))


def cache_spec(corpus: Path, teacher: Path, **resources) -> dict:
    d = distil_spec(corpus, teacher, "kd", **resources)
    # ~0.1 MiB shards: several per rank (the default 64 MiB would give one shard, one builder)
    d["method"]["teacher_cache"] = {"mode": "use", "k": 8, "shard_mb": 0.1}
    d["training"]["checkpoint_every"] = 0
    return d


def only_cache(store: Path) -> Path:
    (key,) = [p for p in store.iterdir() if (p / "manifest.json").is_file()]
    assert not list(store.glob(".tmp-*")), "a staging folder was left behind"
    return key


def shards(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(str(p)) for p in sorted(path.glob("shard_*.safetensors"))}


@pytest.mark.slow
def test_two_ranks_build_the_cache_one_process_reads_it(corpus, teacher_dir, tmp_path) -> None:
    # two ranks build the cache beside their run (runs side by side share <parent>/teacher-caches)
    a = tmp_path / "a"
    a.mkdir()
    spec = a / "spec.json"
    spec.write_text(json.dumps(cache_spec(corpus, teacher_dir, gpus=2)))
    run = cli_train(spec, a / "two", a / "two.jsonl")
    assert run.returncode == 0, run.stderr[-3000:]
    two = read_jsonl(a / "two.jsonl")
    built = only_cache(a / "teacher-caches")
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["build_ranks"] == 2 and len(manifest["shards"]) >= 4  # both ranks built

    # one process reads it (no rebuild) and trains the same trajectory
    rec = Recorder()
    train(parse_spec(cache_spec(corpus, teacher_dir)), a / "one", callbacks=rec)
    (event,) = [e for k, e in rec.events if k == "teacher_cache"]
    assert event["role"] == "read" and event["key"] == built.name
    assert_same_trajectory(rec.metrics, two, range(1, 7))

    # a one-process build of the same data is the same cache: same key, same shards
    b = tmp_path / "b"
    rec = Recorder()
    train(parse_spec(cache_spec(corpus, teacher_dir)), b / "one", callbacks=rec)
    (event,) = [e for k, e in rec.events if k == "teacher_cache"]
    assert event["role"] == "built"
    single = only_cache(b / "teacher-caches")
    assert single.name == built.name
    one_m = json.loads((single / "manifest.json").read_text())
    assert [(s["first"], s["count"]) for s in one_m["shards"]] == [
        (s["first"], s["count"]) for s in manifest["shards"]
    ]
    x, y = shards(built), shards(single)
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name]["ids"].sort(-1).values, y[name]["ids"].sort(-1).values)
        for t in ("logp", "tail"):
            lx = x[name][t] if t == "tail" else x[name][t].sort(-1).values
            ly = y[name][t] if t == "tail" else y[name][t].sort(-1).values
            torch.testing.assert_close(lx, ly, rtol=RTOL, atol=1e-5)

    # two ranks read the one-process cache: the manifest is not rewritten
    before = (single / "manifest.json").read_text()
    spec_b = b / "spec.json"
    spec_b.write_text(json.dumps(cache_spec(corpus, teacher_dir, gpus=2)))
    run = cli_train(spec_b, b / "two", b / "two.jsonl")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (single / "manifest.json").read_text() == before
    assert_same_trajectory(rec.metrics, read_jsonl(b / "two.jsonl"), range(1, 7))
