"""Where a data set's files are: globs expanded in a stable order, ``s3://`` objects fetched
into a local cache, folders written by ``datasets`` ``save_to_disk`` recognised. No torch
here: in the service the training process expands, confines and fetches
(`worker.child.confine_spec_files`) before the trainer reads a byte (docs/data.md,
"Sources").

S3: the caller passes the client (the service builds it from the artifact store's endpoint,
region and credentials; a library run uses boto3's defaults, ``AWS_ENDPOINT_URL`` included).
Each object lands once per (bucket, key, ETag, size) in ``cache_dir``, so a second job, or a
second rank, reads the same local file and the tokenized cache key, made of the bytes, does
not change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sharp_core.errors import DataError, DataSourceUnavailableError

__all__ = [
    "S3Object",
    "expand_entry",
    "expand_files",
    "fetch_s3_entry",
    "fetch_s3_object",
    "is_s3",
    "list_s3",
    "parse_s3",
    "saved_dataset_kind",
]

TRAIN_PARAM = "spec.dataset"
S3 = "s3://"
_MAGIC = re.compile(r"[*?\[]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def expand_entry(f: str, param: str) -> list[str]:
    """One local entry as is, or a glob (``shards/*.parquet``, ``**`` across folders) as its
    matches in sorted order (so the data's order, and its cache key, do not depend on the
    file system); a glob that matches nothing is an error naming `param`."""
    import glob

    if not _MAGIC.search(f):
        return [f]
    hits = sorted(glob.glob(str(Path(f).expanduser()), recursive=True))
    if not hits:
        raise DataError(f"no file matches {f}", param=param)
    return hits


def expand_files(files: list[str], where: str = TRAIN_PARAM) -> list[str]:
    """`expand_entry` of each entry of ``<where>.files``, in order."""
    return [hit for i, f in enumerate(files) for hit in expand_entry(f, f"{where}.files.{i}")]


# ------------------------------------------------------------------------ save_to_disk


def saved_dataset_kind(path: str | Path) -> Literal["dataset", "dict"] | None:
    """What ``datasets``' ``save_to_disk`` left in folder `path`: a ``Dataset`` (its
    ``state.json`` and ``dataset_info.json``), a ``DatasetDict`` (``dataset_dict.json``, one
    such folder per split), or None (not a folder, or not one of those)."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "dataset_dict.json").is_file():
        return "dict"
    if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
        return "dataset"
    return None


# ------------------------------------------------------------------------------- S3


def is_s3(entry: str) -> bool:
    return entry.startswith(S3)


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    etag: str
    size: int

    @property
    def url(self) -> str:
        return f"{S3}{self.bucket}/{self.key}"


def parse_s3(entry: str, param: str) -> tuple[str, str]:
    """``s3://bucket/key`` (or a glob over keys) → (bucket, key); DataError naming `param`
    when it is not that form."""
    bucket, _, key = entry[len(S3) :].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise DataError(
            f"{entry!r}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, "
            "dots, hyphens)",
            param=param,
        )
    if not key or key.endswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise DataError(
            f"{entry!r}: give an object (s3://bucket/key.parquet) or a glob over keys "
            "(s3://bucket/prefix/*.parquet)",
            param=param,
        )
    return bucket, key


def _key_regex(pattern: str) -> re.Pattern[str]:
    """A glob over keys as a regex: ``*`` and ``?`` stay inside one ``/`` segment, ``**``
    crosses them, ``[...]`` is a character class (``[!...]`` negated)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            neg = body.startswith("!")
            body = body[1:] if neg else body
            out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


@contextlib.contextmanager
def _s3_errors(entry: str, param: str) -> Iterator[None]:
    """botocore's failures as the job's: a missing or forbidden object is the spec's fault
    (DataError naming `param`, not retried); an unreachable store may pass (retryable)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            what = "no such bucket" if code == "NoSuchBucket" else "no such object"
            raise DataError(f"{entry}: {what}", param=param) from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise DataError(
                f"{entry}: this deployment's S3 credentials may not read it ({code})", param=param
            ) from None
        raise DataSourceUnavailableError(f"{entry}: {code or e}", param=param) from None
    except NoCredentialsError:
        raise DataError(
            f"{entry}: no S3 credentials where the data is read (AWS_ACCESS_KEY_ID …)",
            param=param,
        ) from None
    except BotoCoreError as e:
        raise DataSourceUnavailableError(f"{entry}: {e}", param=param) from None


def list_s3(client: Any, entry: str, param: str, *, limit: int | None = None) -> list[S3Object]:
    """The objects `entry` names, sorted by key: the one object (HEAD), or every key the
    glob matches (one listing of the prefix before the first wildcard). `limit`: stop after
    that many matches (a check at submission needs one). Nothing there: DataError."""
    bucket, key = parse_s3(entry, param)
    with _s3_errors(entry, param):
        m = _MAGIC.search(key)
        if m is None:
            head = client.head_object(Bucket=bucket, Key=key)
            return [S3Object(bucket, key, str(head["ETag"]).strip('"'), int(head["ContentLength"]))]
        regex = _key_regex(key)
        prefix = key[: m.start()]
        found: list[S3Object] = []
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", []):
                if regex.fullmatch(o["Key"]) and not o["Key"].endswith("/"):
                    found.append(
                        S3Object(bucket, o["Key"], str(o["ETag"]).strip('"'), int(o["Size"]))
                    )
            if limit is not None and len(found) >= limit:
                break
    if not found:
        raise DataError(f"no object matches {entry}", param=param)
    return sorted(found, key=lambda o: o.key)


def fetch_s3_object(client: Any, obj: S3Object, cache_dir: Path, param: str) -> Path:
    """The object as a local file under `cache_dir`, downloaded once per (bucket, key,
    ETag, size): ``s3/<digest[:2]>/<digest>/<name>`` keeps the key's name, whose extension
    picks the reader. Concurrent callers (ranks, jobs) wait on a lock file; the download is
    written under a temporary name and renamed, and asked for with ``IfMatch`` so an object
    replaced since the listing is not stored under the old ETag."""
    ident = f"{obj.bucket}/{obj.key}\0{obj.etag}\0{obj.size}"
    digest = hashlib.sha256(ident.encode()).hexdigest()
    folder = Path(cache_dir) / "s3" / digest[:2] / digest
    dest = folder / Path(obj.key).name
    if dest.is_file() and dest.stat().st_size == obj.size:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if dest.is_file() and dest.stat().st_size == obj.size:
            return dest  # another process fetched it while we waited
        tmp = folder / f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            with _s3_errors(obj.url, param):
                body = client.get_object(Bucket=obj.bucket, Key=obj.key, IfMatch=obj.etag)["Body"]
                with tmp.open("wb") as f:
                    for chunk in body.iter_chunks(1 << 20):
                        f.write(chunk)
                body.close()
            if tmp.stat().st_size != obj.size:
                raise DataSourceUnavailableError(
                    f"{obj.url}: got {tmp.stat().st_size} bytes of {obj.size}", param=param
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def fetch_s3_entry(client: Any, entry: str, cache_dir: Path, param: str) -> list[str]:
    """Every object `entry` names (`list_s3`), fetched (`fetch_s3_object`): local paths in
    key order."""
    return [
        str(fetch_s3_object(client, o, cache_dir, param)) for o in list_s3(client, entry, param)
    ]


def default_s3_client() -> Any:
    """boto3's own client (its credential chain, ``AWS_ENDPOINT_URL``): for library runs."""
    import boto3

    return boto3.client("s3")


def default_cache_dir() -> Path:
    return Path("~/.cache/sharp/data").expanduser()
