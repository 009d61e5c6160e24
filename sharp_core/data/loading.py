"""Corpus loading, packing and a resumable batch stream.

Why packing into fixed `seq_len` blocks: every token is trained on, no padding compute is
wasted, and attention maps have a fixed N, which the rank-r basis of SHARP expects.
Why the eval split is the *tail* of the packed stream rather than random blocks: with
packing, a random block would share documents with its neighbours in the training set;
a contiguous tail leaks at most one document boundary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sharp_core.data.sources import (
    default_cache_dir,
    default_s3_client,
    expand_entry,
    fetch_s3_entry,
    is_s3,
    saved_dataset_kind,
)
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


#: Where the training data's source fields are in a spec; an evaluation set's errors name
#: its own block instead (``spec.dataset.eval.val``).
TRAIN_PARAM = "spec.dataset"


def _files(ds: DatasetSpec, resolver: Any, where: str = TRAIN_PARAM) -> list[str]:
    """Local paths of the source's files (and ``save_to_disk`` folders), in order: globs
    expanded, ``s3://`` entries fetched (the service's worker fetched them already; a library
    run uses boto3's defaults). Errors name the entry (``spec.dataset.files.N``)."""
    if ds.source == "upload":
        assert ds.upload_id is not None
        return [str(resolver.upload_path(ds.upload_id, param=f"{where}.upload_id"))]
    out = []
    client = None
    for i, entry in enumerate(ds.files):
        param = f"{where}.files.{i}"
        if is_s3(entry):
            client = client or default_s3_client()
            out += fetch_s3_entry(client, entry, default_cache_dir(), param)
            continue
        for f in expand_entry(entry, param):
            p = Path(f).expanduser()
            if p.is_dir() and saved_dataset_kind(p) is None:
                raise DataError(
                    f"{f} is a folder but not one written by datasets' save_to_disk "
                    "(no dataset_info.json and state.json, nor dataset_dict.json)",
                    param=param,
                )
            if not p.is_file() and not p.is_dir():
                raise DataError(f"data file not found: {f}", param=param)
            out.append(str(p))
    return out


def _load_saved(folders: list[str], split: str, where: str) -> Any:
    """Folders written by ``save_to_disk``, memory-mapped and concatenated in order; of a
    ``DatasetDict`` the `split` (``spec.dataset.split``)."""
    import datasets

    tables = []
    for f in folders:
        d = datasets.load_from_disk(f)
        if isinstance(d, datasets.DatasetDict):
            if split not in d:
                raise DataError(
                    f"{f} holds the splits {sorted(d)}, not '{split}'", param=f"{where}.split"
                )
            d = d[split]
        tables.append(d)
    return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)


def _saved_or_builder(files: list[str], split: str, where: str) -> tuple[Any, str]:
    """(the memory-mapped table, "") when ``files`` are ``save_to_disk`` folders, else (None,
    the `datasets` builder their one extension names); a mix, or extensions that differ or
    are unknown, is an error naming ``{where}.files``."""
    folders = [f for f in files if Path(f).is_dir()]
    if folders:
        if len(folders) != len(files):
            raise DataError(
                "save_to_disk folders and data files cannot be mixed in one source",
                param=f"{where}.files",
            )
        return _load_saved(folders, split, where), ""
    exts = {Path(f).suffix.lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
        raise DataError(
            f"data files must all be one of {sorted(_BUILDERS)}; got {sorted(exts)}",
            param=f"{where}.files",
        )
    return None, _BUILDERS[next(iter(exts))]


def load_table(
    ds: DatasetSpec, resolver: Any = None, *, by_paragraph: bool = True, where: str = TRAIN_PARAM
) -> Any:
    """The data set as a `datasets.Dataset`, from the hub, local txt/jsonl/parquet files
    (or ``s3://`` objects, fetched) or ``save_to_disk`` folders.

    txt files become one row per paragraph (blank-line separated) for language modelling,
    which keeps documents reasonably sized without cutting sentences, or one row per line
    for classification (`by_paragraph=False`). `where` is the spec path errors about the
    source name (an evaluation set's, ``spec.dataset.eval.val``, when it is one).
    """
    import datasets

    datasets.disable_progress_bars()
    try:
        if ds.source == "hub":
            return datasets.load_dataset(ds.name, ds.config_name, split=ds.split)
        files = _files(ds, resolver, where)
        saved, builder = _saved_or_builder(files, ds.split, where)
        if saved is not None:
            return saved
        kw: dict[str, Any] = (
            {"sample_by": "paragraph" if by_paragraph else "line"} if builder == "text" else {}
        )
        return datasets.load_dataset(
            builder, data_files=files, split="train", keep_in_memory=True, **kw
        )
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"data not found: {e}", param=where) from None
    except Exception as e:  # datasets raises many types for unreadable input
        raise DataError(f"cannot read the data set: {type(e).__name__}: {e}", param=where) from None


def stream_table(ds: DatasetSpec, files: list[str] | None = None, where: str = TRAIN_PARAM) -> Any:
    """The data set as a `datasets.IterableDataset` read as it is iterated (a streaming hub
    data set, or local files through the same builders `load_table` uses, so the rows are
    the same), or for a hub data set without ``streaming`` the prepared `datasets.Dataset`
    (memory-mapped from the hub cache). ``files``: the local files to read (default: the
    spec's, unexpanded); ``save_to_disk`` folders come back as their memory-mapped tables,
    which are read a batch at a time as well. Reading errors surface while iterating."""
    import datasets

    datasets.disable_progress_bars()
    if ds.source == "hub":
        return datasets.load_dataset(
            ds.name, ds.config_name, split=ds.split, streaming=ds.streaming
        )
    files = files if files is not None else list(ds.files)
    saved, builder = _saved_or_builder(files, ds.split, where)
    if saved is not None:
        return saved
    kw: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kw)


def _column(d: Any, name: str, field: str, where: str) -> list[Any]:
    """Column `name` (the value of ``spec.dataset.<field>``); a missing one is an error naming
    that field, or the evaluation set `where` whose table lacks it."""
    if name not in d.column_names:
        param = f"{TRAIN_PARAM}.{field}" if where == TRAIN_PARAM else where
        raise DataError(
            f"field '{name}' (spec.dataset.{field}) not in the data set "
            f"(columns: {d.column_names})",
            param=param,
        )
    return list(d[name])


def load_texts(ds: DatasetSpec, resolver: Any = None, *, where: str = TRAIN_PARAM) -> list[str]:
    """The documents of a language-modelling corpus, in file order."""
    d = load_table(ds, resolver, where=where)
    field = "text" if d.column_names == ["text"] and ds.source != "hub" else ds.text_field
    texts = [t for t in _column(d, field, "text_field", where) if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError("the data set has no text", param=where)
    return texts


@dataclass
class ClassificationData:
    """Tokenised examples padded to `seq_len`: input_ids/attention_mask (n, N), labels (n,)."""

    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    num_labels: int
    label_names: list[str]


def load_classification(
    ds: DatasetSpec, resolver: Any = None, *, where: str = TRAIN_PARAM
) -> tuple[list[Any], list[Any] | None, list[Any]]:
    """(texts, text pairs or None, raw labels) from the table; errors name the spec field."""
    d = load_table(ds, resolver, by_paragraph=False, where=where)
    texts = _column(d, ds.text_field, "text_field", where)
    pairs = _column(d, ds.text_pair_field, "text_pair_field", where) if ds.text_pair_field else None
    labels = _column(d, ds.label_field, "label_field", where)
    return texts, pairs, labels


def encode_labels(raw: list[Any], num_labels: int | None) -> tuple[torch.Tensor, list[str], int]:
    """Integer labels are used as they are (checked against num_labels); strings are mapped
    to ids in sorted order, so the mapping is the same on every run."""
    if all(isinstance(v, int) for v in raw):  # bool is an int
        ids = torch.tensor([int(v) for v in raw], dtype=torch.long)
        n = num_labels if num_labels is not None else int(ids.max()) + 1
        bad = ((ids < 0) | (ids >= n)).nonzero()
        if len(bad):
            v = int(ids[bad[0, 0]])
            raise DataError(
                f"label {v} (row {int(bad[0, 0])}) is outside the {n} classes [0, {n - 1}]",
                param="spec.dataset.num_labels",
            )
        return ids, [str(i) for i in range(n)], n
    if all(isinstance(v, str) for v in raw):
        names = sorted(set(raw))
        if num_labels is not None and len(names) > num_labels:
            raise DataError(
                f"{len(names)} distinct labels but num_labels is {num_labels}",
                param="spec.dataset.num_labels",
            )
        index = {n: i for i, n in enumerate(names)}
        return torch.tensor([index[v] for v in raw]), names, num_labels or len(names)
    raise DataError("labels must be all integers or all strings", param="spec.dataset.label_field")


def build_classification_data(
    ds: DatasetSpec,
    rows: tuple[list[Any], list[Any] | None, list[Any]],
    tokenizer: Any,
    seq_len: int,
    seed: int,
) -> ClassificationData:
    """Tokenise (truncate, pad to seq_len) and split off a seeded random eval set.

    Random rather than a tail: classification examples are independent, and files are often
    sorted by label, where a tail would hold one class only.
    """
    texts, pairs, raw = rows
    labels, names, n_labels = encode_labels(raw, ds.num_labels)
    enc = _encode_examples(tokenizer, texts, pairs, seq_len)
    n = len(texts)
    n_eval = max(1, round(n * ds.eval_fraction))
    if n - n_eval < 1:
        raise DataError(f"only {n} examples: too few to train and evaluate", param="spec.dataset")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ev, tr = perm[:n_eval], perm[n_eval:]
    cols = {**enc, "labels": labels}
    return ClassificationData(
        train={k: v[tr] for k, v in cols.items()},
        eval={k: v[ev] for k, v in cols.items()},
        num_labels=n_labels,
        label_names=names,
    )


def _encode_examples(
    tokenizer: Any, texts: list[Any], pairs: list[Any] | None, seq_len: int
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (n, N): truncated and padded to `seq_len`."""
    enc = tokenizer(
        [str(t) for t in texts],
        [str(t) for t in pairs] if pairs is not None else None,
        truncation=True,
        max_length=seq_len,
        padding="max_length",
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def labels_like(raw: list[Any], train: ClassificationData, where: str) -> torch.Tensor:
    """An evaluation set's labels as the training data's class ids: integers as they are
    (within its classes), strings through its sorted name→id mapping, so a class means the
    same in both. A label the training data does not have is an error naming `where`."""
    n = train.num_labels
    if all(isinstance(v, int) for v in raw) and train.label_names == [str(i) for i in range(n)]:
        ids = torch.tensor([int(v) for v in raw], dtype=torch.long)
        bad = ((ids < 0) | (ids >= n)).nonzero()
        if len(bad):
            raise DataError(
                f"label {int(ids[bad[0, 0]])} (row {int(bad[0, 0])}) is outside the training "
                f"data's {n} classes [0, {n - 1}]",
                param=where,
            )
        return ids
    index = {name: i for i, name in enumerate(train.label_names)}
    out = []
    for row, v in enumerate(raw):
        if not isinstance(v, str) or v not in index:
            raise DataError(
                f"label {v!r} (row {row}) is not one of the training data's classes "
                f"{train.label_names[:10]}",
                param=where,
            )
        out.append(index[v])
    return torch.tensor(out, dtype=torch.long)


def build_classification_eval(
    rows: tuple[list[Any], list[Any] | None, list[Any]],
    train: ClassificationData,
    tokenizer: Any,
    seq_len: int,
    max_examples: int,
    where: str,
) -> ClassificationData:
    """An evaluation set of a classifier: its first `max_examples` rows, tokenised as the
    training data (`_encode_examples`), labelled with the training data's classes. Its
    examples are all in `eval` (`train` is empty), so `sharp_core.evaluate.perplexity.evaluate` reads
    it as it reads the training data's held-out split."""
    texts, pairs, raw = (r[:max_examples] if r is not None else None for r in rows)
    assert texts is not None and raw is not None
    if not texts:
        raise DataError("the evaluation set has no rows", param=where)
    cols = _encode_examples(tokenizer, texts, pairs, seq_len)
    cols["labels"] = labels_like(raw, train, where)
    return ClassificationData(
        train={k: v[:0] for k, v in cols.items()},
        eval=cols,
        num_labels=train.num_labels,
        label_names=train.label_names,
    )


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
    """Packed rows for language modelling: the training rows and the held-out tail.

    From the tokenized pipeline (`sharp_core.data.lm.prepare_lm`) the rows are int32 views of
    memory maps, with per-token ``flags`` (`sharp_core.data.packing`) that give the
    loss mask, the restarting positions and the padding mask of a batch (`inputs`)."""

    train: torch.Tensor  # (n_train, N) int64, or int32 (memory-mapped)
    eval: torch.Tensor  # (n_eval, N)
    train_flags: torch.Tensor | None = None  # (n_train, N) uint8 LOSS | START | PAD
    eval_flags: torch.Tensor | None = None  # (n_eval, N)
    packing: str = "concat"
    masked: bool = False
    """Some token of a row is not a target: batches carry a ``loss_mask``."""
    key: str | None = None
    """The tokenized cache key (what the teacher-logit cache's key includes)."""
    info: dict[str, Any] = field(default_factory=dict)
    """How the data was made (`sharp_core.data.tokenized.prepare`'s info): the event."""

    def inputs(self, split: str, idx: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """input_ids (B, N) int64 of rows ``idx`` of ``split``, with the entries the packing
        needs (position_ids, attention_mask, loss_mask), on ``device``."""
        from sharp_core.data.packing import model_inputs

        rows = self.train if split == "train" else self.eval
        flags = self.train_flags if split == "train" else self.eval_flags
        out = {"input_ids": rows[idx].to(device, torch.long, non_blocking=True)}
        if flags is not None:
            f = flags[idx].to(device, non_blocking=True)
            out.update(model_inputs(f, self.packing, self.masked))
        return out


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token to separate documents", param="spec.tokenizer"
        )
    return int(eos)


def build_data(ds: DatasetSpec, texts: list[str], tokenizer: Any, seq_len: int) -> PackedData:
    eos = _eos(tokenizer)
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


def build_eval_blocks(
    texts: list[str], tokenizer: Any, seq_len: int, max_blocks: int, where: str
) -> PackedData:
    """An evaluation set of a language model: its first `max_blocks` blocks, packed as the
    training data (`pack`: documents in file order, EOS between them), in `eval` (`train`
    is empty) so `sharp_core.evaluate.perplexity.evaluate` reads it as the held-out tail.

    Documents are tokenised a chunk at a time until the blocks are full: packing keeps a
    prefix, so the blocks are those of the whole file, without tokenising all of it."""
    eos, need = _eos(tokenizer), max_blocks * seq_len
    ids: list[list[int]] = []
    n_tokens, chunk = 0, 256
    for i in range(0, len(texts), chunk):
        part = tokenizer(texts[i : i + chunk], add_special_tokens=False)["input_ids"]
        ids.extend(part)
        n_tokens += sum(len(x) + 1 for x in part)
        if n_tokens >= need:
            break
    blocks = pack(ids, eos, seq_len)[:max_blocks]  # (M, N)
    if blocks.shape[0] == 0:
        raise DataError(
            f"the evaluation set has {n_tokens} tokens: fewer than one block of {seq_len}",
            param=where,
        )
    return PackedData(train=blocks[:0], eval=blocks)


class BatchStream:
    """Endless shuffled batches; its position is part of the resumable training state.

    Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch), so the
    state is just two integers and resuming reproduces the exact same batches.

    Under torchrun every rank walks the same permutation and keeps its own contiguous slice
    of each global batch (`shard`): the ranks' slices are disjoint, together they are the
    single-process batch, and the state (the global position) is the same on every rank and
    means the same for any number of processes.
    """

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks = blocks
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self.rank = 0
        self.world_size = 1
        self._perm = self._permutation(0)

    def shard(self, rank: int, world_size: int) -> BatchStream:
        """From now on return rank `rank`'s 1/world_size of every batch (batch sizes must be
        multiples of world_size)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        return self

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.blocks.shape[0], generator=g)

    def next(self, batch_size: int) -> torch.Tensor:
        return self.blocks[self.next_indices(batch_size)]  # (batch_size, N)

    def next_indices(self, batch_size: int) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        while len(rows) < batch_size:
            if self.pos >= len(self._perm):
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            rows.append(self._perm[self.pos])
            self.pos += 1
        idx = torch.stack(rows)
        if self.world_size > 1:
            if batch_size % self.world_size:
                raise ValueError(
                    f"batch of {batch_size} cannot be split evenly over {self.world_size} ranks"
                )
            per = batch_size // self.world_size
            idx = idx[self.rank * per : (self.rank + 1) * per]
        return idx

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
