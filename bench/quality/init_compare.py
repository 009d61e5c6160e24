"""Random against pruned init (issue 14): paired by seed, from finished quality runs.

    python -m bench.quality.init_compare \\
        --pair 2x2 runs/init-2x2-random runs/init-2x2-prune \\
        --pair 2x3 runs/init-2x3-random runs/init-2x3-prune \\
        --json docs/results/init-compare.json --plot docs/results/init-curves.png
    python -m bench.quality.init_compare --from-json docs/results/init-compare.json

Why a separate step: the two inits are two runs of `python -m bench.quality` (presets
``tiny-cpu-2x2-random`` / ``-prune``, same teacher, same seeds, same batches), and the question
is about the difference between them. The raw per-cell numbers go into the JSON, so the
markdown can be re-rendered from it alone (``--from-json``).

Per method: val perplexity mean ± std for each init; Δ% = 100·(ppl_pruned / ppl_random − 1)
paired by seed with a 95 % t-interval; "gap closed" = (ppl_random − ppl_pruned) /
(ppl_random − ppl_teacher), per seed. Within the pruned init, each method against ``kd``,
paired by seed, with Holm's correction over the methods compared.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench.quality.stats import delta, interval
from sharp_core.study.compare import holm, mean_std


def _cells(run: Path) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for res in sorted(run.glob("cells/*/seed*/result.json")):
        r = json.loads(res.read_text())
        out.setdefault(r["method"], {})[int(r["seed"])] = {
            "ppl": r["ppl"]["val"]["ppl"],
            "eval_curve": r.get("eval_curve", []),
        }
    return out


def collect(pairs: list[tuple[str, Path, Path]]) -> dict[str, Any]:
    """The raw numbers of every cell of every pair, and each run's teacher."""
    data: dict[str, Any] = {"split": "val", "pairs": {}}
    for name, random_dir, prune_dir in pairs:
        teacher = json.loads((random_dir / "teacher" / "result.json").read_text())
        best = dict((int(st), v) for st, v in teacher.get("eval_curve", [])).get(
            teacher.get("best_step")
        )
        data["pairs"][name] = {
            "teacher_ppl": teacher["ppl"]["val"]["ppl"],
            "teacher_eval_loss": best,  # on the trainer's eval tail, as the students' curves
            "runs": {"random": str(random_dir), "prune": str(prune_dir)},
            "random": _cells(random_dir),
            "prune": _cells(prune_dir),
        }
    return data


def _mean_curve(cells: dict[Any, dict[str, Any]]) -> list[tuple[int, float]]:
    """Mean eval loss over seeds at the steps every seed evaluated."""
    curves = [{int(s): v for s, v in c["eval_curve"]} for c in cells.values()]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(s, sum(c[s] for c in curves) / len(curves)) for s in steps]


def _steps_to_match(random: dict[Any, Any], pruned: dict[Any, Any]) -> int | None:
    """The first eval step at which the pruned students' mean eval loss is at or below the
    random students' final one (the trainer's eval tail; None if never)."""
    rc, pc = _mean_curve(random), _mean_curve(pruned)
    if not rc or not pc:
        return None
    final = rc[-1][1]
    return next((s for s, v in pc if v <= final), None)


def analyse(data: dict[str, Any]) -> dict[str, Any]:
    """The statistics of every pair (see the module docstring)."""
    out: dict[str, Any] = {}
    for name, pair in data["pairs"].items():
        t_ppl = pair["teacher_ppl"]
        rows: dict[str, Any] = {}
        for method in pair["prune"]:
            r, p = pair["random"].get(method, {}), pair["prune"][method]
            rnd = {int(s): c["ppl"] for s, c in r.items()}
            prn = {int(s): c["ppl"] for s, c in p.items()}
            seeds = sorted(set(rnd) & set(prn))
            if not seeds:
                continue
            rows[method] = {
                "n": len(seeds),
                "random": mean_std([rnd[s] for s in seeds]),
                "prune": mean_std([prn[s] for s in seeds]),
                "delta_pct": delta(prn, rnd),
                "gap_closed": interval({s: (rnd[s] - prn[s]) / (rnd[s] - t_ppl) for s in seeds}),
                "steps_to_random_final": _steps_to_match(r, p),
            }
        # within the pruned init: each method against kd, paired, Holm over the comparisons
        vs_kd: dict[str, Any] = {}
        kd = pair["prune"].get("kd")
        if kd:
            ref = {int(s): c["ppl"] for s, c in kd.items()}
            for method, cells in pair["prune"].items():
                if method == "kd":
                    continue
                d = delta({int(s): c["ppl"] for s, c in cells.items()}, ref)
                if d is not None and d["p"] is not None:
                    vs_kd[method] = d
            for method, p_holm in holm({m: d["p"] for m, d in vs_kd.items()}).items():
                vs_kd[method]["p_holm"] = p_holm
        out[name] = {"teacher_ppl": t_ppl, "methods": rows, "prune_vs_kd": vs_kd}
    return out


def _fmt_ms(ms: tuple[float, float | None], scale: float = 1.0, nd: int = 2) -> str:
    sd = "–" if ms[1] is None else f"{scale * ms[1]:.{nd}f}"  # one seed: no std
    return f"{scale * ms[0]:.{nd}f} ± {sd}"


def _fmt_ci(iv: dict[str, Any]) -> str:
    ci = iv["ci95"]
    return f"{iv['mean']:+.2f}" + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")


def render(data: dict[str, Any], stats: dict[str, Any]) -> str:
    lines = []
    for name, st in stats.items():
        lines += [
            f"### Student {name} (teacher val ppl {st['teacher_ppl']:.2f})",
            "",
            "| method | random init | pruned init | Δ % (pruned vs random) [95% CI] "
            "| gap to the teacher closed | pruned reaches random's final eval at step | n |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, r in st["methods"].items():
            d, g = r["delta_pct"], r["gap_closed"]
            lines.append(
                f"| {m} | {_fmt_ms(r['random'])} | {_fmt_ms(r['prune'])} | "
                f"{_fmt_ci(d)} | {_fmt_ms((g['mean'], g['std']), 100, 1)} % | "
                f"{r['steps_to_random_final']} of {_last_step(data, name, m)} | {r['n']} |"
            )
        if st["prune_vs_kd"]:
            lines += [
                "",
                "Pruned init, each method against kd (paired Δ %, Holm-corrected p):",
                "",
                "| method | Δ % vs kd [95% CI] | p | p (Holm) |",
                "|---|---|---|---|",
            ]
            for m, iv in st["prune_vs_kd"].items():
                lines.append(f"| {m} | {_fmt_ci(iv)} | {iv['p']:.3f} | {iv['p_holm']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _last_step(data: dict[str, Any], pair: str, method: str) -> int | None:
    curve = _mean_curve(data["pairs"][pair]["random"].get(method, {}))
    return curve[-1][0] if curve else None


def plot(data: dict[str, Any], path: Path) -> None:
    """Eval perplexity (the trainer's eval tail) against steps, mean over seeds, both inits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = data["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, pair) in zip(axes[0], pairs.items(), strict=True):
        for i, method in enumerate(pair["prune"]):
            for init, style in (("random", "--"), ("prune", "-")):
                cells = pair[init].get(method, {})
                curve = _mean_curve(cells)
                if not curve:
                    continue
                steps, ys = [s for s, _ in curve], [math.exp(v) for _, v in curve]
                ax.plot(steps, ys, style, color=colors[i % len(colors)], label=f"{method} {init}")
        if pair.get("teacher_eval_loss") is not None:
            ax.axhline(math.exp(pair["teacher_eval_loss"]), color="black", lw=0.8, label="teacher")
        ax.set_yscale("log")
        ax.set_title(f"student {name}: eval-tail ppl, mean over seeds (dashed: random init)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality.init_compare")
    ap.add_argument("--pair", nargs=3, action="append", metavar=("NAME", "RANDOM", "PRUNE"))
    ap.add_argument("--from-json", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        if not args.pair:
            ap.error("give --pair NAME RANDOM_DIR PRUNE_DIR (repeatable) or --from-json")
        data = collect([(n, Path(r), Path(p)) for n, r, p in args.pair])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1))
    stats = analyse(data)
    if args.plot:
        plot(data, args.plot)
    print(render(data, stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
