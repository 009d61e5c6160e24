"""Documents into fixed ``seq_len`` rows, and the model inputs that keep them apart.

Three ways (``dataset.packing``):

* ``documents``: documents laid end to end and cut into rows of N; each document starts a
  new position count (``position_ids`` restart at 0) and attends only to itself. The models
  get ``position_ids`` and no 2-D mask: transformers (5.x, `masking_utils.
  find_packed_sequence_indices`) then builds the block-diagonal causal mask for SDPA, eager
  and the SHARP capture alike (GPT-2, OPT, Llama). A document longer than what is left of a
  row continues in the next one (split, never dropped), its positions restarting there. The
  first token of a document is not a target (nothing before it in its document predicts it).
  The last row is padded; padding is no target.
* ``concat``: the former packing, kept for text: EOS after each document, attention and
  positions run across documents, the last partial row is dropped.
* ``none``: one document per row, right-padded, with a 2-D attention mask; a document
  longer than N is refused with its row named.

Each row's token facts are one byte of bit flags (`LOSS`, `START`, `PAD`), so a cached data
set is tokens (int32) + flags (uint8) per token, memory-mapped (`sharp_core.data.tokenized`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sharp_core.errors import DataError

__all__ = ["LOSS", "PAD", "START", "Packer", "model_inputs", "positions", "rows_needed"]

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
    (numpy arrays or memory maps), so packing never holds more than one chunk in Python."""

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
