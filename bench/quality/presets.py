"""The quality table's presets: teacher and student shapes, training budgets, seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.configs import gpt2


@dataclass(frozen=True)
class Preset:
    """Everything one table depends on except the methods' own settings."""

    name: str
    description: str
    vocab_size: int  # byte-level BPE trained on train.txt by the teacher run (260 ≈ bytes)
    seq_len: int
    teacher_config: dict[str, Any]
    teacher_training: dict[str, Any]  # TrainingSpec fields of the teacher run
    student_config: dict[str, Any]
    training: dict[str, Any]  # TrainingSpec fields of every student cell
    seeds: int = 3  # the tiny-cpu and gpu tables' count
    corpus_chars: int | None = None  # use only the first N characters of the corpus
    split: tuple[float, float] = (0.90, 0.05)  # train, val fractions; test = the rest (tail)
    eval_fraction: float = 0.05  # trainer's eval tail of train.txt (curves only)
    max_eval_blocks: int = 32
    teacher_patience: int = 2  # evals without improvement before the teacher stops
    interference_points: int = 10  # diagnostics ~ this many times per sharp/direct cell
    sanity_ratio: float = 0.9
    other_ranks: tuple[int, ...] | None = None  # default: rank/4 and 2·rank (≤ seq_len)
    methods: tuple[str, ...] | None = None  # default: every method of `method_table`
    hidden: bool = False
    # the student block of every cell when it is not built from `student_config` (a student
    # pruned from the teacher: {"init": "prune", "prune": {...}})
    student: dict[str, Any] | None = None


def _budget(
    max_steps: int, batch_size: int, lr: float, warmup_steps: int, eval_every: int, **extra: Any
) -> dict[str, Any]:
    """TrainingSpec fields of one training run (teacher or student cells)."""
    return {
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "eval_every": eval_every,
        **extra,
    }


#: The methods of the init comparison (issue 14): logit-only, SHARP, its ablation and the
#: attention baselines, with the same steps for both inits.
INIT_METHODS = ("sft", "kd", "sharp", "sharp-direct", "tinybert", "minilm")


def _init_pair(name: str, description: str, n_head: int) -> dict[str, Preset]:
    """``<name>-random`` and ``<name>-prune``: one student shape (2 layers, ``n_head`` heads of
    the teacher's size 32, MLP 4× hidden), from random weights or pruned from the tiny-cpu
    teacher (Minitron activation scores on 256 training blocks). 5 seeds, paired by seed.

    The pruned student inherits the teacher's config: its dropout is set to the random
    student's (0) so that init is the only difference. The sanity ratio is 1: a pruned student
    may come close to the teacher, which must still be better than every student."""
    hidden = 32 * n_head
    common: dict[str, Any] = {
        "vocab_size": 512,
        "seq_len": 128,
        "teacher_config": gpt2(4, 4, 128, 128, dropout=0.1),
        "teacher_training": _budget(1200, 16, 2e-3, 50, 100),
        "student_config": gpt2(2, n_head, hidden, 128, n_inner=4 * hidden),
        "training": _budget(200, 16, 3e-3, 20, 25),
        "seeds": 5,
        "methods": INIT_METHODS,
        "sanity_ratio": 1.0,
    }
    no_dropout = {"resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0}
    pruned = {
        "init": "prune",
        "prune": {"layers": 2, "heads": n_head, "ffn": 4 * hidden},
        "config_overrides": no_dropout,
    }
    return {
        f"{name}-random": Preset(
            name=f"{name}-random", description=f"{description}: random init", **common
        ),
        f"{name}-prune": Preset(
            name=f"{name}-prune",
            description=f"{description}: pruned from the teacher",
            student=pruned,
            **common,
        ),
    }


PRESETS: dict[str, Preset] = {
    # For tests/test_quality.py only: seconds on a CPU, numbers meaningless.
    "micro": Preset(
        name="micro",
        description="test preset: a few steps on 40k characters",
        hidden=True,
        vocab_size=300,
        seq_len=32,
        corpus_chars=40_000,
        seeds=1,
        teacher_config=gpt2(2, 2, 32, 32),
        teacher_training=_budget(40, 8, 5e-3, 4, 20),
        student_config=gpt2(1, 2, 16, 32),
        training=_budget(6, 4, 3e-3, 2, 3),
        methods=("sft", "sharp"),
        max_eval_blocks=8,
        teacher_patience=100,
    ),
    # 2 CPU cores, the whole table (teacher + 17 methods × 3 seeds) in ~30 minutes on an
    # idle machine; sized from measured cells (docs/results.md).
    "tiny-cpu": Preset(
        name="tiny-cpu",
        description="2 CPU cores: teacher GPT-2 4×4×128, student 2×2×64, BPE-512, seq 128",
        vocab_size=512,
        seq_len=128,
        teacher_config=gpt2(4, 4, 128, 128, dropout=0.1),
        teacher_training=_budget(1200, 16, 2e-3, 50, 100),
        student_config=gpt2(2, 2, 64, 128),
        training=_budget(200, 16, 3e-3, 20, 25),
    ),
    # Issue 15: kd from a teacher-logit cache against dense kd, the tiny-cpu shapes and budget.
    # The sanity ratio is 1 (the teacher must beat every student, not by 10 %): the run was
    # made with a teacher stopped early (docs/results.md, "Teacher-logit cache").
    "tiny-cpu-cache": Preset(
        name="tiny-cpu-cache",
        description="tiny-cpu shapes; kd dense vs kd from a teacher-logit cache",
        vocab_size=512,
        seq_len=128,
        teacher_config=gpt2(4, 4, 128, 128, dropout=0.1),
        teacher_training=_budget(1200, 16, 2e-3, 50, 100),
        student_config=gpt2(2, 2, 64, 128),
        training=_budget(200, 16, 3e-3, 20, 25),
        methods=(
            "kd",
            "cache-topk8",
            "cache-topk32",
            "cache-topk128",
            "cache-sampled12",
            "cache-topk32-renorm",
            "cache-topk32-tail12",
        ),
        sanity_ratio=1.0,
    ),
    **_init_pair(
        "tiny-cpu-2x2",
        "random vs pruned init (issue 14), the tiny-cpu student shape 2×2×64 (MLP 256)",
        n_head=2,
    ),
    **_init_pair(
        "tiny-cpu-2x3",
        "random vs pruned init (issue 14), a wider student 2×3×96 (MLP 384)",
        n_head=3,
    ),
    # The pilot's pair (issue 6), char level: one GPU, documented in docs/results.md.
    "gpu": Preset(
        name="gpu",
        description="1 GPU: teacher GPT-2 6×8×384 (dropout 0.2), student 2×4×192, "
        "byte-level (char) Shakespeare, 1500 steps of 64×256",
        vocab_size=260,
        seq_len=256,
        teacher_config=gpt2(6, 8, 384, 256, dropout=0.2),
        teacher_training=_budget(5000, 64, 1e-3, 100, 250),
        student_config=gpt2(2, 4, 192, 256),
        # checkpoints: an interrupted cell resumes (a tiny-cpu cell of a minute restarts)
        training=_budget(1500, 64, 2e-3, 100, 100, checkpoint_every=500),
        max_eval_blocks=64,
        teacher_patience=3,
    ),
}
