"""Following one job's Server-Sent Events from Python: the loop behind ``sharp jobs watch`` and
``sharp demo``.

Why one place: the reconnect rules are the subtle part and must not differ between the two —
a dropped connection or a stream that ends before the terminal status resumes with
``Last-Event-ID`` (so no event is lost or repeated), with a growing pause, and gives up after
`SSE_RETRIES` failures in a row. Callers only decide how to *show* the state.

The ETA shown is the server's (``progress.eta_s`` of the job and of each ``metrics`` event,
`service.progress`); it is never recomputed here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from service.lifecycle import ACTIVE_STATUSES, TERMINAL_STATUSES

TERMINAL = TERMINAL_STATUSES
SSE_RETRIES = 20


class StreamLost(httpx.TransportError):
    """The event stream kept failing; a `httpx.TransportError` so callers that map "cannot
    reach the server" keep doing so."""


@dataclass
class JobState:
    """What the SSE stream told us so far about one job."""

    status: str = "queued"
    step: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eval_ppl: float | None = None
    eval_accuracy: float | None = None
    eval_macro_f1: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    eta_s: float | None = None  # the server's estimate (`service.progress`)
    last_id: str | None = None
    checkpoints: list[int] = field(default_factory=list)
    pruned: dict[str, Any] | None = None  # the 'pruned' event of a pruned student

    def apply(self, event: str, data: dict[str, Any]) -> None:
        if event == "status":
            self.status = data.get("status", self.status)
            if self.status not in ACTIVE_STATUSES:
                self.eta_s = None
            if data.get("error"):
                self.error = data["error"]
        elif event == "metrics":
            if "progress" in data:
                self.eta_s = data["progress"].get("eta_s")
            for point in data.get("metrics", []):
                self.step = max(self.step, int(point.get("step", 0)))
                values = point.get("values", {})
                if "loss" in values:
                    self.loss = values["loss"]
                if values.get("tokens_per_s"):  # 0.0 on steps between two speed readings
                    self.tokens_per_s = values["tokens_per_s"]
                for name in ("eval_ppl", "eval_accuracy", "eval_macro_f1"):
                    if name in values:
                        setattr(self, name, values[name])
                for name, value in values.items():
                    if name.startswith("sharp_"):
                        self.terms[name] = value
        elif event == "checkpoint":
            self.checkpoints.append(int(data.get("step", 0)))
        elif event == "pruned":
            self.pruned = data

    def eval_summary(self) -> str:
        """Accuracy and macro-F1 for classifiers (task ``sequence_classification``),
        perplexity for language models; ``-`` before the first evaluation."""
        if self.eval_accuracy is not None:
            f1 = "-" if self.eval_macro_f1 is None else f"{self.eval_macro_f1:.3f}"
            return f"acc {self.eval_accuracy:.3f} f1 {f1}"
        if self.eval_ppl is not None:
            return f"ppl {self.eval_ppl:.1f}"
        return "eval -"


def fmt_params(n: float) -> str:
    """A parameter count in millions (billions from 1e9 up): ``0.40M``, ``1.32B``."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def heads_summary(heads_per_layer: dict[str, list[int]]) -> str:
    """``2 heads per layer`` (pruning keeps as many in every layer), else the range."""
    counts = sorted({len(h) for h in heads_per_layer.values()})
    if not counts:
        return "no heads"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} head{'' if n == '1' else 's'} per layer"


def pruned_summary(data: dict[str, Any]) -> str:
    """One line for a 'pruned' event: ``pruned: layers [1, 3], 2 heads per layer,
    0.40M → 0.14M params`` (the dashboard's event log says the same)."""
    layers = ", ".join(str(i) for i in data.get("kept_layers", []))
    return (
        f"pruned: layers [{layers}], {heads_summary(data.get('heads_per_layer') or {})}, "
        f"{fmt_params(data.get('params_before', 0))} → "
        f"{fmt_params(data.get('params_after', 0))} params"
    )


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def follow_events(
    client: httpx.Client,
    job_id: str,
    state: JobState,
    on_update: Callable[[], None],
    check: Callable[[httpx.Response], Any],
    *,
    retries: int = SSE_RETRIES,
) -> JobState:
    """Apply the job's events to `state` (calling `on_update` after each) until the job is
    terminal. `check` turns an error response into the caller's exception.

    Raises `StreamLost` after `retries` failed connections in a row.
    """
    from httpx_sse import SSEError, connect_sse

    failures = 0
    while state.status not in TERMINAL:
        headers = {"Last-Event-ID": state.last_id} if state.last_id else {}
        try:
            with connect_sse(
                client,
                "GET",
                f"/v1/jobs/{job_id}/events",
                headers=headers,
                timeout=httpx.Timeout(10.0, read=60.0),
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    check(source.response)
                for sse in source.iter_sse():
                    if sse.id:
                        state.last_id = sse.id
                    if sse.data:
                        state.apply(sse.event, json.loads(sse.data))
                        on_update()
                    failures = 0
            # The server ends the stream after the terminal status; one that ends earlier
            # (a restarted API) counts as a failure and is resumed from last_id.
            if state.status not in TERMINAL:
                failures += 1
        except (httpx.TransportError, SSEError) as e:
            failures += 1
            if failures > retries:
                raise StreamLost(f"lost the event stream of {job_id}: {e}") from e
        if state.status not in TERMINAL:
            if failures > retries:
                raise StreamLost(f"the event stream of {job_id} keeps ending")
            time.sleep(min(5.0, 0.5 * failures))
    return state


def job_progress(console: Console, *, terms: bool = False) -> Progress:
    """The progress bar of a followed job (`sharp jobs watch`, the demo): step, loss, the
    evaluation, optionally each SHARP term, tokens/s and the server's ETA."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[eval]}"),
        *([TextColumn("{task.fields[terms]}")] if terms else []),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    ]
    return Progress(*columns, console=console)


def progress_fields(state: JobState) -> dict[str, Any]:
    """The text fields of `job_progress` for the job's current state."""
    return {
        "loss": "-" if state.loss is None else f"{state.loss:.3f}",
        "eval": state.eval_summary(),
        "terms": " ".join(f"{k[6:]} {v:.3g}" for k, v in sorted(state.terms.items())),
        "tps": "-" if state.tokens_per_s is None else f"{state.tokens_per_s:,.0f}",
        "eta": fmt_eta(state.eta_s),
    }
