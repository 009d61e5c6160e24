"""A chat data set end to end through the service: upload a generated multi-turn JSONL →
an sft teacher job → kd and sharp jobs distilled from it → download the student.

Checked: a bad conversation is refused at upload with its line and field; the tokenized data
is built once (the teacher job) and read by the next jobs (their events say so); the number
of target tokens the jobs trained on is the template's own assistant-token count
(``return_assistant_tokens_mask`` on the downloaded tokenizer), less at most one per row
(a row's first token is never a target); the student downloads and loads.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.models import CacheRecordUse
from service.repositories import CacheRecordRepository
from tests.conftest import TeamKey, wait_for
from tests.helpers import CHAT_TEMPLATE, chat_rows

pytestmark = [pytest.mark.service, pytest.mark.slow]

ROWS = 160


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("data")


@pytest.fixture(scope="module")
def api(live_server: str, worker: Path):
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


def _run(api: httpx.Client, team: TeamKey, spec: dict) -> dict:
    r = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def done() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, 300, interval=0.5, what=f"{job_id} finished")  # type: ignore[return-value]


def _events(api: httpx.Client, team: TeamKey, job_id: str, kind: str) -> list[dict]:
    text = api.get(f"/v1/jobs/{job_id}/events", headers=team.headers, timeout=30).text
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in block.splitlines() if ": " in ln)
        if fields.get("event") == kind:
            out.append(json.loads(fields["data"]))
    return out


def _spec(name: str, upload_id: str, method: str, teacher: str | None) -> dict:
    d: dict = {
        "name": name,
        "student": {
            "init": "config",
            "config": {
                "model_type": "gpt2",
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 32,
                "n_positions": 64,
            },  # fmt: skip
        },
        "dataset": {
            "source": "upload",
            "upload_id": upload_id,
            "chat_template": CHAT_TEMPLATE,
            "eval_fraction": 0.1,
        },  # fmt: skip
        "method": {"name": method, "rank": 8},
        "training": {
            "max_steps": 4,
            "batch_size": 4,
            "seq_len": 64,
            "warmup_steps": 1,
            "eval_every": 0,
            "checkpoint_every": 0,
            "lr": 3e-3,
        },  # fmt: skip
    }
    if teacher is None:
        d["tokenizer"] = {"train": {"vocab_size": 300}}
    else:
        d["teacher"] = {"model": {"job": teacher}}
    return d


def test_chat_jobs_through_the_service(api, team, tmp_path, db) -> None:
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    r = api.post(
        "/v1/uploads",
        files={"file": ("bad.jsonl", "".join(json.dumps(x) + "\n" for x in bad))},
        headers=team.headers,
    )
    assert r.status_code == 422, r.text
    assert "line 1" in r.text and "messages[1].role 'bot'" in r.text

    rows = chat_rows(ROWS, seed=7)
    body = "".join(json.dumps(x) + "\n" for x in rows)
    r = api.post("/v1/uploads", files={"file": ("chat.jsonl", body)}, headers=team.headers)
    assert r.status_code == 201, r.text
    upload = r.json()["id"]

    teacher = _run(api, team, _spec("chat-teacher", upload, "sft", None))
    assert teacher["status"] == "succeeded", teacher
    jobs = {
        m: _run(api, team, _spec(f"chat-{m}", upload, m, teacher["id"])) for m in ("kd", "sharp")
    }
    for m, job in jobs.items():
        assert job["status"] == "succeeded", (m, job)

    (built,) = _events(api, team, teacher["id"], "tokenized_data")
    assert built["role"] == "built" and built["format"] == "chat"
    assert built["loss_on"] == "assistant" and built["packing"] == "documents"
    for job in jobs.values():  # the same tokenizer (the teacher's) and data: the same key
        (ev,) = _events(api, team, job["id"], "tokenized_data")
        assert ev["role"] == "read" and ev["key"] == built["key"]
    # each job recorded its use of the entry in the database before reading it (the cache
    # budget's LRU order and its "in use" guard, tests/test_cache_budgets.py)
    with db.session() as s:
        (row,) = [
            r
            for r in CacheRecordRepository(s).for_team(team.team_id)
            if (r.kind, r.key) == ("data-caches", built["key"])
        ]
        users = set(
            s.scalars(select(CacheRecordUse.job_id).where(CacheRecordUse.entry_id == row.id))
        )
    assert users == {teacher["id"], *(j["id"] for j in jobs.values())}
    assert row.bytes > 0

    # download the sharp student with its tokenizer; render every conversation with the
    # template's own assistant offsets and compare with what the jobs trained on
    cps = api.get(f"/v1/jobs/{jobs['sharp']['id']}/checkpoints", headers=team.headers).json()
    step = max(c["step"] for c in cps["data"])
    arch = api.get(
        f"/v1/jobs/{jobs['sharp']['id']}/checkpoints/{step}/archive", headers=team.headers
    )
    assert arch.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(arch.content)) as tar:
        tar.extractall(tmp_path / "student", filter="data")
    folder = next(p.parent for p in (tmp_path / "student").rglob("config.json"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.n_layer == 1
    tok = AutoTokenizer.from_pretrained(folder)
    tokens = assistant = 0
    for row in rows:
        out = tok.apply_chat_template(
            row["messages"], chat_template=CHAT_TEMPLATE, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        tokens += len(out["input_ids"])
        assistant += sum(out["assistant_masks"])
    assert built["documents"] == ROWS and built["tokens"] == tokens
    rows_packed = -(-tokens // 64)
    assert assistant - rows_packed <= built["targets"] <= assistant
    assert assistant < tokens / 2  # the system and user turns are the larger part: masked
