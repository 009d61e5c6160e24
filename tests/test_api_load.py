"""The load script runs end to end and reports numbers that make sense (not how fast they are:
figures come from full-size runs recorded in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.service


@pytest.mark.slow
def test_api_load_script_reports_sane_numbers(pg_admin_url: str, redis_url: str) -> None:
    env = {
        **os.environ,
        "SHARP_BENCH_DATABASE_URL": pg_admin_url,
        "SHARP_BENCH_REDIS_URL": redis_url,
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.api_load",
            "--clients",
            "4",
            "--duration",
            "3",
            "--uvicorn-workers",
            "2",
            "--queued",
            "300",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0, out["error_samples"]
    assert out["clients"] == 4 and out["duration_s"] >= 3
    for op in ("create", "get", "list"):
        assert out[op]["count"] > 0, out
        assert 0 < out[op]["p50_ms"] <= out[op]["p99_ms"], out
    # every created job was read back: the loop is create → get → list
    assert out["create"]["count"] - out["get"]["count"] in range(0, 5)
    assert out["requests"] == sum(out[op]["count"] for op in ("create", "get", "list"))
    assert out["requests_per_s"] > 0
    # --queued: 300 waiting jobs behind a busy slot; created jobs are read with their place
    assert out["queued"] == 300 and out["prefill_s"] > 0
    # Placed by the pass after its commit, or (when another pass held the lock) 50 ms later
    # by a timer: some reads come first and say "waiting for the next scheduling pass"
    assert 0 < out["get_placed"] <= 1, out
    cpu = out["cpu"]
    assert cpu["server_share"] > 0 and cpu["client_share"] > 0, cpu
    assert cpu["server_ms_per_request"] > 0, cpu
    if len(os.sched_getaffinity(0)) >= 2:  # the client on its own core, the server elsewhere
        assert len(out["pinned"]["client"]) == 1, out["pinned"]
        assert not set(out["pinned"]["client"]) & set(out["pinned"]["server"]), out["pinned"]
    sse = out["sse"]
    assert sse["batches"] > 0 and sse["lost"] == 0, sse
    assert 0 < sse["median_ms"] <= sse["p99_ms"], sse
