"""The names of the distillation methods and logit divergences: the one place they are listed.

`sharp_core.spec` types its fields with these `Literal`s; `sharp_core.objectives.losses.DIVERGENCES`
and `sharp_core.objectives.sharp.ATTENTION_OBJECTIVES` are keyed by the names in `DIVERGENCES` and
`ATTENTION_METHODS`. The tuples are derived from the `Literal`s, so a name added here is
accepted by the spec and must be given an implementation (tests check that the registries
cover every name). No torch here: the service imports the spec.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ATTENTION_METHODS",
    "DEFAULT_ATTENTION_WEIGHT",
    "DEFAULT_DIVERGENCE",
    "DIVERGENCES",
    "METHODS",
    "AttentionMethodName",
    "DivergenceName",
    "MethodName",
]

#: Every method: plain fine-tuning, the logit baselines, the attention baselines, SHARP.
MethodName = Literal["sft", "kd", "rkl", "skl", "srkl", "jsd", "tinybert", "minilm", "sharp"]

#: The logit divergences D(p_T ‖ q_S) (`sharp_core.objectives.losses.DIVERGENCES` implements each).
DivergenceName = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"]

#: Methods that add an attention term and so need attention maps from both models
#: (`sharp_core.objectives.sharp.make_attention_objective` builds each one's objective).
AttentionMethodName = Literal["tinybert", "minilm", "sharp"]

METHODS: tuple[MethodName, ...] = get_args(MethodName)
DIVERGENCES: tuple[DivergenceName, ...] = get_args(DivergenceName)
ATTENTION_METHODS: tuple[AttentionMethodName, ...] = get_args(AttentionMethodName)

#: Default weight of the single attention term of each method (``method.attention_weight``;
#: 'sharp' means its 'direct' decomposition, the hierarchical one uses the granularities).
#: The rule: the weighted term at step 0 equals SHARP's default weighted term Σ_g w_g·term_g
#: (0.108 with 0.1 each), measured on the tiny-cpu pair by ``python -m bench.quality.term_sizes``
#: (docs/method.md, "Default weights"): raw step-0 terms TinyBERT 5.2e-4, MiniLM 0.81, direct
#: 0.41. At weight 1, TinyBERT was 5e-4 of the loss (plain KD) and MiniLM 7.5× SHARP's term.
DEFAULT_ATTENTION_WEIGHT: dict[str, float] = {
    "tinybert": 210.0,
    "minilm": 0.13,
    "sharp": 0.26,
}

#: The logit divergence each method uses unless the spec names another one.
DEFAULT_DIVERGENCE: dict[MethodName, DivergenceName] = {
    "sft": "forward_kl",  # unused: kd_weight is forced to 0
    "kd": "forward_kl",
    "rkl": "reverse_kl",
    "skl": "skew_forward_kl",
    "srkl": "skew_reverse_kl",
    "jsd": "jsd",
    "tinybert": "forward_kl",
    "minilm": "forward_kl",
    "sharp": "forward_kl",
}
