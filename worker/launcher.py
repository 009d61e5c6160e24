"""Start a Celery worker process for a given `Settings` (used by `sharp up`, tests, compose).

Why settings travel as environment variables: the worker and each training process it
spawns are new interpreters; ``SHARP_*`` variables are how `api.settings.Settings` is read
everywhere, so serialising the caller's settings into them gives every process the same
database, Redis, prefix and artifact root without a config file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from api.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """``SHARP_*`` variables that rebuild `settings` in another process."""
    env: dict[str, str] = {}
    prefix = Settings.model_config.get("env_prefix", "SHARP_")
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        key = f"{prefix}{name}".upper()
        env[key] = value if isinstance(value, str) else json.dumps(value)
    return env


def worker_command(
    settings: Settings,
    *,
    queues: Sequence[str] | None = None,
    hostname: str | None = None,
    loglevel: str = "INFO",
    extra_args: Sequence[str] = (),
) -> list[str]:
    queues = list(queues or [settings.pool])
    name = hostname or f"sharp-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "-Q",
        ",".join(queues),
        "-n",
        name,
        "--loglevel",
        loglevel,
        "--without-mingle",
        "--without-gossip",
        *extra_args,
    ]


def api_command(
    host: str,
    port: int,
    *,
    workers: int = 1,
    loglevel: str = "warning",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The API under uvicorn (`sharp up`, tests, the load benchmark): one command line, so
    every place that starts the API runs the same app factory the same way."""
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.app:create_app",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    return [*cmd, "--log-level", loglevel, *extra_args]


def start_worker(
    settings: Settings,
    *,
    queues: Sequence[str] | None = None,
    gpu: str | None = None,
    pool: str | None = None,
    gpu_count: int | None = None,
    hostname: str | None = None,
    log_file: Path | None = None,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    loglevel: str = "INFO",
) -> subprocess.Popen[bytes]:
    """Start one worker (one GPU: ``gpu="0"``) as a subprocess in its own process group.

    `pool` and `gpu_count` are what the worker registers for the scheduler (default: the
    settings' `Settings.pool` and `Settings.gpu_count`).

    Stop it with ``proc.terminate()`` (warm shutdown: the running job is checkpointed and
    re-queued) and ``os.killpg(proc.pid, SIGKILL)`` if it does not exit.
    """
    if gpu is not None:
        settings = settings.model_copy(update={"worker_gpus": gpu})
    if pool is not None:
        settings = settings.model_copy(update={"worker_pool": pool})
    if gpu_count is not None:
        settings = settings.model_copy(update={"worker_gpu_count": gpu_count})
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    out = log_file.open("ab") if log_file is not None else None
    try:
        return subprocess.Popen(
            worker_command(settings, queues=queues, hostname=hostname, loglevel=loglevel),
            env=env,
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()
