"""Server-Sent Events for one job, replayed from the database and woken by Redis.

Why the database and not Redis is read: a client reconnecting with ``Last-Event-ID: n``
must get exactly the events after ``n``, however long it was away; `JobEvent` rows are
permanent and their ``seq`` is dense and commit-ordered. The per-job Redis Stream only tells
the loop "something new was committed" so it can re-query at once instead of waiting for
the next poll; if Redis is down the loop degrades to polling, it never misses an event.

The race between "read the database" and "start waiting" is closed by remembering the
stream's last entry id *before* the query and blocking on entries after it: anything
published after our query is newer than that id and wakes us.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from service.db import Database
from service.lifecycle import TERMINAL_STATUSES
from service.live import stream_key
from service.repositories import EventRepository, JobRepository
from service.settings import Settings

log = logging.getLogger(__name__)

BATCH = 500
POLL_S = 2.0  # database poll when no wake-up arrives (lost publish, Redis down)


def _load(db: Database, job_id: str, after: int) -> tuple[list[dict[str, Any]], str, int]:
    with db.session() as s:
        events = EventRepository(s).list_after(job_id, after, BATCH)
        job = JobRepository(s).get(job_id)
        assert job is not None
        rows = [
            {"seq": e.seq, "kind": e.kind, "data": e.data, "created_at": e.created_at.isoformat()}
            for e in events
        ]
        return rows, job.status, job.event_seq


async def _tail_id(client: aioredis.Redis | None, key: str) -> str | None:
    if client is None:
        return None
    try:
        last = await client.xrevrange(key, count=1)
    except (RedisError, OSError) as e:
        log.debug("redis tail failed: %s", e)
        return None
    if not last:
        return "0-0"
    entry_id = last[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


async def _wait(client: aioredis.Redis | None, key: str, marker: str | None) -> None:
    if client is None or marker is None:
        await anyio.sleep(POLL_S)
        return
    try:
        await client.xread({key: marker}, count=1, block=int(POLL_S * 1000))
    except (RedisError, OSError) as e:
        log.debug("redis wait failed: %s", e)
        await anyio.sleep(POLL_S)


async def job_events(
    settings: Settings,
    db: Database,
    client: aioredis.Redis | None,
    job_id: str,
    after: int,
    follow: bool = True,
) -> AsyncIterator[ServerSentEvent]:
    """Yield the job's events after seq `after`; end once a terminal state has been sent
    (or, with ``follow=False``, once caught up)."""
    key = stream_key(settings, job_id)
    last = after
    while True:
        marker = await _tail_id(client, key)
        rows, status, newest = await anyio.to_thread.run_sync(_load, db, job_id, last)
        for row in rows:
            payload = {"seq": row["seq"], "created_at": row["created_at"], **row["data"]}
            yield ServerSentEvent(
                data=json.dumps(payload, separators=(",", ":")),
                event=row["kind"],
                id=str(row["seq"]),
            )
            last = row["seq"]
        if len(rows) == BATCH:
            continue
        if (status in TERMINAL_STATUSES or not follow) and last >= newest:
            return
        await _wait(client, key, marker)
