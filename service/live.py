"""The live side of job events: a Redis Stream per job.

Postgres holds every event (`JobEvent`) and is what SSE replays from; the stream exists to
wake listeners promptly and to give any other consumer (a dashboard, `redis-cli XREAD`) the
live feed. Publishing is best effort — Redis being down delays SSE clients by one poll
interval and never fails a job — which is why the SSE loop also polls the database.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

from service.settings import Settings

log = logging.getLogger(__name__)

STREAM_MAXLEN = 2000
STREAM_TTL_S = 7 * 24 * 3600


def stream_key(settings: Settings, job_id: str) -> str:
    return f"{settings.redis_prefix}job:{job_id}:events"


class LivePublisher:
    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.client = client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )

    def publish(self, job_id: str, seq: int, kind: str, data: dict[str, Any]) -> None:
        key = stream_key(self.settings, job_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(
                key,
                {"seq": seq, "kind": kind, "data": json.dumps(data)},
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            pipe.expire(key, STREAM_TTL_S)
            pipe.execute()
        except redis.RedisError as e:
            log.warning("live publish for %s failed: %s", job_id, e)

    def close(self) -> None:
        self.client.close()
