"""Load on the job API (issues 4 and 5): many clients creating, listing and reading jobs.

    python -m bench.api_load [--clients 32] [--duration 20] [--uvicorn-workers 4]
                             [--url http://host:port --key sharp_…] [--json]

Each client loops ``POST /v1/jobs`` → ``GET /v1/jobs/{id}`` → ``GET /v1/jobs?limit=20`` over
its own keep-alive connection for ``--duration`` seconds. Printed: requests per second,
p50/p99 per operation, the error count (any non-2xx, timeout or connection error), and the
live-feed latency: the time from a metric batch being written the way a worker writes it
(`worker.child.Reporter`: a fenced UPDATE, the metric rows and the event, one commit, then
the Redis publish) to its arrival at an SSE client of ``GET /v1/jobs/{id}/events``, measured
while the load runs.

Without ``--url`` it starts the production configuration on loopback: a fresh database on
the Postgres at ``SHARP_BENCH_DATABASE_URL`` (default the test server,
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), the Redis at ``SHARP_BENCH_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``) under a key prefix of its own, and ``uvicorn
--workers N``; everything it made is dropped at the end. No Celery worker runs: the jobs stay
``queued``, which is what the API's load is about. With ``--url`` it needs ``--key`` and
skips the live-feed latency unless the database is reachable through ``SHARP_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"


def spec(corpus: str, i: int) -> dict[str, Any]:
    return {
        "name": f"load-{i}",
        "student": {
            "init": "config",
            "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32},
        },
        "tokenizer": {"train": {"vocab_size": 300}},
        "dataset": {"source": "files", "files": [corpus]},
        "method": {"name": "sft"},
        "training": {"max_steps": 10, "batch_size": 4, "seq_len": 32},
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {"create": [], "get": [], "list": []}
    )
    errors: list[str] = field(default_factory=list)


async def client_loop(base: str, key: str, corpus: str, deadline: float, stats: Stats) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as http:

        async def timed(op: str, method: str, url: str, **kw: Any) -> httpx.Response | None:
            t0 = time.perf_counter()
            try:
                r = await http.request(method, url, **kw)
            except httpx.HTTPError as e:
                stats.errors.append(f"{op}: {type(e).__name__}: {e}")
                return None
            stats.latencies[op].append(time.perf_counter() - t0)
            if r.status_code >= 300:
                stats.errors.append(f"{op}: HTTP {r.status_code} {r.text[:200]}")
                return None
            return r

        i = 0
        while time.monotonic() < deadline:
            i += 1
            created = await timed("create", "POST", "/v1/jobs", json={"spec": spec(corpus, i)})
            if created is None:
                continue
            job_id = created.json()["id"]
            got = await timed("get", "GET", f"/v1/jobs/{job_id}")
            if got is not None and got.json()["id"] != job_id:
                stats.errors.append(f"get: wrong job {got.json()['id']} for {job_id}")
            await timed("list", "GET", "/v1/jobs", params={"limit": 20})


# ----------------------------------------------------------------------------- live feed
def live_latency(base: str, key: str, settings: Any, corpus: str, stop: threading.Event) -> list:
    """Write metric batches as a worker does and time their arrival over SSE (seconds)."""
    from httpx_sse import connect_sse

    from api.db import Database
    from api.live import LivePublisher
    from worker.child import Reporter
    from worker.supervisor import Supervisor

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        job_id = http.post("/v1/jobs", json={"spec": spec(corpus, -1)}).json()["id"]
    db = Database(settings)
    live = LivePublisher(settings)
    written: dict[int, float] = {}
    arrived: dict[int, float] = {}
    try:
        from api.models import utcnow
        from api.repositories import JobRepository

        with db.session() as s:  # admitted, as a scheduling pass would admit it for a worker
            JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
        claim = Supervisor(settings, db, live, lambda *_: None, worker_name="bench").claim(job_id)
        assert claim is not None
        with db.session() as s:
            from api.models import Job

            job = s.get(Job, job_id)
        reporter = Reporter(settings, db, live, job, claim.attempt)
        ready = threading.Event()

        def listen() -> None:
            with (
                httpx.Client(
                    base_url=base, headers=headers, timeout=httpx.Timeout(30, read=60)
                ) as c,
                connect_sse(c, "GET", f"/v1/jobs/{job_id}/events") as source,
            ):
                ready.set()
                for ev in source.iter_sse():
                    if ev.event == "metrics":
                        now = time.perf_counter()
                        for m in json.loads(ev.data)["metrics"]:
                            arrived.setdefault(m["step"], now)
                    if ev.event == "status" and json.loads(ev.data)["status"] == "cancelled":
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        ready.wait(30)
        step = 0
        while not stop.is_set():
            step += 1
            reporter.add_metrics(step, {"loss": 1.0 / step})
            written[step] = time.perf_counter()
            reporter.flush()
            stop.wait(0.2)
        # end the stream: a terminal status
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            http.post(f"/v1/jobs/{job_id}/cancel")
        from worker.supervisor import Claim, Watch

        Supervisor(settings, db, live, lambda *_: None)._finish(
            Claim(job_id, claim.team_id, claim.queue, claim.attempt),
            Watch(exit_code=0),
            {"status": "stopped", "step": step},
        )
        listener.join(30)
    finally:
        live.close()
        db.dispose()
    return [arrived[s] - written[s] for s in written if s in arrived] + [
        float("inf") for s in written if s not in arrived
    ]


# ----------------------------------------------------------------------------- the stack
@contextlib.contextmanager
def production_stack(uvicorn_workers: int) -> Iterator[tuple[str, str, Any]]:
    """Fresh database + Redis prefix + ``uvicorn --workers N``; yields (url, key, settings)."""
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    from api.admin import create_key, create_team
    from api.db import Database
    from api.migrate import upgrade
    from api.settings import Settings
    from worker.launcher import api_command, settings_env

    admin_url = os.environ.get("SHARP_BENCH_DATABASE_URL", PG_DEFAULT)
    redis_url = os.environ.get("SHARP_BENCH_REDIS_URL", REDIS_DEFAULT)
    libpq = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"sharp_bench_{secrets.token_hex(5)}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    tmp = Path(tempfile.mkdtemp(prefix="sharp-bench-"))
    prefix = f"{name}:"
    proc = None
    try:
        upgrade(db_url)
        settings = Settings(
            database_url=db_url,
            redis_url=redis_url,
            redis_prefix=prefix,
            artifact_root=tmp / "artifacts",
            upload_root=tmp / "uploads",
            # `measure` writes its corpus under the system temp directory.
            dataset_file_roots=[Path(tempfile.gettempdir())],
        )
        db = Database(settings)
        with db.session() as s:
            team = create_team(s, "bench")
            key = create_key(s, team.name).key
        db.dispose()
        port = free_port()
        log = (tmp / "uvicorn.log").open("wb")
        proc = subprocess.Popen(
            api_command("127.0.0.1", port, workers=uvicorn_workers, extra_args=["--no-access-log"]),
            cwd=ROOT,
            env={**os.environ, **settings_env(settings)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "uvicorn.log").read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.2)
        yield base, key, settings
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)
        r.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- main
async def run_load(base: str, key: str, corpus: str, clients: int, duration: float) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + duration
    await asyncio.gather(*(client_loop(base, key, corpus, deadline, stats) for _ in range(clients)))
    return stats


def measure(
    base: str,
    key: str,
    settings: Any,
    clients: int,
    duration: float,
    corpus_dir: Path | None = None,
) -> dict[str, Any]:
    """`corpus_dir`: where the jobs' corpus is written; it must lie under one of the server's
    ``SHARP_DATASET_FILE_ROOTS`` (default: a new folder in the system temp directory)."""
    corpus = Path(tempfile.mkdtemp(prefix="sharp-bench-corpus-", dir=corpus_dir)) / "corpus.txt"
    corpus.write_text("hello world\n" * 100)
    stop = threading.Event()
    feed: list[float] = []
    feed_errors: list[str] = []
    feeder = None
    if settings is not None:

        def feed_loop() -> None:
            try:
                feed.extend(live_latency(base, key, settings, str(corpus), stop))
            except Exception as e:  # noqa: BLE001 - reported as an error of the run
                feed_errors.append(f"live feed: {type(e).__name__}: {e}")

        feeder = threading.Thread(target=feed_loop, daemon=True)
        feeder.start()
    t0 = time.perf_counter()
    stats = asyncio.run(run_load(base, key, str(corpus), clients, duration))
    elapsed = time.perf_counter() - t0
    stop.set()
    if feeder is not None:
        feeder.join(60)
    stats.errors += feed_errors
    n = sum(len(v) for v in stats.latencies.values())
    out: dict[str, Any] = {
        "clients": clients,
        "duration_s": round(elapsed, 2),
        "requests": n,
        "requests_per_s": round(n / elapsed, 1),
        "errors": len(stats.errors),
        "error_samples": stats.errors[:5],
    }
    for op, values in stats.latencies.items():
        out[op] = {
            "count": len(values),
            "p50_ms": round(pct(values, 50) * 1000, 2),
            "p99_ms": round(pct(values, 99) * 1000, 2),
        }
    if feed:
        finite = [v for v in feed if v != float("inf")]
        out["sse"] = {
            "batches": len(feed),
            "lost": len(feed) - len(finite),
            "median_ms": round(statistics.median(finite) * 1000, 2) if finite else None,
            "p99_ms": round(pct(finite, 99) * 1000, 2) if finite else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--uvicorn-workers", type=int, default=4)
    ap.add_argument("--url", help="an API already running (needs --key)")
    ap.add_argument("--key", help="an API key for --url")
    ap.add_argument(
        "--corpus-dir",
        type=Path,
        help="with --url: a folder under the server's SHARP_DATASET_FILE_ROOTS for the "
        "jobs' corpus (e.g. var/data for `sharp up`)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.url:
        if not args.key:
            ap.error("--url needs --key")
        settings = None
        if os.environ.get("SHARP_DATABASE_URL"):
            from api.settings import Settings

            settings = Settings()
        result = measure(args.url, args.key, settings, args.clients, args.duration, args.corpus_dir)
        result["stack"] = {"url": args.url}
    else:
        with production_stack(args.uvicorn_workers) as (base, key, settings):
            result = measure(base, key, settings, args.clients, args.duration)
            if result["errors"]:  # the server's side of the story, before its folder goes
                server_log = Path(settings.artifact_root).parent / "uvicorn.log"
                result["server_log_tail"] = server_log.read_text(errors="replace")[-3000:]
        result["stack"] = {
            "uvicorn_workers": args.uvicorn_workers,
            "database": "postgres",
            "broker": "redis",
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['clients']} clients, {result['duration_s']} s: {result['requests']} "
            f"requests, {result['requests_per_s']} req/s, {result['errors']} errors"
        )
        for op in ("create", "get", "list"):
            r = result[op]
            print(
                f"  {op:7s} n={r['count']:6d}  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms"
            )
        if "sse" in result:
            s = result["sse"]
            print(
                f"  metric write -> SSE client: {s['batches']} batches, {s['lost']} lost, "
                f"median {s['median_ms']} ms, p99 {s['p99_ms']} ms"
            )
        for e in result["error_samples"]:
            print(f"  error: {e}")
        if result.get("server_log_tail"):
            print("  server log (tail):\n" + result["server_log_tail"])
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
