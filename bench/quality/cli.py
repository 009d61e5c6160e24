"""``python -m bench.quality``: the command line of the quality table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench.quality.cells import SanityCheckError
from bench.quality.grid import method_table, parse_assignments
from bench.quality.presets import PRESETS
from bench.quality.run import run


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description="Does SHARP beat the baselines? methods × seeds on one teacher/student pair.",
    )
    visible = [k for k, v in PRESETS.items() if not v.hidden]
    ap.add_argument(
        "--preset", required=True, choices=list(PRESETS), metavar="NAME", help=f"one of {visible}"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default runs/quality-<preset>); rerunning completes it",
    )
    ap.add_argument(
        "--teacher",
        default=None,
        help="a Hugging Face model folder to use as the teacher instead of training one",
    )
    ap.add_argument(
        "--methods", nargs="+", default=None, help="subset of methods (default: all, see --list)"
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: preset's)")
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="split of the reported perplexities; 'test' only after tuning",
    )
    ap.add_argument(
        "--sharp-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the SHARP base of this run (and so every ablation), e.g. "
        "granularities.layer=0.1; repeatable",
    )
    ap.add_argument(
        "--variant",
        action="append",
        nargs="+",
        default=[],
        metavar="NAME [KEY=VALUE ...]",
        help="an extra method var-NAME = the SHARP base with these overrides (the variant "
        "search; baselines already in --out are reused); repeatable",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the base spec of every cell, e.g. method.kd_weight=0.9 or "
        "training.lr=0.002 (use a new --out); repeatable",
    )
    ap.add_argument("--steps", type=int, default=None, help="override the students' max_steps")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained at once, each in its own single-threaded process",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a machine shared with other "
        "jobs, 1 avoids OpenMP threads spinning against each other",
    )
    ap.add_argument("--list", action="store_true", help="print the method table and exit")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, training={**preset.training, "max_steps": args.steps})
    overrides = parse_assignments(args.sharp_set)
    variants = {}
    for name, *assignments in args.variant:
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            ap.error(f"variant name {name!r}: letters, digits, '-', '_', '.' only")
        variants[name] = parse_assignments(assignments)
    if args.list:
        for name, m in method_table(preset, overrides, variants).items():
            print(f"{name:16s} {json.dumps(m)}")
        return 0
    out = args.out or Path("runs") / f"quality-{preset.name}"
    try:
        s = run(
            preset,
            out,
            teacher=args.teacher,
            methods=args.methods,
            seeds=args.seeds,
            split=args.split,
            sharp_overrides=overrides,
            variants=variants,
            base_overrides=parse_assignments(args.set),
            device=args.device,
            jobs=args.jobs,
        )
    except SanityCheckError as e:
        print(f"REFUSED: {e}\n(see {out / 'results.md'})", file=sys.stderr)
        return 2
    print(f"{len(s.trained)} cells trained, {len(s.skipped)} skipped; {out / 'results.md'}")
    return 0
