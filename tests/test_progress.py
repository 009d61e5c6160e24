"""The server's progress figures (`service.progress`) and the client showing them as sent.

One computation: the API's ``progress.eta_s`` and the ``progress`` of each ``metrics`` event
come from `service.progress`; `ops.follow.JobState` only copies them.
"""

from __future__ import annotations

import pytest

from ops.follow import JobState
from service.progress import eta_s, progress, tokens_per_step
from sharp_core.spec import TrainingSpec

SPEC = {"training": {"batch_size": 4, "grad_accum": 2, "seq_len": 64}}


def test_tokens_per_step_defaults_come_from_the_spec_model() -> None:
    assert tokens_per_step(SPEC) == 4 * 2 * 64
    d = TrainingSpec()
    assert tokens_per_step({}) == d.batch_size * d.grad_accum * d.seq_len
    assert tokens_per_step({"training": {"seq_len": 16}}) == d.batch_size * d.grad_accum * 16


@pytest.mark.parametrize(
    ("status", "expected"),
    [("running", 10.0), ("cancelling", 10.0), ("queued", None), ("succeeded", None)],
)
def test_eta_counts_running_and_cancelling(status: str, expected: float | None) -> None:
    # 40 steps left × 512 tokens per step / 2048 tokens/s
    assert eta_s(status, 60, 100, 2048.0, SPEC) == expected


def test_no_eta_before_the_first_speed_reading() -> None:
    assert eta_s("running", 0, 100, None, SPEC) is None
    assert eta_s("running", 0, 100, 0.0, SPEC) is None
    assert eta_s("running", 120, 100, 100.0, SPEC) == 0.0
    p = progress("running", 60, 100, 2048.0, SPEC)
    assert p == {"step": 60, "max_steps": 100, "tokens_per_s": 2048.0, "eta_s": 10.0}


def test_the_client_shows_the_server_eta() -> None:
    state = JobState(status="running")
    state.apply(
        "metrics",
        {
            "metrics": [{"step": 5, "values": {"loss": 1.0, "tokens_per_s": 99.0}}],
            "progress": {"step": 5, "max_steps": 10, "tokens_per_s": 99.0, "eta_s": 42.5},
        },
    )
    assert (state.step, state.eta_s) == (5, 42.5)
    state.apply("status", {"status": "cancelling"})
    assert state.eta_s == 42.5  # still running to its checkpoint
    state.apply("status", {"status": "queued"})
    assert state.eta_s is None
