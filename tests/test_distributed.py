"""Multi-process training on CPU (gloo), launched through torchrun the way the worker does.

Why the trajectories can be compared at all: the N ranks split every global batch into
disjoint equal slices, each normalises by its own token count, and DDP averages the
gradients, so one optimizer step sees mathematically the gradient of the single-process
batch. What differs is only the order of fp32 additions (two half-batch sums averaged
instead of one sum), a relative error of order 1e-7 per step that Adam carries along;
over six steps we measure ≤ 1e-6 relative on every logged term, and allow 1e-5 (still
far below any real divergence: one step moves the loss by ~1e-2 here). Dropout is off in
these models: with it, ranks draw different masks than one process would, which is
statistically, not numerically, the same training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharp_core.data.loading import BatchStream
from sharp_core.errors import SpecError
from sharp_core.spec import parse_spec
from sharp_core.train.distributed import (
    STUDENT_BYTES_PER_PARAM,
    choose_teacher_parallel,
    torchrun_command,
)
from sharp_core.train.loop import STATE_FILE, train
from tests.helpers import (
    GPT2_TINY,
    NO_DROPOUT,
    Recorder,
    spec_dict,
    train_tiny_teacher,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
GIB = 2**30


# ----------------------------------------------------------------------------- pure parts


def test_teacher_parallel_rule() -> None:
    """Replicate while teacher + 20 B per student parameter fit in 60% of one GPU."""

    def pick(mode="auto", teacher_gb=1.0, student_params=100_000_000, gpu_gb=80, world=2):
        return choose_teacher_parallel(
            mode,
            teacher_bytes=int(teacher_gb * GIB),
            student_params=student_params,
            gpu_bytes=None if gpu_gb is None else int(gpu_gb * GIB),
            world_size=world,
        )

    student_gb = 100_000_000 * STUDENT_BYTES_PER_PARAM / GIB  # ≈ 1.86 GiB
    # a 7B teacher in bf16 (14 GB) beside a 100M student on an 80 GB card: replicate
    assert pick(teacher_gb=14) == "replicate"
    # the boundary: exactly 60% of the card fits, a byte more does not
    edge = 0.6 * 80 - student_gb
    assert pick(teacher_gb=edge) == "replicate"
    assert pick(teacher_gb=edge + 1 / GIB) == "fsdp"
    # a 70B teacher in bf16 (140 GB) cannot be replicated on 80 GB cards: shard
    assert pick(teacher_gb=140) == "fsdp"
    # the same 14 GB teacher on 24 GB cards: 14 + 1.9 > 14.4, shard
    assert pick(teacher_gb=14, gpu_gb=24) == "fsdp"
    # a big student alone can push the teacher out: 2B params = 37 GB of training state
    assert pick(teacher_gb=14, student_params=2_000_000_000) == "fsdp"
    # one process, or no known GPU memory (CPU): nothing to decide
    assert pick(teacher_gb=140, world=1) == "replicate"
    assert pick(teacher_gb=140, gpu_gb=None) == "replicate"
    # explicit choices are obeyed, except that one process has nothing to shard over
    assert pick("fsdp", teacher_gb=0.1) == "fsdp"
    assert pick("replicate", teacher_gb=140) == "replicate"
    assert pick("fsdp", world=1) == "replicate"
    with pytest.raises(SpecError) as e:
        pick("zero3")
    assert e.value.param == "spec.resources.teacher_parallel"


def test_rank_slices_are_disjoint_and_make_the_single_process_batch() -> None:
    blocks = torch.arange(40).view(20, 2)
    one = BatchStream(blocks, seed=7)
    ranks = [BatchStream(blocks, seed=7).shard(r, 2) for r in range(2)]
    for _ in range(25):  # crosses epoch boundaries (20 rows, batches of 6)
        whole = one.next_indices(6)
        parts = [s.next_indices(6) for s in ranks]
        assert torch.equal(torch.cat(parts), whole)
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
    # the position is global: the same on every rank and as in one process
    assert all(s.state_dict() == one.state_dict() for s in ranks)
    with pytest.raises(ValueError, match="evenly"):
        ranks[0].next_indices(5)


def test_torchrun_command_is_torch_distributed_run() -> None:
    cmd = torchrun_command(4, ["worker.child", "j1", "2"], shutdown_timeout_s=30)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4" and "--standalone" in cmd
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "30"
    assert cmd[-4:] == ["-m", "worker.child", "j1", "2"]


# ----------------------------------------------------------------------------- 2 processes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory) -> Path:
    return train_tiny_teacher(corpus, tmp_path_factory.mktemp("teacher"))


def distil_spec(corpus: Path, teacher: Path, method: str, **resources) -> dict:
    d = spec_dict(
        corpus,
        teacher={"model": str(teacher)},
        student={"init": "config", "config": {**GPT2_TINY, **NO_DROPOUT}},
        method={"name": method},
        resources=resources,
    )
    d.pop("tokenizer")  # the teacher's
    return d


def read_jsonl(path: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec.pop("step"), {}).update(rec)
    return out


def cli_train(spec: Path, out: Path, metrics: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m sharp_core train` — the spec's gpus: 2 makes it exec torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "sharp_core", "train", str(spec), "--out", str(out), "--quiet"]
        + ["--metrics-jsonl", str(metrics), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_same_trajectory(
    ref: dict[int, dict[str, float]], got: dict[int, dict[str, float]], steps: range
) -> None:
    keys = ("loss", "ce", "kd", "logit", "grad_norm", "eval_loss", "sharp_layer", "sharp_head")
    for step in steps:
        assert step in got, f"no metrics for step {step}"
        compared = [k for k in keys if k in ref[step]]
        assert compared, step
        # a term far below the loss (the kd of a student pruned from its teacher: 1/200 of it)
        # carries the loss's rounding, not its own: its absolute error is bounded at loss scale
        scale = abs(ref[step].get("loss", 0.0)) or 1.0
        for k in compared:
            tol = RTOL * scale if k in ("kd", "ce", "logit") else 1e-9
            assert got[step][k] == pytest.approx(ref[step][k], rel=RTOL, abs=tol), (step, k)


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(("method", "teacher_parallel"), [("sharp", "fsdp")])  # kd: worker test
def test_two_processes_match_one_and_resume(
    corpus, teacher_dir, tmp_path, method, teacher_parallel
) -> None:
    """Two gloo ranks under torchrun follow the single-process loss trajectory; stopped at
    step 3 they resume from their own checkpoint and finish on the same trajectory; one
    process resumes from their checkpoint onto it too, and two processes from a one-process
    checkpoint (the sharded state is re-read at the new world size). SHARP runs with the
    teacher sharded by FSDP, so its captured attention (the SHARP terms) and logits (kd) are
    checked too."""
    ref_spec = distil_spec(corpus, teacher_dir, method)
    ref = Recorder()
    ref_res = train(parse_spec(ref_spec), tmp_path / "one", callbacks=ref)
    assert ref_res.step == 6

    spec = distil_spec(corpus, teacher_dir, method, gpus=2, teacher_parallel=teacher_parallel)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out, metrics = tmp_path / "two", tmp_path / "two.jsonl"

    first = cli_train(spec_path, out, metrics, "--stop-at", "3")
    assert first.returncode == 3, first.stderr[-3000:]
    assert f"teacher: {teacher_parallel} over 2 processes" in first.stderr
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000003"]
    state = torch.load(out / "step_000003" / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and len(state["rng_ranks"]) == 2
    assert "optimizer" not in state  # sharded: every rank wrote its own file
    shards = sorted(p.name for p in (out / "step_000003" / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    assert all((out / "step_000003" / "dcp" / n).stat().st_size > 0 for n in shards)
    assert state["data"] == {"epoch": 0, "pos": 12, "seed": 0}  # 3 global batches of 4
    assert_same_trajectory(ref.metrics, read_jsonl(metrics), range(1, 4))

    metrics.unlink()
    second = cli_train(spec_path, out, metrics)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = read_jsonl(metrics)
    assert min(s for s in resumed if "loss" in resumed[s]) == 4  # resumed, not restarted
    assert_same_trajectory(ref.metrics, resumed, range(4, 7))
    a, b = load_weights(tmp_path / "one" / "step_000006"), load_weights(out / "step_000006")
    assert a.keys() == b.keys()
    for k in a:  # Adam turns rounding noise in near-zero gradients into ~1e-6 moves (lr 3e-3)
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=1e-5)

    # one process resumes from the two processes' checkpoint (same format, full weights)
    cross = tmp_path / "cross"
    cross.mkdir()
    shutil.copytree(out / "step_000003", cross / "step_000003")
    rec = Recorder()
    res = train(parse_spec(ref_spec), cross, callbacks=rec)
    assert res.step == 6 and min(s for s in rec.metrics if "loss" in rec.metrics[s]) == 4
    assert_same_trajectory(ref.metrics, rec.metrics, range(4, 7))

    # two processes resume from the one process's checkpoint onto the same trajectory
    up = tmp_path / "up"
    up.mkdir()
    shutil.copytree(tmp_path / "one" / "step_000003", up / "step_000003")
    metrics.unlink()
    third = cli_train(spec_path, up, metrics)
    assert third.returncode == 0, third.stderr[-3000:]
    grown = read_jsonl(metrics)
    assert min(s for s in grown if "loss" in grown[s]) == 4
    assert_same_trajectory(ref.metrics, grown, range(4, 7))


def test_batch_must_split_evenly_over_the_ranks(corpus, tmp_path) -> None:
    """Checked before any process starts: the error names the field."""
    spec = spec_dict(corpus, training={"batch_size": 3}, resources={"gpus": 2})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    r = cli_train(spec_path, tmp_path / "out", tmp_path / "m.jsonl")
    assert r.returncode == 2, r.stderr[-3000:]
    # refused at parse time (the spec check), before torchrun starts anything
    err = " ".join(r.stderr.split())  # the CLI's console wraps lines at its width
    assert "spec.training.batch_size" in err and "multiple of resources.gpus (2)" in err
    assert not (tmp_path / "out").exists()


def test_a_rank_dies_with_its_launcher(tmp_path) -> None:
    """torchrun starts ranks in their own sessions, so a SIGKILL to the job's process group
    stops at torchrun; each rank therefore asks the kernel to kill it when its parent dies."""
    import signal
    import time

    launcher = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'from sharp_core.train.distributed import "
        "_die_with_parent; import time; _die_with_parent(); print(1, flush=True); "
        "time.sleep(300)'], stdout=subprocess.PIPE, start_new_session=True)\n"
        "print(c.pid, flush=True)\n"
        "c.stdout.readline()\n"
        "print('armed', flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        rank_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "armed"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)

    def gone() -> bool:
        try:
            state = Path(f"/proc/{rank_pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        return state in ("Z", "X")  # a zombie waiting for init to reap it is dead too

    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, "the rank outlived its launcher"
        time.sleep(0.1)
