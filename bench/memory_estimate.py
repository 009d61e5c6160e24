"""The memory estimate (`sharp_core.train.memory.estimate`) against a measured CPU step::

    python -m bench.memory_estimate

Why on the CPU: the estimate's per-element formulas do not depend on the device, and the CPU
step's tensor bytes are measured exactly (`bench.step.memory`: resident state + the step's
high-water mark from the profiler's allocation events, like CUDA's max_memory_allocated).
The CUDA-only terms (the fixed reserve, bf16 copies) are left out (``cuda=False``).
Prints, per shape, the estimate and the measured peak side by side and their ratio.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.step.memory import cpu_step_peak_bytes, resident_bytes
from sharp_core.models.loading import LocalResolver, load_model
from sharp_core.objectives import losses
from sharp_core.spec import DatasetSpec, JobSpec, MethodSpec, ModelSpec, TrainingSpec
from sharp_core.train.distributed import checkpoint_blocks
from sharp_core.train.memory import ModelSizes, estimate
from sharp_core.train.setup import Setup
from sharp_core.train.state import adamw
from sharp_core.train.step import micro_step

MB = 2**20


def _llama(hidden: int, layers: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3 // 64 * 64,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,
        "num_key_value_heads": hidden // 128,
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
    }


class _Step:
    def __init__(self, S: Setup, opt: torch.optim.Optimizer, x: torch.Tensor):
        self.S, self.opt, self.x = S, opt, x

    def step(self) -> None:
        x = self.x
        terms, _ = micro_step(self.S, x, n_tokens=x[:, 1:].numel(), n_seqs=x.shape[0])
        terms["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure(batch: int, seq: int, ac: bool, hidden: int, vocab: int) -> dict[str, float]:
    spec = JobSpec(
        teacher=ModelSpec(init="config", config=_llama(hidden, 2, vocab)),
        student=ModelSpec(init="config", config=_llama(hidden, 4, vocab)),
        dataset=DatasetSpec(source="files", files=["<random ids>"]),
        method=MethodSpec(name="kd"),
        training=TrainingSpec(batch_size=batch, seq_len=seq, activation_checkpointing=ac),
    )
    dev = torch.device("cpu")
    torch.manual_seed(0)
    kw = {"resolver": LocalResolver(), "device": dev}
    teacher = load_model(spec.teacher, role="teacher", **kw).eval().requires_grad_(False)
    student = load_model(spec.student, role="student", **kw).train()
    if ac:
        checkpoint_blocks(student)
    S = Setup(spec, dev, None, vocab, teacher, student, None, None, None, None)  # type: ignore[arg-type]
    S.logit_loss = losses.logit_objective
    params = list(student.parameters())
    opt = adamw(params, [], spec.training, dev)
    runner = _Step(S, opt, torch.randint(0, vocab, (batch, seq)))
    runner.step()  # AdamW's state exists from here on, as in every step but the first
    resident = resident_bytes(student, teacher, opt)
    peak = resident + cpu_step_peak_bytes(runner)
    e = estimate(
        spec,
        ModelSizes.of(student),
        ModelSizes.of(teacher),
        world_size=1,
        student_parallel="ddp",
        cuda=False,
    )
    return {
        "measured": peak / MB,
        "estimate": e.total / MB,
        **{k: v / MB for k, v in e.components.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("B     N  AC   estimate MB  measured MB  est/meas  (activations, logits MB)")
    for batch, seq in [(1, 512), (2, 1024), (4, 1024)]:
        for ac in (False, True):
            r = measure(batch, seq, ac, a.hidden, a.vocab)
            print(
                f"{batch:<2} {seq:5} {'on ' if ac else 'off'}  {r['estimate']:11.1f}  "
                f"{r['measured']:11.1f}  {r['estimate'] / r['measured']:8.2f}  "
                f"({r['activations']:.1f}, {r['logits']:.1f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
