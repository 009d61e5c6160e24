"""`python -m bench.memory`: peak host memory of a distillation step at a Llama-3 vocabulary (128 256) and 4k context.

``python -m bench.memory`` runs every measurement in a fresh subprocess (so peaks never mix)
and reads the kernel's high-water mark of resident memory, ``VmHWM`` in /proc/self/status,
absolute and minus the process's resident memory after its imports (``baseline``):

* ``step_<method>``: one whole training step of the real trainer (`sharp_core.train.loop.train`
  on a spec: narrow Llamas, hidden 256, 4 query / 2 KV heads, teacher 2 layers, student 1,
  a 128 256-entry tokenizer built offline, B = 1, N = 4096), for kd, jsd and sharp; the peak
  is read when step 1 has logged, before the end-of-run evaluation and checkpoint;
* ``logit_fused`` / ``logit_dense``: the logit term alone at the same shapes, forward and
  backward, through `sharp_core.objectives.fused.fused_linear_objective` and through the
  dense `sharp_core.objectives.losses.logit_objective` on whole logits;
* ``parity``: the fused loss and its gradients against the dense path in float32 on the
  first ``--parity-tokens`` tokens (the dense reference of all 4095 would itself take ~10 GB).

Only public names of sharp_core are used. See docs/performance.md, "Memory at 128k
vocabulary and 4k context", for the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VOCAB = 128256
"""Llama-3's vocabulary."""
SEQ_LEN = 4096
HIDDEN = 256
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
"""Real text beside the checkout when present (../shared/data); generated text otherwise."""
METHODS = ("kd", "jsd", "sharp")


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM: peak resident, VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def llama_config(vocab: int, layers: int, hidden: int = HIDDEN) -> dict[str, Any]:
    """A narrow Llama: GQA with 4 query and 2 key/value heads, untied head."""
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    }


def _text(corpus: Path | None) -> str:
    if corpus is not None and corpus.is_file():
        return corpus.read_text(encoding="utf-8")
    words = [f"w{i}" for i in range(5000)]  # generated text when no corpus is at hand
    return "\n".join(
        " ".join(words[(i * 7 + j * 13) % 5000] for j in range(12)) for i in range(20000)
    )


def build_assets(root: Path, vocab: int = VOCAB, corpus: Path | None = CORPUS) -> dict[str, Path]:
    """A ``vocab``-entry tokenizer (WordLevel: the corpus's words, then synthetic entries up to
    ``vocab``), a text file, and a teacher folder (random narrow Llama, 2 layers, with that
    tokenizer), all offline. Returns their paths; reuses them when already built."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    text_path, teacher = root / "corpus.txt", root / f"teacher-{vocab}"
    if (teacher / "config.json").is_file() and text_path.is_file():
        return {"corpus": text_path, "teacher": teacher}
    text = _text(corpus)
    text_path.write_text(text, encoding="utf-8")
    entries = ["<unk>", "<eos>"]
    seen = set(entries)
    for w in text.split():
        if w not in seen and len(entries) < vocab:
            seen.add(w)
            entries.append(w)
    entries += [f"<synthetic_{i}>" for i in range(vocab - len(entries))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(entries)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>"
    )
    assert len(fast) == vocab, len(fast)
    torch.manual_seed(0)
    cfg = dict(llama_config(vocab, 2))
    cfg.pop("model_type")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.save_pretrained(teacher)
    fast.save_pretrained(teacher)
    return {"corpus": text_path, "teacher": teacher}


def step_spec(method: str, assets: dict[str, Path], seq_len: int = SEQ_LEN) -> dict[str, Any]:
    """The job spec of the whole-step measurement: batch 1, eval and checkpoints off."""
    return {
        "name": f"bench-memory-{method}",
        "teacher": {"model": str(assets["teacher"])},
        "student": {"init": "config", "config": llama_config(VOCAB, 1)},
        "dataset": {"files": [str(assets["corpus"])]},
        "method": {"name": method},
        "training": {
            "max_steps": 3,
            "batch_size": 1,
            "seq_len": seq_len,
            "warmup_steps": 0,
            "eval_every": 0,
            "checkpoint_every": 0,
            "precision": "fp32",
        },
    }


# ----------------------------------------------------------------- one measurement each


def measure_step(spec_dict: dict[str, Any], out: Path) -> dict[str, Any]:
    """Peak of a whole training step through the real trainer, read when step ``1`` (and 2)
    has logged; the run is then stopped, before the final evaluation and checkpoint."""
    from sharp_core.spec import parse_spec
    from sharp_core.train.loop import TrainCallbacks, train

    base = _status("VmRSS")
    peaks: dict[int, int] = {}
    seen: dict[str, Any] = {}

    class Cb(TrainCallbacks):
        def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
            if step >= 1 and step not in peaks:
                peaks[step] = _status("VmHWM")
                seen.update({k: float(v) for k, v in metrics.items() if k in ("loss", "kd")})

        def should_stop(self) -> bool:
            return 2 in peaks

    spec = parse_spec(spec_dict)
    t0 = time.perf_counter()
    res = train(spec, out, callbacks=Cb())
    return {
        "baseline": base,
        "peak_step1": peaks.get(1, -1),
        "peak_step2": peaks.get(2, -1),
        "status": res.status,
        "seconds": round(time.perf_counter() - t0, 1),
        **seen,
    }


def _logit_inputs(tokens: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "hs": torch.randn(1, tokens, HIDDEN, generator=g).requires_grad_(True),
        "ws": torch.nn.Parameter(torch.randn(vocab, HIDDEN, generator=g) * 0.02),
        "ht": torch.randn(1, tokens, HIDDEN, generator=g),
        "wt": torch.randn(vocab, HIDDEN, generator=g) * 0.02,
        "y": torch.randint(0, vocab, (1, tokens), generator=g),
    }


def logit_term(
    kind: str, inp: dict[str, Any], *, name: str = "forward_kl", kernel: Any = None
) -> tuple[Any, Any, Any]:
    """(loss, grad hidden, grad weight) of the logit term, 'fused' or 'dense', a = 0.9."""
    import torch

    from sharp_core.objectives import fused, losses

    hs, ws, ht, wt, y = inp["hs"], inp["ws"], inp["ht"], inp["wt"], inp["y"]
    kw = {"kd_weight": 0.9, "temperature": 1.0, "num_valid": int(y.numel())}
    if kind == "fused":
        fn = kernel or fused.fused_linear_objective
        loss = fn(name, hs, ws, ht, wt, y, **kw)[0]
    else:
        s = hs @ ws.T  # (1, N, V)
        with torch.no_grad():
            t = ht @ wt.T  # (1, N, V)
        loss = losses.logit_objective(name, s, t, y, **kw)[0]
    gh, gw = torch.autograd.grad(loss, (hs, ws))
    return loss.detach(), gh, gw


def measure_logit(kind: str, tokens: int, vocab: int) -> dict[str, Any]:
    inp = _logit_inputs(tokens, vocab)
    base = _status("VmRSS")
    t0 = time.perf_counter()
    loss, _, _ = logit_term(kind, inp)
    return {
        "baseline": base,
        "peak": _status("VmHWM"),
        "loss": float(loss),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def check_fused(
    tokens: int, vocab: int, names: tuple[str, ...] = ("forward_kl", "jsd"), kernel: Any = None
) -> dict[str, Any]:
    """Relative errors of the fused logit term against the dense one (loss, grad wrt hidden
    states, grad wrt head weight), float32; ``ok`` when all are ≤ 1e-5. ``kernel``: the fused
    implementation under test (default `fused_linear_objective`)."""
    inp = _logit_inputs(tokens, vocab, seed=1)
    errs: dict[str, float] = {}
    for name in names:
        got = logit_term("fused", inp, name=name, kernel=kernel)
        want = logit_term("dense", inp, name=name)
        for part, g, w in zip(("loss", "grad_hidden", "grad_weight"), got, want, strict=True):
            scale = max(float(w.abs().max()), 1e-30)
            errs[f"{name}.{part}"] = float((g - w).abs().max()) / scale
    return {"tokens": tokens, "rel_err": errs, "ok": all(v <= 1e-5 for v in errs.values())}


def _child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    if kind == "step":
        return measure_step(args["spec"], Path(args["out"]))
    if kind == "logit":
        return measure_logit(args["how"], args["tokens"], args["vocab"])
    if kind == "parity":
        return check_fused(args["tokens"], args["vocab"])
    raise ValueError(kind)


def run_child(kind: str, args: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its JSON answer (or the error)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "bench.memory", "--child", kind, json.dumps(args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def _gb(b: float) -> str:
    return f"{b / 1e9:6.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--parity-tokens", type=int, default=512)
    ap.add_argument("--skip-dense", action="store_true", help="skip the dense logit term")
    ap.add_argument("--assets", type=Path, default=None, help="folder for tokenizer/teacher")
    a = ap.parse_args(argv)
    if a.child:
        out = _child(a.child[0], json.loads(a.child[1]))
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    assets = build_assets(a.assets or work / "assets", a.vocab)
    rows: dict[str, dict[str, Any]] = {}
    for m in [m for m in a.methods.split(",") if m]:
        spec = step_spec(m, assets, a.seq_len)
        spec["student"]["config"]["vocab_size"] = a.vocab
        rows[f"step_{m}"] = run_child("step", {"spec": spec, "out": str(work / f"run-{m}")})
    n = a.seq_len - 1
    rows["logit_fused"] = run_child("logit", {"how": "fused", "tokens": n, "vocab": a.vocab})
    if not a.skip_dense:
        rows["logit_dense"] = run_child("logit", {"how": "dense", "tokens": n, "vocab": a.vocab})
    rows["parity"] = run_child("parity", {"tokens": a.parity_tokens, "vocab": a.vocab})
    print(f"bench.memory: V={a.vocab}, N={a.seq_len}, B=1, hidden {HIDDEN}, CPU")
    print(f"{'measurement':<14} {'peak GB':>8} {'above base GB':>14}  notes")
    for k, r in rows.items():
        if "error" in r:
            print(f"{k:<14} ERROR {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        if k == "parity":
            continue
        peak = max(r.get("peak_step1", -1), r.get("peak_step2", -1), r.get("peak", -1))
        note = " ".join(f"{x}={r[x]}" for x in ("loss", "status", "seconds") if x in r)
        print(f"{k:<14} {_gb(peak):>8} {_gb(peak - r['baseline']):>14}  {note}")
    f, d = rows.get("logit_fused", {}), rows.get("logit_dense", {})
    if "peak" in f and "peak" in d:
        ratio = (d["peak"] - d["baseline"]) / max(f["peak"] - f["baseline"], 1)
        print(f"logit term, dense / fused (above baseline): {ratio:.1f}x")
    p = rows["parity"]
    if "rel_err" in p:
        worst = max(p["rel_err"].values())
        print(
            f"fused vs dense on the first {p['tokens']} tokens: max rel err {worst:.2e} "
            f"({'ok' if p['ok'] else 'MISMATCH'}, tolerance 1e-5)"
        )
    print(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows.values()) and p.get("ok") else 1
