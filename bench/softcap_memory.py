"""Peak host memory of one KD training micro-step (forward + backward) with Gemma-2 heads,
whose forwards soft-cap the logits (``final_logit_softcapping`` 30, Gemma's 256 000-entry
vocabulary): the dense logit term (both models' whole (B, N, V) logits, what such models
got before soft-capping was fused) against the fused one (`sharp_core.objectives.fused`,
the cap applied chunk by chunk, the first micro-batch's parity check included).

``python -m bench.softcap_memory [--seq-len 1024] [--vocab 256000]``

Each variant runs in its own child process (ru_maxrss is a high-water mark) on the same
seeded narrow Gemma-2s (teacher hidden 128, 2 layers; student hidden 64, 1 layer, tied
head: the logits dominate); the script prints both peaks above the models' baseline, their
ratio and both step losses (which must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _gemma2(vocab: int, hidden: int, layers: int, seq_len: int):  # type: ignore[no-untyped-def]
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=hidden // 4, max_position_embeddings=seq_len, final_logit_softcapping=30.0,
        )
    )  # fmt: skip


def child(variant: str, seq_len: int, vocab: int) -> dict[str, float]:
    import resource

    import torch

    from sharp_core.spec import parse_spec
    from sharp_core.train.setup import Setup
    from sharp_core.train.step import micro_step

    torch.manual_seed(0)
    teacher = _gemma2(vocab, 128, 2, seq_len).eval().requires_grad_(False)
    student = _gemma2(vocab, 64, 1, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "c.txt"
        corpus.write_text("hello\n")
        spec = parse_spec(
            {
                "student": {"init": "config", "config": {"model_type": "gpt2"}},
                "teacher": {"model": tmp},
                "tokenizer": {"train": {"vocab_size": 300}},
                "dataset": {"files": [str(corpus)]},
                "method": {"name": "kd"},
                "training": {"seq_len": seq_len},
            }
        )
    S = Setup(
        spec=spec, device=torch.device("cpu"), tokenizer=None, vocab=vocab, teacher=teacher,
        student=student, data=None, objective=None, student_capture=None,
        teacher_capture=None, logit_path="dense" if variant == "dense" else None,
    )  # fmt: skip
    x = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    terms, _ = micro_step(S, {"input_ids": x}, n_tokens=seq_len - 1, n_seqs=1)
    terms["loss"].backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "loss": float(terms["loss"]),
        "path": str(S.logit_path),
        "peak_mb": peak,
        "step_extra_mb": peak - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.seq_len, a.vocab)))
        return
    out = {}
    for variant in ("dense", "fused"):
        cmd = [sys.executable, "-m", "bench.softcap_memory", "--child", variant]
        cmd += ["--seq-len", str(a.seq_len), "--vocab", str(a.vocab)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
        print(variant, out[variant], flush=True)
    ratio = out["dense"]["step_extra_mb"] / max(out["fused"]["step_extra_mb"], 1e-9)
    print(f"dense / fused step memory above the models: {ratio:.2f}x")


if __name__ == "__main__":
    main()
