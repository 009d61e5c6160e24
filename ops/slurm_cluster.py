"""A throwaway two-node Slurm cluster on this one machine, for CI and for trying the Slurm pool.

Why: the Slurm backend (`worker.slurm`) is tested against real ``slurmctld``/``slurmd``/
``slurmdbd`` daemons, not a fake ``sbatch``. Debian's stock ``slurm-wlm`` is built with
multiple-slurmd support, so two ``slurmd -N n1|n2`` processes on their own ports stand for two
nodes (``NodeAddr=127.0.0.1``, ``NodeHostname`` = this host's short name). Everything lives in
one private directory: ``slurm.conf`` (point ``SLURM_CONF`` at it), ``slurmdbd.conf`` beside it
(mode 0600), state, spool, logs, and a private ``munged`` socket. Accounting (``sacct``) goes
through ``slurmdbd`` to the MariaDB at 127.0.0.1:3306 when one answers; without it the cluster
runs without accounting and the backend falls back to ``scontrol``.

    python -m ops.slurm_cluster start DIR     # prints the env to export (SLURM_CONF=…)
    python -m ops.slurm_cluster stop DIR

Every daemon runs in the foreground under this module's `Cluster`, which stops them by pid.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2")
PARTITION = "debug"
MUNGE_SOCKET = "/run/munge/munge.socket.2"


def installed() -> str | None:
    """None when the daemons and clients are on PATH, else what is missing."""
    need = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
    missing = [n for n in need if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]
    return f"not installed: {', '.join(missing)}" if missing else None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _munge_up() -> bool:
    """A munged already answers on the default socket (a host that runs Slurm has one)."""
    if not Path(MUNGE_SOCKET).exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(MUNGE_SOCKET)
            return True
        except OSError:
            return False


def _mysql_up(host: str = "127.0.0.1", port: int = 3306) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Cluster:
    root: Path
    cpus: int = 2
    accounting: bool = True
    name: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.name = self.name or f"sharp{os.getpid()}"

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, the worker) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for d in ("etc", "state", "log", "run", "munge", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        host = socket.gethostname().split(".")[0]
        self.ctld_port, self.dbd_port = _free_port(), _free_port()
        self.node_ports = {n: _free_port() for n in NODES}
        r = self.root
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={MUNGE_SOCKET}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            # A node that stops answering is DOWN within seconds (the node-failure test).
            "SlurmdTimeout=5",
            "MessageTimeout=5",
            "KillWait=30",
            "InactiveLimit=0",
            "MinJobAge=300",
            "JobRequeue=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "PropagateResourceLimitsExcept=ALL",
        ]
        if self.accounting:
            lines += [
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1",
                f"AccountingStoragePort={self.dbd_port}",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
            ]
        for n in NODES:
            lines.append(
                f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} "
                f"Port={self.node_ports[n]} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=NO"
        )
        self.conf.write_text("\n".join(lines) + "\n")
        if self.accounting:
            dbd = self.conf.parent / "slurmdbd.conf"
            dbd.write_text(
                "\n".join(
                    [
                        "AuthType=auth/munge",
                        f"AuthInfo=socket={MUNGE_SOCKET}",
                        "DbdHost=localhost",
                        "DbdAddr=127.0.0.1",
                        f"DbdPort={self.dbd_port}",
                        "SlurmUser=root",
                        f"LogFile={r}/log/slurmdbd.log",
                        f"PidFile={r}/run/slurmdbd.pid",
                        "StorageType=accounting_storage/mysql",
                        "StorageHost=127.0.0.1",
                        "StoragePort=3306",
                        "StorageUser=root",
                        f"StorageLoc=slurm_acct_{self.name}",
                    ]
                )
                + "\n"
            )
            os.chmod(dbd, 0o600)

    def _start(self, key: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.root / "log" / f"{key}.out").open("ab")
        self.procs[key] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, **(env or {})},
            start_new_session=True,
        )
        time.sleep(0.1)
        if self.procs[key].poll() is not None:
            raise RuntimeError(f"{key} exited at once: see {self.root}/log/{key}.out")

    def _wait(self, what: str, check: list[str], timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for key, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{key} died (exit {p.returncode}) while waiting for {what}")
            r = subprocess.run(
                check, capture_output=True, text=True, env={**os.environ, **self.env}
            )
            last = r.stdout + r.stderr
            if r.returncode == 0:
                return r.stdout
            time.sleep(0.3)
        raise TimeoutError(f"{what}: {last.strip()[-500:]}")

    def start(self) -> Cluster:
        """Start the daemons and wait until both nodes are idle; on failure, stop what was
        started and raise."""
        problem = installed()
        if problem:
            raise RuntimeError(problem)
        try:
            return self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> Cluster:
        self.accounting = self.accounting and _mysql_up()
        self._write_config()
        r = self.root
        if not _munge_up():
            # At the default socket: some clients (sacctmgr) ignore AuthInfo's socket.
            Path(MUNGE_SOCKET).parent.mkdir(parents=True, exist_ok=True)
            self._start(
                "munged",
                [
                    _exe("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={MUNGE_SOCKET}",
                    f"--pid-file={r}/run/munged.pid",
                    f"--log-file={r}/log/munged.log",
                    f"--seed-file={r}/munge/seed",
                    "--key-file=/etc/munge/munge.key",
                ],
            )
            deadline = time.monotonic() + 10
            while not _munge_up() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.accounting:
            self._start("slurmdbd", [_exe("slurmdbd"), "-D"])
            self._wait("slurmdbd", ["sacctmgr", "-n", "list", "cluster"], 60)
            subprocess.run(
                ["sacctmgr", "-i", "add", "cluster", self.name],
                capture_output=True,
                env={**os.environ, **self.env},
            )
        self._start("slurmctld", [_exe("slurmctld"), "-D", "-i"])
        for n in NODES:
            self._start(f"slurmd-{n}", [_exe("slurmd"), "-D", "-N", n])
        self.wait_idle()
        return self

    def wait_idle(self, nodes: tuple[str, ...] = NODES, timeout: float = 60.0) -> None:
        """Until every node in `nodes` is idle (registered and free)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"],
                capture_output=True,
                text=True,
                env={**os.environ, **self.env},
            )
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            state = r.stdout + r.stderr
            if all(states.get(n) == "idle" for n in nodes):
                return
            time.sleep(0.3)
        raise TimeoutError(f"nodes not idle: {state.strip()}")

    def kill_node(self, node: str) -> None:
        """A node dies: its slurmd and every process of a job step that runs on it."""
        p = self.procs.pop(f"slurmd-{node}")
        p.kill()
        p.wait()
        for pid in _step_pids(node):
            with _suppress():
                os.kill(pid, signal.SIGKILL)

    def restart_node(self, node: str) -> None:
        self._start(f"slurmd-{node}", [_exe("slurmd"), "-D", "-N", node])
        subprocess.run(
            ["scontrol", "update", f"nodename={node}", "state=resume"],
            capture_output=True,
            env={**os.environ, **self.env},
        )
        self.wait_idle((node,))

    def stop(self) -> None:
        """Stop what `start` started, by pid, newest first; then leftover job steps."""
        for key in reversed(list(self.procs)):
            p = self.procs[key]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        if self.accounting and shutil.which("mysql"):
            subprocess.run(
                [
                    "mysql",
                    "-h127.0.0.1",
                    "-uroot",
                    "-e",
                    f"DROP DATABASE IF EXISTS slurm_acct_{self.name}",
                ],
                capture_output=True,
                check=False,
            )
        for n in NODES:
            for pid in _step_pids(n):
                with _suppress():
                    os.kill(pid, signal.SIGKILL)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]


def _step_pids(node: str) -> list[int]:
    """Processes of job steps on `node`: Slurm sets SLURMD_NODENAME in their environment."""
    needle = f"SLURMD_NODENAME={node}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            out.append(int(d.name))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.slurm_cluster", description=__doc__)
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    if args.action == "start":
        c = Cluster(args.dir).start()
        for key, proc in c.procs.items():
            (c.root / "run" / f"{key}.ppid").write_text(str(proc.pid))
        print(f"export SLURM_CONF={c.conf}")
        return 0
    for f in sorted((args.dir / "run").glob("*.ppid"), reverse=True):
        with _suppress():
            os.killpg(int(f.read_text()), signal.SIGTERM)
        f.unlink()
    conf = args.dir / "etc" / "slurm.conf"
    name = re.search(r"^ClusterName=(\S+)", conf.read_text(), re.M) if conf.is_file() else None
    if name and shutil.which("mysql"):
        drop = f"DROP DATABASE IF EXISTS slurm_acct_{name.group(1)}"
        subprocess.run(["mysql", "-h127.0.0.1", "-uroot", "-e", drop], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
