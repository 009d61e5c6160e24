"""One error type for the library and the service.

Every failure a user can cause or must act on is a `SharpError` with a stable `code`
(machine readable, used by the service's error shape and by the worker to decide whether
a job may be retried), a human `message`, and `param`: the dotted path of the spec field
at fault when there is one (for example ``spec.training.lr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SharpError(Exception):
    """Base class. `retryable` tells the worker whether another attempt could succeed.

    `errors`: every error a validation found, this one first (`combined`), so a user fixes
    them all in one go; empty for an error that stands alone."""

    code: str = "internal_error"
    status: int = 500
    retryable: bool = True

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.errors: list[SharpError] = []

    @staticmethod
    def combined(errors: Sequence[SharpError]) -> SharpError:
        """The first of `errors`, carrying all of them (`to_dict`'s ``errors`` list)."""
        first = errors[0]
        first.errors = list(errors)
        return first

    def _one(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}

    def to_dict(self) -> dict[str, Any]:
        """``{code, message, param}`` of the first error, and ``errors`` (each of them,
        the first included) when a validation found several."""
        d = self._one()
        if self.errors:
            d["errors"] = [e._one() for e in self.errors]
        return d

    def __str__(self) -> str:
        where = f" [{self.param}]" if self.param else ""
        lines = [f"{self.code}{where}: {self.message}"]
        for e in self.errors[1:]:
            also = f" [{e.param}]" if e.param else ""
            lines.append(f"  and {e.code}{also}: {e.message}")
        return "\n".join(lines)


class SpecError(SharpError):
    """The spec itself is invalid (unknown field, out-of-range number, wrong type)."""

    code = "invalid_spec"
    status = 422
    retryable = False


class ModelNotFoundError(SharpError):
    code = "model_not_found"
    status = 422
    retryable = False


class TokenizerMismatchError(SharpError):
    code = "tokenizer_mismatch"
    status = 422
    retryable = False


class PreflightError(SpecError):
    """A fatal finding of the preflight at job start (docs/planning.md, "Preflight"): its
    code and field are the finding's; ``findings`` is every finding made up to it (as dicts),
    so the job's event log shows them all beside the error."""

    def __init__(
        self, message: str, *, param: str | None, code: str, findings: list[dict[str, Any]]
    ):
        super().__init__(message, param=param, code=code)
        self.findings = findings


class TokenizerPreflightError(PreflightError, TokenizerMismatchError):
    """A fatal tokenizer finding at job start: still a `TokenizerMismatchError`."""


class DataError(SharpError):
    code = "data_error"
    status = 422
    retryable = False


class DataSourceUnavailableError(SharpError):
    """A remote data source (an ``s3://`` object) did not answer: another attempt may read it."""

    code = "data_source_unavailable"
    status = 503
    retryable = True


class UnsafeModelError(SharpError):
    """Refused for safety: remote code, pickled weights from an untrusted source."""

    code = "unsafe_model"
    status = 422
    retryable = False


class CheckpointError(SharpError):
    code = "checkpoint_error"
    status = 500
    retryable = True


class CheckpointMismatchError(CheckpointError):
    """A verified checkpoint whose weights do not fit the model (a key missing or extra).

    Not retryable: another attempt would resume from the same checkpoint."""

    code = "checkpoint_mismatch"
    retryable = False


class ArtifactWriteError(SharpError):
    code = "artifact_write_failed"
    status = 500
    retryable = False


class OutOfMemoryError(SharpError):
    code = "out_of_memory"
    status = 500
    retryable = False


class TeacherCacheCorruptError(SharpError):
    """A teacher-logit cache shard is missing or does not match its manifest's sha256.

    Not retryable by itself: the corrupt cache is discarded when this is raised, so a
    retry (``POST /v1/jobs/{id}/retry``) rebuilds it from the teacher."""

    code = "teacher_cache_corrupt"
    status = 500
    retryable = False


class LossParityError(SharpError):
    """The logit-loss kernel disagreed with the dense reference on the job's first
    micro-batch (value or gradient beyond the stated tolerance): training on it would be
    wrong. Not retryable: the same kernel gives the same answer; choose
    ``method.logit_kernel: torch`` or report the kernel."""

    code = "loss_parity"
    status = 500
    retryable = False
