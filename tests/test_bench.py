"""Tests of the step benchmark's machinery (bench/step/), not of its timings.

Why no timing thresholds: a benchmark's numbers depend on the machine and its load; a test
asserting them would be flaky on a shared CPU and meaningless across cards. The figures are
measured and recorded in docs/performance.md instead. What is checked here: the CLI runs
every step kind on the hidden ``micro`` preset and emits a well-formed JSON document (kd is
the reference, so its ratios are exactly 1.0); each "before" variant really runs the other
code path (the profile's labelled ranges show which sharp_core functions a step called) and
computes the same loss as its "after"; ``checks`` holds the projection comparison; the
CUDA-only Liger step is skipped with its reason on a CPU; and the GPU preset refuses a
CPU-only machine. sharp_core's fast paths themselves (`project_sdpa`, `logit_objective`) are
tested in tests/test_capture.py, tests/test_losses.py and tests/test_trainer.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import step as bench_step
from bench.step import profiling
from bench.step.models import Workload
from bench.step.runners import MicroStepRunner, make_runner
from sharp_core.models.capture import CapturedLayer
from sharp_core.objectives import losses

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = not torch.cuda.is_available()


@pytest.fixture
def one_thread():
    """The micro run uses one thread (see --threads); restore the session's setting after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_micro_preset_runs_every_step_and_reports_checks(capsys, one_thread) -> None:
    # all but the compiled steps, whose compilation takes minutes on a loaded CPU (their
    # runners are checked without running them below)
    steps = [s for s in bench_step.ALL_STEPS if not s.endswith("_compiled")]
    fused = losses.logit_objective
    rc = bench_step.main(
        [
            "--preset",
            "micro",
            "--json",
            "--threads",
            "1",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--steps",
            ",".join(steps),
            "--profile",
        ]
    )
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # stdout is the JSON document only (the table: stderr)
    assert rc == 0, captured.err
    # --profile's wrappers of sharp_core's functions are undone
    assert losses.logit_objective is fused

    assert doc["benchmark"] == "bench.step" and doc["schema"] == 2
    assert doc["command"].startswith("python -m bench.step --preset micro")
    p = doc["preset"]
    assert p["name"] == "micro" and p["repeats"] == 2 and p["warmup"] == 1
    assert p["tokens_per_step"] == p["batch"] * p["seq_len"]
    for who in ("teacher", "student"):
        assert {"layers", "heads", "hidden", "vocab", "params", "dtype"} <= set(p[who])
    assert p["method"]["name"] == "sharp" and p["method"]["projection"] == "sdpa"
    m = doc["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["transformers"]
    assert m["torch_threads"] == 1
    assert doc["flops_per_token"]["non_embedding"] > 0

    by_name = {s["name"]: s for s in doc["steps"]}
    assert list(by_name) == steps
    ran = [n for n in steps if n != "kd_liger"] if CPU_ONLY else steps
    for name in ran:
        s = by_name[name]
        assert s["error"] is None and s["skipped"] is None, (name, s["error"], s["skipped"])
        assert len(s["ms"]) == 2 and all(t > 0 for t in s["ms"])
        assert s["ms_median"] > 0 and s["tokens_per_s"] > 0
        assert s["peak_mem_mib"] > 0 and s["step_mem_mib"] >= 0
        assert s["ratio_to_kd"] > 0 and s["ratio_to_kd_paired"] > 0 and s["mem_ratio_to_kd"] > 0
        # --profile: per-phase ranges of the step
        assert {"fwd:total", "bwd:total", "opt:total"} <= set(s["profile"])
        if CPU_ONLY:  # a CPU run: no MFU, no CUDA sync count
            assert s["mfu_table"] is None and s["host_syncs"] is None
    assert by_name["kd"]["ratio_to_kd"] == 1.0
    assert by_name["kd"]["ratio_to_kd_paired"] == 1.0
    assert by_name["kd"]["mem_ratio_to_kd"] == 1.0
    assert doc["targets"] == []  # micro has none

    # Each step runs the code path it names: the profile's ranges are sharp_core's functions.
    prof = {n: set(by_name[n]["profile"]) for n in ran}
    sdpa, chunked = "fwd:sharp.project_sdpa (P*Q by SDPA)", "fwd:sharp.project (chunked P*Q)"
    assert sdpa in prof["sharp"] and chunked not in prof["sharp"]
    assert chunked in prof["sharp_chunked"] and sdpa not in prof["sharp_chunked"]
    # the chunked path's checkpoint recomputes the softmax rows in backward; SDPA's does not
    rows = "bwd:CapturedLayer.probs (softmax rows)"
    assert rows in prof["sharp_chunked"] and not any(
        "CapturedLayer.probs" in r for r in prof["sharp"]
    )
    # the trainer's steps: the head and the loss fused over chunks; eager: the whole logits
    fused_range = "fwd:losses.logit_objective (fused CE+D)"
    linear_range = "fwd:fused.fused_linear_objective (head + CE+D, chunked)"
    for name in ("kd", "sharp", "sharp_chunked"):
        assert linear_range in prof[name] and fused_range not in prof[name], name
        assert "fwd:losses.divergence" not in prof[name], name
    assert fused_range in prof["eager"] and linear_range not in prof["eager"]
    assert fused_range not in prof["kd_separate"] and linear_range not in prof["kd_separate"]
    assert {
        "fwd:bench.separate_logit_objective (CE, then D)",
        "fwd:losses.cross_entropy",
        "fwd:losses.divergence",
    } <= prof["kd_separate"]
    assert linear_range in prof["ce"] and fused_range not in prof["ce"]

    checks = doc["checks"]
    # the two projection paths give the same SHARP terms and maps (float32 on the CPU)
    diffs = checks["projection_term_rel_diff"]
    terms = ("sharp_layer", "sharp_head", "sharp_token")
    assert set(diffs) == {*terms, *(f"{t}_value" for t in terms), "pq_student", "pq_teacher"}
    assert all(0 <= diffs[t] < 1e-4 for t in terms), diffs
    assert all(diffs[f"{t}_value"] > 0 for t in terms), diffs
    assert 0 <= diffs["pq_student"] < 1e-5 and 0 <= diffs["pq_teacher"] < 1e-5, diffs
    logit = checks["logit_fwd_bwd"]
    assert logit["fused_ms"] > 0 and logit["separate_ms"] > 0 and logit["repeats"] == 5
    assert logit["separate_over_fused_paired"] > 0
    obj = checks["objective_fwd_bwd"]
    assert obj["chunked_ms"] > 0 and obj["sdpa_ms"] > 0 and obj["repeats"] == 5
    assert obj["chunked_over_sdpa_paired"] > 0
    # before and after of the logit loss: the same loss on the same batch
    kd_pair = checks["kd_separate_vs_kd"]
    assert kd_pair["loss_kd"] > 0 and kd_pair["rel_diff"] < 1e-5, kd_pair
    assert "projection_error" not in checks and "kd_separate_error" not in checks

    liger = by_name["kd_liger"]
    if CPU_ONLY:
        assert liger["error"] is None and liger["ms"] == [] and liger["ms_median"] is None
        assert liger["skipped"].startswith("needs CUDA: Liger Kernel")
        assert liger["ratio_to_kd"] is None
        assert "kd_liger" in captured.err and "skipped" in captured.err  # said in the table
        assert "liger_vs_logit_objective" not in checks


@pytest.mark.skipif(not CPU_ONLY, reason="checks the refusal on a CPU-only machine")
@pytest.mark.slow
def test_gpu_preset_refuses_cpu_with_a_clear_message() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.step", "--preset", "opt-1.3b-125m"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr
    assert r.stdout == ""


def test_unknown_step_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--preset", "micro", "--steps", "kd,nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "sharp_chunked" in err  # names the choices


def test_logit_loss_reaches_the_step_through_setup_and_profiling_restores_it() -> None:
    """``kd_separate`` hands its loss to the step as ``Setup.logit_loss`` (sharp_core's module
    is never patched); the profile's wrappers, of that field and of sharp_core's functions,
    are undone on exit, also on error."""
    w = Workload.build(bench_step.PRESETS["micro"], torch.device("cpu"), compile_=False)
    fused, probs = losses.logit_objective, CapturedLayer.probs
    separate = bench_step.separate_logit_objective
    kd, kd_sep = make_runner("kd", w), make_runner("kd_separate", w)
    assert isinstance(kd, MicroStepRunner) and isinstance(kd_sep, MicroStepRunner)
    assert kd.S.logit_loss is fused and kd_sep.S.logit_loss is separate
    with pytest.raises(RuntimeError, match="boom"), profiling._instrumented(kd_sep):
        assert kd_sep.S.logit_loss is not separate  # the labelled wrapper
        assert losses.logit_objective is not fused and CapturedLayer.probs is not probs
        raise RuntimeError("boom")
    assert kd_sep.S.logit_loss is separate
    assert losses.logit_objective is fused and CapturedLayer.probs is probs
    assert "forward" not in vars(kd_sep)  # the phase wrappers are gone too


def test_compiled_steps_compile_both_models_and_nothing_else() -> None:
    """``kd_compiled``/``sharp_compiled`` wrap the models the trainer's way, for that step only.

    Built, not run: the uncompiled steps of the same run keep calling the plain modules.
    """
    w = Workload.build(bench_step.PRESETS["micro"], torch.device("cpu"), compile_=False)
    teacher, student = w.teacher, w.student

    def make(name: str) -> MicroStepRunner:
        r = make_runner(name, w)
        assert isinstance(r, MicroStepRunner)
        return r

    for name, method in (("kd_compiled", "kd"), ("sharp_compiled", "sharp")):
        r = make(name)
        assert r.S.spec.method.name == method and r.S.spec.training.compile
        for model, plain in ((r.S.student, student), (r.S.teacher, teacher)):
            assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
            assert model._orig_mod is plain
    plain_kd = make("kd")
    assert plain_kd.S.student is student and plain_kd.S.teacher is teacher
    assert not plain_kd.S.spec.training.compile


def _is_public(module: str, name: str) -> bool:
    """``name`` is part of ``module``'s public surface: in its ``__all__`` when it declares
    one, else any name without a leading underscore (and the module path has none either)."""
    import importlib

    if any(part.startswith("_") for part in module.split(".")):
        return False
    declared = getattr(importlib.import_module(module), "__all__", None)
    return name in declared if declared is not None else not name.startswith("_")


def _bench_sharp_core_uses() -> list[tuple[str, str, str]]:
    """(bench module, sharp_core module, name) of every import from sharp_core in bench/ and
    every attribute read on an imported sharp_core module (``losses.divergence``)."""
    import ast

    out: list[tuple[str, str, str]] = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}  # local name -> sharp_core module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sharp_core"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if (ROOT / (sub.replace(".", "/") + ".py")).exists():
                        aliases[a.asname or a.name] = sub  # a module: its reads are checked
                    else:
                        out.append((mod, node.module, a.name))  # type: ignore[arg-type]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("sharp_core"):
                        out.append((mod, a.name, ""))
                        if a.asname:
                            aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                out.append((mod, aliases[node.value.id], node.attr))
    return out


def test_bench_uses_only_public_sharp_core_names() -> None:
    """Issue 13: bench/ (every module) reaches sharp_core through public names only, so a
    refactor of sharp_core's internals cannot break a benchmark; no adapter module is left."""
    uses = _bench_sharp_core_uses()
    assert not (ROOT / "bench" / "core_api.py").exists()
    seen = {(m, n) for _, m, n in uses}
    # the checker sees both import forms the benchmarks use
    assert ("sharp_core.train.step", "micro_step") in seen and (
        "sharp_core.train.perf",
        "peak_flops",
    ) in seen
    assert (
        "sharp_core.objectives.losses",
        "divergence",
    ) in seen  # read as an attribute of the module
    bad = [f"{b}: {m}.{n}" for b, m, n in uses if n and not _is_public(m, n)]
    bad += [f"{b}: import {m}" for b, m, n in uses if not n and not _is_public(m, "x")]
    assert bad == []
    # the profile wraps public functions only (by name, at run time)
    assert [(m, a) for m, a, _ in profiling.PROFILED if not _is_public(m, a)] == []
    # the rule can fail: a private name, and a name a module imports but does not declare
    assert not _is_public("sharp_core.objectives.sharp", "_project_chunk")
    assert not _is_public("sharp_core.train.loop", "flops_per_token")  # sharp_core.train.perf's


def _bench_imports() -> dict[str, list[tuple[str, str]]]:
    """bench module (dotted) → [(imported module, imported name or "")]."""
    import ast

    out: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((ROOT / "bench").rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found: list[tuple[str, str]] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found += [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(a.name, "") for a in node.names]
        out[mod] = found
    return out


def test_bench_imports_run_downwards() -> None:
    """The shared bottom (configs, machine) imports no benchmark, and the two benchmarks do
    not import each other."""
    imports = _bench_imports()
    for mod, found in imports.items():
        targets = {m for m, _ in found if m.startswith("bench")}
        if mod in ("bench.configs", "bench.machine"):
            assert targets <= {"bench.configs", "bench.machine"}, mod
        for a, b in (("bench.step", "bench.quality"), ("bench.quality", "bench.step")):
            if mod == a or mod.startswith(a + "."):
                assert not any(t == b or t.startswith(b + ".") for t in targets), mod


def test_prune_bench_reports_time_and_flat_memory_per_block_count(tmp_path: Path) -> None:
    """`python -m bench.prune`: every block count is scored and pruned, the JSON holds the
    timings the docs quote, and the calibration saw exactly the blocks asked for."""
    from bench.prune import main as prune_main

    out = tmp_path / "prune.json"
    assert (
        prune_main(
            ["--blocks", "4", "8", "--batch-size", "4", "--device", "cpu", "--out", str(out)]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert [r["blocks"] for r in res["rows"]] == [4, 8]
    assert [r["samples"] for r in res["rows"]] == [4, 8]
    for r in res["rows"]:
        assert r["calibration_s"] > 0 and r["prune_s"] > 0 and r["params_after"] < res["params"]
    assert "time_ratio_vs_first" in res["rows"][1]


# ---------------------------------------------- bench.quality's statistics: sharp_core.study.compare


def _doc_interval(mean: float, ci: list[float], nd: int) -> str:
    """An interval as docs/results.md writes it (typographic minus)."""
    return f"{mean:+.{nd}f} [{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]".replace("-", "−")


def test_committed_onpolicy_results_recompute_as_sharp_core_compare() -> None:
    """The on-policy JSONs re-rendered (`--from-json`) give, per setting, the paired Δ and
    t-interval that `sharp_core.study.compare.paired` computes from the raw per-seed perplexities
    against λ = 0, and the stored statistics are those; docs/results.md quotes them."""
    from bench.quality import onpolicy
    from sharp_core.study.compare import paired

    doc = (ROOT / "docs/results.md").read_text()
    for name in ("onpolicy-tiny-cpu", "onpolicy-tiny-cpu-prune", "onpolicy-tiny-cpu-200steps"):
        data = json.loads((ROOT / f"docs/results/{name}.json").read_text())
        stats = onpolicy.analyse(data)
        assert json.loads(json.dumps(stats)) == data["stats"]  # the stored ones are these
        ref = data["settings"]["lam0"]["cells"]
        n_checked = 0
        for setting, s in data["settings"].items():
            for method, by_seed in s["cells"].items():
                d = stats[f"{method}/{setting}"].get("delta_pct")
                if setting == "lam0" or len(by_seed) < 2:
                    continue
                want = paired(
                    {int(k): c["ppl"] for k, c in by_seed.items()},
                    {int(k): c["ppl"] for k, c in ref[method].items()},
                    relative=True,
                )
                assert d["mean"] == pytest.approx(want["mean"], abs=1e-12)
                assert d["ci95"] == pytest.approx(want["ci"], abs=1e-12)
                assert d["per_seed"] == pytest.approx(list(want["per_seed"].values()))
                text = _doc_interval(want["mean"], want["ci"], 1)
                if name.endswith("200steps"):  # quoted in prose: "+33.8 % [+22.6, +45.0]"
                    text = text.replace(" [", " % [")
                assert text in doc, (name, method, setting)
                n_checked += 1
        assert n_checked >= 1
    table = onpolicy.render(data, stats)
    assert "| kd | lam0.5 | 3 |" in table and "(reference)" in table


def test_committed_cache_results_recompute_as_sharp_core_compare(capsys) -> None:
    """`cache_report --from-json` recomputes every cache method's Δ against dense kd from the
    JSON's raw cells: the same mean, interval and per-seed Δ as `sharp_core.study.compare.paired`,
    equal to the statistics stored beside them and to docs/results.md's table."""
    from bench.quality import cache_report
    from sharp_core.study.compare import paired

    path = ROOT / "docs/results/teacher-cache-tiny-cpu.json"
    data = json.loads(path.read_text())
    again = cache_report.recompute(data)
    ppl = {}
    for r in data["cells"].values():
        ppl.setdefault(r["method"], {})[int(r["seed"])] = r["ppl"][data["split"]]["ppl"]
    doc = (ROOT / "docs/results.md").read_text()
    assert again["stats"]["best_baseline"] == "kd"
    for method, st in again["stats"]["methods"].items():
        want = paired(ppl[method], ppl["kd"], relative=True)
        d = st["delta_pct"]
        assert d["mean"] == pytest.approx(want["mean"], abs=1e-12)
        assert d["ci95"] == pytest.approx(want["ci"], abs=1e-12)
        assert d["per_seed"] == pytest.approx(want["per_seed"])
        assert data["stats"]["methods"][method]["delta_pct"]["ci95"] == pytest.approx(want["ci"])
        if method != "kd":
            assert _doc_interval(want["mean"], want["ci"], 2) in doc, method
    assert cache_report.main(["--from-json", str(path)]) == 0
    assert cache_report.render(again) in capsys.readouterr().out


# ------------------------------------------------------------------ bench.memory


def test_bench_memory_parts_run_and_the_parity_check_catches_a_mismatch(tmp_path) -> None:
    """bench.memory's functions at tiny shapes: the logit-term measurement reports a peak,
    the fused-vs-dense check passes on the real kernel and fails on one 0.1% off, and a
    whole trainer step runs on its spec (a 300-entry tokenizer built offline)."""
    from bench.memory import run as mem
    from sharp_core.objectives import fused

    r = mem.measure_logit("fused", 16, 64)
    assert r["peak"] >= r["baseline"] > 0 and r["loss"] > 0
    ok = mem.check_fused(8, 64)
    assert ok["ok"] and max(ok["rel_err"].values()) <= 1e-5

    def off(*args, **kw):
        loss, ce, d = fused.fused_linear_objective(*args, **kw)
        return loss * 1.001, ce, d

    bad = mem.check_fused(8, 64, names=("forward_kl",), kernel=off)
    assert not bad["ok"] and bad["rel_err"]["forward_kl.loss"] == pytest.approx(1e-3, rel=1e-2)

    assets = mem.build_assets(tmp_path / "assets", vocab=300, corpus=None)
    spec = mem.step_spec("kd", assets, seq_len=32)
    spec["student"]["config"]["vocab_size"] = 300
    step = mem.measure_step(spec, tmp_path / "run")
    assert step["status"] == "stopped" and step["peak_step2"] >= step["peak_step1"] > 0
    assert step["loss"] > 0
