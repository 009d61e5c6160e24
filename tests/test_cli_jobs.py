"""``sharp jobs …`` run as real subprocesses against a real uvicorn, Celery worker, Postgres
and Redis (the fixtures of conftest.py); plus the check that ``docs/spec.md`` is current.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from ops.spec_docs import spec_docs_markdown
from service.settings import Settings
from tests.conftest import ROOT, TeamKey, free_port, tiny_spec

CLI_TIMEOUT = 240


def sharp(
    *args: str, url: str, key: str, cwd: Path | None = None, columns: str | None = "200"
) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if k != "COLUMNS"},
        "SHARP_URL": url,
        "SHARP_API_KEY": key,
        # No profile file of the machine running the tests may leak in.
        "SHARP_CONFIG": str(Path(cwd or ROOT) / "no-such-profile.toml"),
        **({"COLUMNS": columns} if columns else {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "jobs", *args],
        cwd=ROOT if cwd is None else cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- docs ------------------------------------------------------------------------------------


def readme_blocks(marker: str) -> list[str]:
    """The README's code blocks that follow ``<!-- readme-test: MARKER -->``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pattern = rf"<!-- readme-test: {re.escape(marker)} -->\n```bash\n(.*?)```"
    return re.findall(pattern, text, flags=re.DOTALL)


def test_make_test_hands_out_the_longest_files_first() -> None:
    """xdist's loadfile re-sorts files by their number of tests unless told not to, which
    put the one-test end-to-end modules last, alone on one process (issue 27)."""
    from tests.conftest import E2E_SLOW_FIRST, SLOW_FIRST

    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    line = next(ln for ln in make.splitlines() if "-m pytest -n" in ln)
    assert "--dist loadfile" in line and "--no-loadscope-reorder" in line, line
    assert all((ROOT / "tests" / name).is_file() for name in SLOW_FIRST + E2E_SLOW_FIRST)


def test_the_two_tiers_cover_the_suite_and_ci_runs_both() -> None:
    """`make test` leaves the end-to-end runs (marked slow) to `make test-e2e`; the two
    select complementary halves of the suite, and CI runs both, so nothing goes untested."""
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipes = dict(re.findall(r"^([a-z0-9-]+): \$\(STAMP\)\n\t(.*)$", make, flags=re.M))
    assert recipes["test"].endswith('-m "not slow"') and recipes["test-e2e"].endswith("-m slow")
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci and "make test-e2e" in ci, ci
    # bash runs a script line by line, so a syntax error below `make test` still passed it
    # once: the whole file must parse, and the runs must come after `set -e`
    parsed = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True)
    assert parsed.returncode == 0, parsed.stderr.decode()
    assert ci.index("set -euo pipefail") < ci.index("make test") < ci.index("make test-e2e")


def test_readme_names_only_real_settings() -> None:
    """Every ``SHARP_*`` variable the README names is a setting (or a CLI/test variable)."""
    from service.settings import Settings

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\bSHARP_([A-Z0-9_]+)", text))
    settings = {n.upper() for n in Settings.model_fields}
    others = {"URL", "API_KEY", "VAR_DIR", "CONFIG", "TEST_DATABASE_URL", "TEST_REDIS_URL"}
    assert named and not named - settings - others, named - settings - others
    assert {"WEBHOOK_ALLOW_HTTP", "WEBHOOK_ALLOW_PRIVATE"} <= named


def test_spec_docs_are_current() -> None:
    committed = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    assert committed == spec_docs_markdown(), (
        "docs/spec.md is stale: run `python -m ops.spec_docs > docs/spec.md`"
    )


def test_spec_docs_cover_every_field() -> None:
    from pydantic import BaseModel

    from sharp_core.spec import JobSpec

    text = spec_docs_markdown()
    seen: set[type] = set()

    def check(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            assert f"| `{name}` |" in text, name
            ann = info.annotation
            for sub in [ann, *getattr(ann, "__args__", ())]:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    check(sub)

    check(JobSpec)
    assert "| `lr` | float | `0.0005` | > `0.0`, ≤ `1.0` |" in text


# -- no server needed ------------------------------------------------------------------------


def test_unreachable_server_exits_4(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = sharp("list", url=url, key="sk_whatever", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert "cannot reach the server" in done.stderr


def test_no_key_exits_2(tmp_path: Path) -> None:
    done = sharp("list", url="http://127.0.0.1:1", key="", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no API key" in done.stderr


def test_profile_file_is_read_and_flags_win(tmp_path: Path) -> None:
    from ops.client_cli import resolve_conn

    profile = tmp_path / "config.json"
    profile.write_text(json.dumps({"url": "http://profile:1/", "key": "sk_profile"}))
    env = dict(os.environ)
    try:
        os.environ["SHARP_CONFIG"] = str(profile)
        os.environ.pop("SHARP_URL", None)
        os.environ.pop("SHARP_API_KEY", None)
        conn = resolve_conn(None, None)
        assert (conn.url, conn.key) == ("http://profile:1", "sk_profile")
        os.environ["SHARP_API_KEY"] = "sk_env"
        assert resolve_conn(None, None).key == "sk_env"
        assert resolve_conn("http://flag:2", "sk_flag").key == "sk_flag"
        toml = tmp_path / "config.toml"
        toml.write_text('url = "http://toml:3"\nkey = "sk_toml"\n')
        os.environ["SHARP_CONFIG"] = str(toml)
        os.environ.pop("SHARP_API_KEY")
        assert resolve_conn(None, None).url == "http://toml:3"
    finally:
        os.environ.clear()
        os.environ.update(env)


# -- against the live service -------------------------------------------------------------


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("cli")


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    """conftest's, with room for the README's upload (the demo corpus, about 0.8 MB)."""
    return settings.model_copy(update={"max_upload_bytes": 4_000_000})


def _job_count(url: str, team: TeamKey) -> int:
    r = httpx.get(f"{url}/v1/jobs", params={"limit": 100}, headers=team.headers, timeout=10)
    r.raise_for_status()
    return len(r.json()["data"])


@pytest.mark.service
def test_invalid_spec_exits_2_and_sends_nothing(
    live_server: str, team: TeamKey, corpus: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(corpus, lr=5.0)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    before = _job_count(live_server, team)
    done = sharp("submit", str(path), url=live_server, key=team.key, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "spec.training.lr" in done.stderr
    assert done.stdout.strip() == ""
    assert _job_count(live_server, team) == before


@pytest.mark.service
def test_list_prints_whole_ids_when_piped(
    live_server: str, make_team, corpus: Path, tmp_path: Path
) -> None:
    """Piped (no terminal, so no width to fit), `sharp jobs list` prints whole ids and names
    that a script can use, not ``job_01M8YNSE…``."""
    owner = make_team("cli-ids")
    name = "a-long-job-name-that-a-narrow-table-would-cut-" + "x" * 20
    r = httpx.post(
        f"{live_server}/v1/jobs",
        json={"spec": tiny_spec(corpus, name=name)},
        headers=owner.headers,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    cancel = httpx.post(f"{live_server}/v1/jobs/{job_id}/cancel", headers=owner.headers)
    assert cancel.status_code == 202, cancel.text
    listed = sharp("list", url=live_server, key=owner.key, cwd=tmp_path, columns=None)
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and name in listed.stdout and "…" not in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert row.split()[1] == job_id  # `awk '{print $2}'` gets the id (after the border)


@pytest.mark.service
def test_wrong_key_exits_2(live_server: str, tmp_path: Path) -> None:
    done = sharp("list", url=live_server, key="sk_live_not_a_real_key", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "401" in done.stderr and "unauthorized" in done.stderr


@pytest.mark.service
def test_unknown_job_exits_2(live_server: str, team: TeamKey, tmp_path: Path) -> None:
    done = sharp("show", "job_does_not_exist", url=live_server, key=team.key, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "not_found" in done.stderr


@pytest.mark.service
@pytest.mark.slow
def test_readme_curl_block_runs_as_written(
    live_server: str, worker: Path, team: TeamKey, tmp_path: Path
) -> None:
    """The README's curl walk-through (upload, submit, follow, download), run by bash in a
    folder laid out like `make up`'s. Only the address and the interpreter are swapped: the
    live test API for ``http://127.0.0.1:8000``, this Python for ``.venv/bin/python``."""
    (block,) = readme_blocks("curl")
    script = block.replace("http://127.0.0.1:8000", live_server)
    script = script.replace(".venv/bin/python", sys.executable)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "demo-api-key").write_text(team.key)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr + "\n" + worker.read_text(errors="replace")[-3000:]
    assert '"status":"succeeded"' in done.stdout.replace(" ", ""), done.stdout[-3000:]
    files = {line.rsplit("/", 1)[-1] for line in done.stdout.splitlines() if "step_" in line}
    assert {"config.json", "model.safetensors", "manifest.json"} <= files, done.stdout[-800:]


@pytest.mark.service
@pytest.mark.slow
def test_submit_watch_show_list_download(
    live_server: str, worker: Path, team: TeamKey, corpus: Path, tmp_path: Path
) -> None:
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(corpus, name="cli-tiny")))

    done = sharp(
        "submit",
        str(spec_path),
        "--watch",
        "--idempotency-key",
        "cli-1",
        url=live_server,
        key=team.key,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + "\n" + worker.read_text(errors="replace")[-3000:]
    job_id = done.stdout.strip()
    assert job_id.startswith("job_"), done.stdout
    assert "succeeded" in done.stderr

    # The same idempotency key and spec: the same job, nothing new queued.
    again = sharp(
        "submit",
        str(spec_path),
        "--idempotency-key",
        "cli-1",
        url=live_server,
        key=team.key,
        cwd=tmp_path,
    )
    assert again.returncode == 0 and again.stdout.strip() == job_id, again.stderr

    shown = sharp("show", job_id, url=live_server, key=team.key, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert job_id in shown.stdout and "succeeded" in shown.stdout and "loss" in shown.stdout

    listed = sharp("list", "--status", "succeeded", url=live_server, key=team.key, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout

    # watch on a finished job returns its outcome at once.
    watched = sharp("watch", job_id, url=live_server, key=team.key, cwd=tmp_path)
    assert watched.returncode == 0, watched.stderr

    # A job that already succeeded cannot be retried: 409 → exit 2.
    retried = sharp("retry", job_id, url=live_server, key=team.key, cwd=tmp_path)
    assert retried.returncode == 2 and "invalid_state" in retried.stderr, retried.stderr

    api = httpx.Client(base_url=live_server, headers=team.headers, timeout=30)
    ckpts = api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    last = max(ckpts, key=lambda c: c["step"])
    out = tmp_path / "student"
    dl = sharp("download", job_id, "--out", str(out), url=live_server, key=team.key, cwd=tmp_path)
    assert dl.returncode == 0, dl.stderr
    assert Path(dl.stdout.strip()) == out
    student = [m for m in last["files"] if not m["name"].startswith("dcp/")]
    assert len(student) < len(last["files"]) and not (out / "dcp").exists()  # the student only
    for meta in student:
        assert _sha256(out / meta["name"]) == meta["sha256"], meta["name"]

    # Resume: a partial file is completed with a Range request and verified.
    big = max(student, key=lambda f: f["size"])
    target = out / big["name"]
    data = target.read_bytes()
    target.unlink()
    target.with_name(target.name + ".part").write_bytes(data[: len(data) // 2])
    dl2 = sharp("download", job_id, "--out", str(out), url=live_server, key=team.key, cwd=tmp_path)
    assert dl2.returncode == 0, dl2.stderr
    assert f"resumed {big['name']}" in dl2.stderr
    assert _sha256(target) == big["sha256"]
    assert not target.with_name(target.name + ".part").exists()

    # An earlier step by --step; an unknown step is bad input.
    first = min(ckpts, key=lambda c: c["step"])
    dl3 = sharp(
        "download",
        job_id,
        "--step",
        str(first["step"]),
        url=live_server,
        key=team.key,
        cwd=tmp_path,
    )
    assert dl3.returncode == 0, dl3.stderr
    assert (tmp_path / job_id / f"step_{first['step']:06d}").is_dir()
    bad = sharp("download", job_id, "--step", "999999", url=live_server, key=team.key, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 1
    api.close()


@pytest.mark.service
@pytest.mark.slow
def test_cancel_then_watch_exits_3(
    live_server: str, worker: Path, team: TeamKey, corpus: Path, tmp_path: Path
) -> None:
    spec_path = tmp_path / "long.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(corpus, max_steps=100_000, name="cli-cancel")))
    done = sharp("submit", str(spec_path), url=live_server, key=team.key, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    cancelled = sharp("cancel", job_id, url=live_server, key=team.key, cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert job_id in cancelled.stdout
    watched = sharp("watch", job_id, url=live_server, key=team.key, cwd=tmp_path)
    assert watched.returncode == 3, watched.stderr
    assert "cancelled" in watched.stderr


@pytest.mark.service
@pytest.mark.slow
def test_failed_job_watch_exits_1(
    live_server: str, worker: Path, team: TeamKey, corpus: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(corpus, name="cli-fail")
    spec["dataset"]["files"] = [str(tmp_path / "no-such-corpus.txt")]
    spec["resources"] = {"max_attempts": 1}
    spec_path = tmp_path / "fail.json"
    spec_path.write_text(json.dumps(spec))
    done = sharp("submit", str(spec_path), "--watch", url=live_server, key=team.key, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "failed" in done.stderr


def test_watch_state_keeps_sharp_terms() -> None:
    from ops.follow import JobState

    state = JobState()
    state.apply(
        "metrics",
        {
            "metrics": [
                {
                    "step": 3,
                    "values": {
                        "loss": 2.5,
                        "sharp_layer": 0.9,
                        "sharp_head": 0.4,
                        "tokens_per_s": 1000.0,
                    },
                },
                {"step": 4, "values": {"loss": 2.4, "sharp_token": 0.2, "tokens_per_s": 0.0}},
            ]
        },
    )
    state.apply("status", {"status": "running"})
    assert state.step == 4 and state.loss == 2.4 and state.tokens_per_s == 1000.0
    assert state.terms == {"sharp_layer": 0.9, "sharp_head": 0.4, "sharp_token": 0.2}
    assert state.status == "running"
    assert state.eval_summary() == "eval -"
    state.apply("metrics", {"metrics": [{"step": 5, "values": {"eval_ppl": 12.34}}]})
    assert state.eval_summary() == "ppl 12.3"


def test_watch_shows_accuracy_and_macro_f1_for_classifiers() -> None:
    from ops.follow import JobState

    state = JobState()
    state.apply(
        "metrics",
        {"metrics": [{"step": 10, "values": {"eval_accuracy": 0.875, "eval_macro_f1": 0.8612}}]},
    )
    assert (state.eval_accuracy, state.eval_macro_f1) == (0.875, 0.8612)
    assert state.eval_summary() == "acc 0.875 f1 0.861"
