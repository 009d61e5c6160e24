"""Tensor bytes: what is resident before a step, and a CPU step's own high-water mark.

Why not RSS on a CPU: no allocator keeps a resettable peak there, and RSS is polluted by
glibc's caching and the process's history. Both counts are tensor bytes only (no allocator
caching, no Python objects), like CUDA's ``max_memory_allocated``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bench.step.timing import Steppable


def resident_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages of the given modules' tensors and optimizers' state
    (a sharded DTensor counts its local shard)."""
    seen: set[tuple[int, str]] = set()
    total = 0

    def add(t: Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, Tensor):
            return
        if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard only
            t = t.to_local()
        st = t.untyped_storage()
        key = (st.data_ptr(), str(t.device))
        if key in seen or st.nbytes() == 0:
            return
        seen.add(key)
        total += st.nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in [*o.parameters(), *o.buffers()]:
                add(t)
                add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                for v in state.values():
                    add(v)
    return total


def cpu_step_peak_bytes(runner: Steppable) -> int:
    """High-water mark of tensor bytes allocated by one step above what was live before it.

    One extra, untimed step under ``torch.profiler`` with ``profile_memory=True``: every
    CPU allocation and free is an event with a signed byte count; their running sum in time
    order is the step's live-tensor total, whose maximum is the step's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() != torch._C._autograd.DeviceType.CPU:
            continue
        live += e.nbytes()
        peak = max(peak, live)
    return peak
