"""Property-based fuzzing of the running API from its own OpenAPI document (issue 4, item 7).

Schemathesis generates requests for every operation — valid and invalid parameters, bodies,
headers — and sends them, authenticated, to a real uvicorn on real Postgres and Redis. The
checks are the issue's: no 5xx, every status code documented, and every response's content
type and body conform to the schema. The case count is bounded (``MAX_EXAMPLES`` per
operation, derandomised so a CI run repeats the same cases) to stay well under a minute;
the number of cases actually sent is printed and recorded in docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TeamKey  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.slow]

MAX_EXAMPLES = 15
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SENT: dict[str, int] = {}


@pytest.fixture(scope="module")
def team(make_team) -> TeamKey:
    return make_team("fuzz")


@pytest.fixture(scope="module")
def api_schema(live_server: str):
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    total = sum(SENT.values())
    print(f"\nschemathesis: {total} cases over {len(SENT)} operations")
    for op, n in sorted(SENT.items()):
        print(f"  {n:4d}  {op}")


def _fuzz(operation, mode, base: str, team: TeamKey) -> None:
    """Send MAX_EXAMPLES generated cases of one operation in one generation mode."""
    label = f"{operation.label} [{mode.value}]"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        # Authenticated: a fuzzer stuck at 401 would test nothing but the auth dependency.
        headers = {**(case.headers or {}), **team.headers}
        params = dict(case.query or {})
        if case.path.endswith("/events"):
            params["follow"] = "false"  # a live job's stream never ends by itself
        case.call_and_validate(
            base_url=base, headers=headers, params=params, checks=CHECKS, timeout=30
        )
        SENT[label] = SENT.get(label, 0) + 1

    try:
        run()
    except Unsatisfiable:
        # An operation with no inputs (``/healthz``) has no way to violate its schema.
        if mode.value != "negative":
            raise


def test_every_operation_conforms_to_its_schema(api_schema, live_server: str, team) -> None:
    """Positive cases (valid by the schema) and negative ones (violating it) for each
    operation: no 5xx, documented status codes, conforming bodies."""
    from schemathesis.generation import GenerationMode

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, live_server, team)
    assert sum(SENT.values()) >= len(operations) * 2


def test_schema_is_served(live_server: str) -> None:
    doc = httpx.get(f"{live_server}/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/jobs" in doc["paths"]
