"""On-policy distillation (issue 15): `sharp_core.train.onpolicy` and its place in the loop.

Tiny GPT-2 pairs on CPU. What is checked: λ = 0 is today's off-policy run bit for bit;
only generated tokens carry loss (against a hand computation); generation is a function of
the seeds alone (and of each row's own seed, so batch cuts and ranks do not matter), and
the KV-cache loop matches a cache-free greedy reference; an interrupted run resumes onto
the uninterrupted trajectory (RNG, probability and replay buffer restored); two processes
follow one; and bad settings are refused naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharp_core.errors import SpecError
from sharp_core.spec import parse_spec
from sharp_core.train.loop import setup, train
from sharp_core.train.onpolicy import OnPolicy, _filter, _sample, generate, loss_mask
from sharp_core.train.state import STATE_FILE
from sharp_core.train.step import micro_step, step_counts
from tests.helpers import (
    GPT2_TINY,
    NO_DROPOUT,
    Recorder,
    spec_dict,
    train_tiny_teacher,
    write_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory) -> Path:
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher"))


def distil(corpus: Path, teacher: Path, method: dict, **over) -> dict:
    d = spec_dict(
        corpus,
        teacher={"model": str(teacher)},
        student={"init": "config", "config": dict(GPT2_TINY)},
        method=method,
        **over,
    )
    d.pop("tokenizer")  # the teacher's
    return d


# ----------------------------------------------------------------------------- λ = 0


@pytest.mark.parametrize(
    "block", [{"fraction": 0.0, "max_new_tokens": 8}, {"adaptive": True, "max_new_tokens": 8}]
)
def test_lambda_zero_is_the_off_policy_run_bit_for_bit(corpus, teacher_dir, tmp_path, block):
    """λ = 0 draws no random number and replaces no batch: every logged value and the final
    weights are identical (==, not approx) to the run without the block (dropout on)."""
    runs = []
    for i, method in enumerate(({"name": "kd"}, {"name": "kd", "on_policy": block})):
        rec = Recorder()
        res = train(
            parse_spec(distil(corpus, teacher_dir, method)), tmp_path / str(i), callbacks=rec
        )
        runs.append((rec.metrics, res.checkpoint))
    (ref, ref_ckpt), (got, got_ckpt) = runs
    assert sorted(ref) == sorted(got) == list(range(7))
    for step in range(1, 7):
        for k in ("loss", "ce", "kd", "grad_norm"):
            assert got[step][k] == ref[step][k], (step, k)
        assert got[step]["on_policy"] == 0.0
    for step in (3, 6):
        assert got[step]["eval_loss"] == ref[step]["eval_loss"]
    from safetensors.torch import load_file

    a, b = (
        load_file(str(ref_ckpt / "model.safetensors")),
        load_file(str(got_ckpt / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the loss


def _setup(corpus, teacher_dir, method: dict, **over):
    d = distil(corpus, teacher_dir, method, **over)
    d["student"]["config_overrides"] = NO_DROPOUT
    return setup(parse_spec(d))


@pytest.mark.parametrize("seq_kd", [False, True])
def test_only_generated_tokens_carry_loss(corpus, teacher_dir, seq_kd):
    """The step's terms on a generated batch equal a hand computation over the generated
    tokens only: (1 − a)·CE + a·KL(p_T ‖ q_S) summed over the rows that predict generated
    tokens, divided by B·T; a is 1 for student samples (no CE), the spec's 0.9 for teacher
    samples (SeqKD)."""
    S = _setup(
        corpus,
        teacher_dir,
        {"name": "kd", "on_policy": {"fraction": 1.0, "max_new_tokens": 8, "seq_kd": seq_kd}},
    )
    op = OnPolicy(S.spec)
    data = [{"input_ids": S.data.train[:4]}]
    batches, kind = op.batches(
        0, data, student=S.student, teacher=S.teacher, vocab=S.vocab, amp_dtype=None
    )
    assert kind == "generated" and op.prompt == 24 and op.width == 32
    b = batches[0]
    x = b["input_ids"]  # (4, 32): the block's first 24 tokens, then 8 generated
    assert torch.equal(x[:, :24], S.data.train[:4, :24])
    assert torch.equal(b["loss_mask"], loss_mask(4, 24, 8, x.device))
    n_seq, n_tok = step_counts(batches, classify=False)
    assert (n_seq, n_tok) == (4, 4 * 8)
    a = op.kd_weight(kind)
    assert a == (None if seq_kd else 1.0)
    terms, _ = micro_step(S, b, n_tokens=n_tok, n_seqs=n_seq, kd_weight=a)
    with torch.no_grad():
        s = S.student(input_ids=x).logits[:, 23:31, : S.vocab].float()  # rows predicting 24..31
        t = S.teacher(input_ids=x).logits[:, 23:31, : S.vocab].float()
        y = x[:, 24:32]
        ce = F.cross_entropy(s.reshape(-1, S.vocab), y.reshape(-1), reduction="sum") / 32
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum() / 32
    w = 0.9 if seq_kd else 1.0
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(terms["kd"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(float((1 - w) * ce + w * kl), rel=1e-5)
    # without the mask, the prompt rows would count (a different, larger sum)
    terms3, _ = micro_step(S, x, n_tokens=4 * 31, n_seqs=4, kd_weight=a)
    assert float(terms3["kd"]) != pytest.approx(float(terms["kd"]), rel=1e-3)


@pytest.mark.parametrize("method", ["kd", "rkl", "skl", "srkl", "jsd"])
def test_prompt_rows_get_no_gradient(corpus, teacher_dir, method):
    """Every logit divergence: the student's logits at prompt rows receive exactly zero
    gradient; generated rows do."""
    S = _setup(
        corpus, teacher_dir, {"name": method, "on_policy": {"fraction": 1.0, "max_new_tokens": 8}}
    )
    # the dense path: this test reads the gradient of whole logits, which the fused path
    # never builds (its masking is checked against this path in tests/test_fused_loss.py)
    S.logit_path = "dense"
    x = S.data.train[:2]
    grads = {}

    def keep(_m, _i, out):
        out.logits.retain_grad()
        grads["logits"] = out.logits

    h = S.student.register_forward_hook(keep)
    try:
        terms, _ = micro_step(
            S,
            {"input_ids": x, "loss_mask": loss_mask(2, 24, 8, x.device)},
            n_tokens=16,
            n_seqs=2,
            kd_weight=1.0,
        )
        terms["loss"].backward()
    finally:
        h.remove()
    g = grads["logits"].grad  # (2, 32, V)
    assert float(g[:, :23].abs().max()) == 0.0
    assert float(g[:, 23:31].abs().amax(-1).min()) > 0  # every generated-token row learns
    assert float(g[:, 31].abs().max()) == 0.0  # the last position predicts nothing


@pytest.mark.parametrize("method", ["tinybert", "minilm", "sharp"])
def test_attention_terms_see_only_generated_queries(corpus, teacher_dir, method):
    """Each attention method's terms on a generated batch are its objective on the maps
    captured from both models on the same generated sequences, with the generated positions
    as the only valid queries (and differ from the all-queries value)."""
    S = _setup(
        corpus,
        teacher_dir,
        {"name": method, "on_policy": {"fraction": 1.0, "max_new_tokens": 8}},
    )
    x = S.data.train[:2]
    mask = loss_mask(2, 24, 8, x.device)
    terms, _ = micro_step(S, {"input_ids": x, "loss_mask": mask}, n_tokens=16, n_seqs=2)
    with torch.no_grad(), S.student_capture, S.teacher_capture:
        S.student(input_ids=x)
        S.teacher(input_ids=x)
        ref = S.objective(S.student_capture.layers, S.teacher_capture.layers, mask)
        full = S.objective(S.student_capture.layers, S.teacher_capture.layers, None)
    names = [k for k in ref if k != "basis_loss"]
    assert names and set(names) <= set(terms)
    for k in names:
        assert float(terms[k].detach()) == pytest.approx(float(ref[k]) / 2, rel=1e-5), k
    assert any(float(ref[k]) != pytest.approx(float(full[k]), rel=1e-3) for k in names)


# ----------------------------------------------------------------------------- generation


def test_generation_depends_on_the_seeds_alone(corpus, teacher_dir):
    """Same seeds → same tokens; another seed → other tokens; a row's tokens do not depend
    on the rows beside it (two half-batches give the whole batch: ranks' slices match one
    process); the model is back in train mode; greedy (top_k=1) equals a cache-free argmax
    decode (the KV cache is right)."""
    S = _setup(corpus, teacher_dir, {"name": "kd"})
    model = S.student
    model.train()
    prompts = S.data.train[:4, :16]
    kw = {"max_new_tokens": 10, "vocab": S.vocab}
    a = generate(model, prompts, seeds=[1, 2, 3, 4], **kw)
    assert model.training and a.shape == (4, 26) and torch.equal(a[:, :16], prompts)
    assert torch.equal(a, generate(model, prompts, seeds=[1, 2, 3, 4], **kw))
    halves = torch.cat(
        [
            generate(model, prompts[:2], seeds=[1, 2], **kw),
            generate(model, prompts[2:], seeds=[3, 4], **kw),
        ]
    )
    assert torch.equal(a, halves)
    b = generate(model, prompts, seeds=[5, 6, 7, 8], **kw)
    assert not torch.equal(a[:, 16:], b[:, 16:])
    assert int(a[:, 16:].max()) < S.vocab
    greedy = generate(model, prompts, seeds=[0] * 4, top_k=1, **kw)
    ref = prompts
    model.eval()
    with torch.no_grad():
        for _ in range(10):
            nxt = model(input_ids=ref).logits[:, -1, : S.vocab].argmax(-1)
            ref = torch.cat([ref, nxt[:, None]], dim=1)
    model.train()
    assert torch.equal(greedy, ref)


def test_sampling_follows_the_filtered_softmax():
    """Gumbel-max draws match softmax(l/τ) (20 000 draws, ±0.015 per class); top-k and top-p
    cut exactly the tokens they should."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    gens = [torch.Generator().manual_seed(0)]
    draws = torch.stack([_sample(logits, gens, 0.7, 0, 1.0) for _ in range(20_000)])
    freq = torch.bincount(draws.view(-1), minlength=5).float() / 20_000
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(-1), atol=0.015, rtol=0)
    k2 = _filter(logits, 2, 1.0)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # 0.57, 0.21, 0.08, 0.03, 0.13: 0.57 + 0.21 ≥ 0.7 → two kept
    assert float(p[0]) < 0.7 <= float(p[0] + p[1])
    assert torch.isfinite(_filter(logits, 0, 0.7)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(_filter(logits, 0, 0.01)).tolist() == [[True, False, False, False, False]]


# ----------------------------------------------------------------------------- adaptive


def test_adaptive_probability_rises_with_the_eval_loss(corpus):
    spec = parse_spec(
        {
            **spec_dict(corpus),
            "teacher": {"model": "x"},
            "method": {
                "name": "kd",
                "on_policy": {"fraction": 0.2, "adaptive": True, "max_new_tokens": 8},
            },
        }
    )
    op = OnPolicy(spec)
    for loss, p in [(5.0, 0.2), (4.0, 0.2), (4.5, 0.3), (4.5, 0.3), (4.6, 0.4), (1.0, 0.4)]:
        op.observe_eval({"eval_loss": loss})
        assert op.prob == pytest.approx(p), loss
    for _ in range(20):
        op.observe_eval({"eval_loss": op.last_eval + 1})
    assert op.prob == 1.0


def test_resume_continues_the_same_trajectory(corpus, teacher_dir, tmp_path):
    """Adaptive mode (fresh generations, replays and data batches all occur): stopped at
    step 4 and resumed, the run logs the uninterrupted run's values; the checkpoint holds the
    generator, p and the buffer (in global row order, capacity-bounded)."""
    d = distil(
        corpus,
        teacher_dir,
        {
            "name": "kd",
            "on_policy": {
                "fraction": 0.8,
                "adaptive": True,
                "replay_capacity": 12,
                "max_new_tokens": 8,
                "top_k": 20,
                "temperature": 0.9,
            },
        },
        training={"max_steps": 10, "checkpoint_every": 4, "eval_every": 4},
    )
    full = Recorder()
    train(parse_spec(d), tmp_path / "full", callbacks=full)
    kinds = {(full.metrics[s]["on_policy"], full.metrics[s]["replayed"]) for s in range(1, 11)}
    assert kinds == {(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)}, kinds  # data, fresh, replay
    part = Recorder(stop_at=4)
    assert train(parse_spec(d), tmp_path / "part", callbacks=part).step == 4
    state = torch.load(tmp_path / "part" / "step_000004" / STATE_FILE, weights_only=True)
    buf = state["onpolicy"]["buffer"]
    assert buf.shape[1] == 32 and 0 < buf.shape[0] <= 12
    rest = Recorder()
    assert train(parse_spec(d), tmp_path / "part", callbacks=rest).step == 10
    assert min(rest.metrics) == 5
    for step in range(1, 11):
        got = (part.metrics if step <= 4 else rest.metrics)[step]
        for k in ("loss", "kd", "on_policy", "replayed", "generation_prob"):
            assert got[k] == full.metrics[step][k], (step, k)
    assert rest.metrics[8]["eval_loss"] == full.metrics[8]["eval_loss"]


# ----------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_processes_match_one(corpus, teacher_dir, tmp_path):
    """Two gloo ranks, each generating its own half of every batch and all-gathering the
    replay buffer, follow the single-process trajectory (same tolerance as the off-policy
    distributed test: only fp32 summation order differs)."""
    from tests.test_distributed import assert_same_trajectory, cli_train, read_jsonl

    method = {
        "name": "jsd",
        "on_policy": {"fraction": 0.8, "adaptive": True, "replay_capacity": 8, "max_new_tokens": 8},
    }
    d = distil(corpus, teacher_dir, method)
    d["student"]["config"] = {**GPT2_TINY, **NO_DROPOUT}
    ref = Recorder()
    train(parse_spec(d), tmp_path / "one", callbacks=ref)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({**d, "resources": {"gpus": 2}}))
    r = cli_train(spec_path, tmp_path / "two", tmp_path / "two.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    got = read_jsonl(tmp_path / "two.jsonl")
    assert_same_trajectory(ref.metrics, got, range(1, 7))
    for step in range(1, 7):
        for k in ("on_policy", "replayed", "generation_prob"):
            assert got[step][k] == ref.metrics[step][k], (step, k)
    assert any(ref.metrics[s]["on_policy"] for s in range(1, 7))


# ----------------------------------------------------------------------------- bad input


BAD = [
    ({"fraction": 1.5, "max_new_tokens": 8}, "spec.method.on_policy.fraction"),
    ({"fraction": -0.1, "max_new_tokens": 8}, "spec.method.on_policy.fraction"),
    ({"max_new_tokens": 32}, "spec.method.on_policy.max_new_tokens"),
    ({"max_new_tokens": 0}, "spec.method.on_policy.max_new_tokens"),
    ({"max_new_tokens": 8, "prompt_tokens": 25}, "spec.method.on_policy.prompt_tokens"),
    ({"temperature": 0, "max_new_tokens": 8}, "spec.method.on_policy.temperature"),
    ({"top_p": 0, "max_new_tokens": 8}, "spec.method.on_policy.top_p"),
    ({"top_k": -1, "max_new_tokens": 8}, "spec.method.on_policy.top_k"),
    (
        {"adaptive": True, "replay_capacity": 3, "max_new_tokens": 8},
        "spec.method.on_policy.replay_capacity",
    ),
    ({"lmbda": 0.5, "max_new_tokens": 8}, "spec.method.on_policy.lmbda"),
]


@pytest.mark.parametrize(
    ("block", "param"), BAD, ids=[p.rsplit(".", 1)[1] + str(b) for b, p in BAD]
)
def test_bad_settings_name_the_field(corpus, block, param):
    d = {
        **spec_dict(corpus),
        "teacher": {"model": "x"},
        "method": {"name": "kd", "on_policy": block},
    }
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    assert e.value.param == param, e.value


def test_on_policy_refused_where_nothing_can_be_generated(corpus):
    base = {**spec_dict(corpus), "teacher": {"model": "x"}}
    with pytest.raises(SpecError, match="causal_lm") as e:
        parse_spec(
            {
                **base,
                "task": "sequence_classification",
                "tokenizer": {},
                "method": {"name": "kd", "on_policy": {"max_new_tokens": 4}},
            }
        )
    assert e.value.param == "spec.method.on_policy"
    with pytest.raises(SpecError, match="sft") as e:
        parse_spec({**base, "method": {"name": "sft", "on_policy": {"max_new_tokens": 4}}})
    assert e.value.param == "spec.method.on_policy"
    with pytest.raises(SpecError, match="cached teacher logits") as e:
        parse_spec(
            {
                **base,
                "method": {
                    "name": "kd",
                    "on_policy": {"fraction": 0.5, "max_new_tokens": 4},
                    "teacher_cache": {"mode": "use"},
                },
            }
        )
    assert e.value.param == "spec.method.on_policy"
    learned = {"name": "sharp", "basis": "learned", "rank": 8}
    with pytest.raises(SpecError, match="learned") as e:
        parse_spec(
            {**base, "method": {**learned, "on_policy": {"max_new_tokens": 4, "prompt_tokens": 4}}}
        )
    assert e.value.param == "spec.method.on_policy.prompt_tokens"
    ok = parse_spec({**base, "method": {**learned, "on_policy": {"max_new_tokens": 4}}})
    assert ok.method.on_policy is not None and ok.method.on_policy.fraction == 0.0


# ----------------------------------------------------------------------------- the evidence


def test_quality_driver_pairs_settings_by_seed(tmp_path, capsys):
    """`python -m bench.quality.onpolicy` on the hidden micro preset: the off-policy setting
    trains the teacher, λ = 1 and adaptive distil from it with the block in their specs, and
    the JSON holds per-seed Δ% against λ = 0 computed from the cells' perplexities."""
    from bench.quality import onpolicy as bench_onpolicy

    threads = torch.get_num_threads()  # --threads 1 sets the process's; restored below
    out, js = tmp_path / "runs", tmp_path / "onpolicy.json"
    argv = ["--preset", "micro", "--out", str(out), "--seeds", "1", "--steps", "3"]
    argv += ["--lambdas", "1", "--adaptive", "0.5", "--max-new-tokens", "8", "--threads", "1"]
    argv += ["--device", "cpu", "--json", str(js)]
    try:
        assert bench_onpolicy.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(js.read_text())
    assert list(data["settings"]) == ["lam0", "lam1", "adaptive0.5"]
    assert data["settings"]["lam0"]["on_policy"] is None
    assert data["settings"]["lam1"]["on_policy"] == {"fraction": 1.0, "max_new_tokens": 8}
    assert data["settings"]["adaptive0.5"]["on_policy"]["adaptive"] is True
    trained = json.loads((out / "lam0" / "teacher" / "result.json").read_text())["path"]
    for name in ("lam1", "adaptive0.5"):
        teacher = json.loads((out / name / "teacher" / "result.json").read_text())
        assert teacher["source"] == str((out / "lam0" / trained).resolve())
    cells = {s: data["settings"][s]["cells"] for s in data["settings"]}
    for method in ("kd", "jsd"):
        ref, got = cells["lam0"][method]["0"]["ppl"], cells["lam1"][method]["0"]["ppl"]
        d = data["stats"][f"{method}/lam1"]["delta_pct"]
        assert d["per_seed"] == [pytest.approx(100 * (got / ref - 1))]
        assert "delta_pct" not in data["stats"][f"{method}/lam0"]
    spec = json.loads((out / "lam1" / "cells" / "kd" / "seed0" / "spec.json").read_text())
    assert spec["method"]["on_policy"] == {"fraction": 1.0, "max_new_tokens": 8}
    metrics = [
        json.loads(x) for x in (out / "lam1/cells/kd/seed0/metrics.jsonl").read_text().splitlines()
    ]
    assert all(m["on_policy"] == 1.0 for m in metrics if "loss" in m)
    capsys.readouterr()
    assert bench_onpolicy.main(["--from-json", str(js)]) == 0
    table = capsys.readouterr().out
    assert "| kd | lam1 | 1 |" in table and "(reference)" in table


# ----------------------------------------------------------------------------- the service


@pytest.mark.service
@pytest.mark.slow
def test_an_on_policy_job_through_the_service(
    settings, db, make_team, corpus, teacher_dir, tmp_path
):
    """POST /v1/jobs with an on_policy block, run by the real supervisor and training child:
    the job succeeds, its stored per-step losses are the library run's, and the on-policy
    fields (which batch, p) are stored as metrics like any other."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from api.app import create_app
    from service.live import LivePublisher
    from service.models import Metric, utcnow
    from service.repositories import JobRepository
    from tests.test_service_worker import Sent
    from worker.supervisor import Supervisor

    method = {"name": "kd", "on_policy": {"fraction": 0.5, "adaptive": True, "max_new_tokens": 8}}
    spec = distil(corpus, teacher_dir, method, training={"max_steps": 6, "checkpoint_every": 3})
    ref = Recorder()
    train(parse_spec(spec), tmp_path / "lib", callbacks=ref)
    team = make_team("onpolicy")
    live = LivePublisher(settings)
    try:
        with TestClient(create_app(settings)) as client:
            r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            with db.session() as s:  # as a scheduling pass would, were a worker registered
                JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
            assert Supervisor(settings, db, live, Sent()).run(job_id) == "succeeded"
    finally:
        live.close()
    with db.session() as s:
        rows = s.execute(select(Metric).where(Metric.job_id == job_id)).scalars().all()
    by = {(m.step, m.name): m.value for m in rows}
    for step in range(1, 7):
        for k in ("loss", "on_policy", "replayed", "generation_prob"):
            # the child may run another number of torch threads (summation order): 1e-5
            assert by[(step, k)] == pytest.approx(ref.metrics[step][k], rel=1e-5, abs=1e-9), (
                step,
                k,
            )
    assert any(by[(s, "on_policy")] == 1.0 for s in range(1, 7))
