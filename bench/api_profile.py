"""Where one API request's CPU goes (issue 17): a profile of the real app, in process.

    python -m bench.api_profile [--queued 10000] [--requests 200] [--top 25] [--json]

A fresh database on the Postgres at ``SHARP_BENCH_DATABASE_URL`` (as `bench.api_load`),
pre-filled like ``bench.api_load --queued N`` (N waiting jobs behind one admitted job on one
registered worker). The app is `api.app.create_app` driven by Starlette's ``TestClient``, so
every request runs the real middleware, dependencies, routes, services and SQL; the
client's own share (the test transport) shows up in the profile under ``testclient`` and
``anyio`` and is not the server's cost. Three profiles are taken one after the other:
``GET /v1/jobs/{id}`` of a queued job, ``GET /v1/jobs?limit=20`` and ``POST /v1/jobs``
(which triggers the scheduling pass after its commit, as in production).

The profiler is yappi (``pip install yappi``; a benchmark tool, not a dependency of the
service), on the CPU clock, over every thread. Printed per profile: milliseconds of CPU per request (``time.process_time``) and the
functions with the most cumulative time, by file and name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.api_load import PG_DEFAULT, REDIS_DEFAULT, prefill, spec


@contextlib.contextmanager
def stack(queued: int) -> Iterator[tuple[Any, str, Path]]:
    """(settings, key, corpus) on a fresh database, pre-filled; dropped at the end."""
    import psycopg
    from sqlalchemy.engine import make_url

    from service.admin import create_key, create_team
    from service.db import Database
    from service.migrate import upgrade
    from service.settings import Settings

    admin_url = os.environ.get("SHARP_BENCH_DATABASE_URL", PG_DEFAULT)
    libpq = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"sharp_prof_{secrets.token_hex(5)}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    tmp = Path(tempfile.mkdtemp(prefix="sharp-prof-"))
    try:
        db_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        upgrade(db_url)
        settings = Settings(
            database_url=db_url,
            redis_url=os.environ.get("SHARP_BENCH_REDIS_URL", REDIS_DEFAULT),
            redis_prefix=f"{name}:",
            artifact_root=tmp / "artifacts",
            upload_root=tmp / "uploads",
            dataset_file_roots=[tmp],
        )
        db = Database(settings)
        with db.session() as s:
            team = create_team(s, "prof")
            key = create_key(s, team.name).key
            team_id = team.id
        db.dispose()
        corpus = tmp / "corpus.txt"
        corpus.write_text("hello world\n" * 100)
        if queued:
            prefill(settings, team_id, queued, str(corpus))
        yield settings, key, corpus
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)


def profiled(fn: Any, n: int, top: int) -> dict[str, Any]:
    """Run `fn(i)` n times under yappi (CPU clock, every thread: the app runs in the test
    client's portal thread and sync routes in anyio's worker threads, which cProfile, being
    per-thread, does not see); CPU ms per call and the top functions."""
    import yappi

    fn(-1)  # warm: imports, first connection, statement caches
    yappi.clear_stats()
    yappi.set_clock_type("cpu")
    cpu0, t0 = time.process_time(), time.perf_counter()
    yappi.start(builtins=True, profile_threads=True)
    for i in range(n):
        fn(i)
    yappi.stop()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    rows = [
        (f.ttot, f.tsub, f.ncall, f"{_short(f.module)}:{f.lineno}({f.name})")
        for f in yappi.get_func_stats()
    ]
    yappi.clear_stats()
    rows.sort(key=lambda r: -r[0])
    by_self = sorted(rows, key=lambda r: -r[1])
    return {
        "requests": n,
        "cpu_ms_per_request": round(cpu / n * 1000, 2),
        "wall_ms_per_request": round(wall / n * 1000, 2),
        "cumulative": [
            {"ms_per_request": round(ct / n * 1000, 3), "calls_per_request": nc / n, "fn": name}
            for ct, _tt, nc, name in rows[:top]
        ],
        "self": [
            {"ms_per_request": round(tt / n * 1000, 3), "calls_per_request": nc / n, "fn": name}
            for _ct, tt, nc, name in by_self[:top]
        ],
    }


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    root = str(Path(__file__).resolve().parent.parent) + "/"
    return file.replace(root, "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from fastapi.testclient import TestClient

    from api.app import create_app

    result: dict[str, Any] = {"queued": args.queued}
    with stack(args.queued) as (settings, key, corpus), TestClient(create_app(settings)) as client:
        h = {"Authorization": f"Bearer {key}"}
        job = client.post("/v1/jobs", json={"spec": spec(str(corpus), 0)}, headers=h)
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]

        def get(_: int) -> None:
            r = client.get(f"/v1/jobs/{job_id}", headers=h)
            assert r.status_code == 200 and r.json()["status"] == "queued", r.text

        def list_(_: int) -> None:
            r = client.get("/v1/jobs", params={"limit": 20}, headers=h)
            assert r.status_code == 200, r.text

        def post(i: int) -> None:
            r = client.post("/v1/jobs", json={"spec": spec(str(corpus), i)}, headers=h)
            assert r.status_code == 201, r.text

        result["job_position"] = client.get(f"/v1/jobs/{job_id}", headers=h).json()[
            "queue_position"
        ]
        for name, fn in (("get", get), ("list", list_), ("post", post)):
            result[name] = profiled(fn, args.requests, args.top)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.queued} queued jobs; the profiled job's position: {result['job_position']}")
    for name in ("get", "list", "post"):
        r = result[name]
        print(
            f"\n== {name}: {r['cpu_ms_per_request']} ms CPU / request "
            f"({r['wall_ms_per_request']} ms wall), cumulative:"
        )
        for row in r["cumulative"]:
            print(
                f"  {row['ms_per_request']:9.3f} ms  {row['calls_per_request']:7.1f}x  {row['fn']}"
            )
        print(f"-- {name}, self time:")
        for row in r["self"][:12]:
            print(
                f"  {row['ms_per_request']:9.3f} ms  {row['calls_per_request']:7.1f}x  {row['fn']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
