"""The training loop: every method, accumulation, resume, checkpoints, data, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharp_core.data.loading import BatchStream, load_texts
from sharp_core.errors import CheckpointError, DataError, TokenizerMismatchError
from sharp_core.spec import DatasetSpec, parse_spec
from sharp_core.train.checkpoint import latest_checkpoint, list_checkpoints, verify_manifest
from sharp_core.train.loop import TrainCallbacks, train
from tests.helpers import (
    GPT2_TEACHER,
    GPT2_TINY,
    Recorder,
    spec_dict,
    to_legacy_checkpoint,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory) -> Path:
    """A tiny teacher trained briefly from config (its tokenizer is trained too)."""
    out = tmp_path_factory.mktemp("teacher")
    spec = parse_spec(
        spec_dict(
            corpus,
            student={"init": "config", "config": dict(GPT2_TEACHER)},
            training={"max_steps": 4, "eval_every": 0, "checkpoint_every": 0},
        )
    )
    res = train(spec, out)
    assert res.status == "completed" and res.checkpoint is not None
    return res.checkpoint


def _distil(corpus, teacher_dir, method: dict, **over) -> dict:
    d = spec_dict(corpus, teacher={"model": str(teacher_dir)}, method=method, **over)
    d.pop("tokenizer")
    return d


ALL_METHODS = [
    {"name": "sft"},
    {"name": "kd"},
    {"name": "rkl"},
    {"name": "skl"},
    {"name": "srkl"},
    {"name": "jsd", "jsd_beta": 0.3},
    {"name": "tinybert"},
    {"name": "minilm"},
    {"name": "sharp"},
    {"name": "sharp", "decomposition": "direct"},
    {"name": "sharp", "basis": "learned", "rank": 8},
    {"name": "sharp", "granularities": {"token": 0, "residual": 1}},
    {"name": "sharp", "conflict": "pcgrad", "interference_every": 1},
    {"name": "sharp", "normalization": "count", "attention_schedule": "cosine_decay"},
    {"name": "sharp", "layer_distance": "kl", "granularities": {"layer": 1.0}},
]


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: "-".join(f"{v}" for v in m.values()))
def test_every_method_trains(corpus, teacher_dir, tmp_path, method):
    """Every method runs through the one loop, logs its terms, and changes the student."""
    spec = parse_spec(
        _distil(corpus, teacher_dir, method, training={"max_steps": 3, "checkpoint_every": 0})
    )
    rec = Recorder()
    res = train(spec, tmp_path / "run", callbacks=rec)
    assert res.status == "completed" and res.step == 3
    last = rec.metrics[3]
    assert math.isfinite(last["loss"]) and last["loss"] > 0
    assert last["grad_norm"] > 0 and last["tokens_per_s"] > 0 and last["peak_mem_mb"] > 0
    name = method["name"]
    if name != "sft":
        assert last["kd"] >= 0
    else:
        assert "kd" not in last
    if name == "sharp":
        g = method.get("granularities", {})
        if method.get("decomposition") == "direct":
            assert "sharp_direct" in last and "sharp_layer" not in last
        else:
            assert ("sharp_token" in last) == (g.get("token", 1) > 0)
            assert ("sharp_residual" in last) == (g.get("residual", 0) > 0)
            assert last["sharp_layer"] >= 0 and last["sharp_head"] >= 0
    if name == "tinybert":
        assert last["tinybert_attn"] > 0
    if name == "minilm":
        assert last["minilm_attn"] > 0
    if method.get("interference_every"):
        cos = {k: v for k, v in last.items() if k.startswith("cos_")}
        assert "cos_logit_sharp_layer" in cos and all(-1.0 <= v <= 1.0 for v in cos.values())
    # the saved student differs from a freshly initialised one: parameters changed
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(res.checkpoint)
    torch.manual_seed(spec.training.seed)
    w = trained.transformer.h[0].attn.c_attn.weight
    assert torch.isfinite(w).all()
    assert rec.metrics[1]["loss"] != rec.metrics[3]["loss"]


def test_accumulation_8x1_equals_1x8(corpus, teacher_dir):
    """Global-count normalisation: 8 micro-batches of 1 give the gradient of 1 batch of 8.

    Compared on gradients, not on weights after an AdamW step: Adam's first update is
    ±lr per element, which turns float rounding in a near-zero gradient into a sign flip.
    """
    from sharp_core.train.loop import setup
    from sharp_core.train.step import micro_step

    d = _distil(corpus, teacher_dir, {"name": "sharp", "granularities": {"residual": 0.5}})
    d["student"]["config_overrides"] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    S = setup(parse_spec(d))
    x = S.data.train[:8]
    n_tok, n_seq = x[:, 1:].numel(), x.shape[0]
    results = []
    for chunks in (1, 8):
        S.student.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for xb in x.chunk(chunks):
            terms, _ = micro_step(S, xb, n_tokens=n_tok, n_seqs=n_seq, kd_weight=0.5)
            terms["loss"].backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        grads = {n: p.grad.clone() for n, p in S.student.named_parameters()}
        results.append((sums, grads))
    (m1, g1), (m8, g8) = results
    for k in ("loss", "ce", "kd", "sharp_layer", "sharp_head", "sharp_token", "sharp_residual"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5), k  # float32 sums in another order
    for n in g1:
        torch.testing.assert_close(g8[n], g1[n], rtol=1e-4, atol=1e-7)


def test_sdpa_projection_step_equals_chunked_reference(corpus, teacher_dir):
    """The fast path (P·Q from one SDPA call, the default) and the float32 chunked reference
    give the same SHARP terms and the same student gradient on one real micro-step."""
    from sharp_core.train.loop import setup
    from sharp_core.train.step import micro_step

    results = []
    for projection in ("chunked", "sdpa"):
        d = _distil(
            corpus,
            teacher_dir,
            {"name": "sharp", "projection": projection, "granularities": {"residual": 0.5}},
        )
        d["student"]["config_overrides"] = {
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
        torch.manual_seed(0)  # the same random student both times
        S = setup(parse_spec(d))
        x = S.data.train[:4]
        terms, _ = micro_step(S, x, n_tokens=x[:, 1:].numel(), n_seqs=4, kd_weight=0.5)
        terms["loss"].backward()
        grads = {n: p.grad.clone() for n, p in S.student.named_parameters() if p.grad is not None}
        results.append(({k: float(v) for k, v in terms.items()}, grads))
    (ref, g_ref), (got, g_got) = results
    assert set(got) == set(ref) and ref["sharp_token"] > 0
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), k
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-7)


def test_micro_step_uses_the_logit_loss_it_is_given(corpus, teacher_dir):
    """The logit term comes from `Setup.logit_loss`: a stand-in computing CE and D as two
    separate calls is the one called, and gives the fused default's terms and gradients."""
    from dataclasses import replace

    from sharp_core.objectives import losses
    from sharp_core.train.loop import setup
    from sharp_core.train.step import micro_step

    d = _distil(corpus, teacher_dir, {"name": "skl"})
    d["student"]["config_overrides"] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    S = setup(parse_spec(d))
    assert S.logit_loss is losses.logit_objective
    calls = []

    def separate(name, s, t, y, *, kd_weight, num_valid, chunk_size=None, **kw):
        calls.append(name)
        ce = losses.cross_entropy(s, y, num_valid=num_valid, chunk_size=chunk_size)
        dv = losses.divergence(name, s, t, y, num_valid=num_valid, chunk_size=chunk_size, **kw)
        return (1 - kd_weight) * ce + kd_weight * dv, ce.detach(), dv.detach()

    x = S.data.train[:4]
    results = []
    # logit_path="dense": the logit loss on whole logits (the default step takes the fused
    # path of sharp_core.objectives.fused on a plain lm_head, which never builds them)
    for s_up in (S, replace(S, logit_loss=separate, logit_path="dense")):
        s_up.student.zero_grad(set_to_none=True)
        terms, _ = micro_step(s_up, x, n_tokens=x[:, 1:].numel(), n_seqs=4)
        terms["loss"].backward()
        grads = {n: p.grad.clone() for n, p in S.student.named_parameters()}
        results.append(({k: float(v) for k, v in terms.items()}, grads))
    assert calls == ["skew_forward_kl"]
    (ref, g_ref), (got, g_got) = results
    assert set(got) == set(ref) and ref["kd"] > 0
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5), k
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-7)


def test_resume_gives_same_trajectory(corpus, teacher_dir, tmp_path):
    """Stop at step 4, resume to 8: the same per-step losses as an uninterrupted run (dropout on)."""
    d = _distil(
        corpus,
        teacher_dir,
        {"name": "sharp"},
        training={"max_steps": 8, "checkpoint_every": 4, "eval_every": 4},
    )
    full = Recorder()
    train(parse_spec(d), tmp_path / "full", callbacks=full)
    part = Recorder(stop_at=4)
    res = train(parse_spec(d), tmp_path / "part", callbacks=part)
    assert res.status == "stopped" and res.step == 4
    rest = Recorder()
    res2 = train(parse_spec(d), tmp_path / "part", callbacks=rest)
    assert res2.status == "completed" and res2.step == 8
    assert min(rest.metrics) == 5  # continued, not restarted
    for step in range(1, 9):
        got = (part.metrics if step <= 4 else rest.metrics)[step]["loss"]
        assert got == pytest.approx(full.metrics[step]["loss"], rel=1e-5, abs=1e-6), step
    assert rest.metrics[8]["eval_loss"] == pytest.approx(full.metrics[8]["eval_loss"], rel=1e-5)


def test_checkpoint_layout_and_manifest(corpus, tmp_path):
    spec = parse_spec(spec_dict(corpus, training={"keep_checkpoints": 2}))
    rec = Recorder()
    res = train(spec, tmp_path / "run", callbacks=rec)
    steps = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert rec.checkpoints == [3, 6] and steps == [3, 6]
    m = verify_manifest(res.checkpoint)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_state.pt",
        "spec.json",
    } <= set(m["files"])
    assert (
        json.loads((res.checkpoint / "spec.json").read_text())["training"]["keep_checkpoints"] == 2
    )
    # corrupt the newest: it no longer verifies and resume falls back to the previous one
    (res.checkpoint / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        verify_manifest(res.checkpoint)
    assert latest_checkpoint(tmp_path / "run").name == "step_000003"
    assert not list((tmp_path / "run").glob(".tmp-*"))


def _drop_from_checkpoint(ckpt: Path, key: str) -> None:
    """Remove one tensor from a checkpoint's weights and re-sign its manifest (so it still
    verifies: what a buggy writer, not a torn write, would leave)."""
    from safetensors.torch import load_file, save_file

    from sharp_core.train.checkpoint import sha256_file

    path = ckpt / "model.safetensors"
    weights = load_file(str(path))
    assert key in weights
    del weights[key]
    save_file(weights, str(path), metadata={"format": "pt"})
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    verify_manifest(ckpt)


def test_resume_refuses_a_missing_untied_head_and_accepts_a_tied_one(corpus, tmp_path):
    """A missing key is acceptable only when its weight is tied to one the checkpoint holds.

    An untied lm_head missing from the checkpoint would otherwise resume with random weights.
    Checkpoints in the format before the sharded one (weights in ``model.safetensors``)."""
    from sharp_core.errors import CheckpointMismatchError, SharpError

    def run(out: Path, tie: bool, stop_at: int | None) -> TrainCallbacks:
        config = {**GPT2_TINY, "tie_word_embeddings": tie}
        d = spec_dict(
            corpus,
            student={"init": "config", "config": config},
            training={"max_steps": 4, "checkpoint_every": 2, "eval_every": 0},
        )
        rec = Recorder(stop_at=stop_at)
        train(parse_spec(d), out, callbacks=rec)
        return rec

    # tied (GPT-2's default): save_pretrained leaves lm_head out, and resuming works
    run(tmp_path / "tied", True, stop_at=2)
    ckpt = latest_checkpoint(tmp_path / "tied")
    to_legacy_checkpoint(ckpt)
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    rec = run(tmp_path / "tied", True, stop_at=None)
    assert min(rec.metrics) == 3 and 4 in rec.metrics

    # untied: the head is saved; without it the checkpoint must be refused, naming the key
    run(tmp_path / "untied", False, stop_at=2)
    ckpt = latest_checkpoint(tmp_path / "untied")
    to_legacy_checkpoint(ckpt)
    _drop_from_checkpoint(ckpt, "lm_head.weight")
    with pytest.raises(CheckpointMismatchError) as e:
        run(tmp_path / "untied", False, stop_at=None)
    assert isinstance(e.value, SharpError) and not e.value.retryable
    assert "lm_head.weight" in e.value.message and ckpt.name in e.value.message


def test_check_weights_follows_the_models_own_ties():
    """The same missing key is accepted for a tied model and refused for an untied one, and
    a tied key is refused when the weight it is tied to is missing too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharp_core.errors import CheckpointMismatchError
    from sharp_core.train.state import check_weights

    cfg = {k: v for k, v in GPT2_TINY.items() if k != "model_type"}
    tied = GPT2LMHeadModel(GPT2Config(**cfg, vocab_size=50, tie_word_embeddings=True))
    untied = GPT2LMHeadModel(GPT2Config(**cfg, vocab_size=50, tie_word_embeddings=False))
    where = Path("step_000002")
    check_weights(tied, ["lm_head.weight"], [], where)
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        check_weights(untied, ["lm_head.weight"], [], where)
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        check_weights(tied, ["lm_head.weight", "transformer.wte.weight"], [], where)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        check_weights(tied, [], ["lm_head.bias"], where)


def test_checkpoint_loads_and_matches_training_logits(corpus, teacher_dir, tmp_path):
    """The saved student, loaded with from_pretrained, gives the logits it had at the end."""
    from transformers import AutoModelForCausalLM

    from sharp_core.train.loop import setup

    spec = parse_spec(_distil(corpus, teacher_dir, {"name": "kd"}, training={"max_steps": 2}))
    S = setup(spec)
    res = train(spec, tmp_path / "run", prepared=S)
    x = S.data.eval[:2]
    S.student.eval()
    with torch.no_grad():
        ref = S.student(input_ids=x).logits
        loaded = AutoModelForCausalLM.from_pretrained(res.checkpoint).eval()
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_teacher_with_padded_vocab_is_sliced(corpus, teacher_dir, tmp_path):
    """A teacher whose embedding has more rows than the tokenizer distils fine (sliced)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    big = tmp_path / "padded"
    m = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    m.resize_token_embeddings(len(tok) + 13)
    m.save_pretrained(big)
    tok.save_pretrained(big)
    spec = parse_spec(_distil(corpus, big, {"name": "kd"}, training={"max_steps": 1}))
    rec = Recorder()
    train(spec, tmp_path / "run", callbacks=rec)
    assert math.isfinite(rec.metrics[1]["kd"])


def test_mismatched_tokenizers_named(corpus, teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sharp_core.models.loading import train_bpe_tokenizer

    other = tmp_path / "other"
    tok = train_bpe_tokenizer(["completely different text " * 50], 280)
    AutoModelForCausalLM.from_pretrained(teacher_dir).save_pretrained(other)
    tok.save_pretrained(other)
    d = _distil(corpus, teacher_dir, {"name": "kd"})
    d["student"] = {"model": str(other)}
    with pytest.raises(TokenizerMismatchError) as e:
        train(parse_spec(d), tmp_path / "run")
    assert str(teacher_dir) in e.value.message and str(other) in e.value.message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_other_families_distil(corpus, teacher_dir, tmp_path, family):
    """OPT and Llama (GQA, RoPE) students from config, with SHARP against the GPT-2 teacher."""
    cfg = {
        "opt": {
            "model_type": "opt",
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
        },
        "llama": {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
    }[family]
    d = _distil(corpus, teacher_dir, {"name": "sharp"}, training={"max_steps": 2})
    d["student"] = {"init": "config", "config": cfg}
    rec = Recorder()
    res = train(parse_spec(d), tmp_path / "run", callbacks=rec)
    assert res.status == "completed"
    assert rec.metrics[2]["sharp_head"] > 0 and math.isfinite(rec.metrics[2]["loss"])


def test_local_folder_pretrained_and_config_overrides(corpus, teacher_dir, tmp_path):
    """The hub path's loading code on a local folder: pretrained, and config + overrides."""
    d = _distil(corpus, teacher_dir, {"name": "kd"}, training={"max_steps": 1})
    d["student"] = {"model": str(teacher_dir), "init": "config", "config_overrides": {"n_layer": 1}}
    from sharp_core.train.loop import setup

    S = setup(parse_spec(d))
    assert S.student.config.n_layer == 1 and S.teacher.config.n_layer == 4
    d["student"] = {
        "model": str(teacher_dir),
        "config_overrides": {"no_such_field": 1},
        "init": "config",
    }
    from sharp_core.errors import SharpError

    with pytest.raises(SharpError) as e:
        setup(parse_spec(d))
    assert e.value.param == "spec.student.config_overrides.no_such_field"


# ---------------------------------------------------------------------------- data


def test_batch_stream_deterministic_and_resumable():
    blocks = torch.arange(50).view(25, 2)
    a = BatchStream(blocks, seed=3)
    seq = [a.next(4) for _ in range(10)]  # crosses epoch boundaries
    b = BatchStream(blocks, seed=3)
    for _ in range(4):
        b.next(4)
    c = BatchStream(blocks, seed=99)
    c.load_state_dict(b.state_dict())
    for i in range(4, 10):
        assert torch.equal(c.next(4), seq[i])
    # every block appears once per epoch
    first_epoch = torch.cat(seq)[:25, 0]
    assert sorted(first_epoch.tolist()) == list(range(0, 50, 2))
    assert not torch.equal(BatchStream(blocks, seed=4).next(4), seq[0])


def test_data_formats_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"content": f"document number {i} " * 5} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for f in ("d.jsonl", "d.parquet"):
        texts = load_texts(DatasetSpec(files=[str(tmp_path / f)], text_field="content"))
        assert texts[3] == rows[3]["content"]
    with pytest.raises(DataError) as e:
        load_texts(DatasetSpec(files=[str(tmp_path / "d.jsonl")], text_field="body"))
    assert e.value.param == "spec.dataset.text_field"
    with pytest.raises(DataError) as e:
        load_texts(DatasetSpec(files=[str(tmp_path / "missing.txt")]))
    assert e.value.param == "spec.dataset.files.0"


def test_eval_split_is_held_out_tail(corpus):
    from sharp_core.data.loading import build_data
    from sharp_core.models.loading import train_bpe_tokenizer

    texts = load_texts(DatasetSpec(files=[str(corpus)], eval_fraction=0.1))
    tok = train_bpe_tokenizer(texts, 300)
    data = build_data(DatasetSpec(files=[str(corpus)], eval_fraction=0.1), texts, tok, 32)
    from sharp_core.data.loading import pack

    blocks = pack(tok(texts, add_special_tokens=False)["input_ids"], tok.eos_token_id, 32)
    n = blocks.shape[0]
    n_eval = round(n * 0.1)
    assert torch.equal(data.train, blocks[: n - n_eval])  # the head trains
    assert torch.equal(data.eval, blocks[n - n_eval :][:64])  # the tail evaluates (capped)


# ---------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sharp_core", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: d.update(bogus=1), "spec.bogus"),
        (lambda d: d["training"].update(lr=-0.1), "spec.training.lr"),
        (lambda d: d["student"].update(trust_remote_code=True), "spec.student.trust_remote_code"),
        (lambda d: d["dataset"].update(files=["/no/such/file.txt"]), "spec.dataset.files.0"),
        (
            lambda d: d.update(teacher={"model": "/no/such/model"}, method={"name": "kd"}),
            "spec.teacher.model",
        ),
    ],
    ids=["unknown-field", "negative-lr", "remote-code", "missing-data", "missing-model"],
)
def test_cli_bad_input_exit_2_nothing_written(corpus, tmp_path, mutate, needle):
    d = spec_dict(corpus)
    mutate(d)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(d))
    out = tmp_path / "out"
    r = _cli("train", str(spec), "--out", str(out), "--quiet")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_train_and_eval(corpus, tmp_path):
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(corpus)))
    r = _cli("train", str(spec), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "completed at step 6" in r.stderr
    r = _cli(
        "eval",
        "--model",
        str(tmp_path / "out" / "step_000006"),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
    )
    assert r.returncode == 0, r.stderr
    ppl = float(r.stdout.split("perplexity")[1].split()[0])
    assert 1.0 < ppl < 300  # the tokenizer has 300 tokens; 6 steps beat uniform


def test_example_specs_parse():
    from sharp_core.spec import load_spec

    for p in sorted((ROOT / "examples").glob("*.yaml")):
        spec = load_spec(p)
        assert spec.training.max_steps > 0, p
