"""The service's errors: `sharp_core.errors.SharpError` plus the HTTP-only cases.

Why one hierarchy: the library's errors (a bad spec, a model that does not exist) and the
API's (no such job, bad key) reach clients in one shape,
``{"error": {"code", "message", "param"}}``, rendered by one handler in `api.app`. Codes are
stable strings clients can switch on; messages are for humans.
"""

from __future__ import annotations

from sharp_core.errors import SharpError

__all__ = [
    "SharpError",
    "NotFoundError",
    "UnauthorizedError",
    "InvalidRequestError",
    "MalformedJSONError",
    "IdempotencyConflictError",
    "InvalidStateError",
    "PayloadTooLargeError",
    "RangeNotSatisfiableError",
    "NotReadyError",
    "QuotaExceededError",
    "OffsetMismatchError",
    "GoneError",
]


class NotFoundError(SharpError):
    """Also what another team's job looks like: existence is never revealed."""

    code = "not_found"
    status = 404
    retryable = False


class UnauthorizedError(SharpError):
    code = "unauthorized"
    status = 401
    retryable = False


class InvalidRequestError(SharpError):
    """A well-formed request whose content is wrong (422), e.g. an unknown upload id."""

    code = "invalid_request"
    status = 422
    retryable = False


class MalformedJSONError(SharpError):
    code = "malformed_json"
    status = 400
    retryable = False


class IdempotencyConflictError(SharpError):
    code = "idempotency_conflict"
    status = 409
    retryable = False


class InvalidStateError(SharpError):
    """The job is not in a state that allows this action (retrying a running job)."""

    code = "invalid_state"
    status = 409
    retryable = False


class PayloadTooLargeError(SharpError):
    code = "payload_too_large"
    status = 413
    retryable = False


class RangeNotSatisfiableError(SharpError):
    code = "range_not_satisfiable"
    status = 416
    retryable = False


class NotReadyError(SharpError):
    code = "not_ready"
    status = 503
    retryable = True


class QuotaExceededError(SharpError):
    """A team limit set by an operator (``sharp admin teams quota``); ``param`` names it."""

    code = "quota_exceeded"
    status = 429
    retryable = True


class StoreUnavailableError(SharpError):
    """The artifact store (S3 endpoint, bucket) did not answer; try again later."""

    code = "store_unavailable"
    status = 503
    retryable = True


class OffsetMismatchError(SharpError):
    """An upload session's part was sent at an offset the server has not reached yet; the
    message says where it is (``GET /v1/uploads/sessions/{id}`` too)."""

    code = "offset_mismatch"
    status = 409
    retryable = False


class GoneError(SharpError):
    """Something that existed and no longer does (an expired or aborted upload session)."""

    code = "gone"
    status = 410
    retryable = False
