"""Hostile input (issue 4, item 8) against the real app on real Postgres and Redis.

Every per-job and per-upload route is taken from the app's own OpenAPI document, so a route
added later is covered by the 401/404 sweeps without anyone remembering to list it here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from api.app import create_app
from service.admin import create_key, revoke_key
from service.db import Database
from service.models import Job
from service.repositories import CheckpointRepository
from service.settings import Settings
from sharp_core.train.checkpoint import write_checkpoint
from tests.conftest import TeamKey, tiny_spec

pytestmark = pytest.mark.service

LIMIT = 64 * 1024  # max_request_bytes for this module: small, so "over the limit" is cheap


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "max_request_bytes": LIMIT,
            # the owner's webhook points at loopback (nothing is ever delivered to it)
            "webhook_secret_keys": [Fernet.generate_key().decode()],
            "webhook_allow_http": True,
            "webhook_allow_private": True,
        }
    )


@pytest.fixture(scope="module")
def app(settings: Settings):
    return create_app(settings)


@pytest.fixture(scope="module")
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def owner(make_team) -> TeamKey:
    return make_team("owner")


@pytest.fixture(scope="module")
def intruder(make_team) -> TeamKey:
    return make_team("intruder")


TEACHER_DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def owned(
    client: TestClient, owner: TeamKey, corpus: Path, settings: Settings, db: Database
) -> dict[str, str]:
    """One job with a checkpoint, one upload, one webhook and one sweep (its cell in a pool no
    worker serves), belonging to `owner`; plus a secret file beside the checkpoint folder
    that a traversal would reach."""
    job = client.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=owner.headers)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    out = Path(settings.artifact_root) / owner.team_id / job_id

    def files(tmp: Path) -> None:
        (tmp / "config.json").write_text('{"model_type": "gpt2"}')

    path, manifest = write_checkpoint(out, 10, files, {})
    with db.session() as s:
        CheckpointRepository(s).upsert(
            job_id=job_id, step=10, path=str(path), manifest=manifest, metrics={}, attempt=1
        )
        # the teacher the training process would record: the owner's leaderboard exists
        s.get(Job, job_id).teacher_digest = TEACHER_DIGEST
    (out / "secret.txt").write_text("TOP SECRET")
    (Path(settings.artifact_root) / "secret.txt").write_text("TOP SECRET")
    up = client.post(
        "/v1/uploads",
        files={"file": ("c.txt", b"some text for training\n")},
        headers=owner.headers,
    )
    assert up.status_code == 201, up.text
    hook = client.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=owner.headers
    )
    assert hook.status_code == 201, hook.text
    sweep = client.post(
        "/v1/sweeps",
        json={"base": {**tiny_spec(corpus), "resources": {"queue": "nowhere"}}},
        headers=owner.headers,
    )
    assert sweep.status_code == 201, sweep.text
    # an upload session, completed: every session route answers its owner (parts and complete
    # are acknowledged again, DELETE leaves the upload it became)
    data = b"more text for training\n"
    ups = client.post(
        "/v1/uploads/sessions",
        json={"filename": "s.txt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        headers=owner.headers,
    ).json()
    client.put(
        f"/v1/uploads/sessions/{ups['id']}/parts?offset=0", content=data, headers=owner.headers
    )
    done = client.post(f"/v1/uploads/sessions/{ups['id']}/complete", headers=owner.headers)
    assert done.status_code == 200, done.text
    return {
        "session_id": ups["id"],
        "sweep_id": sweep.json()["id"],
        "job_id": job_id,
        "step": "10",
        "name": "config.json",
        "upload_id": up.json()["id"],
        "webhook_id": hook.json()["id"],
        "digest": TEACHER_DIGEST,
    }


def _err(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}, body
    return body["error"]


def _operations(app) -> list[tuple[str, str]]:
    """(METHOD, path template) of every /v1 operation in the OpenAPI document."""
    out = []
    for path, item in app.openapi()["paths"].items():
        if path.startswith("/v1/"):
            out += [
                (m.upper(), path) for m in item if m in ("get", "post", "put", "patch", "delete")
            ]
    assert len(out) >= 12, out
    return out


def _fill(template: str, values: dict[str, str]) -> str:
    url = re.sub(r"\{(\w+)(?::path)?\}", lambda m: values[m.group(1)], template)
    if url.endswith("/parts"):  # an upload session's part names its offset
        return f"{url}?offset=0"
    # the event stream of a queued job would follow it for ever
    return f"{url}?follow=false" if url.endswith("/events") else url


# ------------------------------------------------------------------------------ bodies
def test_declared_oversize_body_is_413(client: TestClient, owner: TeamKey) -> None:
    r = client.post(
        "/v1/jobs",
        content=b"{" + b" " * LIMIT + b"}",
        headers={**owner.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and _err(r)["code"] == "payload_too_large"


def test_chunked_oversize_body_is_413(client: TestClient, owner: TeamKey) -> None:
    """No Content-Length (chunked transfer): still refused."""

    def body() -> Iterator[bytes]:
        yield b'{"spec": {"name": "'
        for _ in range(4 * LIMIT // 1024):
            yield b"x" * 1024
        yield b'"}}'

    r = client.post(
        "/v1/jobs",
        content=body(),
        headers={**owner.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert _err(r)["param"] == "body"


def test_chunked_oversize_body_is_refused_before_it_is_read_whole(app, owner: TeamKey) -> None:
    """At the ASGI boundary: count how much of a 100-chunk body the app pulls in."""
    chunk = b"x" * (LIMIT // 8)
    total_chunks = 100
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < total_chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
            (b"authorization", f"Bearer {owner.key}".encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "app": app,
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert pulled <= LIMIT // len(chunk) + 1, f"read {pulled} of {total_chunks} chunks"


def test_body_just_under_the_limit_still_works_chunked(
    client: TestClient, owner: TeamKey, corpus: Path
) -> None:
    raw = json.dumps({"spec": tiny_spec(corpus, name="chunked-ok")}).encode()
    r = client.post(
        "/v1/jobs",
        content=iter([raw[:10], raw[10:]]),
        headers={**owner.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "chunked-ok"


def test_binary_where_json_or_text_is_expected(client: TestClient, owner: TeamKey) -> None:
    blob = os.urandom(2048)
    r = client.post(
        "/v1/jobs", content=blob, headers={**owner.headers, "Content-Type": "application/json"}
    )
    assert r.status_code in (400, 422), r.text
    assert _err(r)["param"] == "body"
    r = client.post(
        "/v1/uploads", files={"file": ("corpus.txt", b"\x00\x81\xfe" + blob)}, headers=owner.headers
    )
    assert r.status_code == 422, r.text
    err = _err(r)
    assert err["code"] == "invalid_upload" and err["param"] == "file" and "UTF-8" in err["message"]


# ------------------------------------------------------------------------------ paths
@pytest.mark.parametrize(
    "name",
    [
        "../secret.txt",
        "../../secret.txt",
        "..%2Fsecret.txt",
        "%2E%2E%2Fsecret.txt",
        "%252E%252E%252Fsecret.txt",
        "..%5Csecret.txt",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "config.json%00.txt",
        "nested/../../secret.txt",
        "manifest.json",
    ],
)
def test_path_traversal_in_file_names_is_404(
    client: TestClient, owner: TeamKey, owned: dict, name: str
) -> None:
    url = f"/v1/jobs/{owned['job_id']}/checkpoints/10/files/{name}"
    r = client.get(url, headers=owner.headers)
    assert r.status_code == 404, (name, r.status_code, r.text[:200])
    assert b"TOP SECRET" not in r.content and b"root:" not in r.content
    # the real file is served, so the 404s above are not "everything is 404"
    ok = client.get(
        f"/v1/jobs/{owned['job_id']}/checkpoints/10/files/config.json", headers=owner.headers
    )
    assert ok.status_code == 200 and ok.content == b'{"model_type": "gpt2"}'


@pytest.mark.parametrize(
    ("url", "param"),
    [
        ("/v1/jobs?limit=1000000000", "limit"),
        ("/v1/jobs?limit=99999999999999999999999999999", "limit"),
        ("/v1/jobs?limit=-1", "limit"),
        ("/v1/jobs?limit=0", "limit"),
        ("/v1/jobs/{job_id}/metrics?limit=1000000000", "limit"),
        ("/v1/jobs/{job_id}/metrics?after=99999999999999999999999999", "after"),
        ("/v1/jobs?after=%27%3B%20DROP%20TABLE%20jobs%3B--", "after"),
    ],
)
def test_huge_or_bad_query_values_are_rejected_not_500(
    client: TestClient, owner: TeamKey, owned: dict, url: str, param: str
) -> None:
    r = client.get(url.format(**owned), headers=owner.headers)
    assert r.status_code in (400, 422), (url, r.status_code, r.text)
    assert _err(r)["param"] == param


# ------------------------------------------------------------------------------ auth
def test_every_route_needs_a_valid_unrevoked_key(
    app, client: TestClient, owned: dict, make_team, db: Database
) -> None:
    revoked = make_team("revoked")
    with db.session() as s:
        revoke_key(s, revoked.prefix)
    for method, template in _operations(app):
        url = _fill(template, owned)
        for headers in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Basic dXNlcjpwYXNz"},
            {"Authorization": "Bearer sharp_" + "A" * 40},
            {"Authorization": "Bearer a b"},
            {"Authorization": "Bearer ' OR '1'='1"},
            revoked.headers,
        ):
            r = client.request(method, url, headers=headers)
            assert r.status_code == 401, (method, url, headers, r.status_code)
            assert _err(r)["code"] == "unauthorized"


def test_another_teams_ids_are_404_on_every_route(
    app, client: TestClient, owned: dict, owner: TeamKey, intruder: TeamKey, db: Database
) -> None:
    # the intruder has a second valid key too: keys are per team, not per key
    with db.session() as s:
        second = create_key(s, intruder.name).key
    checked = 0
    # DELETEs last: the owner's own DELETE succeeds, and the thing is gone afterwards
    for method, template in sorted(_operations(app), key=lambda op: op[0] == "DELETE"):
        if "{" not in template:
            continue
        url = _fill(template, owned)
        for headers in (intruder.headers, {"Authorization": f"Bearer {second}"}):
            r = client.request(method, url, headers=headers)
            assert r.status_code == 404, (method, url, r.status_code, r.text[:200])
            assert _err(r)["code"] == "not_found"
            checked += 1
        # ...and the owner is not refused on the same URL (so 404 is not the default)
        assert client.request(method, url, headers=owner.headers).status_code < 400, (method, url)
    assert checked >= 2 * 8
    listed = client.get("/v1/jobs", headers=intruder.headers).json()["data"]
    assert owned["job_id"] not in {j["id"] for j in listed}


# ------------------------------------------------------------------------------ strings
NASTY = [
    "Robert'); DROP TABLE jobs;--",
    '" OR ""="',
    "' OR 1=1 --",
    "\\'; SELECT pg_sleep(10); --",
    "%s %(x)s {0} {{}} $1 :name",
    "ünïcødé 🚀 \u202e RTL",
    "<script>alert(1)</script>",
]


@pytest.mark.parametrize("text", NASTY)
def test_quotes_and_sql_are_stored_and_returned_verbatim(
    client: TestClient, owner: TeamKey, corpus: Path, text: str
) -> None:
    spec = tiny_spec(corpus, name=text)
    r = client.post(
        "/v1/jobs",
        json={"spec": spec},
        headers={**owner.headers, "Idempotency-Key": hashlib.sha256(text.encode()).hexdigest()},
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["name"] == text and job["spec"]["name"] == text
    again = client.get(f"/v1/jobs/{job['id']}", headers=owner.headers).json()
    assert again["name"] == text and again["spec"]["name"] == text
    page = client.get("/v1/jobs", params={"limit": 5}, headers=owner.headers).json()["data"]
    assert text in [j["name"] for j in page]
    # an idempotency key made of the same characters (headers are ASCII) works too
    if text.isascii():
        keyed = {**owner.headers, "Idempotency-Key": text}
        r = client.post("/v1/jobs", json={"spec": spec}, headers=keyed)
        assert r.status_code == 201, r.text
        replay = client.post("/v1/jobs", json={"spec": spec}, headers=keyed)
        assert replay.status_code == 200 and replay.json()["id"] == r.json()["id"]
