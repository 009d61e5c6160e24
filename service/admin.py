"""Operator functions: teams, their scheduler quotas, API keys, registered workers, the
artifact store's usage and pruning (exposed as ``sharp admin …`` in `ops.cli`).

Keys are ``sharp_`` + 32 random bytes (base64url). Only the sha256 is stored; the first
characters (``prefix``) are kept in clear so a human can tell keys apart in a list and revoke
one without ever seeing it again. The full key is returned once, at creation.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.errors import InvalidRequestError, NotFoundError
from service.ids import new_id
from service.lifecycle import ACTIVE_STATUSES
from service.models import ApiKey, Team, Worker, utcnow
from service.repositories import (
    ApiKeyRepository,
    CheckpointRepository,
    JobRepository,
    TeamRepository,
    WorkerRepository,
)
from service.security import hash_key
from service.store import UPLOADS, ArtifactStore, delete_checkpoint, store_walk
from sharp_core.errors import SharpError
from sharp_core.spec import parse_spec
from sharp_core.train.checkpoint import MANIFEST, STEP_RE, retained_steps

KEY_PREFIX = "sharp_"
VISIBLE_CHARS = 14  # "sharp_" + 8 characters of the random part


@dataclass
class NewKey:
    key: str  # shown once
    prefix: str
    team: str


def create_team(session: Session, name: str) -> Team:
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequestError("a team name has 1 to 100 characters", param="name")
    repo = TeamRepository(session)
    if repo.get_by_name(name) is not None:
        raise InvalidRequestError(f"team '{name}' exists", param="name", code="team_exists")
    return repo.add(Team(id=new_id("team"), name=name, created_at=utcnow()))


def _team(session: Session, team: str) -> Team:
    repo = TeamRepository(session)
    found = repo.get_by_name(team) or repo.get(team)
    if found is None:
        raise NotFoundError(f"no team '{team}'", param="team")
    return found


def find_team(session: Session, team: str) -> Team:
    """A team by name or id; NotFoundError (param 'team') if neither."""
    return _team(session, team)


def create_key(session: Session, team: str, name: str | None = None) -> NewKey:
    """A new key for `team` (name or id). The returned `NewKey.key` is not stored anywhere."""
    t = _team(session, team)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    prefix = key[:VISIBLE_CHARS]
    ApiKeyRepository(session).add(
        ApiKey(team_id=t.id, prefix=prefix, key_hash=hash_key(key), name=name, created_at=utcnow())
    )
    return NewKey(key=key, prefix=prefix, team=t.name)


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Idempotent: revoking a revoked key keeps its first revocation time."""
    key = ApiKeyRepository(session).get_by_prefix(prefix)
    if key is None:
        raise NotFoundError(f"no key with prefix '{prefix}'", param="prefix")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def list_teams(session: Session) -> Sequence[Team]:
    return TeamRepository(session).list()


#: "Leave this quota as it is" (None means "no limit").
UNCHANGED = object()


def set_quota(
    session: Session,
    team: str,
    *,
    max_running_gpus: int | None | object = UNCHANGED,
    max_queued_jobs: int | None | object = UNCHANGED,
    weight: float | None = None,
) -> Team:
    """Change a team's scheduler limits (None: no limit) or fair-share weight.

    Takes effect at the next scheduling pass: lowering a GPU quota never stops running jobs,
    it only holds back admissions until the team is under it again.
    """
    t = _team(session, team)
    for field, value in (
        ("max_running_gpus", max_running_gpus),
        ("max_queued_jobs", max_queued_jobs),
    ):
        if value is UNCHANGED:
            continue
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidRequestError(f"{field} must be a whole number >= 0", param=field)
        setattr(t, field, value)
    if weight is not None:
        if not weight > 0 or weight > 1e6:
            raise InvalidRequestError("weight must be > 0 (1 is an equal share)", param="weight")
        t.weight = float(weight)
    session.flush()
    return t


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({f"{u}i": 1024 ** (i + 1) for i, u in enumerate("kmgt")})


def parse_bytes(value: str, param: str = "bytes") -> int | None:
    """``50G``, ``500GB``, ``1.5TiB``, ``1000000`` → bytes; ``none`` → None. Decimal units
    (G = 10⁹) unless written binary (GiB = 2³⁰)."""
    v = value.strip().lower().replace(" ", "")
    if v in ("none", "default"):
        return None
    num = v.rstrip("kmgtib")
    unit = v[len(num) :].removesuffix("b")
    try:
        n = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise InvalidRequestError(
            f"a size in bytes (e.g. 500GB, 1TiB, 1000000) or 'none', not {value!r}", param=param
        ) from None
    if not n >= 0 or n > 2**63 - 1:
        raise InvalidRequestError(f"{value!r} is not a size >= 0", param=param)
    return int(n)


def set_cache_budget(session: Session, team: str, budget: int | None) -> Team:
    """TEAM's cache budget in bytes (None: the deployment's default, SHARP_CACHE_BUDGET_BYTES).
    Applied at the next eviction: after the team's next job, or ``storage caches --evict``."""
    t = _team(session, team)
    if budget is not None and budget < 0:
        raise InvalidRequestError("a cache budget is a number of bytes >= 0", param="bytes")
    t.cache_budget_bytes = budget
    session.flush()
    return t


def list_workers(session: Session) -> Sequence[Worker]:
    return WorkerRepository(session).list()


def describe_backend(worker: Worker) -> str:
    """What a worker's backend offers, for ``sharp admin workers list``: "local", or a Slurm
    pool's partition, node count and each node with its state (as sinfo last said)."""
    if worker.backend == "local":
        return "local"
    info = worker.backend_info or {}
    part = info.get("partition") or "default partition"
    if not info.get("partition_exists", True):
        return f"{worker.backend}: partition '{part}' does not exist"
    nodes = ", ".join(f"{n.get('name')} {n.get('state')}" for n in info.get("nodes") or [])
    per_node = f"{worker.gpus_per_node} GPUs" if worker.gpus_per_node else "CPU"
    return f"{worker.backend}: {part}, {worker.max_nodes} nodes × {per_node} ({nodes})"


def list_keys(session: Session, team: str | None = None) -> list[tuple[ApiKey, Team]]:
    teams = {t.id: t for t in TeamRepository(session).list()}
    team_id = _team(session, team).id if team else None
    return [(k, teams[k.team_id]) for k in ApiKeyRepository(session).list(team_id)]


# -- artifact storage -----------------------------------------------------------------------
@dataclass
class JobUsage:
    """One job's share of the artifact store (``group`` is ``team/job``, or ``uploads``)."""

    group: str
    team: str | None
    job_id: str | None
    status: str | None
    checkpoints: list[int]  # complete (manifest) step folders in the store
    objects: int
    bytes: int
    orphan_bytes: int  # step folders without a manifest or a database row: freeable


@dataclass
class PruneReport:
    deleted: list[tuple[str, int]]  # (job id, step) of checkpoints removed by retention
    orphans: list[str]  # keys of step folders removed as half-written or forgotten
    freed_bytes: int
    skipped_active: list[str]  # jobs left alone because a worker may be writing them


def _step_of(folder: str) -> int | None:
    m = STEP_RE.match(folder)
    return int(m.group(1)) if m else None


def _groups(store: ArtifactStore) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for key, size in store_walk(store):
        parts = key.split("/")
        group = "/".join(parts[:1] if parts[0] == UPLOADS else parts[:2])
        out.setdefault(group, []).append((key, size))
    return out


def storage_usage(session: Session, store: ArtifactStore) -> list[JobUsage]:
    """What the store holds, per job, largest first: the operator's ``sharp admin storage``."""
    teams = {t.id: t.name for t in TeamRepository(session).list()}
    rows = []
    for group, objects in _groups(store).items():
        parts = group.split("/")
        job = JobRepository(session).get(parts[1]) if len(parts) == 2 else None
        recorded = {c.step for c in CheckpointRepository(session).list(job.id)} if job else set()
        folders: dict[str, list[tuple[str, int]]] = {}
        for key, size in objects:
            rest = key[len(group) + 1 :].split("/")
            if len(rest) > 1:
                folders.setdefault(rest[0], []).append((rest[1], size))
        complete, orphan = [], 0
        for folder, files in folders.items():
            step = _step_of(folder)
            has_manifest = any(name == MANIFEST for name, _ in files)
            if step is not None and has_manifest and step in recorded:
                complete.append(step)
            elif (step is not None or folder.startswith(".tmp-step_")) and (
                job is None or job.status not in ACTIVE_STATUSES
            ):
                orphan += sum(size for _, size in files)
        rows.append(
            JobUsage(
                group=group,
                team=teams.get(parts[0]) if job else None,
                job_id=job.id if job else None,
                status=job.status if job else None,
                checkpoints=sorted(complete),
                objects=len(objects),
                bytes=sum(size for _, size in objects),
                orphan_bytes=orphan,
            )
        )
    return sorted(rows, key=lambda r: -r.bytes)


def prune_storage(
    session: Session, store: ArtifactStore, *, keep: int | None = None, dry_run: bool = False
) -> PruneReport:
    """Free space: for every job no worker is running, keep its newest checkpoints (`keep`,
    default its spec's ``keep_checkpoints``) and its best by eval, and delete the rest, plus
    step folders no reader would ever list (no manifest, or no database row)."""
    report = PruneReport(deleted=[], orphans=[], freed_bytes=0, skipped_active=[])
    for group, objects in _groups(store).items():
        parts = group.split("/")
        if len(parts) != 2:
            continue
        job = JobRepository(session).get(parts[1])
        if job is not None and job.status in ACTIVE_STATUSES:
            report.skipped_active.append(job.id)
            continue
        ckpts = CheckpointRepository(session).list(job.id) if job else []
        by_step = {c.step: c for c in ckpts}
        if job is not None and ckpts:
            n = keep
            if n is None:
                try:
                    n = parse_spec(job.spec).training.keep_checkpoints
                except SharpError:
                    n = len(ckpts)
            kept = retained_steps([(c.step, dict(c.metrics or {})) for c in ckpts], n)
            for c in ckpts:
                if c.step in kept:
                    continue
                ckey = store.key_of(c.path)
                size = sum(s for k, s in objects if ckey and k.startswith(f"{ckey}/"))
                report.deleted.append((job.id, c.step))
                report.freed_bytes += size
                if not dry_run:
                    CheckpointRepository(session).delete(job.id, c.step)
                    if ckey:
                        delete_checkpoint(store, ckey)
        folders: dict[str, int] = {}
        for key, size in objects:
            rest = key[len(group) + 1 :].split("/")
            if len(rest) > 1:
                folders[rest[0]] = folders.get(rest[0], 0) + size
        for folder, size in sorted(folders.items()):
            step = _step_of(folder)
            orphan = folder.startswith(".tmp-step_") or (
                step is not None
                and step not in by_step
                and not any(d == (parts[1], step) for d in report.deleted)
            )
            if not orphan:
                continue
            report.orphans.append(f"{group}/{folder}")
            report.freed_bytes += size
            if not dry_run:
                delete_checkpoint(store, f"{group}/{folder}")
    session.flush()
    return report
