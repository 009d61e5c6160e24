"""The names of the distillation methods and logit divergences: the one place they are listed.

`sharp_core.spec` types its fields with these `Literal`s; `sharp_core.losses.DIVERGENCES`
and `sharp_core.sharp.ATTENTION_OBJECTIVES` are keyed by the names in `DIVERGENCES` and
`ATTENTION_METHODS`. The tuples are derived from the `Literal`s, so a name added here is
accepted by the spec and must be given an implementation (tests check that the registries
cover every name). No torch here: the service imports the spec.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ATTENTION_METHODS",
    "DEFAULT_DIVERGENCE",
    "DIVERGENCES",
    "METHODS",
    "AttentionMethodName",
    "DivergenceName",
    "MethodName",
]

#: Every method: plain fine-tuning, the logit baselines, the attention baselines, SHARP.
MethodName = Literal["sft", "kd", "rkl", "skl", "srkl", "jsd", "tinybert", "minilm", "sharp"]

#: The logit divergences D(p_T ‖ q_S) (`sharp_core.losses.DIVERGENCES` implements each).
DivergenceName = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd"]

#: Methods that add an attention term and so need attention maps from both models
#: (`sharp_core.sharp.make_attention_objective` builds each one's objective).
AttentionMethodName = Literal["tinybert", "minilm", "sharp"]

METHODS: tuple[MethodName, ...] = get_args(MethodName)
DIVERGENCES: tuple[DivergenceName, ...] = get_args(DivergenceName)
ATTENTION_METHODS: tuple[AttentionMethodName, ...] = get_args(AttentionMethodName)

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
