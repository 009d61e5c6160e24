"""Sharded (DCP) checkpoints written in the background, the consolidated export, old-format
resume, and the worker's background upload.

The two-process cases (2 → 1 and 1 → 2 ranks on the same trajectory, one shard file per
rank) are in tests/test_distributed.py, which launches torchrun.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sharp_core.errors import ArtifactWriteError, CheckpointMismatchError
from sharp_core.spec import parse_spec
from sharp_core.train import state as state_mod
from sharp_core.train.checkpoint import (
    DCP_DIR,
    latest_checkpoint,
    list_checkpoints,
    verify_manifest,
)
from sharp_core.train.distributed import Context
from sharp_core.train.loop import setup, train
from sharp_core.train.state import STATE_FILE, Checkpointer, TrainState, load_sharded
from tests.helpers import GPT2_TINY, NO_DROPOUT, Recorder, spec_dict, to_legacy_checkpoint


def _spec(corpus: Path, **training):
    return parse_spec(
        spec_dict(
            corpus,
            student={"init": "config", "config": {**GPT2_TINY, **NO_DROPOUT}},
            training={"eval_every": 0, **training},
        )
    )


def _trained_state(corpus: Path):
    """A set-up run after one real optimizer step (so AdamW has moments to save)."""
    S = setup(_spec(corpus))
    params = [p for p in S.student.parameters() if p.requires_grad]
    st = TrainState.start(S, params, [], Context(), None)
    x = S.data.train[:2].long()  # memory-mapped rows are int32
    S.student(input_ids=x, labels=x).loss.backward()
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    st.step = 1
    return S, st


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {
        n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters() if p in opt.state
    }
    return weights, moments


def test_background_save_holds_the_state_of_its_step_and_commits_last(
    corpus, tmp_path, monkeypatch
):
    """Training goes on while the save is written: the checkpoint still holds the weights
    and optimizer moments of the step it was started at; until the commit it is neither
    listed nor reported, and the callback fires on the loop's thread once it is."""
    S, st = _trained_state(corpus)
    weights, moments = _snapshot(S.student, st.optimizer)
    gate, reached = threading.Event(), threading.Event()
    commit = state_mod.commit_checkpoint

    def held_commit(*a, **kw):
        reached.set()
        assert gate.wait(60)
        return commit(*a, **kw)

    monkeypatch.setattr(state_mod, "commit_checkpoint", held_commit)
    rec = Recorder()
    out = tmp_path / "run"
    ck = Checkpointer(out, S, Context(), rec)
    path = ck.save(st, S.student, {"eval_loss": 1.0})
    assert reached.wait(60)  # shards and export written, manifest not yet
    with torch.no_grad():  # "training" meanwhile: every weight and moment moves
        for p in S.student.parameters():
            p.add_(1.0)
            st.optimizer.state[p]["exp_avg"].add_(1.0)
    ck.poll()
    assert rec.checkpoints == [] and list_checkpoints(out) == [] and latest_checkpoint(out) is None
    assert [p.name for p in out.iterdir()][0].startswith(".tmp-step_000001")
    gate.set()
    ck.close()
    assert rec.checkpoints == [1] and latest_checkpoint(out) == path
    files = set(verify_manifest(path)["files"])
    assert {"model.safetensors", "config.json", STATE_FILE, "spec.json"} <= files
    assert {f"{DCP_DIR}/.metadata", f"{DCP_DIR}/__0_0.distcp"} <= files

    # the sharded state is the step-1 state, not the mutated one
    fresh = setup(_spec(corpus))
    params = [p for p in fresh.student.parameters() if p.requires_grad]
    st2 = TrainState.start(fresh, params, [], Context(), None)
    load_sharded(path, fresh.student, st2)
    for k, v in fresh.student.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    for n, p in fresh.student.named_parameters():
        torch.testing.assert_close(st2.optimizer.state[p]["exp_avg"], moments[n], rtol=0, atol=0)
    # and so is the export users download (GPT-2 ties lm_head to wte: written once)
    from safetensors.torch import load_file

    exported = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in exported
    for k, v in exported.items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


@pytest.mark.parametrize("part", ["export", "shards"])
def test_a_failed_background_write_is_the_loops_error_and_leaves_nothing(
    corpus, tmp_path, monkeypatch, part
):
    """A full disk under the export (rank 0's thread) or under DCP's shard writer (whose
    CheckpointException is a BaseException) is an ArtifactWriteError in the loop."""
    S, st = _trained_state(corpus)
    out = tmp_path / "run"
    ck = Checkpointer(out, S, Context(), Recorder())
    ck.save(st, S.student, {})
    ck.close()
    good = latest_checkpoint(out)

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    if part == "export":
        monkeypatch.setattr(S.tokenizer, "save_pretrained", full_disk)
    else:

        class FullDisk(state_mod.FileSystemWriter):
            def write_data(self, *a, **kw):
                full_disk()

        monkeypatch.setattr(state_mod, "FileSystemWriter", FullDisk)
    st.step = 2
    ck = Checkpointer(out, S, Context(), Recorder())
    ck.save(st, S.student, {})  # returns: the failure is in the background
    with pytest.raises(ArtifactWriteError, match="No space left"):
        ck.wait()
    assert [p.name for p in out.iterdir()] == [good.name]  # no step_000002, no temporary
    assert latest_checkpoint(out) == good


def test_old_format_checkpoint_resumes_on_the_same_trajectory(corpus, tmp_path):
    """A checkpoint written before the sharded format (weights in model.safetensors, the
    optimizer in training_state.pt) resumes onto the uninterrupted run's trajectory."""
    spec = _spec(corpus, max_steps=6, checkpoint_every=3)
    full = Recorder()
    train(spec, tmp_path / "full", callbacks=full)
    part = Recorder(stop_at=3)
    assert train(spec, tmp_path / "part", callbacks=part).step == 3
    ckpt = latest_checkpoint(tmp_path / "part")
    to_legacy_checkpoint(ckpt)
    assert not (ckpt / DCP_DIR).exists()
    assert "optimizer" in torch.load(ckpt / STATE_FILE, weights_only=True)
    verify_manifest(ckpt)
    rest = Recorder()
    assert train(spec, tmp_path / "part", callbacks=rest).step == 6
    assert min(rest.metrics) == 4
    for step in range(4, 7):
        assert rest.metrics[step]["loss"] == pytest.approx(
            full.metrics[step]["loss"], rel=1e-5, abs=1e-7
        ), step


def test_sharded_state_of_another_student_is_refused(corpus, tmp_path):
    spec = _spec(corpus, max_steps=2, checkpoint_every=2)
    train(spec, tmp_path / "run")
    d = spec.model_dump(mode="json")
    d["student"]["config"]["n_embd"] = 48
    with pytest.raises(CheckpointMismatchError) as e:
        train(parse_spec(d), tmp_path / "run")
    assert "step_000002" in e.value.message and not e.value.retryable


# ----------------------------------------------------------------------------- the worker


class _Store:
    """Just what `upload_checkpoint` and the uploader use, in memory; fails on demand."""

    remote = True

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.objects: dict[str, bytes] = {}
        self.order: list[str] = []
        self.fail, self.delay = fail, delay

    def put_file(self, key: str, path: Path) -> None:
        import time

        time.sleep(self.delay)
        if self.fail:
            raise OSError("store unreachable")
        self.objects[key] = path.read_bytes()
        self.order.append(key)

    def describe(self) -> str:
        return "memory"

    def location(self, key: str) -> str:
        return f"mem://{key}"


def _fake_checkpoint(root: Path, step: int) -> tuple[Path, dict]:
    import json

    from sharp_core.train.checkpoint import sha256_file, step_dir_name

    d = root / step_dir_name(step)
    (d / "dcp").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes([step]) * 100)
    (d / "dcp" / "__0_0.distcp").write_bytes(b"shard")
    files = {
        n: {"sha256": sha256_file(d / n), "size": (d / n).stat().st_size}
        for n in ("model.safetensors", "dcp/__0_0.distcp")
    }
    manifest = {"step": step, "files": files, "metrics": {}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, manifest


def test_uploader_uploads_in_order_after_the_local_copy_is_pruned(tmp_path):
    """Each checkpoint's files, then its manifest, oldest checkpoint first; the trainer may
    delete its local folder right after handing it over (keep_checkpoints)."""
    import shutil

    from worker.child import Uploader

    store = _Store(delay=0.01)
    up = Uploader(SimpleNamespace(artifact_retry_s=1.0), store, lambda: False)
    for step in (1, 2, 3):
        d, manifest = _fake_checkpoint(tmp_path, step)
        up.submit(step, d, f"job/step_{step:06d}", manifest)
        shutil.rmtree(d)  # pruned locally while still queued
    up.join()
    done = up.collect()
    assert [s for s, _, _ in done] == [1, 2, 3]
    assert store.order == [
        f"job/step_{s:06d}/{n}"
        for s in (1, 2, 3)
        for n in ("dcp/__0_0.distcp", "model.safetensors", "manifest.json")
    ]
    assert store.objects["job/step_000002/model.safetensors"] == bytes([2]) * 100
    assert list(tmp_path.iterdir()) == []  # staging folders removed


def test_uploader_failure_is_raised_to_the_job(tmp_path):
    from worker.child import Uploader

    up = Uploader(SimpleNamespace(artifact_retry_s=0.3), _Store(fail=True), lambda: False)
    d, manifest = _fake_checkpoint(tmp_path, 1)
    up.submit(1, d, "job/step_000001", manifest)
    up.join()
    with pytest.raises(ArtifactWriteError, match="upload checkpoint 1"):
        up.collect()
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # staging removed


def test_uploader_skips_when_fenced(tmp_path):
    from worker.child import Uploader

    store = _Store()
    up = Uploader(SimpleNamespace(artifact_retry_s=1.0), store, lambda: True)
    d, manifest = _fake_checkpoint(tmp_path, 1)
    up.submit(1, d, "job/step_000001", manifest)
    up.join()
    assert up.collect() == [] and store.objects == {}


# ----------------------------------------------------------------------------- FSDP2

FSDP_SCRIPT = r"""
import json, sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

from sharp_core.train.distributed import Context
from sharp_core.train.state import Checkpointer, load_sharded

out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ctx = Context(rank=rank, world_size=world, control=dist.group.WORLD)


class Tok:  # the tokenizer is not what is tested here
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{}")


def build():
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    for block in m.transformer.h:
        fully_shard(block)
    fully_shard(m)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


model, opt = build()
torch.manual_seed(1 + rank)  # each rank its own batch
x = torch.randint(0, cfg["vocab_size"], (2, 16))
model(input_ids=x, labels=x).loss.backward()
opt.step()
spec = SimpleNamespace(
    model_dump_json=lambda indent=None: "{}", training=SimpleNamespace(keep_checkpoints=3)
)
S = SimpleNamespace(student=model, tokenizer=Tok(), spec=spec, device=torch.device("cpu"))
state = SimpleNamespace(
    step=1, objective=None, optimizer=opt,
    loop_state_dict=lambda rngs, per_rank: {"step": 1, "ranks": len(rngs)},
)
ck = Checkpointer(out, S, ctx, SimpleNamespace(on_checkpoint=lambda *a: None))
ck.save(state, model, {})
with torch.no_grad():  # training goes on: the checkpoint keeps step 1
    for p in model.parameters():
        p.add_(1.0)
ck.close()

fresh, fresh_opt = build()
load_sharded(out / "step_000001", fresh, SimpleNamespace(objective=None, optimizer=fresh_opt), ck.group)
for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
    torch.testing.assert_close(b.to_local() + 1.0, a.to_local(), rtol=0, atol=1e-6, msg=n)
    sa, sb = opt.state[a], fresh_opt.state[b]
    torch.testing.assert_close(sb["exp_avg"].to_local(), sa["exp_avg"].to_local(), rtol=0, atol=0)
full = {n: p.full_tensor() - 1.0 for n, p in model.named_parameters()}
if rank == 0:
    torch.save(full, out / "reference.pt")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_student_saves_shards_and_resumes_at_one_process(tmp_path):
    """An FSDP2-sharded student (``fully_shard`` per block) through the same `Checkpointer`:
    two gloo ranks each write a shard, reload it into a fresh sharded model bit for bit; one
    process then loads the 2-rank shards into a plain model, and the consolidated export
    loads with from_pretrained; both equal the gathered weights of the step."""
    import json
    import os
    import subprocess
    import sys

    import transformers

    root = Path(__file__).resolve().parents[1]
    cfg = {**GPT2_TINY, **NO_DROPOUT, "vocab_size": 64}
    cfg.pop("model_type")
    script = tmp_path / "fsdp_ckpt.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(root)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(script), str(out), json.dumps(cfg)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = out / "step_000001"
    files = set(verify_manifest(ckpt)["files"])
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "model.safetensors"} <= files
    ref = torch.load(out / "reference.pt", weights_only=True)

    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    load_sharded(ckpt, plain, SimpleNamespace(objective=None, optimizer=opt))  # 2 -> 1
    exported = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    for n, p in plain.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(exported.get_parameter(n).detach(), ref[n], rtol=0, atol=1e-6)
        assert opt.state[p]["exp_avg"].abs().sum() > 0  # the moments came along


KILLED_SCRIPT = r"""
import json, os, sys
from pathlib import Path

from sharp_core.spec import parse_spec
from sharp_core.train import state as state_mod
from sharp_core.train.loop import train

spec, out = parse_spec(json.loads(sys.argv[1])), Path(sys.argv[2])


class DiesMidWrite(state_mod.FileSystemWriter):
    def write_data(self, plan, planner):
        if "step_000004" in str(self.path):  # the second checkpoint: die inside DCP's write
            os._exit(9)
        return super().write_data(plan, planner)


state_mod.FileSystemWriter = DiesMidWrite
train(spec, out)
"""


@pytest.mark.slow
def test_killed_during_a_background_save_resumes_from_the_previous_checkpoint(corpus, tmp_path):
    """The process dies (os._exit, no clean-up) while the second checkpoint's shards are
    being written: no step folder of it exists, the first still verifies, and a new run
    removes the leftover and resumes from the first."""
    import json
    import os
    import subprocess
    import sys

    spec = _spec(corpus, max_steps=6, checkpoint_every=2)
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", KILLED_SCRIPT, spec.model_dump_json(), str(out)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 9, r.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert [p.name for p in out.glob(".tmp-step_000004-*")]  # the torn write is left behind
    verify_manifest(out / "step_000002")
    rec = Recorder()
    assert train(spec, out, callbacks=rec).step == 6
    assert min(rec.metrics) == 3  # resumed from step 2
    assert not list(out.glob(".tmp-*"))
    assert json.loads((out / "step_000006" / "manifest.json").read_text())["step"] == 6
