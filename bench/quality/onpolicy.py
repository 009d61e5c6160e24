"""On-policy against off-policy distillation (issue 15): kd and jsd, paired by seed.

    python -m bench.quality.onpolicy --preset tiny-cpu --out runs/onpolicy --seeds 3 \\
        --jobs 2 --threads 1 --lambdas 0.25 0.5 1 --adaptive 0.25 \\
        --json docs/results/onpolicy.json
    python -m bench.quality.onpolicy --from-json docs/results/onpolicy.json

Why a driver over `python -m bench.quality` and not new rows in its method table: each
setting is the same two methods with one ``method.on_policy`` block added to the base spec,
which is what ``--set`` does; so every setting is an ordinary quality run in its own folder
(``<out>/lam0``, ``<out>/lam0.5``, ``<out>/adaptive0.25``, …), all with the teacher that the
off-policy run trained (same splits, same tokenizer, same batches for a seed). Rerunning
completes the folders.

Per method and setting: val perplexity mean ± std; Δ% = 100·(ppl / ppl_offpolicy − 1)
paired by seed with a 95 % t-interval (negative: on-policy is better); training wall time.
The raw per-cell numbers go into the JSON, so the markdown re-renders from it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.quality.presets import PRESETS
from bench.quality.run import run
from bench.quality.stats import delta
from sharp_core.study.compare import mean_std

METHODS = ("kd", "jsd")


def settings(
    lambdas: list[float],
    adaptive: list[float],
    max_new_tokens: int,
    seq_kd: list[float] | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Folder name → the ``method.on_policy`` block (None: off-policy, the reference)."""
    out: dict[str, dict[str, Any] | None] = {"lam0": None}
    for lam in lambdas:
        out[f"lam{lam:g}"] = {"fraction": lam, "max_new_tokens": max_new_tokens}
    for lam in seq_kd or []:
        out[f"seqkd{lam:g}"] = {"fraction": lam, "seq_kd": True, "max_new_tokens": max_new_tokens}
    for p in adaptive:
        out[f"adaptive{p:g}"] = {
            "fraction": p,
            "adaptive": True,
            "max_new_tokens": max_new_tokens,
        }
    return out


def collect(out: Path, names: list[str]) -> dict[str, Any]:
    """Every finished cell's val perplexity and wall time, by setting, method and seed."""
    data: dict[str, Any] = {"split": "val", "settings": {}}
    for name in names:
        run_dir = out / name
        cells: dict[str, dict[int, dict[str, Any]]] = {}
        block = None
        for res in sorted(run_dir.glob("cells/*/seed*/result.json")):
            r = json.loads(res.read_text())
            block = r["spec"]["method"].get("on_policy")
            steps = [
                json.loads(line)
                for line in (res.parent / "metrics.jsonl").read_text().splitlines()
                if line.strip()
            ]
            trained = [m for m in steps if "loss" in m]
            cells.setdefault(r["method"], {})[int(r["seed"])] = {
                "ppl": r["ppl"]["val"]["ppl"],
                "train_wall_s": r.get("train_wall_s"),
                "train_cpu_s": r.get("train_cpu_s"),
                "eval_curve": r.get("eval_curve", []),
                # steps that trained on generated (fresh or replayed) sequences, and p at the end
                "generated_steps": sum(m.get("on_policy", 0.0) for m in trained),
                "replayed_steps": sum(m.get("replayed", 0.0) for m in trained),
                "final_generation_prob": trained[-1].get("generation_prob") if trained else None,
            }
        data["settings"][name] = {"on_policy": block, "cells": cells}
        teacher = run_dir / "teacher" / "result.json"
        if name == "lam0" and teacher.is_file():
            data["teacher_ppl"] = json.loads(teacher.read_text())["ppl"]["val"]["ppl"]
    return data


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    ref = data["settings"]["lam0"]["cells"]
    rows: dict[str, Any] = {}
    for name, s in data["settings"].items():
        for method, by_seed in s["cells"].items():
            seeds = sorted(by_seed)
            ppl = [by_seed[k]["ppl"] for k in seeds]
            row: dict[str, Any] = {
                "n": len(seeds),
                "ppl": mean_std(ppl),
                "wall_s": mean_std([by_seed[k]["train_wall_s"] or 0.0 for k in seeds]),
                # CPU seconds: on a shared machine wall time measures the neighbours
                "cpu_s": mean_std([by_seed[k].get("train_cpu_s") or 0.0 for k in seeds]),
                "generated_steps": mean_std(
                    [by_seed[k].get("generated_steps", 0.0) for k in seeds]
                )[0],
                "replayed_steps": mean_std([by_seed[k].get("replayed_steps", 0.0) for k in seeds])[
                    0
                ],
            }
            d = None
            if name != "lam0":
                d = delta(
                    {k: c["ppl"] for k, c in by_seed.items()},
                    {k: c["ppl"] for k, c in ref.get(method, {}).items()},
                )
            if d is not None:
                d["per_seed"] = list(d["per_seed"].values())  # this JSON has kept a list
                row["delta_pct"] = d
            rows[f"{method}/{name}"] = row
    return rows


def _f(x: float | None, nd: int = 3) -> str:
    return "—" if x is None or x != x else f"{x:.{nd}f}"


def render(data: dict[str, Any], stats: dict[str, Any]) -> str:
    lines = [
        f"val perplexity (teacher {_f(data.get('teacher_ppl', float('nan')))}); "
        "Δ% vs off-policy (λ = 0) paired by seed, 95 % t-interval; negative = better",
        "",
        "| method | setting | n | val ppl (mean ± std) | Δ% vs λ=0 [95 % CI] | generated "
        "(replayed) steps | CPU s/cell |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(
        stats, key=lambda k: (k.split("/")[0], list(data["settings"]).index(k.split("/")[1]))
    ):
        method, name = key.split("/")
        r = stats[key]
        m, s = r["ppl"]
        d = r.get("delta_pct")
        if not d:
            delta = "(reference)"
        elif d["n"] < 2:
            delta = f"{d['mean']:+.2f} (one seed)"
        else:
            delta = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        lines.append(
            f"| {method} | {name} | {r['n']} | {_f(m)} ± {_f(s)} | {delta} | "
            f"{r.get('generated_steps', 0):.0f} ({r.get('replayed_steps', 0):.0f}) | "
            f"{r['cpu_s'][0]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _reference_teacher(out: Path) -> str:
    res = out / "lam0" / "teacher" / "result.json"
    if not res.is_file():
        raise SystemExit(f"{res} missing: run the off-policy setting (lam0) first")
    return str((out / "lam0" / json.loads(res.read_text())["path"]).resolve())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality.onpolicy", description=__doc__)
    ap.add_argument("--preset", default="tiny-cpu", choices=list(PRESETS))
    ap.add_argument("--out", type=Path, default=Path("runs/onpolicy"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="override the students' max_steps")
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    ap.add_argument(
        "--adaptive", type=float, nargs="*", default=[0.25], help="starting probabilities"
    )
    ap.add_argument(
        "--seq-kd", type=float, nargs="*", default=[], help="λ of teacher-generated settings"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument(
        "--teacher",
        default=None,
        help="a teacher model folder for every setting (default: "
        "the one the off-policy setting trains)",
    )
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--only", nargs="*", default=None, help="train only these settings (lam0 first)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    ap.add_argument("--from-json", type=Path, default=None, help="render a written JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        print(render(data, analyse(data)))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.steps:
        preset = replace(preset, training={**preset.training, "max_steps": args.steps})
    table = settings(args.lambdas, args.adaptive, args.max_new_tokens, args.seq_kd)
    out = args.out.resolve()
    for name, block in table.items():
        if args.only is not None and name not in args.only:
            continue
        over = {"method": {"on_policy": block}} if block else {}
        run(
            preset,
            out / name,
            # lam0 trains the teacher (unless --teacher); every other setting uses that one
            teacher=args.teacher or (None if name == "lam0" else _reference_teacher(out)),
            methods=args.methods,
            seeds=args.seeds,
            base_overrides=over,
            device=args.device,
            jobs=args.jobs,
        )
    data = collect(out, [n for n in table if (out / n).is_dir()])
    data["command"] = "python -m bench.quality.onpolicy " + " ".join(argv or sys.argv[1:])
    data["preset"] = {"name": preset.name, "training": preset.training, "seq_len": preset.seq_len}
    stats = analyse(data)
    data["stats"] = stats
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
    print(render(data, stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
