"""The ``sharp`` command. A Typer app others extend (``up``, ``demo``, ``jobs …``).

Add a command group with ``app.add_typer(group, name="jobs")`` from your own module and
import that module in `main` (or here); ``admin`` is the operator group for teams, their
quotas, keys, the registered workers and the artifact store.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ops.client_cli import jobs_app, print_table
from ops.demo import demo_command
from ops.embedded import DB_FILE, admin_settings, up_command
from ops.eval_cli import eval_app
from ops.sweeps_cli import sweeps_app
from ops.uploads_cli import uploads_app
from ops.webhooks_cli import webhooks_app
from service import admin as admin_fns
from service.db import Database
from service.errors import SharpError
from service.models import utcnow
from service.settings import Settings, get_settings

app = typer.Typer(help="SHARP distillation service.", no_args_is_help=True)
admin_app = typer.Typer(no_args_is_help=True)
teams_app = typer.Typer(help="Teams.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
workers_app = typer.Typer(help="Registered workers (GPU pools).", no_args_is_help=True)
storage_app = typer.Typer(
    help="The artifact store (local folder or S3 bucket): usage and retention.",
    no_args_is_help=True,
)
app.add_typer(admin_app, name="admin")
app.add_typer(jobs_app, name="jobs")  # the HTTP client (ops/client_cli.py)
app.add_typer(eval_app, name="eval")  # evaluation jobs, same client (ops/eval_cli.py)
app.add_typer(sweeps_app, name="sweeps")  # sweeps, same client (ops/sweeps_cli.py)
app.add_typer(webhooks_app, name="webhooks")  # signed webhooks, same client (ops/webhooks_cli.py)
app.add_typer(uploads_app, name="uploads")  # corpora, resumable for big files (ops/uploads_cli.py)
admin_app.add_typer(teams_app, name="teams")
admin_app.add_typer(keys_app, name="keys")
admin_app.add_typer(workers_app, name="workers")
admin_app.add_typer(storage_app, name="storage")
app.command("up")(up_command)  # the embedded service (ops/embedded.py)
app.command("demo")(demo_command)  # the demo pipeline through the API (ops/demo.py)

console = Console()
err = Console(stderr=True)


#: ``sharp admin --var-dir``: the `sharp up` var dir whose database admin uses by default.
_admin_var_dir: list[Path] = [Path("var")]


@admin_app.callback()
def admin_options(
    var_dir: Path = typer.Option(
        Path("var"),
        "--var-dir",
        envvar="SHARP_VAR_DIR",
        help="A `sharp up` var dir: its sharp.db is the database unless SHARP_DATABASE_URL is set.",
    ),
) -> None:
    """Operator commands (talk to the database directly)."""
    _admin_var_dir[0] = var_dir


def _settings() -> Settings:
    return admin_settings(get_settings(), _admin_var_dir[0])


def _db() -> Database:
    return Database(_settings())


F = TypeVar("F", bound=Callable[..., Any])


def _database_errors(fn: F) -> F:
    """One line instead of a traceback when the database is unreachable or has no tables:
    which URL was used, and how to point `sharp admin` at the service's database."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import DBAPIError

        try:
            return fn(*args, **kwargs)
        except DBAPIError as e:
            reason = str(e.orig or e).strip().splitlines()[0]
            var_db = _admin_var_dir[0] / DB_FILE
            if "database_url" in get_settings().model_fields_set:
                where = "from SHARP_DATABASE_URL"
            elif var_db.is_file():
                where = f"the `sharp up` database in {var_db.parent}"
            else:
                where = f"the default: SHARP_DATABASE_URL is unset and there is no {var_db}"
            err.print(
                f"[red]error[/red] database {escape(_shown(_settings().database_url))} "
                f"({escape(where)}): {escape(reason)}. Point `sharp admin` at the service's "
                "database with SHARP_DATABASE_URL, or with --var-dir/SHARP_VAR_DIR at the var "
                "dir of `sharp up`; `sharp admin migrate` creates the tables.",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _fail(e: SharpError) -> None:
    err.print(f"[red]error[/red] {e.code}: {e.message}")
    raise typer.Exit(1)


@teams_app.command("create")
@_database_errors
def teams_create(name: str) -> None:
    """Create a team."""
    db = _db()
    try:
        with db.session() as s:
            team = admin_fns.create_team(s, name)
        console.print(f"team {team.name} ({team.id})")
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@teams_app.command("list")
@_database_errors
def teams_list() -> None:
    """Teams with their fair-share weight and quotas."""
    db = _db()
    try:
        with db.session() as s:
            teams = admin_fns.list_teams(s)
        table = Table(
            "id",
            "name",
            "weight",
            "max running GPUs",
            "max queued jobs",
            "cache budget",
            "created",
        )
        for t in teams:
            table.add_row(
                t.id,
                t.name,
                f"{t.weight:g}",
                _limit(t.max_running_gpus),
                _limit(t.max_queued_jobs),
                "default" if t.cache_budget_bytes is None else _mb(t.cache_budget_bytes),
                t.created_at.isoformat(timespec="seconds"),
            )
        print_table(table, console)
    finally:
        db.dispose()


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _parse_limit(value: str | None, option: str) -> object:
    if value is None:
        return admin_fns.UNCHANGED
    if value.strip().lower() in ("none", "unlimited"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        err.print(f"[red]error[/red] {option}: a whole number >= 0, or 'none', not {value!r}")
        raise typer.Exit(2)
    return n


@teams_app.command("quota")
@_database_errors
def teams_quota(
    team: str,
    max_running_gpus: str | None = typer.Option(
        None, help="GPUs the team's jobs may hold at once (admitted or running); 'none' lifts it."
    ),
    max_queued_jobs: str | None = typer.Option(
        None, help="Queued jobs the team may have; more are refused (429). 'none' lifts it."
    ),
    weight: float | None = typer.Option(
        None, help="Fair-share weight (default 1): a team with 2 gets twice the share of 1."
    ),
) -> None:
    """Set TEAM's (name or id) scheduler quotas and fair-share weight; omitted ones stay."""
    gpus = _parse_limit(max_running_gpus, "--max-running-gpus")
    queued = _parse_limit(max_queued_jobs, "--max-queued-jobs")
    db = _db()
    try:
        with db.session() as s:
            t = admin_fns.set_quota(
                s, team, max_running_gpus=gpus, max_queued_jobs=queued, weight=weight
            )
            console.print(
                f"team {t.name}: weight {t.weight:g}, max running GPUs "
                f"{_limit(t.max_running_gpus)}, max queued jobs {_limit(t.max_queued_jobs)}"
            )
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@teams_app.command("set-budget")
@_database_errors
def teams_set_budget(
    team: str,
    size: str = typer.Argument(
        ..., metavar="BYTES", help="e.g. 500GB, 1TiB, 2000000000; 'none': the default."
    ),
) -> None:
    """Set TEAM's (name or id) budget for tokenized and teacher-logit caches. Over it, the
    least recently used entries not in use by a job are evicted after each of its jobs."""
    db = _db()
    try:
        budget = admin_fns.parse_bytes(size)
        with db.session() as s:
            t = admin_fns.set_cache_budget(s, team, budget)
            shown = "the default" if budget is None else f"{_mb(budget)} ({budget} bytes)"
            console.print(f"team {t.name}: cache budget {shown}")
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@workers_app.command("list")
@_database_errors
def workers_list() -> None:
    """Registered workers; a worker is live while its heartbeat is recent."""
    settings = get_settings()
    db = _db()
    try:
        with db.session() as s:
            workers = admin_fns.list_workers(s)
        now = utcnow()
        table = Table(
            "name",
            "pool",
            "GPUs",
            "card",
            "GB/GPU",
            "backend (nodes)",
            "host",
            "last heartbeat",
            "live",
        )
        for w in workers:
            age = (now - w.heartbeat_at).total_seconds()
            table.add_row(
                w.name,
                w.pool,
                str(w.gpus),
                w.gpu_type or "-",
                "-" if w.gpu_memory_bytes is None else f"{w.gpu_memory_bytes / 1e9:.3g}",
                admin_fns.describe_backend(w),
                w.hostname,
                f"{age:.0f}s ago",
                "yes" if age <= settings.heartbeat_timeout_s else "no",
            )
        print_table(table, console)
    finally:
        db.dispose()


def _store():  # noqa: ANN202 - service.store.ArtifactStore
    from service.store import StoreConfigError, make_store

    try:
        return make_store(_settings())
    except StoreConfigError as e:
        err.print(f"[red]error[/red] {escape(str(e))}")
        raise typer.Exit(2) from None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@storage_app.command("usage")
@_database_errors
def storage_usage() -> None:
    """What the store holds per job (checkpoints, bytes, freeable half-written folders)."""
    store = _store()
    db = _db()
    try:
        with db.session() as s:
            rows = admin_fns.storage_usage(s, store)
        table = Table(
            "team", "job / prefix", "status", "checkpoints", "objects", "size", "freeable"
        )
        for r in rows:
            table.add_row(
                r.team or "",
                r.job_id or r.group,
                r.status or "",
                ",".join(str(c) for c in r.checkpoints),
                str(r.objects),
                _mb(r.bytes),
                _mb(r.orphan_bytes),
            )
        console.print(f"store: {escape(store.describe())}")
        print_table(table, console)
        total = sum(r.bytes for r in rows)
        console.print(f"total {_mb(total)} in {sum(r.objects for r in rows)} objects")
    except OSError as e:
        err.print(f"[red]error[/red] the store did not answer: {escape(str(e))}")
        raise typer.Exit(1) from None
    finally:
        db.dispose()


@storage_app.command("caches")
@_database_errors
def storage_caches(
    team: str | None = typer.Option(None, help="Only this team's (name or id)."),
    rm: list[str] = typer.Option(
        [], "--rm", help="Remove an entry: KIND/TEAM/KEY (kind: data-caches, teacher-caches)."
    ),
    evict: bool = typer.Option(
        False, "--evict", help="Apply each team's budget now (least recently used first)."
    ),
) -> None:
    """Tokenized data sets and teacher-logit caches per team: usage against the team's
    budget, and the entries in eviction order (least recently used first), with the jobs
    that keep an entry from being evicted."""
    import datetime as dt

    from service import caches

    settings = get_settings()
    db = _db()
    try:
        with db.session() as s:
            names = {t.id: t.name for t in admin_fns.list_teams(s)}
            budgets = {t.id: t.cache_budget_bytes for t in admin_fns.list_teams(s)}
            team_id = admin_fns.find_team(s, team).id if team else None
        for target in rm:
            kind, _, rest = target.partition("/")
            owner, _, key = rest.partition("/")
            if not caches.remove_cache(settings, kind, owner, key):
                err.print(f"[red]error[/red] no cache {escape(target)}")
                raise typer.Exit(1)
            console.print(f"removed {escape(target)}")
        if evict:
            for t in sorted({e.team_id for e in caches.list_caches(settings, team_id)}):
                for e in caches.evict(settings, t, db=db):
                    console.print(f"evicted {e.kind}/{e.team_id}/{e.key} ({_mb(e.bytes)})")
        rows = caches.list_caches(settings, team_id, db)
        for t in sorted({e.team_id for e in rows}):
            mine = [e for e in rows if e.team_id == t]
            own = budgets.get(t)
            budget = own if own is not None else settings.cache_budget_bytes
            limit = "no budget" if budget is None else _mb(budget)
            source = "" if own is not None or budget is None else " (default)"
            used_b = sum(e.bytes for e in mine)
            console.print(
                f"team {escape(names.get(t, t))} ({t}): {_mb(used_b)} of {limit}{source}, "
                f"{len(mine)} entries"
            )
            table = Table("kind", "key", "size", "last used", "in use by")
            for e in mine:  # least recently used first: the order eviction takes
                used = dt.datetime.fromtimestamp(e.last_used, dt.UTC)
                table.add_row(
                    e.kind,
                    e.key[:16],
                    _mb(e.bytes),
                    used.strftime("%Y-%m-%d %H:%M:%S"),
                    ", ".join(e.in_use) or "-",
                )
            print_table(table, console)
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@storage_app.command("prune")
@_database_errors
def storage_prune(
    keep: int | None = typer.Option(
        None, min=1, help="Checkpoints kept per job (default: each job's keep_checkpoints)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; delete nothing."),
) -> None:
    """Free space: per finished job keep the newest checkpoints and the best by eval; delete
    the rest and half-written step folders. Running jobs are left to their worker."""
    from service import upload_sessions

    store = _store()
    db = _db()
    expired: list[str] = []
    try:
        with db.session() as s:
            report = admin_fns.prune_storage(s, store, keep=keep, dry_run=dry_run)
            if dry_run:
                s.rollback()
        while not dry_run:  # expired upload sessions' bytes, 100 at a time
            with db.session() as s:
                batch = upload_sessions.sweep_expired(s, get_settings())
            expired += batch
            if len(batch) < 100:
                break
    except OSError as e:
        err.print(f"[red]error[/red] the store did not answer: {escape(str(e))}")
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    verb = "would free" if dry_run else "freed"
    for job_id, step in report.deleted:
        console.print(f"checkpoint {job_id} step {step}")
    for key in report.orphans:
        console.print(f"half-written {escape(key)}")
    if report.skipped_active:
        console.print(f"left alone (running): {', '.join(report.skipped_active)}")
    console.print(
        f"{verb} {_mb(report.freed_bytes)}: {len(report.deleted)} checkpoints, "
        f"{len(report.orphans)} half-written folders"
    )
    if expired:
        console.print(f"expired upload sessions removed: {', '.join(expired)}")


@keys_app.command("create")
@_database_errors
def keys_create(
    team: str, name: str | None = typer.Option(None, help="A label for the key.")
) -> None:
    """Create an API key for TEAM (name or id). The key is printed once and not stored."""
    db = _db()
    try:
        with db.session() as s:
            new = admin_fns.create_key(s, team, name)
        err.print(
            f"key for team {new.team} (prefix {new.prefix}); store it now, it is not shown again:"
        )
        console.print(new.key)
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@keys_app.command("revoke")
@_database_errors
def keys_revoke(prefix: str) -> None:
    """Revoke the key whose visible prefix is PREFIX."""
    db = _db()
    try:
        with db.session() as s:
            key = admin_fns.revoke_key(s, prefix)
        console.print(f"revoked {key.prefix} at {key.revoked_at.isoformat(timespec='seconds')}")  # type: ignore[union-attr]
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@keys_app.command("list")
@_database_errors
def keys_list(team: str | None = typer.Option(None, help="Only this team's keys.")) -> None:
    db = _db()
    try:
        with db.session() as s:
            rows = admin_fns.list_keys(s, team)
        table = Table("prefix", "team", "name", "created", "revoked")
        for k, t in rows:
            table.add_row(
                k.prefix,
                t.name,
                k.name or "",
                k.created_at.isoformat(timespec="seconds"),
                k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
            )
        print_table(table, console)
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@app.command("worker")
def worker_command_cli(
    pool: str | None = typer.Option(
        None, help="GPU pool to serve, e.g. h100 (default: SHARP_WORKER_POOL, else 'default')."
    ),
    gpus: int | None = typer.Option(
        None, help="GPUs this worker gives one job (default: the devices in --devices, else 1)."
    ),
    devices: str | None = typer.Option(
        None, help="CUDA_VISIBLE_DEVICES for its jobs, e.g. '0' or '0,1,2,3'."
    ),
) -> None:
    """Run a Celery worker that registers in POOL with GPUS GPUs (one job at a time)."""
    from pydantic import ValidationError

    from ops.launcher import settings_env, worker_command

    update = {"worker_pool": pool, "worker_gpu_count": gpus, "worker_gpus": devices}
    try:
        settings = Settings.model_validate(
            {
                **get_settings().model_dump(),
                **{k: v for k, v in update.items() if v is not None},
            }
        )
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        option = {"worker_pool": "--pool", "worker_gpu_count": "--gpus"}.get(field, field)
        err.print(f"[red]error[/red] {option}: {escape(first['msg'])}")
        raise typer.Exit(2) from None
    cmd = worker_command(settings)
    os.execve(cmd[0], cmd, {**os.environ, **settings_env(settings)})


@admin_app.command("migrate")
@_database_errors
def admin_migrate(revision: str = typer.Argument("head")) -> None:
    """Upgrade the database schema (alembic upgrade)."""
    from service.migrate import upgrade

    url = _settings().database_url
    upgrade(url, revision)
    console.print(f"database {_shown(url)} at {revision}")


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@admin_app.command("list")
def admin_list() -> None:
    """Teams and their keys."""
    keys_list(team=None)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
