"""Operator functions: teams, their scheduler quotas, API keys, registered workers (exposed
as ``sharp admin …`` in `ops.cli`).

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
from service.models import ApiKey, Team, Worker, utcnow
from service.repositories import ApiKeyRepository, TeamRepository, WorkerRepository
from service.security import hash_key

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


def list_workers(session: Session) -> Sequence[Worker]:
    return WorkerRepository(session).list()


def list_keys(session: Session, team: str | None = None) -> list[tuple[ApiKey, Team]]:
    teams = {t.id: t for t in TeamRepository(session).list()}
    team_id = _team(session, team).id if team else None
    return [(k, teams[k.team_id]) for k in ApiKeyRepository(session).list(team_id)]
