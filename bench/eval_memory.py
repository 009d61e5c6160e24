"""Peak host memory of one held-out evaluation at Llama-3.1-8B vocabulary and length: the
model's full (B, N, V) logits (the old path) against the head run on 512 positions at a time
inside the forward (`sharp_core.evaluate.perplexity._ChunkedHead`).

``python -m bench.eval_memory [--seq-len 4096] [--vocab 128256] [--hidden 256]``

Each variant runs in its own child process (ru_maxrss is a high-water mark) on the same
seeded narrow Llama (1 layer, hidden 256: the logits dominate), one after the other; the
script prints both peaks, their ratio and both losses (which must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def child(variant: str, seq_len: int, vocab: int, hidden: int) -> dict[str, float]:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharp_core.evaluate import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq_len,
        )
    ).eval()
    blocks = torch.randint(0, vocab, (1, seq_len))
    rows = None if variant == "full_logits" else perplexity.EVAL_LOGIT_ROWS  # None: (1, N, V)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        loss, _ = perplexity.lm_loss(model, blocks, vocab, 1, torch.device("cpu"), rows=rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": loss, "peak_mb": peak, "eval_extra_mb": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.seq_len, a.vocab, a.hidden)))
        return
    out = {}
    for variant in ("full_logits", "chunked"):
        cmd = [sys.executable, "-m", "bench.eval_memory", "--child", variant]
        cmd += ["--seq-len", str(a.seq_len), "--vocab", str(a.vocab), "--hidden", str(a.hidden)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        print(variant, out[variant], flush=True)
    ratio = out["full_logits"]["eval_extra_mb"] / max(out["chunked"]["eval_extra_mb"], 1e-9)
    print(f"eval extra memory, full logits / chunked: {ratio:.1f}x")


if __name__ == "__main__":
    main()
