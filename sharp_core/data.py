"""Corpus loading, packing and a resumable batch stream.

Why packing into fixed `seq_len` blocks: every token is trained on, no padding compute is
wasted, and attention maps have a fixed N, which the rank-r basis of SHARP expects.
Why the eval split is the *tail* of the packed stream rather than random blocks: with
packing, a random block would share documents with its neighbours in the training set;
a contiguous tail leaks at most one document boundary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharp_core.errors import DataError
from sharp_core.spec import DatasetSpec

_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def _files(ds: DatasetSpec, resolver: Any) -> list[str]:
    if ds.source == "upload":
        assert ds.upload_id is not None
        return [str(resolver.upload_path(ds.upload_id))]
    out = []
    for i, f in enumerate(ds.files):
        p = Path(f).expanduser()
        if not p.is_file():
            raise DataError(f"data file not found: {f}", param=f"spec.dataset.files.{i}")
        out.append(str(p))
    return out


def load_texts(ds: DatasetSpec, resolver: Any = None) -> list[str]:
    """The documents of the corpus, in file order, through the `datasets` library.

    txt files are split into paragraphs (blank-line separated), which keeps documents
    reasonably sized without cutting sentences.
    """
    import datasets

    datasets.disable_progress_bars()
    builder = None
    try:
        if ds.source == "hub":
            d = datasets.load_dataset(ds.name, ds.config_name, split=ds.split)
        else:
            files = _files(ds, resolver)
            exts = {Path(f).suffix.lower() for f in files}
            if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
                raise DataError(
                    f"data files must all be one of {sorted(_BUILDERS)}; got {sorted(exts)}",
                    param="spec.dataset.files",
                )
            builder = _BUILDERS[next(iter(exts))]
            kw: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
            d = datasets.load_dataset(
                builder, data_files=files, split="train", keep_in_memory=True, **kw
            )
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"data not found: {e}", param="spec.dataset") from None
    except Exception as e:  # datasets raises many types for unreadable input
        raise DataError(
            f"cannot read the data set: {type(e).__name__}: {e}", param="spec.dataset"
        ) from None
    field = "text" if builder == "text" else ds.text_field
    if field not in d.column_names:
        raise DataError(
            f"text field '{ds.text_field}' not in the data set (columns: {d.column_names})",
            param="spec.dataset.text_field",
        )
    texts = [t for t in d[field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("the data set has no text", param="spec.dataset")
    return texts


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents with EOS between them and cut into (n_blocks, seq_len)."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, N)


@dataclass
class PackedData:
    train: torch.Tensor  # (n_train, N) int64
    eval: torch.Tensor  # (n_eval, N) int64


def build_data(ds: DatasetSpec, texts: list[str], tokenizer: Any, seq_len: int) -> PackedData:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token to separate documents", param="spec.tokenizer"
        )
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack(ids, eos, seq_len)
    n = blocks.shape[0]
    n_eval = max(1, round(n * ds.eval_fraction))
    if n - n_eval < 1:
        raise DataError(
            f"the corpus gives only {n} blocks of {seq_len} tokens: too small to train and evaluate",
            param="spec.dataset",
        )
    eval_blocks = blocks[n - n_eval :][: ds.max_eval_blocks]
    return PackedData(train=blocks[: n - n_eval], eval=eval_blocks)


class BatchStream:
    """Endless shuffled batches; its position is part of the resumable training state.

    Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch), so the
    state is just two integers and resuming reproduces the exact same batches.
    """

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks = blocks
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.blocks.shape[0], generator=g)

    def next(self, batch_size: int) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        while len(rows) < batch_size:
            if self.pos >= len(self._perm):
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            rows.append(self._perm[self.pos])
            self.pos += 1
        return self.blocks[torch.stack(rows)]  # (batch_size, N)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._perm = self._permutation(self.epoch)


def eval_batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i : i + batch_size]
