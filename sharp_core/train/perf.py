"""Throughput numbers for the step line: FLOPs per token, the device's peak, MFU, memory.

Kept apart from the loop so that benchmarks report MFU with the trainer's own formula.
"""

from __future__ import annotations

import resource
import time

import torch

__all__ = ["PEAK_FLOPS", "Throughput", "flops_per_token", "peak_flops", "peak_mem_mb"]

#: Dense bf16 peak of cards we know, for MFU (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(student: torch.nn.Module, teacher: torch.nn.Module | None) -> float:
    """6·N_student (forward + backward) + 2·N_teacher (forward only), embeddings excluded."""

    def n(mod: torch.nn.Module) -> int:
        emb = sum(
            p.numel()
            for name, p in mod.named_parameters()
            if "embed" in name or "wte" in name or "wpe" in name
        )
        return sum(p.numel() for p in mod.parameters()) - emb

    return 6 * n(student) + (2 * n(teacher) if teacher is not None else 0)


def peak_flops(dev: torch.device) -> float | None:
    """The card's dense bf16 peak (FLOP/s) when it is one of `PEAK_FLOPS`, else None."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for k, v in PEAK_FLOPS.items():
        if k in name:
            return v
    return None


def peak_mem_mb(dev: torch.device) -> float:
    """Peak allocated CUDA memory, or the process' peak RSS on CPU (MiB)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Throughput:
    """tokens/s, peak memory and MFU over the steps since the previous log line.

    `read` synchronises the device (the loop's only host sync of a step) and restarts the
    clock. Tokens are *input* tokens (for classification: padded example tokens), over
    every rank.
    """

    def __init__(
        self, dev: torch.device, flops: float, *, world_size: int = 1, log_every: int = 1
    ) -> None:
        self.dev = dev
        self.flops = flops
        self.peak = peak_flops(dev)
        self.world_size = world_size
        self.log_every = log_every
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.t0 = time.perf_counter()

    def read(self, step: int, tokens_per_step: int) -> dict[str, float]:
        """{tokens_per_s, peak_mem_mb[, mfu]} after optimizer step `step`; tokens_per_s is 0
        on a log line that is not a multiple of log_every (the last step)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        dt = time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        on_beat = step % self.log_every == 0
        tokens_s = tokens_per_step * self.log_every / max(dt, 1e-9) if on_beat else 0.0
        tokens_s *= self.world_size  # every rank processes as many
        out = {"tokens_per_s": tokens_s, "peak_mem_mb": peak_mem_mb(self.dev)}
        if self.peak:
            out["mfu"] = tokens_s * self.flops / self.peak
        return out
