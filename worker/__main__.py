"""``python -m worker [celery worker options]``: one worker for the queues in the settings."""

from __future__ import annotations

import os
import sys

from api.settings import get_settings
from worker.launcher import worker_command


def main() -> None:
    cmd = worker_command(get_settings(), extra_args=sys.argv[1:])
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
