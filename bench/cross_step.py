"""The cross-tokenizer step, fused against dense, side by side in one process: seconds per
training micro-step (both forwards and the backward) and the step's tensor peak, at a narrow shape with
real vocabulary sizes::

    python -m bench.cross_step [--mode uld|gold] [--rounds 5] [--seq-len 2048] [--batch 1]

Both variants run on the same models and rows: the fused path (`fused_cross_
objective`: hidden states and heads, a chunk of target rows at a time) and the dense one
(whole logits of both models; forced with ``Setup.logit_path = "dense"``). Rounds
alternate the two (fused, dense, fused, …) after one warm-up step each, so load on a shared
machine falls on both; the script prints each variant's median seconds, their ratio, the
peaks (`bench.step.memory.cpu_step_peak_bytes`) and both losses (which must agree).
The shape is `bench.plan`'s narrow ULD one: student Llama hidden 256 × 1 layer with a
32 000-token BPE, teacher hidden 256 × 2 layers with 128 256 tokens (both tokenizers trained
on the pydoc text and padded with added tokens, `bench.plan.cross_tokenizers`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["uld", "gold"], default="uld")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from bench.plan import SHAPES, _cross_rows, _spec, cross_tokenizers
    from bench.step.memory import cpu_step_peak_bytes
    from sharp_core.models.loading import LocalResolver, load_model
    from sharp_core.objectives.cross_tokenizer import CrossTokenizer
    from sharp_core.train.setup import Setup
    from sharp_core.train.step import micro_step

    [base] = [s for s in SHAPES["cross-narrow"] if s.cross == "uld"]
    sh = replace(base, cross=a.mode, seq=a.seq_len, batch=a.batch)
    spec = _spec(sh)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    kw: dict[str, Any] = {"resolver": LocalResolver(), "device": dev}
    teacher = load_model(spec.teacher, role="teacher", **kw).eval().requires_grad_(False)  # type: ignore[arg-type]
    student = load_model(spec.student, role="student", **kw).train()  # type: ignore[arg-type]
    s_tok, t_tok = cross_tokenizers(sh)
    ct = CrossTokenizer.build(a.mode, s_tok, t_tok, sh.teacher["max_position_embeddings"])
    x = _cross_rows(sh, s_tok, sh.batch, 0)
    V = sh.student["vocab_size"]
    n_tokens = x[:, 1:].numel()
    setups = {
        name: Setup(spec, dev, None, V, teacher, student, None, None, None, None, cross=ct)  # type: ignore[arg-type]
        for name in ("fused", "dense")
    }
    setups["dense"].logit_path = "dense"
    losses: dict[str, float] = {}

    class Runner:
        def __init__(self, name: str) -> None:
            self.name = name

        def step(self) -> None:
            S = setups[self.name]
            terms, _ = micro_step(S, x, n_tokens=n_tokens, n_seqs=sh.batch)
            terms["loss"].backward()
            losses.setdefault(self.name, float(terms["loss"].detach()))
            # the same weights for both: the gradient is dropped, not applied
            student.zero_grad(set_to_none=True)

    runners = {n: Runner(n) for n in setups}
    for r in runners.values():
        r.step()  # warm-up (and each variant's loss at the same weights)
    times: dict[str, list[float]] = {n: [] for n in setups}
    for _ in range(a.rounds):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.step()
            times[name].append(time.perf_counter() - t0)
    peaks = {n: cpu_step_peak_bytes(r) for n, r in runners.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    out = {
        "shape": f"{a.mode} Vs{V} Vt{sh.teacher['vocab_size']} B{sh.batch} N{sh.seq}",
        "logit_path": setups["fused"].logit_path,
        "seconds": med,
        "fused_over_dense_time": med["fused"] / med["dense"],
        "peak_mb": {n: p / 2**20 for n, p in peaks.items()},
        "fused_over_dense_peak": peaks["fused"] / peaks["dense"],
        "loss": losses,
        "rounds": a.rounds,
        "threads": a.threads,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['shape']}  (fused path: {out['logit_path']})")
        for n in setups:
            print(
                f"  {n:<6} {med[n]:7.3f} s/step  peak {peaks[n] / 2**20:8.1f} MB  "
                f"loss {losses[n]:.7f}"
            )
        print(
            f"  fused/dense: time {out['fused_over_dense_time']:.2f}, "
            f"peak {out['fused_over_dense_peak']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
