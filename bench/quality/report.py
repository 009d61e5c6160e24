"""results.md and the plots: what a person reads (results.json is what is kept)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any


def fmt(x: float | None, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def render_markdown(report: dict[str, Any]) -> str:
    split = report["split"]
    p = report["preset"]
    t = report["teacher"]
    lines = [
        f"# Quality table: preset `{p['name']}`, {split} split",
        "",
        f"{p['description']}. Corpus: `{report['splits']['source']}` "
        f"({report['splits']['chars']['train']} / {report['splits']['chars']['val']} / "
        f"{report['splits']['chars']['test']} characters train / val / test). "
        f"{p['training']['max_steps']} steps of {p['training']['batch_size']}×{p['seq_len']} "
        f"tokens per cell; seeds {report['seeds']}.",
        "",
        f"Teacher: {'trained in this run' if t.get('trained') else '`' + t['path'] + '`'}"
        + (
            f" (best eval at step {t['best_step']}, stopped at {t['stopped_at']})"
            if t.get("trained")
            else ""
        )
        + f"; {split} perplexity **{t['ppl'][split]['ppl']:.3f}**.",
        "",
    ]
    san = report["sanity"]
    if not san["ok"]:
        lines += [
            f"**REFUSED** — {san['message']}",
            "",
            "No comparison is reported. Perplexities of the cells that ran:",
            "",
        ]
    else:
        lines += [
            f"Sanity check passed: teacher perplexity < {san['ratio']} × every student's "
            f"(best student {san['best_student']}: {fmt(san['best_student_ppl'], 3)}).",
            "",
        ]
    s = report["summary"]
    best = s["best_baseline"]
    lines += [
        f"| method | {split} ppl (mean ± std) | Δ vs best baseline ({best}) % | 95% CI | "
        "tokens/s | train s (wall / cpu) |",
        "|---|---|---|---|---|---|",
    ]
    for name in report["order"]:
        st = s["methods"].get(name)
        if st is None:
            continue
        d = st.get("delta_pct")
        if san["ok"] and d is not None:
            dtxt = f"{d['mean']:+.2f} ± {fmt(d['se'])}"
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["n"] > 1 else "–"
        else:
            dtxt, ci = "–", "–"
        mark = " (best baseline)" if name == best else ""
        lines.append(
            f"| {name}{mark} | {st['ppl_mean']:.3f} ± {fmt(st['ppl_std'], 3)} "
            f"(n={len(st['seeds'])}) | {dtxt} | {ci} | {fmt(st['tokens_per_s'], 0)} | "
            f"{st['train_wall_s']:.0f} / {st['train_cpu_s']:.0f} |"
        )
    lines += [
        "",
        "Δ: paired by seed, 100·(ppl_method / ppl_best_baseline − 1) per seed, mean ± standard "
        "error; 95% CI from Student's t over seeds. Negative = better than the best baseline. "
        "tokens/s: median of plain training steps (no diagnostics, no eval) on this machine.",
        "",
    ]
    cs = report.get("cosines") or {}
    if cs:
        lines += [
            "Gradient cosines on the student's parameters (mean over training and seeds; "
            "last recorded point):",
            "",
            "| cell | pair | mean | last | points |",
            "|---|---|---|---|---|",
        ]
        for name, pairs in cs.items():
            for k, v in pairs.items():
                lines.append(
                    f"| {name} | {k[4:]} | {v['mean']:+.3f} | {v['last']:+.3f} | "
                    f"{v['points']:.0f} |"
                )
        lines.append("")
    for png in report.get("plots", []):
        lines.append(f"![{png}]({png})")
    lines.append("")
    return "\n".join(lines)


def make_plots(
    report: dict[str, Any], cells: dict[str, dict[int, dict[str, Any]]], run_dir: Path
) -> list[str]:
    """eval_curves.png and cosines.png (small, commit-friendly); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    out = []

    def mean_curve(series: list[list[list[float]]]) -> tuple[list[float], list[float]]:
        by: dict[float, list[float]] = {}
        for s in series:
            for x, y in s:
                by.setdefault(x, []).append(y)
        xs = sorted(by)
        return xs, [statistics.fmean(by[x]) for x in xs]

    # left: every baseline's eval loss; right: every other method's eval loss minus the
    # reference's (kd when present), paired by seed: the SHARP variants differ by a few
    # hundredths of a nat, invisible on an absolute scale.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    palette += [plt.get_cmap("Dark2")(i) for i in range(8)]
    t_curve = report["teacher"].get("eval_curve")
    t_best = report["teacher"].get("best_step")
    ax = axes[0]
    for i, name in enumerate(m for m in report["order"] if m in report["baselines"] and m in cells):
        xs, ys = mean_curve([r["eval_curve"] for r in cells[name].values()])
        ax.plot(xs[1:], ys[1:], label=name, lw=1.2, color=palette[i % len(palette)])
    if t_curve and t_best is not None:
        tl = dict((int(s), v) for s, v in t_curve).get(int(t_best))
        if tl is not None:
            ax.axhline(tl, color="k", ls=":", lw=1, label="teacher")
    ax.set_title("baselines (step 0 left out)", fontsize=9)
    ax.set_ylabel("eval loss (trainer's eval tail, mean over seeds)", fontsize=8)
    ref = "kd" if "kd" in cells else None
    ax = axes[1]
    if ref is not None:
        others = [
            m
            for m in report["order"]
            if m in cells and m != ref and m not in ("sft", "rkl", "skl", "srkl", "jsd", "minilm")
        ]
        for i, name in enumerate(others):
            diffs = []
            for seed, r in cells[name].items():
                if seed in cells[ref]:
                    base = dict((s, v) for s, v in cells[ref][seed]["eval_curve"])
                    diffs.append([[s, v - base[s]] for s, v in r["eval_curve"] if s in base])
            xs, ys = mean_curve(diffs)
            ax.plot(
                xs[1:],
                ys[1:],
                label=name,
                lw=1.2,
                color=palette[i % len(palette)],
                ls="--" if name in report["baselines"] else "-",
            )
        ax.axhline(0, color="k", lw=0.8, label=ref)
        ax.set_title(f"eval loss − {ref}'s, paired by seed (< 0: better than {ref})", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / "eval_curves.png", dpi=80)
    plt.close(fig)
    out.append("eval_curves.png")

    cos_cells = [
        n
        for n in ("sharp", "sharp-direct", "sharp-pcgrad")
        if n in cells and any(r.get("cosines") for r in cells[n].values())
    ]
    if cos_cells:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for name in cos_cells:
            keys = sorted({k for r in cells[name].values() for k in r.get("cosines", {})})
            for k in keys:
                xs, ys = mean_curve(
                    [r["cosines"][k] for r in cells[name].values() if k in r.get("cosines", {})]
                )
                if len(xs) > 30:  # every step (pcgrad): moving average over 10 steps
                    ys = [statistics.fmean(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))]
                logit = k.startswith("cos_logit_")
                if name == "sharp-pcgrad" and not logit:
                    continue
                ax = axes[0] if logit else axes[1]
                label = f"{name}: {k[4:].replace('sharp_', '')}"
                ax.plot(
                    xs,
                    ys,
                    label=label,
                    lw=1.2,
                    marker="o" if len(xs) < 30 else None,
                    ms=3,
                    ls="--" if name == "sharp-direct" else "-",
                    alpha=0.5 if name == "sharp-pcgrad" else 1.0,
                )
        axes[0].set_title("cos(logit term, attention term)", fontsize=9)
        axes[1].set_title("cos between SHARP granularities", fontsize=9)
        for ax in axes:
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0].set_ylabel("gradient cosine on student params")
        fig.tight_layout()
        fig.savefig(run_dir / "cosines.png", dpi=80)
        plt.close(fig)
        out.append("cosines.png")
    return out
