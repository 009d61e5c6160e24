"""What one rank runs in the multi-rank tests (launched by torchrun on the CPU, gloo).

``python -m torch.distributed.run --nproc-per-node 2 tests/rank_worker.py KIND CASE OUT``
reads the case a test saved with `torch.save` (models and data), runs KIND on this rank and
writes ``OUT/rank<r>.pt``. The tests compare what every rank wrote with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sharp_core.train.distributed import context


def run_eval(case: dict, ctx) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sharp_core.evaluate.perplexity import evaluate

    out: dict = {"forwards": {}}
    for name in ("lm", "cls"):
        model = case[f"{name}_model"]
        calls: list[int] = []
        model.register_forward_hook(lambda *_, c=calls: c.append(1))
        wrapped = DDP(model, forward_sync_buffers=False)  # what the loop passes
        out[name] = evaluate(
            wrapped,
            case[f"{name}_data"],
            vocab=case["vocab"],
            batch_size=case["batch_size"] // ctx.world_size,
            device=torch.device("cpu"),
            ranks=ctx,
        )
        out["forwards"][name] = len(calls)
    return out


def run_prune(case: dict, ctx) -> dict:
    from sharp_core.models.prune import activation_importance, prune

    res = prune(case["teacher"], case["target"], batches=case["batches"], ranks=ctx)
    one_batch = activation_importance(case["teacher"], case["batches"][:1], ranks=ctx)
    return {
        "selection": res.selection,
        "state": res.model.state_dict(),
        "samples": res.calibration_samples,
        "scores": activation_importance(case["teacher"], case["batches"], ranks=ctx),
        "one_batch": one_batch,  # rank 1 runs no batch at all
    }


def main() -> None:
    kind, case_path, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ctx = context()
    torch.manual_seed(0)
    case = torch.load(case_path, weights_only=False)
    result = {"eval": run_eval, "prune": run_prune}[kind](case, ctx)
    torch.save(result, out / f"rank{ctx.rank}.pt")
    ctx.barrier()


if __name__ == "__main__":
    main()
