"""Peak host memory of one attention term's forward + backward at long context, old vs new.

    python -m bench.memory.attention            # N=4096, both masks, every path
    python -m bench.memory.attention --n 1024 --json

Each (term, path, mask) runs in a fresh subprocess: narrow Llama shapes (hidden 256, 4 query
heads, 2 kv heads, head dim 64; teacher 2 layers, student 1 layer, vocabulary 256, B=1)
produce real post-RoPE q/k through the capture; the student's are then made leaves, so the
measured backward is the term's own (into q, k), not the models'. Per path it reports the
term's peak of live tensor bytes above what was live before it (torch.profiler memory
events, as ``bench.step.memory``), the process' RSS high-water mark above its RSS before the
term (allocator caching included; only meaningful when the term, not the model forwards, set
the high-water mark), and the median forward + backward time. Ratios are to the new default
path measured in the same run.

Paths (``mask``: 'causal' is a Llama batch without padding, SDPA's is_causal flag;
'padded' adds left padding, so a boolean (B, 1, N, N) mask is captured):

* SHARP ``sdpa``: ``method.projection='sdpa'`` (the default before the recomputed path), with
  the kernel SDPA picks on this machine; ``sdpa-math``: the same with SDPA restricted to its
  math kernel, which is what CUDA runs for float32 q/k with ``enable_gqa`` (before the GQA
  expansion in `project_sdpa`); ``chunked-ckpt``: ``projection='chunked'`` as it was, query
  chunks under activation checkpointing (reached here by hiding the capture behind a plain
  `AttentionProbs`); ``recompute``: the new default, `project_recompute`.
* TinyBERT / MiniLM ``chunked-ckpt`` (before) and ``recompute`` (now), the same way.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

TERMS: dict[str, tuple[str, ...]] = {
    "sharp": ("sdpa", "sdpa-math", "chunked-ckpt", "recompute"),
    "tinybert": ("chunked-ckpt", "recompute"),
    "minilm": ("chunked-ckpt", "recompute"),
}
NEW = "recompute"
MASKS = ("causal", "padded")


class _Opaque:
    """A capture seen only through the `AttentionProbs` protocol: the objective then takes
    its generic checkpointed chunk path (the code path before `recompute_chunks`)."""

    def __init__(self, layer: Any) -> None:
        self._layer = layer

    @property
    def num_heads(self) -> int:
        return self._layer.num_heads

    @property
    def seq_len(self) -> int:
        return self._layer.seq_len

    def probs(self, start: int = 0, end: int | None = None) -> Any:
        return self._layer.probs(start, end)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_tensor_bytes(fn: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def child(term: str, path: str, mask: str, n: int, repeats: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import contextlib

    import torch
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sharp_core.models.capture import AttentionCapture, CapturedLayer
    from sharp_core.objectives.sharp import make_attention_objective
    from sharp_core.spec import MethodSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def llama(layers: int) -> torch.nn.Module:
        cfg = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=n,
            attn_implementation="sdpa",
        )
        return transformers.LlamaForCausalLM(cfg).eval()

    student, teacher = llama(1), llama(2)
    ids = torch.randint(0, 256, (1, n))
    attn = torch.ones(1, n, dtype=torch.long)
    if mask == "padded":
        attn[:, :16] = 0
    inputs = {"input_ids": ids, "attention_mask": attn}
    with torch.no_grad():
        with AttentionCapture(student, [0]) as cs:
            student(**inputs)
        with AttentionCapture(teacher, [1]) as ct:
            teacher(**inputs)
    rec = cs.layers[0]
    q = rec.query.detach().requires_grad_()
    k = rec.key.detach().requires_grad_()
    s_layer = CapturedLayer(q, k, rec.scaling, rec.mask, rec.is_causal)
    t_layer = ct.layers[1]
    del student, teacher, cs, ct
    projection = "sdpa" if path.startswith("sdpa") else "chunked"
    method = MethodSpec(name=term, projection=projection)
    obj = make_attention_objective(method, student_shape=(1, 4), teacher_shape=(2, 4), seq_len=n)
    wrap = _Opaque if path == "chunked-ckpt" else (lambda x: x)
    s_maps, t_maps = {0: wrap(s_layer)}, {1: wrap(t_layer)}
    valid = attn.bool()

    def kernel() -> contextlib.AbstractContextManager[Any]:
        return sdpa_kernel(SDPBackend.MATH) if path == "sdpa-math" else contextlib.nullcontext()

    def step() -> None:
        q.grad = k.grad = None
        with kernel():
            terms = obj(s_maps, t_maps, valid)
            sum(terms.values()).backward()

    rss0 = _rss_bytes()
    hw0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up; also sets the RSS high-water mark
    hw1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "term": term,
        "path": path,
        "mask": mask,
        "n": n,
        "peak_tensor_mib": _peak_tensor_bytes(step) / 2**20,
        "rss_hwm_mib": (hw1 - rss0) / 2**20 if hw1 > hw0 else None,
        "ms": 1e3 * statistics.median(times),
    }


def _run_child(term: str, path: str, mask: str, n: int, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.memory.attention", "--child", term, path, mask]
    cmd += ["--n", str(n), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"term": term, "path": path, "mask": mask, "n": n, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    new = {(r["term"], r["mask"]): r for r in rows if r["path"] == NEW and "error" not in r}
    lines = [
        f"{'term':9} {'mask':7} {'path':13} {'peak MiB':>9} {'RSS MiB':>8} {'ms':>8} "
        f"{'x new mem':>9} {'x new time':>10}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['term']:9} {r['mask']:7} {r['path']:13} error: {r['error'][-200:]}")
            continue
        ref = new.get((r["term"], r["mask"]))
        mem = r["peak_tensor_mib"] / ref["peak_tensor_mib"] if ref else float("nan")
        tim = r["ms"] / ref["ms"] if ref else float("nan")
        rss = f"{r['rss_hwm_mib']:8.0f}" if r["rss_hwm_mib"] is not None else f"{'-':>8}"
        lines.append(
            f"{r['term']:9} {r['mask']:7} {r['path']:13} {r['peak_tensor_mib']:9.1f} {rss} "
            f"{r['ms']:8.0f} {mem:9.2f} {tim:10.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory.attention", description=__doc__)
    p.add_argument("--n", type=int, default=4096, help="sequence length")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward (median)")
    p.add_argument("--terms", default=",".join(TERMS), help="comma list of " + ",".join(TERMS))
    p.add_argument("--masks", default=",".join(MASKS), help="comma list of " + ",".join(MASKS))
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--child", nargs=3, metavar=("TERM", "PATH", "MASK"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(*a.child, a.n, a.repeats)))
        return 0
    rows = [
        _run_child(term, path, mask, a.n, a.repeats)
        for mask in a.masks.split(",")
        for term in a.terms.split(",")
        for path in TERMS[term]
    ]
    if a.json:
        print(json.dumps(rows, indent=2))
    import torch

    print(
        f"one layer pair's term, forward + backward into the student's q/k; N={a.n}, B=1, "
        f"4 heads / 2 kv heads / head dim 64; torch {torch.__version__}, 1 thread",
        file=sys.stderr if a.json else sys.stdout,
    )
    print(_table(rows), file=sys.stderr if a.json else sys.stdout)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
