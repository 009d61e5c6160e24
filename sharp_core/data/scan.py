"""A bounded scan of a data set's files at submission: bad conversations or pairs refused
before the job is queued, with the file, row and field, instead of when it starts.

The scan reads rows the way the job's loader does (JSONL a line at a time, parquet a record
batch at a time, only the columns the format needs) and checks them with the loader's own
`formats.check_rows`, so both refuse the same rows with the same words. It stops after a
budget of rows and bytes (`ScanBudget`): a file too big to read whole at submission is
checked up to there, and the rest when the job starts (the result says how far it got).
No torch here: the API imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharp_core.data import formats
from sharp_core.data.sources import expand_files, is_s3
from sharp_core.errors import DataError

__all__ = ["ScanBudget", "ScanResult", "columns_of_file", "scan_files"]

#: Rows read per batch of the scan.
_BATCH = 1000


@dataclass(frozen=True)
class ScanBudget:
    """How much of the data the submission reads: rows and bytes, over all files together."""

    rows: int = 100_000
    bytes: int = 64 * 1024 * 1024


@dataclass
class ScanResult:
    format: str
    files: int = 0  # files opened
    rows: int = 0  # rows checked
    complete: bool = True  # every row of every file was checked
    skipped: list[str] = field(default_factory=list)  # files not read (missing, other kinds)


def columns_of_file(path: Path) -> list[str] | None:
    """The columns of a local file, from its first row or schema (None: not known here)."""
    ext = path.suffix.lower()
    if ext in (".txt", ".text", ".md"):
        return ["text"]
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        return None
                    return list(row) if isinstance(row, dict) else None
    return None


def _jsonl_batches(path: Path, cols: list[str], budget: list[int]) -> Iterator[dict[str, list]]:
    """Batches of a JSON-lines file; ``budget`` ([bytes left]) is spent as lines are read."""
    batch: dict[str, list[Any]] = {}
    n = 0
    seen: set[str] = set()
    with open(path, "rb") as f:
        for line in f:
            budget[0] -= len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"row {n} is not JSON: {e}", param="") from None
            if not isinstance(row, dict):
                raise DataError(f"row {n} is not a JSON object", param="")
            seen.update(row)
            for c in cols:
                batch.setdefault(c, []).append(row.get(c))
            n += 1
            if n % _BATCH == 0 or budget[0] <= 0:
                yield _present(batch, seen)
                batch, seen = {}, set()
                if budget[0] <= 0:
                    return
    if batch:
        yield _present(batch, seen)


def _present(batch: dict[str, list[Any]], seen: set[str]) -> dict[str, list[Any]]:
    """Only the columns some row of the batch has (a column no row has is missing)."""
    return {c: v for c, v in batch.items() if c in seen}


def _parquet_batches(path: Path, cols: list[str], budget: list[int]) -> Iterator[dict[str, list]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    have = [c for c in cols if c in pf.schema_arrow.names]
    for rb in pf.iter_batches(batch_size=_BATCH, columns=have):
        budget[0] -= rb.nbytes
        yield rb.to_pydict()
        if budget[0] <= 0:
            return


def scan_files(
    files: list[str],
    fmt: str,
    fields: dict[str, str],
    param: str,
    budget: ScanBudget = ScanBudget(),  # noqa: B008 - frozen
) -> ScanResult:
    """Check the chat or prompt/completion rows of ``files`` (entries of ``param``, e.g.
    ``spec.dataset.files``; globs expanded) within ``budget``. ``fmt`` 'auto' is read from
    the first file's columns. A `DataError` names ``{param}.{i}`` (the entry), the file, the
    row and the field. Text needs no scan; a missing file is left to the job (it says so)."""
    paths = [  # s3:// entries are the API's check_s3_source's, read by the job
        (i, Path(f)) for i, e in enumerate(files) if not is_s3(e) for f in expand_files([e], param)
    ]
    if fmt == "auto":
        cols = next((columns_of_file(p) for _, p in paths if p.is_file()), None)
        fmt = formats.detect_format(cols or [], "auto", fields) if cols is not None else "text"
    out = ScanResult(fmt)
    if fmt == "text":
        return out
    need = formats.needed_columns(fmt, fields)
    left = [budget.bytes]
    for i, p in paths:
        if out.rows >= budget.rows or left[0] <= 0:
            out.complete = False
            break
        ext = p.suffix.lower()
        if not p.is_file() or ext not in (".jsonl", ".parquet"):
            out.skipped.append(str(p))
            out.complete = False
            continue
        out.files += 1
        row = 0
        where, at = p.name, f"{param}.{i}"
        batches = (
            _jsonl_batches(p, need, left) if ext == ".jsonl" else _parquet_batches(p, need, left)
        )
        try:
            for batch in batches:
                take = min(len(next(iter(batch.values()), [])), budget.rows - out.rows)
                batch = {c: v[:take] for c, v in batch.items()} if batch else {}
                formats.check_rows(batch, fmt, fields, where, at, row, text_param=at)
                row += take
                out.rows += take
                if out.rows >= budget.rows:
                    break
        except DataError as e:
            if e.param:
                raise
            raise DataError(f"{where}: {e.message}", param=at) from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{where}: cannot read: {type(e).__name__}: {e}", param=at) from None
        if left[0] <= 0 or out.rows >= budget.rows:
            out.complete = False
    return out
