"""The OpenAPI document: FastAPI's, finished for generated clients and fuzzers.

Why a pass over the whole document instead of annotations on each route: the rules are the
same for every route, so one function applies them to the routes added later too.

- **operationIds** are the route function's name in camelCase (``create_job`` → ``createJob``)
  unless the route sets one: stable as long as the Python name is, and readable in a client.
- **Errors**: every 4xx FastAPI documents with its own ``HTTPValidationError`` is rendered by
  `api.app` as ``{"error": {"code", "message", "param"}}``, so the document says
  ``ErrorResponse`` instead; JSON bodies can also be 400 (malformed) and 413 (too large);
  every ``/v1`` route can be 401, and names the bearer scheme.
- **Links** follow from the response schemas: an answer that *is* a job (``JobPublic``) links
  to every route whose only path parameter is ``job_id``, and so on for lists, uploads and
  checkpoints (`RESOURCES`). A route added later with ``{job_id}`` is linked without edits.

**Browsable at /docs** with Swagger UI served from the ``swagger-ui-bundle-v2`` package, not a
CDN, so the page works on a network without internet (FastAPI's "self-hosting JavaScript and
CSS for docs"); the page loads nothing from another host.

The job spec's own schema (``JobSpec`` and its parts) is the pydantic model's, referenced by
`api.schemas.JobCreate`; nothing about it is written here. `_publish_spec` only puts the
model's schema back as pydantic renders it, because FastAPI's rendering drops ``default: null``
(``teacher``, ``tokenizer.name``…), and docs/spec.md lists those defaults too.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from sharp_core.spec import JobSpec

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operation_id(route: APIRoute) -> str:
    """``generate_unique_id_function`` of the app: the route function's name in camelCase."""
    head, *rest = route.name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


#: Response schema → {path parameter: runtime expression that fills it}, and the parameter a
#: target must take for the link to be drawn (so a checkpoint list links to a checkpoint's
#: routes, not back to the job's).
RESOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "JobPublic": ("job_id", {"job_id": "$response.body#/id"}),
    "JobsPublic": ("job_id", {"job_id": "$response.body#/data/0/id"}),
    "UploadPublic": ("upload_id", {"upload_id": "$response.body#/id"}),
    "UploadSessionPublic": ("session_id", {"session_id": "$response.body#/id"}),
    "SweepPublic": ("sweep_id", {"sweep_id": "$response.body#/id"}),
    "SweepsPublic": ("sweep_id", {"sweep_id": "$response.body#/data/0/id"}),
    "WebhookCreated": ("webhook_id", {"webhook_id": "$response.body#/id"}),
    "WebhookPublic": ("webhook_id", {"webhook_id": "$response.body#/id"}),
    "WebhooksPublic": ("webhook_id", {"webhook_id": "$response.body#/data/0/id"}),
    "CheckpointsPublic": (
        "step",
        {
            "job_id": "$request.path.job_id",
            "step": "$response.body#/data/0/step",
            "name": "$response.body#/data/0/files/0/name",
        },
    ),
}

#: Links that carry a value into a request body rather than a path.
BODY_LINKS: dict[str, list[tuple[str, str, dict[str, Any], str]]] = {
    "UploadPublic": [
        (
            "TrainOnUpload",
            "createJob",
            {"spec": {"dataset": {"source": "upload", "upload_id": "$response.body#/id"}}},
            "Use the upload as a job's training data: its `id` goes to "
            "`spec.dataset.upload_id` with `spec.dataset.source: upload`; the rest of the "
            "spec is yours.",
        ),
        (
            "PlanOnUpload",
            "planJob",
            {"spec": {"dataset": {"source": "upload", "upload_id": "$response.body#/id"}}},
            "Plan a job on the upload before queueing it (memory per GPU, strategy, cost): "
            "the same body as `createJob`.",
        ),
    ],
}


def _path_params(path: str) -> set[str]:
    return {m.split(":")[0] for m in re.findall(r"\{([^}]+)\}", path)}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc.get("paths", {}).items()
        for method, op in item.items()
        if method in _HTTP_METHODS
    ]


def _response_ref(response: dict[str, Any]) -> str | None:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref.startswith("#/components/schemas/") else None


def _document_errors(doc: dict[str, Any]) -> None:
    error_json = {"application/json": {"schema": ERROR_REF}}
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `sharp admin keys create TEAM`.",
    }
    for path, _method, op in _operations(doc):
        responses = op.setdefault("responses", {})
        for code, response in responses.items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref", "").endswith("/HTTPValidationError"):
                response["content"] = dict(error_json)
                if code == "422":
                    response["description"] = "Invalid input; `param` names the field."
        for response in responses.values():
            content_types = response.get("content", {})
            if len(content_types) > 1 and content_types.get("application/json") == {"schema": {}}:
                del content_types["application/json"]  # FastAPI's default beside the real one
            for media_type, content in content_types.items():
                # Downloads: a schema, so a generated client keeps the method. (Not the event
                # stream: fuzzers read its schema as one event's, clients as the whole text.)
                if not content.get("schema") and not media_type.startswith(
                    ("text/", "application/json")
                ):
                    content["schema"] = {"type": "string", "format": "binary"}
        body = op.get("requestBody", {}).get("content", {})
        if "application/json" in body:
            responses.setdefault(
                "400", {"description": "The body is not valid JSON.", "content": error_json}
            )
            responses.setdefault(
                "413", {"description": "The body is over the size limit.", "content": error_json}
            )
        if path.startswith("/v1/") or "401" in responses:
            responses.setdefault(
                "401", {"description": "Missing, malformed or revoked API key."}
            ).setdefault("content", error_json)
            op.setdefault("security", [{"bearerAuth": []}])
    schemas = doc.get("components", {}).get("schemas", {})
    text = repr(doc.get("paths", {})) + repr(
        {k: v for k, v in schemas.items() if k not in ("HTTPValidationError", "ValidationError")}
    )
    for name in ("HTTPValidationError", "ValidationError"):
        if f"/{name}'" not in text:
            schemas.pop(name, None)


def _publish_spec(doc: dict[str, Any]) -> None:
    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, part in {**schema.pop("$defs", {}), "JobSpec": schema}.items():
        schemas[name] = part


def _add_links(doc: dict[str, Any]) -> None:
    ops = _operations(doc)
    for _path, _method, source in ops:
        for response in source.get("responses", {}).values():
            resource = _response_ref(response)
            if resource is None:
                continue
            links: dict[str, Any] = {}
            if resource in RESOURCES:
                key, provides = RESOURCES[resource]
                for path, _m, target in ops:
                    params = _path_params(path)
                    if target is source or key not in params or not params <= set(provides):
                        continue
                    target_id = target["operationId"]
                    links[target_id[:1].upper() + target_id[1:]] = {
                        "operationId": target_id,
                        "parameters": {p: provides[p] for p in sorted(params)},
                        "description": f"Call `{target_id}` with the {key} of this answer.",
                    }
            known = {op["operationId"] for _p, _m, op in ops}
            for name, target_id, body, description in BODY_LINKS.get(resource, []):
                if target_id in known:
                    links[name] = {
                        "operationId": target_id,
                        "requestBody": body,
                        "description": description,
                    }
            if links:
                response["links"] = links


def install(app: FastAPI) -> None:
    """Serve the finished document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)  # caches it on app.openapi_schema
            _publish_spec(doc)
            _document_errors(doc)
            _add_links(doc)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


#: Where Swagger UI's own files are served (the package's copy of swagger-ui-dist).
DOCS_STATIC = "/docs/static"


def install_docs(app: FastAPI, path: str = "/docs") -> None:
    """Swagger UI at `path`, its script, style and icon served by this app (create the app
    with ``docs_url=None``)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get(path, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon-32x32.png",
        )
