"""A job's progress as the server reports it: tokens per optimizer step and the ETA.

Computed here only: the API puts them in ``progress`` (GET /v1/jobs/{id}) and the training
process puts them in each ``metrics`` event, and the CLI and the dashboard show those values
instead of recomputing them (two copies had drifted: different defaults, and one ignored
``cancelling``).
"""

from __future__ import annotations

from typing import Any

from service.lifecycle import ACTIVE_STATUSES
from sharp_core.spec import TrainingSpec


def tokens_per_step(spec: dict[str, Any]) -> int:
    """Tokens one optimizer step consumes: batch_size × grad_accum × seq_len of the stored
    spec, a missing field taking the spec model's own default."""
    training = (spec or {}).get("training") or {}

    def field(name: str) -> int:
        value = training.get(name, TrainingSpec.model_fields[name].default)
        return int(value)

    return field("batch_size") * field("grad_accum") * field("seq_len")


def eta_s(
    status: str, step: int, max_steps: int, tokens_per_s: float | None, spec: dict[str, Any]
) -> float | None:
    """Seconds left at the current speed, for a job a worker is running (``running`` or
    ``cancelling``: a cancelled job may still run to its next checkpoint); None otherwise or
    before the first speed reading."""
    if status not in ACTIVE_STATUSES or not tokens_per_s:
        return None
    per_step = tokens_per_step(spec)
    if not per_step:
        return None
    return max(0, max_steps - step) * per_step / tokens_per_s


def progress(
    status: str, step: int, max_steps: int, tokens_per_s: float | None, spec: dict[str, Any]
) -> dict[str, Any]:
    """The ``progress`` object of the API and of ``metrics`` events."""
    return {
        "step": step,
        "max_steps": max_steps,
        "tokens_per_s": tokens_per_s,
        "eta_s": eta_s(status, step, max_steps, tokens_per_s, spec),
    }
