"""Tests of the step benchmark's machinery (bench/step.py), not of its timings.

Why no timing thresholds: a benchmark's numbers depend on the machine and its load; a test
asserting them would be flaky on a shared CPU and meaningless across cards. The figures are
measured and recorded in docs/performance.md instead. What is checked here: the CLI runs
every step kind on the hidden ``micro`` preset and emits a well-formed JSON document (kd is
the reference, so its ratios are exactly 1.0), the GPU preset refuses a CPU-only machine with
a clear message, and the bench-local SDPA projection (the proposed fix the benchmark measures)
computes what ``sharp_core.sharp.project`` computes, values and gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import step as bench_step
from sharp_core import sharp
from sharp_core.capture import CapturedLayer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """The micro run uses one thread (see --threads); restore the session's setting after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(120)
def test_micro_preset_json_document(capsys, one_thread) -> None:
    steps = ["ce", "kd", "sharp", "eager", "sharp_sdpa", "kd_fused"]
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
    out = capsys.readouterr().out
    doc = json.loads(out)  # stdout is the JSON document only (the table goes to stderr)
    assert rc == 0

    assert doc["benchmark"] == "bench.step"
    assert doc["command"].startswith("python -m bench.step --preset micro")
    p = doc["preset"]
    assert p["name"] == "micro" and p["repeats"] == 2 and p["warmup"] == 1
    assert p["tokens_per_step"] == p["batch"] * p["seq_len"]
    for who in ("teacher", "student"):
        assert {"layers", "heads", "hidden", "vocab", "params", "dtype"} <= set(p[who])
    assert p["method"]["name"] == "sharp"
    m = doc["machine"]
    assert m["cpu"] and m["torch"] == torch.__version__ and m["transformers"]
    assert m["torch_threads"] == 1
    assert doc["flops_per_token"]["non_embedding"] > 0

    by_name = {s["name"]: s for s in doc["steps"]}
    assert list(by_name) == steps
    for s in by_name.values():
        assert s["error"] is None, s["error"]
        assert len(s["ms"]) == 2 and all(t > 0 for t in s["ms"])
        assert s["ms_median"] > 0 and s["tokens_per_s"] > 0
        assert s["peak_mem_mib"] > 0 and s["step_mem_mib"] >= 0
        assert s["ratio_to_kd"] > 0 and s["ratio_to_kd_paired"] > 0 and s["mem_ratio_to_kd"] > 0
        # --profile: per-phase ranges of the step
        assert {"fwd:total", "bwd:total", "opt:total"} <= set(s["profile"])
        # CPU run: no MFU, no CUDA sync count
        assert s["mfu_table"] is None and s["mfu_measured"] is None and s["host_syncs"] is None
    assert by_name["kd"]["ratio_to_kd"] == 1.0
    assert by_name["kd"]["ratio_to_kd_paired"] == 1.0
    assert "fwd:sharp._project_teacher (teacher P*Q)" in by_name["sharp"]["profile"]
    assert "fwd:bench.project_sdpa (P*Q by SDPA)" in by_name["sharp_sdpa"]["profile"]
    assert by_name["kd"]["mem_ratio_to_kd"] == 1.0
    assert doc["targets"] == []  # micro has none
    # the SDPA projection gives the same SHARP terms (float32 on the CPU)
    diffs = doc["checks"]["sharp_sdpa_term_rel_diff"]
    terms = ("sharp_layer", "sharp_head", "sharp_token")
    assert set(diffs) == {*terms, *(f"{t}_value" for t in terms), "pq_student", "pq_teacher"}
    assert all(0 <= diffs[t] < 1e-4 for t in terms), diffs
    assert diffs["pq_student"] < 1e-5 and diffs["pq_teacher"] < 1e-5, diffs
    obj = doc["checks"]["objective_fwd_bwd"]
    assert obj["sharp_core_ms"] > 0 and obj["sdpa_ms"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
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
    assert "nope" in capsys.readouterr().err


def _layer(b, h, h_kv, n, d, *, mask=None, causal=True, gen=None) -> CapturedLayer:
    q = torch.randn(b, h, n, d, generator=gen).requires_grad_(True)
    k = torch.randn(b, h_kv, n, d, generator=gen).requires_grad_(True)
    return CapturedLayer(query=q, key=k, scaling=d**-0.5, mask=mask, is_causal=causal)


@pytest.mark.parametrize("case", ["causal", "left_padding", "gqa", "rank_above_head_dim"])
def test_project_sdpa_matches_chunked_projection(case: str) -> None:
    """The proposed fix must compute P·Q and its q/k gradients exactly as sharp.project."""
    gen = torch.Generator().manual_seed(0)
    b, h, n, d, r = 2, 4, 24, 8, 6
    h_kv, mask, causal = h, None, True
    if case == "left_padding":
        pad = torch.ones(b, n, dtype=torch.bool)
        pad[1, :5] = False  # sequence 1: five left pads -> query rows 0..4 attend to nothing
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        mask, causal = (tril[None, None] & pad[:, None, None, :]), False  # (B, 1, N, N)
    elif case == "gqa":
        h_kv = 2
    elif case == "rank_above_head_dim":
        r = 12
    attn = _layer(b, h, h_kv, n, d, mask=mask, causal=causal, gen=gen)
    basis = sharp.dct_basis(n, r)
    weight = torch.randn(b, h, n, r, generator=gen)

    ref = sharp.project(attn, basis, query_chunk=5)
    (ref * weight).sum().backward()
    ref_grads = attn.query.grad.clone(), attn.key.grad.clone()
    attn.query.grad = attn.key.grad = None

    got = bench_step.project_sdpa(attn, basis)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    (got * weight).sum().backward()
    for g, rg in zip((attn.query.grad, attn.key.grad), ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, rg, atol=2e-6, rtol=1e-5)
    if case == "left_padding":
        assert torch.equal(got[1, :, :5], torch.zeros_like(got[1, :, :5]))


def test_project_teacher_sdpa_matches_and_patch_restores() -> None:
    gen = torch.Generator().manual_seed(1)
    b, h_t, h_s, n, d = 2, 6, 4, 16, 8
    attn = _layer(b, h_t, h_t, n, d, gen=gen)
    basis = sharp.dct_basis(n, 5)
    w_h = sharp.head_map(h_s, h_t)
    valid = torch.ones(b, n, dtype=torch.bool)
    ref, _, _ = sharp._project_teacher(attn, basis, 4, w_h, valid, False)
    originals = sharp.project, sharp._project_teacher
    with bench_step.sdpa_projection_patch():
        assert sharp.project is bench_step.project_sdpa
        got, g, e = sharp._project_teacher(attn, basis, 4, w_h, valid, False)
        # the learned basis' statistics need P_t: deferred to the original function
        _, g2, e2 = sharp._project_teacher(attn, basis, 4, w_h, valid, True)
    assert (sharp.project, sharp._project_teacher) == originals
    assert g is None and e is None and g2 is not None and e2 is not None
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("a", "tau"), [(0.5, 1.0), (0.3, 2.0), (1.0, 1.0)])
def test_fused_ce_forward_kl_matches_sharp_core_losses(a: float, tau: float) -> None:
    """The fused logit loss (the other proposed fix) equals (1−a)·CE + a·KD of sharp_core."""
    from sharp_core import losses

    gen = torch.Generator().manual_seed(3)
    b, n, v = 3, 7, 11
    s = (torch.randn(b, n, v, generator=gen) * 3).requires_grad_(True)
    t = torch.randn(b, n, v, generator=gen) * 3
    y = torch.randint(0, v, (b, n), generator=gen)
    y[0, :2] = -100  # ignored positions
    n_valid = 40  # a global count larger than this call's (gradient accumulation)

    ref = (1 - a) * losses.cross_entropy(s, y, num_valid=n_valid, chunk_size=4) + a * (
        losses.forward_kl(s, t, y, temperature=tau, num_valid=n_valid, chunk_size=4)
    )
    (ref_grad,) = torch.autograd.grad(ref, s)
    got = bench_step.fused_ce_forward_kl(
        s, t, y, a=a, temperature=tau, num_valid=n_valid, chunk_rows=4
    )
    (grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5)
