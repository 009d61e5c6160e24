"""The step benchmark's table: what a person reads (the JSON document is what is kept)."""

from __future__ import annotations

import math
import sys
from typing import Any


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v * scale, spec)


def render_table(doc: dict[str, Any], file: Any = None) -> None:
    """Print the results as a rich table (plain text when the output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    p, m = doc["preset"], doc["machine"]
    where = (
        m["gpu"] or f"{m['cpu']} ({m['cpus_usable']} usable cores, {m['torch_threads']} threads)"
    )
    t = p["teacher"]
    s = p["student"]
    title = (
        f"{p['name']}: teacher {t['layers']}x{t['heads']}x{t['hidden']}, student "
        f"{s['layers']}x{s['heads']}x{s['hidden']}, vocab {s['vocab']}, batch {p['batch']} x "
        f"{p['seq_len']}, {p['device']}{', bf16 autocast' if p['autocast'] else ''}"
        f"{', compiled' if p['compile'] else ''}; median of {p['repeats']} "
        f"after {p['warmup']} warm-up"
    )
    table = Table(
        title=title, caption=f"{where}; torch {m['torch']}, transformers {m['transformers']}"
    )
    cols = [
        "step",
        "ms/step",
        "tokens/s",
        "peak MiB",
        "step MiB",
        "MFU table",
        "MFU meas.",
        "x kd time",
        "x kd paired",
        "x kd mem",
        "syncs",
    ]
    for c in cols:
        table.add_column(c, justify="left" if c == "step" else "right")
    for r in doc["steps"]:
        if r["error"]:
            table.add_row(r["name"], f"[red]{r['error'][:80]}[/red]", *[""] * (len(cols) - 2))
            continue
        if r.get("skipped"):
            table.add_row(r["name"], f"skipped: {r['skipped'][:100]}", *[""] * (len(cols) - 2))
            continue
        table.add_row(
            r["name"],
            _fmt(r["ms_median"], ".1f"),
            _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["peak_mem_mib"], ",.0f"),
            _fmt(r["step_mem_mib"], ",.0f"),
            _fmt(r["mfu_table"], ".1%"),
            _fmt(r["mfu_measured"], ".1%"),
            _fmt(r["ratio_to_kd"], ".3f"),
            _fmt(r["ratio_to_kd_paired"], ".3f"),
            _fmt(r["mem_ratio_to_kd"], ".3f"),
            "-" if r["host_syncs"] is None else str(r["host_syncs"]),
        )
    console.print(table)
    pf = doc["peak_flops"]
    if pf["table"] or pf["measured_bf16_matmul"]:
        console.print(
            f"FLOP/token {doc['flops_per_token']['non_embedding'] / 1e9:.3f} G (non-embedding; "
            f"{doc['flops_per_token']['with_lm_head'] / 1e9:.3f} G with the LM heads); peak "
            f"bf16: table {_fmt(pf['table'], '.0f', 1e-12)} TFLOP/s, measured "
            f"{_fmt(pf['measured_bf16_matmul'], '.0f', 1e-12)} TFLOP/s"
        )
    for tg in doc["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[tg["met"]]
        paired = (
            f" (paired per round: {_fmt(tg['value_paired'], '.3f')})"
            if tg.get("value_paired") is not None
            else ""
        )
        console.print(
            f"target {tg['metric']} of {tg['step']} "
            f"{'>=' if tg['metric'] == 'mfu_min' else '<='} {tg['limit']}: "
            f"{_fmt(tg['value'], '.3f')}{paired} -> {verdict}"
        )
    for name, check in doc.get("checks", {}).items():
        console.print(f"check {name}: {check}")
    for r in doc["steps"]:
        if r.get("profile"):
            prof = r["profile"]
            step_ms = sum(prof.get(f"{ph}:total", 0.0) for ph in ("fwd", "bwd", "opt"))
            pt = Table(title=f"profile of '{r['name']}' (per step, inclusive of nested ranges)")
            pt.add_column("range")
            pt.add_column("ms", justify="right")
            pt.add_column("share of step", justify="right")
            for k, v in prof.items():
                pt.add_row(k, f"{v:.2f}", f"{v / step_ms:.1%}" if step_ms else "-")
            console.print(pt)
