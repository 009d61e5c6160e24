"""The tokenized cache: a data set tokenised and packed once per key, memory-mapped after.

Key (`data_key`): the tokenizer's serialisation, the data's bytes (files, upload) or its hub
name, config, split and fingerprint, the format and its fields, the chat template, loss_on,
packing and seq_len. Everything that changes a token or a flag changes the key; nothing else
does, so every rank, every attempt and every job with the same key reads the same entry.

Layout of an entry (a folder in a `sharp_core.cache.store.CacheStore`-like store, local or
S3, listed by ``sharp admin storage``)::

    <key>/tokens.npy     (n, N) int32          token ids of the packed rows
    <key>/flags.npy      (n, N) uint8          LOSS | START | PAD bits (`sharp_core.data.packing`)
    <key>/manifest.json  written last: key, its parts, shapes, counts, every file's sha256

Built as a stream (`build`): the source is read a batch of rows at a time (local files and
streaming hub data sets through `datasets`' streaming readers, never loaded whole), each
batch encoded by the format's `encode_rows` in one of ``num_proc`` processes (in order, a
bounded number in flight), packed by `RowPacker` and appended to the ``.npy`` files, whose
row count is known and written into their headers at the end. The build's memory is a few
batches and one partial row, whatever the size of the data (docs/performance.md). A folder
without a manifest (a crash mid-build) or whose files do not match it is rebuilt. Under torchrun rank 0 builds, the others wait at a
barrier and then map the committed entry (`prepare`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sharp_core.data import formats
from sharp_core.data.packing import LOSS, START, RowPacker
from sharp_core.errors import DataError
from sharp_core.ranks import ONE, Ranks
from sharp_core.spec import DatasetSpec

__all__ = [
    "FORMAT",
    "Store",
    "TokenizedData",
    "as_tensor",
    "build",
    "commit",
    "data_key",
    "encode_batch",
    "key_parts",
    "open_entry",
    "prepare",
    "source_digest",
    "touch",
]

FORMAT = "sharp-tokenized-v1"
MANIFEST = "manifest.json"
FILES = ("tokens.npy", "flags.npy")
_HASH_CHUNK = 1 << 22


class Store(Protocol):
    """What `prepare` needs of a cache store (`sharp_core.cache.store.CacheStore` has it)."""

    def exists(self, key: str) -> bool: ...

    def get(self, key: str) -> Path: ...

    def staging(self, key: str) -> Path: ...

    def put(self, key: str, local_dir: Path) -> Path: ...

    def discard(self, key: str) -> None: ...


@dataclass
class TokenizedData:
    """Packed rows (n, N) and their flags, memory-mapped (or in memory), with what built them."""

    tokens: np.ndarray
    flags: np.ndarray
    manifest: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.manifest["key"])


def _sha256_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def source_digest(files: list[str], ds: DatasetSpec, fingerprint: str | None = None) -> str:
    """sha256 of the data as read: each file's bytes in order (a ``save_to_disk`` folder's
    files and the split), or the hub coordinates."""
    h = hashlib.sha256()
    if files:
        for f in files:
            p = Path(f)
            if not p.is_dir():
                h.update(b"\0file\0")
                h.update(_sha256_file(p).encode())
                continue
            # a save_to_disk folder: every file in it by relative path, and the split read
            # from a DatasetDict
            h.update(b"\0dir\0" + ds.split.encode())
            for sub in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(b"\0" + sub.relative_to(p).as_posix().encode() + b"\0")
                h.update(_sha256_file(sub).encode())
    else:
        h.update(json.dumps([ds.name, ds.config_name, ds.split, fingerprint]).encode())
    return h.hexdigest()


def data_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def key_parts(
    ds: DatasetSpec, *, tokenizer: str, data: str, fmt: str, loss_on: str, packing: str,
    seq_len: int, template: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Everything a cache entry's content depends on (`data_key` hashes it)."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "data": data,
        "data_format": fmt,
        "fields": {
            "text": ds.text_field,
            "messages": ds.messages_field,
            "prompt": ds.prompt_field,
            "completion": ds.completion_field,
        },
        "template": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "loss_on": loss_on,
        "packing": packing,
        "seq_len": int(seq_len),
    }


# ------------------------------------------------------------------------------ build

#: Rows of the source per tokenising task: big enough that the fast tokenizer batches well,
#: small enough that a few in flight per process stay a few MB.
BATCH_ROWS = 1000


class _NpyAppender:
    """A (rows, N) ``.npy`` file written a chunk of rows at a time with plain writes (no
    memory map, so the build's resident memory does not grow with the file). The header is
    numpy's own: it reserves room for any row count (128 bytes), so it is written first for
    0 rows and rewritten in place for the final count; the file is byte for byte what
    ``np.save`` writes for the whole array."""

    def __init__(self, path: Path, dtype: Any, seq_len: int):
        self.path, self.dtype, self.N, self.rows = path, np.dtype(dtype), seq_len, 0
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.data_at = self._header()

    def _header(self) -> int:
        self.f.seek(0)
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": (self.rows, self.N)}  # fmt: skip
        np.lib.format.write_array_header_1_0(self.f, d)
        return self.f.tell()

    def write(self, rows: np.ndarray) -> None:
        assert rows.dtype == self.dtype and rows.ndim == 2 and rows.shape[1] == self.N
        self.f.write(np.ascontiguousarray(rows).data)
        self.rows += rows.shape[0]

    def close(self) -> None:
        if self._header() != self.data_at:  # cannot happen below 10^21 rows
            raise RuntimeError(f"{self.path}: the .npy header changed size")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def _batches(rows: Any, batch_size: int) -> Iterator[dict[str, list[Any]]]:
    """Batches (column → values) of a `datasets.Dataset` or `IterableDataset` (their
    ``iter``), or ``rows`` itself when it already yields batches."""
    it = getattr(rows, "iter", None)
    if callable(it):
        yield from it(batch_size=batch_size)
    else:
        yield from rows


def encode_batch(
    batch: dict[str, list[Any]], **kw: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch of rows → (flat token ids int32, flat loss mask uint8, lengths int64): the
    format's `formats.encode_rows` (``kw``: its keyword arguments), as `RowPacker` takes it."""
    enc = formats.encode_rows(batch, **kw)
    ids, masks = enc["input_ids"], enc["loss_mask"]
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    flat = np.fromiter((t for d in ids for t in d), dtype=np.int32, count=total)
    mask = np.fromiter((v for m in masks for v in m), dtype=np.uint8, count=total)
    return flat, mask, lengths


_WORKER: dict[str, Any] = {}


def _worker_init(kw: dict[str, Any]) -> None:
    _WORKER.update(kw)


def _worker_encode(batch: dict[str, list[Any]]) -> Any:
    """`encode_batch` in a pool process; a `DataError` comes back as its parts (an exception
    with keyword arguments does not survive pickling whole)."""
    try:
        return encode_batch(batch, **_WORKER)
    except DataError as e:
        return ("error", e.message, e.param)


def _encoded(
    batches: Iterator[dict[str, list[Any]]], kw: dict[str, Any], num_proc: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Encoded batches in the source's order. With ``num_proc`` > 1 a process pool encodes
    them, at most two per process in flight, so reading the source never runs ahead of
    the packing (a bounded pipeline; ``Pool.imap`` would read the whole source ahead)."""
    if num_proc <= 1:
        for b in batches:
            yield encode_batch(b, **kw)
        return
    import multiprocessing as mp

    # fork, as datasets.map(num_proc) does: the tokenizer is inherited, not pickled
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending: deque[Any] = deque()

    def take() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = pending.popleft().get()
        if isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], str):
            raise DataError(out[1], param=out[2])
        return out  # type: ignore[no-any-return]

    with ctx.Pool(num_proc, initializer=_worker_init, initargs=(kw,)) as pool:
        for b in batches:
            pending.append(pool.apply_async(_worker_encode, (b,)))
            if len(pending) >= 2 * num_proc:
                yield take()
        while pending:
            yield take()


def build(
    rows: Any,
    tokenizer: Any,
    *,
    parts: dict[str, Any],
    key: str,
    out_dir: Path | None,
    num_proc: int = 1,
    batch_rows: int = BATCH_ROWS,
) -> TokenizedData:
    """Tokenise ``rows`` and pack them into ``out_dir`` (``.npy`` files appended a chunk at
    a time, manifest last) or, with ``out_dir`` None, into memory. Returns the entry.

    ``rows``: a `datasets.Dataset`, a streaming `IterableDataset`, or an iterable of batches
    (column → values). They are read a batch at a time, encoded (by ``num_proc`` processes),
    packed (`RowPacker`) and written as they come, so the build holds a few batches and one
    partial row whatever the size of the data; the row count is known at the end."""
    started = time.perf_counter()
    fmt, packing, N = parts["data_format"], parts["packing"], parts["seq_len"]
    template = None
    if fmt == "chat":
        template = formats.template_of(tokenizer, parts.get("_template_text"))
    kw = {"tokenizer": tokenizer, "fmt": fmt, "loss_on": parts["loss_on"], "packing": packing,
          "fields": parts["fields"], "template": template}  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packer = RowPacker(N, packing, int(pad or 0))
    sinks: list[Any] = []
    chunks: list[tuple[np.ndarray, np.ndarray]] = []  # in memory (out_dir None)
    if out_dir is not None:
        sinks = [_NpyAppender(out_dir / "tokens.npy", np.int32, N),
                 _NpyAppender(out_dir / "flags.npy", np.uint8, N)]  # fmt: skip
    n = targets = 0
    unmasked = True  # concat: every position past a row's first is a target so far

    def emit(t: np.ndarray, f: np.ndarray) -> None:
        nonlocal n, targets, unmasked
        if not len(t):
            return
        n += len(t)
        targets += int(np.count_nonzero(f[:, 1:] & LOSS))  # labels are x[:, 1:]
        unmasked = unmasked and bool((f[:, 1:] & LOSS).all())
        if sinks:
            sinks[0].write(t)
            sinks[1].write(f)
        else:
            chunks.append((t, f))

    try:
        for ids, mask, lengths in _encoded(_batches(rows, batch_rows), kw, num_proc):
            emit(*packer.add(ids, mask, lengths))
        emit(*packer.finish())
        if n == 0:
            raise DataError(
                f"the data set gives {packer.tokens} tokens: fewer than one row of {N}",
                param="spec.dataset",
            )
        if targets == 0:
            raise DataError(
                "no token of the data set is a training target (loss_on="
                f"{parts['loss_on']!r}): nothing to learn from",
                param="spec.dataset.loss_on",
            )
        for s in sinks:
            s.close()
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "key": key,
        "parts": {k: v for k, v in parts.items() if not k.startswith("_")},
        "rows": n,
        "seq_len": N,
        "documents": packer.documents,
        "tokens": packer.tokens,
        "targets": targets,
        # concat: masked only when some target is off (chat in concat rows)
        "masked": not unmasked if packing == "concat" else True,
        "build_s": round(time.perf_counter() - started, 3),
        "created_at": time.time(),
    }
    if out_dir is not None:
        return commit(out_dir, manifest)
    if len(chunks) == 1:
        tokens, flags = chunks[0]
    else:
        tokens = np.concatenate([t for t, _ in chunks])
        flags = np.concatenate([f for _, f in chunks])
    return TokenizedData(tokens, flags, manifest)


def commit(out_dir: Path, manifest: dict[str, Any]) -> TokenizedData:
    """Hash the arrays in ``out_dir`` into ``manifest`` and write it, last, atomically."""
    manifest["files"] = {f: _file_entry(out_dir / f) for f in FILES}
    tmp = out_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / MANIFEST)
    entry = open_entry(out_dir, str(manifest["key"]))
    assert entry is not None
    return entry


def _file_entry(path: Path) -> dict[str, Any]:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256_file(path)}


def open_entry(folder: Path, key: str, *, verify: bool = True) -> TokenizedData | None:
    """The entry in ``folder`` memory-mapped, or None when it is missing, half-written
    (no manifest), for another key, or its files do not match the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format") != FORMAT:
        return None
    for name in FILES:
        want = manifest.get("files", {}).get(name, {})
        p = folder / name
        if not p.is_file() or p.stat().st_size != want.get("size"):
            return None
        if verify and _sha256_file(p) != want.get("sha256"):
            return None
    try:
        tokens = np.load(folder / "tokens.npy", mmap_mode="r")
        flags = np.load(folder / "flags.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if tokens.shape != (manifest["rows"], manifest["seq_len"]) or flags.shape != tokens.shape:
        return None
    for a in (tokens, flags):  # training reads rows at random: no readahead around each one
        mm = getattr(a, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_RANDOM"):
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_RANDOM)
    return TokenizedData(tokens, flags, manifest)


def touch(folder: Path) -> None:
    """Mark an entry used now (its manifest's mtime): caches are evicted least recently
    used first (``sharp admin storage caches``)."""
    with contextlib.suppress(OSError):  # a read-only store: the entry just looks older
        os.utime(folder / MANIFEST)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a (read-only) memory map: no copy; rows are copied when indexed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable: we never write to it
        return torch.from_numpy(a)


# ------------------------------------------------------------------------------ the job's hook


def prepare(
    parts: dict[str, Any],
    load_table: Callable[[], Any],
    tokenizer: Any,
    *,
    store: Store | None,
    num_proc: int = 1,
    ranks: Ranks = ONE,
) -> TokenizedData:
    """The job's tokenized data: read from ``store`` when an entry for the key verifies,
    else built (by rank 0 under torchrun, the others waiting) and committed. ``load_table``
    gives the rows `build` reads (a table, a streaming data set or batches); it is called
    only to build. ``info`` says which: {role: built | read | memory, key, rows, tokens,
    seconds}."""
    key = data_key({k: v for k, v in parts.items() if not k.startswith("_")})
    started = time.perf_counter()
    if store is None:
        entry = build(load_table(), tokenizer, parts=parts, key=key, out_dir=None,
                      num_proc=num_proc)  # fmt: skip
        role, note = "memory", None
    else:
        role, note = "read", None
        failed: BaseException | None = None
        if ranks.rank == 0:
            try:
                present = store.exists(key)
                found = open_entry(store.get(key), key) if present else None
                if found is None and present:
                    note = "the entry under this key did not verify: discarded and rebuilt"
                    store.discard(key)
                if found is None:
                    role = "built"
                    staged = store.staging(key)
                    try:
                        build(load_table(), tokenizer, parts=parts, key=key, out_dir=staged,
                              num_proc=num_proc)  # fmt: skip
                        store.put(key, staged)
                    finally:
                        if staged.exists():
                            shutil.rmtree(staged, ignore_errors=True)
            except BaseException as e:  # told to the others before raising: none waits forever
                failed, role = e, "error"
        # rank 0's outcome first: an error there must not leave the others at the barrier
        role = ranks.broadcast_object(role)
        if failed is not None:
            raise failed
        if role == "error":
            raise DataError("rank 0 could not build the tokenized data", param="spec.dataset")
        ranks.barrier()
        folder = store.get(key)
        opened = open_entry(folder, key, verify=ranks.rank == 0 and role == "read")
        if opened is None:
            raise DataError(f"the tokenized cache {key[:16]}… cannot be read", param="spec.dataset")
        entry = opened
        if ranks.rank == 0:
            touch(folder)
    m = entry.manifest
    entry.info = {
        "role": role,
        "key": key,
        "rows": m["rows"],
        "seq_len": m["seq_len"],
        "documents": m["documents"],
        "tokens": m["tokens"],
        "targets": m["targets"],
        "format": parts["data_format"],
        "packing": parts["packing"],
        "loss_on": parts["loss_on"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if note:
        entry.info["note"] = note
    return entry


def target_starts(flags: np.ndarray) -> int:
    """Documents that start in the rows (a diagnostic for events and tests)."""
    return int(np.count_nonzero(flags & START))
