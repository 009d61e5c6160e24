"""Caches in the artifact store (service.caches): listed per team with size and last use,
removable, and held to a per-team budget by evicting the least recently used entry of
either kind (tokenized data or teacher logits) first; `sharp admin storage caches` shows it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from service import caches
from service.settings import Settings, get_settings
from service.teacher_caches import store_for


def _entry(settings: Settings, kind: str, team: str, key: str, size: int, used: float) -> None:
    store = store_for(settings, team, kind)
    staged = store.staging(key)
    (staged / "blob.bin").write_bytes(b"x" * size)
    (staged / "manifest.json").write_text(json.dumps({"key": key}))
    folder = store.put(key, staged)
    os.utime(folder / "manifest.json", (used, used))


def test_listed_removed_and_evicted_least_recently_used_first(
    tmp_path: Path, monkeypatch, db_url: str
):
    s = Settings(artifact_root=tmp_path / "artifacts", cache_budget_bytes=15_000)
    _entry(s, "data-caches", "t1", "d-old", 10_000, 1_000)
    _entry(s, "teacher-caches", "t1", "t-mid", 10_000, 2_000)
    _entry(s, "data-caches", "t1", "d-new", 10_000, 3_000)
    _entry(s, "teacher-caches", "t2", "other", 50_000, 500)  # another team's: not counted
    listed = caches.list_caches(s, "t1")
    assert [e.key for e in listed] == ["d-old", "t-mid", "d-new"]
    assert all(e.bytes > 10_000 for e in listed)  # the blob and its manifest
    gone = caches.evict(s, "t1")
    assert [e.key for e in gone] == ["d-old", "t-mid"]  # across both kinds, oldest first
    assert [e.key for e in caches.list_caches(s, "t1")] == ["d-new"]
    assert [e.key for e in caches.list_caches(s, "t2")] == ["other"]  # t2 untouched

    monkeypatch.setenv("SHARP_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("SHARP_DATABASE_URL", db_url)  # budgets and last uses live there
    get_settings.cache_clear()
    try:
        from ops.cli import app

        r = CliRunner().invoke(
            app, ["admin", "storage", "caches", "--rm", "teacher-caches/t2/other"]
        )
        assert r.exit_code == 0, r.output
        assert "removed teacher-caches/t2/other" in r.output and "d-new" in r.output
        assert caches.list_caches(s, "t2") == []
        r = CliRunner().invoke(app, ["admin", "storage", "caches", "--rm", "data-caches/t9/none"])
        assert r.exit_code == 1
    finally:
        get_settings.cache_clear()
