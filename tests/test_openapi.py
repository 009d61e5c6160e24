"""The OpenAPI document is one generated clients and fuzzers can use (issue 17, item 5): it
publishes the JobSpec schema as the pydantic model defines it, names every operation, documents
every error with the error schema, links the routes that take an id to the answers carrying
it, and is valid OpenAPI 3.1. Building the app connects to nothing; no server is needed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from sharp_core.spec import JobSpec


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    db = tmp_path_factory.mktemp("openapi") / "x.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}"))
    served = TestClient(app).get("/openapi.json").json()  # what clients download
    assert served == json.loads(json.dumps(app.openapi()))
    return served


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        node = doc["components"]["schemas"][name]
    return node


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_the_request_body_spec_is_the_jobspec_model_schema(doc: dict[str, Any]) -> None:
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    job_create = _resolve(doc, body["schema"])
    assert job_create["properties"]["spec"]["$ref"] == "#/components/schemas/JobSpec"

    # The model's own schema, its $defs where the document keeps components: every part
    # (ModelSpec, TrainingSpec, … and whatever a later field adds) must be there, equal.
    expected = json.loads(
        json.dumps(JobSpec.model_json_schema()).replace("#/$defs/", "#/components/schemas/")
    )
    defs = expected.pop("$defs")
    components = doc["components"]["schemas"]
    assert components["JobSpec"] == expected
    assert set(defs) <= set(components)
    for name, schema in defs.items():
        assert components[name] == schema, name
    # Spot checks that the comparison is about the bounds and defaults docs/spec.md lists.
    lr = components["TrainingSpec"]["properties"]["lr"]
    assert (lr["exclusiveMinimum"], lr["maximum"], lr["default"]) == (0.0, 1.0, 5e-4)
    assert set(components["JobSpec"]["required"]) == {"student", "dataset"}
    assert components["JobSpec"]["additionalProperties"] is False


def test_the_body_is_still_validated_only_by_parse_spec() -> None:
    """Publishing JobSpec changes the document, not what the model accepts: the spec is checked
    as a JSON object here and by `parse_spec` in the service, which names the field."""
    from pydantic import ValidationError

    from api.schemas import JobCreate

    body = JobCreate.model_validate({"spec": {"training": {"lr": 5.0}}})
    assert body.model_dump() == {"spec": {"training": {"lr": 5.0}}}  # passed on untouched
    with pytest.raises(ValidationError) as e:
        JobCreate.model_validate({"spec": [1, 2]})
    assert [(x["loc"], x["type"]) for x in e.value.errors()] == [(("spec",), "dict_type")]


def test_the_documented_examples_are_valid_requests(doc: dict[str, Any]) -> None:
    """Fuzzers and client docs start from these: they must pass the server's own validator
    (only the ids in them, e.g. the upload's, are placeholders)."""
    from sharp_core.spec import parse_spec

    for example in doc["components"]["schemas"]["JobCreate"]["examples"]:
        assert parse_spec(example["spec"]).dataset.upload_id
    upload = doc["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["examples"][0]["format"] == "txt"


def test_the_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    from openapi_spec_validator import validate

    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_operation_ids_are_unique_camel_case_and_stable(doc: dict[str, Any]) -> None:
    ids = {f"{m.upper()} {p}": op["operationId"] for p, m, op in _operations(doc)}
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch(r"[a-z][A-Za-z0-9]*", i) for i in ids.values()), ids
    # Generated clients name their methods after these: renaming one breaks them.
    assert {
        "POST /v1/jobs": "createJob",
        "GET /v1/jobs": "listJobs",
        "GET /v1/jobs/{job_id}": "getJob",
        "POST /v1/jobs/{job_id}/cancel": "cancelJob",
        "POST /v1/jobs/{job_id}/retry": "retryJob",
        "GET /v1/jobs/{job_id}/metrics": "getJobMetrics",
        "GET /v1/jobs/{job_id}/events": "streamJobEvents",
        "GET /v1/jobs/{job_id}/checkpoints": "listCheckpoints",
        "GET /v1/jobs/{job_id}/checkpoints/{step}/files/{name}": "downloadCheckpointFile",
        "GET /v1/jobs/{job_id}/checkpoints/{step}/archive": "downloadCheckpointArchive",
        "POST /v1/uploads": "createUpload",
        "GET /v1/uploads/{upload_id}": "getUpload",
        "GET /v1/teams/me": "getMyTeam",
        "GET /healthz": "healthz",
        "GET /readyz": "readyz",
    }.items() <= ids.items()


def test_errors_are_documented_with_the_error_schema(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, method, op in _operations(doc):
        responses = op["responses"]
        where = f"{method.upper()} {path}"
        for code, response in responses.items():
            if code.startswith(("4", "5")) and code != "416":  # a 416 has no body
                schema = response["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith("/ErrorResponse"), (where, code)
        if path.startswith("/v1/"):
            assert "401" in responses, where
        if op.get("parameters") or op.get("requestBody"):
            assert "422" in responses, where
            assert op["security"] == [{"bearerAuth": []}], where
        if "application/json" in op.get("requestBody", {}).get("content", {}):
            assert {"400", "413", "422"} <= set(responses), where
    error = doc["components"]["schemas"]["ErrorBody"]
    assert {"code", "message", "param"} <= set(error["properties"])


def test_links_lead_from_each_id_to_the_routes_that_take_it(doc: dict[str, Any]) -> None:
    by_id = {op["operationId"]: (p, op) for p, _m, op in _operations(doc)}
    job_routes = {
        op["operationId"]
        for p, _m, op in _operations(doc)
        if set(re.findall(r"\{(\w+)\}", p)) == {"job_id"}
    }
    assert {"getJob", "cancelJob", "retryJob", "getJobMetrics", "streamJobEvents"} <= job_routes
    assert "listCheckpoints" in job_routes
    create = doc["paths"]["/v1/jobs"]["post"]["responses"]
    for status in ("201", "200"):
        links = create[status]["links"]
        assert {link["operationId"] for link in links.values()} == job_routes
        for link in links.values():
            assert link["parameters"] == {"job_id": "$response.body#/id"}
    cancelled = doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]["202"]["links"]
    assert cancelled["RetryJob"]["parameters"] == {"job_id": "$response.body#/id"}
    listed = doc["paths"]["/v1/jobs"]["get"]["responses"]["200"]["links"]
    assert listed["GetJob"]["parameters"] == {"job_id": "$response.body#/data/0/id"}

    ckpts = doc["paths"]["/v1/jobs/{job_id}/checkpoints"]["get"]["responses"]["200"]["links"]
    assert ckpts["DownloadCheckpointFile"]["parameters"] == {
        "job_id": "$request.path.job_id",
        "step": "$response.body#/data/0/step",
        "name": "$response.body#/data/0/files/0/name",
    }
    assert set(ckpts["DownloadCheckpointArchive"]["parameters"]) == {"job_id", "step"}

    upload = doc["paths"]["/v1/uploads"]["post"]["responses"]["201"]["links"]
    assert upload["GetUpload"]["parameters"] == {"upload_id": "$response.body#/id"}
    body = upload["TrainOnUpload"]["requestBody"]
    assert upload["TrainOnUpload"]["operationId"] == "createJob"
    assert body["spec"]["dataset"] == {"source": "upload", "upload_id": "$response.body#/id"}

    # Every link names an operation of this document and fills exactly its path parameters.
    for path, _m, op in _operations(doc):
        for response in op["responses"].values():
            for name, link in response.get("links", {}).items():
                target_path, _target = by_id[link["operationId"]]
                wanted = set(re.findall(r"\{(\w+)\}", target_path))
                assert set(link.get("parameters", {})) == wanted, (path, name)


def test_api_md_says_where_the_document_and_links_are() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    assert "/openapi.json" in text and "TrainOnUpload" in text and "operationId" in text
