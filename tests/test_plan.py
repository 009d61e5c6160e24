"""Job plans (docs/planning.md): memory by component and the strategy that fits, throughput
from the step-cost table or FLOPs, preflight findings, and admission through the service
(a job that cannot fit is a 422 naming the field; one that fits only sharded runs sharded).
"""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service import scheduler
from service.models import Job, StepCost
from sharp_core.errors import SpecError
from sharp_core.models.compat import (
    check_dtype,
    check_positions,
    compare_chat_templates,
    compare_tokenizers,
)
from sharp_core.spec import parse_spec
from sharp_core.train.memory import COMFORT, FIT, GB
from sharp_core.train.plan import (
    PoolInfo,
    make_plan,
    sizes_of_config,
    step_flops_per_token,
    throughput,
)
from sharp_core.train.plan import (
    StepCost as Cost,
)


def llama(h: int, layers: int, inter: int, heads: int, kv: int, vocab: int = 128256) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
    }


L8B = llama(4096, 32, 14336, 32, 8)
L3B = llama(3072, 28, 8192, 24, 8)


def big_spec(**training) -> dict:
    return {
        "teacher": {"init": "config", "config": L8B},
        "student": {"init": "config", "config": L3B},
        "dataset": {"files": ["x.txt"]},
        "method": {"name": "kd"},
        "training": {"batch_size": 8, "seq_len": 4096, "max_steps": 1000, **training},
        "resources": {"gpus": 8, "queue": "h100"},
    }


H100 = PoolInfo("h100", "h100")


# ------------------------------------------------------------------------------ the library
def test_8b_to_3b_on_h100_shards_the_student_and_says_why() -> None:
    spec = parse_spec(big_spec())
    p = make_plan(spec, student_config=L3B, teacher_config=L8B, pool=H100)
    assert p.fits is True
    assert p.strategy["student_parallel"] == "fsdp"
    assert p.spec is not None and p.spec.resources.student_parallel == "fsdp"
    [lever] = p.levers
    assert lever["field"] == "resources.student_parallel" and lever["value"] == "fsdp"
    assert "more than 75% of 80 GB" in lever["reason"]
    comps = p.memory["components"]
    assert set(comps) >= {"student_weights", "student_grads", "optimizer", "activations"}
    assert set(comps) >= {"logits", "teacher", "reserve"}
    assert sum(comps.values()) == p.memory["per_gpu_bytes"] <= FIT * 80e9
    # the 3B student's fp32 AdamW moments, sharded over 8: 8 bytes × params / 8
    s = sizes_of_config(L3B)
    assert s is not None and comps["optimizer"] == 8 * s.params // 8
    # FLOP fallback: 8 GPUs × 989 TFLOP/s × MFU 0.2 (0.1–0.35) over the FLOPs per token
    tp = p.throughput
    assert tp["tokens_per_s"] == pytest.approx(8 * 989e12 * 0.2 / tp["flops_per_token"])
    assert tp["high"] == pytest.approx(8 * 989e12 * 0.35 / tp["flops_per_token"])
    assert tp["low"] < tp["tokens_per_s"] < tp["high"]
    cost = p.cost
    assert cost["tokens"] == 1000 * 8 * 4096
    assert cost["gpu_hours"] == pytest.approx(cost["tokens"] / tp["tokens_per_s"] / 3600 * 8)


def test_a_job_that_cannot_fit_names_the_batch_with_numbers() -> None:
    spec = parse_spec(big_spec(batch_size=256))
    with pytest.raises(SpecError) as e:
        make_plan(spec, student_config=L3B, teacher_config=L8B, pool=H100)
    assert e.value.param == "spec.training.batch_size"
    msg = str(e.value)
    assert "GB per GPU, the h100 pool has 80 (92% usable: 74); batch " in msg
    # the batch it proposes does fit, the one above it does not
    b = int(msg.split("; batch ")[1].split()[0])
    assert b % 8 == 0 and b < 256
    ok = make_plan(
        parse_spec(big_spec(batch_size=b)), student_config=L3B, teacher_config=L8B, pool=H100
    )
    assert ok.fits is True
    with pytest.raises(SpecError):
        make_plan(
            parse_spec(big_spec(batch_size=b + 8)),
            student_config=L3B,
            teacher_config=L8B,
            pool=H100,
        )


def test_checkpointing_is_pulled_when_sharding_is_not_enough() -> None:
    # one GPU: no sharding; the activations of 1 × 4096 tokens through 28 layers do not fit
    d = big_spec(batch_size=1)
    d["resources"] = {"gpus": 1, "queue": "h200"}
    d["teacher"]["config"] = llama(512, 2, 1024, 8, 2)
    d["student"]["config"] = llama(1024, 16, 2816, 16, 4, vocab=32000)
    spec = parse_spec(d)
    # 9.0 GB without checkpointing, 6.4 GB with it; 92 % of 8 GB is 7.36
    pool = PoolInfo("h200", "h200", gpu_memory_bytes=int(8e9))
    p = make_plan(
        spec,
        student_config=d["student"]["config"],
        teacher_config=d["teacher"]["config"],
        pool=pool,
    )
    assert [lv["field"] for lv in p.levers] == ["training.activation_checkpointing"]
    assert p.strategy["activation_checkpointing"] is True and p.fits is True


def test_unknown_configs_are_listed_not_guessed() -> None:
    d = big_spec()
    d["teacher"] = {"model": "org/some-teacher"}
    spec = parse_spec(d)
    p = make_plan(spec, student_config=L3B, teacher_config=None, pool=H100)
    assert p.unknown == ["teacher"]
    assert p.memory["partial"] is True and p.fits is None
    assert "teacher" not in p.memory["components"]
    q = make_plan(spec, student_config=None, teacher_config=None, pool=PoolInfo("x"))
    assert {"teacher", "student_weights", "optimizer", "activations", "pool_memory"} <= set(
        q.unknown
    )
    assert q.memory["per_gpu_bytes"] is None and q.throughput["tokens_per_s"] is None


def test_throughput_from_the_step_cost_table_scales_by_flops() -> None:
    spec = parse_spec(big_spec())
    s, t = sizes_of_config(L3B), sizes_of_config(L8B, "bfloat16")
    assert s is not None and t is not None
    f = step_flops_per_token(spec, s, t)
    # one finished kd job on h100 that reached 40 % MFU over 8 GPUs, at half this job's FLOPs
    rate = 0.4 * 989e12
    row = Cost(
        "h100", "kd", s.params, 4096, 8, tokens_per_s=8 * rate / (f / 2), flops_per_token=f / 2
    )
    other = Cost("a100", "kd", s.params, 4096, 8, tokens_per_s=1.0, flops_per_token=f)
    tp = throughput(spec, f, H100, [row, other], student_params=s.params)
    assert tp["source"] == "measured"
    assert tp["tokens_per_s"] == pytest.approx(8 * rate / f)  # same FLOP/s, twice the FLOPs
    assert tp["low"] == pytest.approx(0.75 * tp["tokens_per_s"])  # one row: ±25 %
    # no row for the card and no known peak: unknown, not guessed
    none = throughput(spec, f, PoolInfo("cpu", "cpu"), [other], student_params=s.params)
    assert none["tokens_per_s"] is None and none["source"].startswith("unknown")


def test_flops_count_the_head_and_the_teacher_forward() -> None:
    spec = parse_spec(big_spec(seq_len=8))
    s, t = sizes_of_config(L3B), sizes_of_config(L8B)
    assert s is not None and t is not None
    body = lambda m: m.layers * m.block_params + m.vocab * m.hidden  # noqa: E731
    attn = lambda m: m.layers * 8 * m.heads * m.head_dim  # noqa: E731
    assert step_flops_per_token(spec, s, t) == 6 * (body(s) + attn(s)) + 2 * (body(t) + attn(t))
    sft = parse_spec({**big_spec(seq_len=8), "method": {"name": "sft"}})
    assert step_flops_per_token(sft, s, t) == 6 * (body(s) + attn(s))


# ------------------------------------------------------------------------------- preflight
def _bpe(texts: list[str], vocab: int):
    from sharp_core.models.loading import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab)


TEXT = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen jugs"]


def test_tokenizer_findings() -> None:
    a, b = _bpe(TEXT, 300), _bpe(TEXT, 300)
    [f] = compare_tokenizers(a, b, teacher_rows=len(a), student_rows=len(a), cross_tokenizer=None)
    assert f.code == "tokenizers_identical"
    [f] = compare_tokenizers(
        a, b, teacher_rows=len(a), student_rows=len(a) + 128, cross_tokenizer=None
    )
    assert f.code == "vocab_padded" and f.severity == "info"
    small = compare_tokenizers(
        a, b, teacher_rows=len(a) - 1, student_rows=None, cross_tokenizer=None
    )
    assert [x.code for x in small] == ["tokenizers_identical", "embeddings_too_small"]
    c = _bpe(TEXT, 280)
    [f] = compare_tokenizers(a, c, teacher_rows=None, student_rows=None, cross_tokenizer=None)
    assert f.code == "tokenizers_overlap" and f.severity == "error"
    assert f.param == "spec.method.cross_tokenizer"
    [f] = compare_tokenizers(a, c, teacher_rows=None, student_rows=None, cross_tokenizer="gold")
    assert f.code == "tokenizers_overlap" and f.severity == "info"
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"α": 0, "β": 1}, unk_token="α"))
    )
    [f] = compare_tokenizers(a, other, teacher_rows=None, student_rows=None, cross_tokenizer=None)
    assert f.code == "tokenizers_disjoint"


def test_chat_template_findings() -> None:
    a, b = _bpe(TEXT, 300), _bpe(TEXT, 300)
    assert compare_chat_templates(a, b) == []
    tpl = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    a.chat_template = b.chat_template = tpl
    [f] = compare_chat_templates(a, b)
    assert f.code == "chat_template_same"
    b.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    [f] = compare_chat_templates(a, b)
    assert f.code == "chat_template_differs" and f.severity == "warning"


def test_positions_and_bf16_findings() -> None:
    [f] = check_positions(128, "student", {"model_type": "gpt2", "n_positions": 64})
    assert f.severity == "error" and f.param == "spec.training.seq_len"
    [f] = check_positions(16384, "teacher", L8B)
    assert f.severity == "warning"
    assert check_positions(64, "student", {"model_type": "gpt2", "n_positions": 64}) == []
    [f] = check_dtype("bf16", "v100", False)
    assert f.code == "bf16_unsupported" and f.param == "spec.training.precision"
    assert check_dtype("fp16", "v100", False) == [] and check_dtype("bf16", "h100", True) == []


# -------------------------------------------------------------------------------- service


@pytest.mark.service
def test_plan_endpoint_and_admission(settings, db, make_team, corpus) -> None:
    """The plan answers as POST /v1/jobs does for a bad spec; a job that cannot fit its
    declared pool is a 422 from both, naming the field with the numbers; a plan for a pool
    nobody declared says so."""
    from api.app import create_app

    team = make_team("planner")

    def big_spec(**training) -> dict:
        return {**globals()["big_spec"](**training), "dataset": {"files": [str(corpus)]}}

    with db.session() as s:
        scheduler.register_worker(
            s, name="w-h100", pool="h100", gpus=8, hostname="h", gpu_type="h100"
        )
    with TestClient(create_app(settings)) as client:
        bad = {"spec": {**big_spec(), "training": {"lr": 5}}}
        for path in ("/v1/jobs/plan", "/v1/jobs"):
            r = client.post(path, json=bad, headers=team.headers)
            assert r.status_code == 422 and r.json()["error"]["param"] == "spec.training.lr"
        huge = {"spec": big_spec(batch_size=256)}
        for path in ("/v1/jobs/plan", "/v1/jobs"):
            r = client.post(path, json=huge, headers=team.headers)
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["param"] == "spec.training.batch_size"
            assert "the h100 pool has 80 (92% usable: 74); batch" in err["message"]
        r = client.post("/v1/jobs/plan", json={"spec": big_spec()}, headers=team.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["plan"]["fits"] is True
        assert body["spec"]["resources"]["student_parallel"] == "fsdp"
        assert body["plan"]["pool"]["gpu_type"] == "h100"
        other = {**big_spec(), "resources": {"gpus": 8, "queue": "nowhere"}}
        r = client.post("/v1/jobs/plan", json={"spec": other}, headers=team.headers)
        assert r.status_code == 200 and "pool_memory" in r.json()["plan"]["unknown"]
        with db.session() as s:
            assert s.scalars(select(Job)).all() == []  # nothing was queued


LLAMA_TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.mark.service
@pytest.mark.slow
def test_a_job_that_fits_only_sharded_runs_sharded(settings, db, make_team, corpus, tmp_path):
    """A 'cpu' pool declaring less memory than a DDP replica needs but more than the FSDP
    shard: POST /v1/jobs answers with the lever in its plan, the job runs on 2 gloo ranks
    with the student sharded, GET shows planned and measured side by side, and the finished
    job's speed lands in the step-cost table."""
    import threading

    from api.app import create_app
    from service.live import LivePublisher
    from service.models import utcnow
    from service.repositories import JobRepository
    from sharp_core.train.plan import check_fits
    from tests.helpers import spec_dict, train_tiny_teacher
    from tests.test_service_worker import Sent
    from worker.child import log_path
    from worker.supervisor import Supervisor

    teacher = train_tiny_teacher(corpus, tmp_path / "teacher")
    spec = spec_dict(
        corpus,
        teacher={"model": str(teacher)},
        student={"init": "config", "config": dict(LLAMA_TINY)},
        method={"name": "kd"},
        training={"max_steps": 6, "eval_every": 0, "checkpoint_every": 0, "batch_size": 4},
        resources={"gpus": 2, "queue": "cpu-small"},
    )
    spec.pop("tokenizer")
    # the memory that separates the two: DDP above COMFORT, FSDP within FIT
    import json as _json

    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(teacher)))
    t_cfg = _json.loads((teacher / "config.json").read_text())
    s = sizes_of_config({**LLAMA_TINY, "vocab_size": vocab})
    t = sizes_of_config(t_cfg)
    assert s is not None and t is not None
    parsed = parse_spec(spec)
    from sharp_core.train.plan import strategy_estimate  # the per-strategy estimate

    ddp = strategy_estimate(parsed, s, t, "ddp", "replicate", False).total
    fsdp = strategy_estimate(parsed, s, t, "fsdp", "replicate", False).total
    assert fsdp / FIT < ddp / COMFORT
    mem = int((fsdp / FIT + ddp / COMFORT) / 2)
    _, _, e, levers, fits = check_fits(parsed, s, t, PoolInfo("cpu-small", "cpu", mem))
    assert fits and [lv["field"] for lv in levers] == ["resources.student_parallel"]

    team = make_team("sharded")
    with db.session() as s_:
        scheduler.register_worker(
            s_,
            name="w-cpu",
            pool="cpu-small",
            gpus=2,
            hostname="h",
            gpu_type="cpu",
            gpu_memory_bytes=mem,
        )
    live = LivePublisher(settings)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["spec"]["resources"]["student_parallel"] == "fsdp"
        assert job["plan"]["levers"][0]["field"] == "resources.student_parallel"
        assert job["plan"]["strategy"]["student_parallel"] == "fsdp"
        job_id = job["id"]
        with db.session() as s_:
            JobRepository(s_).update_fenced(job_id, values={"admitted_at": utcnow()})
        sup = Supervisor(settings, db, live, Sent())
        out: list[str] = []
        th = threading.Thread(target=lambda: out.append(sup.run(job_id)))
        th.start()
        th.join(300)
        assert out == ["succeeded"]
        log = log_path(settings, team.team_id, job_id, 1).read_text()
        assert "student: fsdp" in log
        got = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        usage = got["usage"]
        assert usage["peak_memory_gb"]["planned"] == pytest.approx(e.total / GB)
        assert usage["peak_memory_gb"]["measured"] > 0
        assert usage["tokens_per_s"]["measured"] > 0
    live.close()
    with db.session() as s_:
        [row] = s_.scalars(select(StepCost).where(StepCost.job_id == job_id)).all()
    assert row.gpu_type == "cpu" and row.method == "kd" and row.world_size == 2
    assert row.tokens_per_s > 0 and row.student_params == s.params


# ------------------------------------------------------------------ against measurement
@pytest.mark.parametrize("ac", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_planned_memory_within_25_percent_of_a_measured_step(ac: bool) -> None:
    """`bench/plan.py` at a small shape: the plan's per-process bytes against one kd step's
    measured tensor peak (resident + the profiler's high-water mark), CPU, fp32."""
    from bench.plan import Shape, _llama, measure

    sh = Shape("t", _llama(128, 2, 1024, 4, 2), _llama(128, 1, 1024, 4, 2), batch=2, seq=512, ac=ac)
    r = measure(sh)
    assert 0.75 <= r["estimate"] / r["measured"] <= 1.25, r


def test_a_measured_shape_frees_its_models_without_a_garbage_collection(monkeypatch) -> None:
    """`bench/plan.py` measures its shapes one after another in one process; on CUDA the
    peak is the process's allocated bytes, so a shape whose models outlive it is counted in
    the next one. A step runner defined inside the function (a class, hence a reference
    cycle) kept the teacher, the student and AdamW's state alive until a collection: the
    H200's B2 × N2048 row read 56 597 MiB above B1 × N4096, the 8B → 3B shape's bf16
    teacher + fp32 student + AdamW state (56 593 MiB). With automatic collection off, both
    models must be gone when `_measure_rank` returns."""
    import gc
    import weakref

    import bench.plan as bp
    from sharp_core.models import loading

    built: list[weakref.ref] = []
    load = loading.load_model

    def spy(*a, **k):
        m = load(*a, **k)
        built.append(weakref.ref(m))
        return m

    monkeypatch.setattr(loading, "load_model", spy)
    sh = bp.Shape("t", bp._llama(64, 1, 512, 4, 2), bp._llama(64, 1, 512, 4, 2), 1, 64, ac=True)
    was = gc.isenabled()
    gc.disable()
    try:
        bp._measure_rank(sh, 0)
        alive = [type(w()).__name__ for w in built if w() is not None]
    finally:
        if was:
            gc.enable()
    assert len(built) == 2 and alive == [], alive


def test_the_job_start_refuses_seq_len_past_a_learned_position_table(corpus, tmp_path) -> None:
    """A hub model's config is read only at job start: the same finding refuses it there,
    with the finding's code, and the trainer reports the findings as a 'preflight' event."""
    from sharp_core.train.loop import train
    from tests.helpers import GPT2_TINY, Recorder, spec_dict

    d = spec_dict(corpus, training={"seq_len": 128, "max_steps": 1})
    assert GPT2_TINY["n_positions"] == 64
    rec = Recorder()
    with pytest.raises(SpecError) as e:
        train(parse_spec(d), tmp_path / "run", callbacks=rec)
    assert e.value.param == "spec.training.seq_len" and "64 positions" in str(e.value)
    assert e.value.code == "seq_len_exceeds_positions"
    assert not (tmp_path / "run").exists()
    [(kind, data)] = [ev for ev in rec.events if ev[0] == "preflight"]
    assert data["fatal"] == "seq_len_exceeds_positions"
    assert [f["code"] for f in data["findings"]] == ["seq_len_exceeds_positions"]


def test_preflight_at_start_on_loaded_models(tmp_path) -> None:
    """`preflight_models` with what only the worker knows: the embeddings' rows beside the
    tokenizers (padded: info), a rotary model past its positions (warning), a CUDA card
    without bf16 (fatal, naming training.precision), and nothing to say off CUDA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sharp_core.errors import PreflightError
    from sharp_core.models.loading import train_bpe_tokenizer
    from sharp_core.train.setup import OwnTokenizers, preflight_models

    tok = train_bpe_tokenizer(["some text to learn a few merges from " * 20], 270)

    def llama(rows: int):
        cfg = AutoConfig.for_model(**{**LLAMA_TINY, "vocab_size": rows})
        return AutoModelForCausalLM.from_config(cfg)

    spec = parse_spec(
        {
            "teacher": {"model": "org/teacher"},
            "student": {"model": "org/student"},
            "dataset": {"files": ["x.txt"]},
            "method": {"name": "kd"},
            "training": {"seq_len": 128},
        }
    )
    own = OwnTokenizers(tok, tok, ("org/teacher", "org/student"))
    teacher, student = llama(len(tok) + 30), llama(len(tok))
    got = preflight_models(spec, student, teacher, own, device_name=None, bf16=None)
    assert [(f["code"], f["severity"]) for f in got] == [
        ("vocab_padded", "info"),
        ("seq_len_exceeds_positions", "warning"),
        ("seq_len_exceeds_positions", "warning"),
    ]
    assert f"embeddings padded to {len(tok) + 30} (teacher)" in got[0]["message"]
    with pytest.raises(PreflightError) as e:
        preflight_models(spec, student, teacher, own, device_name="Tesla V100", bf16=False)
    assert (e.value.code, e.value.param) == ("bf16_unsupported", "spec.training.precision")
    assert "this worker's Tesla V100 has no bfloat16" in e.value.message
    assert [f["code"] for f in e.value.findings][-1] == "bf16_unsupported"
    fp32 = spec.model_copy(
        update={"training": spec.training.model_copy(update={"precision": "fp32"})}
    )
    assert preflight_models(fp32, student, teacher, None, device_name="V100", bf16=False) == [
        f for f in got if f["code"] == "seq_len_exceeds_positions"
    ]


def hub_model(hf_home, repo_id: str, model, tok) -> None:
    """`repo_id` in the Hugging Face cache layout under ``hf_home`` (what a download leaves:
    a snapshot folder named by its commit, refs/main pointing at it), so that with
    ``HF_HOME=hf_home HF_HUB_OFFLINE=1`` only a process started with that environment
    resolves it, as a worker with a warm cache does, while the API cannot read it."""
    import hashlib

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.service
@pytest.mark.slow
def test_a_hub_model_is_checked_when_the_worker_starts_the_job(
    settings, db, make_team, corpus, tmp_path, monkeypatch
):
    """Hub teacher and student, resolvable only in the training process (a hub cache under
    its HF_HOME, offline): the submission cannot compare them (tokenizers_unchecked) and
    admits the job; at job start the tokenizers, chat templates and positions are checked,
    the teacher's learned table of 32 positions is fatal at seq_len 64, the job fails with
    that finding's code and field, and every finding is in its events and on its plan."""
    import threading

    from transformers import GPT2Config, GPT2LMHeadModel

    from api.app import create_app
    from service.live import LivePublisher
    from service.models import JobEvent, utcnow
    from service.repositories import JobRepository
    from sharp_core.models.loading import train_bpe_tokenizer
    from tests.helpers import spec_dict
    from tests.test_service_worker import Sent
    from worker.supervisor import Supervisor

    tok = train_bpe_tokenizer([corpus.read_text(encoding="utf-8")], 300)
    hf_home = tmp_path / "hf"
    for repo_id, positions, template in (
        (
            "sharp-test/teacher",
            32,
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        ),
        ("sharp-test/student", 128, "{% for m in messages %}{{ m.content }}\n{% endfor %}"),
    ):
        tok.chat_template = template
        cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=positions, vocab_size=len(tok))
        hub_model(hf_home, repo_id, GPT2LMHeadModel(cfg), tok)
    spec = spec_dict(
        corpus,
        teacher={"model": "sharp-test/teacher"},
        student={"model": "sharp-test/student", "init": "pretrained", "config": None},
        method={"name": "kd"},
        training={"max_steps": 2, "seq_len": 64, "eval_every": 0, "checkpoint_every": 0},
    )
    spec.pop("tokenizer")
    team = make_team("hub-preflight")
    live = LivePublisher(settings)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 201, r.text
        job = r.json()
        assert "tokenizers_unchecked" in [f["code"] for f in job["plan"]["findings"]]
        job_id = job["id"]
        with db.session() as s:
            JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
        # the training process inherits this environment; this process's hub client does not
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
        out: list[str] = []
        sup = Supervisor(settings, db, live, Sent())
        th = threading.Thread(target=lambda: out.append(sup.run(job_id)))
        th.start()
        th.join(300)
        assert out == ["failed"]
        got = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    live.close()
    err = got["error"]
    assert (err["code"], err["param"]) == ("seq_len_exceeds_positions", "spec.training.seq_len")
    assert "exceeds the teacher's 32 positions" in err["message"]
    at_start = got["plan"]["preflight_at_start"]
    assert at_start["fatal"] == "seq_len_exceeds_positions" and at_start["attempt"] == 1
    assert [f["code"] for f in at_start["findings"]] == [
        "tokenizers_identical",
        "chat_template_differs",
        "seq_len_exceeds_positions",
    ]
    assert "tokenizers_unchecked" in [f["code"] for f in got["plan"]["findings"]]
    with db.session() as s:
        events = s.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "preflight")
        ).all()
    assert [e.data["findings"] for e in events] == [at_start["findings"]]


# ------------------------------------------------------------------- across tokenizers
S1B_32K = llama(2048, 16, 8192, 32, 8, vocab=32000)


def cross_spec(mode: str = "uld", teacher: dict = L8B, **training) -> dict:
    return {
        "teacher": {"init": "config", "config": teacher},
        "student": {"init": "config", "config": S1B_32K},
        "tokenizer": {"name": "student-tok"},
        "dataset": {"files": ["x.txt"]},
        "method": {"name": "kd", "cross_tokenizer": mode},
        "training": {"batch_size": 4, "seq_len": 4096, "max_steps": 10, **training},
        "resources": {"gpus": 1, "queue": "h100"},
    }


def test_a_128k_cross_tokenizer_job_is_planned_without_whole_logits() -> None:
    """8B teacher (V_T 128256, h 4096) → 1B student (V_S 32000, h 2048), ULD, B4 × N4096 on an
    80 GB H100, bf16 (2-byte activations), tokenizers not readable (ratio 1.0: T = 4096,
    every position aligned, listed as unknown). The fused step (`fused_cross_objective`)
    holds no logits of either model. By hand, R = B·(N−1) = 16380 target rows:
      cross_hidden = R·h_S·2·2 + B·T·h_T·2 = 16380·2048·4 + 4·4096·4096·2
                   = 134_184_960 + 134_217_728 = 268_402_688
      head_grad    = V_S·h_S·4 = 32000·2048·4 = 262_144_000
      cross_chunk: chunk = 2^28 // (4·128256) = 523 rows; per row the student's logits and
                   their CE gradient 2·32000 and ULD's work 3·32000 + 2·128256 + 4·128256
                   = 865_536 float32 elements: 523·(64000 + 865_536)·4 = 1_944_589_312, + the
                   chunk's bf16 logits before `.float()`, 523·(32000 + 128256)·2
                   = 167_627_776 → 2_112_217_088
    2.64 GB where the dense path held 9.46 GB (student_logits 2_231_113_728, teacher_logits
    4_202_692_608, cross_divergence 3_026_905_088): the job needs 69.9 GB (76.6 GB before),
    under 92 % of 80 GB without activation checkpointing, so no lever is needed."""
    p = make_plan(parse_spec(cross_spec()), student_config=S1B_32K, teacher_config=L8B, pool=H100)
    c = p.memory["components"]
    for whole in ("logits", "student_logits", "teacher_logits", "cross_divergence"):
        assert whole not in c
    assert c["cross_hidden"] == 268_402_688
    assert c["head_grad"] == 262_144_000
    assert c["cross_chunk"] == 2_112_217_088
    assert p.memory["per_gpu_bytes"] == sum(c.values())
    assert "teacher_tokens" in p.unknown
    ct = p.strategy["cross_tokenizer"]
    assert ct["teacher_token_ratio"] == 1.0 and ct["teacher_tokens_per_row"] == 4096
    assert ct["divergence_chunk_rows"] == 523 and ct["aligned_fraction"] == 1.0
    assert ct["source"].startswith("assumed")
    assert p.fits is True
    assert p.strategy["activation_checkpointing"] is False and p.levers == []


def test_cross_tokenizer_components_scale_as_the_formula_says() -> None:
    from sharp_core.train.memory import CrossTokens, cross_chunk_elements

    def comps(teacher: dict = L8B, cross: CrossTokens | None = None, **kw) -> dict:
        spec = parse_spec(cross_spec(teacher=teacher, **kw))
        pool = PoolInfo("big", "h200", int(1e15))  # nothing is refused: the components only
        p = make_plan(spec, student_config=S1B_32K, teacher_config=teacher, pool=pool, cross=cross)
        return p.memory["components"]

    base = comps()
    # the teacher's vocabulary doubled: only the chunk's work grows (no teacher logits);
    # its rows halve (the chunk is a 256 MiB float32 row of the larger vocabulary)
    wide = comps(teacher={**L8B, "vocab_size": 2 * 128256})
    assert wide["cross_hidden"] == base["cross_hidden"]
    assert wide["head_grad"] == base["head_grad"]
    rows = 2**28 // (4 * 2 * 128256)
    assert wide["cross_chunk"] == rows * (2 * 32000 + cross_chunk_elements(
        "uld", 32000, 2 * 128256)) * 4 + rows * (32000 + 2 * 128256) * 2  # fmt: skip
    # half the teacher tokens per student token: half its hidden states (and activations)
    half = comps(cross=CrossTokens(ratio=0.5, shared=0, source="test"))
    assert base["cross_hidden"] - half["cross_hidden"] == 4 * 2048 * 4096 * 2
    assert half["teacher"] < base["teacher"]
    assert half["cross_chunk"] == base["cross_chunk"]
    # twice the rows: the hidden states double; the chunk's work (523 rows) and the head's
    # gradient do not
    twice = comps(batch_size=8)
    assert twice["cross_hidden"] == 2 * base["cross_hidden"]
    assert twice["cross_chunk"] == base["cross_chunk"]
    assert twice["head_grad"] == base["head_grad"]
    # half the positions aligned: half the chunk's divergence rows (the CE rows stay)
    part = comps(cross=CrossTokens(ratio=1.0, aligned=0.5, source="t"))
    div = 523 * cross_chunk_elements("uld", 32000, 128256) * 4
    assert base["cross_chunk"] - part["cross_chunk"] == div - 262 * (div // 523)
    # the teacher's positions cap T: a 2048-position teacher reads at most 2048 tokens a row
    short = comps(teacher={**L8B, "max_position_embeddings": 2048})
    assert base["cross_hidden"] - short["cross_hidden"] == 4 * 2048 * 4096 * 2
    # GOLD holds more float32 per row than ULD, less the more tokens are shared
    gold = comps(mode="gold")
    gold_shared = comps(mode="gold", cross=CrossTokens(ratio=1.0, shared=20000, source="t"))
    assert base["cross_chunk"] < gold["cross_chunk"]
    assert gold["cross_chunk"] - gold_shared["cross_chunk"] == 523 * 7 * 20000 * 4
    # a job without cross_tokenizer keeps the fused logit term
    plain = {**cross_spec(), "method": {"name": "kd"}, "tokenizer": {}}
    p = make_plan(parse_spec(plain), student_config=S1B_32K, teacher_config=L8B, pool=H100)
    assert "logits" in p.memory["components"] and "cross_chunk" not in p.memory["components"]


def test_the_teacher_token_ratio_is_read_from_the_tokenizers() -> None:
    """`cross_tokens_of` counts both tokenizers' tokens on the built-in sample; a teacher
    whose BPE has more merges reads the same text in fewer tokens."""
    from sharp_core.models.loading import train_bpe_tokenizer
    from sharp_core.objectives.cross_tokenizer import shared_vocabulary
    from sharp_core.train.plan import RATIO_SAMPLE, cross_tokens_of

    text = [RATIO_SAMPLE * 3]
    s_tok, t_tok = train_bpe_tokenizer(text, 300), train_bpe_tokenizer(text, 600)
    ct = cross_tokens_of(s_tok, t_tok)
    n_s = len(s_tok(RATIO_SAMPLE, add_special_tokens=False)["input_ids"])
    n_t = len(t_tok(RATIO_SAMPLE, add_special_tokens=False)["input_ids"])
    assert n_t < n_s and ct.ratio == pytest.approx(n_t / n_s)
    assert ct.shared == shared_vocabulary(t_tok, s_tok)[0].numel() > 256
    assert 0.3 < ct.aligned < 1.0  # most positions pair up on the same text, not all
    assert str(n_t) in ct.source and str(n_s) in ct.source


@pytest.mark.service
def test_the_service_plans_a_cross_tokenizer_job_from_both_tokenizers(
    settings, db, make_team, corpus, tmp_path
) -> None:
    """Teacher and student in local folders, each with its own BPE: POST /v1/jobs/plan reads
    both tokenizers and plans the teacher's logits over its own tokens (the ratio from the
    tokenizers, not assumed); the same spec with the teacher's tokenizer unreadable plans
    with ratio 1.0 and says so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from api.app import create_app
    from sharp_core.models.loading import train_bpe_tokenizer
    from sharp_core.train.plan import cross_tokens_of

    text = corpus.read_text(encoding="utf-8")
    toks = {
        "teacher": train_bpe_tokenizer([text], 600),
        "student": train_bpe_tokenizer([text], 300),
    }
    folders = {}
    for role, tok in toks.items():
        cfg = AutoConfig.for_model(**{**LLAMA_TINY, "vocab_size": len(tok)})
        folders[role] = tmp_path / role
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folders[role])
        tok.save_pretrained(folders[role])
    team = make_team("xplan")
    spec = {
        "teacher": {"model": str(folders["teacher"])},
        "student": {"model": str(folders["student"])},
        "dataset": {"files": [str(corpus)]},
        "method": {"name": "kd", "cross_tokenizer": "uld"},
        "training": {"batch_size": 2, "seq_len": 64, "max_steps": 2},
    }
    want = cross_tokens_of(toks["student"], toks["teacher"])
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs/plan", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 200, r.text
        plan = r.json()["plan"]
        ct = plan["strategy"]["cross_tokenizer"]
        assert ct["teacher_token_ratio"] == round(want.ratio, 4) < 1.0
        assert ct["teacher_tokens_per_row"] == math.ceil(want.ratio * 64)
        assert ct["shared_tokens"] == want.shared and ct["source"].startswith("tokenizers:")
        assert "teacher_tokens" not in plan["unknown"]
        comps = plan["memory"]["components"]
        # an undeclared pool is planned as a GPU (bf16): the teacher's hidden states B·T·h·2
        # beside the student's target rows and their gradient, B·(N−1)·h·2·2
        h = LLAMA_TINY["hidden_size"]
        assert comps["cross_hidden"] == 2 * ct["teacher_tokens_per_row"] * h * 2 + 2 * 63 * h * 4
        (folders["teacher"] / "tokenizer.json").unlink()
        (folders["teacher"] / "tokenizer_config.json").unlink()
        r = client.post("/v1/jobs/plan", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 200, r.text
        plan = r.json()["plan"]
        assert plan["strategy"]["cross_tokenizer"]["teacher_tokens_per_row"] == 64
        assert plan["strategy"]["cross_tokenizer"]["source"].startswith("assumed")
        assert "teacher_tokens" in plan["unknown"]


@pytest.mark.parametrize("mode", ["uld", "gold"])
def test_planned_cross_tokenizer_memory_within_25_percent_of_a_measured_step(mode) -> None:
    """`bench/plan.py`'s small cross-tokenizer shape (V_S 4096, V_T 8192, B2 × N512): the
    plan's bytes against one ULD / GOLD step's measured tensor peak, CPU, fp32; the plan's
    teacher length from the tokenizers' ratio on its sample, the step's from the real rows."""
    from bench.plan import SHAPES, measure

    [sh] = [s for s in SHAPES["cross"] if s.cross == mode]
    r = measure(sh)
    assert 0.75 <= r["estimate"] / r["measured"] <= 1.25, r
    assert 0.75 <= r["teacher_tokens_planned"] / r["teacher_tokens_measured"] <= 1.25, r


# --------------------------------------------------------------- the dense logit path
def test_a_head_the_fused_loss_cannot_run_is_planned_with_its_whole_logits() -> None:
    """A logit transform the fused loss does not apply (here `logit_scale`, which
    `fused.head_of` refuses) sends the step down the dense path (`step._fused_heads`), which
    holds whole B×N×V logits: the plan counts them (`dense_logits`) instead of the fused
    chunk. 8B → 3B at V 128256, B1 × N4096, bf16 (2 bytes) on an H100, by hand:
      3 whole tensors (student and teacher logits, the gradient buffer; B = 1: no flattened
      copies) 3·4096·128256·2 = 3_152_019_456, + one chunk of 2^28 // (4·128256) = 523 rows'
      float32 work 523·128256·5·4 = 1_341_557_760, + the final hidden states 4096·3072·2·2
      = 50_331_648 → 4_543_908_864; the fused plan's `logits` term is far smaller."""
    scaled = {**big_spec(batch_size=8), "method": {"name": "kd"}}
    scaled["teacher"] = {"init": "config", "config": {**L8B, "logit_scale": 2.0}}
    fused_plan = make_plan(parse_spec(big_spec(batch_size=8)), student_config=L3B,
                           teacher_config=L8B, pool=H100)  # fmt: skip
    p = make_plan(
        parse_spec(scaled), student_config=L3B, teacher_config=scaled["teacher"]["config"],
        pool=H100,
    )  # fmt: skip
    c, f = p.memory["components"], fused_plan.memory["components"]
    assert "logits" not in c and c["dense_logits"] == 4_543_908_864
    assert (p.strategy["logit_path"], fused_plan.strategy["logit_path"]) == ("dense", "fused")
    assert "dense_logits" not in f and f["logits"] < c["dense_logits"] / 10
    # sft reads no teacher logits: the student's plain head keeps the fused term
    sft = {**scaled, "method": {"name": "sft"}}
    p = make_plan(parse_spec(sft), student_config=L3B, teacher_config=L8B, pool=H100)
    assert "logits" in p.memory["components"]


def test_planned_dense_logit_memory_within_25_percent_of_a_measured_step() -> None:
    """`bench/plan.py`'s dense narrow shape (V 128256, B1 × N1024, a `logit_scale` config
    the fused loss refuses): the plan's bytes against the step's measured tensor peak, and
    the step did take the dense path."""
    from bench.plan import SHAPES, measure

    sh = SHAPES["dense"][1]
    r = measure(sh)
    assert r["logit_path"] == "dense", r
    assert 0.75 <= r["estimate"] / r["measured"] <= 1.25, r


# ------------------------------------------------------------- SHARP's projection, 'auto'
OPT125 = llama(768, 12, 3072, 12, 12, vocab=50272)
OPT13B = llama(2048, 24, 8192, 32, 32, vocab=50272)


def _sharp(student: dict, teacher: dict, batch: int, seq: int, gpus: int, **method) -> dict:
    d = big_spec(batch_size=batch, seq_len=seq)
    d["student"]["config"], d["teacher"]["config"] = student, teacher
    d["method"] = {"name": "sharp", **method}
    d["resources"] = {"gpus": gpus, "queue": "h200"}
    return d


def test_sdpa_worst_case_maps_are_counted_by_hand() -> None:
    """`sdpa_map_bytes`: the math kernel's saved (rows, H_s, N, N) float32 map per student
    layer, plus one layer's scores and softmax at the larger side's heads, three maps' worth.
    125M-shaped student (12 layers × 12 heads), 1.3B-shaped teacher (32 heads), 8 rows of
    512: 12·12·8·512²·4 + 3·32·8·512²·4 = 1_207_959_552 + 805_306_368."""
    from sharp_core.train.memory import sdpa_map_bytes

    spec = parse_spec(_sharp(OPT125, OPT13B, 8, 512, 1))
    s, t = sizes_of_config(OPT125), sizes_of_config(OPT13B)
    assert s is not None and t is not None
    assert sdpa_map_bytes(spec, s, t, 8) == 1_207_959_552 + 805_306_368


def test_auto_projection_takes_sdpa_where_its_maps_are_small_and_chunked_at_4k() -> None:
    """'auto' (the default): SDPA on a card where the worst-case maps are ≤ 10 % of it (the
    H200 measured SHARP 1.8× faster so), chunked where they are not (the 8B → 3B job at 4k:
    28·24·4096²·4 ≈ 45 GB per row) and on the CPU; an explicit choice is kept. The plan
    reports it, counts its memory, and leaves the stored spec as asked."""
    from sharp_core.train.memory import resolve_projection, sdpa_map_bytes

    h200 = PoolInfo("h200", "h200")
    small = parse_spec(_sharp(OPT125, OPT13B, 8, 512, 1))
    assert small.method.projection == "auto"
    p = make_plan(small, student_config=OPT125, teacher_config=OPT13B, pool=h200)
    assert p.strategy["projection"] == "sdpa" and p.spec is not None
    assert p.spec.method.projection == "auto"
    s, t = sizes_of_config(OPT125), sizes_of_config(OPT13B)
    assert s is not None and t is not None
    chunked = make_plan(
        parse_spec(_sharp(OPT125, OPT13B, 8, 512, 1, projection="chunked")),
        student_config=OPT125, teacher_config=OPT13B, pool=h200,
    )  # fmt: skip
    assert chunked.strategy["projection"] == "chunked"
    extra = p.memory["components"]["attention"] - chunked.memory["components"]["attention"]
    probs = 2 * 12 * 8 * 12 * 64 * 512 * 4  # the chunked path's blocks
    assert extra == sdpa_map_bytes(small, s, t, 8) - probs
    big = parse_spec(_sharp(L3B, L8B, 8, 4096, 8))
    q = make_plan(big, student_config=L3B, teacher_config=L8B, pool=h200)
    assert q.strategy["projection"] == "chunked"
    # the CPU: chunked whatever the size; an explicit sdpa stays
    s3, t8 = sizes_of_config(L3B), sizes_of_config(L8B)
    assert s3 is not None and t8 is not None
    assert resolve_projection(small, s, t, world_size=1, gpu_bytes=None) == "chunked"
    sdpa = parse_spec(_sharp(L3B, L8B, 8, 4096, 8, projection="sdpa"))
    assert resolve_projection(sdpa, s3, t8, world_size=8, gpu_bytes=int(141e9)) == "sdpa"
    kd = parse_spec(big_spec(batch_size=8, seq_len=512))
    assert (
        make_plan(kd, student_config=L3B, teacher_config=L8B, pool=h200).strategy["projection"]
        is None
    )


def test_the_trainer_runs_sharp_with_the_projection_its_device_resolves() -> None:
    """The objective is built before the device is known, as 'chunked' for 'auto'; the
    trainer's plan (`memory.plan`, `Context.prepare`) resolves 'auto' on the card and sets
    it: SDPA for a small job on an 80 GB GPU, chunked on the CPU (no GPU bytes)."""
    from types import SimpleNamespace

    from sharp_core.objectives.sharp import make_attention_objective
    from sharp_core.train.distributed import _use_projection
    from sharp_core.train.memory import plan

    tiny = llama(64, 2, 128, 4, 2, vocab=256)
    spec = parse_spec(_sharp(tiny, tiny, 2, 64, 1))
    obj = make_attention_objective(spec.method, student_shape=(2, 4), teacher_shape=(2, 4),
                                   seq_len=64)  # fmt: skip
    assert obj.projection == "chunked"
    s = sizes_of_config(tiny)
    assert s is not None
    S = SimpleNamespace(objective=obj, spec=spec)
    on_cpu = plan(spec, s, s, world_size=1, gpu_bytes=None)
    _use_projection(S, on_cpu.projection)
    assert obj.projection == "chunked"
    on_gpu = plan(spec, s, s, world_size=1, gpu_bytes=int(80e9))
    _use_projection(S, on_gpu.projection)
    assert (on_gpu.projection, obj.projection) == ("sdpa", "sdpa")
