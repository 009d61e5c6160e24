"""The teacher-logit cache in the service (issue 15): real uvicorn, a real Celery worker and
real training processes on Postgres and Redis.

One job builds the team's cache, a second job with the same key reads it, the listing and
the job field show both; another team sees nothing. A shard corrupted on disk fails the next
job with ``teacher_cache_corrupt`` (the cache is discarded); its retry rebuilds the cache and
succeeds, and the rebuilt files verify.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from service.teacher_caches import cache_root
from sharp_core.cache.teacher_cache import TeacherCache
from tests.conftest import TeamKey, tiny_spec, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]

TIMEOUT = 240


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("tcache")


@pytest.fixture(scope="module")
def other(make_team) -> TeamKey:
    return make_team("tcache-other")


@pytest.fixture(scope="module")
def api(live_server: str, worker: Path) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


def _spec(corpus: Path, name: str, seed: int = 0) -> dict:
    d = tiny_spec(corpus, max_steps=6, name=name, eval_every=0, checkpoint_every=0, seed=seed)
    d["teacher"] = {
        "init": "config",
        "config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "n_positions": 64,
        },
    }
    d["method"] = {"name": "kd", "teacher_cache": {"mode": "use", "k": 16}}
    return d


def _run(api: httpx.Client, team: TeamKey, spec: dict) -> dict:
    r = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    return _wait(api, team, r.json()["id"])


def _wait(api: httpx.Client, team: TeamKey, job_id: str) -> dict:
    def done() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, TIMEOUT, interval=0.25, what=f"{job_id} to end")  # type: ignore[return-value]


def test_bad_cache_spec_is_a_422_naming_the_field(api, team, corpus) -> None:
    spec = _spec(corpus, "bad")
    spec["method"] = {"name": "rkl", "teacher_cache": {"mode": "use", "kind": "sampled"}}
    r = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "spec.method.teacher_cache.kind"


def test_cache_is_shared_listed_and_a_corrupt_shard_fails_then_retry_rebuilds(
    api, team, other, corpus, settings: Settings
) -> None:
    # the teacher is config-initialised: the same training seed gives the same teacher weights,
    # so the same key; the student's seed is the job's too
    a = _run(api, team, _spec(corpus, "builder"))
    assert a["status"] == "succeeded", a
    assert [(u["role"], u["k"]) for u in a["teacher_cache"]] == [("built", 16)]
    key = a["teacher_cache"][0]["key"]
    folder = cache_root(settings, team.team_id) / key
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"] == key and manifest["bytes"] == a["teacher_cache"][0]["size_bytes"]

    b = _run(api, team, _spec(corpus, "reader"))
    assert b["status"] == "succeeded", b
    assert [(u["role"], u["key"]) for u in b["teacher_cache"]] == [("read", key)]
    events = api.get(f"/v1/jobs/{b['id']}/events", headers=team.headers, timeout=30).text
    assert '"role": "read"' in events or '"role":"read"' in events

    listed = api.get("/v1/teacher-caches", headers=team.headers).json()["data"]
    assert [c["key"] for c in listed] == [key]
    c = listed[0]
    assert c["present"] and c["size_bytes"] == manifest["bytes"] and c["shards"] >= 1
    assert c["built_by_job_id"] == a["id"] and c["kind"] == "topk" and c["k"] == 16
    assert {p for p in c["parts"]} >= {"teacher", "tokenizer", "dataset", "packing", "k"}
    assert c["parts"]["packing"]["seq_len"] == 32
    assert [(j["job_id"], j["role"]) for j in c["jobs"]] == [(a["id"], "built"), (b["id"], "read")]
    assert api.get("/v1/teacher-caches", headers=other.headers).json()["data"] == []
    assert api.get("/v1/teacher-caches").status_code == 401

    # a flipped byte in a shard: the next job fails with teacher_cache_corrupt, nothing trained
    shard = folder / manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    c_job = _run(api, team, _spec(corpus, "victim"))
    assert c_job["status"] == "failed", c_job
    assert c_job["error"]["code"] == "teacher_cache_corrupt", c_job
    assert c_job["attempt"] == 1 and c_job["progress"]["step"] == 0
    assert not folder.exists()  # discarded, so nothing can read it again
    listed = api.get("/v1/teacher-caches", headers=team.headers).json()["data"]
    assert listed[0]["present"] is False

    # the retry rebuilds the cache from the teacher and trains from the fresh files
    r = api.post(f"/v1/jobs/{c_job['id']}/retry", headers=team.headers)
    assert r.status_code in (200, 202), r.text
    c_job = _wait(api, team, c_job["id"])
    assert c_job["status"] == "succeeded", c_job
    assert c_job["attempt"] == 2
    assert [(u["role"], u["attempt"]) for u in c_job["teacher_cache"]] == [("built", 2)]
    rebuilt = json.loads((folder / "manifest.json").read_text())
    assert rebuilt["key"] == key
    assert [s["sha256"] for s in rebuilt["shards"]] == [s["sha256"] for s in manifest["shards"]]
    TeacherCache.open(folder, key=key, blocks=rebuilt["blocks"], positions=31)  # verifies
    listed = api.get("/v1/teacher-caches", headers=team.headers).json()["data"]
    assert listed[0]["present"] and listed[0]["built_by_job_id"] == c_job["id"]
    # the reader's loss equals the builder's: the rebuilt cache holds the same targets
    assert c_job["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-6)
