"""``sharp webhooks …``: a team's signed webhook endpoints over the HTTP API (add, list, rm,
deliveries). Connection, profile and exit codes are those of ``sharp jobs``
(`ops.client_cli`); ``add`` prints the signing secret on stdout, the only time it is shown.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ops.client_cli import (
    EXIT_OK,
    KeyOpt,
    UrlOpt,
    check,
    client,
    err,
    fmt_time,
    out,
    print_table,
    run,
)
from service.webhooks import EVENTS

webhooks_app = typer.Typer(
    help="Signed webhooks for this team's jobs (docs/api.md, 'Webhooks').", no_args_is_help=True
)


@webhooks_app.command("add")
def add_cmd(
    endpoint: str = typer.Argument(..., metavar="URL", help="https URL of the receiver."),
    event: list[str] = typer.Option(
        [],
        "--event",
        "-e",
        help=f"Subscribe to this event (repeatable; default all: {', '.join(EVENTS)}).",
    ),
    description: str | None = typer.Option(None, "--description", "-d"),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON (with the secret)."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Register URL; print its id and signing secret (shown this once)."""

    def body() -> int:
        payload: dict[str, Any] = {"url": endpoint}
        if event:
            payload["events"] = event
        if description:
            payload["description"] = description
        with client(url, key) as c:
            hook = check(c.post("/v1/webhooks", json=payload))
        if as_json:
            out.print_json(data=hook)
            return EXIT_OK
        out.print(f"{hook['id']} {hook['secret']}")
        err.print(
            f"webhook {hook['id']} for {escape(', '.join(hook['events']))}; the signing secret "
            "above is not shown again: keep it where your receiver can read it"
        )
        return EXIT_OK

    run(body)


@webhooks_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="The API's JSON instead of a table."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """This team's endpoints (secrets are never shown again, only their first characters)."""

    def body() -> int:
        with client(url, key) as c:
            page = check(c.get("/v1/webhooks"))
        if as_json:
            out.print_json(data=page)
            return EXIT_OK
        table = Table("id", "url", "events", "secret", "created")
        for h in page["data"]:
            table.add_row(
                h["id"],
                escape(h["url"]),
                ", ".join(h["events"]),
                h["secret_prefix"] + "…",
                fmt_time(h["created_at"]),
            )
        print_table(table)
        return EXIT_OK

    run(body)


@webhooks_app.command("rm")
def rm_cmd(
    webhook_id: str = typer.Argument(..., metavar="ID"),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Delete an endpoint and its delivery log (pending deliveries are dropped)."""

    def body() -> int:
        with client(url, key) as c:
            r = c.delete(f"/v1/webhooks/{webhook_id}")
            if r.status_code != 204:
                check(r)
        out.print(f"{webhook_id} deleted")
        return EXIT_OK

    run(body)


@webhooks_app.command("deliveries")
def deliveries_cmd(
    webhook_id: str = typer.Argument(..., metavar="ID"),
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=100),
    as_json: bool = typer.Option(False, "--json", help="The API's JSON instead of a table."),
    url: str | None = UrlOpt,
    key: str | None = KeyOpt,
) -> None:
    """Recent deliveries, newest first, with every attempt's status code, time and error."""

    def body() -> int:
        with client(url, key) as c:
            page = check(c.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": limit}))
        if as_json:
            out.print_json(data=page)
            return EXIT_OK
        table = Table("delivery", "event", "job", "status", "attempts", "next attempt")
        for d in page["data"]:
            tries = "; ".join(
                f"#{a['attempt']} {a['status_code'] or escape(a['error'] or '?')} "
                f"{(a['duration_ms'] or 0):.0f} ms"
                for a in d["attempts"]
            )
            table.add_row(
                d["id"],
                d["event_type"],
                d["job_id"] or "",
                d["status"],
                tries or "-",
                fmt_time(d["next_attempt_at"]),
            )
        print_table(table)
        return EXIT_OK

    run(body)
