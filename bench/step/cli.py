"""``python -m bench.step``: the command line of the step benchmark."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.step.presets import PRESETS
from bench.step.report import render_table
from bench.step.run import run_benchmark
from bench.step.runners import ALL_STEPS, STEP_NAMES


def _parse_steps(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in ALL_STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown step(s) {bad or text!r}; choose from {', '.join(ALL_STEPS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    visible = [k for k, p in PRESETS.items() if not p.hidden]
    ap = argparse.ArgumentParser(
        prog="python -m bench.step",
        description="Time ce / kd / sharp / eager distillation steps side by side.",
    )
    ap.add_argument(
        "--preset", required=True, choices=list(PRESETS), metavar="{" + ",".join(visible) + "}"
    )
    ap.add_argument(
        "--json",
        action="store_true",
        help="print the JSON document on stdout (the table goes to stderr)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument(
        "--steps",
        type=_parse_steps,
        default=STEP_NAMES,
        help=f"comma list of {','.join(ALL_STEPS)} (default {','.join(STEP_NAMES)})",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing, a torch.profiler breakdown of each step by range",
    )
    ap.add_argument("--device", default=None, help="override the preset's device")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a CPU shared with other "
        "jobs use 1: OpenMP barriers spin on descheduled threads and a 2-thread "
        "step can run 50x slower than a 1-thread one",
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        doc = run_benchmark(
            args.preset,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            compile_=args.compile,
            profile=args.profile,
            device=args.device,
            command=" ".join(
                ["python -m bench.step", *(argv if argv is not None else sys.argv[1:])]
            ),
            log=log,
        )
    except (RuntimeError, ValueError) as e:
        print(f"bench.step: {e}", file=sys.stderr)
        return 2
    if args.json:
        render_table(doc, file=sys.stderr)
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render_table(doc)
    return 0 if all(r["error"] is None for r in doc["steps"]) else 1
