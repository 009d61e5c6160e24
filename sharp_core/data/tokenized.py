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

Built by `datasets.map(batched=True, num_proc=…)` (the format's `encode_rows`), streamed
through the `Packer` into ``np.lib.format.open_memmap`` arrays, so neither the build nor a
reader holds the corpus in Python lists. A folder without a manifest (a crash mid-build) or
whose files do not match it is rebuilt. Under torchrun rank 0 builds, the others wait at a
barrier and then map the committed entry (`prepare`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sharp_core.data import formats
from sharp_core.data.packing import LOSS, START, Packer, rows_needed
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


def build(
    table: Any,
    tokenizer: Any,
    *,
    parts: dict[str, Any],
    key: str,
    out_dir: Path | None,
    num_proc: int = 1,
    first_rows: list[int] | None = None,
) -> TokenizedData:
    """Tokenise ``table`` (a `datasets.Dataset`) and pack it into ``out_dir`` (memory maps,
    manifest last) or, with ``out_dir`` None, into memory. Returns the entry.

    A table backed by files (a ``save_to_disk`` folder) gets its map output in a scratch
    folder removed afterwards: ``datasets`` would write it beside the source's own files,
    into the data roots, and change the folder the key hashes."""
    scratch = None
    if out_dir is not None and getattr(table, "cache_files", None):
        scratch = Path(tempfile.mkdtemp(prefix="sharp-map-"))
    try:
        return _build(table, tokenizer, parts=parts, key=key, out_dir=out_dir,
                      num_proc=num_proc, map_cache=scratch)  # fmt: skip
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _build(
    table: Any,
    tokenizer: Any,
    *,
    parts: dict[str, Any],
    key: str,
    out_dir: Path | None,
    num_proc: int,
    map_cache: Path | None,
) -> TokenizedData:
    started = time.perf_counter()
    fmt, packing, N = parts["data_format"], parts["packing"], parts["seq_len"]
    template = None
    if fmt == "chat":
        template = formats.template_of(tokenizer, parts.get("_template_text"))
    enc = table.map(
        formats.encode_rows,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc > 1 and len(table) > num_proc else None,
        remove_columns=table.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "fmt": fmt,
            "loss_on": parts["loss_on"],
            "packing": packing,
            "fields": parts["fields"],
            "template": template,
        },
        keep_in_memory=out_dir is None,
        load_from_cache_file=False,
        cache_file_name=str(map_cache / "map.arrow") if map_cache is not None else None,
        desc=None,
    )
    tokenize_s = time.perf_counter() - started
    import pyarrow.compute as pc

    ids_col = enc.data.column("input_ids")
    lengths = np.asarray(pc.list_value_length(ids_col).to_numpy(zero_copy_only=False), np.int64)
    n = rows_needed(lengths, N, packing)
    if n == 0:
        raise DataError(
            f"the data set gives {int(lengths.sum())} tokens: fewer than one row of {N}",
            param="spec.dataset",
        )
    tokens: np.ndarray
    flags: np.ndarray
    if out_dir is not None:
        tokens = np.lib.format.open_memmap(
            out_dir / "tokens.npy", mode="w+", dtype=np.int32, shape=(n, N)
        )
        flags = np.lib.format.open_memmap(
            out_dir / "flags.npy", mode="w+", dtype=np.uint8, shape=(n, N)
        )
    else:
        tokens, flags = np.zeros((n, N), np.int32), np.zeros((n, N), np.uint8)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packer = Packer(tokens, flags, packing, int(pad or 0))
    for start in range(0, len(enc), 10_000):
        chunk = enc[start : start + 10_000]
        packer.add(chunk["input_ids"], chunk["loss_mask"])
    packer.finish()
    targets = int(_count_targets(flags))
    if targets == 0:
        raise DataError(
            "no token of the data set is a training target (loss_on="
            f"{parts['loss_on']!r}): nothing to learn from",
            param="spec.dataset.loss_on",
        )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "key": key,
        "parts": {k: v for k, v in parts.items() if not k.startswith("_")},
        "rows": n,
        "seq_len": N,
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "targets": targets,
        "masked": bool(targets < n * (N - 1)) if packing == "concat" else True,
        "tokenize_s": round(tokenize_s, 3),
        "build_s": round(time.perf_counter() - started, 3),
        "created_at": time.time(),
    }
    if packing == "concat":  # masked only when some target is off (chat in concat rows)
        manifest["masked"] = bool(((flags[:, 1:] & LOSS) == 0).any())
    if out_dir is not None:
        for a in (tokens, flags):
            if isinstance(a, np.memmap):
                a.flush()
        del tokens, flags
        return commit(out_dir, manifest)
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


def _count_targets(flags: np.ndarray) -> int:
    """Target tokens: flagged LOSS, not a row's first position (labels are x[:, 1:])."""
    total = 0
    for s in range(0, flags.shape[0], 4096):
        total += int(np.count_nonzero(flags[s : s + 4096, 1:] & LOSS))
    return total


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
    else built (by rank 0 under torchrun, the others waiting) and committed. ``info`` says
    which: {role: built | read | memory, key, rows, tokens, seconds}."""
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
