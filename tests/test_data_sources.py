"""Large sources (issue 23, item 5): ``s3://`` objects and globs over keys, ``save_to_disk``
folders, and the HF token that reaches the training process but never its text.

The S3 API is a real server (moto in server mode on loopback, as tests/test_store.py); the
artifact store of this module's service is a bucket on it, and the data a second bucket.
A real Celery worker runs the service jobs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from service import redact
from service.data_sources import check_s3_allowed
from service.errors import InvalidRequestError
from service.jobs import confine_dataset_files
from service.models import Job, JobEvent
from service.settings import Settings, settings_env
from sharp_core.data import tokenized
from sharp_core.data.loading import load_table
from sharp_core.data.sources import fetch_s3_entry, list_s3
from sharp_core.errors import DataError
from sharp_core.spec import DatasetSpec
from tests.conftest import TeamKey, tiny_spec, wait_for
from tests.helpers import CHAT_TEMPLATE, moto_server
from worker.supervisor import child_env

ARTIFACTS, PREFIX, DATA = "sharp-artifacts", "deploy", "sharp-data"
#: This module's HF token: the worker has it as SHARP_HF_TOKEN.
TOKEN = "hf_" + secrets.token_hex(16)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def s3(moto: str):  # noqa: ANN201 - a boto3 client straight to moto
    client = boto3.client("s3", endpoint_url=moto)
    client.create_bucket(Bucket=ARTIFACTS)
    client.create_bucket(Bucket=DATA)
    return client


@pytest.fixture(scope="module")
def settings(settings: Settings, moto: str, s3) -> Settings:
    return settings.model_copy(
        update={
            "artifact_url": f"s3://{ARTIFACTS}/{PREFIX}",
            "artifact_endpoint_url": moto,
            "artifact_retry_s": 3.0,
            "dataset_s3_roots": [f"s3://{DATA}/corpora"],
            "hf_token": SecretStr(TOKEN),
            # the submission reads only a file's first row, so a bad second row reaches a job
            "dataset_scan_rows": 1,
        }
    )


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("sources")


def _put(s3, key: str, body: bytes, bucket: str = DATA) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


# --------------------------------------------------------------------------- S3, the library
def test_s3_globs_list_in_key_order_and_fetch_once(s3, tmp_path: Path) -> None:
    """A glob stays in its folder (``**`` crosses them), matches come in key order, each
    object is downloaded once per ETag; a replaced object is fetched again, beside."""
    base = "corpora/lib"
    for key, text in [("b.jsonl", "bee"), ("a.jsonl", "ay"), ("sub/c.jsonl", "sea"), ("x.txt", "")]:
        _put(s3, f"{base}/{key}", _jsonl([text]))
    one = f"s3://{DATA}/{base}/*.jsonl"
    assert [o.key for o in list_s3(s3, one, "p")] == [f"{base}/a.jsonl", f"{base}/b.jsonl"]
    deep = [o.key for o in list_s3(s3, f"s3://{DATA}/{base}/**/*.jsonl", "p")]
    assert deep == [f"{base}/a.jsonl", f"{base}/b.jsonl", f"{base}/sub/c.jsonl"]

    paths = fetch_s3_entry(s3, one, tmp_path, "spec.dataset.files.0")
    assert [Path(p).name for p in paths] == ["a.jsonl", "b.jsonl"]
    assert [Path(p).read_bytes() for p in paths] == [_jsonl(["ay"]), _jsonl(["bee"])]
    stat = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths]
    assert fetch_s3_entry(s3, one, tmp_path, "spec.dataset.files.0") == paths
    assert [(os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths] == stat  # not again
    # the tokenized cache key is made of the bytes: a fetched copy keys as the same local file
    local = tmp_path / "a.jsonl"
    local.write_bytes(_jsonl(["ay"]))
    ds = DatasetSpec(files=["x"])
    assert tokenized.source_digest([paths[0]], ds) == tokenized.source_digest([str(local)], ds)

    _put(s3, f"{base}/b.jsonl", _jsonl(["bee, again"]))
    again = fetch_s3_entry(s3, one, tmp_path, "spec.dataset.files.0")
    assert again[0] == paths[0] and again[1] != paths[1]
    assert Path(again[1]).read_bytes() == _jsonl(["bee, again"])

    for entry, says in [
        (f"s3://{DATA}/{base}/nope.jsonl", "no such object"),
        (f"s3://{DATA}/{base}/*.parquet", "no object matches"),
        ("s3://no-such-bucket-here/a.jsonl", "no such"),
        (f"s3://{DATA}/", "give an object"),
        ("s3://UPPER/a.jsonl", "not an S3 bucket name"),
    ]:
        with pytest.raises(DataError) as e:
            fetch_s3_entry(s3, entry, tmp_path, "spec.dataset.files.3")
        assert e.value.param == "spec.dataset.files.3" and says in e.value.message, entry


class _Counting:
    """The real client, counting the downloads it starts."""

    def __init__(self, client) -> None:  # noqa: ANN001
        self.client, self.gets = client, 0

    def get_object(self, **kw):  # noqa: ANN003, ANN201
        self.gets += 1
        return self.client.get_object(**kw)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.client, name)


def test_ranks_fetching_at_once_download_each_object_once(s3, tmp_path: Path) -> None:
    """Ranks (here threads) that ask for the same objects together wait on one download."""
    from concurrent.futures import ThreadPoolExecutor

    for i in range(3):
        _put(s3, f"corpora/many/part-{i}.jsonl", _jsonl([f"part {i} " * 2000]))
    counting = _Counting(s3)
    entry = f"s3://{DATA}/corpora/many/part-*.jsonl"
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: fetch_s3_entry(counting, entry, tmp_path, "p"), range(4)))
    assert all(g == got[0] for g in got) and len(got[0]) == 3
    assert counting.gets == 3
    assert [Path(p).read_bytes() for p in got[0]] == [
        _jsonl([f"part {i} " * 2000]) for i in range(3)
    ]


def test_a_library_run_reads_s3_with_boto3s_defaults(
    s3, moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the service: AWS_ENDPOINT_URL and the credentials boto3 finds, a cache in
    ~/.cache/sharp/data."""
    _put(s3, "corpora/libmode/b.jsonl", _jsonl(["second"]))
    _put(s3, "corpora/libmode/a.jsonl", _jsonl(["first"]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    monkeypatch.setenv("HOME", str(tmp_path))
    table = load_table(DatasetSpec(files=[f"s3://{DATA}/corpora/libmode/*.jsonl"]))
    assert table["text"] == ["first", "second"]
    assert len(list((tmp_path / ".cache" / "sharp" / "data" / "s3").rglob("*.jsonl"))) == 2


def test_s3_roots_and_the_artifact_store_prefix(settings: Settings) -> None:
    ok = check_s3_allowed(f"s3://{DATA}/corpora/x/*.parquet", settings, "p")
    assert ok == (DATA, "corpora/x/*.parquet")
    refused = [
        (f"s3://{DATA}/other/a.jsonl", "outside the S3 prefixes"),
        (f"s3://{DATA}/corp*/a.jsonl", "outside the S3 prefixes"),  # may reach past the root
        (f"s3://{ARTIFACTS}/{PREFIX}/t/uploads/a.txt", "artifact store"),
    ]
    wide = settings.model_copy(update={"dataset_s3_roots": [f"s3://{ARTIFACTS}", f"s3://{DATA}"]})
    for url, says in refused:
        with pytest.raises(InvalidRequestError) as e:
            check_s3_allowed(url, settings, "spec.dataset.files.2")
        assert (e.value.code, e.value.param) == ("file_not_allowed", "spec.dataset.files.2")
        assert says in e.value.message, url
    # the artifact store's prefix whatever the roots say, a glob that could reach it too
    for url in (f"s3://{ARTIFACTS}/{PREFIX}/t/a.txt", f"s3://{ARTIFACTS}/de*/x.txt"):
        with pytest.raises(InvalidRequestError, match="artifact store"):
            check_s3_allowed(url, wide, "p")
    assert check_s3_allowed(f"s3://{ARTIFACTS}/elsewhere/a.txt", wide, "p")[0] == ARTIFACTS
    with pytest.raises(InvalidRequestError, match="SHARP_DATASET_S3_ROOTS"):
        check_s3_allowed(f"s3://{DATA}/corpora/a.txt", Settings(), "p")


def test_the_worker_fetches_s3_entries_and_names_a_missing_one(
    settings: Settings, s3, corpus: Path
) -> None:
    """What the training process does before it reads (`confine_spec_files`): local entries
    confined, s3:// ones fetched into the host's cache, the training data's and an
    evaluation set's; an object gone since submission is a data error naming its entry."""
    from sharp_core.spec import parse_spec
    from worker.child import confine_spec_files

    _put(s3, "corpora/w/a.jsonl", _jsonl(["alpha"]))
    raw = tiny_spec(corpus)
    raw["dataset"]["files"] = [str(corpus), f"s3://{DATA}/corpora/w/a.jsonl"]
    raw["dataset"]["eval"] = {"val": {"files": [f"s3://{DATA}/corpora/w/*.jsonl"]}}
    out = confine_spec_files(parse_spec(raw), settings)
    local, fetched = out.dataset.files
    assert local == str(corpus.resolve()) and Path(fetched).read_bytes() == _jsonl(["alpha"])
    assert Path(fetched).is_relative_to(Path(settings.artifact_root) / ".cache" / "data")
    assert out.dataset.eval.val is not None and out.dataset.eval.val.files == [fetched]

    for where, entry, param in [
        ("files", f"s3://{DATA}/corpora/w/gone.jsonl", "spec.dataset.files.1"),
        ("eval", f"s3://{DATA}/corpora/w/*.parquet", "spec.dataset.eval.val.files.0"),
    ]:
        bad = json.loads(json.dumps(raw))
        if where == "files":
            bad["dataset"]["files"][1] = entry
        else:
            bad["dataset"]["eval"]["val"]["files"] = [entry]
        with pytest.raises(DataError) as e:
            confine_spec_files(parse_spec(bad), settings)
        assert e.value.param == param and entry in e.value.message
        assert e.value.retryable is False


# --------------------------------------------------------------------------- save_to_disk
def test_save_to_disk_folders(tmp_path: Path) -> None:
    """A Dataset folder, a DatasetDict's split (``split``), refusals naming the field, and
    the tokenized build neither writes into the folder nor keys two splits alike."""
    import datasets

    from sharp_core.cache.store import LocalCacheStore
    from sharp_core.data.lm import LMSource, prepare_lm
    from sharp_core.models.loading import train_bpe_tokenizer

    texts = [f"document {i}: " + "words of text " * (i % 7 + 3) for i in range(60)]
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(one)
    both = tmp_path / "both"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts}),
            "validation": datasets.Dataset.from_dict({"text": texts[:5]}),
        }
    ).save_to_disk(both)
    assert load_table(DatasetSpec(files=[str(one)]))["text"] == texts
    assert load_table(DatasetSpec(files=[str(both)], split="validation"))["text"] == texts[:5]
    two = load_table(DatasetSpec(files=[str(one), str(both)]))  # folders concatenate
    assert two.num_rows == 120

    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "f.txt").write_text("x\n")
    for ds, param, says in [
        (DatasetSpec(files=[str(both)], split="test"), "spec.dataset.split", "not 'test'"),
        (DatasetSpec(files=[str(one), str(plain)]), "spec.dataset.files.1", "save_to_disk"),
        (DatasetSpec(files=[str(one), str(tmp_path / "f.txt")]), "spec.dataset.files", "mixed"),
    ]:
        with pytest.raises(DataError) as e:
            load_table(ds)
        assert e.value.param == param and says in e.value.message

    before = sorted(p.relative_to(both) for p in both.rglob("*"))
    tok = train_bpe_tokenizer(texts, 300)
    store = LocalCacheStore(tmp_path / "cache")
    keys = {}
    for split in ("train", "validation"):
        ds = DatasetSpec(files=[str(both)], split=split, eval_fraction=0.2)
        data = prepare_lm(ds, LMSource(ds, None), tok, 16, store=store)
        keys[split] = data.key
        assert data.info["role"] == "built" and data.info["documents"] == (
            60 if split == "train" else 5
        )
    assert keys["train"] != keys["validation"]
    assert sorted(p.relative_to(both) for p in both.rglob("*")) == before  # nothing written


def test_a_folder_with_a_link_out_of_the_roots_is_refused(tmp_path: Path) -> None:
    import datasets

    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.arrow").write_text("private")
    folder = root / "saved"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(folder)
    assert confine_dataset_files([str(folder)], [root]) == [folder.resolve()]
    (folder / "data-extra.arrow").symlink_to(outside / "secret.arrow")
    with pytest.raises(InvalidRequestError) as e:
        confine_dataset_files([str(root / "x.txt"), str(folder)], [root])
    assert (e.value.code, e.value.param) == ("file_not_allowed", "spec.dataset.files.1")
    assert "data-extra.arrow" in e.value.message


# --------------------------------------------------------------------------- the token
def test_token_travels_to_the_child_and_logs_are_scrubbed(settings: Settings) -> None:
    env = child_env(settings)
    assert env["HF_TOKEN"] == TOKEN and env["SHARP_HF_TOKEN"] == TOKEN
    assert TOKEN not in repr(settings)
    assert settings_env(settings)["SHARP_HF_TOKEN"] == TOKEN  # rebuilds it, not '*****'

    redact.register_settings(settings)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    redact.install(logger)
    try:
        logger.warning("calling the hub with %s", TOKEN)
        try:
            raise RuntimeError(f"401 for token {TOKEN}")
        except RuntimeError:
            logger.exception("load failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert TOKEN not in text
    assert text.count(redact.MARK) == 2 and "RuntimeError: 401 for token [redacted]" in text
    data = {"error": {"message": f"x {TOKEN} y", "list": [TOKEN, 3]}, TOKEN: 1.5}
    assert redact.scrub_data(data) == {
        "error": {"message": "x [redacted] y", "list": ["[redacted]", 3]},
        "[redacted]": 1.5,
    }
    stream = io.StringIO()
    redact.RedactingStream(stream).write(f"Traceback: {TOKEN}\n")  # type: ignore[arg-type]
    assert stream.getvalue() == "Traceback: [redacted]\n"


# --------------------------------------------------------------------------- the service
def _wait_end(client: TestClient, team: TeamKey, job_id: str) -> dict:
    def ended() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=team.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(ended, 240, interval=0.5, what=f"job {job_id} to end")  # type: ignore[return-value]


def _events(db, job_id: str) -> list[JobEvent]:
    with db.session() as s:
        rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        return sorted(rows, key=lambda e: e.seq)


@pytest.mark.service
def test_submission_checks_s3_entries(client: TestClient, team: TeamKey, s3, corpus) -> None:
    _put(s3, "corpora/sub/a.jsonl", _jsonl(["hello"]))
    spec = tiny_spec(corpus)
    spec["dataset"]["files"] = [
        f"s3://{DATA}/corpora/sub/*.jsonl",
        f"s3://{DATA}/corpora/sub/*.parquet",
        f"s3://{DATA}/elsewhere/a.jsonl",
        f"s3://{ARTIFACTS}/{PREFIX}/x/uploads/a.txt",
        f"s3://{DATA}/corpora/",
    ]
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 422, r.text
    errors = {e["param"]: e for e in r.json()["error"]["errors"]}
    assert sorted(errors) == [f"spec.dataset.files.{i}" for i in (1, 2, 3, 4)]
    assert "no object matches" in errors["spec.dataset.files.1"]["message"]
    assert errors["spec.dataset.files.2"]["code"] == "file_not_allowed"
    assert "artifact store" in errors["spec.dataset.files.3"]["message"]
    assert "give an object" in errors["spec.dataset.files.4"]["message"]
    spec["dataset"]["files"] = spec["dataset"]["files"][:1]
    r = client.post(
        "/v1/jobs",
        json={"spec": {**spec, "resources": {"queue": "nobody-serves-this"}}},
        headers=team.headers,
    )
    assert r.status_code == 201, r.text


@pytest.mark.service
@pytest.mark.slow
def test_job_trains_on_s3_shards_and_evaluates_a_saved_folder(
    client: TestClient, worker: Path, team: TeamKey, s3, corpus: Path, settings: Settings, db
) -> None:
    """Training data: a glob over two JSONL shards in the data bucket; the evaluation set: a
    ``save_to_disk`` folder under the data roots. The worker fetched the shards into its
    cache (by ETag) and trained on their rows in key order."""
    import datasets

    paras = [p for p in corpus.read_text().split("\n\n") if p.strip()]
    half = len(paras) // 2
    _put(s3, "corpora/run/shard-001.jsonl", _jsonl(paras[half:]))
    _put(s3, "corpora/run/shard-000.jsonl", _jsonl(paras[:half]))
    folder = corpus.parent / "val-saved"
    if not folder.exists():
        datasets.DatasetDict(
            {"validation": datasets.Dataset.from_dict({"text": paras[:40]})}
        ).save_to_disk(folder)
    spec = tiny_spec(corpus, max_steps=6)
    spec["dataset"] = {
        "source": "files",
        "files": [f"s3://{DATA}/corpora/run/shard-*.jsonl"],
        "eval": {"val": {"source": "files", "files": [str(folder)], "max_blocks": 4}},
    }
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    job = _wait_end(client, team, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["metrics"]["val_loss"] > 0
    (built,) = [e.data for e in _events(db, job["id"]) if e.kind == "tokenized_data"]
    assert built["documents"] == len(paras)
    cached = sorted((Path(settings.artifact_root) / ".cache" / "data" / "s3").rglob("shard-*"))
    assert [p.name for p in cached] == ["shard-000.jsonl", "shard-001.jsonl"]
    assert [p.read_bytes() for p in cached] == [_jsonl(paras[:half]), _jsonl(paras[half:])]


@pytest.mark.service
@pytest.mark.slow
def test_hf_token_reaches_the_job_and_none_of_its_text(
    client: TestClient, worker: Path, team: TeamKey, settings: Settings, db, corpus: Path
) -> None:
    """A data error whose message quotes the token (a role that is the token): the stored
    error and events, the API's answers, the worker's log and the training process's log
    say [redacted] instead. The training process's log can only say so if it holds the
    token: it came as HF_TOKEN."""
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": TOKEN, "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    data = corpus.parent / "token-chat.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    spec = tiny_spec(data, max_steps=2)
    spec["dataset"]["chat_template"] = CHAT_TEMPLATE
    first_bad = corpus.parent / "token-chat-first.jsonl"
    first_bad.write_text("".join(json.dumps(x) + "\n" for x in reversed(rows)))
    refused = client.post(
        "/v1/jobs",
        json={"spec": {**spec, "dataset": {**spec["dataset"], "files": [str(first_bad)]}}},
        headers=team.headers,
    )  # the submission's scan finds the bad row first: its answer is scrubbed too
    assert refused.status_code == 422 and f"role '{redact.MARK}'" in refused.text, refused.text
    assert TOKEN not in refused.text
    r = client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
    assert r.status_code == 201, r.text
    job = _wait_end(client, team, r.json()["id"])
    assert job["status"] == "failed", job
    assert (job["error"]["code"], job["error"]["param"]) == ("data_error", "spec.dataset.files.0")
    assert f"messages[0].role '{redact.MARK}'" in job["error"]["message"]

    answers = [
        client.get(f"/v1/jobs/{job['id']}", headers=team.headers).text,
        client.get("/v1/jobs", headers=team.headers).text,
    ]
    with db.session() as s:
        stored = s.get(Job, job["id"])
        assert stored is not None
        error = json.dumps(stored.error)
    events = json.dumps([e.data for e in _events(db, job["id"])])
    assert redact.MARK in error and redact.MARK in events
    attempt_log = Path(settings.artifact_root, team.team_id, job["id"], "logs", "attempt_1.log")
    child_log = attempt_log.read_text(errors="replace")
    assert redact.MARK in child_log and "training failed" in child_log
    worker_log = worker.read_text(errors="replace")
    assert f"{job['id']} attempt 1: failed (data_error [spec.dataset.files.0]" in worker_log
    for text in [*answers, error, events, child_log, worker_log]:
        assert TOKEN not in text
