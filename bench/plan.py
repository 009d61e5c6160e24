"""The job plan (`sharp_core.train.plan`) against measurement, on the CPU::

    python -m bench.plan                 # memory shapes + tiny-cpu throughput (~15 min loaded)
    python -m bench.plan --skip-throughput --shapes small   # the quick part

Memory: for each shape, the plan's per-rank estimate (``cuda=False``: fp32, no CUDA reserve)
beside the measured peak of one training step in that process (tensor bytes resident before
the step + the step's high-water mark from the profiler's allocation events, as
`bench.memory_estimate`), for one process and for DDP and FSDP2 on 2 gloo processes (each
rank measures itself; the larger rank is reported). Target: within ±25 %.

Cross-tokenizer shapes (``--shapes cross``, ``cross-narrow``): a ULD or GOLD step
(`sharp_core.train.step._cross_step`) with two byte-level BPE tokenizers trained on Python's
pydoc topics (different sizes, so different tokenisations of the same text) and padded with
added tokens to the shape's vocabularies (a real-size vocabulary's logits and chunk work
without a real-size corpus); the rows are the student's tokens of that text, which the
teacher re-reads in its own. The plan's teacher token ratio comes from the tokenizers on its
built-in sample (`sharp_core.train.plan.cross_tokens_of`), not from the measured rows: the
measured teacher length is reported beside it.

Throughput: the tiny-cpu preset's ce, kd and sharp steps are timed by `bench.step` (its own
subprocess); each step's tokens/s is then predicted by `sharp_core.train.plan.throughput`
from a step-cost table holding only the *other* steps' measurements (leave-one-out: the
plan never sees the row it predicts), as the service predicts a new job from finished ones.
Target: within ±30 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from bench.step.memory import resident_bytes

MB = 2**20


def _llama(hidden: int, layers: int, vocab: int, heads: int, kv: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3 // 64 * 64,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
    }


@dataclass(frozen=True)
class Shape:
    name: str
    student: dict[str, Any]
    teacher: dict[str, Any]
    batch: int  # global: per rank batch // world
    seq: int
    ac: bool = False
    world: int = 1
    mode: str = "ddp"
    cross: str | None = None  # "uld" | "gold": a cross-tokenizer step
    #: (student, teacher) tokenizer sizes of a cross shape: BPE trained to the first of
    #: `CROSS_BPE` (student, teacher), padded with added tokens to the configs' vocab_size
    cross_bpe: tuple[int, int] = (1000, 3000)


SMALL_S, SMALL_T = _llama(256, 4, 2048, 8, 2), _llama(256, 2, 2048, 8, 2)
NARROW_S, NARROW_T = _llama(256, 1, 128256, 4, 2), _llama(256, 2, 128256, 4, 2)


def _dense(*configs: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    return tuple({**c, "logit_scale": 2.0} for c in configs)


SHAPES = {
    "small": [
        Shape("llama-256x4 V2k B2 N1024", SMALL_S, SMALL_T, 2, 1024),
        Shape("llama-256x4 V2k B2 N1024 AC", SMALL_S, SMALL_T, 2, 1024, ac=True),
        Shape("llama-256x4 V2k B4 N512 DDP x2", SMALL_S, SMALL_T, 4, 512, world=2),
        Shape("llama-256x4 V2k B4 N512 FSDP x2", SMALL_S, SMALL_T, 4, 512, world=2, mode="fsdp"),
    ],
    "narrow": [Shape("narrow llama V128256 B1 N4096", NARROW_S, NARROW_T, 1, 4096)],
    # the dense logit path: a config attribute the fused loss does not apply (`fused.head_of`
    # refuses `logit_scale`; Llama's forward ignores it) makes the step build whole logits
    "dense": [
        Shape("dense llama-256x4 V2k B2 N1024", *_dense(SMALL_S, SMALL_T), 2, 1024),
        Shape("dense narrow V128256 B1 N1024", *_dense(NARROW_S, NARROW_T), 1, 1024),
        Shape("dense narrow V128256 B2 N512", *_dense(NARROW_S, NARROW_T), 2, 512),
    ],
    # cross-tokenizer steps: student and teacher vocabularies differ (both padded tokenizers)
    "cross": [
        Shape(
            "cross uld 128x2 Vs4k Vt8k B2 N512",
            _llama(128, 2, 4096, 4, 2),
            _llama(128, 1, 8192, 4, 2),
            2,
            512,
            cross="uld",
        ),
        Shape(
            "cross gold 128x2 Vs4k Vt8k B2 N512",
            _llama(128, 2, 4096, 4, 2),
            _llama(128, 1, 8192, 4, 2),
            2,
            512,
            cross="gold",
        ),
    ],
    "cross-narrow": [
        Shape(
            "cross uld narrow Vs32000 Vt128256 B1 N2048",
            _llama(256, 1, 32000, 4, 2),
            _llama(256, 2, 128256, 4, 2),
            1,
            2048,
            cross="uld",
            cross_bpe=(2000, 8000),
        ),
        Shape(
            "cross gold narrow Vs49152 Vt128256 B2 N1024",
            _llama(256, 1, 49152, 4, 2),
            _llama(256, 2, 128256, 4, 2),
            2,
            1024,
            cross="gold",
            cross_bpe=(2000, 8000),
        ),
    ],
    # CUDA only (--device cuda): the scale issue's 8B → 3B Llama shapes on one GPU, bf16
    "gpu-8b-3b": [
        Shape(
            "llama 8B→3B V128256 B1 N4096 AC",
            _llama(3072, 28, 128256, 24, 8) | {"intermediate_size": 8192},
            _llama(4096, 32, 128256, 32, 8) | {"intermediate_size": 14336},
            1,
            4096,
            ac=True,
        ),
        Shape(
            "llama 8B→3B V128256 B2 N2048 AC",
            _llama(3072, 28, 128256, 24, 8) | {"intermediate_size": 8192},
            _llama(4096, 32, 128256, 32, 8) | {"intermediate_size": 14336},
            2,
            2048,
            ac=True,
        ),
    ],
}


def _spec(sh: Shape):
    from sharp_core.spec import (
        DatasetSpec,
        JobSpec,
        MethodSpec,
        ModelSpec,
        ResourcesSpec,
        TrainingSpec,
    )

    return JobSpec(
        teacher=ModelSpec(init="config", config=sh.teacher),
        student=ModelSpec(init="config", config=sh.student),
        dataset=DatasetSpec(source="files", files=["<random ids>"]),
        method=MethodSpec(name="kd", cross_tokenizer=sh.cross),
        training=TrainingSpec(batch_size=sh.batch, seq_len=sh.seq, activation_checkpointing=sh.ac),
        resources=ResourcesSpec(gpus=sh.world, student_parallel=sh.mode, queue="cpu"),
    )


def _text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def cross_tokenizers(sh: Shape) -> tuple[Any, Any]:
    """(student, teacher) byte-level BPE tokenizers of a cross shape, trained on the pydoc
    text to ``sh.cross_bpe`` tokens and padded with added tokens ("<s…>", "<t…>": never in
    the text, never shared) to the configs' vocabularies."""
    from sharp_core.models.loading import train_bpe_tokenizer

    out = []
    for n, cfg, tag in zip(sh.cross_bpe, (sh.student, sh.teacher), "st", strict=True):
        tok = train_bpe_tokenizer([_text()], n)
        tok.add_tokens([f"<{tag}{i}>" for i in range(cfg["vocab_size"] - len(tok))])
        assert len(tok) == cfg["vocab_size"], (len(tok), cfg["vocab_size"])
        out.append(tok)
    return out[0], out[1]


def _cross_rows(sh: Shape, s_tok: Any, b: int, rank: int) -> torch.Tensor:
    """b rows of ``sh.seq`` consecutive student tokens of the pydoc text, from spread-out
    starts (different text per row and rank)."""
    ids = s_tok(_text(), add_special_tokens=False)["input_ids"]
    n = sh.seq
    starts = [((rank * b + i) * 7919 * n) % max(1, len(ids) - n) for i in range(b)]
    return torch.tensor([ids[a : a + n] for a in starts], dtype=torch.long)


class _Runner:
    """One training step, as `cpu_step_peak_bytes` wants it. At module level, not inside
    `_measure_rank`: a class made in a function is a reference cycle, so its closure kept
    the shape's models and optimizer alive until a garbage collection; on CUDA the next
    shape measured in the same process then counted them (the 8B → 3B B2 × N2048 row read
    132 GB against B1 × N4096's 76 GB)."""

    def __init__(self, micro_step: Any, S: Any, x: torch.Tensor, opt: Any, n_tokens: int,
                 n_seqs: int, amp: torch.dtype | None) -> None:  # fmt: skip
        self.micro_step, self.S, self.x, self.opt = micro_step, S, x, opt
        self.n_tokens, self.n_seqs, self.amp = n_tokens, n_seqs, amp

    def step(self) -> None:
        terms, _ = self.micro_step(
            self.S, self.x, n_tokens=self.n_tokens, n_seqs=self.n_seqs, amp_dtype=self.amp
        )
        terms["loss"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _measure_rank(sh: Shape, rank: int, device: str = "cpu") -> dict[str, float]:
    """One rank's measured peak (bytes) and the plan's estimate for it."""
    from bench.step.memory import cpu_step_peak_bytes
    from sharp_core.models.loading import LocalResolver, load_model
    from sharp_core.train.distributed import checkpoint_blocks, shard_student
    from sharp_core.train.memory import ModelSizes
    from sharp_core.train.plan import PoolInfo, strategy_estimate
    from sharp_core.train.setup import Setup
    from sharp_core.train.state import adamw
    from sharp_core.train.step import micro_step

    spec = _spec(sh)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:  # CUDA's counters are the process's: nothing of an earlier shape may be left
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(dev)
        if left > 64 * MB:
            raise RuntimeError(
                f"{left / MB:.0f} MiB still allocated on {dev} before {sh.name!r}: an earlier "
                "shape's tensors are alive and would be counted in this one's peak"
            )
    torch.manual_seed(0)
    kw = {"resolver": LocalResolver(), "device": dev}
    teacher = load_model(spec.teacher, role="teacher", **kw).eval().requires_grad_(False)  # type: ignore[arg-type]
    student = load_model(spec.student, role="student", **kw).train()
    s_sizes, t_sizes = ModelSizes.of(student), ModelSizes.of(teacher)
    if sh.ac:
        checkpoint_blocks(student)
    model: Any = student
    if sh.world > 1 and sh.mode == "fsdp":
        model = shard_student(student, dev, bf16=False, offload=False)
    elif sh.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student)
    V = sh.student["vocab_size"]
    b = sh.batch // sh.world
    ct = cross = None
    if sh.cross:
        from sharp_core.objectives.cross_tokenizer import CrossTokenizer
        from sharp_core.train.plan import cross_tokens_of

        s_tok, t_tok = cross_tokenizers(sh)
        ct = CrossTokenizer.build(sh.cross, s_tok, t_tok, sh.teacher["max_position_embeddings"])
        cross = cross_tokens_of(s_tok, t_tok)
        x = _cross_rows(sh, s_tok, b, rank).to(dev)
    else:
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, V, (b, sh.seq), generator=g).to(dev)
    S = Setup(spec, dev, None, V, teacher, model, None, None, None, None, cross=ct)  # type: ignore[arg-type]
    opt = adamw(list(model.parameters()), [], spec.training, dev)
    amp = torch.bfloat16 if cuda else None
    n_tokens = x[:, 1:].numel() * sh.world

    r = _Runner(micro_step, S, x, opt, n_tokens, b * sh.world, amp)
    r.step()  # AdamW's state exists from here on
    if cuda:  # CUDA's own high-water mark of the next step (the reserve is not allocated)
        import time

        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        r.step()
        torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        resident = resident_bytes(model, teacher, opt)
        peak = resident + cpu_step_peak_bytes(r)
    e = strategy_estimate(spec, s_sizes, t_sizes, sh.mode, "replicate", cuda, cross)
    total = e.total - e.components.get("reserve", 0)
    out = {"measured": peak, "estimate": total, **{f"c_{k}": v for k, v in e.components.items()}}
    out["logit_path"] = S.logit_path  # type: ignore[assignment]  # 'fused:…' or 'dense'
    if ct is not None and cross is not None:
        from sharp_core.train.memory import teacher_tokens

        t_ids, *_ = ct.teacher_batch(x, 0)
        out |= {
            "teacher_tokens_measured": t_ids.shape[1],
            "teacher_tokens_planned": teacher_tokens(sh.seq, t_sizes, cross),
            "shared_tokens": cross.shared,
        }
    if cuda:
        from sharp_core.train.plan import step_flops_per_token, throughput

        out["tokens_per_s"] = b * sh.seq / dt
        f = step_flops_per_token(spec, s_sizes, t_sizes)
        tp = throughput(spec, f, PoolInfo("h200", "h200"), [], student_params=s_sizes.params)
        out |= {
            "plan_tokens_per_s": tp["tokens_per_s"],
            "plan_low": tp["low"],
            "plan_high": tp["high"],
        }
        out["mfu"] = out["tokens_per_s"] * f / 989e12
    return out


def _rank_main(rank: int, sh: Shape, port: int, out: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=sh.world)
    try:
        out.put((rank, _measure_rank(sh, rank)))
    finally:
        dist.destroy_process_group()


def measure(sh: Shape, device: str = "cpu") -> dict[str, float]:
    if sh.world == 1:
        return _measure_rank(sh, 0, device)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, sh, port, q)) for r in range(sh.world)]
    for p in procs:
        p.start()
    got = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return max((v for _, v in got), key=lambda v: v["measured"])


# ----------------------------------------------------------------------------- throughput
def throughput_rows(repeats: int) -> list[dict[str, Any]]:
    """tiny-cpu ce / kd / sharp timed by bench.step, each predicted from the others."""
    from bench.step.presets import PRESETS
    from sharp_core.spec import DatasetSpec, JobSpec, MethodSpec, ModelSpec, TrainingSpec
    from sharp_core.train.plan import (
        PoolInfo,
        StepCost,
        sizes_of_config,
        step_flops_per_token,
        throughput,
    )

    cmd = [
        sys.executable, "-m", "bench.step", "--preset", "tiny-cpu", "--threads", "1",
        "--steps", "ce,kd,sharp", "--repeats", str(repeats), "--json",
    ]  # fmt: skip
    doc = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    p = PRESETS["tiny-cpu"]
    s, t = sizes_of_config(p.student), sizes_of_config(p.teacher)
    assert s is not None and t is not None
    measured = {r["name"]: r["tokens_per_s"] for r in doc["steps"] if r.get("tokens_per_s")}
    method = {"ce": "sft", "kd": "kd", "sharp": "sharp"}

    def spec(step: str) -> JobSpec:
        return JobSpec(
            teacher=None if step == "ce" else ModelSpec(init="config", config=p.teacher),
            student=ModelSpec(init="config", config=p.student),
            dataset=DatasetSpec(source="files", files=["x"]),
            method=MethodSpec(name=method[step]),  # type: ignore[arg-type]
            training=TrainingSpec(batch_size=p.batch, seq_len=p.seq_len),
        )

    flops = {k: step_flops_per_token(spec(k), s, t) for k in measured}
    rows = []
    pool = PoolInfo("cpu", "cpu")
    for k, tps in measured.items():
        table = [
            StepCost("cpu", method[o], s.params, p.seq_len, 1, measured[o], flops[o])
            for o in measured
            if o != k
        ]
        pred = throughput(spec(k), flops[k], pool, table, student_params=s.params)
        rows.append(
            {
                "step": k,
                "measured": tps,
                "predicted": pred["tokens_per_s"],
                "low": pred["low"],
                "high": pred["high"],
                "flops_per_token": flops[k],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes",
        default="small,narrow,cross,cross-narrow",
        help="comma list of: small, narrow, dense, cross, cross-narrow (gpu-8b-3b with --device cuda)",
    )
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="bench.step timed rounds")
    ap.add_argument("--json", action="store_true", help="print a JSON document at the end")
    ap.add_argument(
        "--device",
        default="cpu",
        help="cuda: measure max_memory_allocated and tokens/s of one step (use --shapes "
        "gpu-8b-3b); the plan's CUDA reserve is left out of the comparison",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    doc: dict[str, Any] = {"memory": [], "throughput": []}
    print(f"{'shape':<36} {'plan MB':>9} {'measured MB':>12} {'plan/meas':>9}")
    for group in a.shapes.split(","):
        for sh in SHAPES[group.strip()]:
            r = measure(sh, a.device)
            ratio = r["estimate"] / r["measured"]
            print(
                f"{sh.name:<36} {r['estimate'] / MB:9.1f} {r['measured'] / MB:12.1f} {ratio:9.2f}",
                flush=True,
            )
            doc["memory"].append({"shape": sh.name, **r, "ratio": ratio})
            if "teacher_tokens_measured" in r:
                print(
                    f"{'':<36} teacher tokens per row: planned {r['teacher_tokens_planned']}, "
                    f"measured {r['teacher_tokens_measured']}",
                    flush=True,
                )
            if "tokens_per_s" in r:
                print(
                    f"{'':<36} tokens/s measured {r['tokens_per_s']:.0f}, plan "
                    f"{r['plan_tokens_per_s']:.0f} ({r['plan_low']:.0f}–{r['plan_high']:.0f}), "
                    f"MFU {r['mfu']:.2f}",
                    flush=True,
                )
    if not a.skip_throughput:
        print(
            f"\n{'tiny-cpu step':<14} {'measured tok/s':>15} {'plan tok/s':>11} {'range':>17} {'plan/meas':>9}"
        )
        for r in throughput_rows(a.repeats):
            ratio = r["predicted"] / r["measured"]
            rng = f"{r['low']:.0f}–{r['high']:.0f}"
            print(
                f"{r['step']:<14} {r['measured']:15.0f} {r['predicted']:11.0f} {rng:>17} {ratio:9.2f}"
            )
            doc["throughput"].append({**r, "ratio": ratio})
    if a.json:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
