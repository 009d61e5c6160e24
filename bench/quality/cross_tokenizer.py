"""Distillation across tokenizers, on the CPU: ULD and GOLD students against a student trained
without a teacher (sft), equal budget, paired over seeds (docs/results.md)::

    python -m bench.quality.cross_tokenizer --out docs/results/cross_tokenizer.json

The teacher: a Llama (hidden 64, 2 layers) trained on the corpus with its own byte-level BPE
(vocabulary `--teacher-vocab`). The students: a smaller Llama (hidden 32, 2 layers) with
another BPE trained on the same text (`--student-vocab`), from the same random start per
seed, for the same steps, batch and data order; only the objective differs (sft: CE only;
uld / gold: 0.1·CE + 0.9·D across tokenizers). Compared on the held-out tail's perplexity in
the student's own tokens (all three students share that tokenizer, so it is one scale).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

TEACHER = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
STUDENT = {**TEACHER, "hidden_size": 32, "intermediate_size": 64}


def _spec(corpus: Path, method: dict[str, Any], seed: int, steps: int, **over: Any) -> dict:
    d = {
        "name": "xtok",
        "student": {"init": "config", "config": dict(STUDENT)},
        "dataset": {"files": [str(corpus)], "eval_fraction": 0.1},
        "method": method,
        "training": {
            "max_steps": steps,
            "batch_size": 8,
            "seq_len": 64,
            "lr": 3e-3,
            "warmup_steps": 10,
            "eval_every": 0,
            "checkpoint_every": 0,
            "seed": seed,
        },
    }
    d.update(over)
    return d


def _run(spec: dict, out: Path) -> dict[str, float]:
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import train

    class Rec:
        def __init__(self) -> None:
            self.metrics: dict[int, dict[str, float]] = {}

        def on_metrics(self, step: int, m: dict[str, float]) -> None:
            self.metrics.setdefault(step, {}).update(m)

        def on_checkpoint(self, *a: Any) -> None: ...
        def on_event(self, *a: Any) -> None: ...
        def should_stop(self) -> bool:
            return False

    rec = Rec()
    res = train(parse_spec(spec), out, callbacks=rec)  # type: ignore[arg-type]
    last = max(s for s in rec.metrics if "eval_ppl" in rec.metrics[s])
    m = rec.metrics[last]
    fractions = [v["aligned_fraction"] for v in rec.metrics.values() if "aligned_fraction" in v]
    return {
        "eval_ppl": m["eval_ppl"],
        "eval_loss": m["eval_loss"],
        "steps": float(res.step),
        "aligned_fraction": sum(fractions) / len(fractions) if fractions else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=None, help="text file (default: pydoc topics)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xtok"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--teacher-vocab", type=int, default=512)
    ap.add_argument("--student-vocab", type=int, default=384)
    ap.add_argument("--kd-weight", type=float, default=None, help="a (default: the spec's)")
    ap.add_argument("--teacher", type=Path, default=None, help="reuse a trained teacher folder")
    ap.add_argument("--arms", default="sft,uld,gold", help="comma list of sft, uld, gold")
    a = ap.parse_args(argv)
    import torch

    from sharp_core.study.compare import paired

    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    corpus = a.corpus
    if corpus is None:
        from pydoc_data.topics import topics

        corpus = a.work / "corpus.txt"
        corpus.write_text("\n\n".join(topics[k] for k in sorted(topics))[:200_000], "utf-8")
    t0 = time.time()
    teacher = a.teacher
    if teacher is None:
        teacher_spec = _spec(
            corpus,
            {"name": "sft"},
            0,
            a.teacher_steps,
            student={"init": "config", "config": dict(TEACHER)},
            tokenizer={"train": {"vocab_size": a.teacher_vocab}},
        )
        from sharp_core.spec import parse_spec
        from sharp_core.train.loop import train

        teacher = train(parse_spec(teacher_spec), a.work / "teacher").checkpoint
    assert teacher is not None
    print(f"teacher {teacher} ready after {time.time() - t0:.0f} s", flush=True)
    arms = {
        "sft": {"name": "sft"},
        "uld": {"name": "kd", "cross_tokenizer": "uld"},
        "gold": {"name": "kd", "cross_tokenizer": "gold"},
    }
    arms = {k: v for k, v in arms.items() if k in a.arms.split(",")}
    if a.kd_weight is not None:
        for arm in [k for k in arms if k != "sft"]:
            arms[arm]["kd_weight"] = a.kd_weight  # type: ignore[assignment]
    results: dict[str, dict[int, dict[str, float]]] = {k: {} for k in arms}
    for seed in range(a.seeds):
        for arm, method in arms.items():
            over: dict[str, Any] = {"tokenizer": {"train": {"vocab_size": a.student_vocab}}}
            if arm != "sft":
                over["teacher"] = {"model": str(teacher)}
            t1 = time.time()
            r = _run(_spec(corpus, method, seed, a.steps, **over), a.work / f"{arm}-{seed}")
            results[arm][seed] = r
            print(
                f"seed {seed} {arm:<4} eval_ppl {r['eval_ppl']:.3f} "
                f"(aligned {r['aligned_fraction']:.2f}) {time.time() - t1:.0f} s",
                flush=True,
            )
    ppl = {arm: {s: r["eval_ppl"] for s, r in rs.items()} for arm, rs in results.items()}
    cmp = {
        arm: paired(ppl[arm], ppl["sft"], relative=True) for arm in ("uld", "gold") if arm in ppl
    }
    if "uld" in ppl and "gold" in ppl:
        cmp["gold_vs_uld"] = paired(ppl["gold"], ppl["uld"], relative=True)
    for k, c in cmp.items():
        assert c is not None
        ci = c["ci"] or [float("nan")] * 2
        print(
            f"{k:<12} Δ eval_ppl {c['mean']:+.2f} % (95% CI {ci[0]:+.2f}, {ci[1]:+.2f}; p {c['p']})"
        )
    doc = {
        "command": "python -m bench.quality.cross_tokenizer " + " ".join(argv or []),
        "settings": vars(a)
        | {"work": str(a.work), "out": str(a.out), "corpus": str(corpus), "teacher": str(teacher)},
        "teacher": TEACHER,
        "student": STUDENT,
        "results": {arm: {str(s): r for s, r in rs.items()} for arm, rs in results.items()},
        "paired_vs_sft_percent": cmp,
        "wall_s": time.time() - t0,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
