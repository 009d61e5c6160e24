"""Per-team cache budgets (issue 23): real tokenized entries built and read through the
store a job gets (`service.caches.TrackedCacheStore`), last use and users recorded in
Postgres, least recently used evicted first against the team's own budget (or the
deployment's default), an entry a running job uses never evicted — also while a reader holds
its row lock — and `sharp admin teams set-budget` / `sharp admin storage caches`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service import admin, caches
from service.db import Database
from service.models import Job
from service.repositories import CacheRecordRepository
from service.settings import Settings, get_settings
from service.teacher_caches import store_for
from sharp_core.data.lm import LMSource, prepare_lm
from sharp_core.models.loading import train_bpe_tokenizer
from sharp_core.spec import DatasetSpec
from tests.conftest import TeamKey, tiny_spec
from tests.helpers import corpus_text

pytestmark = pytest.mark.service

KIND = "data-caches"


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"cache_budget_bytes": 10**12})


def _job(client: TestClient, team: TeamKey, corpus: Path, db: Database, status: str) -> str:
    r = client.post("/v1/jobs", json={"spec": tiny_spec(corpus)}, headers=team.headers)
    assert r.status_code == 201, r.text
    with db.session() as s:
        job = s.get(Job, r.json()["id"])
        assert job is not None
        job.status = status  # the state a worker would have put it in
    return str(r.json()["id"])


def _build(settings, db, team, job_id, tok, ds, seq_len) -> tuple[str, str]:  # noqa: ANN001
    """A real tokenized entry through the store a job gets; (key, role)."""
    store = caches.tracked_store(settings, db, team, KIND, job_id)
    data = prepare_lm(ds, LMSource(ds, None), tok, seq_len, store=store)
    return data.key, data.info["role"]


def test_lru_per_team_budget_and_entries_in_use_kept(
    settings: Settings, db: Database, client: TestClient, make_team, corpus: Path, tmp_path: Path
) -> None:
    team = make_team("budget")
    running = _job(client, team, corpus, db, "running")
    done = _job(client, team, corpus, db, "succeeded")
    tok = train_bpe_tokenizer([corpus_text(20_000)], 300)
    text = tmp_path / "c.txt"
    text.write_text(corpus_text(40_000))
    ds = DatasetSpec(files=[str(text)])

    old, role = _build(settings, db, team.team_id, done, tok, ds, 32)
    assert role == "built"
    busy, _ = _build(settings, db, team.team_id, running, tok, ds, 48)
    newer, _ = _build(settings, db, team.team_id, done, tok, ds, 64)
    time.sleep(0.01)
    again, role = _build(settings, db, team.team_id, done, tok, ds, 32)  # a job reads it
    assert (again, role) == (old, "read")

    listed = caches.list_caches(settings, team.team_id, db)
    # least recently used first: the running job's entry, then 64 (the read moved 32 last)
    assert [e.key for e in listed] == [busy, newer, old]
    assert [e.in_use for e in listed] == [(running,), (), ()]
    sizes = {e.key: e.bytes for e in listed}
    with db.session() as s:
        rows = {r.key: r for r in CacheRecordRepository(s).for_team(team.team_id)}
        assert rows[old].last_used_at > rows[newer].last_used_at > rows[busy].last_used_at
        assert rows[newer].bytes == sizes[newer]  # recorded when it was built

    # The team's own budget fits two entries: the oldest (in use) stays, the next one goes
    with db.session() as s:
        admin.set_cache_budget(s, team.name, sizes[busy] + sizes[old])
    assert caches.budget_of(settings, team.team_id, db) == sizes[busy] + sizes[old]
    gone = caches.evict(settings, team.team_id, db=db)
    assert [e.key for e in gone] == [newer]
    assert sorted(e.key for e in caches.list_caches(settings, team.team_id)) == sorted([busy, old])

    # Over budget with only the in-use entry left to take: kept until its job ends
    with db.session() as s:
        admin.set_cache_budget(s, team.name, 1)
    assert [e.key for e in caches.evict(settings, team.team_id, db=db)] == [old]
    assert [e.key for e in caches.list_caches(settings, team.team_id)] == [busy]
    with db.session() as s:
        job = s.get(Job, running)
        assert job is not None
        job.status = "succeeded"
    assert [e.key for e in caches.evict(settings, team.team_id, db=db)] == [busy]
    with db.session() as s:
        assert CacheRecordRepository(s).for_team(team.team_id) == []

    # A team without its own budget gets the deployment's default
    with db.session() as s:
        admin.set_cache_budget(s, team.name, None)
    assert caches.budget_of(settings, team.team_id, db) == 10**12
    assert caches.budget_of(settings.model_copy(update={"cache_budget_bytes": None}),
                            team.team_id, db) is None  # fmt: skip


def test_eviction_waits_for_a_reader_holding_the_row_lock(
    settings: Settings, db: Database, client: TestClient, make_team, corpus: Path
) -> None:
    """The reader locked the row first (it is recording its use): eviction waits on the lock,
    then sees the user and keeps the entry."""
    team = make_team("race")
    running = _job(client, team, corpus, db, "running")
    store = store_for(settings, team.team_id, KIND)
    staged = store.staging("k1")
    (staged / "blob.bin").write_bytes(b"x" * 5000)
    (staged / "manifest.json").write_text('{"key": "k1"}')
    store.put("k1", staged)

    out: list = []
    with db.sessionmaker() as reader:
        repo = CacheRecordRepository(reader)
        from service.models import utcnow

        repo.ensure(team.team_id, KIND, "k1", nbytes=5000, used=utcnow())
        reader.commit()
        row = repo.lock(team.team_id, KIND, "k1")
        assert row is not None
        evictor = threading.Thread(
            target=lambda: out.append(caches.evict(settings, team.team_id, budget=0, db=db))
        )
        evictor.start()
        time.sleep(1.0)
        assert evictor.is_alive()  # blocked on the reader's lock
        repo.use(row, running, utcnow())
        reader.commit()
    evictor.join(30)
    assert out == [[]] and store.exists("k1")


def test_cli_sets_a_budget_and_shows_usage(
    settings: Settings, db: Database, make_team, monkeypatch
) -> None:
    team = make_team("cli")
    store = store_for(settings, team.team_id, KIND)
    staged = store.staging("abc")
    (staged / "blob.bin").write_bytes(b"x" * 2_000_000)
    (staged / "manifest.json").write_text('{"key": "abc"}')
    store.put("abc", staged)
    monkeypatch.setenv("SHARP_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SHARP_ARTIFACT_ROOT", str(settings.artifact_root))
    monkeypatch.delenv("SHARP_CACHE_BUDGET_BYTES", raising=False)
    get_settings.cache_clear()
    try:
        from ops.cli import app

        r = CliRunner().invoke(app, ["admin", "teams", "set-budget", team.name, "1.5MB"])
        assert r.exit_code == 0, r.output
        assert "cache budget 1.5 MB (1500000 bytes)" in r.output
        bad = CliRunner().invoke(app, ["admin", "teams", "set-budget", team.name, "lots"])
        assert bad.exit_code == 1 and "a size in bytes" in bad.output
        r = CliRunner().invoke(app, ["admin", "storage", "caches", "--team", team.name])
        assert r.exit_code == 0, r.output
        assert f"({team.team_id}): 2.0 MB of 1.5 MB, 1 entries" in r.output
        r = CliRunner().invoke(app, ["admin", "storage", "caches", "--team", team.name, "--evict"])
        assert f"evicted {KIND}/{team.team_id}/abc" in r.output
        r = CliRunner().invoke(app, ["admin", "teams", "list"])
        assert "1.5 MB" in r.output
    finally:
        get_settings.cache_clear()
