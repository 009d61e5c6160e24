"""The two ways the service is deployed: `docker-compose.yml` and the embedded ``sharp up``.

Compose: no Docker engine runs here, so the check is what Compose itself makes of the file
(``docker compose config``: interpolation, anchors, schema), plus the same assertions on the
raw YAML so the layout is still checked on a machine without the Compose plugin.

``sharp up``: started as a user would, with ``SHARP_DATABASE_URL`` and ``SHARP_REDIS_URL``
pointing at ports where nothing listens — if the embedded stack used the environment's
servers instead of its own SQLite file and Redis, nothing would work. A tiny job must succeed
through the printed key, and SIGTERM must leave no process behind.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import tiny_spec

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICES = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker"}
GPU = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


# -- docker-compose.yml ----------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    """`docker compose` (the plugin) or a v2 `docker-compose` binary, if this machine has one."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    for exe in (
        shutil.which("docker-compose"),
        str(Path(sys.executable).parent / "docker-compose"),
    ):
        if exe and Path(exe).is_file():
            r = subprocess.run([exe, "version"], capture_output=True, text=True)
            if r.returncode == 0 and re.search(r"\bv?2\.", r.stdout):
                return [exe]
    return None


def _check_layout(services: dict[str, Any]) -> None:
    assert set(services) >= SERVICES
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])

    migrate = services["migrate"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"

    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [GPU]
    assert "NVIDIA_DRIVER_CAPABILITIES" in services["worker"]["environment"]

    # One image for migrate, api and worker, one shared artifact volume, the same settings.
    ours = [services[n] for n in ("migrate", "api", "worker")]
    assert len({s["image"] for s in ours}) == 1
    assert all(s["build"]["dockerfile"] == "Dockerfile" for s in ours)
    for s in ours:
        env = s["environment"]
        assert env["SHARP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SHARP_REDIS_URL"] == "redis://redis:6379/0"
        assert env["SHARP_ARTIFACT_ROOT"].startswith("/data")
        # checkpoints and uploads in the MinIO bucket by default (issue 17)
        assert "s3://sharp/artifacts" in env["SHARP_ARTIFACT_URL"]  # raw YAML: ${…-default}
        assert "http://minio:9000" in env["SHARP_ARTIFACT_ENDPOINT_URL"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["minio-init"]["condition"] == (
            "service_completed_successfully"
        )


def test_compose_file_layout() -> None:
    """The raw YAML (anchors resolved by PyYAML), checked with no Docker at all."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    services = doc["services"]
    _check_layout(services)
    for s in ("api", "worker"):
        mounts = services[s]["volumes"]
        assert any(str(m).startswith("artifacts:") for m in mounts)
    assert "artifacts" in doc["volumes"]


def test_compose_config() -> None:
    """What Docker Compose itself resolves from the file (interpolation, schema, merges)."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client")
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("the docker client has no compose plugin and no docker-compose v2 is here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHARP_", "POSTGRES_"))}
    r = subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    _check_layout(config["services"])
    volumes = {v["source"] for s in ("api", "worker") for v in config["services"][s]["volumes"]}
    assert volumes == {"artifacts"}


def test_dockerfile_uses_the_pinned_dependencies() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    # torch is installed from pyproject's own dependency list, so the pin cannot drift.
    assert "pyproject.toml" in text and "dependencies" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"torch==[0-9.]+"', pyproject)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


# -- sharp up --------------------------------------------------------------------------------


def _proc_mentions(pid: int, needle: bytes) -> bool:
    for part in ("cmdline", "environ"):
        try:
            if needle in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
        except OSError:
            pass
    return False


def _processes_mentioning(needle: str, exclude: set[int]) -> list[int]:
    """Live processes whose command line or environment contains `needle` (Linux /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if (
            name.isdigit()
            and int(name) not in exclude
            and _proc_mentions(int(name), needle.encode())
        ):
            try:
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                out.append(int(name))
    return out


class Lines:
    """Read a child's output on a thread, so waiting for a line never blocks the test."""

    def __init__(self, stream: Any):
        self.q: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.seen)}")

    def rest(self, timeout: float = 5) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
        return "".join(self.seen)


def sharp_up_env(**extra: str) -> dict[str, str]:
    """The environment of a `sharp up` under test: its own SQLite and embedded Redis (nothing
    listens on port 9, so were the shared URLs used, readiness and jobs would fail), and its
    own var dir for artifacts, uploads and dataset files."""
    env = {
        **os.environ,
        "SHARP_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
        "SHARP_REDIS_URL": "redis://127.0.0.1:9/0",
        "SHARP_HEARTBEAT_INTERVAL_S": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    for name in ("SHARP_ARTIFACT_ROOT", "SHARP_UPLOAD_ROOT", "SHARP_DATASET_FILE_ROOTS"):
        env.pop(name, None)
    return env


def start_sharp_up(var: Path, env: dict[str, str]) -> subprocess.Popen:
    """`sharp up` on a free port in its own session, stdout and stderr as one text pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--var-dir", str(var), "--port", "0"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes via /proc")
def test_sharp_up_serves_a_job_and_stops_cleanly(tmp_path: Path, corpus: Path) -> None:
    var = tmp_path / "var"
    env = sharp_up_env()
    proc = start_sharp_up(var, env)
    lines = Lines(proc.stdout)
    try:
        url = lines.wait_for(r"SHARP is up at (http://127\.0\.0\.1:\d+)", 90).group(1)
        key = lines.wait_for(r"API key \(team demo\): (sharp_\S+)", 5).group(1)
        lines.wait_for(r"Ctrl-C stops it", 5)

        state = json.loads((var / "sharp-up.json").read_text())
        assert state["pid"] == proc.pid
        assert state["redis_port"] not in (6379, 9)
        assert (var / "sharp.db").is_file()
        assert (var / "demo-api-key").stat().st_mode & 0o777 == 0o600
        assert (var / "demo-api-key").read_text().strip() == key

        # `sharp up` reads dataset files only under <var>/data unless told otherwise.
        assert (var / "data").is_dir()
        data = Path(shutil.copy(corpus, var / "data" / "corpus.txt"))

        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, timeout=30) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "artifacts": "ok"}

            r = client.post(
                "/v1/jobs", json={"spec": tiny_spec(data, max_steps=10)}, headers=headers
            )
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 90
            job = r.json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"job still {job['status']}: {job}"
                time.sleep(0.5)
                job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            assert job["status"] == "succeeded", job
            assert job["progress"]["step"] == 10
            ckpts = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=headers).json()["data"]
            assert [c["step"] for c in ckpts][-1] == 10
        assert (var / "artifacts").is_dir()

        children = {c["pid"] for c in state["children"]}
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, lines.rest()
        out = lines.rest()
        assert "stopped." in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    assert [p for p in children if Path(f"/proc/{p}").exists()] == []
    leftovers = _processes_mentioning(str(var), exclude={os.getpid()})
    assert leftovers == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in leftovers]
    assert not (var / "sharp-up.json").exists()

    # A stale state file (its pid is dead, as after kill -9) does not block a start, and a
    # restart prints the same key (the key file is reused, not replaced).
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {
        **state,
        "pid": dead.pid,
        "children": [{"name": "api", "pid": dead.pid, "cmdline": ["true"]}],
    }
    (var / "sharp-up.json").write_text(json.dumps(stale))
    again = start_sharp_up(var, env)
    lines = Lines(again.stdout)
    try:
        assert lines.wait_for(r"API key \(team demo\): (sharp_\S+)", 90).group(1) == key
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=60) == 0, lines.rest()
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait(timeout=10)
    assert _processes_mentioning(str(var), exclude={os.getpid()}) == []
