"""A teacher-logit cache shared by jobs: build it once, read it instead of the teacher's forward.

Teams distil several students (sizes, methods, seeds) from one teacher on one data set; each
job used to pay for the teacher's forward pass again. A cache stores, for every next-token
position of the job's packed training blocks, a sparse view of the teacher's distribution
at the job's temperature:

* ``topk``: the k largest log-probs and their token ids, plus the log of the mass left
  outside them (the "tail"), so the loss can keep the tail as one bucket;
* ``sampled``: Random-Sampling KD (Anshumann et al., ACL 2025, arXiv 2503.16870): n tokens
  drawn from p per position, with their log-probs; the mean over draws of
  log p(x) − log q(x) is an unbiased estimate of KL(p‖q) and its gradient.

Layout (one folder per key, in the artifact store; docs/teacher-cache.md)::

    <key>/shard_00000.safetensors   ids (b, N-1, w) int32, logp (b, N-1, w), tail (b, N-1)
    <key>/manifest.json              key, its parts, shapes, every shard's sha256 and size

The manifest is written last: a folder with a manifest is complete (`CacheStore.put`).
Every shard is hashed when the cache is opened and again each time it is read, so a shard
that is missing or changed fails the job with `TeacherCacheCorruptError` (and is discarded,
so a retry rebuilds it) instead of training on wrong targets.

The key is the sha256 of its parts (`key_parts`): the teacher's weights and config, the
tokenizer, the data set, the packed blocks (seq_len, count, content), kind, k (or samples
and their seed), temperature and storage dtype. The training seed is not a part: it only
orders the visits to the blocks, and the cache is indexed by block, so jobs with different
seeds share one cache (the point of it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sharp_core.cache.store import MANIFEST, CacheStore, LocalCacheStore
from sharp_core.data.formats import tokenizer_digest
from sharp_core.data.packing import forward_kwargs
from sharp_core.errors import ArtifactWriteError, SpecError, TeacherCacheCorruptError
from sharp_core.files import sha256_file
from sharp_core.objectives.losses import DIVERGENCES, IGNORE_INDEX
from sharp_core.ranks import ONE, Ranks
from sharp_core.spec import TeacherCacheSpec

__all__ = [
    "CacheStore",
    "LocalCacheStore",
    "TeacherCache",
    "build_cache",
    "cache_key",
    "shard_plan",
    "key_parts",
    "sparse_linear_objective",
    "sparse_logit_objective",
    "SparseTargets",
    "as_batch",
    "attach",
    "read_manifest",
    "teacher_backbone",
    "teacher_digest",
    "teacher_targets",
    "tensor_digest",
    "texts_digest",
    "tokenizer_digest",
]

FORMAT = 1
SHARD_BYTES = 64 << 20
"""Target size of one shard: big enough for few files, small enough to hash and load fast."""

# The keys of the batch dict a cached micro-batch carries (`TeacherCache.batch`).
IDS, LOGP, TAIL = "cache_ids", "cache_logp", "cache_tail"
TIDS, TLOGP = "cache_tail_ids", "cache_tail_logp"  # draws from the tail (tail_samples > 0)


# ------------------------------------------------------------------------------ the key


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().reshape(-1)
    step = 1 << 24  # elements per update: a memory-mapped data set is never copied whole
    for s in range(0, max(flat.numel(), 1), step):
        h.update(flat[s : s + step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_digest(model: torch.nn.Module) -> str:
    """sha256 of the loaded teacher: its config (minus paths and versions) and every weight.

    Hashing what was loaded, not the files, covers every source the same way (hub, folder,
    a finished job, a config-initialised model) and the dtype it was loaded in."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = {
            k: v
            for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "name_or_path")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def texts_digest(texts: list[str]) -> str:
    """sha256 of the loaded documents, in order (the data set as the job reads it)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def key_parts(
    cfg: TeacherCacheSpec,
    *,
    teacher: str,
    tokenizer: str,
    dataset: str,
    blocks: torch.Tensor,
    vocab: int,
    temperature: float,
) -> dict[str, Any]:
    """Everything the cache's content depends on (`cache_key` hashes it)."""
    parts: dict[str, Any] = {
        "format": FORMAT,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "dataset": dataset,
        "packing": {
            "seq_len": int(blocks.shape[1]),
            "blocks": int(blocks.shape[0]),
            "blocks_sha256": tensor_digest(blocks),
        },
        "vocab": int(vocab),
        "kind": cfg.kind,
        "temperature": float(temperature),
        "dtype": cfg.dtype,
    }
    if cfg.kind == "topk":
        parts["k"] = int(cfg.k)
        if cfg.tail_samples:  # absent when 0: the keys of plain top-k caches do not change
            parts["tail_samples"] = int(cfg.tail_samples)
            parts["sample_seed"] = int(cfg.sample_seed)
    else:
        parts["k"] = int(cfg.samples)
        parts["sample_seed"] = int(cfg.sample_seed)
    return parts


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 (hex) of the key parts' canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- building


def _block_generator(cfg: TeacherCacheSpec, like: torch.Tensor, block: int) -> torch.Generator:
    """One generator per block, seeded by (sample_seed, block): the draws do not depend on the
    batch size of the pass that built the cache."""
    return torch.Generator(device=like.device).manual_seed(cfg.sample_seed * 1_000_003 + block)


def teacher_targets(
    logits: torch.Tensor, cfg: TeacherCacheSpec, temperature: float, block_ids: list[int]
) -> dict[str, torch.Tensor]:
    """Sparse targets of teacher logits (B, N-1, V): ids/logp (B, N-1, w) [+ tail (B, N-1)]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, N-1, V)
    if cfg.kind == "topk":
        k = min(cfg.k, logp.shape[-1])
        vals, ids = logp.topk(k, dim=-1, sorted=False)  # (B, N-1, k)
        # log of the mass outside the top-k, exact (never log(1 − Σ p)); -inf when k = V
        rest = logp.scatter(-1, ids, float("-inf"))  # (B, N-1, V): the tail's log-probs
        tail = torch.logsumexp(rest, dim=-1)  # (B, N-1)
        out = {"ids": ids.to(torch.int32), "logp": vals, "tail": tail}
        if cfg.tail_samples:
            probs = rest.exp()
            probs[probs.sum(-1) == 0] = 1.0  # an empty tail: any draw, its weight p_tail is 0
            tids = torch.stack(
                [
                    torch.multinomial(
                        probs[b], cfg.tail_samples, True, generator=_block_generator(cfg, logp, i)
                    )
                    for b, i in enumerate(block_ids)
                ]
            )  # (B, N-1, n)
            out["tids"] = tids.to(torch.int32)
            out["tlogp"] = logp.gather(-1, tids)
        return out
    ids_out = [
        torch.multinomial(
            logp[b].exp(), cfg.samples, True, generator=_block_generator(cfg, logp, i)
        )
        for b, i in enumerate(block_ids)
    ]
    ids = torch.stack(ids_out)  # (B, N-1, n)
    return {"ids": ids.to(torch.int32), "logp": logp.gather(-1, ids)}


def shard_plan(
    blocks: int, positions: int, cfg: TeacherCacheSpec, vocab: int, shard_bytes: int = SHARD_BYTES
) -> list[tuple[int, int]]:
    """(first block, count) of every shard: a function of the cache's shape only, never of
    the number of ranks that build it, so a cache built by any world size is the same
    cache (same shards, same manifest) and any reader maps block index → shard."""
    width = cfg.k if cfg.kind == "topk" else cfg.samples
    width = min(width, vocab) if cfg.kind == "topk" else width
    val_bytes = 2 if cfg.dtype == "float16" else 4
    per_block = positions * ((width + cfg.tail_samples) * (4 + val_bytes) + val_bytes)
    per_shard = max(1, shard_bytes // per_block)
    return [(f, min(per_shard, blocks - f)) for f in range(0, blocks, per_shard)]


def build_cache(
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TeacherCacheSpec,
    *,
    key: str,
    parts: dict[str, Any],
    vocab: int,
    temperature: float,
    out_dir: Path,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    shard_bytes: int = SHARD_BYTES,
    ranks: Ranks = ONE,
    inputs: Callable[[slice], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """One teacher pass over ``blocks`` (n, N) writing shards and, last, the manifest, into
    ``out_dir`` (a staging folder: `CacheStore.put` commits it). Returns the manifest.
    ``inputs`` gives a slice of rows as model inputs when the packing needs more than
    input_ids (`PackedData.inputs`: position_ids of packed documents, a padding mask).

    Under torchrun (``ranks``: the job's `sharp_core.train.distributed.Context`), every rank calls
    this with the same ``out_dir``: rank r builds shards r, r+W, … of `shard_plan`, the
    shard entries are gathered, and rank 0 writes the manifest once all shards are on disk.
    Every rank returns the manifest."""
    from safetensors.torch import save_file

    n, N = blocks.shape
    rank, world = ranks.rank, ranks.world_size
    width = cfg.k if cfg.kind == "topk" else cfg.samples
    width = min(width, vocab) if cfg.kind == "topk" else width
    dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    mine: list[dict[str, Any]] = []
    started = time.perf_counter()
    teacher.eval()
    for index, (first, count) in enumerate(shard_plan(n, N - 1, cfg, vocab, shard_bytes)):
        if index % world != rank:
            continue  # another rank's shard
        pieces: dict[str, list[torch.Tensor]] = {}
        for s in range(first, first + count, batch_size):
            e = min(s + batch_size, first + count)
            b = inputs(slice(s, e)) if inputs else {"input_ids": blocks[s:e].to(device)}
            fwd = {"input_ids": b["input_ids"], **forward_kwargs(b)}
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
            ):
                logits = teacher(**fwd).logits[:, :-1, :vocab]  # (b, N-1, V)
                out = teacher_targets(logits, cfg, temperature, list(range(s, e)))
            for name, t in out.items():
                pieces.setdefault(name, []).append(t.cpu())
        tensors = {name: torch.cat(ts) for name, ts in pieces.items()}
        for name in ("logp", "tail", "tlogp"):
            if name in tensors:
                tensors[name] = tensors[name].to(dtype).contiguous()
        fname = f"shard_{index:05d}.safetensors"
        path = out_dir / fname
        save_file(tensors, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        mine.append(
            {
                "name": fname,
                "first": first,
                "count": count,
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
            }
        )
    # every rank's shards are on disk once the gather returns (it waits for all ranks)
    everyone = ranks.gather_objects(mine)
    shards = sorted((s for part in everyone for s in part), key=lambda s: s["first"])
    manifest = {
        "format": FORMAT,
        "key": key,
        "parts": parts,
        "kind": cfg.kind,
        "width": int(width),
        "blocks": int(n),
        "positions": int(N - 1),
        "shards": shards,
        "bytes": sum(s["size"] for s in shards),
        "build_s": round(time.perf_counter() - started, 3),
        "build_ranks": world,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    if rank == 0:
        with open(out_dir / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    return manifest


# ----------------------------------------------------------------------------- reading


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, or None when it is missing or unreadable."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


class TeacherCache:
    """An opened, verified cache: `batch` gives the sparse targets of a batch of blocks.

    Shards are loaded on demand (an LRU bounded by ``max_bytes``) and their sha256 is
    checked on every load, so a shard changed after the cache was opened is caught too.
    ``on_corrupt`` runs before `TeacherCacheCorruptError` is raised (the trainer discards
    the cache there, so a retry rebuilds it)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        *,
        on_corrupt: Callable[[], None] | None = None,
        max_bytes: int = 1 << 30,
    ):
        self.path = path
        self.manifest = manifest
        self.kind = manifest["kind"]
        self.on_corrupt = on_corrupt
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._starts = [s["first"] for s in manifest["shards"]]

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def _corrupt(self, msg: str) -> TeacherCacheCorruptError:
        if self.on_corrupt is not None:
            self.on_corrupt()
        return TeacherCacheCorruptError(f"teacher cache {self.key[:16]}…: {msg}")

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        key: str,
        blocks: int,
        positions: int,
        on_corrupt: Callable[[], None] | None = None,
    ) -> TeacherCache:
        """Open and verify every shard (exists, size, sha256, covers every block once)."""
        manifest = read_manifest(path)
        cache = cls(
            path, manifest or {"key": key, "kind": "?", "shards": []}, on_corrupt=on_corrupt
        )
        if manifest is None:
            raise cache._corrupt("unreadable manifest")
        if manifest.get("key") != key or manifest.get("format") != FORMAT:
            raise cache._corrupt("manifest is for another key or format")
        if manifest.get("blocks") != blocks or manifest.get("positions") != positions:
            raise cache._corrupt(
                f"manifest covers {manifest.get('blocks')}×{manifest.get('positions')} "
                f"positions, the job has {blocks}×{positions}"
            )
        expected = 0
        for s in manifest["shards"]:
            p = path / s["name"]
            if s["first"] != expected:
                raise cache._corrupt(f"shards do not cover the blocks in order at {s['name']}")
            expected += s["count"]
            if not p.is_file():
                raise cache._corrupt(f"shard {s['name']} is missing")
            if p.stat().st_size != s["size"] or sha256_file(p) != s["sha256"]:
                raise cache._corrupt(f"shard {s['name']} does not match its sha256")
        if expected != blocks:
            raise cache._corrupt(f"shards cover {expected} of {blocks} blocks")
        return cache

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._loaded:
            self._loaded.move_to_end(i)
            return self._loaded[i]
        from safetensors.torch import load

        s = self.manifest["shards"][i]
        try:
            data = (self.path / s["name"]).read_bytes()
        except OSError as e:
            raise self._corrupt(f"shard {s['name']} cannot be read: {e}") from None
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise self._corrupt(f"shard {s['name']} does not match its sha256")
        tensors = load(data)
        self._loaded[i] = tensors
        while (
            len(self._loaded) > 1
            and sum(t.numel() * t.element_size() for d in self._loaded.values() for t in d.values())
            > self.max_bytes
        ):
            self._loaded.popitem(last=False)
        return tensors

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Sparse targets of blocks ``idx`` (B,): ids (B, N-1, w) int64, logp (B, N-1, w)
        float32, and for top-k tail (B, N-1) float32, under the `IDS`/`LOGP`/`TAIL` keys."""
        import bisect

        rows: dict[str, list[torch.Tensor]] = {}
        for b in idx.tolist():
            i = bisect.bisect_right(self._starts, b) - 1
            shard = self._shard(i)
            r = b - self._starts[i]
            for name, t in shard.items():
                rows.setdefault(name, []).append(t[r])
        out = {
            IDS: torch.stack(rows["ids"]).long(),
            LOGP: torch.stack(rows["logp"]).float(),
        }
        if "tail" in rows:
            out[TAIL] = torch.stack(rows["tail"]).float()
        if "tids" in rows:
            out[TIDS] = torch.stack(rows["tids"]).long()
            out[TLOGP] = torch.stack(rows["tlogp"]).float()
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def as_batch(targets: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`teacher_targets` output as the batch entries `sharp_core.train.step.micro_step` reads (what
    `TeacherCache.batch` returns for blocks read from disk)."""
    out = {IDS: targets["ids"].long(), LOGP: targets["logp"].float()}
    if "tail" in targets:
        out[TAIL] = targets["tail"].float()
    if "tids" in targets:
        out[TIDS] = targets["tids"].long()
        out[TLOGP] = targets["tlogp"].float()
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


# ------------------------------------------------------------------------- the sparse loss


@dataclass(frozen=True)
class SparseTargets:
    """A micro-batch's cached teacher view: ids/logp (B, N-1, w), tail (B, N-1) or None."""

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor | None
    tail_ids: torch.Tensor | None = None  # (B, N-1, n) draws from the tail (tail_samples)
    tail_logp: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> SparseTargets | None:
        if IDS not in batch:
            return None
        return cls(batch[IDS], batch[LOGP], batch.get(TAIL), batch.get(TIDS), batch.get(TLOGP))


_FLOOR = -1e30  # stands for log 0 where a logsumexp of nothing but -inf would give NaN gradients


def _row_divergence(
    how: str, name: str, alpha: float, beta: float, k: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Per-row D from the student's log q (R, V) and the cache's ids/logp (R, w), tail (R,)."""

    def tail_bucket(log_q, ids, lp, tail):  # (k+1)-bucket distributions: all divergences
        assert tail is not None
        lq_k = log_q.gather(1, ids)  # (R, k)
        rest = log_q.scatter(1, ids, _FLOOR)  # the student's mass outside the teacher's top-k
        lq_tail = torch.logsumexp(rest, dim=1, keepdim=True).clamp_min(_FLOOR)  # (R, 1)
        log_p = torch.cat([lp, tail[:, None]], dim=1)  # (R, k+1)
        log_q2 = torch.cat([lq_k, lq_tail], dim=1)
        return DIVERGENCES[name](log_p, log_q2, alpha=alpha, beta=beta)

    def renormalized(log_q, ids, lp, _tail):  # KL(p̃ ‖ q), p̃ = top-k rescaled to sum 1
        lp_n = lp - torch.logsumexp(lp, dim=1, keepdim=True)
        return (lp_n.exp() * (lp_n - log_q.gather(1, ids))).sum(1)

    def sampled(log_q, ids, lp, _tail):  # mean over draws x ~ p of log p(x) − log q(x)
        return (lp - log_q.gather(1, ids)).mean(1)

    def tail_sampled(log_q, ids, lp, tail):  # exact top-k, then the tail's mass over its draws
        assert tail is not None
        lq = log_q.gather(1, ids)  # (R, k + n): the top-k, then the n tail draws
        top = (lp[:, :k].exp() * (lp[:, :k] - lq[:, :k])).sum(1)
        return top + tail.exp() * (lp[:, k:] - lq[:, k:]).mean(1)

    return {
        "tail": tail_bucket,
        "renormalized": renormalized,
        "sampled": sampled,
        "tail_sampled": tail_sampled,
    }[how]


def _forward_kl_target(
    how: str, k: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The row target t (R, V) with ∂D̂/∂(s/τ) = softmax(s/τ) − t for the forward-KL estimators:

    * tail: t_j = p_j on the teacher's top-k, q_j · p_tail / q_tail outside it (the tail
      bucket's mass spread like the student's own tail);
    * renormalized: the top-k rescaled to sum to 1, 0 elsewhere;
    * sampled: the empirical distribution of the draws (count / n);
    * tail_sampled: p_j on the top-k, p_tail · count / n on the tail's draws.
    """

    def target(log_q, ids, lp, tail):  # (R, V), (R, w), (R, w), (R,) or None
        if how == "tail_sampled":
            assert tail is not None
            t = torch.zeros_like(log_q).scatter_(1, ids[:, :k], lp[:, :k].exp())
            n = ids.shape[1] - k
            w = (tail.exp() / n)[:, None].expand(-1, n)
            return t.scatter_add_(1, ids[:, k:], w.contiguous())
        if how == "sampled":
            t = torch.zeros_like(log_q)
            return t.scatter_add_(1, ids, torch.full_like(lp, 1.0 / lp.shape[1]))
        if how == "renormalized":
            p = (lp - torch.logsumexp(lp, dim=1, keepdim=True)).exp()
            return torch.zeros_like(log_q).scatter_(1, ids, p)
        assert tail is not None
        rest = log_q.scatter(1, ids, _FLOOR)  # the student's log-probs outside the top-k
        lq_tail = torch.logsumexp(rest, dim=1, keepdim=True)
        # q_j · p_tail / q_tail outside the top-k (exp of _FLOOR is 0 on the top-k itself)
        t = (rest - lq_tail + tail[:, None].clamp_min(_FLOOR)).exp()
        return t.scatter_(1, ids, lp.exp())

    return target


def _sparse_rows(s, ids, lp, tl, yc, row_d, closed, a, tau):  # type: ignore[no-untyped-def]
    """One chunk: per-row ce (R,), d (R,) and g (R, V) float32, the gradient of
    Σ (1 − a)·CE + a·τ²·D̂ w.r.t. the logits ``s`` (R, V), zero on masked rows, undivided."""
    valid = yc != IGNORE_INDEX
    y0 = yc.clamp_min(0)[:, None]  # (R, 1)
    if closed is not None:  # forward KL: no autograd graph, the gradient in closed form
        with torch.no_grad():
            xf = s.float()
            log_q1 = F.log_softmax(xf, dim=-1)
            ce = -log_q1.gather(1, y0).squeeze(1)
            log_q = log_q1 if tau == 1.0 else F.log_softmax(xf / tau, dim=-1)
            d = row_d(log_q, ids, lp, tl) * (tau * tau)
            target = closed(log_q, ids, lp, tl)  # (R, V), rows sum to 1
            # (1−a)(softmax(s) − e_y) + a·τ·(softmax(s/τ) − target)
            g = log_q1.exp().mul_(1 - a)
            g.add_(log_q.exp().sub_(target), alpha=a * tau)
            g.scatter_add_(1, y0, torch.full_like(y0, -(1 - a), dtype=g.dtype))
    else:
        with torch.enable_grad():
            x = s.detach().float().requires_grad_(True)
            ce = F.cross_entropy(x, y0.squeeze(1), reduction="none")
            log_q = F.log_softmax(x if tau == 1.0 else x / tau, dim=-1)
            d = row_d(log_q, ids, lp, tl) * (tau * tau)
            combined = ((1 - a) * ce + a * d).masked_fill(~valid, 0.0).sum()
            (g,) = torch.autograd.grad(combined, x)
    ce = ce.detach().masked_fill(~valid, 0.0)
    d = d.detach().masked_fill(~valid, 0.0)
    return ce, d, g.masked_fill_(~valid[:, None], 0.0)


class _SparseLogitLoss(torch.autograd.Function):
    """(1 − a)·CE + a·τ²·D̂, value and student gradient chunk by chunk (as the dense
    `sharp_core.objectives.losses.logit_objective` does), the sparse teacher side read from the cache."""

    @staticmethod
    def forward(ctx, s2, ids, lp, tail, y, row_d, closed, a, tau, denom, chunk):  # type: ignore[override]
        grad = torch.empty_like(s2, memory_format=torch.contiguous_format)
        ce_sum = torch.zeros((), dtype=torch.float32, device=s2.device)
        d_sum = torch.zeros((), dtype=torch.float32, device=s2.device)
        for i in range(0, s2.shape[0], chunk):
            sl = slice(i, i + chunk)
            tl = None if tail is None else tail[sl]
            ce, d, g = _sparse_rows(s2[sl], ids[sl], lp[sl], tl, y[sl], row_d, closed, a, tau)
            ce_sum += ce.sum()
            d_sum += d.sum()
            grad[sl] = g.div_(denom).to(grad.dtype)
        ctx.save_for_backward(grad)
        ce_v, d_v = ce_sum / denom, d_sum / denom
        ctx.mark_non_differentiable(ce_v, d_v)
        return (1 - a) * ce_v + a * d_v, ce_v, d_v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _g_ce, _g_d):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype),) + (None,) * 10


def _sparse_inputs(targets: SparseTargets, estimator: str):  # type: ignore[no-untyped-def]
    """(ids (T, w), logp (T, w) float32, tail (T,) or None, k) of the cached targets."""
    k = targets.ids.shape[-1]
    ids_t, lp_t = targets.ids, targets.logp
    if estimator == "tail_sampled":  # the tail's draws ride after the top-k columns
        if targets.tail_ids is None or targets.tail_logp is None:
            raise ValueError("estimator 'tail_sampled' needs the cache's tail draws")
        ids_t = torch.cat([ids_t, targets.tail_ids], dim=-1)
        lp_t = torch.cat([lp_t, targets.tail_logp], dim=-1)
    w = ids_t.shape[-1]
    tail = None if targets.tail is None else targets.tail.reshape(-1).float()
    return ids_t.reshape(-1, w), lp_t.reshape(-1, w).float(), tail, k


def sparse_linear_objective(
    name: str,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    *,
    estimator: str,
    kd_weight: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int,
    chunk_size: int | None = None,
    vocab: int | None = None,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sparse_logit_objective` on the logits student_hidden·Wᵀ (+ b), chunk by chunk of
    tokens (`sharp_core.objectives.fused.linear_chunked`): no (B, N, V) student logits.
    ``student_softcap``: the head's soft-cap c (logits c·tanh(h·Wᵀ/c), `fused.Head.softcap`).
    The cache's teacher side needs none here: it was built from the teacher's own forward
    logits (`build_cache`), which its model already capped.

    Shapes: ``student_hidden`` (B, N-1, D), ``student_weight`` (V_s, D) sliced to ``vocab``
    (default V_s), ``targets`` and ``labels`` as `sparse_logit_objective`'s. Same value and
    gradients (tests/test_fused_loss.py).
    """
    from sharp_core.objectives import fused

    V = vocab if vocab is not None else student_weight.shape[0]
    ids, lp, tail, k = _sparse_inputs(targets, estimator)
    y = labels.reshape(-1)
    if ids.shape[0] != y.shape[0]:
        raise ValueError(f"cache targets cover {ids.shape[0]} positions, the labels {y.shape[0]}")
    rows = (y != IGNORE_INDEX).nonzero().squeeze(1)  # (R,)
    h = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)  # (R, D)
    ids, lp, yv = ids.index_select(0, rows), lp.index_select(0, rows), y.index_select(0, rows)
    tail = None if tail is None else tail.index_select(0, rows)
    row_d = _row_divergence(estimator, name, alpha, beta, k)
    closed = _forward_kl_target(estimator, k) if name == "forward_kl" else None
    a, tau = float(kd_weight), float(temperature)

    def chunk_fn(s, sl):  # type: ignore[no-untyped-def]
        tl = None if tail is None else tail[sl]
        return _sparse_rows(s, ids[sl], lp[sl], tl, yv[sl], row_d, closed, a, tau)

    ws = student_weight[:V]
    bs = None if student_bias is None else student_bias[:V]
    chunk = chunk_size or fused.default_chunk_tokens(V)
    return fused.linear_chunked(
        h,
        ws,
        bs,
        fused.softcapped(chunk_fn, student_softcap),
        kd_weight=a,
        denom=float(max(num_valid, 1)),
        chunk=chunk,
    )


def sparse_logit_objective(
    name: str,
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    *,
    estimator: str,
    kd_weight: float,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.5,
    num_valid: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, d): (1 − a)·CE + a·τ²·D̂(p_T‖q_S) with the teacher side from the cache.

    Shapes: ``student_logits`` (B, N-1, V), ``targets`` ids/logp (B, N-1, w) and tail
    (B, N-1), ``labels`` (B, N-1). ``estimator``: 'tail' (top-k plus the tail as one bucket,
    any divergence D of `sharp_core.objectives.losses.DIVERGENCES` on the (k+1)-bucket distributions;
    exact at k = V), 'renormalized' (forward KL to the top-k rescaled to sum 1) or 'sampled'
    (RS-KD: mean of log p(x) − log q(x) over the cached draws x ~ p; unbiased for forward
    KL) or 'tail_sampled' (exact top-k, and the tail's mass p_tail spread over the cached
    draws from the tail: p_tail · mean of log p(x) − log q(x); unbiased for forward KL, with
    far less variance than 'sampled'). Normalised by the step's global ``num_valid`` like
    every loss (sharp_core.objectives.losses).
    """
    V = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, V)  # (T, V)
    ids, lp, tail, k = _sparse_inputs(targets, estimator)
    if ids.shape[0] != s2.shape[0]:
        raise ValueError(f"cache targets cover {ids.shape[0]} positions, the logits {s2.shape[0]}")
    y = labels.reshape(-1)
    denom = float(max(num_valid, 1))
    chunk = chunk_size or max(1, (1 << 26) // V)
    row_d = _row_divergence(estimator, name, alpha, beta, k)
    closed = _forward_kl_target(estimator, k) if name == "forward_kl" else None
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss, ce, d = _SparseLogitLoss.apply(
            s2, ids, lp, tail, y, row_d, closed, kd_weight, temperature, denom, chunk
        )
        return loss, ce, d
    with torch.no_grad():
        valid = y != IGNORE_INDEX
        log_q = F.log_softmax(s2.float() / temperature, dim=-1)
        d = row_d(log_q, ids, lp, tail) * temperature**2
        ce = F.cross_entropy(s2.float(), y.clamp_min(0), reduction="none")
        ce_v = ce.masked_fill(~valid, 0.0).sum() / denom
        d_v = d.masked_fill(~valid, 0.0).sum() / denom
    return (1 - kd_weight) * ce_v + kd_weight * d_v, ce_v, d_v


# ----------------------------------------------------------------------- the trainer's hook


def attach(
    S: Any,
    store: CacheStore,
    on_event: Callable[[str, dict[str, Any]], None],
    ranks: Ranks = ONE,
) -> Any:
    """Give the run ``S`` (a `sharp_core.train.setup.Setup`) its teacher cache: read the store's
    cache for this job's key when it verifies, else build it with one teacher pass and commit
    it. A cache under the key whose manifest names another key or other parts is never used:
    it is discarded and rebuilt. Reports ``teacher_cache`` {role: built | read, key, parts,
    size} through ``on_event``. Methods without attention terms then drop the teacher (its
    forward pass is no longer needed, and its memory is freed)."""
    from sharp_core.models.loading import autocast_dtype

    spec = S.spec
    cfg = spec.method.teacher_cache
    if S.teacher is None or S.dataset_sha256 is None:
        raise ValueError("a teacher cache needs a teacher and a packed training set")
    blocks = S.data.train  # (n, N)
    tau = spec.method.temperature
    started = time.perf_counter()
    parts = key_parts(
        cfg,
        teacher=teacher_digest(S.teacher),
        tokenizer=tokenizer_digest(S.tokenizer),
        dataset=S.dataset_sha256,
        blocks=blocks,
        vocab=S.vocab,
        temperature=tau,
    )
    key = cache_key(parts)
    ctx = ranks  # under torchrun: every rank builds its shards, rank 0 commits
    role = "read"
    note = None
    if ctx.rank == 0 and store.exists(key):
        found = read_manifest(store.get(key))
        if found is None or found.get("key") != key or found.get("parts") != parts:
            note = "a cache under this key was for other key parts: discarded and rebuilt"
            store.discard(key)
    build = ctx.broadcast_object(not store.exists(key) if ctx.rank == 0 else None)
    if build:
        role = "built"
        staged: Path | None = None
        try:
            # one staging folder for every rank (torchrun --standalone: one host)
            staged = Path(ctx.broadcast_object(str(store.staging(key)) if ctx.rank == 0 else None))
            build_cache(
                _on_build_device(S.teacher, S.device),
                blocks,
                cfg,
                key=key,
                parts=parts,
                vocab=S.vocab,
                temperature=tau,
                out_dir=staged,
                batch_size=max(1, spec.training.batch_size // ctx.world_size),
                device=S.device,
                amp_dtype=autocast_dtype(spec, S.device),
                shard_bytes=max(1, int(cfg.shard_mb * (1 << 20))),
                ranks=ctx,
                inputs=functools.partial(S.data.inputs, "train", device=S.device),
            )
            if ctx.rank == 0:
                store.put(key, staged)
        except OSError as e:  # a full or read-only store: another try would not fit either
            raise ArtifactWriteError(f"cannot write the teacher cache {key[:16]}…: {e}") from e
        finally:
            if ctx.rank == 0 and staged is not None and staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        ctx.barrier()  # the manifest is committed before any rank opens the cache
    cache = TeacherCache.open(
        store.get(key),
        key=key,
        blocks=int(blocks.shape[0]),
        positions=int(blocks.shape[1]) - 1,
        on_corrupt=lambda: store.discard(key),
    )
    S.teacher_cache = cache
    if ctx.rank == 0:  # used now: the least recently used caches are evicted first
        with contextlib.suppress(OSError):
            os.utime(store.get(key) / MANIFEST)
    if S.teacher_capture is None:
        S.teacher = None  # logit-only method: the cache replaces the teacher entirely
    event = {
        "role": role,
        "key": key,
        "kind": cfg.kind,
        "k": parts["k"],
        "estimator": cfg.loss_estimator,
        "parts": parts,
        "bytes": cache.manifest["bytes"],
        "shards": len(cache.manifest["shards"]),
        "blocks": cache.manifest["blocks"],
        "positions": cache.manifest["positions"],
        "created_at": cache.manifest["created_at"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if note:
        event["note"] = note
    on_event("teacher_cache", event)
    return S


def _on_build_device(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The teacher where the cache is built: the training device. Under torchrun with a
    shardable teacher, `setup` leaves it on the CPU for `Context.prepare` to shard; the build
    needs it whole, so it moves to the GPU here (where it stays: `prepare` shards or keeps it
    from there, and a logit-only method drops it after the build)."""
    p = next(teacher.parameters(), None)
    if p is None or p.device == device:
        return teacher
    if device.type == "cuda":
        need = sum(q.numel() * q.element_size() for q in teacher.parameters())
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:  # refused with the field, not an out-of-memory mid-build
            raise SpecError(
                f"building the teacher cache needs the whole teacher ({need / 2**30:.1f} GiB) "
                f"on one GPU ({free / 2**30:.1f} GiB free); a teacher that only fits sharded "
                "cannot build one yet",
                param="spec.method.teacher_cache.mode",
            )
    return teacher.to(device)


def teacher_backbone(teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher without its LM head: what an attention method runs when the logit term
    comes from the cache (the (B, N, V) head projection is skipped; the captured attention
    is the same)."""
    base = getattr(teacher, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not teacher else teacher
