"""Building a config-initialised model: the old path against the one the trainer uses now.

    python -m bench.build [--shape opt-1.3b|opt-125m|tiny] [--device cpu|cuda]
                          [--dtype bfloat16|float32] [--repeats 3] [--json]

- **old**: what ``sharp_core.models.loading.load_model`` did before issue 17, ``from_config`` on the
  default device (the CPU) in the weights' dtype, then ``.to(device)``.
- **new**: ``load_model`` itself (``init: config``), which builds inside a
  ``torch.device(device)`` context, so parameters are allocated and initialised where they
  run.

After one untimed build of each, the two run interleaved (old, new, old, new, …), each after a ``gc.collect()`` and, on CUDA,
``empty_cache()``; a build is timed to its last queued kernel (``cuda.synchronize``). Printed:
each path's median and minimum seconds, the ratio of medians, and whether the two built
bit-identical weights from the same seed (expected on the CPU; on CUDA the new path draws
from the CUDA generator, so no). The shapes are those of ``bench.step``'s ``opt-1.3b-125m``
preset (facebook/opt-1.3b as teacher, opt-125m as student).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.configs import gpt2, opt
from sharp_core.models.loading import LocalResolver, load_model
from sharp_core.spec import ModelSpec

SHAPES: dict[str, dict[str, Any]] = {
    "opt-1.3b": opt(24, 32, 2048, 8192),
    "opt-125m": opt(12, 12, 768, 3072),
    "tiny": gpt2(2, 2, 64, 128, vocab_size=512, bos_token_id=0, eos_token_id=0),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_old(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(
        device
    )


def build_new(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    name = str(dtype).removeprefix("torch.")
    ms = ModelSpec(init="config", config=cfg, dtype=name)  # type: ignore[arg-type]
    return load_model(ms, role="teacher", resolver=LocalResolver(), device=device)


def measure(shape: str, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    cfg = SHAPES[shape]
    times: dict[str, list[float]] = {"old": [], "new": []}
    identical = None
    params = 0
    for fn in (build_old, build_new):  # untimed: imports, allocator and kernel warm-up
        fn(cfg, device, dtype)
        _sync(device)
    for r in range(repeats):
        built = {}
        for name, fn in (("old", build_old), ("new", build_new)):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(r)
            t0 = time.perf_counter()
            model = fn(cfg, device, dtype)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if r == 0:
                built[name] = model
                params = sum(p.numel() for p in model.parameters())
            del model
        if r == 0:
            a, b = built["old"].state_dict(), built["new"].state_dict()
            identical = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
            del a, b, built
    out: dict[str, Any] = {
        "shape": shape,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "params": params,
        "repeats": repeats,
        "identical_weights": identical,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for name, values in times.items():
        out[name] = {
            "median_s": round(statistics.median(values), 3),
            "min_s": round(min(values), 3),
            "all_s": [round(v, 3) for v in values],
        }
    out["speedup"] = round(out["old"]["median_s"] / out["new"]["median_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.build: --device cuda but CUDA is not available here", file=sys.stderr)
        return 2
    res = measure(args.shape, device, getattr(torch, args.dtype), args.repeats)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['shape']} ({res['params'] / 1e6:.1f}M params) on {res['device']} in "
            f"{res['dtype']}: old {res['old']['median_s']} s, new {res['new']['median_s']} s "
            f"(median of {res['repeats']}; {res['speedup']}x); same weights: "
            f"{res['identical_weights']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
