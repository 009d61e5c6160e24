"""A pruning target that cannot fit the teacher is a 422 naming the field, at submission.

Against the real API on Postgres: the teacher's config is read from an inline config, a local
folder and a finished job's checkpoint; nothing is created when the target is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.db import Database
from service.models import Checkpoint, Job, utcnow
from service.settings import Settings
from tests.conftest import TeamKey, tiny_spec

pytestmark = pytest.mark.service

TEACHER = {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 64, "n_positions": 64}


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("prune-submit")


def _spec(corpus: Path, teacher: dict, prune: dict) -> dict:
    d = tiny_spec(corpus)
    d.pop("tokenizer")
    d["teacher"] = teacher
    d["student"] = {"init": "prune", "prune": prune}
    d["method"] = {"name": "kd"}
    return d


def _post(client: TestClient, team: TeamKey, spec: dict):
    return client.post("/v1/jobs", json={"spec": spec}, headers=team.headers)


@pytest.mark.parametrize(
    "prune,param",
    [
        ({"layers": 5}, "spec.student.prune.layers"),
        ({"heads": 8}, "spec.student.prune.heads"),
        ({"heads": 2, "hidden": 48}, "spec.student.prune.heads"),
        ({"ffn": 1024}, "spec.student.prune.ffn"),  # GPT-2's default MLP is 4 × 64 = 256
        ({"kv_heads": 2}, "spec.student.prune.kv_heads"),
        ({"layers": 0}, "spec.student.prune.layers"),
    ],
)
def test_inline_teacher_config_refuses_a_target_that_does_not_fit(
    client, team, corpus, prune, param
) -> None:
    teacher = {"init": "config", "config": dict(TEACHER)}
    r = _post(client, team, _spec(corpus, teacher, prune))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param
    assert client.get("/v1/jobs", headers=team.headers).json()["data"] == []


def test_a_target_with_several_misfits_names_each(client, team, corpus) -> None:
    """Too many layers and too many heads: both named, not only the layers (issue 27)."""
    teacher = {"init": "config", "config": dict(TEACHER)}
    r = _post(client, team, _spec(corpus, teacher, {"layers": 5, "heads": 8, "ffn": 1024}))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "spec.student.prune.layers"
    assert [e["param"] for e in err["errors"]] == [
        "spec.student.prune.layers",
        "spec.student.prune.heads",
        "spec.student.prune.ffn",
    ]
    assert "teacher's 4, got 8" in err["errors"][1]["message"]


def test_config_overrides_are_applied_before_the_check(client, team, corpus) -> None:
    teacher = {"init": "config", "config": dict(TEACHER), "config_overrides": {"n_layer": 6}}
    ok = _post(client, team, _spec(corpus, teacher, {"layers": 5, "heads": 2}))
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["student"]["prune"]["layers"] == 5


def test_local_folder_and_finished_job_teachers_are_checked(
    client, team, corpus, tmp_path, settings: Settings
) -> None:
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TEACHER, "n_layer": 3}))
    r = _post(client, team, _spec(corpus, {"model": str(folder)}, {"layers": 4}))
    assert r.status_code == 422 and "3" in r.json()["error"]["message"], r.text
    assert (
        _post(client, team, _spec(corpus, {"model": str(folder)}, {"layers": 2})).status_code == 201
    )

    # a succeeded job of this team whose last checkpoint is that folder
    db = Database(settings)
    with db.session() as s:
        now = utcnow()
        job = Job(
            id="job_pruneteacher",
            team_id=team.team_id,
            name="t",
            spec={},
            queue="default",
            gpus=1,
            priority=0,
            max_attempts=1,
            cancel_requested=False,
            step=10,
            max_steps=10,
            latest_metrics={},
            created_at=now,
            enqueued_at=now,
            updated_at=now,
            status="succeeded",
            attempt=1,
        )
        s.add(job)
        s.flush()  # the checkpoint row refers to it
        s.add(
            Checkpoint(
                job_id=job.id,
                step=10,
                path=str(folder),
                manifest={},
                metrics={},
                attempt=1,
                created_at=now,
            )
        )
    ref = {"model": {"job": "job_pruneteacher"}}
    r = _post(client, team, _spec(corpus, ref, {"heads": 6}))
    assert r.status_code == 422 and r.json()["error"]["param"] == "spec.student.prune.heads"
    assert _post(client, team, _spec(corpus, ref, {"heads": 2})).status_code == 201


def test_hub_teacher_is_left_to_the_worker(client, team, corpus) -> None:
    r = _post(client, team, _spec(corpus, {"model": "facebook/opt-125m"}, {"layers": 50}))
    assert r.status_code == 201, r.text  # no download in the API: the worker checks it


def test_cross_field_rules_name_their_field(client, team, corpus) -> None:
    spec = _spec(corpus, {"init": "config", "config": dict(TEACHER)}, {"layers": 2})
    spec["tokenizer"] = {"train": {"vocab_size": 300}}
    r = _post(client, team, spec)
    assert r.status_code == 422 and r.json()["error"]["param"] == "spec.tokenizer.train"
