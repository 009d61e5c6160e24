"""The HTTP API against real Postgres and Redis (no worker: jobs stay queued here, and since
no worker serves their pool the scheduler sends no Celery message for them).

Covers auth, validation with ``error.param``, idempotency, listing, cancel/retry state rules,
team isolation, uploads, and checkpoint downloads (Range, ETag, archive) on a checkpoint
written by the library's own atomic writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.admin import revoke_key
from service.db import Database
from service.repositories import CheckpointRepository
from service.settings import Settings
from sharp_core.train.checkpoint import write_checkpoint
from tests.conftest import TeamKey, tiny_spec

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def team_a(make_team) -> TeamKey:
    return make_team("alpha")


@pytest.fixture(scope="module")
def team_b(make_team) -> TeamKey:
    return make_team("beta")


def _err(resp) -> dict:
    body = resp.json()
    assert set(body) >= {"error"}, body
    # `errors` (every error of a validation, the first included) only where several can be
    assert set(body["error"]) - {"errors"} == {"code", "message", "param"}, body
    return body["error"]


def _count_jobs(client: TestClient, team: TeamKey) -> int:
    n, after = 0, None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", params=params, headers=team.headers).json()
        n += len(page["data"])
        after = page["next_cursor"]
        if not after:
            return n


# ------------------------------------------------------------------------- health, docs
def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "redis": "ok", "artifacts": "ok"}


def test_readyz_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    err = _err(r)
    assert err["code"] == "not_ready" and "redis" in err["message"]


def test_openapi_documents_the_api_with_examples(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/metrics",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/checkpoints",
        "/v1/jobs/{job_id}/checkpoints/{step}/archive",
        "/v1/jobs/{job_id}/checkpoints/{step}/files/{name}",
        "/v1/uploads",
        "/healthz",
        "/readyz",
    ):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    assert schemas["JobCreate"]["examples"][0]["spec"]["method"]["name"] == "sharp"
    assert "examples" in schemas["JobPublic"]
    assert "multipart/form-data" in doc["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]


# ------------------------------------------------------------------------- auth
def test_auth_missing_malformed_unknown_and_revoked_keys(
    client: TestClient, make_team, db: Database
) -> None:
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer sharp_nope"},
    ):
        r = client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401, headers
        assert _err(r)["code"] == "unauthorized"
    team = make_team("revoked")
    assert client.get("/v1/jobs", headers=team.headers).status_code == 200
    with db.session() as s:
        revoke_key(s, team.prefix)
    r = client.get("/v1/jobs", headers=team.headers)
    assert r.status_code == 401 and _err(r)["param"] == "Authorization"


# ------------------------------------------------------------------------- create / get / list
def test_create_get_list_and_nothing_sent_until_admitted(
    client: TestClient, team_a: TeamKey, corpus: Path, queue_length
) -> None:
    before = queue_length()
    r = client.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team_a.headers)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job_") and r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempt"] == 0
    assert job["progress"] == {"step": 0, "max_steps": 20, "tokens_per_s": None, "eta_s": None}
    assert job["spec"]["training"]["lr"] == 5e-4  # defaults resolved and stored
    assert queue_length() == before  # no worker serves 'default' here: nothing admitted

    got = client.get(f"/v1/jobs/{job['id']}", headers=team_a.headers).json()
    assert got["id"] == job["id"] and got["status"] == "queued"

    ids = []
    for i in range(3):
        ids.append(
            client.post(
                "/v1/jobs", json={"spec": tiny_spec(corpus, name=f"n{i}")}, headers=team_a.headers
            ).json()["id"]
        )
    page1 = client.get("/v1/jobs", params={"limit": 2}, headers=team_a.headers).json()
    assert [j["id"] for j in page1["data"]] == [ids[2], ids[1]]  # newest first
    page2 = client.get(
        "/v1/jobs", params={"limit": 2, "after": page1["next_cursor"]}, headers=team_a.headers
    ).json()
    assert [j["id"] for j in page2["data"]][0] == ids[0]
    r = client.get("/v1/jobs", params={"after": "not-a-cursor"}, headers=team_a.headers)
    assert r.status_code == 422 and _err(r)["param"] == "after"

    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=team_a.headers)
    cancelled = client.get(
        "/v1/jobs", params={"status": "cancelled"}, headers=team_a.headers
    ).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    both = client.get(
        "/v1/jobs", params={"status": "cancelled,queued", "limit": 100}, headers=team_a.headers
    ).json()
    assert ids[0] in {j["id"] for j in both["data"]} and ids[1] in {j["id"] for j in both["data"]}
    r = client.get("/v1/jobs", params={"status": "bogus"}, headers=team_a.headers)
    assert r.status_code == 422 and _err(r)["param"] == "status"
    r = client.get("/v1/jobs", params={"limit": 0}, headers=team_a.headers)
    assert r.status_code == 422 and _err(r)["param"] == "limit"


def test_idempotency_key(client: TestClient, team_a: TeamKey, corpus: Path, queue_length) -> None:
    before = queue_length()
    body = {"spec": tiny_spec(corpus, name="idem")}
    h = {**team_a.headers, "Idempotency-Key": "key-1"}
    first = client.post("/v1/jobs", json=body, headers=h)
    again = client.post("/v1/jobs", json=body, headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", json={"spec": tiny_spec(corpus, name="other")}, headers=h)
    assert other.status_code == 409
    assert _err(other) | {"message": ""} == {
        "code": "idempotency_conflict",
        "message": "",
        "param": "Idempotency-Key",
    }
    assert queue_length() == before  # no worker here: one job, waiting, no message


def test_idempotency_keys_are_per_team(
    client: TestClient, team_a: TeamKey, team_b: TeamKey, corpus: Path
) -> None:
    body = {"spec": tiny_spec(corpus, name="per-team")}
    a = client.post("/v1/jobs", json=body, headers={**team_a.headers, "Idempotency-Key": "shared"})
    b = client.post("/v1/jobs", json=body, headers={**team_b.headers, "Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]


# ------------------------------------------------------------------------- bad input
def _mutate(spec: dict, path: str, value: object) -> dict:
    spec = json.loads(json.dumps(spec))
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return spec


BAD_SPECS = [
    # (mutation, expected status, expected code, expected param)
    (("training.lr", 5.0), 422, "invalid_spec", "spec.training.lr"),
    (("training.max_steps", 0), 422, "invalid_spec", "spec.training.max_steps"),
    (("training.bogus", 1), 422, "invalid_spec", "spec.training.bogus"),
    (("bogus", 1), 422, "invalid_spec", "spec.bogus"),
    (("student.trust_remote_code", True), 422, "unsafe_model", "spec.student.trust_remote_code"),
    (
        ("dataset", {"source": "upload", "upload_id": "upl_doesnotexist"}),
        422,
        "unknown_upload",
        "spec.dataset.upload_id",
    ),
    (
        ("teacher", {"model": {"job": "job_doesnotexist"}}),
        422,
        "unknown_job",
        "spec.teacher.model.job",
    ),
    # A pool no worker serves is not an error (the job waits, see test_scheduler); a name
    # that cannot be a pool is.
    (("resources.queue", "GPU A100"), 422, "invalid_spec", "spec.resources.queue"),
    # each GPU of a multi-GPU job takes an equal slice of every batch
    (("resources.gpus", 3), 422, "invalid_spec", "spec.training.batch_size"),
    # on-policy generation settings out of range (issue 15): λ outside [0, 1], and as many
    # new tokens as the block is long (no prompt left)
    (
        ("method.on_policy", {"fraction": 1.5}),
        422,
        "invalid_spec",
        "spec.method.on_policy.fraction",
    ),
    (
        ("method.on_policy", {"max_new_tokens": 32}),
        422,
        "invalid_spec",
        "spec.method.on_policy.max_new_tokens",
    ),
    # a local teacher or student folder that is not there is refused at submission (issue 27),
    # whatever the path's form: absolute, ./relative, ~, or below a folder that exists here
    (("teacher", {"model": "/no/such/teacher"}), 422, "model_not_found", "spec.teacher.model"),
    (("teacher", {"model": "./no-such-teacher"}), 422, "model_not_found", "spec.teacher.model"),
    (("teacher", {"model": "~/no-such-teacher"}), 422, "model_not_found", "spec.teacher.model"),
    (("teacher", {"model": "tests/no-such-teacher"}), 422, "model_not_found", "spec.teacher.model"),
    (("student", {"model": "runs/a/step_000200"}), 422, "model_not_found", "spec.student.model"),
]


@pytest.mark.parametrize(
    ("mutation", "status", "code", "param"), BAD_SPECS, ids=[m[0][0] for m in BAD_SPECS]
)
def test_bad_specs_name_the_field_and_queue_nothing(
    client: TestClient,
    team_b: TeamKey,
    corpus: Path,
    queue_length,
    mutation,
    status,
    code,
    param,
) -> None:
    jobs_before, queued_before = _count_jobs(client, team_b), queue_length()
    spec = _mutate(tiny_spec(corpus), *mutation)
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team_b.headers)
    assert r.status_code == status, r.text
    err = _err(r)
    assert (err["code"], err["param"]) == (code, param), err
    assert _count_jobs(client, team_b) == jobs_before and queue_length() == queued_before


def test_every_spec_error_is_reported_at_once(
    client: TestClient, team_b: TeamKey, corpus: Path
) -> None:
    """A spec with three mistakes gets three errors (the first also as the error itself, so
    its shape is unchanged), and a mistyped field the nearest real one."""
    spec = tiny_spec(corpus)
    spec["training"]["max_stpes"] = spec["training"].pop("max_steps")
    spec["training"]["lr"] = 5.0
    spec["method"]["naem"] = "kd"
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team_b.headers)
    assert r.status_code == 422, r.text
    err = _err(r)
    got = {e["param"]: e for e in err["errors"]}
    assert set(got) == {"spec.training.max_stpes", "spec.training.lr", "spec.method.naem"}
    assert {e["code"] for e in err["errors"]} == {"invalid_spec"}
    assert {k: err[k] for k in ("code", "message", "param")} == err["errors"][0]
    assert "did you mean `max_steps`?" in got["spec.training.max_stpes"]["message"]
    assert "did you mean `name`?" in got["spec.method.naem"]["message"]
    assert "less than or equal to 1" in got["spec.training.lr"]["message"]
    # What only the service checks is collected the same way: a missing upload and a missing
    # teacher folder in one spec.
    spec = _mutate(tiny_spec(corpus), "dataset", {"source": "upload", "upload_id": "upl_nope"})
    spec["teacher"] = {"model": "/no/such/teacher"}
    spec["method"] = {"name": "kd"}
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team_b.headers)
    assert r.status_code == 422, r.text
    assert [(e["code"], e["param"]) for e in _err(r)["errors"]] == [
        ("model_not_found", "spec.teacher.model"),
        ("unknown_upload", "spec.dataset.upload_id"),
    ]


def test_hub_ids_and_existing_folders_are_accepted_as_model_sources(
    client: TestClient, team_b: TeamKey, corpus: Path, tmp_path: Path
) -> None:
    """A hub id ('org/name', 'name') is the worker's to fetch, so the API takes it; a local
    folder that exists is taken too. The jobs are cancelled at once (no worker runs here)."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    for source in ("sshleifer/tiny-gpt2", "gpt2", str(folder)):
        spec = tiny_spec(corpus)
        spec["teacher"] = {"model": source}
        spec["method"] = {"name": "kd"}
        r = client.post("/v1/jobs", json={"spec": spec}, headers=team_b.headers)
        assert r.status_code == 201, (source, r.text)
        client.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=team_b.headers)


def test_malformed_bodies(client: TestClient, team_b: TeamKey, corpus: Path, queue_length) -> None:
    queued_before = queue_length()
    h = {**team_b.headers, "Content-Type": "application/json"}
    r = client.post("/v1/jobs", content=b'{"spec": {', headers=h)
    assert r.status_code == 400 and _err(r)["code"] == "malformed_json"
    r = client.post("/v1/jobs", json={"spec": tiny_spec(corpus), "priority": 1}, headers=h)
    assert r.status_code == 422 and _err(r)["param"] == "priority"
    assert "unknown field" in _err(r)["message"]
    r = client.post("/v1/jobs", json={}, headers=h)
    assert r.status_code == 422 and _err(r)["param"] == "spec"
    r = client.post("/v1/jobs", json=[1, 2], headers=h)
    assert r.status_code == 422
    r = client.post("/v1/jobs", content=b"x" * 2_000_000, headers=h)
    assert r.status_code == 413 and _err(r)["code"] == "payload_too_large"
    assert queue_length() == queued_before


def test_model_allowlist(settings: Settings, make_team, corpus: Path) -> None:
    strict = settings.model_copy(update={"model_allowlist": ["acme/"]})
    team = make_team("allow")
    with TestClient(create_app(strict)) as c:
        spec = _mutate(tiny_spec(corpus), "student", {"model": "evil/model"})
        r = c.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 422
    assert (_err(r)["code"], _err(r)["param"]) == ("model_not_allowed", "spec.student.model")


# ------------------------------------------------------------------------- cancel / retry
def test_cancel_queued_is_immediate_and_idempotent_then_retry(
    client: TestClient, team_a: TeamKey, corpus: Path, queue_length
) -> None:
    job = client.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team_a.headers).json()
    url = f"/v1/jobs/{job['id']}"
    # follow=false: what is logged so far, then the stream ends (the job is still queued).
    with client.stream(
        "GET", f"{url}/events", params={"follow": "false"}, headers=team_a.headers
    ) as resp:
        body = "".join(resp.iter_text())
    assert body.count("id: ") == 1 and '"status":"queued"' in body
    r1 = client.post(f"{url}/cancel", headers=team_a.headers)
    r2 = client.post(f"{url}/cancel", headers=team_a.headers)
    assert r1.status_code == r2.status_code == 202
    assert r1.json()["status"] == r2.json()["status"] == "cancelled"
    assert r1.json()["finished_at"] is not None

    before = queue_length()
    r = client.post(f"{url}/retry", headers=team_a.headers)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.json()["queue_reason"] == "no worker serves pool 'default'"
    assert queue_length() == before
    r = client.post(f"{url}/retry", headers=team_a.headers)
    assert r.status_code == 409 and _err(r)["code"] == "invalid_state"

    # The whole history is in the event log, replayable over SSE (ends at a terminal state).
    client.post(f"{url}/cancel", headers=team_a.headers)
    with client.stream("GET", f"{url}/events", headers=team_a.headers) as resp:
        body = "".join(resp.iter_text())
    ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    statuses = [
        json.loads(line[6:])["status"] for line in body.splitlines() if line.startswith("data: ")
    ]
    assert ids == [1, 2, 3, 4] and statuses == ["queued", "cancelled", "queued", "cancelled"]
    with client.stream(
        "GET", f"{url}/events", headers={**team_a.headers, "Last-Event-ID": "2"}
    ) as resp:
        body = "".join(resp.iter_text())
    assert [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")] == [3, 4]


# ------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def job_with_checkpoint(
    client: TestClient, team_a: TeamKey, corpus: Path, settings: Settings, db: Database
) -> tuple[str, Path, dict]:
    """A job with one checkpoint written by the library's atomic writer (no training needed)."""
    job = client.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team_a.headers).json()
    out = Path(settings.artifact_root) / team_a.team_id / job["id"]

    def files(tmp: Path) -> None:
        (tmp / "config.json").write_text('{"model_type": "gpt2"}')
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 40)
        (tmp / "nested").mkdir()
        (tmp / "nested" / "a.txt").write_text("hello")

    path, manifest = write_checkpoint(out, 10, files, {"eval_loss": 1.5})
    with db.session() as s:
        CheckpointRepository(s).upsert(
            job_id=job["id"],
            step=10,
            path=str(path),
            manifest=manifest,
            metrics={"eval_loss": 1.5},
            attempt=1,
        )
    return job["id"], path, manifest


def test_checkpoint_list_and_single_file_download(
    client: TestClient, team_a: TeamKey, job_with_checkpoint
) -> None:
    job_id, path, manifest = job_with_checkpoint
    h = team_a.headers
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["data"]
    assert [c["step"] for c in listed] == [10] and listed[0]["metrics"] == {"eval_loss": 1.5}
    assert {f["name"]: (f["size"], f["sha256"]) for f in listed[0]["files"]} == {
        n: (m["size"], m["sha256"]) for n, m in manifest["files"].items()
    }

    base = f"/v1/jobs/{job_id}/checkpoints/10/files"
    data = (path / "model.safetensors").read_bytes()
    sha = manifest["files"]["model.safetensors"]["sha256"]
    full = client.get(f"{base}/model.safetensors", headers=h)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{sha}"' and full.headers["accept-ranges"] == "bytes"

    part = client.get(f"{base}/model.safetensors", headers={**h, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(f"{base}/model.safetensors", headers={**h, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    open_end = client.get(
        f"{base}/model.safetensors", headers={**h, "Range": f"bytes={len(data) - 5}-"}
    )
    assert open_end.content == data[-5:]
    bad = client.get(f"{base}/model.safetensors", headers={**h, "Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(data)}"
    stale_if_range = client.get(
        f"{base}/model.safetensors", headers={**h, "Range": "bytes=0-9", "If-Range": '"old"'}
    )
    assert stale_if_range.status_code == 200 and stale_if_range.content == data

    cached = client.get(f"{base}/model.safetensors", headers={**h, "If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and cached.content == b""

    nested = client.get(f"{base}/nested/a.txt", headers=h)
    assert nested.status_code == 200 and nested.content == b"hello"
    for name in (
        "manifest.json",
        "training_state.pt",
        "../../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "nested/%2e%2e/%2e%2e/config.json",
    ):
        r = client.get(f"{base}/{name}", headers=h)
        assert r.status_code == 404, name
    assert (
        client.get(f"/v1/jobs/{job_id}/checkpoints/11/files/config.json", headers=h).status_code
        == 404
    )


def test_checkpoint_archive(client: TestClient, team_a: TeamKey, job_with_checkpoint) -> None:
    job_id, path, manifest = job_with_checkpoint
    r = client.get(f"/v1/jobs/{job_id}/checkpoints/10/archive", headers=team_a.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = tar.getnames()
        assert sorted(names) == sorted(
            [f"step_000010/{n}" for n in manifest["files"]] + ["step_000010/manifest.json"]
        )
        for name, meta in manifest["files"].items():
            blob = tar.extractfile(f"step_000010/{name}").read()  # type: ignore[union-attr]
            assert hashlib.sha256(blob).hexdigest() == meta["sha256"]


def test_another_teams_job_is_404_everywhere(
    client: TestClient, team_a: TeamKey, team_b: TeamKey, job_with_checkpoint
) -> None:
    job_id, _, _ = job_with_checkpoint
    h = team_b.headers
    base = f"/v1/jobs/{job_id}"
    for method, url in [
        ("GET", base),
        ("POST", f"{base}/cancel"),
        ("POST", f"{base}/retry"),
        ("GET", f"{base}/metrics"),
        ("GET", f"{base}/events"),
        ("GET", f"{base}/checkpoints"),
        ("GET", f"{base}/checkpoints/10/files/config.json"),
        ("GET", f"{base}/checkpoints/10/archive"),
    ]:
        r = client.request(method, url, headers=h)
        assert r.status_code == 404, (method, url, r.text)
        assert _err(r)["code"] == "not_found"
    assert job_id not in {j["id"] for j in client.get("/v1/jobs", headers=h).json()["data"]}
    # Unknown ids look the same as other teams' ids.
    r = client.get("/v1/jobs/job_00000000000000000000000000", headers=h)
    assert r.status_code == 404
    # And the owner still sees it.
    assert client.get(base, headers=team_a.headers).status_code == 200


# ------------------------------------------------------------------------- uploads
def _upload(client: TestClient, team: TeamKey, name: str, content: bytes, **form: str):
    return client.post(
        "/v1/uploads", files={"file": (name, content)}, data=form, headers=team.headers
    )


def test_uploads_validate_store_by_sha_and_are_usable_in_a_spec(
    client: TestClient, team_a: TeamKey, team_b: TeamKey, corpus: Path, settings: Settings
) -> None:
    text = corpus.read_bytes()[:50_000]
    r = _upload(client, team_a, "corpus.txt", text)
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["sha256"] == hashlib.sha256(text).hexdigest() and up["size"] == len(text)
    assert up["format"] == "txt" and up["id"].startswith("upl_")
    stored = Path(settings.upload_root) / up["sha256"][:2] / f"{up['sha256']}.txt"
    assert stored.read_bytes() == text
    again = _upload(client, team_a, "same.txt", text)
    assert again.status_code == 200 and again.json()["id"] == up["id"]
    assert client.get(f"/v1/uploads/{up['id']}", headers=team_a.headers).json() == up
    assert client.get(f"/v1/uploads/{up['id']}", headers=team_b.headers).status_code == 404

    spec = _mutate(tiny_spec(corpus), "dataset", {"source": "upload", "upload_id": up["id"]})
    assert client.post("/v1/jobs", json={"spec": spec}, headers=team_a.headers).status_code == 201
    # Another team cannot train on it.
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team_b.headers)
    assert r.status_code == 422 and _err(r)["param"] == "spec.dataset.upload_id"

    jsonl = b'{"text": "a"}\n{"text": "b"}\n'
    r = _upload(client, team_a, "c.jsonl", jsonl)
    assert r.status_code == 201 and r.json()["format"] == "jsonl"
    r = _upload(client, team_a, "c.data", b'{"text": "x"}\n', format="jsonl")
    assert r.status_code == 201 and r.json()["format"] == "jsonl"


def test_parquet_upload(client: TestClient, team_a: TeamKey) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", "two"]}), buf)
    r = _upload(client, team_a, "c.parquet", buf.getvalue())
    assert r.status_code == 201 and r.json()["format"] == "parquet"
    r = _upload(client, team_a, "bad.parquet", b"PAR1 not really")
    assert r.status_code == 422 and _err(r)["code"] == "invalid_upload"


@pytest.mark.parametrize(
    ("name", "content", "status", "param", "needle"),
    [
        ("bin.txt", b"\xff\xfe\x00\x01 not utf-8", 422, "file", "UTF-8"),
        ("c.jsonl", b'{"text": "a"}\n[1, 2]\n', 422, "file", "line 2"),
        ("c.jsonl", b'{"text": "a"}\n{oops\n', 422, "file", "line 2"),
        ("empty.txt", b"", 422, "file", "empty"),
        ("c.csv", b"a,b\n", 422, "format", "format"),
        ("big.txt", b"a" * 250_000, 413, "file", "limit"),
    ],
    ids=["not-utf8", "jsonl-array", "jsonl-broken", "empty", "unknown-format", "too-large"],
)
def test_bad_uploads(
    client: TestClient, team_a: TeamKey, settings: Settings, name, content, status, param, needle
) -> None:
    r = _upload(client, team_a, name, content)
    assert r.status_code == status, r.text
    err = _err(r)
    assert err["param"] == param and needle in err["message"]
    leftovers = list((Path(settings.upload_root) / ".tmp").glob("upload-*"))
    assert leftovers == []


def test_upload_needs_multipart(client: TestClient, team_a: TeamKey) -> None:
    r = client.post(
        "/v1/uploads", content=b"hello", headers={**team_a.headers, "Content-Type": "text/plain"}
    )
    assert r.status_code == 422 and _err(r)["param"] == "file"
