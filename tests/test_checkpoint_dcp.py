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
    x = S.data.train[:2]
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


def test_a_failed_background_write_is_the_loops_error_and_leaves_nothing(
    corpus, tmp_path, monkeypatch
):
    S, st = _trained_state(corpus)
    out = tmp_path / "run"
    ck = Checkpointer(out, S, Context(), Recorder())
    ck.save(st, S.student, {})
    ck.close()
    good = latest_checkpoint(out)

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.tokenizer, "save_pretrained", full_disk)
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
