"""How long a checkpoint blocks the training loop: synchronous against background saving.

    python -m bench.checkpoint_save [--layers 4] [--hidden 512] [--vocab 8192] [--rounds 3]
                                    [--steps 4] [--json]

One process, the library's own `Checkpointer` (``asynchronous=False`` and ``True``) on a GPT-2
student built from a config, its AdamW state filled by real steps. Each round runs, for each
mode in turn (the order alternates between rounds), a window of ``--steps`` training steps
with one checkpoint at its start, and reports:

- ``blocked_s``: the wall time of the ``save`` call, i.e. how long the loop stood still
  (sync: the whole write, hashing and commit; async: the copy to CPU and starting threads);
- ``window_s``: the wall time of the whole window including the save and, for async, the
  wait for its commit at the end (what an epoch of training pays in total);
- ``step_s``: the median step time in the window (async: steps run beside the writer).

Printed per round side by side, with the ratios sync/async, then the medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import machine_info
from sharp_core.spec import parse_spec
from sharp_core.train.distributed import Context
from sharp_core.train.loop import TrainCallbacks, setup
from sharp_core.train.state import Checkpointer, TrainState


def _corpus(root: Path) -> Path:
    from pydoc_data.topics import topics

    path = root / "corpus.txt"
    path.write_text("\n\n".join(topics.values()), encoding="utf-8")
    return path


def _spec(corpus: Path, a: argparse.Namespace) -> Any:
    return parse_spec(
        {
            "name": "ckpt-bench",
            "student": {
                "init": "config",
                "config": {
                    "model_type": "gpt2",
                    "n_layer": a.layers,
                    "n_head": 8,
                    "n_embd": a.hidden,
                    "n_positions": 128,
                },
            },
            "tokenizer": {"train": {"vocab_size": a.vocab}},
            "dataset": {"files": [str(corpus)]},
            "method": {"name": "sft"},
            "training": {
                "max_steps": 1000,
                "batch_size": 2,
                "seq_len": 64,
                "eval_every": 0,
                "keep_checkpoints": 1,
            },
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        S = setup(_spec(_corpus(root), a))
        params = [q for q in S.student.parameters() if q.requires_grad]
        state = TrainState.start(S, params, [], Context(), None)
        n_params = sum(q.numel() for q in params)

        def step() -> float:
            t0 = time.perf_counter()
            x = S.data.train[: S.spec.training.batch_size]  # type: ignore[index]
            S.student(input_ids=x, labels=x).loss.backward()
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            return time.perf_counter() - t0

        step()  # AdamW's moments exist from here on
        rows: list[dict[str, Any]] = []
        for r in range(a.rounds):
            modes = ["sync", "async"] if r % 2 == 0 else ["async", "sync"]
            row: dict[str, Any] = {"round": r}
            for mode in modes:
                ck = Checkpointer(
                    root / "run", S, Context(), TrainCallbacks(), asynchronous=mode == "async"
                )
                t0 = time.perf_counter()
                ck.save(state, S.student, {})
                blocked = time.perf_counter() - t0
                steps = [step() for _ in range(a.steps)]
                ck.close()
                row[mode] = {
                    "blocked_s": blocked,
                    "window_s": time.perf_counter() - t0,
                    "step_s": statistics.median(steps),
                }
            rows.append(row)
        size = sum(f.stat().st_size for f in (root / "run").rglob("*") if f.is_file())

    def med(mode: str, k: str) -> float:
        return statistics.median(row[mode][k] for row in rows)

    medians = {
        m: {k: med(m, k) for k in ("blocked_s", "window_s", "step_s")} for m in ("sync", "async")
    }
    summary = {
        "params": n_params,
        "checkpoint_bytes": size,
        "rounds": rows,
        "median": medians,
        "machine": machine_info(torch.device("cpu")),
        "argv": sys.argv[1:],
    }
    if a.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(
        f"student {n_params / 1e6:.1f}M params, checkpoint {size / 2**20:.0f} MiB on disk, "
        f"{a.steps} steps per window"
    )
    print(f"{'round':>5} {'':>10} {'sync':>9} {'async':>9} {'sync/async':>10}")
    for row in [*rows, {"round": "median", **medians}]:
        for k in ("blocked_s", "window_s", "step_s"):
            s, z = row["sync"][k], row["async"][k]
            print(f"{row['round']!s:>5} {k:>10} {s:9.3f} {z:9.3f} {s / z:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
