"""Resumable upload sessions (issue 23): parts by offset into the local store, a client that
restarts and resumes from the server's offset, a part out of order, a part cut off by a
dropped connection, a wrong sha256 at the end; through the API (Postgres) and the CLI. The
S3 multipart path is in tests/test_store.py, beside its S3 server."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.db import Database
from service.models import UploadSession
from service.settings import Settings
from tests.conftest import ROOT, TeamKey, wait_for

pytestmark = pytest.mark.service

PART = 4096


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"upload_min_part_bytes": 1024, "upload_part_bytes": PART})


def _jsonl(n: int, tag: str) -> bytes:
    return b"".join(
        json.dumps({"text": f"{tag} row {i}: the quick brown fox"}).encode() + b"\n"
        for i in range(n)
    )


def _put(c: TestClient | httpx.Client, h: dict, sid: str, data: bytes, offset: int):  # noqa: ANN202
    return c.put(
        f"/v1/uploads/sessions/{sid}/parts",
        params={"offset": offset},
        content=data[offset : offset + PART],
        headers={**h, "Content-Type": "application/octet-stream"},
    )


def test_parts_restart_out_of_order_bad_digest_then_an_upload(
    settings: Settings, make_team, db: Database
) -> None:
    team, other = make_team("resume"), make_team("nosy")
    h = team.headers
    data = _jsonl(300, "a")  # ~14 kB: 4 parts, the last one short
    sha = hashlib.sha256(data).hexdigest()
    body = {"filename": "big.jsonl", "size": len(data), "sha256": sha}

    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/uploads/sessions", json=body, headers=h)
        assert r.status_code == 201, r.text
        s = r.json()
        sid = s["id"]
        assert (s["status"], s["offset"], s["part_size"], s["format"]) == ("open", 0, PART, "jsonl")
        assert _put(c, h, sid, data, 0).json()["offset"] == PART
        again = _put(c, h, sid, data, 0)  # the same part again: acknowledged, nothing moves
        assert again.status_code == 200 and again.json()["offset"] == PART
        ahead = _put(c, h, sid, data, 2 * PART)  # skips part 2
        assert ahead.status_code == 409
        assert ahead.json()["error"]["code"] == "offset_mismatch"
        assert ahead.json()["error"]["param"] == "offset"
        assert f"offset {PART}" in ahead.json()["error"]["message"]
        odd = c.put(f"/v1/uploads/sessions/{sid}/parts?offset=100", content=b"x", headers=h)
        assert (odd.status_code, odd.json()["error"]["param"]) == (422, "offset")
        short = c.put(
            f"/v1/uploads/sessions/{sid}/parts?offset={PART}", content=data[PART:5000], headers=h
        )
        assert (short.status_code, short.json()["error"]["param"]) == (422, "Content-Length")
        early = c.post(f"/v1/uploads/sessions/{sid}/complete", headers=h)
        assert (early.status_code, early.json()["error"]["code"]) == (409, "upload_incomplete")
        assert c.get(f"/v1/uploads/sessions/{sid}", headers=other.headers).status_code == 404

    # A new client (the old one crashed) asks for the same file: the same session, resumed
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/uploads/sessions", json=body, headers=h)
        assert r.status_code == 200 and r.json()["id"] == sid
        offset = r.json()["offset"]
        assert offset == PART
        while offset < len(data):
            r = _put(c, h, sid, data, offset)
            assert r.status_code == 200, r.text
            offset = r.json()["offset"]
        assert offset == len(data)

        wrong = "0" * 64
        bad = c.post(f"/v1/uploads/sessions/{sid}/complete", json={"sha256": wrong}, headers=h)
        assert bad.status_code == 422
        assert (bad.json()["error"]["code"], bad.json()["error"]["param"]) == (
            "sha256_mismatch",
            "sha256",
        )
        assert sha in bad.json()["error"]["message"]
        kept = c.get(f"/v1/uploads/sessions/{sid}", headers=h).json()
        assert (kept["status"], kept["offset"], kept["sha256"]) == ("open", len(data), sha)

        done = c.post(f"/v1/uploads/sessions/{sid}/complete", headers=h)
        assert done.status_code == 200, done.text
        upload = done.json()["upload"]
        assert done.json()["status"] == "completed"
        assert (upload["sha256"], upload["size"], upload["format"]) == (sha, len(data), "jsonl")
        assert c.get(f"/v1/uploads/{upload['id']}", headers=h).json() == upload
        twice = c.post(f"/v1/uploads/sessions/{sid}/complete", headers=h)
        assert twice.json()["upload"]["id"] == upload["id"]  # idempotent
        late = _put(c, h, sid, data, len(data) - len(data) % PART)  # a retried last part
        assert (late.status_code, late.json()["status"]) == (200, "completed")
        kept = c.delete(f"/v1/uploads/sessions/{sid}", headers=h)  # nothing to abort now
        assert (kept.status_code, kept.json()["status"]) == (200, "completed")
        assert c.get(f"/v1/uploads/{upload['id']}", headers=h).status_code == 200
        known = c.post("/v1/uploads/sessions", json=body, headers=h)  # nothing left to send
        assert known.status_code == 200 and known.json()["upload"]["id"] == upload["id"]

    # What a job reads for dataset.source: upload is these bytes, at their content address
    from sharp_core.models.loading import Resolver
    from worker.child import make_resolver

    path = make_resolver(Resolver, db, team.team_id, settings).upload_path(upload["id"])
    assert path.read_bytes() == data
    assert path == Path(settings.upload_root) / sha[:2] / f"{sha}.jsonl"
    assert not list((Path(settings.upload_root) / ".sessions").glob(f"{sid}*"))


def test_abort_expiry_and_bad_content(settings: Settings, make_team, db: Database) -> None:
    team = make_team("abort")
    h = team.headers
    staging = Path(settings.upload_root) / ".sessions"
    with TestClient(create_app(settings)) as c:
        data = _jsonl(200, "b")
        body = {
            "filename": "b.jsonl",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        sid = c.post("/v1/uploads/sessions", json=body, headers=h).json()["id"]
        assert _put(c, h, sid, data, 0).status_code == 200
        assert (staging / f"{sid}.part").is_file()
        gone = c.delete(f"/v1/uploads/sessions/{sid}", headers=h)
        assert gone.status_code == 200 and gone.json()["status"] == "aborted"
        assert not (staging / f"{sid}.part").exists()
        late = _put(c, h, sid, data, PART)
        assert (late.status_code, late.json()["error"]["code"]) == (410, "gone")

        # An expired session reads as such; its bytes go when the team next opens one
        data2 = _jsonl(100, "c")
        body2 = {
            "filename": "c.txt",
            "size": len(data2),
            "sha256": hashlib.sha256(data2).hexdigest(),
        }
        sid2 = c.post("/v1/uploads/sessions", json=body2, headers=h).json()["id"]
        assert _put(c, h, sid2, data2, 0).status_code == 200
        with db.session() as s:
            row = s.get(UploadSession, sid2)
            assert row is not None
            row.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        assert c.get(f"/v1/uploads/sessions/{sid2}", headers=h).json()["status"] == "expired"
        assert _put(c, h, sid2, data2, PART).status_code == 410
        assert c.post("/v1/uploads/sessions", json=body, headers=h).status_code == 201
        assert not (staging / f"{sid2}.part").exists()

        # Bytes that are not what the format says: a 422 on the file, the session kept
        bad = b"not json at all\n" * 10
        body3 = {"filename": "x.jsonl", "size": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}
        sid3 = c.post("/v1/uploads/sessions", json=body3, headers=h).json()["id"]
        assert _put(c, h, sid3, bad, 0).status_code == 200
        r = c.post(f"/v1/uploads/sessions/{sid3}/complete", headers=h)
        assert (r.status_code, r.json()["error"]["param"]) == (422, "file")
        assert "line 1 is not JSON" in r.json()["error"]["message"]
        assert c.get(f"/v1/uploads/sessions/{sid3}", headers=h).json()["status"] == "open"
        too_big = {**body3, "size": settings.max_upload_session_bytes + 1}
        r = c.post("/v1/uploads/sessions", json=too_big, headers=h)
        assert (r.status_code, r.json()["error"]["param"]) == (413, "size")
        r = c.post("/v1/uploads/sessions", json={**body3, "sha256": "z" * 64}, headers=h)
        assert (r.status_code, r.json()["error"]["param"]) == (422, "sha256")


def _cut_part(base: str, key: str, sid: str, offset: int, half: bytes) -> None:
    """Send a part's headers and half its bytes over a raw socket, then hang up."""
    u = urlparse(base)
    with socket.create_connection((u.hostname, u.port)) as sock:
        head = (
            f"PUT /v1/uploads/sessions/{sid}/parts?offset={offset} HTTP/1.1\r\n"
            f"Host: {u.hostname}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {PART}\r\n\r\n"
        )
        sock.sendall(head.encode() + half)


def test_cli_resumes_a_session_after_a_cut_connection(
    live_server: str, make_team, tmp_path: Path
) -> None:
    team: TeamKey = make_team("cli")
    data = _jsonl(400, "d")
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=live_server, headers=team.headers) as c:
        s = c.post(
            "/v1/uploads/sessions", json={"filename": path.name, "size": len(data), "sha256": sha}
        ).json()
        assert _put(c, {}, s["id"], data, 0).json()["offset"] == PART
        _cut_part(live_server, team.key, s["id"], PART, data[PART : PART + PART // 2])

        def settled() -> bool:
            return c.get(f"/v1/uploads/sessions/{s['id']}").json()["offset"] == PART

        wait_for(settled, 10, what="the cut part left the offset alone")

    env = {
        **os.environ,
        "SHARP_URL": live_server,
        "SHARP_API_KEY": team.key,
        "SHARP_CONFIG": str(tmp_path / "no-profile.toml"),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "uploads", "put", str(path), "--chunked-above", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"resuming session {s['id']} at byte {PART:,}" in done.stderr
    upload_id = done.stdout.strip()
    got = httpx.get(f"{live_server}/v1/uploads/{upload_id}", headers=team.headers).json()
    assert (got["sha256"], got["size"]) == (sha, len(data))

    # below the threshold (default 256 MiB): one request, POST /v1/uploads
    small = tmp_path / "small.txt"
    small.write_text("a small corpus\n")
    one = subprocess.run(
        [sys.executable, "-m", "ops.cli", "uploads", "put", str(small)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert "session" not in one.stderr and one.stdout.strip().startswith("upl_")
