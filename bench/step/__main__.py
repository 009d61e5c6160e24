"""``python -m bench.step``."""

import sys

from bench.step.cli import main

sys.exit(main())
