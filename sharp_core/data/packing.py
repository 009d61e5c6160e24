"""Documents into fixed ``seq_len`` rows, and the model inputs that keep them apart.

Three ways (``dataset.packing``):

* ``documents``: documents laid end to end and cut into rows of N; each document starts a
  new position count (``position_ids`` restart at 0) and attends only to itself: the models
  get the positions and a 4-D block-diagonal causal mask (`forward_kwargs`), which
  transformers hands to SDPA, eager and the SHARP capture unchanged (GPT-2, OPT, Llama;
  position-based detection of packing alone is not enough: OPT never looks, and a KV cache
  turns it off). A document longer than what is left of a
  row continues in the next one (split, never dropped), its positions restarting there. The
  first token of a document is not a target (nothing before it in its document predicts it).
  The last row is padded; padding is no target.
* ``concat``: the former packing, kept for text: EOS after each document, attention and
  positions run across documents, the last partial row is dropped.
* ``none``: one document per row, right-padded, with a 2-D attention mask; a document
  longer than N is refused with its row named.

Each row's token facts are one byte of bit flags (`LOSS`, `START`, `PAD`), so a cached data
set is tokens (int32) + flags (uint8) per token, memory-mapped (`sharp_core.data.tokenized`).

Two packers give the same rows: `RowPacker` takes documents chunk by chunk and hands back the
rows completed so far, without knowing how many rows there will be (the cache build streams
them to disk); `Packer` fills arrays sized beforehand from every document's length
(`rows_needed`), the simple form the tests take as the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sharp_core.errors import DataError

__all__ = [
    "LOSS",
    "PAD",
    "START",
    "Packer",
    "RowPacker",
    "document_mask",
    "forward_kwargs",
    "model_inputs",
    "positions",
    "rows_needed",
]

LOSS, START, PAD = 1, 2, 4


def rows_needed(lengths: np.ndarray, seq_len: int, packing: str) -> int:
    """Rows the packed data takes (documents: the last one padded; concat: the last partial
    one dropped; none: one per document)."""
    total = int(lengths.sum())
    if packing == "documents":
        return -(-total // seq_len)
    if packing == "concat":
        return total // seq_len
    return len(lengths)


class Packer:
    """Writes documents, chunk by chunk, into preallocated (n, N) ``tokens`` and ``flags``
    (numpy arrays or memory maps), so packing never holds more than one chunk in Python.

    No job path uses it any more (the cache build streams through `RowPacker`): it stays as
    the plain reference `RowPacker` is tested equal to, and as the former build `bench.data`
    measures against."""

    def __init__(
        self, tokens: np.ndarray, flags: np.ndarray, packing: str, pad_id: int, first_row: int = 0
    ):
        self.tokens, self.flags, self.packing, self.pad = tokens, flags, packing, pad_id
        self.n, self.N = tokens.shape
        self.pos = 0  # flat write position (documents, concat)
        self.row = 0  # next row (none)
        self.first_row = first_row  # the data set's row number of the next document (errors)

    def add(self, ids: Iterable[list[int]], masks: Iterable[list[int]]) -> None:
        ids, masks = list(ids), list(masks)
        if self.packing == "none":
            for doc, m in zip(ids, masks, strict=True):
                if len(doc) > self.N:
                    raise DataError(
                        f"document {self.first_row} has {len(doc)} tokens, more than "
                        f"training.seq_len={self.N}, and packing is 'none': raise seq_len, "
                        "shorten it, or pack ('documents' splits it)",
                        param="spec.dataset.packing",
                    )
                L = len(doc)
                self.tokens[self.row, :L] = doc
                self.tokens[self.row, L:] = self.pad
                f = np.asarray(m, dtype=np.uint8) & LOSS
                f[:1] |= START
                self.flags[self.row, :L] = f
                self.flags[self.row, L:] = PAD
                self.row += 1
                self.first_row += 1
            return
        lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for d in ids for t in d), dtype=np.int64, count=int(lengths.sum()))
        fl = np.fromiter((v for m in masks for v in m), dtype=np.uint8, count=len(flat)) & LOSS
        if self.packing == "documents":
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            fl[starts] = START  # a document's first token: a start, never a target
        room = self.n * self.N - self.pos
        take = min(room, len(flat))  # concat: the tail past the last full row is dropped
        self.tokens.reshape(-1)[self.pos : self.pos + take] = flat[:take]
        self.flags.reshape(-1)[self.pos : self.pos + take] = fl[:take]
        self.pos += take
        self.first_row += len(ids)

    def finish(self) -> None:
        """Pad the rest of the last row (documents): its own segment, no target."""
        if self.packing == "none" or self.pos >= self.n * self.N:
            return
        self.tokens.reshape(-1)[self.pos :] = self.pad
        f = self.flags.reshape(-1)
        f[self.pos :] = PAD
        f[self.pos] = PAD | START


class RowPacker:
    """Documents in, finished (k, N) rows out, chunk by chunk: what `Packer` writes for the
    same documents, but without knowing the row count beforehand. Holds at most the one
    partial row between chunks, so a build never has more than a chunk in memory.

    ``add`` takes a chunk as flat token ids (int), flat loss masks (0/1) and each document's
    length; it returns the (tokens int32, flags uint8) rows it completed. ``finish`` returns
    the last, padded row (documents) or nothing (concat drops the partial row; none has
    none)."""

    def __init__(self, seq_len: int, packing: str, pad_id: int):
        self.N, self.packing, self.pad = seq_len, packing, pad_id
        self.documents = 0  # documents seen (the number an error names)
        self.tokens = 0  # tokens seen
        self._t = np.zeros(0, np.int32)  # the partial row carried to the next chunk
        self._f = np.zeros(0, np.uint8)

    def add(
        self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        N, k = self.N, len(lengths)
        first = self.documents
        self.documents += k
        self.tokens += int(lengths.sum())
        fl = np.asarray(mask, np.uint8) & LOSS  # (T,)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (k,)
        if self.packing == "none":
            long = np.flatnonzero(lengths > N)
            if len(long):
                i = int(long[0])
                raise DataError(
                    f"document {first + i} has {int(lengths[i])} tokens, more than "
                    f"training.seq_len={N}, and packing is 'none': raise seq_len, "
                    "shorten it, or pack ('documents' splits it)",
                    param="spec.dataset.packing",
                )
            tokens = np.full((k, N), self.pad, np.int32)
            flags = np.full((k, N), PAD, np.uint8)
            row = np.repeat(np.arange(k), lengths)  # (T,) each token's row
            col = np.arange(len(ids)) - np.repeat(starts, lengths)  # (T,) its column
            fl[starts[lengths > 0]] |= START
            tokens[row, col] = ids
            flags[row, col] = fl
            return tokens, flags
        if self.packing == "documents":
            fl[starts[lengths > 0]] = START  # a document's first token: a start, never a target
        t = np.concatenate([self._t, np.asarray(ids, np.int32)])
        f = np.concatenate([self._f, fl])
        full = len(t) // N * N
        self._t, self._f = t[full:], f[full:]
        return t[:full].reshape(-1, N), f[:full].reshape(-1, N)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The last row, padded as its own segment with no target (documents), else none."""
        rest = len(self._t)
        if self.packing != "documents" or rest == 0:
            return np.zeros((0, self.N), np.int32), np.zeros((0, self.N), np.uint8)
        tokens = np.full((1, self.N), self.pad, np.int32)
        flags = np.full((1, self.N), PAD, np.uint8)
        tokens[0, :rest], flags[0, :rest] = self._t, self._f
        flags[0, rest] = PAD | START
        self._t, self._f = self._t[:0], self._f[:0]
        return tokens, flags


def positions(flags: torch.Tensor) -> torch.Tensor:
    """(B, N) position ids restarting at each document start (and at each row's start)."""
    B, N = flags.shape
    idx = torch.arange(N, device=flags.device).expand(B, N)
    start = (flags & START).bool()
    last = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last


def model_inputs(flags: torch.Tensor | None, packing: str, masked: bool) -> dict[str, Any]:
    """The batch entries a packed row needs beside input_ids: ``position_ids`` (documents),
    ``attention_mask`` (none: padding) and ``loss_mask`` (when not every token is a target).
    ``flags``: (B, N) uint8 (None: plain blocks, nothing to add)."""
    if flags is None:
        return {}
    out: dict[str, Any] = {}
    if packing == "documents":
        out["position_ids"] = positions(flags)
    elif packing == "none":
        out["attention_mask"] = ((flags & PAD) == 0).long()
    if masked or packing != "concat":
        out["loss_mask"] = (flags & LOSS).bool()
    return out


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, N) bool, True = may attend: causal, and within the query's document.

    Documents are read from the positions (each starts at position 0), so the mask needs
    nothing beyond what the batch carries."""
    seg = (position_ids == 0).cumsum(dim=1)  # (B, N) document number within the row
    N = position_ids.shape[1]
    causal = torch.ones(N, N, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


def forward_kwargs(batch: dict[str, Any], *, additive: torch.dtype | None = None) -> dict[str, Any]:
    """The keyword arguments of a model's forward for ``batch`` beyond input_ids.

    Packed documents (``position_ids``) get the block-diagonal causal mask as a 4-D mask,
    which transformers passes through to SDPA, eager and the SHARP capture as it is (its own
    detection of packed positions is skipped by OPT and whenever a KV cache exists); boolean
    for SDPA and the capture, ``additive`` (0 / dtype minimum) for eager attention. A 2-D
    padding mask is passed as it is."""
    out: dict[str, Any] = {}
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"]
        mask = document_mask(pos)
        if additive is not None:
            mask = torch.zeros(mask.shape, dtype=additive, device=pos.device).masked_fill(
                ~mask, torch.finfo(additive).min
            )
        out.update(position_ids=pos, attention_mask=mask, use_cache=False)
    elif batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"]
    return out
