"""The command lines that start the API and a worker for a given `Settings` (`sharp up`, the
test fixtures, the load benchmark).

Settings travel as ``SHARP_*`` environment variables (`service.settings.settings_env`): the
worker, the API and each training process are new interpreters, and those variables give
every process the same database, Redis, prefix and artifact root without a config file.
A worker is started as ``python -m worker`` (the worker package owns the Celery options).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from service.settings import Settings, settings_env


def worker_command(
    settings: Settings,
    *,
    queues: Sequence[str] | None = None,
    hostname: str | None = None,
    loglevel: str = "INFO",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``python -m worker`` consuming `queues` (default: the settings' pool); the options
    given here override the worker's defaults (`worker.__main__.celery_argv`)."""
    queues = list(queues or [settings.pool])
    name = hostname or f"sharp-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    return [
        sys.executable,
        "-m",
        "worker",
        "-Q",
        ",".join(queues),
        "-n",
        name,
        "--loglevel",
        loglevel,
        *extra_args,
    ]


def webhook_worker_command(
    settings: Settings, *, hostname: str | None = None, loglevel: str = "INFO"
) -> list[str]:
    """``python -m worker.webhooks``: the worker that sends webhook deliveries (it consumes
    only the delivery queue, so it holds no GPU slot)."""
    name = hostname or f"sharp-webhooks-{os.getpid()}@{socket.gethostname()}"
    return [sys.executable, "-m", "worker.webhooks", "-n", name, "--loglevel", loglevel]


def start_webhook_worker(
    settings: Settings,
    *,
    hostname: str | None = None,
    log_file: Path | None = None,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the webhook delivery worker as a subprocess in its own process group."""
    return _spawn(
        webhook_worker_command(settings, hostname=hostname), settings, log_file, cwd, extra_env
    )


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
    cmd = worker_command(settings, queues=queues, hostname=hostname, loglevel=loglevel)
    return _spawn(cmd, settings, log_file, cwd, extra_env)


def _spawn(
    cmd: list[str],
    settings: Settings,
    log_file: Path | None,
    cwd: Path | None,
    extra_env: dict[str, str] | None,
) -> subprocess.Popen[bytes]:
    """A child with the settings in its environment, in its own process group (so a stop
    signal reaches its whole tree), its output appended to `log_file`."""
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    out = log_file.open("ab") if log_file is not None else None
    try:
        return subprocess.Popen(
            cmd,
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
