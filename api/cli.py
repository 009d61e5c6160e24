"""The ``sharp`` command. A Typer app others extend (``up``, ``demo``, ``jobs …``).

Add a command group with ``app.add_typer(group, name="jobs")`` from your own module and
import that module in `main` (or here); ``admin`` is the operator group for teams and keys.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from api import admin as admin_fns
from api.client_cli import jobs_app
from api.db import Database
from api.demo import demo_command
from api.embedded import up_command
from api.errors import SharpError
from api.settings import get_settings

app = typer.Typer(help="SHARP distillation service.", no_args_is_help=True)
admin_app = typer.Typer(
    help="Operator commands (talk to the database directly).", no_args_is_help=True
)
teams_app = typer.Typer(help="Teams.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
app.add_typer(jobs_app, name="jobs")  # the HTTP client (api/client_cli.py)
admin_app.add_typer(teams_app, name="teams")
admin_app.add_typer(keys_app, name="keys")
app.command("up")(up_command)  # the embedded service (api/embedded.py)
app.command("demo")(demo_command)  # the demo pipeline through the API (api/demo.py)

console = Console()
err = Console(stderr=True)


def _db() -> Database:
    return Database(get_settings())


def _fail(e: SharpError) -> None:
    err.print(f"[red]error[/red] {e.code}: {e.message}")
    raise typer.Exit(1)


@teams_app.command("create")
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
def teams_list() -> None:
    db = _db()
    try:
        with db.session() as s:
            teams = admin_fns.list_teams(s)
        table = Table("id", "name", "created")
        for t in teams:
            table.add_row(t.id, t.name, t.created_at.isoformat(timespec="seconds"))
        console.print(table)
    finally:
        db.dispose()


@keys_app.command("create")
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
        console.print(table)
    except SharpError as e:
        _fail(e)
    finally:
        db.dispose()


@admin_app.command("migrate")
def admin_migrate(revision: str = typer.Argument("head")) -> None:
    """Upgrade the database schema (alembic upgrade)."""
    from api.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    console.print(f"database at {revision}")


@admin_app.command("list")
def admin_list() -> None:
    """Teams and their keys."""
    keys_list(team=None)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
