"""The step benchmark's presets: model shapes, batch, device and the issue's targets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.configs import gpt2, opt


@dataclass(frozen=True)
class Preset:
    """Shapes of one benchmark. Configs are transformers config dicts (with ``model_type``)."""

    name: str
    teacher: dict[str, Any]
    student: dict[str, Any]
    batch: int
    seq_len: int
    device: str  # default device
    warmup: int
    repeats: int
    hidden: bool = False
    targets: tuple[tuple[str, str, float], ...] = ()  # (metric, step, limit)
    note: str = ""

    @property
    def requires_cuda(self) -> bool:
        """A CUDA preset's shapes and precision make no sense elsewhere: refused on a CPU."""
        return self.device == "cuda"

    @property
    def amp(self) -> bool:
        """bf16 autocast (the trainer's default precision), for the CUDA presets only."""
        return self.device == "cuda"


def _gpt2(layers: int, heads: int, hidden: int, vocab: int, positions: int) -> dict[str, Any]:
    # Dropout off: modern LM recipes train without it, and attention dropout would push SDPA
    # off its fused CPU/flash kernels in every step alike, which is not what we measure.
    return gpt2(layers, heads, hidden, positions, vocab_size=vocab, bos_token_id=0, eos_token_id=0)


PRESETS: dict[str, Preset] = {
    "tiny-cpu": Preset(
        name="tiny-cpu",
        teacher=_gpt2(4, 8, 256, 4096, 256),
        student=_gpt2(2, 4, 128, 4096, 256),
        batch=8,
        seq_len=256,
        device="cpu",
        warmup=2,
        repeats=7,
        targets=(("time_ratio", "sharp", 1.3),),
        note="GPT-2-shaped, vocab 4096: with GPT-2's 50k vocabulary the chunked logit losses "
        "would be nearly the whole CPU step and hide the attention path being measured",
    ),
    "opt-1.3b-125m": Preset(
        name="opt-1.3b-125m",
        teacher=opt(24, 32, 2048, 8192),
        student=opt(12, 12, 768, 3072),
        batch=8,
        seq_len=512,
        device="cuda",
        warmup=5,
        repeats=20,
        targets=(
            ("time_ratio", "sharp", 1.10),
            ("mem_ratio", "sharp", 1.10),
            ("mfu_min", "kd", 0.50),
        ),
        note="facebook/opt-1.3b and opt-125m shapes, random init, bf16 autocast",
    ),
}
# Hidden: the test suite's tiny-cpu (seconds, not minutes). Not listed in --help.
PRESETS["micro"] = replace(
    PRESETS["tiny-cpu"],
    name="micro",
    teacher=_gpt2(2, 4, 32, 128, 32),
    student=_gpt2(1, 2, 16, 128, 32),
    batch=2,
    seq_len=32,
    warmup=1,
    repeats=2,
    hidden=True,
    targets=(),
    note="",
)
