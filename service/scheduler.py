"""Which queued job runs next: pools, team quotas and fair share, decided from the database.

Why the service schedules instead of Celery: a broker delivers messages in the order they
were sent, so a team that queues fifty runs would fill every GPU for days. Here a job is
``queued`` in the database on submission, and its Celery message is sent only once a
scheduling pass *admits* it (``jobs.admitted_at``); the claim in `worker.supervisor` refuses
a job that was not admitted, so no other path can start one.

The model:

- A **worker** (a row in ``workers``, kept fresh by its heartbeat) is one slot: it runs one
  job at a time on its ``gpus`` GPUs. A **pool**'s capacity is its live workers. A job takes a
  slot from admission until it leaves ``running``/``cancelling``.
- A team's **GPUs in use** is the sum of ``gpus`` over its admitted and running jobs (all
  pools). Its ``max_running_gpus`` quota blocks admissions beyond it.
- **Fair share**: when a slot is free, the next job comes from the team furthest below its
  share of that pool, i.e. with the lowest ``gpus in use in the pool / weight`` (a job asking
  for 0 GPUs counts as one, so CPU pools are shared too). Ties go to the team admitted least
  recently in that pool (round robin), then to the team whose next job is oldest. Within a
  team: higher ``priority`` first, then older first. A team's next job is never skipped for a
  smaller one of the same team (that would starve big jobs).

`decide` and `explain` are pure functions of a `ClusterState` snapshot, which `load_state`
reads from the database; tests build the state in Postgres and assert the exact order.

Positions: `explain` replays the queue to give every waiting job its place. Since issue 17 a
pass stores the result on the job rows (`refresh_positions`, with `placements`, the same
answer from one merge of the teams' queues), and `queue_info` reads the row: a poll of a
queued job costs the same with 10 000 waiting jobs as with 10. What depends on the live
workers (no worker serves the pool, the job is too big for any) and admission (position 0)
is read live, so a dead pool shows at once. The refresh reads the whole queue, so a
submission's pass refreshes at once only while the queue is small (`IMMEDIATE_BELOW`);
above that an API process refreshes at most every ``queue_refresh_s`` and a timer runs the
refresh it skipped. Between a change and the refresh, a job that was never placed reads
"waiting for the next scheduling pass"; admissions themselves are never delayed.

Concurrency: `run_pass` holds a Postgres transaction-level advisory lock while it reads the
state and writes admissions, so passes from several API processes and workers run one at a
time and never admit more than the capacity. On SQLite every transaction is ``BEGIN
IMMEDIATE`` (`service.db`), which serialises them the same way.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service import lifecycle
from service.dispatch import Dispatch
from service.models import Job, utcnow
from service.repositories import (
    JobRepository,
    SchedulerRepository,
    TeamRepository,
    WorkerRepository,
)
from service.txn import after_commit

log = logging.getLogger(__name__)

#: Key of the Postgres advisory lock that serialises scheduling passes ("sharpsch" in hex).
LOCK_KEY = 0x7368617270736368


# --------------------------------------------------------------------------- the snapshot
@dataclass(frozen=True)
class Waiting:
    """A queued job the scheduler has not admitted yet."""

    job_id: str
    team_id: str
    pool: str
    gpus: int
    priority: int
    created_at: dt.datetime


@dataclass
class TeamState:
    team_id: str
    name: str = ""
    weight: float = 1.0
    max_running_gpus: int | None = None
    gpus_in_use: int = 0  # admitted or running, all pools


@dataclass
class PoolState:
    pool: str
    slots: int = 0  # live workers
    max_gpus: int = 0  # the largest live worker
    busy: int = 0  # admitted or running jobs
    usage: dict[str, int] = field(default_factory=dict)  # team -> share units in use
    last_admitted: dict[str, dt.datetime] = field(default_factory=dict)  # team -> time


@dataclass
class ClusterState:
    now: dt.datetime
    pools: dict[str, PoolState]
    teams: dict[str, TeamState]
    waiting: list[Waiting]
    admitted: list[tuple[str, str]] = field(default_factory=list)  # (job, pool), not started
    # job -> (queue_position, queue_reason) as stored on the waiting rows read
    stored: dict[str, tuple[int | None, str | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    job_id: str
    team_id: str
    pool: str
    gpus: int


@dataclass(frozen=True)
class QueueInfo:
    """What GET /v1/jobs/{id} shows for a queued job."""

    position: int | None  # 0: admitted; 1: next in its pool; None: cannot run as things are
    reason: str


def share_units(gpus: int) -> int:
    """What a job counts for in fair share: its GPUs, and a CPU-only job counts as one."""
    return max(gpus, 1)


def _team_order(jobs: Iterable[Waiting]) -> list[Waiting]:
    return sorted(jobs, key=lambda w: (-w.priority, w.created_at, w.job_id))


def _fits_pool(w: Waiting, pool: PoolState) -> bool:
    return w.gpus <= pool.max_gpus


def _pick_team(
    heads: dict[str, Waiting], pool: PoolState, teams: dict[str, TeamState]
) -> str | None:
    """The team furthest below its share of `pool`, among those with a next job."""
    if not heads:
        return None
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)

    def key(team_id: str) -> tuple[Any, ...]:
        t = teams.get(team_id) or TeamState(team_id)
        return (
            pool.usage.get(team_id, 0) / t.weight,
            pool.last_admitted.get(team_id, epoch),
            heads[team_id].created_at,
            team_id,
        )

    return min(heads, key=key)


def _by_pool_and_team(waiting: Iterable[Waiting]) -> dict[str, dict[str, list[Waiting]]]:
    grouped: dict[str, dict[str, list[Waiting]]] = defaultdict(lambda: defaultdict(list))
    for w in waiting:
        grouped[w.pool][w.team_id].append(w)
    return {
        pool: {team: _team_order(jobs) for team, jobs in teams.items()}
        for pool, teams in grouped.items()
    }


def _over_quota(team: TeamState | None, gpus: int) -> bool:
    return (
        team is not None
        and team.max_running_gpus is not None
        and team.gpus_in_use + gpus > team.max_running_gpus
    )


def decide(state: ClusterState) -> list[Admission]:
    """The jobs to admit now, in admission order. Does not modify `state`."""
    teams = {k: TeamState(**vars(v)) for k, v in state.teams.items()}
    out: list[Admission] = []
    for pool_name, by_team in sorted(_by_pool_and_team(state.waiting).items()):
        base = state.pools.get(pool_name) or PoolState(pool_name)
        pool = PoolState(
            pool_name,
            base.slots,
            base.max_gpus,
            base.busy,
            dict(base.usage),
            dict(base.last_admitted),
        )
        queues = {t: [w for w in jobs if _fits_pool(w, pool)] for t, jobs in by_team.items()}
        tick = 0
        while pool.busy < pool.slots:
            heads = {
                t: jobs[0]
                for t, jobs in queues.items()
                if jobs and not _over_quota(teams.get(t), jobs[0].gpus)
            }
            team_id = _pick_team(heads, pool, teams)
            if team_id is None:
                break
            w = queues[team_id].pop(0)
            out.append(Admission(w.job_id, w.team_id, pool_name, w.gpus))
            pool.busy += 1
            pool.usage[team_id] = pool.usage.get(team_id, 0) + share_units(w.gpus)
            # Later in this pass than any earlier admission: the round robin moves on.
            tick += 1
            pool.last_admitted[team_id] = state.now + dt.timedelta(microseconds=tick)
            if team_id in teams:
                teams[team_id].gpus_in_use += w.gpus
    return out


def explain(state: ClusterState) -> dict[str, QueueInfo]:
    """Position and reason for every queued job.

    The position is the order in which the pool would admit its waiting jobs if slots freed
    up one by one with today's usage (quotas aside: a team over its quota waits, and its
    reason says so).
    """
    info: dict[str, QueueInfo] = {}
    for job_id, pool_name in state.admitted:
        info[job_id] = QueueInfo(0, f"admitted; waiting for a worker in pool '{pool_name}'")
    for pool_name, by_team in sorted(_by_pool_and_team(state.waiting).items()):
        base = state.pools.get(pool_name) or PoolState(pool_name)
        if base.slots == 0:
            for jobs in by_team.values():
                for w in jobs:
                    info[w.job_id] = QueueInfo(None, f"no worker serves pool '{pool_name}'")
            continue
        pool = PoolState(pool_name, usage=dict(base.usage), last_admitted=dict(base.last_admitted))
        queues: dict[str, list[Waiting]] = {}
        for t, jobs in by_team.items():
            for w in jobs:
                if not _fits_pool(w, base):
                    info[w.job_id] = QueueInfo(
                        None,
                        f"no worker in pool '{pool_name}' has {w.gpus} GPUs "
                        f"(the largest has {base.max_gpus})",
                    )
                    continue
                queues.setdefault(t, []).append(w)
        position = 0
        tick = 0
        while True:
            heads = {t: jobs[0] for t, jobs in queues.items() if jobs}
            team_id = _pick_team(heads, pool, state.teams)
            if team_id is None:
                break
            w = queues[team_id].pop(0)
            position += 1
            tick += 1
            pool.usage[team_id] = pool.usage.get(team_id, 0) + share_units(w.gpus)
            pool.last_admitted[team_id] = state.now + dt.timedelta(microseconds=tick)
            team = state.teams.get(team_id)
            if _over_quota(team, w.gpus):
                assert team is not None and team.max_running_gpus is not None
                reason = f"team quota: {team.gpus_in_use} of {team.max_running_gpus} GPUs in use"
            else:
                reason = f"waiting for a free {pool_name}"
            info[w.job_id] = QueueInfo(position, reason)
    return info


def placements(state: ClusterState) -> dict[str, QueueInfo]:
    """What `explain` returns, in O(waiting · log teams): per pool, one merge of the teams'
    queues (each already in team order), a heap keyed like `_pick_team`.

    Why a heap gives the same order: a team's key ``usage / weight`` only grows with each
    job it is given, and the round-robin tie-break (``last_admitted``) changes only for the
    team just served, which is pushed back with its new key; every other entry's key is
    unchanged, so the heap's minimum is `_pick_team`'s choice at every step.
    `tests/test_scheduler_positions.py` checks both on random queues."""
    import heapq

    info: dict[str, QueueInfo] = {}
    for job_id, pool_name in state.admitted:
        info[job_id] = QueueInfo(0, f"admitted; waiting for a worker in pool '{pool_name}'")
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    for pool_name, by_team in sorted(_by_pool_and_team(state.waiting).items()):
        base = state.pools.get(pool_name) or PoolState(pool_name)
        if base.slots == 0:
            unserved = QueueInfo(None, f"no worker serves pool '{pool_name}'")
            for jobs in by_team.values():
                for w in jobs:
                    info[w.job_id] = unserved
            continue
        waiting_for = f"waiting for a free {pool_name}"
        heap: list[tuple[Any, ...]] = []
        queues: dict[str, list[Waiting]] = {}
        usage = dict(base.usage)
        for t, jobs in by_team.items():
            fit = []
            for w in jobs:
                if _fits_pool(w, base):
                    fit.append(w)
                else:
                    info[w.job_id] = QueueInfo(
                        None,
                        f"no worker in pool '{pool_name}' has {w.gpus} GPUs "
                        f"(the largest has {base.max_gpus})",
                    )
            if fit:
                queues[t] = fit
                weight = (state.teams.get(t) or TeamState(t)).weight
                last = base.last_admitted.get(t, epoch)
                heap.append((usage.get(t, 0) / weight, last, fit[0].created_at, t, 0))
        heapq.heapify(heap)
        position = 0
        reasons: dict[tuple[str, int], str] = {}
        while heap:
            share, _last, _created, t, i = heapq.heappop(heap)
            team = state.teams.get(t)
            weight = (team or TeamState(t)).weight
            jobs = queues[t]
            # Serve `t` while it stays strictly below every other team's key: on a tie the
            # other team wins (it was admitted less recently than `t`, just served).
            while True:
                w = jobs[i]
                position += 1
                usage[t] = usage.get(t, 0) + share_units(w.gpus)
                reason = reasons.get((t, w.gpus))
                if reason is None:
                    if _over_quota(team, w.gpus):
                        assert team is not None and team.max_running_gpus is not None
                        reason = (
                            f"team quota: {team.gpus_in_use} of {team.max_running_gpus} GPUs in use"
                        )
                    else:
                        reason = waiting_for
                    reasons[(t, w.gpus)] = reason
                info[w.job_id] = QueueInfo(position, reason)
                i += 1
                if i == len(jobs):
                    break
                share = usage[t] / weight
                if heap and not share < heap[0][0]:
                    tick = state.now + dt.timedelta(microseconds=position)
                    heapq.heappush(heap, (share, tick, jobs[i].created_at, t, i))
                    break
    return info


# --------------------------------------------------------------------------- the database
def live_cutoff(now: dt.datetime, heartbeat_timeout_s: float) -> dt.datetime:
    return now - dt.timedelta(seconds=heartbeat_timeout_s)


def load_state(
    session: Session,
    *,
    heartbeat_timeout_s: float,
    now: dt.datetime | None = None,
    heads_only: bool = False,
) -> ClusterState:
    """Read what `decide` and `explain` need, in a handful of grouped queries.

    ``heads_only``: only what `decide` needs, the first waiting jobs of each team in pools
    with a free slot (as many as there are free slots), not the whole queue; no admitted
    list."""
    now = now or utcnow()
    pools: dict[str, PoolState] = {}

    def pool(name: str) -> PoolState:
        return pools.setdefault(name, PoolState(name))

    repo = SchedulerRepository(session)
    for name, slots, max_gpus in repo.live_pools(live_cutoff(now, heartbeat_timeout_s)):
        p = pool(name)
        p.slots, p.max_gpus = slots, max_gpus

    if heads_only and not pools:  # no live worker anywhere: nothing can be admitted
        return ClusterState(now, pools, {}, [])
    teams = {
        t.id: TeamState(t.id, t.name, float(t.weight), t.max_running_gpus)
        for t in TeamRepository(session).list()
    }
    for name, team_id, n, gpus, share in repo.busy():
        p = pool(name)
        p.busy += n
        p.usage[team_id] = share
        if team_id in teams:
            teams[team_id].gpus_in_use += gpus
    free = {p.pool: (p.slots - p.busy, p.max_gpus) for p in pools.values() if p.slots > p.busy}
    if heads_only and not free:  # every slot is taken: no queue to read
        return ClusterState(now, pools, teams, [])
    for name, team_id, last in repo.last_admitted():
        if last is not None:
            pool(name).last_admitted[team_id] = _aware(last)

    rows = repo.waiting_heads(free) if heads_only else repo.waiting()
    waiting = [
        Waiting(r.id, r.team_id, r.queue, int(r.gpus), int(r.priority), _aware(r.created_at))
        for r in rows
    ]
    admitted = [] if heads_only else [(r.id, r.queue) for r in repo.admitted()]
    stored = {r.id: (r.queue_position, r.queue_reason) for r in rows}
    return ClusterState(now, pools, teams, waiting, admitted, stored)


def _aware(value: Any) -> dt.datetime:
    if isinstance(value, str):  # SQLite without the column type's result processing
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value


def plan(
    session: Session, *, heartbeat_timeout_s: float, now: dt.datetime | None = None
) -> list[Admission]:
    """`decide` on the database's current state: the admissions a pass would make now."""
    return decide(
        load_state(session, heartbeat_timeout_s=heartbeat_timeout_s, now=now, heads_only=True)
    )


#: A submission's pass refreshes every position at once while fewer jobs than this wait
#: (a few milliseconds); above, at most every ``queue_refresh_s`` per API process.
IMMEDIATE_BELOW = 1000
#: Above `IMMEDIATE_BELOW`, the share of one core's wall time an API process may spend on
#: refreshes: one that took 50 ms waits at least 1 s (``queue_refresh_s``), 200 ms waits 4 s.
BUDGET = 0.05


def refresh_positions(
    session: Session, *, heartbeat_timeout_s: float, now: dt.datetime | None = None
) -> int:
    """Store every waiting job's position and reason (`placements`), writing only the rows
    whose values changed. Call it holding the scheduling lock, after admissions. Returns the
    number of waiting jobs read."""
    state = load_state(session, heartbeat_timeout_s=heartbeat_timeout_s, now=now)
    stored = state.stored
    changed = []
    for job_id, q in placements(state).items():
        old = stored.get(job_id)
        if old is not None and old != (q.position, q.reason):
            changed.append((job_id, q.position, q.reason))
    SchedulerRepository(session).store_positions(changed)
    return len(state.waiting)


def lock(session: Session, *, wait: bool = True) -> bool:
    """Serialise scheduling passes until this transaction ends (see the module docstring).

    With ``wait=False`` it only tries, and returns False if another pass holds the lock.
    """
    return SchedulerRepository(session).lock(LOCK_KEY, wait=wait)


def admit(
    session: Session,
    dispatch: Dispatch | None,
    *,
    heartbeat_timeout_s: float,
    now: dt.datetime | None = None,
    wait: bool = True,
    positions: bool = True,
) -> list[Admission]:
    """One pass inside the caller's transaction: lock, decide, mark admitted, and send the
    messages after the commit. Returns the admissions that were written.

    ``wait=False`` (what a submission triggers) skips the pass when another one is running:
    under a burst of submissions, every request waiting its turn for the lock to re-read
    the same queue made POST /v1/jobs take seconds (bench.api_load at 64 clients). A job
    skipped that way is admitted by the pass that is running if that pass's snapshot saw
    its commit, else by the next worker heartbeat's pass (`scheduler_interval_s`).
    ``positions``: also refresh the stored queue positions (`refresh_positions`) in the
    same transaction.
    """
    if not lock(session, wait=wait):
        return []
    now = now or utcnow()
    done: list[Admission] = []
    jobs = JobRepository(session)
    for a in plan(session, heartbeat_timeout_s=heartbeat_timeout_s, now=now):
        if not lifecycle.admit(jobs, a.job_id, now):
            continue
        done.append(a)
        if dispatch is not None:
            after_commit(session, partial(dispatch, a.job_id, a.pool))
    if done:
        log.info("scheduler admitted %s", [(a.job_id, a.pool) for a in done])
    if positions:
        session.info["sharp_waiting"] = refresh_positions(
            session, heartbeat_timeout_s=heartbeat_timeout_s, now=now
        )
    return done


def run_pass(
    factory: sessionmaker[Session],
    dispatch: Dispatch | None,
    *,
    heartbeat_timeout_s: float,
    wait: bool = True,
    refresh_s: float | None = None,
) -> list[Admission]:
    """A pass in its own transaction (what triggers call). Never raises: a failed pass is
    logged and the next trigger or the periodic tick tries again. ``wait``: see `admit`.

    ``refresh_s`` (what the API's triggers pass, ``queue_refresh_s``): refresh the stored
    positions at once while the queue is small, else at most that often in this process; a
    refresh skipped for that or for a busy lock is run by a timer later. None (workers'
    passes, tests): refresh in every pass."""
    if refresh_s is None:
        return _pass(factory, dispatch, heartbeat_timeout_s, wait=wait, positions=True)[0]
    r = _refresher(factory, refresh_s)
    due = r.due()
    t0 = time.monotonic()
    done, waiting = _pass(factory, dispatch, heartbeat_timeout_s, wait=wait, positions=due)
    if waiting is not None:
        r.refreshed(waiting, time.monotonic() - t0)
    else:  # skipped: the lock was busy (its holder may have read the queue before our
        # commit) or the refresh is not due yet; one refresh is owed, made by a timer
        r.owe(lambda: _pass(factory, dispatch, heartbeat_timeout_s, wait=True, positions=True))
    return done


def _pass(
    factory: sessionmaker[Session],
    dispatch: Dispatch | None,
    heartbeat_timeout_s: float,
    *,
    wait: bool,
    positions: bool,
) -> tuple[list[Admission], int | None]:
    """(admissions, waiting jobs read by the refresh or None if there was none)."""
    try:
        with factory() as session:
            try:
                done = admit(
                    session,
                    dispatch,
                    heartbeat_timeout_s=heartbeat_timeout_s,
                    wait=wait,
                    positions=positions,
                )
                waiting = session.info.pop("sharp_waiting", None)
                session.commit()
                return done, waiting
            except BaseException:
                session.rollback()
                raise
    except Exception:  # noqa: BLE001 - see run_pass
        log.exception("scheduling pass failed")
        return [], None


@dataclass
class _Refresher:
    """Per engine (one per API process, or per test app): when positions were last
    refreshed, how many jobs waited then, what the refresh cost, and the timer of an owed
    refresh. A refresh is due at once while the queue is small, else `interval` after the
    last: ``refresh_s``, or longer when refreshes are slow (at most `BUDGET` of one core's
    wall time goes to them in each process)."""

    refresh_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: float = float("-inf")
    waiting: int = 0
    cost: float = 0.0
    timer: threading.Timer | None = None

    def interval(self) -> float:
        return max(self.refresh_s, self.cost / BUDGET)

    def due(self) -> bool:
        with self.lock:
            small = self.waiting < IMMEDIATE_BELOW
            return small or time.monotonic() - self.last >= self.interval()

    def refreshed(self, waiting: int, seconds: float) -> None:
        with self.lock:
            self.last, self.waiting, self.cost = time.monotonic(), waiting, seconds

    def owe(self, refresh: Any) -> None:
        """Run `refresh` (returns (admissions, waiting)) once, when due; one timer at most."""
        with self.lock:
            if self.timer is not None:
                return
            delay = 0.05
            if self.waiting >= IMMEDIATE_BELOW:
                delay = max(delay, self.last + self.interval() - time.monotonic())

            def fire() -> None:
                with self.lock:
                    self.timer = None
                t0 = time.monotonic()
                _, waiting = refresh()
                if waiting is not None:
                    self.refreshed(waiting, time.monotonic() - t0)

            self.timer = threading.Timer(delay, fire)
            self.timer.daemon = True
            self.timer.start()


_REFRESHERS: dict[tuple[int, float], _Refresher] = {}
_REFRESHERS_LOCK = threading.Lock()


def _refresher(factory: sessionmaker[Session], refresh_s: float) -> _Refresher:
    key = (id(factory.kw.get("bind")), refresh_s)
    with _REFRESHERS_LOCK:
        return _REFRESHERS.setdefault(key, _Refresher(refresh_s))


#: What a queued job reads between its submission and the pass that places it.
UNPLACED = "waiting for the next scheduling pass"


def queue_info(session: Session, job: Job, *, heartbeat_timeout_s: float) -> QueueInfo | None:
    """Position and reason for `job` if it is queued, without reading the queue: admission
    and the live workers of its pool are read now (one small query per session, so a page
    of jobs costs one), the position as the latest pass stored it on the row."""
    if job.status != lifecycle.QUEUED:
        return None
    if job.admitted_at is not None:
        return QueueInfo(0, f"admitted; waiting for a worker in pool '{job.queue}'")
    pools = session.info.get("sharp_live_pools")
    if pools is None:
        cutoff = live_cutoff(utcnow(), heartbeat_timeout_s)
        pools = {name: (n, g) for name, n, g in SchedulerRepository(session).live_pools(cutoff)}
        session.info["sharp_live_pools"] = pools
    slots, max_gpus = pools.get(job.queue, (0, 0))
    if slots == 0:
        return QueueInfo(None, f"no worker serves pool '{job.queue}'")
    if job.gpus > max_gpus:
        return QueueInfo(
            None,
            f"no worker in pool '{job.queue}' has {job.gpus} GPUs (the largest has {max_gpus})",
        )
    if job.queue_position is None:
        return QueueInfo(None, UNPLACED)
    return QueueInfo(job.queue_position, job.queue_reason or UNPLACED)


# --------------------------------------------------------------------------- workers
def register_worker(
    session: Session,
    *,
    name: str,
    pool: str,
    gpus: int,
    hostname: str,
    gpu_type: str | None = None,
    gpu_memory_bytes: int | None = None,
    **backend: Any,
) -> None:
    """Insert or refresh a worker's row (its heartbeat): the pool has one more live slot.
    `backend`: what a multi-node backend offers (``backend``, ``max_nodes``,
    ``gpus_per_node``, ``backend_info``; `service.pools`)."""
    WorkerRepository(session).register(
        name=name,
        pool=pool,
        gpus=gpus,
        hostname=hostname,
        gpu_type=gpu_type,
        gpu_memory_bytes=gpu_memory_bytes,
        **backend,
    )


def prune_workers(session: Session, *, older_than_s: float) -> None:
    """Forget workers silent for long (each restart under a new name leaves a row behind)."""
    WorkerRepository(session).prune(utcnow() - dt.timedelta(seconds=older_than_s))


def deregister_worker(session: Session, name: str) -> None:
    WorkerRepository(session).deregister(name)
