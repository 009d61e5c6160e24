"""The web dashboard at ``/ui``: server-rendered pages (Jinja2) and one plain script.

Why the pages hold no team data: the browser signs in with an API key kept in
``sessionStorage`` and the script calls the same JSON API as every other client, with the key
as its bearer token. There is no second authentication system, and no cookie, so there is
nothing for a cross-site request to ride on (CSRF-safe by construction); the pages are sent
with a strict Content-Security-Policy (scripts from this origin only) because a key in
``sessionStorage`` is only as safe as the page is from injected script, and every value the
script shows goes through ``textContent``.

The one endpoint of its own, ``POST /ui/api/parse-spec``, turns the submit form's YAML (or
JSON) into a spec plus the line of every field, so the API's ``param`` (``spec.training.lr``)
can be shown beside the line that holds it. It needs a valid key like the rest of the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from api.deps import TeamDep
from api.schemas import EXAMPLE_SPEC, ErrorResponse
from service.errors import SharpError
from service.lifecycle import JOB_STATUSES

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
static_files = StaticFiles(directory=str(HERE / "static"))

STATUSES: tuple[str, ...] = JOB_STATUSES

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)

router = APIRouter(prefix="/ui")


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=307)


@router.get("/login", include_in_schema=False, response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return _page(request, "login.html", page="login")


@router.get("/jobs", include_in_schema=False, response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs.html", page="jobs", statuses=STATUSES)


@router.get("/submit", include_in_schema=False, response_class=HTMLResponse)
def submit_page(request: Request) -> HTMLResponse:
    example = yaml.safe_dump(EXAMPLE_SPEC, sort_keys=False)
    return _page(request, "submit.html", page="submit", example=example)


@router.get("/jobs/{job_id}", include_in_schema=False, response_class=HTMLResponse)
def job_page(
    request: Request, job_id: Annotated[str, PathParam(max_length=64, pattern=r"^[A-Za-z0-9_]+$")]
) -> HTMLResponse:
    return _page(request, "job.html", page="job", job_id=job_id)


@router.get("/sweeps", include_in_schema=False, response_class=HTMLResponse)
def sweeps_page(request: Request) -> HTMLResponse:
    return _page(request, "sweeps.html", page="sweeps")


@router.get("/sweeps/{sweep_id}", include_in_schema=False, response_class=HTMLResponse)
def sweep_page(
    request: Request,
    sweep_id: Annotated[str, PathParam(max_length=64, pattern=r"^[A-Za-z0-9_]+$")],
) -> HTMLResponse:
    """The report table and every cell's eval curve, polled from the sweeps API while the
    sweep runs (docs/sweeps.md, "The dashboard page")."""
    return _page(request, "sweep.html", page="sweep", sweep_id=sweep_id)


@router.get("/teachers", include_in_schema=False, response_class=HTMLResponse)
def teachers_page(request: Request) -> HTMLResponse:
    return _page(request, "teachers.html", page="teachers")


@router.get("/teachers/{digest}", include_in_schema=False, response_class=HTMLResponse)
def teacher_page(
    request: Request, digest: Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]
) -> HTMLResponse:
    """The leaderboard of a teacher's students (docs/evaluation.md), from
    ``GET /v1/teachers/{digest}/students``; sortable by any column."""
    return _page(request, "teacher.html", page="teacher", digest=digest)


# -- the submit form's parser ----------------------------------------------------------------


class SpecText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=512 * 1024, description="A job spec as YAML or JSON.")


class ParsedSpec(BaseModel):
    spec: dict[str, Any]
    lines: dict[str, int] = Field(
        description="1-based line of each field, keyed like the API's `param` (`spec.training.lr`)."
    )


class InvalidSpecTextError(SharpError):
    code = "invalid_spec_text"
    status = 422
    retryable = False


def _field_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}"
            out.setdefault(path, key.start_mark.line + 1)
            _field_lines(value, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(f"{prefix}.{i}", item.start_mark.line + 1)
            _field_lines(item, f"{prefix}.{i}", out)


def parse_spec_text(text: str) -> ParsedSpec:
    """YAML (JSON is YAML too) → the spec and its field lines. A body ``{"spec": {...}}`` as
    sent to ``POST /v1/jobs`` is accepted as well."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise InvalidSpecTextError(
            f"not valid YAML or JSON{line}: {e.problem}", param="spec"
        ) from e
    except yaml.YAMLError as e:
        raise InvalidSpecTextError(f"not valid YAML or JSON: {e}", param="spec") from e
    if not isinstance(data, dict) or root is None:
        raise InvalidSpecTextError("the spec must be a mapping of fields", param="spec")
    if set(data) == {"spec"} and isinstance(data["spec"], dict):
        data = data["spec"]
        assert isinstance(root, yaml.MappingNode)
        root = root.value[0][1]
    lines: dict[str, int] = {"spec": root.start_mark.line + 1}
    _field_lines(root, "spec", lines)
    return ParsedSpec(spec=data, lines=lines)


@router.post(
    "/api/parse-spec",
    response_model=ParsedSpec,
    tags=["dashboard"],
    responses={
        400: {"model": ErrorResponse, "description": "The request body is not valid JSON."},
        401: {"model": ErrorResponse, "description": "Missing, malformed or revoked API key."},
        422: {"model": ErrorResponse, "description": "Not YAML/JSON, or not a mapping."},
    },
)
def parse_spec(body: SpecText, _team: TeamDep) -> ParsedSpec:
    """The dashboard's submit form: YAML or JSON text → the spec and the line of each field.
    Validates nothing beyond syntax; ``POST /v1/jobs`` is the one validator of specs."""
    return parse_spec_text(body.text)
