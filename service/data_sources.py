"""``s3://`` entries of ``dataset.files``: which the deployment lets a job read, the check at
submission, the fetch at job start (docs/data.md, "Sources").

Why a list of allowed prefixes (``SHARP_DATASET_S3_ROOTS``), empty by default: the artifact
store's credentials read whatever they are allowed to, and a job trains a model the team can
download on whatever it reads. Why the artifact store's own prefix is always refused: it
holds every team's uploads and checkpoints, which no job may read as "data".
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from service.errors import InvalidRequestError
from service.settings import Settings
from service.store import StoreConfigError, parse_s3_url, s3_client
from sharp_core.data.sources import fetch_s3_entry, list_s3, parse_s3
from sharp_core.errors import DataError, DataSourceUnavailableError

__all__ = ["check_s3_allowed", "check_s3_source", "data_s3_client", "fetch_s3_source"]

_CLIENTS: dict[tuple[Any, ...], Any] = {}


def _literal(key: str) -> str:
    """The key up to its first wildcard: every key the pattern matches starts with it."""
    cut = min((i for i, c in enumerate(key) if c in "*?["), default=len(key))
    return key[:cut]


def check_s3_allowed(url: str, settings: Settings, param: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` entry this deployment may read, else a 422 naming
    `param`: the URL's form, a root of ``dataset_s3_roots`` above every key it can match,
    nothing it can match inside the artifact store's prefix."""
    bucket, key = parse_s3(url, param)
    reach = _literal(key)
    if not settings.dataset_s3_roots:
        raise InvalidRequestError(
            "this deployment reads no s3:// data: SHARP_DATASET_S3_ROOTS is not set. Upload "
            "the data or ask the operator for a root.",
            param=param,
            code="file_not_allowed",
        )
    if settings.artifact_url:
        abucket, aprefix = parse_s3_url(settings.artifact_url)
        inside = not aprefix or reach.startswith(f"{aprefix}/") or f"{aprefix}/".startswith(reach)
        if bucket == abucket and inside:
            raise InvalidRequestError(
                f"{url!r} can name objects of the artifact store (s3://{abucket}/{aprefix}), "
                "which no job reads as data",
                param=param,
                code="file_not_allowed",
            )
    for root in settings.dataset_s3_roots:
        rbucket, _, rprefix = root.removeprefix("s3://").partition("/")
        rprefix = rprefix.strip("/")
        if rbucket == bucket and (not rprefix or reach.startswith(f"{rprefix}/")):
            return bucket, key
    raise InvalidRequestError(
        f"{url!r} is outside the S3 prefixes this deployment reads from",
        param=param,
        code="file_not_allowed",
    )


def data_s3_client(settings: Settings, *, quick: bool = False) -> Any:
    """One client per process for data reads: the artifact store's endpoint and region, the
    standard AWS credentials. `quick`: one try and short timeouts (the API's check must not
    hold a submission for long). StoreConfigError when there are no credentials."""
    key = (settings.artifact_endpoint_url, settings.artifact_region, quick)
    if key not in _CLIENTS:
        _CLIENTS[key] = s3_client(
            settings.artifact_endpoint_url,
            settings.artifact_region,
            "dataset.files names s3:// objects",
            quick=quick,
        )
    return _CLIENTS[key]


def check_s3_source(url: str, settings: Settings, param: str) -> None:
    """At submission: allowed (`check_s3_allowed`) and, when the store answers, matching
    something (422 naming `param` when nothing is there). No credentials here, or a store
    that does not answer now: left to the worker, which checks again when the job starts."""
    check_s3_allowed(url, settings, param)
    try:
        client = data_s3_client(settings, quick=True)
    except StoreConfigError:
        return
    with contextlib.suppress(DataSourceUnavailableError):
        list_s3(client, url, param, limit=1)


def fetch_s3_source(url: str, settings: Settings, cache_dir: Path, param: str) -> list[str]:
    """At job start: allowed again (the roots may have changed), listed and fetched into
    `cache_dir` (`sharp_core.data.sources.fetch_s3_entry`); local paths in key order."""
    check_s3_allowed(url, settings, param)
    try:
        client = data_s3_client(settings)
    except StoreConfigError as e:
        raise DataError(f"{url}: {e}", param=param) from None
    return fetch_s3_entry(client, url, cache_dir, param)
