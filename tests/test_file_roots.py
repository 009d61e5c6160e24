"""``dataset.source: files`` reads only under the configured roots (issue 13, item 7).

Measured before: with ``SHARP_DATASET_FILE_ROOTS`` unset, a job reading ``/etc/passwd`` was
accepted (201) and its worker would have trained on it. Now no roots means no files (422
naming ``spec.dataset.files``), every path is judged by its real path (a symlink or ``..``
that leaves the roots is refused), the training process checks again where it reads, and
both deployments configure a root: ``sharp up`` its ``<var>/data``, the compose file
``/data/datasets``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from api.app import create_app
from api.embedded import embedded_settings
from api.errors import InvalidRequestError
from api.services import confine_dataset_files
from api.settings import Settings
from tests.conftest import ROOT, TeamKey, tiny_spec

# -- the check itself (no service) -------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A root holding ``ok.txt``, and a sibling folder outside it holding ``secret.txt``."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "ok.txt").write_text("fine\n")
    (outside / "secret.txt").write_text("do not train on me\n")
    return root, outside


def _refusal(files: list[str], roots: list[Path]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        confine_dataset_files(files, roots)
    assert e.value.code == "file_not_allowed" and e.value.status == 422
    assert e.value.retryable is False
    return e.value


def test_no_roots_refuses_every_file(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    for files in (["/etc/passwd"], [str(root / "ok.txt")]):
        err = _refusal(files, [])
        assert err.param == "spec.dataset.files"
        assert "SHARP_DATASET_FILE_ROOTS" in err.message


def test_paths_inside_a_root_are_returned_as_real_paths(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("b\n")
    (root / "alias.txt").symlink_to(root / "sub" / "b.txt")  # a link that stays inside
    got = confine_dataset_files(
        [str(root / "ok.txt"), str(root / "sub" / ".." / "ok.txt"), str(root / "alias.txt")],
        [root],
    )
    assert got == [root / "ok.txt", root / "ok.txt", root / "sub" / "b.txt"]
    # A file that does not exist yet is not the check's business (the loader reports it).
    assert confine_dataset_files([str(root / "later.txt")], [root]) == [root / "later.txt"]


def test_paths_leaving_every_root_are_refused_with_their_index(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    cases = {
        "/etc/passwd": "/etc/passwd",
        str(root / ".." / "outside" / "secret.txt"): str(outside / "secret.txt"),
        str(root / "escape.txt"): str(outside / "secret.txt"),
        str(root / "linkdir" / "secret.txt"): str(outside / "secret.txt"),
    }
    for bad, real in cases.items():
        err = _refusal([str(root / "ok.txt"), bad], [root])
        assert err.param == "spec.dataset.files.1", bad
        assert real in err.message, err.message
    assert _refusal([str(root / "loop")], [root]).param == "spec.dataset.files.0"
    # A root that is itself a link counts by its real path too.
    (tree[0].parent / "root-link").symlink_to(root, target_is_directory=True)
    assert confine_dataset_files([str(root / "ok.txt")], [tree[0].parent / "root-link"]) == [
        root / "ok.txt"
    ]


def test_tilde_is_judged_where_the_loader_reads(
    tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader expands ``~``; a check that did not would judge another path."""
    root, outside = tree
    monkeypatch.setenv("HOME", str(outside))
    monkeypatch.chdir(root)  # "~/secret.txt" unexpanded would look like root/~/secret.txt
    assert _refusal(["~/secret.txt"], [root]).param == "spec.dataset.files.0"


# -- where the roots come from -------------------------------------------------------------------


def test_sharp_up_reads_under_its_data_dir_unless_told(tmp_path: Path) -> None:
    def make(base: Settings) -> Settings:
        return embedded_settings(
            base, tmp_path / "var", redis_port=1, redis_password="x", host="h", port=2
        )

    default = make(Settings())
    assert default.dataset_file_roots == [(tmp_path / "var" / "data").resolve()]
    explicit = make(Settings(dataset_file_roots=[tmp_path / "corpora"]))
    assert explicit.dataset_file_roots == [(tmp_path / "corpora").resolve()]


def test_compose_sets_an_explicit_root_for_api_and_worker() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("api", "worker"):
        value = str(services[name]["environment"]["SHARP_DATASET_FILE_ROOTS"])
        assert '["/data/datasets"]' in value, value


# -- through the API and a real worker -------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the API's root, the worker's narrower root inside it)."""
    api_root = tmp_path_factory.mktemp("api-root")
    worker_root = api_root / "worker-only"
    worker_root.mkdir()
    return api_root, worker_root


@pytest.fixture(scope="module")
def settings(settings: Settings, roots: tuple[Path, Path]) -> Settings:
    """The worker's settings (the `worker` fixture reads these): the narrow root."""
    return settings.model_copy(update={"dataset_file_roots": [roots[1]]})


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("roots")


def _client(settings: Settings, roots: list[Path]) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"dataset_file_roots": roots})))


@pytest.mark.service
def test_api_without_roots_refuses_files_jobs(settings: Settings, team: TeamKey) -> None:
    """The measured defect: this was a 201."""
    spec = tiny_spec(Path("/etc/passwd"))
    with _client(settings, []) as c:
        r = c.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("file_not_allowed", "spec.dataset.files")
        assert c.get("/v1/jobs", headers=team.headers).json()["data"] == []


@pytest.mark.service
def test_api_with_roots_refuses_links_out_and_accepts_files_in(
    settings: Settings, team: TeamKey, roots: tuple[Path, Path], tmp_path: Path
) -> None:
    api_root = roots[0]
    secret = tmp_path / "secret.txt"  # outside api_root (another tmp folder)
    secret.write_text("private\n")
    link = api_root / "innocent.txt"
    link.symlink_to(secret)
    good = api_root / "good.txt"
    good.write_text("hello\n")
    with _client(settings, [api_root]) as c:
        via_dotdot = api_root / ".." / tmp_path.name / secret.name
        for bad in ("/etc/passwd", str(link), str(via_dotdot)):
            spec = tiny_spec(Path(bad))
            r = c.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
            assert r.status_code == 422, (bad, r.text)
            err = r.json()["error"]
            assert (err["code"], err["param"]) == ("file_not_allowed", "spec.dataset.files.0")
        # A pool nobody serves: the accepted job waits and never reaches the worker.
        spec = {**tiny_spec(good), "resources": {"queue": "nobody-serves-this"}}
        r = c.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 201, r.text


@pytest.mark.service
def test_worker_refuses_a_file_outside_its_roots(
    settings: Settings, worker: Path, team: TeamKey, roots: tuple[Path, Path], corpus: Path
) -> None:
    """The API accepted the job (its roots are wider, as after a root list was narrowed or a
    link swapped in since submission); the training process checks again before reading
    and the job fails at once, not retried, naming the file."""
    api_root, _ = roots
    data = api_root / "corpus.txt"
    data.write_text(corpus.read_text())
    with _client(settings, [api_root]) as c:
        r = c.post("/v1/jobs", json={"spec": tiny_spec(data)}, headers=team.headers)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        job = r.json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job still {job['status']}"
            time.sleep(0.5)
            job = c.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
    assert job["status"] == "failed", job
    assert job["attempt"] == 1
    assert (job["error"]["code"], job["error"]["param"]) == (
        "file_not_allowed",
        "spec.dataset.files.0",
    )
    assert os.fspath(data) in job["error"]["message"]
