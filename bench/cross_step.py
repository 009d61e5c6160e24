"""The cross-tokenizer step, fused against dense, side by side in one process: seconds per
training micro-step (both forwards and the backward) and the step's tensor peak, at a narrow
shape with real vocabulary sizes, and under ``--dtype bf16`` how far each path's loss and
gradients move from a float32 step::

    python -m bench.cross_step [--mode uld|gold] [--rounds 5] [--seq-len 2048 [4096 ...]]
        [--batch 1] [--device cpu|cuda] [--dtype fp32|bf16] [--vocab 32000 128256] [--json]

Both variants run on the same models and rows: the fused path (`fused_cross_
objective`: hidden states and heads, a chunk of target rows at a time) and the dense one
(whole logits of both models; forced with ``Setup.logit_path = "dense"``). Rounds
alternate the two (fused, dense, fused, …) after one warm-up step each, so load on a shared
machine falls on both; the script prints each variant's median seconds, their ratio, the
peaks (CPU: `bench.step.memory.cpu_step_peak_bytes`; CUDA: ``max_memory_allocated`` above
what was allocated before the step) and both losses (which must agree).

``--dtype bf16``: both variants' forwards and the fused head GEMMs under bf16 autocast, as a
GPU job runs them (``amp_dtype``), the teacher's weights in the job's dtype on that device
(bf16 on CUDA, float32 on a CPU). A float32 step of the dense path (no autocast, a float32
copy of the teacher, TF32 off) is the reference: the report gives, for fused and dense, the
relative difference of loss, ce and kd and the norm-wise relative difference of the student's
whole gradient, ‖g − g_ref‖ / ‖g_ref‖, against it and between the two. Expected at bf16
rounding (u = 2⁻⁸ ≈ 3.9e-3; tests/test_fused_bf16.py states the tolerances).

The shape is `bench.plan`'s narrow ULD one: student Llama hidden 256 × 1 layer with a
32 000-token BPE, teacher hidden 256 × 2 layers with 128 256 tokens (both tokenizers trained
on the pydoc text and padded with added tokens, `bench.plan.cross_tokenizers`); ``--vocab``
sets other sizes (e.g. a small shape for a CPU check). Several ``--seq-len`` reuse the models.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from bench.plan import SHAPES, Shape, _cross_rows, _spec, cross_tokenizers
from bench.step.memory import cpu_step_peak_bytes
from sharp_core.models.loading import LocalResolver, load_model
from sharp_core.objectives.cross_tokenizer import CrossTokenizer
from sharp_core.train.setup import Setup
from sharp_core.train.step import micro_step


def _peak_bytes(runner: Any, dev: torch.device) -> int:
    """The step's tensor high-water mark above what was allocated before it."""
    if dev.type != "cuda":
        return cpu_step_peak_bytes(runner)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    runner.step()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _diffs(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    """Relative differences of loss, ce, kd and the norm-wise one of the student gradient."""
    out: dict[str, float] = {k: _rel(got[k], want[k]) for k in ("loss", "ce", "kd") if k in want}
    g, r = got["grad"], want["grad"]
    out["grad"] = float((g - r).norm() / r.norm().clamp_min(1e-30))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["uld", "gold"], default="uld")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--vocab", type=int, nargs=2, metavar=("V_S", "V_T"), help="default 32000 128256"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per shape")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 2
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    amp = torch.bfloat16 if a.dtype == "bf16" else None

    [base] = [s for s in SHAPES["cross-narrow"] if s.cross == "uld"]
    sh = replace(base, cross=a.mode, batch=a.batch)
    if a.vocab:
        vs, vt = a.vocab
        sh = replace(
            sh,
            student={**sh.student, "vocab_size": vs},
            teacher={**sh.teacher, "vocab_size": vt},
            cross_bpe=(min(sh.cross_bpe[0], vs), min(sh.cross_bpe[1], vt)),
        )
    spec = _spec(sh)
    torch.manual_seed(0)
    kw: dict[str, Any] = {"resolver": LocalResolver(), "device": dev}
    teacher = load_model(spec.teacher, role="teacher", **kw).eval().requires_grad_(False)  # type: ignore[arg-type]
    student = load_model(spec.student, role="student", **kw).train()  # type: ignore[arg-type]
    # the float32 reference's teacher: the same weights, upcast (bf16 on CUDA: exact)
    teacher32 = teacher if amp is None else copy.deepcopy(teacher).float()
    s_tok, t_tok = cross_tokenizers(sh)
    ct = CrossTokenizer.build(a.mode, s_tok, t_tok, sh.teacher["max_position_embeddings"])
    models = {"teacher": teacher, "teacher32": teacher32, "student": student}
    for seq in a.seq_len:
        x = _cross_rows(replace(sh, seq=seq), s_tok, sh.batch, 0).to(dev)
        report(a, replace(sh, seq=seq), x, dev, amp, models, ct)
    return 0


def report(
    a: argparse.Namespace,
    sh: Shape,
    x: torch.Tensor,
    dev: torch.device,
    amp: torch.dtype | None,
    models: dict[str, Any],
    ct: CrossTokenizer,
) -> None:
    """Time, peak and (bf16) the differences of one shape, printed."""
    spec, V = _spec(sh), sh.student["vocab_size"]
    teacher, student = models["teacher"], models["student"]
    n_tokens = x[:, 1:].numel()
    setups = {
        name: Setup(spec, dev, None, V, teacher, student, None, None, None, None, cross=ct)  # type: ignore[arg-type]
        for name in ("fused", "dense")
    }
    setups["dense"].logit_path = "dense"
    seen: dict[str, dict[str, Any]] = {}

    def run(S: Any, amp_dtype: torch.dtype | None, keep: str | None) -> None:
        terms, _ = micro_step(S, x, n_tokens=n_tokens, n_seqs=sh.batch, amp_dtype=amp_dtype)
        terms["loss"].backward()
        if keep is not None:  # values and the whole student gradient, once per variant
            grads = [p.grad.reshape(-1).float() for p in student.parameters() if p.grad is not None]
            vals: dict[str, Any] = {
                k: float(terms[k].detach()) for k in ("loss", "ce", "kd") if k in terms
            }
            seen[keep] = {**vals, "grad": torch.cat(grads)}
        # the same weights for both: the gradient is dropped, not applied
        student.zero_grad(set_to_none=True)

    class Runner:
        def __init__(self, name: str) -> None:
            self.name, self.device = name, dev

        def step(self) -> None:
            run(setups[self.name], amp, None)

    runners = {n: Runner(n) for n in setups}
    for n in setups:  # warm-up, and each variant's values and gradient at the same weights
        run(setups[n], amp, n)
    if amp is not None:
        t32 = models["teacher32"]
        ref = Setup(spec, dev, None, V, t32, student, None, None, None, None, cross=ct)  # type: ignore[arg-type]
        ref.logit_path = "dense"
        run(ref, None, "fp32")
    times: dict[str, list[float]] = {n: [] for n in setups}
    for _ in range(a.rounds):
        for name, r in runners.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            r.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t0)
    peaks = {n: _peak_bytes(r, dev) for n, r in runners.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    out: dict[str, Any] = {
        "shape": f"{a.mode} Vs{V} Vt{sh.teacher['vocab_size']} B{sh.batch} N{sh.seq}",
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "dtype": a.dtype,
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "logit_path": setups["fused"].logit_path,
        "seconds": med,
        "fused_over_dense_time": med["fused"] / med["dense"],
        "peak_mb": {n: p / 2**20 for n, p in peaks.items()},
        "fused_over_dense_peak": peaks["fused"] / peaks["dense"],
        "loss": {n: seen[n]["loss"] for n in setups},
        "rounds": a.rounds,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
    }
    if amp is not None:
        out["rel_diff"] = {
            "fused_vs_fp32": _diffs(seen["fused"], seen["fp32"]),
            "dense_vs_fp32": _diffs(seen["dense"], seen["fp32"]),
            "fused_vs_dense": _diffs(seen["fused"], seen["dense"]),
        }
        out["loss"]["fp32"] = seen["fp32"]["loss"]
    if a.json:
        print(json.dumps(out), flush=True)
        return
    print(f"{out['shape']}  {out['device']} {a.dtype}  (fused path: {out['logit_path']})")
    for n in setups:
        print(
            f"  {n:<6} {med[n]:7.3f} s/step  peak {peaks[n] / 2**20:8.1f} MB  "
            f"loss {out['loss'][n]:.7f}"
        )
    print(
        f"  fused/dense: time {out['fused_over_dense_time']:.2f}, "
        f"peak {out['fused_over_dense_peak']:.2f}"
    )
    for k, d in out.get("rel_diff", {}).items():
        print(f"  {k:<15}" + "  ".join(f"{q} {v:.1e}" for q, v in d.items()))


if __name__ == "__main__":
    raise SystemExit(main())
