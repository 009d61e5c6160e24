"""Evaluation split over ranks: every rank evaluates its share of the blocks at the per-rank
batch, the sums are all-reduced, and every rank reports the single-process numbers.

The reference is one process evaluating every block at the global batch. What differs is
only where the fp32 per-batch sums are cut (batches of 2 rows per rank instead of 4), so we
allow 1e-6 relative (measured: ~1e-7). The block count (5) is odd on purpose: rank 1 runs
out of rows and must still run a padding forward, because a sharded (FSDP) student needs
every rank in every forward; its result must not count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharp_core.data.loading import ClassificationData, PackedData
from sharp_core.evaluate.perplexity import evaluate, rank_rows

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-6


def test_rank_rows_cover_every_row_once_with_equal_forward_counts() -> None:
    for n in (0, 1, 5, 8, 13):
        for world in (1, 2, 3):
            for b in (1, 2, 4):
                per = [rank_rows(n, b, r, world) for r in range(world)]
                assert len({len(p) for p in per}) == 1, (n, world, b)  # same forwards
                rows = [int(i) for p in per for sl in p if sl is not None for i in sl]
                assert sorted(rows) == list(range(n)), (n, world, b)
                assert all(sl is None or 0 < sl.numel() <= b for p in per for sl in p)


def torchrun(kind: str, case: dict, tmp: Path, nproc: int = 2) -> list[dict]:
    """Run tests/rank_worker.py KIND on `nproc` gloo ranks; what each rank returned."""
    path = tmp / "case.pt"
    torch.save(case, path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), str(ROOT / "tests" / "rank_worker.py")]
    r = subprocess.run(
        [*cmd, kind, str(path), str(tmp)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return [torch.load(tmp / f"rank{i}.pt", weights_only=False) for i in range(nproc)]


def eval_case() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    lm = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    cls = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=3)).eval()
    blocks = torch.randint(1, 64, (5, 16))  # (M, N): 5 blocks over 2 ranks
    ids = torch.randint(1, 64, (7, 12))
    mask = torch.ones_like(ids)
    mask[::2, 9:] = 0  # right padding on every other row
    ids[mask == 0] = 0
    rows = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (7,))}
    return {
        "lm_model": lm,
        "lm_data": PackedData(train=blocks[:0], eval=blocks),
        "cls_model": cls,
        "cls_data": ClassificationData(
            train={k: v[:0] for k, v in rows.items()},
            eval=rows,
            num_labels=3,
            label_names=["a", "b", "c"],
        ),
        "vocab": 64,
        "batch_size": 4,  # global: 2 per rank
    }


@pytest.mark.slow
def test_two_ranks_evaluate_as_one_process(tmp_path) -> None:
    case = eval_case()
    ranks = torchrun("eval", case, tmp_path)
    cpu = torch.device("cpu")
    for name in ("lm", "cls"):
        ref = evaluate(
            case[f"{name}_model"],
            case[f"{name}_data"],
            vocab=case["vocab"],
            batch_size=case["batch_size"],
            device=cpu,
        )
        assert set(ref) == set(ranks[0][name])
        for r, got in enumerate(ranks):
            for k, v in ref.items():
                assert got[name][k] == pytest.approx(v, rel=RTOL, abs=1e-12), (name, r, k)
    # 5 LM blocks, 2 per forward: rank 0 runs rows {0, 2}, {4}; rank 1 {1, 3} and a padding
    # forward. 7 classifier rows: rank 0 {0, 2}, {4, 6}; rank 1 {1, 3}, {5}.
    assert [x["forwards"] for x in ranks] == [{"lm": 2, "cls": 2}] * 2
    # the classifier's accuracy is a ratio of whole counts: an exact match
    assert ranks[1]["cls"]["eval_accuracy"] == ranks[0]["cls"]["eval_accuracy"]


class _Fixed(torch.nn.Module):
    """A classifier whose logits are a fixed table row per first token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids[:, 0]] + self.w)


def test_classifier_counts_give_accuracy_and_macro_f1_by_hand() -> None:
    """4 classes, class 3 never predicted nor gold (skipped by macro-F1). Predictions
    [0, 0, 1, 2, 2, 1] against gold [0, 1, 1, 2, 0, 1]: accuracy 4/6; F1 per class
    0: tp 1 fp 1 fn 1 → 1/2; 1: tp 2 fp 0 fn 1 → 4/5; 2: tp 1 fp 1 fn 0 → 2/3."""
    preds = [0, 0, 1, 2, 2, 1]
    table = torch.nn.functional.one_hot(torch.tensor(preds), 4).float() * 5  # (6, 4)
    ids = torch.arange(6)[:, None].repeat(1, 3)
    rows = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 1, 1, 2, 0, 1]),
    }
    data = ClassificationData(train=rows, eval=rows, num_labels=4, label_names=list("abcd"))
    got = evaluate(_Fixed(table), data, vocab=4, batch_size=4, device=torch.device("cpu"))
    ce = torch.nn.functional.cross_entropy(table, rows["labels"]).item()
    assert got["eval_accuracy"] == pytest.approx(4 / 6, rel=1e-12)
    assert got["eval_macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3, rel=1e-12)
    assert got["eval_loss"] == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_chunked_head_loss_equals_the_full_logits(arch: str) -> None:
    """The eval loss with the head run 7 positions at a time inside the forward (never the
    whole (B, N-1, V) logits) equals the cross-entropy of the model's full logits (fp32,
    1e-6 relative), tied (GPT-2, Gemma-2) and untied (Llama) heads, Gemma-2's soft-capped
    logits (cap 5, its head scaled so the cap bites); the head is left unhooked and the
    model still returns full logits afterwards."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from sharp_core.evaluate.perplexity import _lm_head, lm_loss

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=70,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        )
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(
            Gemma2Config(
                vocab_size=70,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=32,
                final_logit_softcapping=5.0,
            )
        )
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)  # raw logits well beyond the cap
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=70, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        )
    model.eval()
    head = _lm_head(model)
    assert head is not None  # the chunked path is the one under test
    assert head.softcap == (5.0 if arch == "gemma2" else None)
    blocks = torch.randint(0, 64, (5, 16))
    vocab = 64  # a padded embedding: rows 64..69 never count
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1, :vocab]
        ref = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), blocks[:, 1:].reshape(-1)
        ).item()
        full, _ = lm_loss(model, blocks, vocab, 2, torch.device("cpu"), rows=None)
        assert full == pytest.approx(ref, rel=1e-6)
        shapes: list[tuple[int, ...]] = []
        hook = model.register_forward_hook(lambda _m, _a, out: shapes.append(out.logits.shape))
        got, n = lm_loss(model, blocks, vocab, 2, torch.device("cpu"), rows=7)
        hook.remove()
        assert shapes == [(2, 1, 70), (2, 1, 70), (1, 1, 70)]  # the model projected 1 position
        assert not model.get_output_embeddings()._forward_hooks
        assert model(input_ids=blocks).logits.shape == (5, 16, 70)
    assert n == 5 * 15
    assert got == pytest.approx(ref, rel=1e-6)
    if arch == "gemma2":  # without the cap the chunked loss would be another number
        assert abs(got - _uncapped_loss(model, blocks, vocab)) > 1e-2 * got


def _uncapped_loss(model, blocks, vocab) -> float:
    from sharp_core.objectives import fused

    head = fused.head_of(model)[0]
    assert head is not None
    with torch.no_grad(), fused.capture_hidden(head) as seen:
        model(input_ids=blocks)
    raw = (seen[0] @ head.weight.T)[:, :-1, :vocab]
    return torch.nn.functional.cross_entropy(
        raw.reshape(-1, vocab), blocks[:, 1:].reshape(-1)
    ).item()


def test_eval_keeps_the_models_logits_for_other_head_transforms() -> None:
    """A head followed by a logit transform other than Gemma's cap (a config's logit_scale)
    is not chunked: the model's own logits are used."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharp_core.evaluate.perplexity import _lm_head

    cfg = LlamaConfig(
        vocab_size=70, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    assert _lm_head(model) is not None
    model.config.logit_scale = 0.5
    assert _lm_head(model) is None
