"""Load on the job API (issues 4 and 5): many clients creating, listing and reading jobs.

    python -m bench.api_load [--clients 32] [--duration 20] [--uvicorn-workers 4]
                             [--queued 10000] [--no-pin] [--server-root DIR]
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

Issue 17 additions:

- ``--queued N`` pre-fills the queue with N waiting jobs of the bench team in pool
  ``default`` before the load starts, and registers one worker there whose slot is held by
  one admitted job, so every waiting job has a real position (1 … N) that each read reports.
- The load generator runs pinned to its own core (``sched_setaffinity``, what ``taskset``
  does) and the API server to the others, when the machine has at least two; ``--no-pin``
  turns that off. Postgres is not started here and is not pinned. The JSON reports the CPU
  seconds of the client process and of the uvicorn processes over the load, as shares of the
  wall time (1.0 = one core busy), so the server's cost per request is read separately from
  the client's.
- ``--server-root DIR`` runs the API from another checkout (e.g. ``git worktree add
  /tmp/sharp-main main``) against the same database schema, client and pre-fill: an old
  against new comparison on one machine in one sitting.
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
    placed: int = 0  # GETs of a created job that returned its queue position


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
            elif got is not None and got.json()["queue_position"] is not None:
                stats.placed += 1
            await timed("list", "GET", "/v1/jobs", params={"limit": 20})


# ----------------------------------------------------------------------------- live feed
def live_latency(
    base: str,
    key: str,
    settings: Any,
    corpus: str,
    stop: threading.Event,
    listening: threading.Event | None = None,
) -> list:
    """Write metric batches as a worker does and time their arrival over SSE (seconds).
    ``listening`` is set once the stream is open, so the load can wait for it (the first
    submission of a fresh API process may still be importing the job plan's libraries)."""
    from httpx_sse import connect_sse

    from service.db import Database
    from service.live import LivePublisher
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
        from service.models import utcnow
        from service.repositories import JobRepository

        with db.session() as s:  # admitted, as a scheduling pass would admit it for a worker
            JobRepository(s).update_fenced(job_id, values={"admitted_at": utcnow()})
        claim = Supervisor(settings, db, live, lambda *_: None, worker_name="bench").claim(job_id)
        assert claim is not None
        with db.session() as s:
            from service.models import Job

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
        if listening is not None:
            listening.set()
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
def cpu_split() -> tuple[set[int], set[int]] | None:
    """(client cores, server cores) when this process may use two or more cores, else None."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {cores[-1]}, set(cores[:-1])


def prefill(settings: Any, team_id: str, n: int, corpus: str) -> None:
    """`n` waiting jobs of `team_id` in pool ``default``, behind one admitted job that holds
    the slot of one registered worker (`keep_worker_alive` keeps its heartbeat fresh)."""
    from service import scheduler
    from service.db import Database
    from service.ids import new_id
    from service.models import utcnow
    from service.repositories import JobRepository

    now = utcnow()
    body = spec(corpus, 0)

    def row(i: int, admitted: bool) -> dict[str, Any]:
        return {
            "id": new_id("job"),
            "team_id": team_id,
            "name": f"queued-{i}",
            "spec": body,
            "queue": "default",
            "gpus": 1,
            "priority": 0,
            "status": "queued",
            "attempt": 0,
            "max_attempts": 3,
            "cancel_requested": False,
            "step": 0,
            "max_steps": 10,
            "latest_metrics": {},
            "event_seq": 0,
            "created_at": now,
            "enqueued_at": now,
            "updated_at": now,
            "admitted_at": now if admitted else None,
        }

    db = Database(settings)
    try:
        with db.session() as s:
            scheduler.register_worker(
                s, name="bench-slot", pool="default", gpus=1, hostname="bench"
            )
            JobRepository(s).insert_many([row(0, True)] + [row(i + 1, False) for i in range(n)])
        with db.session() as s:  # what a scheduling pass makes of the new queue
            scheduler.admit(s, None, heartbeat_timeout_s=settings.heartbeat_timeout_s)
    finally:
        db.dispose()


@contextlib.contextmanager
def keep_worker_alive(settings: Any) -> Iterator[None]:
    """Refresh the pre-fill's worker heartbeat while the load runs (its slot stays live)."""
    from service import scheduler
    from service.db import Database

    db = Database(settings)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(min(10.0, settings.heartbeat_timeout_s / 3)):
            with db.session() as s:
                scheduler.register_worker(
                    s, name="bench-slot", pool="default", gpus=1, hostname="bench"
                )

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(30)
        db.dispose()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class Stack:
    base: str
    key: str
    settings: Any
    team_id: str
    server_pid: int | None = None


@contextlib.contextmanager
def production_stack(
    uvicorn_workers: int,
    *,
    server_cores: set[int] | None = None,
    server_root: Path | None = None,
) -> Iterator[Stack]:
    """Fresh database + Redis prefix + ``uvicorn --workers N`` (from `server_root` if given,
    pinned to `server_cores` if given); yields the `Stack`."""
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    from ops.launcher import api_command
    from service.admin import create_key, create_team
    from service.db import Database
    from service.migrate import upgrade
    from service.settings import Settings, settings_env

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
            team_id = team.id
        db.dispose()
        port = free_port()
        log = (tmp / "uvicorn.log").open("wb")
        env = {**os.environ, **settings_env(settings)}
        if server_root is not None:
            env["PYTHONPATH"] = str(server_root)
        proc = subprocess.Popen(
            api_command("127.0.0.1", port, workers=uvicorn_workers, extra_args=["--no-access-log"]),
            cwd=server_root or ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, server_cores)) if server_cores else None,
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
        yield Stack(base, key, settings, team_id, proc.pid)
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
    server_pid: int | None = None,
) -> dict[str, Any]:
    """`corpus_dir`: where the jobs' corpus is written; it must lie under one of the server's
    ``SHARP_DATASET_FILE_ROOTS`` (default: a new folder in the system temp directory).
    `server_pid`: the uvicorn master, whose CPU time (with its workers') is reported."""
    corpus = Path(tempfile.mkdtemp(prefix="sharp-bench-corpus-", dir=corpus_dir)) / "corpus.txt"
    corpus.write_text("hello world\n" * 100)
    stop = threading.Event()
    feed: list[float] = []
    feed_errors: list[str] = []
    feeder = None
    if settings is not None:

        def feed_loop() -> None:
            try:
                feed.extend(live_latency(base, key, settings, str(corpus), stop, listening))
            except Exception as e:  # noqa: BLE001 - reported as an error of the run
                feed_errors.append(f"live feed: {type(e).__name__}: {e}")
                listening.set()

        listening = threading.Event()
        feeder = threading.Thread(target=feed_loop, daemon=True)
        feeder.start()
        listening.wait(120)  # the load starts once the live feed listens
    server_cpu0 = process_cpu(server_pid) if server_pid else 0.0
    client_cpu0 = time.process_time()
    t0 = time.perf_counter()
    stats = asyncio.run(run_load(base, key, str(corpus), clients, duration))
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - client_cpu0
    server_cpu = process_cpu(server_pid) - server_cpu0 if server_pid else None
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
        # share of GETs that found the new job placed (a position, not "waiting for the
        # next scheduling pass"): with no worker (no --queued) none are
        "get_placed": round(stats.placed / max(1, len(stats.latencies["get"])), 3),
        # CPU seconds over the load / wall seconds: 1.0 is one core kept busy. The client's
        # includes the live-feed thread; the server's is uvicorn's master and workers.
        "cpu": {
            "client_share": round(client_cpu / elapsed, 3),
            "server_share": round(server_cpu / elapsed, 3) if server_cpu is not None else None,
            "server_ms_per_request": round(server_cpu / n * 1000, 2)
            if server_cpu is not None and n
            else None,
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
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
    ap.add_argument(
        "--queued",
        type=int,
        default=0,
        help="pre-fill this many waiting jobs (with a worker slot, so they have positions)",
    )
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the load generator to its own core and the server to the others",
    )
    ap.add_argument(
        "--server-root",
        type=Path,
        help="run the API from this checkout (old against new on one machine)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    split = None if args.no_pin else cpu_split()
    if split is not None:  # before any thread starts: threads inherit the calling thread's
        os.sched_setaffinity(0, split[0])
    if args.url:
        if not args.key:
            ap.error("--url needs --key")
        settings = None
        if os.environ.get("SHARP_DATABASE_URL"):
            from service.settings import Settings

            settings = Settings()
        result = measure(args.url, args.key, settings, args.clients, args.duration, args.corpus_dir)
        result["stack"] = {"url": args.url}
    else:
        with production_stack(
            args.uvicorn_workers,
            server_cores=split[1] if split else None,
            server_root=args.server_root,
        ) as st:
            if args.queued:
                t0 = time.perf_counter()
                prefill(st.settings, st.team_id, args.queued, "bench-prefill.txt")
                prefill_s = time.perf_counter() - t0
            with keep_worker_alive(st.settings) if args.queued else contextlib.nullcontext():
                result = measure(
                    st.base,
                    st.key,
                    st.settings,
                    args.clients,
                    args.duration,
                    server_pid=st.server_pid,
                )
            if args.queued:
                result["prefill_s"] = round(prefill_s, 2)
            if result["errors"]:  # the server's side of the story, before its folder goes
                server_log = Path(st.settings.artifact_root).parent / "uvicorn.log"
                result["server_log_tail"] = server_log.read_text(errors="replace")[-3000:]
        result["stack"] = {
            "uvicorn_workers": args.uvicorn_workers,
            "database": "postgres",
            "broker": "redis",
            "server_root": str(args.server_root or ROOT),
        }
    result["queued"] = args.queued
    result["pinned"] = {"client": sorted(split[0]), "server": sorted(split[1])} if split else None
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['clients']} clients, {result['duration_s']} s: {result['requests']} "
            f"requests, {result['requests_per_s']} req/s, {result['errors']} errors, "
            f"{result['queued']} pre-queued"
        )
        c = result["cpu"]
        print(
            f"  cpu: server {c['server_share']} cores ({c['server_ms_per_request']} ms/request), "
            f"client {c['client_share']} cores, pinned {result['pinned']}"
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
