"""Secrets (the Hugging Face token) never leave a process as text.

Why scrub text instead of trusting every message: a token reaches error messages by routes
nobody writes on purpose (a library's exception that quotes a URL or a header, a hub id a
user pasted a token into), and a stored error is served to the whole team by the API. So
each process registers the secrets it holds (`register_settings`), and every text it writes
where people read it goes through `scrub`: job events and errors (`JobRepository` scrubs
what it stores), log records (`install` puts `RedactFilter` on the root handlers), the
training process's stdout and stderr (`RedactingStream`). The value is replaced by `MARK`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

__all__ = [
    "MARK",
    "RedactFilter",
    "RedactingStream",
    "install",
    "register",
    "register_settings",
    "scrub",
    "scrub_data",
]

MARK = "[redacted]"
#: Shorter values are not secrets worth the risk of mangling ordinary text.
MIN_LENGTH = 8
#: The variables huggingface_hub reads a token from.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_secrets: set[str] = set()


def register(*values: str | None) -> None:
    """Scrub these values from now on (empty or short ones are ignored)."""
    for v in values:
        if v and len(v.strip()) >= MIN_LENGTH:
            _secrets.add(v.strip())


def register_settings(settings: Any) -> None:
    """The settings' `hf_token` and the token variables of this process's environment."""
    token = getattr(settings, "hf_token", None)
    register(token.get_secret_value() if token is not None else None)
    register(*(os.environ.get(name) for name in TOKEN_VARIABLES))


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by `MARK`."""
    for s in _secrets:
        if s in text:
            text = text.replace(s, MARK)
    return text


def scrub_data(value: Any) -> Any:
    """A JSON-like value (an event's data, a job's error) with `scrub` applied to every
    string in it, keys included. Returned as is when there is nothing to scrub."""
    if not _secrets:
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_data(k): scrub_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_data(v) for v in value)
    return value


class RedactFilter(logging.Filter):
    """On a handler: the record's message, traceback and stack, formatted and scrubbed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """`RedactFilter` on every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


class RedactingStream:
    """A text stream (sys.stderr) whose writes are scrubbed: what bypasses logging (a
    traceback printed at exit, a library's print) reaches the log file clean."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(scrub(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_std_streams() -> None:
    """sys.stdout and sys.stderr through `RedactingStream` (once)."""
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)  # type: ignore[assignment]
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)  # type: ignore[assignment]
