"""The artifact store: checkpoints and uploaded corpora behind one interface, two backends.

- `LocalStore`: a directory (``artifact_root``; ``upload_root`` for corpora), the default and
  what ``sharp up`` uses. The trainer writes checkpoints straight into it, so "uploading" one
  is a no-op.
- `S3Store`: an S3-compatible bucket and prefix (``SHARP_ARTIFACT_URL=s3://bucket/prefix``,
  ``SHARP_ARTIFACT_ENDPOINT_URL`` for MinIO / Ceph / GCS, credentials from the standard AWS
  variables or any source boto3 reads). The training process still writes locally; the
  worker uploads each checkpoint, files first and ``manifest.json`` last.

Why the manifest is the commit marker: S3 has no atomic rename of a folder. A checkpoint is
listed, served or resumed from only once its manifest is in the store, and the manifest is
written after every file it names, so a store that fails mid-upload leaves files that no
reader ever sees. Deleting goes the other way round: manifest first.

Keys are ``{team}/{job}/step_NNNNNN/{file}`` for checkpoints and ``uploads/ab/{sha256}.{fmt}``
for corpora (the local backend keeps corpora under ``upload_root``). A database row stores a
*location* (`ArtifactStore.location`): a path for the local store, ``s3://bucket/key`` for S3.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sharp_core.errors import ArtifactWriteError, CheckpointError, SharpError
from sharp_core.train.checkpoint import MANIFEST, STEP_RE, sha256_file, step_dir_name

CHUNK = 1024 * 1024
UPLOADS = "uploads"


class StoreConfigError(ValueError):
    """The store settings cannot work; the message is one line naming the setting."""


class StoreError(OSError):
    """The store did not answer or refused an operation (network, permissions, no bucket)."""


class ArtifactStore(abc.ABC):
    """Objects by key (``a/b/c``, no leading slash). Every method raises `StoreError` when
    the store cannot be reached, `FileNotFoundError` for a missing key."""

    remote: bool = False

    @abc.abstractmethod
    def describe(self) -> str: ...

    @abc.abstractmethod
    def location(self, key: str) -> str:
        """What a database row stores for `key`."""

    @abc.abstractmethod
    def key_of(self, location: str) -> str | None:
        """The key of a stored location, None if it is not in this store."""

    @abc.abstractmethod
    def put_file(self, key: str, src: Path, *, move: bool = False) -> None: ...

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download to `dest` (written under a temporary name, then renamed)."""

    @abc.abstractmethod
    def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def size(self, key: str, within: str | None = None) -> int | None:
        """The object's size, None if absent (or, locally, if it resolves outside `within`)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix/``, sorted by key."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None: ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise `StoreError` unless the store answers."""

    def presign(self, key: str, filename: str, expires_s: int) -> str | None:
        """A URL a client can GET without our credentials; None when the backend has none."""
        return None

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.read(key))

    def exists(self, key: str) -> bool:
        return self.size(key) is not None


# --------------------------------------------------------------------------- local directory
class LocalStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise FileNotFoundError(key)
        return path

    def location(self, key: str) -> str:
        return str(self._path(key))

    def key_of(self, location: str) -> str | None:
        path = Path(location).resolve()
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else None

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        dest = self._path(key)
        if Path(src).resolve() == dest:
            return  # the trainer wrote it in place
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(src, dest)
            return
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        path = self._path(key)
        with path.open("rb") as f:
            f.seek(start)
            left = length if length is not None else path.stat().st_size - start
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def size(self, key: str, within: str | None = None) -> int | None:
        try:
            path = self._path(key)
        except FileNotFoundError:
            return None
        if within is not None and not path.is_relative_to(self._path(within)):
            return None  # a symlink planted in a checkpoint folder cannot leak out
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> list[tuple[str, int]]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out.append((p.relative_to(self.root).as_posix(), p.stat().st_size))
        return sorted(out)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {self.root}: {e}") from e
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.root} is not writable")


# --------------------------------------------------------------------------- S3-compatible
def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes); StoreConfigError if not."""
    parsed = urlparse(url)
    bucket = parsed.netloc
    if parsed.scheme != "s3" or not bucket or parsed.query or parsed.fragment:
        raise StoreConfigError(f"SHARP_ARTIFACT_URL must look like s3://bucket/prefix, got {url!r}")
    # S3's bucket naming rules (3-63 characters, lower case, digits, dots, hyphens)
    ok = 3 <= len(bucket) <= 63 and all(c.islower() or c.isdigit() or c in ".-" for c in bucket)
    if not ok or bucket[0] in ".-" or bucket[-1] in ".-":
        raise StoreConfigError(f"SHARP_ARTIFACT_URL: {bucket!r} is not a valid S3 bucket name")
    return bucket, parsed.path.strip("/")


def s3_client(
    endpoint_url: str | None, region: str | None, why: str, *, quick: bool = False
) -> Any:
    """A boto3 S3 client for the store's endpoint and region, with the standard AWS
    credentials; StoreConfigError (`why` … no credentials) when there are none. `quick`:
    one try with short timeouts, for a check a request waits on."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise StoreConfigError(
            f"{why} but no AWS credentials were found: "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile / role)"
        )
    config = Config(
        connect_timeout=2 if quick else 5,
        read_timeout=5 if quick else 60,
        retries={"max_attempts": 1 if quick else 3, "mode": "standard"},
        # MinIO and most S3-compatible servers want path-style addressing
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return session.client(
        "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
    )


class S3Store(ArtifactStore):
    remote = True

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = client or s3_client(
            endpoint_url, region, "SHARP_ARTIFACT_URL is an S3 bucket"
        )

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _k(self, key: str) -> str:
        key = key.strip("/")
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise FileNotFoundError(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def key_of(self, location: str) -> str | None:
        head = f"s3://{self.bucket}/" + (f"{self.prefix}/" if self.prefix else "")
        return location[len(head) :] if location.startswith(head) else None

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchUpload"):
                raise FileNotFoundError(str(kw.get("Key", ""))) from None
            raise StoreError(f"{self.describe()}: {e}") from e
        except BotoCoreError as e:
            raise StoreError(f"{self.describe()}: {e}") from e

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=64 * CHUNK, multipart_chunksize=64 * CHUNK)
        self._call(self.client.upload_file, str(src), self.bucket, self._k(key), Config=cfg)
        if move:
            Path(src).unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
        try:
            with tmp.open("wb") as f:
                for chunk in self.read(key):
                    f.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key)}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            kw["Range"] = f"bytes={start}-{end}"
        body = self._call(self.client.get_object, **kw)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def size(self, key: str, within: str | None = None) -> int | None:
        try:
            head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._k(key))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    def list(self, prefix: str) -> list[tuple[str, int]]:
        full = self._k(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        for page in self._call(lambda: list(pages)):
            for obj in page.get("Contents", []):
                out.append((obj["Key"][strip:], int(obj["Size"])))
        return sorted(out)

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._k(k)} for k in keys]
        for i in range(0, len(batch), 1000):  # DeleteObjects takes at most 1000 keys
            self._call(
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch[i : i + 1000], "Quiet": True},
            )

    def ping(self) -> None:
        self._call(self.client.head_bucket, Bucket=self.bucket)

    # -- multipart (resumable uploads, `service.upload_sessions`) ------------------------
    def multipart_start(self, key: str) -> str:
        """Begin an S3 multipart upload to `key`; returns its UploadId."""
        r = self._call(self.client.create_multipart_upload, Bucket=self.bucket, Key=self._k(key))
        return str(r["UploadId"])

    def multipart_put(self, key: str, upload_id: str, number: int, src: Path) -> str:
        """Part `number` (1-based) from a local file; returns its ETag. Sending a number again
        replaces that part, so a retried part is harmless."""
        with Path(src).open("rb") as f:
            r = self._call(
                self.client.upload_part,
                Bucket=self.bucket,
                Key=self._k(key),
                UploadId=upload_id,
                PartNumber=number,
                Body=f,
            )
        return str(r["ETag"])

    def multipart_complete(self, key: str, upload_id: str, etags: dict[int, str]) -> None:
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        self._call(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=self._k(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    def multipart_abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=self._k(key),
                UploadId=upload_id,
            )

    def copy(self, src: str, dest: str) -> None:
        """A server-side copy (boto3's managed copy: multipart above 5 GB); no byte comes
        through this process."""
        self._call(
            self.client.copy,
            {"Bucket": self.bucket, "Key": self._k(src)},
            self.bucket,
            self._k(dest),
        )

    def presign(self, key: str, filename: str, expires_s: int) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": self._k(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        return self._call(
            self.client.generate_presigned_url, "get_object", Params=params, ExpiresIn=expires_s
        )


# --------------------------------------------------------------------------- from settings
def make_store(settings: Any) -> ArtifactStore:
    """The checkpoint store the settings name. StoreConfigError (one line) if they cannot work."""
    url = settings.artifact_url
    if not url:
        return LocalStore(Path(settings.artifact_root))
    bucket, prefix = parse_s3_url(url)
    endpoint = settings.artifact_endpoint_url
    if endpoint is not None:
        ep = urlparse(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise StoreConfigError(
                f"SHARP_ARTIFACT_ENDPOINT_URL must be an http(s) URL, got {endpoint!r}"
            )
    return S3Store(bucket, prefix, endpoint_url=endpoint, region=settings.artifact_region)


def store_problem(settings: Any) -> str | None:
    """Why the store settings cannot work (one line naming the setting), or None. Checked by
    ``sharp up`` and the worker before they start anything; reachability is /readyz's job."""
    try:
        make_store(settings)
    except StoreConfigError as e:
        return str(e)
    return None


def make_upload_store(settings: Any) -> ArtifactStore:
    """Where corpora go: ``upload_root`` locally, else the same bucket under ``uploads/``."""
    store = make_store(settings)
    return store if store.remote else LocalStore(Path(settings.upload_root))


def upload_key(sha256: str, fmt: str, remote: bool) -> str:
    name = f"{sha256[:2]}/{sha256}.{fmt}"
    return f"{UPLOADS}/{name}" if remote else name


_STORES: dict[tuple[Any, ...], ArtifactStore] = {}


def get_store(settings: Any, uploads: bool = False) -> ArtifactStore:
    """One store (one boto3 client, thread-safe) per process and settings."""
    key = (
        uploads,
        settings.artifact_url,
        settings.artifact_endpoint_url,
        settings.artifact_region,
        str(settings.artifact_root),
        str(settings.upload_root),
    )
    if key not in _STORES:
        _STORES[key] = make_upload_store(settings) if uploads else make_store(settings)
    return _STORES[key]


# --------------------------------------------------------------------------- checkpoints
def job_key(team_id: str, job_id: str) -> str:
    return f"{team_id}/{job_id}"


def checkpoint_key(team_id: str, job_id: str, step: int) -> str:
    return f"{job_key(team_id, job_id)}/{step_dir_name(step)}"


def upload_checkpoint(store: ArtifactStore, key: str, local: Path, manifest: dict) -> None:
    """Every file the manifest names, then the manifest: the checkpoint exists from then on."""
    for name in sorted(manifest.get("files", {})):
        store.put_file(f"{key}/{name}", local / name)
    store.put_file(f"{key}/{MANIFEST}", local / MANIFEST)


def delete_checkpoint(store: ArtifactStore, key: str) -> int:
    """Manifest first (it stops being listed), then the rest. Returns the bytes freed."""
    objects = store.list(key)
    store.delete([f"{key}/{MANIFEST}"])
    store.delete([k for k, _ in objects if not k.endswith(f"/{MANIFEST}")])
    if isinstance(store, LocalStore):
        store.delete_tree(key)
    return sum(size for _, size in objects)


def complete_steps(store: ArtifactStore, job: str) -> list[int]:
    """Steps of `job` (a `job_key`) whose manifest is in the store, oldest first."""
    steps = []
    for key, _ in store.list(job):
        parts = key[len(job) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and (m := STEP_RE.match(parts[0])):
            steps.append(int(m.group(1)))
    return sorted(steps)


def fetch_checkpoint(store: ArtifactStore, key: str, dest: Path) -> dict[str, Any]:
    """Download a complete checkpoint into `dest` (a step folder), verified against its
    manifest, atomically: a temporary folder renamed into place. Returns the manifest."""
    try:
        manifest = json.loads(store.read_bytes(f"{key}/{MANIFEST}"))
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{key}: no readable manifest in the store: {e}") from None
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        for name, meta in sorted(manifest.get("files", {}).items()):
            target = (tmp / name).resolve()
            if not target.is_relative_to(tmp.resolve()):
                raise CheckpointError(f"{key}: manifest names a file outside it: {name}")
            store.get_file(f"{key}/{name}", target)
            if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
                raise CheckpointError(f"{key}/{name} does not match its manifest")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except FileNotFoundError as e:
        raise CheckpointError(f"{key}: a file of the manifest is missing: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def sync_for_resume(store: ArtifactStore, job: str, out_dir: Path) -> int | None:
    """Make `out_dir` hold what a resume must start from: the store's newest complete
    checkpoint (downloaded unless a verified copy is here) and nothing newer — a local
    checkpoint the store never got (its upload failed) is not part of the job's history.
    Returns the step resumed from, or None. A no-op for the local store (it *is* out_dir)."""
    if not store.remote:
        return None
    from sharp_core.train.checkpoint import list_checkpoints, verify_manifest

    steps = complete_steps(store, job)
    latest = steps[-1] if steps else None
    for step, path in list_checkpoints(out_dir):
        if latest is None or step > latest:
            shutil.rmtree(path, ignore_errors=True)
    if latest is None:
        return None
    dest = out_dir / step_dir_name(latest)
    try:
        verify_manifest(dest)
        return latest
    except CheckpointError:
        pass
    out_dir.mkdir(parents=True, exist_ok=True)
    fetch_checkpoint(store, f"{job}/{step_dir_name(latest)}", dest)
    return latest


def fetch_file(store: ArtifactStore, location: str, dest: Path, sha256: str) -> Path:
    """A stored corpus as a local file (cached by content), checked against its sha256."""
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    key = store.key_of(location)
    if key is None:
        raise FileNotFoundError(location)
    store.get_file(key, dest)
    if sha256_file(dest) != sha256:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"{location}: content does not match its sha256")
    return dest


def with_retries(
    settings: Any, what: str, fn: Callable[[], Any], error: type[SharpError] = ArtifactWriteError
) -> Any:
    """`fn` again while the store is unreachable (any OSError, `StoreError` included), for up
    to ``artifact_retry_s``; then `error` — by default ArtifactWriteError
    (``artifact_write_failed``, not retryable), which fails the job."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

    def transient(e: BaseException) -> bool:
        return isinstance(e, OSError) and not isinstance(e, FileNotFoundError)

    retrying = Retrying(
        retry=retry_if_exception(transient),
        stop=stop_after_delay(settings.artifact_retry_s),
        wait=wait_exponential(multiplier=0.5, max=10.0),
        reraise=True,
    )
    try:
        return retrying(fn)
    except OSError as e:
        raise error(f"cannot {what}: {e}") from e


# --------------------------------------------------------------------------- usage
def store_walk(store: ArtifactStore) -> list[tuple[str, int]]:
    """(key, size) of every object in the store, sorted (the operator's usage and prune)."""
    if isinstance(store, LocalStore):
        if not store.root.is_dir():
            return []
        return sorted(
            (p.relative_to(store.root).as_posix(), p.stat().st_size)
            for p in store.root.rglob("*")
            if p.is_file() and not p.is_symlink()
        )
    assert isinstance(store, S3Store)
    strip = len(store.prefix) + 1 if store.prefix else 0
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=f"{store.prefix}/" if store.prefix else ""
    )
    return sorted(
        (o["Key"][strip:], int(o["Size"]))
        for page in store._call(lambda: list(pages))
        for o in page.get("Contents", [])
    )
