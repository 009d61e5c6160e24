"""Chat and prompt/completion files checked at submission (sharp_core.data.scan, service.jobs).

Before: a `source: files` job with a bad conversation was accepted (201) and failed when it
started. Now the API reads the files' first rows (within SHARP_DATASET_SCAN_ROWS / _BYTES)
and refuses a bad one with 422 naming ``spec.dataset.files.N``, the file, the row and the
field, with the words the job's own loader uses (both call `formats.check_rows`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharp_core.data.scan import ScanBudget, scan_files
from sharp_core.errors import DataError
from tests.helpers import chat_rows

FIELDS = {"text": "text", "messages": "messages", "prompt": "prompt", "completion": "completion"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _refused(files: list[str], fmt: str = "auto", budget: ScanBudget = ScanBudget()) -> DataError:
    with pytest.raises(DataError) as e:
        scan_files(files, fmt, FIELDS, "spec.dataset.files", budget)
    return e.value


def test_bad_rows_are_named_by_entry_file_row_and_field(tmp_path: Path) -> None:
    good = _jsonl(tmp_path / "good.jsonl", chat_rows(20))
    rows = chat_rows(30, seed=1)
    rows[12]["messages"][1]["role"] = "bot"
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    e = _refused([str(good), str(bad)])
    assert e.param == "spec.dataset.files.1"
    assert e.message == (
        "bad.jsonl: row 12: messages[1].role 'bot' is not one of "
        "['system', 'user', 'assistant', 'tool']"
    )
    # parquet: an empty answer, in a shard matched by a glob (the entry is the glob's)
    rows = chat_rows(2500, seed=2)
    rows[2100]["messages"][4]["content"] = "  "
    (tmp_path / "shards").mkdir()
    for i in range(2):
        part = rows[i * 1250 : (i + 1) * 1250]
        pq.write_table(pa.table({"messages": [r["messages"] for r in part]}),
                       tmp_path / "shards" / f"s{i}.parquet")  # fmt: skip
    e = _refused([str(good).replace(".jsonl", ".parquet"), str(tmp_path / "shards" / "*.parquet")])
    assert e.param == "spec.dataset.files.1"
    assert e.message == "s1.parquet: row 850: messages[4].content: empty assistant turn"
    # prompt/completion: a non-string completion
    pairs = [{"prompt": "q", "completion": "a"}] * 5 + [{"prompt": "q", "completion": 3}]
    e = _refused([str(_jsonl(tmp_path / "pairs.jsonl", pairs))])
    assert (e.param, e.message) == (
        "spec.dataset.files.0",
        "pairs.jsonl: row 5: completion is int, not a string",
    )
    # format chat named, the column absent
    e = _refused([str(_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))], fmt="chat")
    assert e.param == "spec.dataset.files.0" and "column 'messages'" in e.message


def test_the_scan_stops_at_its_budget_and_says_so(tmp_path: Path) -> None:
    rows = chat_rows(300, seed=3)
    rows[250]["messages"][2]["content"] = 7
    f = _jsonl(tmp_path / "big.jsonl", rows)
    full = _refused([str(f)])
    assert "row 250: messages[2].content is int" in full.message
    res = scan_files([str(f)], "auto", FIELDS, "spec.dataset.files", ScanBudget(rows=200))
    assert (res.format, res.rows, res.complete) == ("chat", 200, False)
    small = ScanBudget(bytes=f.stat().st_size // 4)
    res = scan_files([str(f)], "auto", FIELDS, "spec.dataset.files", small)
    assert 0 < res.rows < 250 and not res.complete
    # text needs no scan; a missing file is the job's to report
    txt = tmp_path / "c.txt"
    txt.write_text("hello\n")
    assert scan_files([str(txt)], "auto", FIELDS, "p").format == "text"
    gone = scan_files([str(tmp_path / "gone.jsonl")], "chat", FIELDS, "p")
    assert gone.skipped and not gone.complete


@pytest.mark.service
def test_the_api_refuses_a_bad_conversation_at_submission(settings, make_team, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import tiny_spec

    team = make_team("scan")
    rows = chat_rows(40, seed=4)
    rows[33]["messages"][3] = {"role": "assistant", "content": ["not", "text"]}
    bad = _jsonl(tmp_path / "chat.jsonl", rows)
    val = _jsonl(tmp_path / "val.jsonl", [{"messages": [{"role": "user"}]}])
    spec = tiny_spec(bad)
    spec["dataset"]["eval"] = {"val": {"files": [str(val)]}}
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/jobs", json={"spec": spec}, headers=team.headers)
        assert r.status_code == 422, r.text
        errors = {e["param"]: e["message"] for e in r.json()["error"]["errors"]}
        assert errors["spec.dataset.files.0"] == (
            "chat.jsonl: row 33: messages[3].content is list, not a string"
        )
        assert errors["spec.dataset.eval.val.files.0"].startswith("val.jsonl: row 0: messages[0]")
        assert c.get("/v1/jobs", headers=team.headers).json()["data"] == []
