"""docs/api.md shows every route of the OpenAPI schema (with a curl example under it), so a
new endpoint cannot ship undocumented."""

from __future__ import annotations

import re
from pathlib import Path

from api.app import create_app
from service.settings import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_every_openapi_route_has_a_curl_example_in_docs_api_md(tmp_path: Path) -> None:
    # Building the app connects to nothing; the schema is all we read.
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}"))
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^### ", text, flags=re.MULTILINE)
    missing = []
    for path, ops in app.openapi()["paths"].items():
        for method in ops:
            heading = f"`{method.upper()} {path}`"
            body = next((s for s in sections if s.startswith(heading)), None)
            # the example names the path (ids filled in), e.g. /v1/jobs/job_…/cancel
            concrete = re.sub(r"\{[^}]+\}", '[^ "/?]+', path)
            if body is None or "curl" not in body or not re.search(concrete, body):
                missing.append(heading)
    assert not missing, f"docs/api.md lacks a section with a curl example for: {missing}"
    assert len(sections) > 10
