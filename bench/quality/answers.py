"""Does lower perplexity carry over to generated text? Random against pruned students (issue 24).

    python -m bench.quality.answers --out runs/answers --json docs/results/answers-tiny-cpu.json
    python -m bench.quality.answers --from-json docs/results/answers-tiny-cpu.json

The tiny-cpu pair: a GPT-2 4 × 4 × 128 teacher (BPE-512, seq 128) trained with ``sft`` on tiny
Shakespeare, and 2 × 2 × 64 students (MLP 256) distilled with ``kd`` for the same steps from
random weights or pruned from the teacher (Minitron activation scores), paired by seed.

The corpus is cut in three contiguous parts: the first 90 % trains, the next 5 % is the val
set (``val_ppl``), the last 5 % makes the prompt set. A prompt is a speech's speaker line and
first line; its reference is the speech's next line. Every model answers with greedy decoding
(``spec.evaluation.generation``, the job's own code path: ROUGE-L F1 of `rouge-score`); the
teacher through the same function. The raw per-seed numbers go in the JSON; ``--from-json``
re-renders the table from it alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from bench.configs import gpt2
from bench.quality.stats import delta
from sharp_core.study.compare import mean_std

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
TEACHER_STEPS, STUDENT_STEPS, BATCH, SEQ = 600, 200, 16, 128


def split_corpus(text: str, out: Path, n_prompts: int) -> dict[str, Path]:
    """train / val text files and the prompt set (jsonl of prompt / reference)."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(text)
    a, b = int(n * 0.90), int(n * 0.95)
    a, b = text.rfind("\n\n", 0, a), text.rfind("\n\n", 0, b)  # cut between speeches
    paths = {"train": out / "train.txt", "val": out / "val.txt", "prompts": out / "prompts.jsonl"}
    paths["train"].write_text(text[:a], encoding="utf-8")
    paths["val"].write_text(text[a:b], encoding="utf-8")
    rows = []
    for speech in text[b:].split("\n\n"):
        lines = [ln for ln in speech.strip().split("\n") if ln.strip()]
        if len(lines) >= 3 and lines[0].endswith(":") and len(lines[2].split()) >= 3:
            rows.append({"prompt": f"{lines[0]}\n{lines[1]}\n", "reference": lines[2]})
        if len(rows) == n_prompts:
            break
    paths["prompts"].write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return paths


def _training(steps: int, seed: int, lr: float, warmup: int, eval_every: int) -> dict[str, Any]:
    return {
        "max_steps": steps,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "lr": lr,
        "warmup_steps": warmup,
        "eval_every": eval_every,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "seed": seed,
    }


def _evaluation(paths: dict[str, Path]) -> dict[str, Any]:
    return {"generation": {"set": str(paths["prompts"]), "max_new_tokens": 16, "samples": 5}}


def teacher_spec(paths: dict[str, Path]) -> dict[str, Any]:
    return {
        "name": "answers-teacher",
        "student": {"init": "config", "config": gpt2(4, 4, 128, 128, dropout=0.1)},
        "tokenizer": {"train": {"vocab_size": 512}},
        "dataset": {
            "files": [str(paths["train"])],
            "eval": {"val": {"files": [str(paths["val"])]}},
        },
        "method": {"name": "sft"},
        "training": _training(TEACHER_STEPS, 0, 2e-3, 50, 200),
        "evaluation": _evaluation(paths),
    }


def student_spec(paths: dict[str, Path], teacher: Path, init: str, seed: int) -> dict[str, Any]:
    no_dropout = {"resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0}
    student: dict[str, Any] = (
        {"init": "config", "config": gpt2(2, 2, 64, 128, n_inner=256)}
        if init == "random"
        else {
            "init": "prune",
            "prune": {"layers": 2, "heads": 2, "ffn": 256},
            "config_overrides": no_dropout,
        }
    )
    return {
        "name": f"answers-{init}-seed{seed}",
        "teacher": {"model": str(teacher)},
        "student": student,
        "dataset": {
            "files": [str(paths["train"])],
            "eval": {"val": {"files": [str(paths["val"])]}},
        },
        "method": {"name": "kd"},
        "training": _training(STUDENT_STEPS, seed, 3e-3, 20, 50),
        "evaluation": _evaluation(paths),
    }


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []


def run_job(spec_dict: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train one job with the library (resumable: a finished run is read back)."""
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import TrainCallbacks, train

    events: list[tuple[str, dict[str, Any]]] = []

    class Keep(TrainCallbacks):
        def on_event(self, kind: str, data: dict[str, Any]) -> None:
            events.append((kind, data))

    t0 = time.time()
    res = train(parse_spec(spec_dict), out, callbacks=Keep())
    answers = next((d for k, d in events if k == "answers"), {})
    failed = [d for k, d in events if k == "evaluation_failed"]
    if failed:
        raise RuntimeError(f"evaluation failed: {failed[0]}")
    r = {
        "name": spec_dict["name"],
        "val_ppl": res.metrics["val_ppl"],
        "rougeL": res.metrics["gen/rougeL"],
        "answers": res.metrics["gen/answers"],
        "samples": answers.get("samples", []),
        "checkpoint": str(res.checkpoint),
        "seconds": round(time.time() - t0, 1),
    }
    result_file.write_text(json.dumps(r, indent=1))
    return r


def collect(out: Path, seeds: int, n_prompts: int) -> dict[str, Any]:
    paths = split_corpus(CORPUS.read_text(encoding="utf-8"), out / "data", n_prompts)
    teacher = run_job(teacher_spec(paths), out / "teacher")
    data: dict[str, Any] = {
        "corpus": CORPUS.name,
        "prompts": n_prompts,
        "teacher_steps": TEACHER_STEPS,
        "student_steps": STUDENT_STEPS,
        "teacher": teacher,
        "random": {},
        "prune": {},
    }
    for seed in range(seeds):
        for init in ("random", "prune"):
            spec = student_spec(paths, Path(teacher["checkpoint"]), init, seed)
            data[init][str(seed)] = run_job(spec, out / f"{init}-seed{seed}")
    return data


def render(data: dict[str, Any]) -> str:
    """The markdown table: mean ± std per init, and pruned vs random paired by seed."""
    lines = [
        f"Teacher: val ppl {data['teacher']['val_ppl']:.2f}, ROUGE-L {data['teacher']['rougeL']:.4f}"
        f" ({data['prompts']} prompts).",
        "",
        "| student init | val ppl mean ± std | ROUGE-L mean ± std | n |",
        "|---|---|---|---|",
    ]
    for init in ("random", "prune"):
        cells = data[init].values()
        p, ps = mean_std([c["val_ppl"] for c in cells])
        r, rs = mean_std([c["rougeL"] for c in cells])
        lines.append(
            f"| {init} | {p:.2f} ± {ps or 0:.2f} | {r:.4f} ± {rs or 0:.4f} | {len(data[init])} |"
        )
    lines.append("")
    for metric, rel in (("val_ppl", True), ("rougeL", False)):
        seeds = sorted(set(data["random"]) & set(data["prune"]))
        xs = {int(s): data["prune"][s][metric] for s in seeds}
        refs = {int(s): data["random"][s][metric] for s in seeds}
        d = delta(xs, refs, relative=rel)
        unit = " %" if rel else ""
        assert d is not None
        ci = d.get("ci95")
        ci_s = f" [{ci[0]:+.4g}, {ci[1]:+.4g}]" if ci else ""
        lines.append(
            f"* pruned − random, {metric}: {d['mean']:+.4g}{unit}{ci_s} (paired over "
            f"{d['n']} seeds{', p = ' + format(d['p'], '.3g') if d.get('p') is not None else ''})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/answers"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--from-json", type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=100)
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        data = collect(args.out, args.seeds, args.prompts)
        if args.json:
            args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(render(data))
    return 0 if all(math.isfinite(c["val_ppl"]) for c in data["random"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
