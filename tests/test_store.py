"""The artifact store (issue 17, part 1): one interface, a local folder and an S3 bucket.

The S3 API is a real server: moto in server mode on loopback, started here. Between the
service and moto sits `FaultProxy`, a TCP relay this module can cut ("the store is
unreachable"), either at once or when it sees a given request go by — so "the store went
away after a checkpoint's files were uploaded, before its manifest" is exact, not a race.

A real Celery worker (and its training processes) runs the jobs with the S3 settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from service import admin
from service.db import Database
from service.models import Checkpoint
from service.settings import Settings
from service.store import (
    LocalStore,
    S3Store,
    StoreConfigError,
    checkpoint_key,
    complete_steps,
    delete_checkpoint,
    fetch_checkpoint,
    make_store,
    store_problem,
    sync_for_resume,
    upload_checkpoint,
)
from sharp_core.errors import CheckpointError
from sharp_core.train.checkpoint import retained_steps, verify_manifest, write_checkpoint
from tests.conftest import ROOT, TeamKey, tiny_spec, wait_for
from tests.helpers import moto_server
from worker.child import job_dir, resolve_job_checkpoint

pytestmark = pytest.mark.service

BUCKET = "sharp-test"
PREFIX = "deploy/artifacts"
TIMEOUT = 240


# --------------------------------------------------------------------------- fixtures
class FaultProxy:
    """A TCP relay to the S3 server that this test can cut. `trip`: a regex over the bytes a
    client sends; the request it matches is dropped and the store goes down with it."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down = threading.Event()
        self.trip: re.Pattern[bytes] | None = None
        self.tripped: list[bytes] = []
        self.lock = threading.Lock()
        self.socks: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.down.set()
        with self.lock:
            for s in list(self.socks):
                _close(s)
            self.socks.clear()

    def restore(self) -> None:
        self.trip = None
        self.down.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self.lock:
                self.socks |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(65536):
                trip = self.trip
                if outbound and trip is not None and (m := trip.search(data)):
                    self.tripped.append(m.group(0))
                    self.cut()
                    return
                if self.down.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def close(self) -> None:
        _close(self.server)
        self.cut()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[str, int]]:
    with moto_server() as port:
        yield ("127.0.0.1", port)


@pytest.fixture(scope="module")
def proxy(moto: tuple[str, int]) -> Iterator[FaultProxy]:
    p = FaultProxy(moto)
    yield p
    p.close()


@pytest.fixture(scope="module")
def s3(moto: tuple[str, int]):  # noqa: ANN201 - a boto3 client straight to moto
    client = boto3.client("s3", endpoint_url=f"http://{moto[0]}:{moto[1]}")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def settings(settings: Settings, proxy: FaultProxy, s3) -> Settings:
    return settings.model_copy(
        update={
            "artifact_url": f"s3://{BUCKET}/{PREFIX}",
            "artifact_endpoint_url": proxy.url,
            "artifact_retry_s": 3.0,
        }
    )


@pytest.fixture(autouse=True)
def _store_up(proxy: FaultProxy) -> Iterator[None]:
    proxy.restore()
    yield
    proxy.restore()


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("s3store")


def _keys(s3, prefix: str) -> dict[str, int]:
    """Every object under our prefix + `prefix`, straight from the server: key → size."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/{prefix}"
    ):
        for o in page.get("Contents", []):
            out[o["Key"][len(PREFIX) + 1 :]] = o["Size"]
    return out


# --------------------------------------------------------------------------- the interface
@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path, proxy: FaultProxy, s3) -> Iterator:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    prefix = f"unit-{os.urandom(4).hex()}"
    yield S3Store(BUCKET, prefix, endpoint_url=proxy.url)


def _checkpoint(tmp: Path, step: int, payload: bytes = b"w" * 3000) -> tuple[Path, dict]:
    def files(d: Path) -> None:
        (d / "config.json").write_text('{"model_type": "gpt2"}')
        (d / "model.safetensors").write_bytes(payload)
        (d / "sub").mkdir()
        (d / "sub" / "a.txt").write_text("hello")

    return write_checkpoint(tmp, step, files, {"eval_loss": 2.0})


def test_objects_ranges_listing_and_delete(store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = bytes(range(256)) * 50
    src.write_bytes(data)
    store.put_file("t/j/a.bin", src)
    store.put_bytes("t/j/b.txt", b"hi")
    assert store.size("t/j/a.bin") == len(data) and store.exists("t/j/b.txt")
    assert store.size("t/j/missing") is None
    assert store.read_bytes("t/j/a.bin") == data
    assert b"".join(store.read("t/j/a.bin", 100, 17)) == data[100:117]  # a ranged read
    assert b"".join(store.read("t/j/a.bin", len(data) - 5)) == data[-5:]
    assert store.list("t") == [("t/j/a.bin", len(data)), ("t/j/b.txt", 2)]
    got = tmp_path / "out" / "a.bin"
    store.get_file("t/j/a.bin", got)
    assert got.read_bytes() == data
    assert store.key_of(store.location("t/j/a.bin")) == "t/j/a.bin"
    assert store.key_of("s3://elsewhere/x") is None
    store.delete(["t/j/a.bin"])
    assert store.list("t") == [("t/j/b.txt", 2)]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("t/j/a.bin")
    store.ping()


def test_checkpoint_is_listed_only_with_its_manifest(store, tmp_path: Path) -> None:
    local, manifest = _checkpoint(tmp_path / "run", 10)
    key = checkpoint_key("team", "job", 10)
    # files without their manifest: what an upload cut short leaves
    for name in manifest["files"]:
        store.put_file(f"{key}/{name}", local / name)
    assert complete_steps(store, "team/job") == []
    upload_checkpoint(store, key, local, manifest)
    assert complete_steps(store, "team/job") == [10]

    out = tmp_path / "elsewhere"
    out.mkdir()
    assert sync_for_resume(store, "team/job", out) == (10 if store.remote else None)
    if store.remote:  # downloaded, verified, in the trainer's layout
        got = json.loads((out / "step_000010" / "manifest.json").read_text())
        assert got["files"] == manifest["files"]
        assert (out / "step_000010" / "sub" / "a.txt").read_text() == "hello"

    store.put_bytes(f"{key}/model.safetensors", b"tampered")  # a corrupt object is refused
    with pytest.raises(CheckpointError, match="does not match"):
        fetch_checkpoint(store, key, tmp_path / "fetched" / "step_000010")
    assert not (tmp_path / "fetched" / "step_000010").exists()

    before = sum(size for _, size in store.list(key))
    assert delete_checkpoint(store, key) == before > 0
    assert complete_steps(store, "team/job") == []
    assert store.list(key) == []


def test_retention_keeps_the_newest_and_the_best() -> None:
    ckpts = [(10, {"eval_loss": 3.0}), (20, {"eval_loss": 1.0}), (30, {"eval_loss": 2.0})]
    ckpts += [(40, {"eval_loss": 2.5}), (50, {})]
    assert retained_steps(ckpts, 2) == {40, 50, 20}
    assert retained_steps(ckpts, 1) == {50, 20}
    assert retained_steps([(10, {"eval_loss": 1.0}), (20, {"eval_loss": 1.0})], 1) == {20}
    assert retained_steps([(10, {}), (20, {"eval_loss": float("nan")})], 1) == {20}


# --------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("update", "setting"),
    [
        ({"artifact_url": "ftp://bucket/x"}, "SHARP_ARTIFACT_URL"),
        ({"artifact_url": "s3://Bad_Bucket/x"}, "SHARP_ARTIFACT_URL"),
        (
            {"artifact_url": "s3://bucket/x", "artifact_endpoint_url": "minio:9000"},
            "SHARP_ARTIFACT_ENDPOINT_URL",
        ),
    ],
)
def test_bad_store_settings_name_the_setting(settings: Settings, update, setting) -> None:
    bad = settings.model_copy(update=update)
    with pytest.raises(StoreConfigError, match=setting):
        make_store(bad)
    problem = store_problem(bad)
    assert problem is not None and problem.startswith(setting) and "\n" not in problem


def _no_aws_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHARP_"))}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        ({"SHARP_ARTIFACT_URL": "http://not-s3/x"}, "SHARP_ARTIFACT_URL"),
        ({"SHARP_ARTIFACT_URL": "s3://bucket/x"}, "AWS_ACCESS_KEY_ID"),  # no credentials
    ],
)
@pytest.mark.parametrize("command", ["worker", "up"])
def test_worker_and_sharp_up_refuse_to_start(tmp_path: Path, extra, setting, command) -> None:
    env = {**_no_aws_env(tmp_path), **extra}
    argv = [sys.executable, "-m", "worker"]
    if command == "up":
        argv = [sys.executable, "-m", "ops.cli", "up", "--var-dir", str(tmp_path / "var")]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and setting in lines[0], lines
    assert not (tmp_path / "var").exists()  # sharp up started nothing


# --------------------------------------------------------------------------- readiness
def test_readyz_is_503_while_the_store_is_unreachable(
    client: TestClient, proxy: FaultProxy
) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["artifacts"] == "ok", r.text
    proxy.cut()
    r = client.get("/readyz")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error"]["code"] == "not_ready" and "artifacts" in body["error"]["message"]
    assert body["checks"]["artifacts"].startswith("error") and body["checks"]["redis"] == "ok"
    proxy.restore()
    assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- jobs end to end
def _wait_end(client: TestClient, team: TeamKey, job_id: str, worker: Path) -> dict:
    def ended() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    wait_for(ended, TIMEOUT, what=f"job {job_id} to end")
    job = ended()
    assert job is not None
    job["_log"] = worker.read_text(errors="replace")[-3000:]
    return job


def _rows(db: Database, job_id: str) -> dict[int, int]:
    """step → attempt of the job's checkpoint rows."""
    with db.session() as s:
        rows = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        return {c.step: c.attempt for c in rows}


@pytest.mark.slow
def test_job_on_s3_upload_train_retain_download(
    client: TestClient, worker: Path, team: TeamKey, corpus: Path, settings: Settings, s3, db
) -> None:
    h = team.headers
    up = client.post("/v1/uploads", files={"file": ("c.txt", corpus.read_bytes())}, headers=h)
    assert up.status_code == 201, up.text
    sha = up.json()["sha256"]
    assert _keys(s3, "uploads/")[f"uploads/{sha[:2]}/{sha}.txt"] == corpus.stat().st_size

    # An evaluation set from the bucket too: the worker fetches it as it fetches the corpus.
    val = client.post(
        "/v1/uploads", files={"file": ("v.txt", corpus.read_bytes()[:4000])}, headers=h
    )
    assert val.status_code == 201, val.text
    spec = tiny_spec(corpus, max_steps=30, keep_checkpoints=1)
    spec["dataset"] = {
        "source": "upload",
        "upload_id": up.json()["id"],
        "eval": {"val": {"source": "upload", "upload_id": val.json()["id"], "max_blocks": 8}},
    }
    r = client.post("/v1/jobs", json={"spec": spec}, headers=h)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = _wait_end(client, team, job_id, worker)
    assert job["status"] == "succeeded", job
    assert job["metrics"]["val_ppl"] == pytest.approx(math.exp(job["metrics"]["val_loss"]))

    # Retention: the newest checkpoint and the best by eval_loss, in the store and the list.
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["data"]
    steps = [c["step"] for c in listed]
    jk = f"{team.team_id}/{job_id}"
    store = make_store(settings)
    assert complete_steps(store, jk) == steps == sorted(_rows(db, job_id))
    best = min((c["metrics"].get("eval_loss", 1e9), -c["step"]) for c in listed)
    assert 30 in steps and set(steps) == {30, -best[1]}
    assert not [
        k
        for k in _keys(s3, jk)
        if "/step_" in k and k.split("/")[2] not in {f"step_{s:06d}" for s in steps}
    ]  # nothing left of the pruned ones

    # Downloads from the store: Range, ETag, If-None-Match, the archive.
    files = {f["name"]: f for f in listed[-1]["files"]}
    base = f"/v1/jobs/{job_id}/checkpoints/30/files"
    whole = client.get(f"{base}/model.safetensors", headers=h)
    assert whole.status_code == 200
    assert hashlib.sha256(whole.content).hexdigest() == files["model.safetensors"]["sha256"]
    etag = whole.headers["etag"]
    assert etag == f'"{files["model.safetensors"]["sha256"]}"'
    part = client.get(f"{base}/model.safetensors", headers={**h, "Range": "bytes=10-41"})
    assert part.status_code == 206 and part.content == whole.content[10:42]
    assert part.headers["content-range"] == f"bytes 10-41/{len(whole.content)}"
    assert (
        client.get(f"{base}/config.json", headers={**h, "If-None-Match": etag}).status_code == 200
    )
    same = client.get(f"{base}/model.safetensors", headers={**h, "If-None-Match": etag})
    assert same.status_code == 304
    tar = client.get(f"/v1/jobs/{job_id}/checkpoints/30/archive", headers=h)
    assert tar.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as t:
        got = {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]
    for name, meta in files.items():
        if name.startswith("dcp/"):  # the sharded training state: only with ?state=true
            assert f"step_000030/{name}" not in got
            continue
        assert hashlib.sha256(got[f"step_000030/{name}"]).hexdigest() == meta["sha256"]
    assert "step_000030/manifest.json" in got

    # Presigned redirects (a setting): a 307 the client follows without our credentials.
    redirecting = settings.model_copy(update={"artifact_download": "redirect"})
    with TestClient(create_app(redirecting)) as c2:
        r = c2.get(f"{base}/model.safetensors", headers=h, follow_redirects=False)
        assert r.status_code == 307 and r.headers["etag"] == etag
        direct = httpx.get(r.headers["location"], timeout=30)
        assert direct.status_code == 200 and direct.content == whole.content
        assert (
            c2.get(f"{base}/model.safetensors", headers={**h, "If-None-Match": etag}).status_code
            == 304
        )

    # A later job naming this one as its teacher gets the newest checkpoint, fetched and
    # verified into the host's cache (what the worker's resolver does).
    teacher = resolve_job_checkpoint(db, team.team_id, job_id, settings)
    assert teacher.name == "step_000030" and teacher.is_relative_to(Path(settings.artifact_root))
    assert verify_manifest(teacher)["files"] == {
        f["name"]: {"sha256": f["sha256"], "size": f["size"]} for f in listed[-1]["files"]
    }

    # The operator's view: this job's checkpoints, nothing freeable.
    with db.session() as s:
        usage = {u.job_id: u for u in admin.storage_usage(s, store)}
    assert usage[job_id].checkpoints == steps and usage[job_id].orphan_bytes == 0
    assert usage[job_id].bytes == sum(_keys(s3, jk).values())


@pytest.mark.slow
def test_unreachable_store_fails_the_job_and_a_retry_resumes_from_the_store(
    client: TestClient,
    worker: Path,
    team: TeamKey,
    corpus: Path,
    settings: Settings,
    proxy: FaultProxy,
    s3,
    db,
) -> None:
    h = team.headers
    r = client.post("/v1/jobs", json={"spec": tiny_spec(corpus, max_steps=30)}, headers=h)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    jk = f"{team.team_id}/{job_id}"
    # The store goes away when step 20's manifest is sent: its files are in, the commit is not.
    proxy.trip = re.compile(
        rb"PUT /[^ ]*" + re.escape(jk.encode()) + rb"/step_000020/manifest\.json"
    )
    job = _wait_end(client, team, job_id, worker)
    assert proxy.tripped, "the manifest upload never went by"
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "artifact_write_failed", job["error"]
    proxy.restore()

    # Half an upload is in the bucket, and nothing lists or serves it.
    in_bucket = _keys(s3, jk)
    assert any(k.startswith(f"{jk}/step_000020/") for k in in_bucket)
    assert f"{jk}/step_000020/manifest.json" not in in_bucket
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["data"]
    assert [c["step"] for c in listed] == [10]
    gone = client.get(f"/v1/jobs/{job_id}/checkpoints/20/files/config.json", headers=h)
    assert gone.status_code == 404
    with db.session() as s:
        usage = {u.job_id: u for u in admin.storage_usage(s, make_store(settings))}
    assert usage[job_id].orphan_bytes > 0  # what `sharp admin storage prune` would free

    # Another host: nothing local. The retry resumes from step 10, the last complete one.
    shutil.rmtree(job_dir(settings, team.team_id, job_id))
    r = client.post(f"/v1/jobs/{job_id}/retry", headers=h)
    assert r.status_code in (200, 202), r.text
    job = _wait_end(client, team, job_id, worker)
    assert job["status"] == "succeeded", job
    assert _rows(db, job_id) == {10: 1, 20: 2, 30: 2}  # 10 kept from attempt 1, not redone
    log = (job_dir(settings, team.team_id, job_id) / "logs" / "attempt_2.log").read_text()
    assert (
        "resuming from step_000020" not in log and "resuming from step_000010 in the store" in log
    )
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=h).json()["data"]
    assert [c["step"] for c in listed] == [10, 20, 30]
    assert f"{jk}/step_000020/manifest.json" in _keys(s3, jk)


def test_admin_prune_frees_half_uploads_and_old_checkpoints(
    client: TestClient, team: TeamKey, corpus: Path, settings: Settings, s3, db, tmp_path: Path
) -> None:
    """No training: checkpoints written by the library's writer and uploaded as the worker
    does, one of them half; then `prune_storage` (what ``sharp admin storage prune`` runs)."""
    from service.repositories import CheckpointRepository

    spec = {**tiny_spec(corpus), "resources": {"queue": "nobody-serves-this"}}  # never runs
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=team.headers).status_code == 202
    store = make_store(settings)
    for step, loss in ((10, 1.0), (20, 3.0), (30, 2.0), (40, 4.0)):
        local, manifest = _checkpoint(tmp_path / "run", step)
        manifest["metrics"] = {"eval_loss": loss}
        key = checkpoint_key(team.team_id, job_id, step)
        if step == 40:  # cut short: no manifest, no row
            store.put_file(f"{key}/model.safetensors", local / "model.safetensors")
            continue
        upload_checkpoint(store, key, local, manifest)
        with db.session() as s:
            CheckpointRepository(s).upsert(
                job_id=job_id,
                step=step,
                path=store.location(key),
                manifest=manifest,
                metrics=manifest["metrics"],
                attempt=1,
            )
    with db.session() as s:
        dry = admin.prune_storage(s, store, keep=1, dry_run=True)
        s.rollback()
    assert [st for j, st in dry.deleted if j == job_id] == [20]
    assert f"{team.team_id}/{job_id}/step_000040" in dry.orphans
    assert complete_steps(store, f"{team.team_id}/{job_id}") == [10, 20, 30]  # dry: untouched

    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "admin", "storage", "prune", "--keep", "1"],
        env={**os.environ, **_settings_env(settings)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"checkpoint {job_id} step 20" in done.stdout and "freed" in done.stdout
    assert complete_steps(store, f"{team.team_id}/{job_id}") == [10, 30]  # best 10, newest 30
    assert not [k for k in _keys(s3, f"{team.team_id}/{job_id}") if "step_000040" in k]
    assert sorted(_rows(db, job_id)) == [10, 30]
    usage = subprocess.run(
        [sys.executable, "-m", "ops.cli", "admin", "storage", "usage"],
        env={**os.environ, **_settings_env(settings), "COLUMNS": "200"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert usage.returncode == 0, usage.stderr
    assert f"s3://{BUCKET}/{PREFIX}" in usage.stdout and job_id in usage.stdout


def _settings_env(settings: Settings) -> dict[str, str]:
    from service.settings import settings_env

    return settings_env(settings)


def test_teacher_cache_lives_in_the_bucket(settings: Settings, s3, tmp_path: Path) -> None:
    """With an S3 store, a team's teacher cache goes to the bucket (shards first, manifest
    last) and another host's scratch folder reads it back byte for byte."""
    from service.teacher_caches import ObjectCacheStore, store_for

    local = settings.model_copy(update={"artifact_root": tmp_path / "host-a"})
    cstore = store_for(local, "team_x")
    assert isinstance(cstore, ObjectCacheStore)
    key = "a" * 64
    staged = cstore.staging(key)
    (staged / "shard_00000.safetensors").write_bytes(b"s" * 5000)
    manifest = f'{{"key": "{key}"}}'
    (staged / "manifest.json").write_text(manifest)
    cstore.put(key, staged)
    objects = _keys(s3, f"teacher-caches/team_x/{key}/")
    assert objects == {
        f"teacher-caches/team_x/{key}/shard_00000.safetensors": 5000,
        f"teacher-caches/team_x/{key}/manifest.json": len(manifest),
    }
    other = store_for(settings.model_copy(update={"artifact_root": tmp_path / "host-b"}), "team_x")
    path = other.get(key)
    assert path.is_relative_to(tmp_path / "host-b")
    assert (path / "shard_00000.safetensors").read_bytes() == b"s" * 5000
    assert other.list() == [key] and store_for(local, "team_y").list() == []
    other.discard(key)
    assert _keys(s3, f"teacher-caches/team_x/{key}/") == {}


def test_upload_session_is_an_s3_multipart_upload(
    client: TestClient, settings: Settings, team: TeamKey, s3
) -> None:
    """An upload session on the S3 store (issue 23): one S3 part per session part, resumed by
    a new client, a wrong sha256 refused with the assembled object kept, then a server-side
    copy to the content address; abort leaves no multipart upload behind."""
    part = 5 * 1024 * 1024  # S3's smallest part
    line = b"the quick brown fox jumps over the lazy dog\n"
    data = line * (2 * part // len(line) + 30_000)  # parts of 5, 5 and ~1.3 MiB
    sha = hashlib.sha256(data).hexdigest()
    h = team.headers
    body = {"filename": "big.txt", "size": len(data), "sha256": sha, "part_size": part}
    small = client.post("/v1/uploads/sessions", json={**body, "part_size": part - 1}, headers=h)
    assert (small.status_code, small.json()["error"]["param"]) == (422, "part_size")
    r = client.post("/v1/uploads/sessions", json=body, headers=h)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    key = f"{PREFIX}/uploads/.sessions/{sid}"

    def put(c: TestClient, offset: int) -> httpx.Response:
        return c.put(
            f"/v1/uploads/sessions/{sid}/parts",
            params={"offset": offset},
            content=data[offset : offset + part],
            headers={**h, "Content-Type": "application/octet-stream"},
        )

    (mpu,) = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key)["Uploads"]
    assert put(client, 0).json()["offset"] == part
    assert put(client, 0).json()["offset"] == part  # sent again: harmless
    ahead = put(client, 2 * part)
    assert (ahead.status_code, ahead.json()["error"]["code"]) == (409, "offset_mismatch")
    parts = s3.list_parts(Bucket=BUCKET, Key=key, UploadId=mpu["UploadId"])["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, part)]

    with TestClient(create_app(settings)) as fresh:  # a client that restarted
        again = fresh.post("/v1/uploads/sessions", json=body, headers=h).json()
        assert (again["id"], again["offset"]) == (sid, part)
        offset = part
        while offset < len(data):
            offset = put(fresh, offset).json()["offset"]
        bad = fresh.post(
            f"/v1/uploads/sessions/{sid}/complete", json={"sha256": "f" * 64}, headers=h
        )
        assert (bad.status_code, bad.json()["error"]["param"]) == (422, "sha256")
        assert _keys(s3, f"uploads/.sessions/{sid}") == {f"uploads/.sessions/{sid}": len(data)}
        done = fresh.post(f"/v1/uploads/sessions/{sid}/complete", headers=h)
        assert done.status_code == 200, done.text
        assert done.json()["upload"]["sha256"] == sha
    objects = _keys(s3, "uploads/")
    assert objects[f"uploads/{sha[:2]}/{sha}.txt"] == len(data)
    assert not [k for k in objects if k.startswith("uploads/.sessions/")]
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key)

    other = data[: part + 10]
    s2 = client.post(
        "/v1/uploads/sessions",
        json={**body, "size": len(other), "sha256": hashlib.sha256(other).hexdigest()},
        headers=h,
    ).json()
    assert s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/uploads/.sessions/")[
        "Uploads"
    ]
    aborted = client.delete(f"/v1/uploads/sessions/{s2['id']}", headers=h)
    assert aborted.json()["status"] == "aborted"
    assert "Uploads" not in s3.list_multipart_uploads(
        Bucket=BUCKET, Prefix=f"{PREFIX}/uploads/.sessions/"
    )
