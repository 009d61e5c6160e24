"""Migrations: the reviewed revisions build exactly the models' schema, on Postgres and SQLite.

``alembic check`` fails if a model changed without a migration; downgrade to base must leave
nothing behind, so a bad deploy can be rolled back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect

from api.app import create_app
from service.admin import create_key, create_team
from service.db import Database
from service.migrate import check, downgrade, upgrade
from service.settings import Settings
from tests.conftest import ROOT, tiny_spec

pytestmark = pytest.mark.service

TABLES = {
    "teams",
    "api_keys",
    "jobs",
    "job_events",
    "metrics",
    "checkpoints",
    "uploads",
    "workers",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "teacher_caches",
    "teacher_cache_uses",
    "sweeps",
    "sweep_cells",
    "step_costs",
    "teacher_scores",
    "upload_sessions",
    "cache_entries",
    "cache_entry_uses",
}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_postgres_models_match_migrations(db_url: str) -> None:
    check(db_url)  # raises if autogenerate would emit anything
    engine = create_engine(db_url)
    try:
        insp = inspect(engine)
        assert {c["name"] for c in insp.get_check_constraints("jobs")} >= {
            "ck_jobs_status",
            "ck_jobs_attempt_nonnegative",
        }
        assert {u["name"] for u in insp.get_unique_constraints("jobs")} == {
            "uq_jobs_team_id_idempotency_key"
        }
        assert insp.get_pk_constraint("metrics")["constrained_columns"] == [
            "job_id",
            "step",
            "name",
        ]
    finally:
        engine.dispose()


def test_postgres_downgrade_to_base_and_back(db_url: str) -> None:
    assert _tables(db_url) == TABLES
    downgrade(db_url, "base")
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES
    check(db_url)


def _revision_0011_round_trip(url: str) -> None:
    """0011 down and up again with rows in place: a team's budget and a session survive the
    way up, the new tables and the column go on the way down."""
    engine = create_engine(url)
    try:
        with engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO teams (id, name, created_at, weight, cache_budget_bytes) "
                "VALUES ('team_m11', 'm11', '2026-12-04 00:00:00+00', 1, 12345)"
            )
        downgrade(url, "0010")
        assert {"upload_sessions", "cache_entries", "cache_entry_uses"}.isdisjoint(_tables(url))
        cols = {c["name"] for c in inspect(engine).get_columns("teams")}
        assert "cache_budget_bytes" not in cols and "max_queued_jobs" in cols
        upgrade(url)
        with engine.begin() as c:
            row = c.exec_driver_sql(
                "SELECT name, cache_budget_bytes FROM teams WHERE id = 'team_m11'"
            ).one()
            assert tuple(row) == ("m11", None)  # the team stays; its budget is the default
            c.exec_driver_sql("DELETE FROM teams WHERE id = 'team_m11'")
        check(url)
    finally:
        engine.dispose()


def test_postgres_0011_down_and_up_with_rows(db_url: str) -> None:
    _revision_0011_round_trip(db_url)
    assert _tables(db_url) == TABLES


def test_sqlite_migrate_check_smoke_and_downgrade(
    tmp_path: Path, settings: Settings, corpus: Path, queue_length
) -> None:
    url = f"sqlite:///{tmp_path / 'sharp.db'}"
    upgrade(url)
    check(url)
    assert _tables(url) == TABLES

    lite = settings.model_copy(update={"database_url": url})
    db = Database(lite)
    with db.session() as s:
        team = create_team(s, "lite")
        key = create_key(s, team.name).key
    db.dispose()
    h = {"Authorization": f"Bearer {key}"}
    before = queue_length()
    with TestClient(create_app(lite)) as client:
        created = client.post(
            "/v1/jobs", json={"spec": tiny_spec(corpus)}, headers={**h, "Idempotency-Key": "k"}
        )
        assert created.status_code == 201, created.text
        job = created.json()
        again = client.post(
            "/v1/jobs", json={"spec": tiny_spec(corpus)}, headers={**h, "Idempotency-Key": "k"}
        )
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        listed = client.get("/v1/jobs", headers=h).json()
        assert [j["id"] for j in listed["data"]] == [job["id"]]
        got = client.get(f"/v1/jobs/{job['id']}", headers=h).json()
        assert got["status"] == "queued" and got["created_at"].endswith(("Z", "+00:00"))
        # No worker registered in this database: the job waits, and says why.
        assert got["queue_reason"] == "no worker serves pool 'default'"
        assert (
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).json()["status"] == "cancelled"
        )
        assert client.get("/readyz").status_code == 200
    assert queue_length() == before  # nothing admitted, so no message

    _revision_0011_round_trip(url)
    downgrade(url, "base")
    assert _tables(url) == set()


def test_admin_cli_creates_lists_and_revokes_keys(tmp_path: Path) -> None:
    """``sharp admin …`` end to end, as an operator runs it (a fresh process per command)."""
    env = {**os.environ, "SHARP_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}

    def sharp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ops.cli", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert sharp("admin", "migrate").returncode == 0
    assert sharp("admin", "teams", "create", "research").returncode == 0
    assert sharp("admin", "teams", "create", "research").returncode == 1  # exists
    created = sharp("admin", "keys", "create", "research", "--name", "laptop")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("sharp_") and len(key) > 40
    listed = sharp("admin", "keys", "list")
    assert key[:14] in listed.stdout and key not in listed.stdout  # only the prefix is shown
    assert sharp("admin", "keys", "revoke", key[:14]).returncode == 0
    assert sharp("admin", "keys", "create", "nope").returncode == 1


def test_admin_cli_uses_the_sharp_up_database_beside_it(tmp_path: Path) -> None:
    """Beside a `sharp up` var dir (``var/sharp.db``) and with no SHARP_DATABASE_URL, ``sharp
    admin`` talks to that database; a database without tables is one line naming its URL and
    how to point admin elsewhere, not a traceback."""
    var = tmp_path / "var"
    var.mkdir()
    upgrade(f"sqlite:///{var / 'sharp.db'}")  # what `sharp up` builds
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARP_")}
    env["PYTHONPATH"] = str(ROOT)

    def sharp(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ops.cli", "admin", *args],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    made = sharp("teams", "create", "research")
    assert made.returncode == 0, made.stderr
    created = sharp("keys", "create", "research")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    listed = sharp("keys", "list")
    assert listed.returncode == 0 and key[:14] in listed.stdout
    engine = create_engine(f"sqlite:///{var / 'sharp.db'}")
    try:
        with engine.connect() as conn:
            names = [r[0] for r in conn.exec_driver_sql("select name from teams")]
    finally:
        engine.dispose()
    assert names == ["research"]

    # Elsewhere, with a URL whose database has no tables: one line, the URL, the way out.
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    failed = sharp("keys", "list", SHARP_DATABASE_URL=empty)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert empty in failed.stderr and "no such table" in failed.stderr
    assert "SHARP_DATABASE_URL" in failed.stderr and "--var-dir" in failed.stderr
    # --var-dir (or SHARP_VAR_DIR) names another `sharp up` folder.
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = subprocess.run(
        [sys.executable, "-m", "ops.cli", "admin", "--var-dir", str(var), "teams", "list"],
        env={**env, "COLUMNS": "200"},
        cwd=other,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert moved.returncode == 0 and "research" in moved.stdout, moved.stderr
