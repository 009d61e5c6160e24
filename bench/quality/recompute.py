"""``python -m bench.quality.recompute``: every table of docs/results.md from the committed raw
per-cell results in docs/results/, in one command (nothing is trained).

Each JSON file is read by the module that wrote it, whose statistics all come from
`sharp_core.study.compare`; with ``--check`` the command fails when a rendered table row of a section
shown verbatim is missing from docs/results.md (a number there the raw data no longer gives).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.quality import cache_report, init_compare, onpolicy
from bench.quality import sweep as bsweep

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def _sweep(d: dict[str, Any]) -> str:
    return bsweep.render(d, bsweep.analyse(d))


def _init(d: dict[str, Any]) -> str:
    return init_compare.render(d, init_compare.analyse(d))


def _onpolicy(d: dict[str, Any]) -> str:
    return onpolicy.render(d, onpolicy.analyse(d))


def _cache(d: dict[str, Any]) -> str:
    return cache_report.render(cache_report.recompute(d))


#: the sections whose tables docs/results.md shows exactly as rendered (``--check``); the
#: on-policy and cache sections show the same numbers rounded, in condensed tables
VERBATIM = ("equal-budget-", "init-compare")

#: file name prefix → renderer, in the order of docs/results.md
RENDERERS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("equal-budget-", _sweep),
    ("onpolicy-", _onpolicy),
    ("teacher-cache-tiny-cpu", _cache),
    ("init-compare", _init),
]


def render_all(results: Path = RESULTS) -> list[tuple[Path, str]]:
    out = []
    for prefix, fn in RENDERERS:
        for path in sorted(results.glob(f"{prefix}*.json")):
            if path.name.startswith("teacher-cache-bench-step"):
                continue  # bench.step's timing document, not a comparison
            out.append((path, fn(json.loads(path.read_text()))))
    return out


def table_rows(text: str) -> list[str]:
    """The rows of the Markdown tables (rule rows left out)."""
    return [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|---")]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality.recompute", description=__doc__)
    ap.add_argument("--check", action="store_true", help="every table row is in docs/results.md")
    args = ap.parse_args(argv)
    doc = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    missing = []
    for path, text in render_all():
        print(f"## {path.relative_to(ROOT)}\n\n{text}\n")
        if args.check and path.name.startswith(VERBATIM):
            missing += [(path.name, r) for r in table_rows(text) if r not in doc]
    for name, row in missing:
        print(f"NOT IN docs/results.md ({name}): {row}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
