"""Property-based fuzzing of the running API from its own OpenAPI document (issues 4 and 17).

Schemathesis generates requests from the document and sends them, authenticated, to a real
uvicorn on real Postgres and Redis. The checks: no 5xx, every status code documented, every
response's content type and body conform to the schema. Three parts:

- **Per operation**: ``MAX_EXAMPLES`` positive and negative cases each, derandomised. Their
  ids are random, so the routes that take one mostly answer 404: this part tests parsing,
  bounds and error shapes.
- **Along the links** (`_walk`): from a real upload and a real finished job (made the ordinary
  way, with a real worker, by the ``seeded`` fixture), every OpenAPI link of the document is
  followed: the link fills the ids, schemathesis generates the rest (query, headers), and each
  answer is expanded in turn. A job created through the ``TrainOnUpload`` link, from the
  document's own example body, is cancelled and retried; the finished job's checkpoints are
  listed and downloaded. So the fuzzing reaches the job and upload routes' logic, and the test
  asserts it: each of their operations answered 2xx at least once.
- **Schemathesis' state machine** over the same links (``STATEFUL_SCENARIOS`` scenarios): it
  must accept the links as written, and its calls pass the same checks. It draws with real
  randomness, so its counts vary; nothing is asserted on them.

Cases sent and 2xx answers per operation are printed (``-s``) and recorded in docs/api.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ops.launcher import start_worker  # noqa: E402
from tests.conftest import ROOT, WORKER_ENV, TeamKey, stop_process, tiny_spec, wait_for  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.slow]

MAX_EXAMPLES = 15
#: Generated cases per link followed (the link fixes the ids; the rest is generated).
LINK_EXAMPLES = 4
#: Scenarios of schemathesis' stateful engine (each up to 6 linked calls).
STATEFUL_SCENARIOS = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: Framing headers belong to the transport: a generated ``Content-Length: abc`` is refused by
#: the HTTP server (a plain-text 400) before the application sees the request.
FRAMING = {"content-length", "transfer-encoding", "host", "connection"}
PARTS = ("random", "links", "stateful")
#: Cases sent and 2xx answers per part ("random", "links", "stateful") and operation.
SENT: dict[str, Counter[str]] = {p: Counter() for p in PARTS}
OK: dict[str, Counter[str]] = {p: Counter() for p in PARTS}


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("fuzz")


@pytest.fixture(scope="module")
def api_schema(live_server: str):
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    total = sum(sum(c.values()) for c in SENT.values())
    ok = sum(sum(c.values()) for c in OK.values())
    print(f"\nschemathesis: {total} cases, {ok} answered 2xx (sent/2xx per part)")
    print("| operation | " + " | ".join(PARTS) + " |")
    print("|---|" + "---:|" * len(PARTS))
    for op in sorted(set().union(*SENT.values())):
        cells = " | ".join(f"{SENT[p][op]} / {OK[p][op]}" for p in PARTS)
        print(f"| `{op}` | {cells} |")


@pytest.fixture(scope="module")
def seeded(live_server: str, settings, team: TeamKey, corpus: Path, tmp_path_factory) -> dict:
    """An upload, a succeeded job with checkpoints and a sweep, for this team, made through
    the API and a real worker, which is stopped again before fuzzing (jobs the fuzzer creates
    stay queued; the sweep's cells wait in a pool no worker serves)."""
    h = team.headers
    text = corpus.read_text(encoding="utf-8")[:15_000]  # enough for the 300-token BPE
    up = httpx.post(
        f"{live_server}/v1/uploads", headers=h, files={"file": ("corpus.txt", text)}, timeout=30
    )
    assert up.status_code == 201, up.text
    # Two steps, one checkpoint: the routes need one to exist, not a trained model.
    spec = tiny_spec(corpus, max_steps=2, name="seed", eval_every=2, checkpoint_every=2)
    spec["dataset"] = {"source": "upload", "upload_id": up.json()["id"]}
    job = httpx.post(f"{live_server}/v1/jobs", headers=h, json={"spec": spec}, timeout=30)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    log = tmp_path_factory.mktemp("fuzz-worker") / "worker.log"
    proc = start_worker(
        settings, log_file=log, cwd=ROOT, extra_env=WORKER_ENV, hostname=f"fuzz-{job_id[-6:]}@%h"
    )

    def finished() -> str | None:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{log.read_text(errors='replace')[-3000:]}")
        status = httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=h, timeout=10).json()
        return status["status"] if status["status"] in ("succeeded", "failed") else None

    try:
        assert wait_for(finished, 180, interval=0.5, what="seed job") == "succeeded"
    finally:
        stop_process(proc, 20)
    # A sweep whose cells wait in a pool no worker serves: the root of the sweep routes' links.
    sweep_base = {**spec, "resources": {"queue": "nowhere"}}
    sweep = httpx.post(
        f"{live_server}/v1/sweeps",
        headers=h,
        json={"base": sweep_base, "axes": {"training.seed": [0, 1]}},
        timeout=30,
    )
    assert sweep.status_code == 201, sweep.text
    return {"upload_id": up.json()["id"], "job_id": job_id, "corpus": text}


def _count(part: str, label: str, status: int) -> None:
    SENT[part][label] += 1
    if 200 <= status < 300:
        OK[part][label] += 1


def _send(case, base: str, team: TeamKey, part: str) -> Any:
    """Send one case, authenticated, with the checks; count it and its 2xx."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in FRAMING}
    headers.update(team.headers)  # a fuzzer stuck at 401 would test only the auth dependency
    params = dict(case.query or {})
    if case.path.endswith("/events"):
        params["follow"] = "false"  # a live job's stream never ends by itself
    case.headers, case.query = headers, params
    response = case.call_and_validate(base_url=base, checks=CHECKS, timeout=30)
    _count(part, case.operation.label, response.status_code)
    return response


def _fuzz(operation, mode, base: str, team: TeamKey) -> None:
    """Send MAX_EXAMPLES generated cases of one operation in one generation mode."""

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        _send(case, base, team, "random")

    try:
        run()
    except Unsatisfiable:
        # An operation with no inputs (``/healthz``) has no way to violate its schema.
        if mode.value != "negative":
            raise


# ------------------------------------------------------------------------- along the links
def _evaluate(expression: Any, request_path: dict[str, Any], body: Any) -> Any:
    """An OpenAPI runtime expression (``$response.body#/data/0/id``, ``$request.path.job_id``)
    evaluated against one exchange; nested in objects too (the ``TrainOnUpload`` body).
    Raises LookupError when the answer has no such value (an empty list)."""
    if isinstance(expression, dict):
        return {k: _evaluate(v, request_path, body) for k, v in expression.items()}
    if not isinstance(expression, str) or not expression.startswith("$"):
        return expression
    if expression.startswith("$request.path."):
        return request_path[expression.removeprefix("$request.path.")]
    if expression.startswith("$response.body#"):
        node = body
        for part in expression.split("#", 1)[1].strip("/").split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node
    raise LookupError(f"unsupported expression {expression}")


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return copy.deepcopy(over)


def _follow(link: dict, source_case, response, target, doc: dict) -> Any:
    """A strategy of cases of `target` whose ids (and body) the link fills from `response`."""
    try:
        body_json = response.json()
    except ValueError:
        return None
    try:
        path = {
            name: _evaluate(expr, source_case.path_parameters or {}, body_json)
            for name, expr in link.get("parameters", {}).items()
        }
        body = _evaluate(link.get("requestBody"), source_case.path_parameters or {}, body_json)
    except (LookupError, IndexError, TypeError):
        return None  # e.g. a job with no checkpoint yet: nothing to link to
    path = {k: str(v) for k, v in path.items()}
    kwargs: dict[str, Any] = {"generation_mode": GenerationMode.POSITIVE, "path_parameters": path}
    if body is not None:
        # The link gives part of the body; the document's own example gives the rest.
        request = doc["paths"][target.path][target.method.lower()]["requestBody"]
        ref = request["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        example = doc["components"]["schemas"][ref]["examples"][0]
        kwargs["body"] = _merge(example, body)
    return target.as_strategy(**kwargs)


def _walk(api_schema, doc: dict, base: str, team: TeamKey, seeded: dict) -> None:
    """Follow every link of the document from real answers, breadth first.

    Each operation is expanded (each of its links followed, ``LINK_EXAMPLES`` cases apiece)
    once, from its first 2xx answer whose links resolve: an empty checkpoint list resolves
    none, so the finished job's list is the one expanded. ``retryJob`` is a 409 for the job
    just created (queued) and a 202 from ``cancelJob``'s answer (cancelled)."""
    ops = {op.definition.raw["operationId"]: op for op in _all_operations(api_schema)}
    expanded: set[str] = set()
    queue: list[tuple[Any, Any]] = []

    def run(strategy) -> None:
        @settings(
            max_examples=LINK_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def send(case) -> None:
            response = _send(case, base, team, "links")
            if 200 <= response.status_code < 300:
                queue.append((case, response))

        send()

    # Roots: the corpus uploaded by a generated multipart request, and the succeeded jobs.
    upload = ops["createUpload"].Case(
        body={"file": seeded["corpus"].encode(), "format": "txt"},
        media_type="multipart/form-data",
    )
    queue.append((upload, _send(upload, base, team, "links")))
    # A resumable upload sent as a client would (create, its one part, complete), each answer
    # checked; then its links are followed like the others' (GET, complete again, abort).
    part = seeded["corpus"].encode()[:4096]
    created = ops["createUploadSession"].Case(
        body={"filename": "part.txt", "size": len(part), "sha256": hashlib.sha256(part).hexdigest()}
    )
    made = _send(created, base, team, "links")
    assert made.status_code in (200, 201), made.text
    where = {"session_id": made.json()["id"]}
    sent = ops["putUploadPart"].Case(
        path_parameters=where, query={"offset": 0}, body=part, media_type="application/octet-stream"
    )
    assert _send(sent, base, team, "links").status_code == 200
    done = ops["completeUploadSession"].Case(path_parameters=where)
    assert _send(done, base, team, "links").status_code == 200
    queue.append((created, made))
    listed = ops["listJobs"].Case(query={"status": "succeeded", "limit": 5})
    queue.append((listed, _send(listed, base, team, "links")))
    sweeps = ops["listSweeps"].Case(query={"limit": 5})
    queue.append((sweeps, _send(sweeps, base, team, "links")))

    while queue:
        case, response = queue.pop(0)
        source = case.operation.definition.raw["operationId"]
        if source in expanded or not 200 <= response.status_code < 300:
            continue
        raw = case.operation.definition.raw["responses"].get(str(response.status_code), {})
        followed = False
        for link in raw.get("links", {}).values():
            strategy = _follow(link, case, response, ops[link["operationId"]], doc)
            if strategy is not None:
                followed = True
                run(strategy)
        if followed:
            expanded.add(source)


def _all_operations(api_schema) -> list:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_every_operation_conforms_to_its_schema(
    api_schema, live_server: str, team: TeamKey, seeded: dict
) -> None:
    """Random cases of every operation, then every link followed from real ids: no 5xx,
    documented status codes, conforming bodies; each job and upload operation got a 2xx."""
    started = time.monotonic()
    operations = _all_operations(api_schema)
    assert len(operations) >= 12
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, live_server, team)
    doc = httpx.get(f"{live_server}/openapi.json").json()
    _walk(api_schema, doc, live_server, team, seeded)
    print(f"\nfuzzing took {time.monotonic() - started:.1f} s")

    resource_ops = [
        op.label
        for op in operations
        if op.path.startswith(("/v1/jobs", "/v1/uploads", "/v1/sweeps/"))
    ]
    assert len(resource_ops) >= 16
    never = [label for label in resource_ops if not any(OK[p][label] for p in PARTS)]
    assert not never, f"these operations never answered 2xx: {never}"


def test_schema_is_served(live_server: str) -> None:
    doc = httpx.get(f"{live_server}/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/jobs" in doc["paths"]
    assert json.dumps(doc).count('"links"') >= 5


def test_schemathesis_state_machine_follows_the_links(
    api_schema, live_server: str, team: TeamKey, seeded: dict
) -> None:
    """Schemathesis' own stateful engine reads the document's links (an unusable link fails
    here) and runs a few scenarios across them, with the same checks."""
    machine = api_schema.as_state_machine()

    class Scenario(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case) -> dict[str, Any]:
            headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in FRAMING}
            case.headers = {**headers, **team.headers}
            if case.path.endswith("/events"):
                case.query = {**(case.query or {}), "follow": "false"}
            return {"base_url": live_server, "timeout": 30}

        def after_call(self, response, case) -> None:
            super().after_call(response, case)
            _count("stateful", case.operation.label, response.status_code)

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            # The same checks as above; the auth checks would flag the key this test sets.
            case.validate_response(
                response, checks=CHECKS, transport_kwargs=kwargs or None, recorder=self.recorder
            )

    Scenario.run(
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    assert sum(SENT["stateful"].values()) >= STATEFUL_SCENARIOS
