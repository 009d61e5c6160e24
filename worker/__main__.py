"""``python -m worker [celery worker options]``: one Celery worker for the pool in the settings.

The worker's Celery options live here, in the worker package, so the production command
(``python -m worker``, docker-compose.yml) and `ops.launcher.worker_command` (which runs this
module with its own ``-Q``/``-n``/``--loglevel``) start the same worker. Options given on the
command line come last, so they override these defaults.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

from service.dispatch import celery_worker_argv
from service.settings import Settings, get_settings
from service.store import store_problem


def celery_argv(settings: Settings, extra_args: Sequence[str] = ()) -> list[str]:
    """``celery worker``: solo pool, one job at a time, consuming the settings' pool queue."""
    return celery_worker_argv(
        "worker.celery_app",
        pool="solo",
        concurrency=1,
        queue=settings.pool,
        name=f"sharp-{settings.pool}-{os.getpid()}@{socket.gethostname()}",
        extra_args=extra_args,
    )


def main() -> None:
    settings = get_settings()
    problem = store_problem(settings)
    if problem is not None:  # refuse to start: one line naming the setting
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    cmd = celery_argv(settings, sys.argv[1:])
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
