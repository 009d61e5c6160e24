"""A full or read-only artifact store in the middle of a job (issue 4, item 6).

The store is a small tmpfs mounted for this module, so "full" is a real ENOSPC, and
"unwritable" is the job's folder bound read-only onto itself, a real EROFS — both need root
with CAP_SYS_ADMIN, as CI has. Without them the read-only case falls back to ``chmod`` (which a non-root user
cannot bypass) and the full case is skipped.

Training is paused (SIGSTOP) while the store is broken, so the failure always lands on the
*next* checkpoint whatever the machine's speed. Meanwhile a reader keeps listing and
downloading checkpoints and checks every byte it is served against the manifest: a
half-written checkpoint must never be listed, let alone served.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.db import Database
from service.models import Checkpoint
from service.settings import Settings
from sharp_core.train.checkpoint import verify_manifest
from tests.conftest import TeamKey, tiny_spec, wait_for
from tests.test_reliability import training_pids
from worker.child import job_dir

pytestmark = [pytest.mark.service, pytest.mark.slow]

TIMEOUT = 240


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bool]]:
    """(artifact root, whether it is a tmpfs we may fill and remount)."""
    root = tmp_path_factory.mktemp("store") / "artifacts"
    root.mkdir()
    mounted = _mount_tmpfs(root, "24m")
    try:
        yield root, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


@pytest.fixture(scope="module")
def settings(settings: Settings, store: tuple[Path, bool]) -> Settings:
    return settings.model_copy(update={"artifact_root": store[0]})


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("artifacts")


@pytest.fixture(scope="module")
def api(live_server: str, worker: Path) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


def _fill(root: Path) -> Path:
    """Write a ballast file until the file system says ENOSPC."""
    ballast = root / "ballast.bin"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return ballast


class Reader(threading.Thread):
    """Lists checkpoints and downloads every listed file, over and over, checking sha256."""

    def __init__(self, base: str, team: TeamKey, job_id: str):
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=base, headers=team.headers, timeout=30)
        self.job_id = job_id
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.served = 0

    def run(self) -> None:
        base = f"/v1/jobs/{self.job_id}/checkpoints"
        while not self.stop.is_set():
            try:
                listed = self.http.get(base).json()["data"]
                for ck in listed:
                    for f in ck["files"]:
                        r = self.http.get(f"{base}/{ck['step']}/files/{f['name']}")
                        if r.status_code != 200:
                            self.problems.append(f"{ck['step']}/{f['name']}: {r.status_code}")
                        elif hashlib.sha256(r.content).hexdigest() != f["sha256"]:
                            self.problems.append(f"{ck['step']}/{f['name']}: sha256 mismatch")
                        else:
                            self.served += 1
            except httpx.HTTPError as e:
                self.problems.append(f"http error {e!r}")
            self.stop.wait(0.05)
        self.http.close()


def _checkpoint_steps(db: Database, job_id: str) -> list[int]:
    with db.session() as s:
        return sorted(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))


@pytest.mark.parametrize("breakage", ["full", "read-only"])
def test_artifact_store_failure_fails_the_job_and_keeps_the_last_checkpoint(
    api, live_server, team, corpus, settings, db, store, breakage
) -> None:
    root, mounted = store
    if breakage == "full" and not mounted:
        pytest.skip("needs root to mount a small tmpfs")
    if breakage == "read-only" and not mounted and os.geteuid() == 0:
        pytest.skip("root ignores permissions and no tmpfs could be mounted")
    spec = tiny_spec(
        corpus, max_steps=400, name=breakage, log_every=5, eval_every=0, checkpoint_every=10
    )
    job_id = api.post("/v1/jobs", json={"spec": spec}, headers=team.headers).json()["id"]
    reader = Reader(live_server, team, job_id)
    reader.start()
    wait_for(lambda: _checkpoint_steps(db, job_id), TIMEOUT, interval=0.02, what="a checkpoint")
    pids = training_pids(job_id)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGSTOP)
    out = job_dir(settings, team.team_id, job_id)
    ballast = None
    try:
        good = _checkpoint_steps(db, job_id)
        if breakage == "full":
            ballast = _fill(root)
        elif mounted:
            # A read-only bind of the job's folder onto itself: the training process's open
            # log keeps the tmpfs itself from being remounted read-only.
            subprocess.run(["mount", "--bind", str(out), str(out)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(out)], check=True)
        else:
            out.chmod(0o555)
    finally:
        os.kill(pids[0], signal.SIGCONT)
    try:
        wait_for(
            lambda: (
                api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()["status"]
                in ("succeeded", "failed", "cancelled")
            ),
            TIMEOUT,
            what="the job to end",
        )
        job = api.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    finally:
        reader.stop.set()
        reader.join(30)
        if ballast is not None:
            ballast.unlink()
        elif mounted:
            subprocess.run(["umount", str(out)], check=True)
        else:
            out.chmod(0o755)

    assert job["status"] == "failed", job
    assert job["attempt"] == 1, job  # a broken store is not worth retrying by itself
    assert job["error"]["code"] == "artifact_write_failed", job
    assert reader.problems == [] and reader.served > 0, reader.problems[:5]

    listed = api.get(f"/v1/jobs/{job_id}/checkpoints", headers=team.headers).json()["data"]
    assert [c["step"] for c in listed] == good
    for ck in listed:
        folder = out / f"step_{ck['step']:06d}"
        manifest = verify_manifest(folder)  # the last good checkpoint is intact on disk
        assert {f["name"]: f["sha256"] for f in ck["files"]} == {
            n: m["sha256"] for n, m in manifest["files"].items()
        }
    on_disk = sorted(p.name for p in out.iterdir() if p.name.startswith(("step_", ".tmp-")))
    assert on_disk == [f"step_{s:06d}" for s in good], on_disk
