"""Pruning cost: calibration time and peak extra memory against the number of blocks.

    python -m bench.prune [--blocks 64 256 1024] [--shape tiny-cpu|opt-1.3b] [--device cpu|cuda]
                          [--out bench-prune.json]

Why these numbers: issue 14 asks for calibration on 256 blocks of the tiny-cpu teacher in
under 10 s on 2 CPU cores, seconds (not minutes) for 1024 × 512 tokens through an
OPT-1.3b-sized teacher on a GPU, and peak extra memory O(parameters), not O(activations ×
samples). So the script times `sharp_core.models.prune.activation_importance` and the whole `prune`
call at several calibration sizes side by side in one run, and reports the peak memory above
the teacher's own forward pass: flat in the number of blocks means the statistics are running
ones. Weights are random (built from a config): the cost of scoring does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from typing import Any

import torch

from sharp_core.models.prune import PruneTarget, activation_importance, prune

SHAPES: dict[str, dict[str, Any]] = {
    # the tiny-cpu teacher of bench.quality: GPT-2 4 layers × 4 heads × 128, 512-token BPE
    "tiny-cpu": {
        "config": {
            "model_type": "gpt2",
            "n_layer": 4,
            "n_head": 4,
            "n_embd": 128,
            "n_positions": 128,
            "vocab_size": 512,
        },
        "seq_len": 128,
        "target": PruneTarget(layers=2, heads=2, ffn=256),
    },
    # OPT-1.3b's shape (24 × 32 × 2048, ffn 8192), random weights
    "opt-1.3b": {
        "config": {
            "model_type": "opt",
            "num_hidden_layers": 24,
            "num_attention_heads": 32,
            "hidden_size": 2048,
            "ffn_dim": 8192,
            "word_embed_proj_dim": 2048,
            "max_position_embeddings": 2048,
            "vocab_size": 50272,
        },
        "seq_len": 512,
        "target": PruneTarget(layers=12, heads=12, ffn=3072),
    },
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(n: int, bs: int, seq: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, bs):
        b = min(bs, n - start)
        yield {"input_ids": torch.randint(0, vocab, (b, seq), generator=g).to(device)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny-cpu")
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES[args.shape]
    dev = torch.device(args.device)
    cfg = dict(shape["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):
        teacher = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    seq, vocab = shape["seq_len"], config.vocab_size
    params = sum(p.numel() for p in teacher.parameters())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb()

    # the teacher's own forward at one batch: the baseline the scoring's extra memory is over
    with torch.inference_mode():
        teacher(**next(_batches(args.batch_size, args.batch_size, seq, vocab, dev)))
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak()
    rows = []
    for n in args.blocks:
        sync()
        t0 = time.perf_counter()
        imp = activation_importance(teacher, _batches(n, args.batch_size, seq, vocab, dev))
        sync()
        t_score = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = prune(teacher, shape["target"], batches=_batches(n, args.batch_size, seq, vocab, dev))
        sync()
        t_prune = time.perf_counter() - t0
        rows.append(
            {
                "blocks": n,
                "tokens": n * seq,
                "calibration_s": round(t_score, 3),
                "prune_s": round(t_prune, 3),
                "samples": imp.samples,
                "peak_extra_mb": round(peak() - base, 1),
                "params_after": res.params_after,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    for r in rows[1:]:
        r["time_ratio_vs_first"] = round(r["calibration_s"] / max(first["calibration_s"], 1e-9), 2)
    out = {
        "bench": "prune",
        "shape": args.shape,
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "params": params,
        "seq_len": seq,
        "batch_size": args.batch_size,
        "memory": "CUDA max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
        "baseline_mb": round(base, 1),
        "rows": rows,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
