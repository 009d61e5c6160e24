"""Cursor paging over 10 000 jobs while new jobs keep arriving (issue 4, item 9).

The list is newest first with a keyset cursor (ids are ULIDs). A job created while a client
pages is newer than every cursor already handed out, so it must never shift the pages:
every job that existed when paging began is returned exactly once, and nothing twice.
Per-page times are printed (``-s``), not asserted: a timed assertion on a shared CI machine
measures the neighbours.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from service.db import Database
from service.ids import new_id
from service.models import Job, utcnow
from tests.conftest import TeamKey, tiny_spec

pytestmark = [pytest.mark.service, pytest.mark.slow]

N = 10_000


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("paging")


@pytest.fixture(scope="module")
def existing(db: Database, team: TeamKey, corpus: Path) -> list[str]:
    """N queued jobs, bulk-inserted (the API would take minutes to create them one by one)."""
    spec = tiny_spec(corpus)
    now = utcnow()
    rows = [
        {
            "id": new_id("job"),
            "team_id": team.team_id,
            "name": f"bulk-{i}",
            "spec": spec,
            "queue": "default",
            "status": "queued",
            "attempt": 0,
            "max_attempts": 3,
            "cancel_requested": False,
            "step": 0,
            "max_steps": 20,
            "latest_metrics": {},
            "event_seq": 0,
            "created_at": now,
            "enqueued_at": now,
            "updated_at": now,
        }
        for i in range(N)
    ]
    with db.session() as s:
        for i in range(0, N, 2000):
            s.execute(insert(Job), rows[i : i + 2000])
    return [r["id"] for r in rows]


@pytest.fixture(scope="module")
def http(live_server: str, team: TeamKey) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, headers=team.headers, timeout=30) as c:
        yield c


def test_cursor_paging_returns_every_job_once_while_inserts_go_on(
    http: httpx.Client, live_server: str, team: TeamKey, existing: list[str], corpus: Path
) -> None:
    stop = threading.Event()
    created: list[str] = []
    failures: list[str] = []

    def insert_jobs() -> None:
        with httpx.Client(base_url=live_server, headers=team.headers, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                r = c.post("/v1/jobs", json={"spec": tiny_spec(corpus, name=f"live-{i}")})
                if r.status_code != 201:
                    failures.append(r.text)
                else:
                    created.append(r.json()["id"])

    writer = threading.Thread(target=insert_jobs, daemon=True)
    writer.start()
    while not created:  # paging starts once inserts are under way
        time.sleep(0.01)
    seen: list[str] = []
    times: list[float] = []
    cursor = None
    try:
        while True:
            params: dict[str, str | int] = {"limit": 100}
            if cursor:
                params["after"] = cursor
            t0 = time.perf_counter()
            r = http.get("/v1/jobs", params=params)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            page = r.json()
            seen += [j["id"] for j in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
    finally:
        stop.set()
        writer.join(30)

    assert failures == []
    assert len(seen) == len(set(seen)), "a job was returned twice"
    assert set(existing) <= set(seen), f"{len(set(existing) - set(seen))} jobs never returned"
    assert set(seen) <= set(existing) | set(created)
    assert seen == sorted(seen, reverse=True)  # newest first, one consistent order
    assert len(created) > 0
    print(
        f"\n{len(times)} pages of 100 over {len(existing)} jobs, {len(created)} inserted meanwhile;"
        f" per page median {statistics.median(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms, first {times[0] * 1000:.1f} ms,"
        f" last {times[-1] * 1000:.1f} ms"
    )
