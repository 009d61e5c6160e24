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

from bench.quality.stats import _mean_std, _t95


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


def _interval(d: list[float]) -> dict[str, Any]:
    m, s = _mean_std(d)
    se = s / math.sqrt(len(d)) if len(d) > 1 else math.nan
    half = _t95(len(d) - 1) * se
    return {"mean": m, "std": s, "ci95": [m - half, m + half], "n": len(d), "se": se}


def _p_two_sided(mean: float, se: float, df: int) -> float:
    """Two-sided p of a paired t statistic (regularised incomplete beta, no scipy needed)."""
    if not se or math.isnan(se) or df < 1:
        return math.nan
    t = abs(mean / se)
    x = df / (df + t * t)
    return _betainc(df / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(200):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1.0 + num / (c if abs(c) > 1e-30 else 1e-30)
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0) / a


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
            seeds = sorted(set(map(int, r)) & set(map(int, p)), key=int)
            rnd = [r[s]["ppl"] if s in r else r[str(s)]["ppl"] for s in seeds]
            prn = [p[s]["ppl"] if s in p else p[str(s)]["ppl"] for s in seeds]
            if not seeds:
                continue
            rows[method] = {
                "n": len(seeds),
                "random": _mean_std(rnd),
                "prune": _mean_std(prn),
                "delta_pct": _interval([100 * (b / a - 1) for a, b in zip(rnd, prn, strict=True)]),
                "gap_closed": _interval(
                    [(a - b) / (a - t_ppl) for a, b in zip(rnd, prn, strict=True)]
                ),
                "steps_to_random_final": _steps_to_match(r, p),
            }
        # within the pruned init: each method against kd, paired, Holm over the comparisons
        vs_kd: dict[str, Any] = {}
        kd = pair["prune"].get("kd")
        if kd:
            for method, cells in pair["prune"].items():
                if method == "kd":
                    continue
                seeds = sorted(set(cells) & set(kd), key=int)
                d = [100 * (cells[s]["ppl"] / kd[s]["ppl"] - 1) for s in seeds]
                if len(d) > 1:
                    iv = _interval(d)
                    iv["p"] = _p_two_sided(iv["mean"], iv["se"], len(d) - 1)
                    vs_kd[method] = iv
            order = sorted(vs_kd, key=lambda m: vs_kd[m]["p"])
            k = len(order)
            running = 0.0
            for i, m in enumerate(order):  # Holm step-down, monotone
                running = max(running, min(1.0, (k - i) * vs_kd[m]["p"]))
                vs_kd[m]["p_holm"] = running
        out[name] = {"teacher_ppl": t_ppl, "methods": rows, "prune_vs_kd": vs_kd}
    return out


def _fmt_ms(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


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
                f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] | "
                f"{100 * g['mean']:.1f} ± {100 * g['std']:.1f} % | "
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
                lines.append(
                    f"| {m} | {iv['mean']:+.2f} [{iv['ci95'][0]:+.2f}, {iv['ci95'][1]:+.2f}] "
                    f"| {iv['p']:.3f} | {iv['p_holm']:.3f} |"
                )
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
