"""The teacher-logit cache (issue 15, part 3): the sparse losses against the dense ones, the
key, the sharded manifest, reuse without a teacher forward, and the refusals.

The service side (real worker processes, the listing, corruption and retry) is in
tests/test_teacher_cache_service.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sharp_core.cache.store import LocalCacheStore
from sharp_core.cache.teacher_cache import (
    SparseTargets,
    TeacherCache,
    build_cache,
    cache_key,
    key_parts,
    sparse_logit_objective,
    teacher_digest,
    teacher_targets,
    tokenizer_digest,
)
from sharp_core.errors import SpecError, TeacherCacheCorruptError, TokenizerMismatchError
from sharp_core.objectives import losses
from sharp_core.spec import TeacherCacheSpec, parse_spec
from sharp_core.train.loop import setup, train
from tests.helpers import GPT2_TEACHER, Recorder, spec_dict, write_corpus

DIVS = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tc"), 10_000)


def _logits(B: int = 2, M: int = 5, V: int = 40, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, M, V, generator=g) * 2).requires_grad_(True)
    t = torch.randn(B, M, V, generator=g) * 3
    y = torch.randint(0, V, (B, M), generator=g)
    y[0, 1] = losses.IGNORE_INDEX  # one masked position
    return s, t, y


def _targets(t: torch.Tensor, cfg: TeacherCacheSpec, tau: float) -> SparseTargets:
    out = teacher_targets(t, cfg, tau, list(range(t.shape[0])))
    return SparseTargets(out["ids"].long(), out["logp"], out.get("tail"))


# ------------------------------------------------------------------ losses vs the dense ones


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_at_full_vocab_equals_dense_kd(div: str, tau: float) -> None:
    """k = V: the tail bucket is empty and every divergence equals the dense one (value and
    student gradient, float32, rtol 1e-5 / atol 1e-6)."""
    s, t, y = _logits()
    V = s.shape[-1]
    n = int((y != losses.IGNORE_INDEX).sum())
    kw = dict(kd_weight=0.7, temperature=tau, alpha=0.1, beta=0.5, num_valid=n)
    ref, ref_ce, ref_d = losses.logit_objective(div, s, t, y, **kw)
    (g_ref,) = torch.autograd.grad(ref, s)
    tgt = _targets(t, TeacherCacheSpec(k=V), tau)
    assert torch.isneginf(tgt.tail).all()
    got, ce, d = sparse_logit_objective(div, s, tgt, y, estimator="tail", chunk_size=3, **kw)
    (g,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    if div == "forward_kl":  # the renormalised top-k is also exact at k = V
        got2, _, d2 = sparse_logit_objective(div, s, tgt, y, estimator="renormalized", **kw)
        torch.testing.assert_close(d2, ref_d, rtol=1e-5, atol=1e-6)
        (g2,) = torch.autograd.grad(got2, s)
        torch.testing.assert_close(g2, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["tail", "renormalized", "sampled"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_closed_form_gradient_equals_autograd(estimator: str, tau: float) -> None:
    """Forward KL takes a closed-form gradient (no autograd graph per chunk); it equals the
    autograd gradient of the same estimate (reached through jsd at β = 0, which is forward KL
    and has no closed form here) at k < V, rtol 1e-5 / atol 1e-7."""
    s, t, y = _logits(V=50)
    kind = "sampled" if estimator == "sampled" else "topk"
    tgt = _targets(t, TeacherCacheSpec(kind=kind, k=7, samples=5), tau)
    kw = dict(estimator=estimator, kd_weight=0.6, temperature=tau, num_valid=9, chunk_size=4)
    a, _, da = sparse_logit_objective("forward_kl", s, tgt, y, **kw)
    b, _, db = sparse_logit_objective("jsd", s, tgt, y, beta=0.0, **kw)
    (ga,) = torch.autograd.grad(a, s)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(da, db)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_topk_with_tail_draws_is_unbiased_and_exact_without_a_tail() -> None:
    """Exact top-k plus 6 draws from the tail sharing its mass: over M = 4000 draws the mean
    estimate of KL(p‖q) and of its gradient are within 4 standard errors of the dense ones;
    at k = V (an empty tail) it is the dense loss (rtol 1e-5), draws or not."""
    V, M = 24, 4000
    s, t, _ = _logits(B=1, M=3, V=V, seed=5)
    s = s.detach()
    cfg = TeacherCacheSpec(k=4, tail_samples=6)
    tb = t.expand(M, -1, -1)
    out = teacher_targets(tb, cfg, 1.0, list(range(M)))
    tgt = SparseTargets(
        out["ids"].long(), out["logp"], out["tail"], out["tids"].long(), out["tlogp"]
    )
    assert not torch.isin(tgt.tail_ids[0, 0], tgt.ids[0, 0]).any()  # draws outside the top-k
    sb = s.expand(M, -1, -1).clone().requires_grad_(True)
    y = torch.zeros(M, 3, dtype=torch.long)
    kw = dict(estimator="tail_sampled", kd_weight=1.0, num_valid=1, chunk_size=1000)
    loss, _, _ = sparse_logit_objective("forward_kl", sb, tgt, y, **kw)
    (g,) = torch.autograd.grad(loss, sb)
    with torch.no_grad():
        log_q = torch.log_softmax(sb, -1)
        top = (tgt.logp.exp() * (tgt.logp - log_q.gather(-1, tgt.ids))).sum(-1)
        per = top + tgt.tail.exp() * (tgt.tail_logp - log_q.gather(-1, tgt.tail_ids)).mean(-1)
        log_p = torch.log_softmax(t[0], -1)
        dense = (log_p.exp() * (log_p - torch.log_softmax(s[0], -1))).sum(-1)
        g_dense = torch.softmax(s[0], -1) - log_p.exp()
    se = per.std(0) / math.sqrt(M)
    assert (per.mean(0) - dense).abs().max() < 4 * se.max() + 1e-6, (per.mean(0), dense, se)
    # target p_tail·count/n on the tail: a known standard error (0 on the exact top-k)
    p = log_p.exp()
    p_t = tgt.tail[0].exp()[:, None]  # (3, 1)
    in_tail = torch.ones_like(p, dtype=torch.bool).scatter_(1, tgt.ids[0], False)
    pi = torch.where(in_tail, p / p_t, torch.zeros_like(p))
    gse = (p_t**2 * pi * (1 - pi) / 6 / M).sqrt()
    assert ((g.mean(0) - g_dense).abs() <= 4 * gse + 1e-6).all()
    # autograd (through jsd at β = 0: the same estimate) gives the closed form's gradient
    b, _, _ = sparse_logit_objective("jsd", sb, tgt, y, beta=0.0, **kw)
    (gb,) = torch.autograd.grad(b, sb)
    torch.testing.assert_close(g, gb, rtol=1e-5, atol=1e-7)
    # k = V: nothing left to draw from, the estimate is the dense loss
    s2, t2, y2 = _logits(V=30)
    out = teacher_targets(t2, TeacherCacheSpec(k=30, tail_samples=3), 1.0, [0, 1])
    full = SparseTargets(
        out["ids"].long(), out["logp"], out["tail"], out["tids"].long(), out["tlogp"]
    )
    ref, _, _ = losses.logit_objective("forward_kl", s2, t2, y2, kd_weight=0.5, num_valid=9)
    got, _, _ = sparse_logit_objective(
        "forward_kl", s2, full, y2, estimator="tail_sampled", kd_weight=0.5, num_valid=9
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_tail_bucket_is_a_lower_bound_and_tightens_with_k() -> None:
    """Forward KL of the (k+1)-bucket distributions never exceeds the dense KL (data
    processing inequality) and grows to it as k grows."""
    s, t, y = _logits(V=64)
    n = int((y != losses.IGNORE_INDEX).sum())
    kw = dict(kd_weight=1.0, num_valid=n)
    with torch.no_grad():
        _, _, dense = losses.logit_objective("forward_kl", s, t, y, **kw)
        vals = []
        for k in (1, 4, 16, 63, 64):
            _, _, d = sparse_logit_objective(
                "forward_kl", s, _targets(t, TeacherCacheSpec(k=k), 1.0), y, estimator="tail", **kw
            )
            vals.append(float(d))
    assert all(v <= float(dense) + 1e-6 for v in vals), (vals, float(dense))
    assert vals == sorted(vals)
    assert vals[-1] == pytest.approx(float(dense), rel=1e-5)


def test_sampled_estimator_is_unbiased() -> None:
    """RS-KD with 12 draws: over M = 4000 independent draws (one generator per block), the mean
    estimate of KL(p‖q) and of its gradient are within 4 standard errors of the dense values
    (the test's stated tolerance; a biased estimator, e.g. the renormalised top-8, is not)."""
    V, M = 24, 4000
    s, t, _ = _logits(B=1, M=3, V=V, seed=3)
    s = s.detach()
    cfg = TeacherCacheSpec(kind="sampled", samples=12)
    tb = t.expand(M, -1, -1)  # the same 3 positions in M "blocks": M independent draws
    tgt = _targets(tb, cfg, 1.0)
    sb = s.expand(M, -1, -1).clone().requires_grad_(True)
    y = torch.zeros(M, 3, dtype=torch.long)
    loss, _, _ = sparse_logit_objective(
        "forward_kl", sb, tgt, y, estimator="sampled", kd_weight=1.0, num_valid=1
    )
    (g,) = torch.autograd.grad(loss, sb)  # (M, 3, V): each draw's gradient
    with torch.no_grad():
        log_q = torch.log_softmax(sb, -1)
        per = (tgt.logp - log_q.gather(-1, tgt.ids)).mean(-1)  # (M, 3) per-draw estimates
        log_p = torch.log_softmax(t[0], -1)
        dense = (log_p.exp() * (log_p - torch.log_softmax(s[0], -1))).sum(-1)  # (3,)
        g_dense = torch.softmax(s[0], -1) - log_p.exp()  # (3, V)
    se = per.std(0) / math.sqrt(M)
    assert (per.mean(0) - dense).abs().max() < 4 * se.max(), (per.mean(0), dense, se)
    # the gradient's target is count/n per token: its standard error is known, and unlike the
    # sample's it is not 0 for a rare token that no draw happened to hit
    p = log_p.exp()
    gse = (p * (1 - p) / 12 / M).sqrt()
    assert ((g.mean(0) - g_dense).abs() <= 4 * gse + 1e-6).all()
    # the renormalised top-k is biased: its mean is off by far more than 4 standard errors
    renorm = _targets(t, TeacherCacheSpec(k=8), 1.0)
    with torch.no_grad():
        _, _, d8 = sparse_logit_objective(
            "forward_kl",
            s,
            renorm,
            torch.zeros(1, 3, dtype=torch.long),
            estimator="renormalized",
            kd_weight=1.0,
            num_valid=3,
        )
    assert abs(float(d8) - float(dense.mean())) > 10 * float(se.max())


# ------------------------------------------------------------------------------ the key


def test_key_changes_with_every_part() -> None:
    blocks = torch.arange(40).view(4, 10)
    base = dict(
        teacher="t" * 64, tokenizer="k" * 64, dataset="d" * 64, blocks=blocks, vocab=50,
        temperature=1.0,
    )  # fmt: skip
    cfg = TeacherCacheSpec(mode="use", k=8)
    key0 = cache_key(key_parts(cfg, **base))
    assert key0 == cache_key(key_parts(cfg, **base))  # deterministic
    changed = {
        "teacher": {"teacher": "u" * 64},
        "tokenizer": {"tokenizer": "j" * 64},
        "dataset": {"dataset": "e" * 64},
        "seq_len": {"blocks": torch.arange(40).view(5, 8)},
        "block content": {"blocks": blocks.flip(0)},
        "vocab": {"vocab": 51},
        "temperature": {"temperature": 2.0},
    }
    keys = {name: cache_key(key_parts(cfg, **{**base, **d})) for name, d in changed.items()}
    keys["k"] = cache_key(key_parts(cfg.model_copy(update={"k": 9}), **base))
    keys["kind"] = cache_key(key_parts(cfg.model_copy(update={"kind": "sampled"}), **base))
    keys["dtype"] = cache_key(key_parts(cfg.model_copy(update={"dtype": "float16"}), **base))
    keys["tail_samples"] = cache_key(key_parts(cfg.model_copy(update={"tail_samples": 4}), **base))
    sampled = cfg.model_copy(update={"kind": "sampled"})
    keys["sample_seed"] = cache_key(
        key_parts(sampled.model_copy(update={"sample_seed": 1}), **base)
    )
    assert key0 not in keys.values()
    assert len(set(keys.values())) == len(keys)
    # how the loss reads the cache is not part of it: both estimators share one cache
    renorm = cfg.model_copy(update={"estimator": "renormalized"})
    assert cache_key(key_parts(renorm, **base)) == key0


def test_digests_see_one_weight_and_one_token() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharp_core.models.loading import train_bpe_tokenizer

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=300))
    d0 = teacher_digest(m)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert teacher_digest(m) != d0
    a = train_bpe_tokenizer(["some text to learn from " * 40], 280)
    b = train_bpe_tokenizer(["quite another corpus, other merges " * 40], 280)
    assert tokenizer_digest(a) == tokenizer_digest(a)
    assert tokenizer_digest(a) != tokenizer_digest(b)


# ------------------------------------------------------------------- shards and manifest


class _Teacher(torch.nn.Module):
    """Logits that are a fixed function of the ids (enough for the file format)."""

    def __init__(self, V: int):
        super().__init__()
        self.emb = torch.nn.Embedding(V, V)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001
        self.calls += 1
        return type("Out", (), {"logits": self.emb(input_ids)})()


def _build(tmp: Path, n: int = 10, N: int = 6, V: int = 30, k: int = 4):
    torch.manual_seed(0)
    teacher, blocks = _Teacher(V), torch.randint(0, V, (n, N))
    store = LocalCacheStore(tmp / "store")
    cfg = TeacherCacheSpec(mode="use", k=k)
    key = "a" * 64
    staged = store.staging(key)
    per_block = (N - 1) * (k * 8 + 4)
    manifest = build_cache(
        teacher, blocks, cfg, key=key, parts={"x": 1}, vocab=V, temperature=1.0,
        out_dir=staged, batch_size=3, device=torch.device("cpu"), shard_bytes=3 * per_block,
    )  # fmt: skip
    store.put(key, staged)
    return teacher, blocks, store, key, manifest


def test_sharded_manifest_verifies_and_refuses_corruption(tmp_path: Path) -> None:
    teacher, blocks, store, key, manifest = _build(tmp_path)
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert store.list() == [key] and not list(store.root.glob(".tmp-*"))
    path = store.get(key)
    on = dict(key=key, blocks=10, positions=5)
    cache = TeacherCache.open(path, **on)
    idx = torch.tensor([9, 0, 4])
    got = cache.batch(idx, torch.device("cpu"))
    with torch.no_grad():
        ref = teacher_targets(
            teacher(blocks[idx]).logits[:, :-1], TeacherCacheSpec(k=4), 1.0, idx.tolist()
        )
    # the same entries (topk order is unspecified: compare sorted)
    torch.testing.assert_close(got["cache_logp"].sort(-1).values, ref["logp"].sort(-1).values)
    torch.testing.assert_close(got["cache_tail"], ref["tail"])

    discarded = []
    # a flipped byte in one shard: refused at open, and the cache is discarded
    shard = path / manifest["shards"][2]["name"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheCorruptError) as e:
        TeacherCache.open(path, **on, on_corrupt=lambda: discarded.append(1))
    assert e.value.code == "teacher_cache_corrupt" and "shard_00002" in e.value.message
    assert discarded == [1]
    # a shard changed after the cache was opened: refused when it is first read
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    cache = TeacherCache.open(path, **on)
    cache.batch(torch.tensor([0]), torch.device("cpu"))  # shard 0 loaded and kept
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheCorruptError):
        cache.batch(torch.tensor([7]), torch.device("cpu"))
    # a missing shard, another key, other shapes
    shard.unlink()
    with pytest.raises(TeacherCacheCorruptError, match="missing"):
        TeacherCache.open(path, **on)
    with pytest.raises(TeacherCacheCorruptError, match="another key"):
        TeacherCache.open(path, **{**on, "key": "b" * 64})
    with pytest.raises(TeacherCacheCorruptError, match="positions"):
        TeacherCache.open(path, **{**on, "blocks": 11})
    store.discard(key)
    assert not store.exists(key) and store.list() == []


def test_put_keeps_the_first_commit(tmp_path: Path) -> None:
    _, _, store, key, manifest = _build(tmp_path)
    staged = store.staging(key)
    (staged / "manifest.json").write_text(json.dumps({"key": key, "other": True}))
    store.put(key, staged)  # a second builder of the same key: its copy is dropped
    assert json.loads((store.get(key) / "manifest.json").read_text()) == manifest
    assert not staged.exists()


# ---------------------------------------------------------------- training from the cache


def _kd_spec(corpus: Path, method: dict, **cache) -> dict:
    m = {"teacher_cache": {"mode": "use", **cache}, **method}
    return spec_dict(
        corpus,
        teacher={"init": "config", "config": dict(GPT2_TEACHER)},
        method=m,
        training={"eval_every": 0, "checkpoint_every": 0},
    )


def _setup(spec):
    """`setup` as `train` calls it: after seeding (the config-initialised teacher's weights,
    and so the cache key, depend on the seed)."""
    torch.manual_seed(spec.training.seed)
    return setup(spec)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_reuse_skips_the_teacher_forward(corpus: Path, tmp_path: Path) -> None:
    """The first job builds the cache (one teacher pass over the training blocks, then none
    while training); a second job with the same key never runs the teacher and trains the
    same trajectory; an attention method runs the teacher's backbone but not its LM head."""
    spec = parse_spec(_kd_spec(corpus, {"name": "kd"}, k=16))
    S = _setup(spec)
    n_train = S.data.train.shape[0]
    calls = _count_calls(S.teacher)
    rec1 = Recorder()
    train(spec, tmp_path / "a", callbacks=rec1, prepared=S)
    batches = math.ceil(n_train / spec.training.batch_size)
    assert calls[0] == batches  # the build pass only: no teacher call in the 6 steps
    assert S.teacher is None  # a logit-only method drops the teacher once the cache is ready
    assert [(k, e["role"]) for k, e in rec1.events if k != "tokenized_data"] == [
        ("teacher_cache", "built")
    ]

    S2 = _setup(spec)
    calls2 = _count_calls(S2.teacher)
    rec2 = Recorder()
    train(spec, tmp_path / "b", callbacks=rec2, prepared=S2)
    assert calls2[0] == 0
    assert [(k, e["role"]) for k, e in rec2.events if k != "tokenized_data"] == [
        ("teacher_cache", "read")
    ]
    key = [e["key"] for k, e in rec1.events if k == "teacher_cache"]
    assert [e["key"] for k, e in rec2.events if k == "teacher_cache"] == key
    for step in (1, 6):  # reading the cache trains exactly as building it did
        assert rec2.metrics[step]["loss"] == rec1.metrics[step]["loss"]

    # the dense kd of the same job differs (top-16 of 300 is not exact), but not by much
    dense = parse_spec(
        {**_kd_spec(corpus, {"name": "kd"}), "method": {"name": "kd"}},
    )
    rec3 = Recorder()
    train(dense, tmp_path / "c", callbacks=rec3)
    assert rec3.metrics[6]["loss"] != rec1.metrics[6]["loss"]
    assert rec3.metrics[6]["ce"] == pytest.approx(rec1.metrics[6]["ce"], rel=0.02)

    # an attention method reads the same cache (its key does not depend on the method)
    sharp = parse_spec(_kd_spec(corpus, {"name": "sharp"}, k=16))
    S4 = _setup(sharp)
    body, head = _count_calls(S4.teacher.transformer), _count_calls(S4.teacher.lm_head)
    rec4 = Recorder()
    train(sharp, tmp_path / "d", callbacks=rec4, prepared=S4)
    assert rec4.events[0][1]["role"] == "read"
    assert head[0] == 0 and body[0] == spec.training.max_steps  # one micro-batch per step
    assert rec4.metrics[6]["loss"] > 0 and rec4.metrics[6]["sharp_token"] > 0


def test_a_cache_under_the_key_with_other_parts_is_rebuilt(corpus: Path, tmp_path: Path) -> None:
    """A folder named by our key whose manifest says otherwise (copied, tampered) is never
    read: it is discarded and rebuilt from the teacher."""
    store_root = tmp_path / "teacher-caches"
    a = parse_spec(_kd_spec(corpus, {"name": "kd"}, k=8))
    rec = Recorder()
    train(a, tmp_path / "a", callbacks=rec)
    key_a = rec.events[0][1]["key"]
    b = parse_spec(_kd_spec(corpus, {"name": "kd"}, k=12))
    S = _setup(b)
    # plant cache A's files under the key job B will compute
    from sharp_core.cache.teacher_cache import attach

    seen: list = []
    attach(S, LocalCacheStore(tmp_path / "probe"), lambda k, d: seen.append(d))
    key_b = seen[0]["key"]
    shutil.copytree(store_root / key_a, store_root / key_b)
    S = _setup(b)
    calls = _count_calls(S.teacher)
    rec_b = Recorder()
    train(b, tmp_path / "b", callbacks=rec_b, prepared=S)
    ev = rec_b.events[0][1]
    assert ev["role"] == "built" and "discarded" in ev["note"] and calls[0] > 0
    manifest = json.loads((store_root / key_b / "manifest.json").read_text())
    assert manifest["key"] == key_b and manifest["parts"]["k"] == 12


def test_vocab_mismatch_still_refused_with_both_names(corpus: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharp_core.models.loading import train_bpe_tokenizer

    dirs = {}
    for name, text in (("teacher", corpus.read_text()), ("student", "other words " * 200)):
        tok = train_bpe_tokenizer([text], 300 if name == "teacher" else 280)
        d = tmp_path / name
        GPT2LMHeadModel(
            GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=len(tok))
        ).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = d
    d = spec_dict(
        corpus,
        teacher={"model": str(dirs["teacher"])},
        student={"model": str(dirs["student"]), "init": "pretrained", "config": None},
        method={"name": "kd", "teacher_cache": {"mode": "use"}},
    )
    d.pop("tokenizer")
    with pytest.raises(TokenizerMismatchError) as e:
        train(parse_spec(d), tmp_path / "run")
    assert str(dirs["teacher"]) in e.value.message and str(dirs["student"]) in e.value.message
    assert not (tmp_path / "teacher-caches").exists()


# ------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    ("method", "cache", "param"),
    [
        ({"name": "rkl"}, {"kind": "sampled"}, "spec.method.teacher_cache.kind"),
        ({"name": "jsd"}, {"estimator": "renormalized"}, "spec.method.teacher_cache.estimator"),
        ({"name": "sft"}, {}, "spec.method.teacher_cache.mode"),
        ({"name": "kd"}, {"k": 0}, "spec.method.teacher_cache.k"),
        ({"name": "kd"}, {"samples": 0}, "spec.method.teacher_cache.samples"),
        ({"name": "kd"}, {"kind": "dense"}, "spec.method.teacher_cache.kind"),
        ({"name": "kd"}, {"sizes": 3}, "spec.method.teacher_cache.sizes"),
        ({"name": "rkl"}, {"tail_samples": 4}, "spec.method.teacher_cache.tail_samples"),
        (
            {"name": "kd"},
            {"tail_samples": 4, "estimator": "renormalized"},
            "spec.method.teacher_cache.tail_samples",
        ),
    ],
)
def test_bad_cache_settings_name_the_field(corpus: Path, method, cache, param) -> None:
    d = _kd_spec(corpus, method, **cache)
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.param == param and e.value.status == 422


def test_cache_accepted_on_several_gpus_and_every_divergence_accepted_with_the_tail(
    corpus: Path,
) -> None:
    """Several GPUs build the cache together (tests/test_teacher_cache_ranks.py)."""
    d = _kd_spec(corpus, {"name": "kd"})
    d["resources"] = {"gpus": 2}
    assert parse_spec(d).method.teacher_cache.mode == "use"
    for name in ("kd", "rkl", "skl", "srkl", "jsd", "tinybert", "minilm", "sharp"):
        parse_spec(_kd_spec(corpus, {"name": name}))  # topk + tail: every divergence


class _DirObjects:
    """A directory as an object store with the artifact store's methods (keys a/b/c): what the
    S3 backend offers `service.teacher_caches.ObjectCacheStore`. ``fail_on`` makes one key's
    upload fail, as a network error would."""

    def __init__(self, root: Path, fail_on: str | None = None):
        self.root, self.fail_on = root, fail_on
        self.uploads: list[str] = []

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        if self.fail_on and key.endswith(self.fail_on):
            raise OSError("upload failed")
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.root / key)
        self.uploads.append(key)

    def get_file(self, key: str, dest: Path) -> None:
        shutil.copyfile(self.root / key, dest)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list(self, prefix: str) -> list[tuple[str, int]]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(
            (p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p in base.rglob("*")
            if p.is_file()
        )

    def delete(self, keys) -> None:  # noqa: ANN001
        for k in keys:
            (self.root / k).unlink(missing_ok=True)


def test_object_store_backend_commits_manifest_last(tmp_path: Path) -> None:
    """The cache on an object store (S3 has no folder rename): shards uploaded before the
    manifest, a failed upload leaves no visible cache, a fresh worker downloads and verifies
    it, discard removes it."""
    from service.teacher_caches import ObjectCacheStore

    _, blocks, local, key, manifest = _build(tmp_path)
    src = local.get(key)
    objects = _DirObjects(tmp_path / "bucket", fail_on="manifest.json")
    store = ObjectCacheStore(objects, "teacher-caches/team_1", tmp_path / "scratch-a")
    staged = store.staging(key)
    shutil.copytree(src, staged, dirs_exist_ok=True)
    with pytest.raises(OSError):
        store.put(key, staged)
    assert not store.exists(key) and store.list() == []  # shards alone are never a cache
    objects.fail_on = None
    objects.uploads.clear()
    store.put(key, staged)
    assert objects.uploads[-1] == f"teacher-caches/team_1/{key}/manifest.json"
    assert len(objects.uploads) == len(manifest["shards"]) + 1
    assert store.exists(key) and store.list() == [key]
    other = ObjectCacheStore(objects, "teacher-caches/team_1", tmp_path / "scratch-b")
    path = other.get(key)  # another machine: downloaded into its scratch folder
    cache = TeacherCache.open(path, key=key, blocks=10, positions=5)
    assert cache.batch(torch.tensor([9]), torch.device("cpu"))["cache_ids"].shape == (1, 5, 4)
    other.discard(key)
    assert not store.exists(key) and objects.list("teacher-caches/team_1") == []
