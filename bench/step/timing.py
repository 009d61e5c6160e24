"""Timers: one step on the device's clock, two functions side by side, paired ratios.

Why paired ratios: on a shared CPU the load drifts during a run; two things timed back to
back in the same round see the same load, so the median over rounds of their quotient cancels
the drift where the quotient of two medians does not.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class Steppable(Protocol):
    device: torch.device

    def step(self) -> None: ...


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (both timed in the same round)."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def timed_step(runner: Steppable) -> tuple[float, int | None, int | None]:
    """One step: (milliseconds, CUDA peak bytes, CUDA peak bytes above the step's start).

    CUDA: a pair of events around the step, read after a synchronize; the peak counter is
    reset just before, so it is this step's high-water mark (resident tensors included).
    CPU: perf_counter; memory is measured separately (`memory.cpu_step_peak_bytes`).
    """
    dev = runner.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        resident = torch.cuda.memory_allocated(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        runner.step()
        end.record()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return start.elapsed_time(end), peak, peak - resident
    t0 = time.perf_counter()
    runner.step()
    return (time.perf_counter() - t0) * 1e3, None, None


def side_by_side(
    a: Callable[[], None],
    b: Callable[[], None],
    repeats: int,
    device: torch.device,
) -> tuple[list[float], list[float]]:
    """Milliseconds of ``a`` and of ``b``, each run once per round (a then b), ``repeats``
    rounds after one untimed round; each call timed between two device syncs."""

    def once(fn: Callable[[], None]) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - t0) * 1e3

    once(a), once(b)  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(once(a))
        tb.append(once(b))
    return ta, tb


def count_host_syncs(runner: Steppable) -> int:
    """Synchronising CUDA calls during one step, from torch's sync debug mode (CUDA only)."""
    torch.cuda.synchronize(runner.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def matmul_rate_bf16(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul rate (FLOP/s) of this card, n³ products, CUDA events."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    secs = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / secs
