"""A causal-LM job's data: source → format → checked rows → tokenized cache → `PackedData`.

`prepare_lm` is what `sharp_core.train.setup` calls. It works out the cache key without
reading the rows (file bytes, or hub coordinates), so every rank agrees on it; rank 0 loads,
checks and tokenises only when no entry verifies (`sharp_core.data.tokenized.prepare`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sharp_core.data import formats, tokenized
from sharp_core.data.loading import TRAIN_PARAM, PackedData, _files, load_table, stream_table
from sharp_core.data.scan import columns_of_file
from sharp_core.errors import DataError
from sharp_core.ranks import ONE, Ranks
from sharp_core.spec import DatasetSpec

__all__ = [
    "LMSource",
    "columns_of",
    "eval_data",
    "load_checked",
    "prepare_lm",
    "resolve_packing",
    "stream_checked",
    "training_texts",
]


def columns_of(ds: DatasetSpec, files: list[str]) -> list[str] | None:
    """The columns of local files, read from their first row or schema (None: hub, or a
    format whose columns need the whole table)."""
    if not files:
        return None
    f = Path(files[0])
    return None if f.is_dir() else columns_of_file(f)  # a save_to_disk folder: its table tells


def resolve_packing(fmt: str, packing: str) -> str:
    """'auto' → concat for text (the former packing), documents for conversations and pairs."""
    if packing != "auto":
        return packing
    return "concat" if fmt == "text" else "documents"


def _fields(ds: DatasetSpec, columns: list[str] | None, source: str) -> dict[str, str]:
    text = ds.text_field
    if columns == ["text"] and source != "hub":
        text = "text"  # a txt file's one column, whatever text_field says
    return {
        "text": text,
        "messages": ds.messages_field,
        "prompt": ds.prompt_field,
        "completion": ds.completion_field,
    }


def _param_of(ds: DatasetSpec, i: int, where: str = TRAIN_PARAM) -> str:
    if ds.source == "upload":
        return f"{where}.upload_id"
    if ds.source == "hub":
        return f"{where}.name"
    return f"{where}.files.{i}"


def load_checked(
    ds: DatasetSpec, resolver: Any, fmt: str, fields: dict[str, str], files: list[str]
) -> Any:
    """The table, each file loaded and checked on its own so an error names the file and
    its row (an unknown role, a non-string content, an empty answer, a missing column)."""
    import datasets

    if ds.source == "hub" or fmt == "text":
        table = load_table(ds, resolver)
        parts = [(ds.name or (files[0] if files else "data"), _param_of(ds, 0), table)]
    else:
        parts = []
        for i, f in enumerate(files):
            one = ds.model_copy(update={"source": "files", "files": [f]})
            parts.append((Path(f).name, _param_of(ds, i), load_table(one, resolver)))
    for where, param, t in parts:
        need = formats.needed_columns(fmt, fields) if fmt != "text" else []
        batch = {c: t[c] if c in need else [] for c in t.column_names}
        formats.check_rows(batch, fmt, fields, where, param)
    tables = [t for _, _, t in parts]
    return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)


def stream_checked(
    ds: DatasetSpec,
    fmt: str,
    fields: dict[str, str],
    files: list[str],
    batch_rows: int,
    where: str = TRAIN_PARAM,
) -> Iterator[dict[str, list[Any]]]:
    """The rows a batch at a time, file after file (or the hub data set, streamed with
    ``dataset.streaming``), each batch checked as it is read (`check_rows`: errors name the
    file and its row), nothing held beyond the batch: what the cache build reads. `where`:
    the spec block the source is (an evaluation set's, ``spec.dataset.eval.val``)."""
    text_param = f"{TRAIN_PARAM}.text_field" if where == TRAIN_PARAM else where
    if ds.source == "hub":
        parts: list[tuple[str, str, Any]] = [(str(ds.name), _param_of(ds, 0, where), None)]
    else:
        parts = [(Path(f).name, _param_of(ds, i, where), [f]) for i, f in enumerate(files)]
    for name, param, one in parts:
        try:
            rows = stream_table(ds, one, where).iter(batch_size=batch_rows)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types for unreadable input
            raise DataError(f"{name}: cannot read the data set: {type(e).__name__}: {e}",
                            param=param) from None  # fmt: skip
        first = 0
        while True:
            try:
                batch = next(rows, None)
            except Exception as e:  # a bad line or chunk, met while streaming
                raise DataError(f"{name}: cannot read the data set after row {first}: "
                                f"{type(e).__name__}: {e}", param=param) from None  # fmt: skip
            if batch is None:
                break
            formats.check_rows(batch, fmt, fields, name, param, first, text_param)
            first += len(next(iter(batch.values()), []))
            yield batch


def training_texts(table: Any, fmt: str, fields: dict[str, str]) -> list[str]:
    """Strings to train a tokenizer on (``tokenizer.train``): the text, or every turn."""
    if fmt == "text":
        return [t for t in table[fields["text"]] if isinstance(t, str) and t.strip()]
    if fmt == "prompt_completion":
        return [x for p, c in zip(table[fields["prompt"]], table[fields["completion"]],
                                  strict=True) for x in (p, c)]  # fmt: skip
    return [m["content"] for conv in table[fields["messages"]] for m in conv]


class LMSource:
    """The job's training data before tokenisation: its files, format and fields."""

    def __init__(self, ds: DatasetSpec, resolver: Any):
        self.ds, self.resolver = ds, resolver
        self.files = _files(ds, resolver) if ds.source != "hub" else []
        self._table: Any = None
        cols = columns_of(ds, self.files)
        if cols is None and ds.streaming:  # the first rows tell, without reading the rest
            cols = list(self.head(1))
        if cols is None:  # hub data (or an unreadable first row): the table tells
            cols = list(self.table_unchecked().column_names)
        self.columns = cols
        self.fields = _fields(ds, cols, ds.source)
        self.format = formats.detect_format(cols, ds.format, self.fields)
        self.loss_on = formats.resolve_loss_on(self.format, ds.loss_on)
        self.packing = resolve_packing(self.format, ds.packing)

    def table_unchecked(self) -> Any:
        if self._table is None:
            self._table = load_table(self.ds, self.resolver)
        return self._table

    def table(self) -> Any:
        """Loaded whole and checked (every row of a chat or pair data set): what a tokenizer
        trained on the data reads."""
        return load_checked(self.ds, self.resolver, self.format, self.fields, self.files)

    def batches(self, batch_rows: int = tokenized.BATCH_ROWS) -> Iterator[dict[str, list[Any]]]:
        """Streamed and checked a batch at a time (`stream_checked`): what the cache reads."""
        return stream_checked(self.ds, self.format, self.fields, self.files, batch_rows)

    def head(self, n: int) -> dict[str, list[Any]]:
        """The first ``n`` rows (at most), read from the start of the stream."""
        if self.ds.source == "hub" and not self.ds.streaming:
            rows = self.table_unchecked()
        else:
            rows = stream_table(self.ds, self.files[:1] or None)
        return next(iter(rows.iter(batch_size=n)), {})

    def fingerprint(self) -> str | None:
        """What names a hub data set's content: the prepared table's fingerprint, or for a
        streaming one its builder's hash (the revision it resolves to). None for files,
        which are hashed byte by byte."""
        if self.files:
            return None
        if self.ds.streaming:
            import datasets

            try:
                builder = datasets.load_dataset_builder(self.ds.name, self.ds.config_name)
            except Exception as e:  # noqa: BLE001 - datasets raises many types
                raise DataError(f"cannot read the data set: {type(e).__name__}: {e}",
                                param=f"{TRAIN_PARAM}.name") from None  # fmt: skip
            return f"streaming:{builder.hash}"
        return getattr(self.table_unchecked(), "_fingerprint", None)


def prepare_lm(
    ds: DatasetSpec,
    source: LMSource,
    tokenizer: Any,
    seq_len: int,
    *,
    store: tokenized.Store | None,
    ranks: Ranks = ONE,
) -> PackedData:
    """Tokenise (or read from the cache) and split the job's rows: the tail
    ``eval_fraction`` of the rows is held out (at most ``max_eval_blocks``)."""
    template = None
    if source.format == "chat":
        template = formats.template_of(tokenizer, ds.chat_template)
    parts = tokenized.key_parts(
        ds,
        tokenizer=formats.tokenizer_digest(tokenizer),
        data=tokenized.source_digest(source.files, ds, source.fingerprint()),
        fmt=source.format,
        loss_on=source.loss_on,
        packing=source.packing,
        seq_len=seq_len,
        template=template,
    )
    parts["fields"] = dict(source.fields)
    parts["_template_text"] = ds.chat_template
    entry = tokenized.prepare(
        parts,
        source.batches,
        tokenizer,
        store=store if ds.cache else None,
        num_proc=ds.num_proc,
        ranks=ranks,
    )
    n = int(entry.tokens.shape[0])
    n_eval = max(1, round(n * ds.eval_fraction))
    if n - n_eval < 1:
        raise DataError(
            f"the corpus gives only {n} blocks of {seq_len} tokens: too small to train and "
            "evaluate",
            param="spec.dataset",
        )
    toks, flags = tokenized.as_tensor(entry.tokens), tokenized.as_tensor(entry.flags)
    ev = slice(n - n_eval, n - n_eval + min(n_eval, ds.max_eval_blocks))
    plain = source.packing == "concat" and not entry.manifest["masked"]
    return PackedData(
        train=toks[: n - n_eval],
        eval=toks[ev],
        train_flags=None if plain else flags[: n - n_eval],
        eval_flags=None if plain else flags[ev],
        packing=source.packing,
        masked=bool(entry.manifest["masked"]),
        key=entry.key,
        info=entry.info,
    )


def eval_data(
    es: DatasetSpec,
    source: LMSource,
    tokenizer: Any,
    seq_len: int,
    max_blocks: int,
    where: str,
    resolver: Any = None,
) -> PackedData:
    """An evaluation set packed as the training data is: the training data's format, field
    names, chat template, loss mask (``loss_on``) and packing, so its perplexity counts the
    tokens training is scored on (a chat set: the answers). Its first `max_blocks` rows, in
    `eval` (`train` is empty); the source is read a batch at a time until they are full.
    `es`: the set's source with the training data's fields (`DatasetSpec.eval_source`);
    errors name `where` (``spec.dataset.eval.val``)."""
    import numpy as np
    import torch

    from sharp_core.data.packing import LOSS, RowPacker

    files = _files(es, resolver, where) if es.source != "hub" else []
    fmt = source.format
    fields = _fields(es, columns_of(es, files), es.source)  # the training data's names
    template = formats.template_of(tokenizer, es.chat_template) if fmt == "chat" else None
    kw = {"tokenizer": tokenizer, "fmt": fmt, "loss_on": source.loss_on,
          "packing": source.packing, "fields": fields, "template": template}  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packer = RowPacker(seq_len, source.packing, int(pad or 0))
    got: list[tuple[Any, Any]] = []
    rows = 0
    for batch in stream_checked(es, fmt, fields, files, 256, where):
        t, f = packer.add(*tokenized.encode_batch(batch, **kw))
        got.append((t, f))
        rows += len(t)
        if rows >= max_blocks:
            break
    else:
        got.append(packer.finish())
    tokens = np.concatenate([t for t, _ in got])[:max_blocks]  # (M, N)
    flags = np.concatenate([f for _, f in got])[:max_blocks]
    if tokens.shape[0] == 0:
        raise DataError(
            f"the evaluation set has {packer.tokens} tokens: fewer than one block of {seq_len}",
            param=where,
        )
    if not (flags[:, 1:] & LOSS).any():
        raise DataError(
            f"no token of the evaluation set is a target (loss_on={source.loss_on!r})",
            param=where,
        )
    masked = bool(((flags[:, 1:] & LOSS) == 0).any()) if source.packing == "concat" else True
    plain = source.packing == "concat" and not masked
    x = torch.from_numpy(tokens.astype(np.int64))
    fl = None if plain else torch.from_numpy(flags)
    return PackedData(
        train=x[:0],
        eval=x,
        train_flags=None if fl is None else fl[:0],
        eval_flags=fl,
        packing=source.packing,
        masked=masked,
    )
