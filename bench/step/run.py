"""One benchmark run: build the workload, time the steps in interleaved rounds, measure
memory and MFU, run the checks, and return the JSON document (schema 2)."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.machine import machine_info
from bench.step import checks
from bench.step.memory import cpu_step_peak_bytes, resident_bytes
from bench.step.models import Workload, job_spec, shape
from bench.step.presets import PRESETS, Preset
from bench.step.profiling import profile_step
from bench.step.runners import (
    ALL_STEPS,
    STEP_DESCRIPTIONS,
    STEP_NAMES,
    LigerKDRunner,
    MicroStepRunner,
    Runner,
    StepSkipped,
    make_runner,
)
from bench.step.timing import count_host_syncs, matmul_rate_bf16, paired_ratio, timed_step
from sharp_core.train import perf


@dataclass
class StepResult:
    name: str
    description: str
    ms: list[float] = field(default_factory=list)
    ms_median: float | None = None
    tokens_per_s: float | None = None
    peak_mem_mib: float | None = None
    step_mem_mib: float | None = None
    mfu_table: float | None = None
    mfu_measured: float | None = None
    host_syncs: int | None = None
    ratio_to_kd: float | None = None
    ratio_to_kd_paired: float | None = None
    mem_ratio_to_kd: float | None = None
    profile: dict[str, float] | None = None
    error: str | None = None
    skipped: str | None = None  # why the step cannot run on this machine (not an error)


def _targets(preset: Preset, results: dict[str, StepResult]) -> list[dict[str, Any]]:
    out = []
    for metric, step, limit in preset.targets:
        r = results.get(step)
        value: float | None = None
        if r is not None and r.error is None:
            if metric == "time_ratio":
                value = r.ratio_to_kd
            elif metric == "mem_ratio":
                value = r.mem_ratio_to_kd
            elif metric == "mfu_min":
                value = r.mfu_table if r.mfu_table is not None else r.mfu_measured
        paired = r.ratio_to_kd_paired if r is not None and metric == "time_ratio" else None
        met = None if value is None else (value >= limit if metric == "mfu_min" else value <= limit)
        out.append(
            {
                "metric": metric,
                "step": step,
                "limit": limit,
                "value": value,
                "value_paired": paired,
                "met": met,
            }
        )
    return out


def _resolve(preset_name: str, device: str | None) -> tuple[Preset, torch.device]:
    """The preset and the device it runs on, refused with the reason if this machine can't."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}")
    preset = PRESETS[preset_name]
    dev = torch.device(device or preset.device)
    if preset.requires_cuda and dev.type != "cuda":
        raise RuntimeError(
            f"preset {preset.name!r} needs a CUDA GPU (bf16 autocast, "
            f"its shapes); --device {dev} is not one"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"preset {preset.name!r} needs a CUDA GPU and none is available "
            f"(torch {torch.__version__}); run it on a GPU machine, or use --preset tiny-cpu"
        )
    return preset, dev


class _Run:
    """The steps of one run, their results, and what happens when one fails."""

    def __init__(self, w: Workload, steps: tuple[str, ...], log: Callable[[str], None]) -> None:
        self.w = w
        self.results = {name: StepResult(name, STEP_DESCRIPTIONS[name]) for name in steps}
        self.runners: dict[str, Runner] = {}
        self.peaks: dict[str, list[tuple[int, int]]] = {name: [] for name in steps}
        for name in steps:
            try:
                self.runners[name] = make_runner(name, w)
            except StepSkipped as e:
                self.results[name].skipped = str(e)
                log(f"skipping {name}: {e}")
            except Exception as e:  # noqa: BLE001 - one failing step must not hide the others
                self.fail(name, e)

    def fail(self, name: str, e: BaseException) -> None:
        if isinstance(e, torch.OutOfMemoryError):
            self.results[name].error = f"out of memory: {str(e).splitlines()[0]}"
        else:
            self.results[name].error = f"{type(e).__name__}: {e}"
        r = self.runners.pop(name, None)
        if r is not None:
            r.close()
        gc.collect()
        if self.w.device.type == "cuda":
            torch.cuda.empty_cache()

    def rounds(self, warmup: int, repeats: int, log: Callable[[str], None]) -> None:
        """Interleaved rounds (ce, kd, sharp, eager, ce, kd, ...): a change of machine load or
        clock during the run hits every step alike instead of one block of repeats, which
        matters for the ratios on a shared CPU. Warm-up rounds first (AdamW state, compile)."""
        for rnd in range(warmup + repeats):
            timed = rnd >= warmup
            log(
                f"{'round' if timed else 'warm-up'} {rnd - warmup + 1 if timed else rnd + 1}"
                f"/{repeats if timed else warmup}"
            )
            for name in list(self.runners):
                runner = self.runners[name]
                try:
                    runner.activate()
                    ms, peak, above = timed_step(runner)
                except Exception as e:  # noqa: BLE001
                    self.fail(name, e)
                    continue
                if timed:
                    self.results[name].ms.append(ms)
                    if peak is not None and above is not None:
                        self.peaks[name].append((peak, above))

    def finish(
        self,
        name: str,
        flops: dict[str, float],
        peak_flops: dict[str, Any],
        profile: bool,
        log: Callable[[str], None],
    ) -> None:
        """Memory, speed, MFU, host syncs and profile of one timed step."""
        w, runner, res = self.w, self.runners[name], self.results[name]
        runner.activate()
        if w.device.type == "cuda":
            peak = max(p for p, _ in self.peaks[name])
            step_mem = max(a for _, a in self.peaks[name])
            res.host_syncs = count_host_syncs(runner)
        else:
            runner.close()
            gc.collect()
            resident = resident_bytes(w.teacher, w.student, w.opt)
            step_mem = cpu_step_peak_bytes(runner)
            peak = resident + step_mem
        res.peak_mem_mib = round(peak / 2**20, 1)
        res.step_mem_mib = round(step_mem / 2**20, 1)
        res.ms_median = statistics.median(res.ms)
        res.tokens_per_s = w.x.numel() / (res.ms_median / 1e3)
        if w.device.type == "cuda":
            # ce runs no teacher forward: 6·N_student only.
            fpt = flops["ce" if name == "ce" else "distill"]
            if peak_flops["table"]:
                res.mfu_table = res.tokens_per_s * fpt / peak_flops["table"]
            if peak_flops["measured_bf16_matmul"]:
                res.mfu_measured = res.tokens_per_s * fpt / peak_flops["measured_bf16_matmul"]
        if profile:
            log(f"profiling {name}")
            res.profile = profile_step(runner)
        runner.close()

    def checks(self, repeats: int) -> dict[str, Any]:
        """The before/after comparisons of the selected variants (`checks`)."""
        out: dict[str, Any] = {}
        chunked = self.runners.get("sharp_chunked")
        if isinstance(chunked, MicroStepRunner):
            # on the chunked step's own objective, switched between the two paths and restored
            try:
                out["projection_term_rel_diff"] = checks.compare_projection_terms(chunked)
                out["objective_fwd_bwd"] = checks.time_objective(chunked, max(5, repeats))
            except Exception as e:  # noqa: BLE001
                out["projection_error"] = f"{type(e).__name__}: {e}"
            chunked.close()
        separate, kd = self.runners.get("kd_separate"), self.runners.get("kd")
        if isinstance(separate, MicroStepRunner) and isinstance(kd, MicroStepRunner):
            try:
                out["kd_separate_vs_kd"] = checks.compare_losses(kd, separate)
                out["logit_fwd_bwd"] = checks.time_logit_losses(kd, max(5, repeats))
            except Exception as e:  # noqa: BLE001
                out["kd_separate_error"] = f"{type(e).__name__}: {e}"
        liger = self.runners.get("kd_liger")
        if isinstance(liger, LigerKDRunner):
            try:
                out["liger_vs_logit_objective"] = checks.compare_liger(liger)
            except Exception as e:  # noqa: BLE001
                out["liger_error"] = f"{type(e).__name__}: {e}"
        return out

    def ratios_to_kd(self) -> None:
        kd = self.results.get("kd")
        if kd is None or not kd.ms_median:
            return
        for r in self.results.values():
            if r.ms_median is not None:
                r.ratio_to_kd = r.ms_median / kd.ms_median
            if r.ms and len(r.ms) == len(kd.ms):
                # Median over rounds of this step's time / kd's time in the same round: the
                # steps of a round run back to back, so a slow drift of the machine's load
                # cancels in each quotient (a shared CPU drifts a lot).
                r.ratio_to_kd_paired = paired_ratio(r.ms, kd.ms)
            if r.peak_mem_mib is not None and kd.peak_mem_mib:
                r.mem_ratio_to_kd = r.peak_mem_mib / kd.peak_mem_mib


def run_benchmark(
    preset_name: str,
    *,
    steps: tuple[str, ...] = STEP_NAMES,
    repeats: int | None = None,
    warmup: int | None = None,
    compile_: bool = False,
    profile: bool = False,
    device: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run the benchmark and return the JSON document (see `bench.step`'s docstring)."""
    preset, dev = _resolve(preset_name, device)
    repeats = preset.repeats if repeats is None else repeats
    warmup = preset.warmup if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    for s in steps:
        if s not in ALL_STEPS:
            raise ValueError(f"unknown step {s!r}; choose from {', '.join(ALL_STEPS)}")

    log(f"building models for {preset.name} on {dev} ...")
    w = Workload.build(preset, dev, compile_)
    teacher, student = w.teacher, w.student
    flops = {
        "distill": perf.flops_per_token(student, teacher),
        "ce": perf.flops_per_token(student, None),
    }
    lm_head = (
        6 * student.get_output_embeddings().weight.numel()
        + 2 * teacher.get_output_embeddings().weight.numel()
    )
    peak_flops = {
        "table": perf.peak_flops(dev),
        "measured_bf16_matmul": matmul_rate_bf16(dev) if dev.type == "cuda" else None,
    }

    run = _Run(w, steps, log)
    run.rounds(warmup, repeats, log)
    for name in list(run.runners):
        try:
            run.finish(name, flops, peak_flops, profile, log)
        except Exception as e:  # noqa: BLE001
            run.fail(name, e)
    checks_doc = run.checks(repeats)
    run.ratios_to_kd()

    return {
        "benchmark": "bench.step",
        "schema": 2,
        "command": command,
        "preset": {
            "name": preset.name,
            "note": preset.note,
            "batch": preset.batch,
            "seq_len": preset.seq_len,
            "tokens_per_step": w.x.numel(),
            "device": str(dev),
            "autocast": "bf16" if dev.type == "cuda" and preset.amp else None,
            "compile": compile_,
            "warmup": warmup,
            "repeats": repeats,
            "teacher": shape(teacher),
            "student": shape(student),
            "method": job_spec(preset, "sharp", compile_).method.model_dump(mode="json"),
        },
        "machine": machine_info(dev),
        "timing": "cuda events, median" if dev.type == "cuda" else "perf_counter, median",
        "memory": (
            "torch.cuda.max_memory_allocated over the timed steps (tensor bytes)"
            if dev.type == "cuda"
            else "resident tensors (weights, buffers, AdamW state) + one extra step's peak of "
            "live tensor bytes from torch.profiler(profile_memory=True)"
        ),
        "flops_per_token": {
            "non_embedding": flops["distill"],
            "with_lm_head": flops["distill"] + lm_head,
        },
        "peak_flops": peak_flops,
        "steps": [r.__dict__ for r in run.results.values()],
        "targets": _targets(preset, run.results),
        "checks": checks_doc,
    }
