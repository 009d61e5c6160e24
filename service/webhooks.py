"""Signed webhooks: endpoints, the delivery outbox, signing, the SSRF guard, one attempt.

Why an outbox: `service.lifecycle` is the only writer of job statuses, and when a transition
ends a job (succeeded, failed, cancelled) it calls `enqueue_job_event` in the same
transaction. That writes one ``webhook_deliveries`` row per subscribed endpoint, so the event
exists exactly when the status does: a crash after the commit loses no delivery, a rolled
back transition sends none. The Celery message (`service.dispatch.send_delivery`) is sent
after the commit; a lost one is re-sent by the sweeper (`worker.reaper.redispatch_deliveries`).

Why the retry state lives in the row, not in Celery: each attempt is claimed by a
conditional UPDATE (`WebhookRepository.claim_attempt`) and its outcome written with the
next due time, so duplicates and re-sent messages never run an attempt twice, and every
attempt is in the log a team reads (``GET /v1/webhooks/{id}/deliveries``).

Why Fernet for the secrets: the server signs with the plaintext, so a hash would not do.
Encryption with a server key (``SHARP_WEBHOOK_SECRET_KEYS``, a `MultiFernet`) keeps the
database alone useless to a thief and lets an operator rotate that key without changing
any endpoint's secret; deriving secrets from a server key by HMAC would store nothing, but
rotating the key would then change every team's secret at once.

Why the URL is checked twice (docs/api.md, "SSRF"): at registration for a clear 422 naming
``url``, and again before each attempt, because DNS may answer differently later (DNS
rebinding). The attempt connects to the very address it checked (the host name goes in the
``Host`` header and TLS SNI), so a second lookup cannot swap it, and redirects are not
followed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from service.errors import InvalidRequestError, NotFoundError, QuotaExceededError, SharpError
from service.ids import new_id
from service.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from service.repositories import WebhookRepository
from service.settings import Settings
from service.txn import after_commit

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from service.db import Database
    from service.models import Job, Team
    from service.repositories import JobRepository

log = logging.getLogger(__name__)

#: The events an endpoint may subscribe to (``sweep.finished``: `service.sweeps`).
EVENTS: tuple[str, ...] = ("job.succeeded", "job.failed", "job.cancelled", "sweep.finished")
EVENT_FOR_STATUS = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}

SECRET_PREFIX = "whsec_"
SECRET_VISIBLE = 10  # "whsec_" + 4 characters
SIGNATURE_HEADER = "Sharp-Signature"
TIMESTAMP_HEADER = "Sharp-Timestamp"
DELIVERY_HEADER = "Sharp-Delivery"
EVENT_HEADER = "Sharp-Event"
USER_AGENT = "SHARP-Webhooks/1"
#: How old a signed timestamp a receiver should accept (what `verify` defaults to).
TOLERANCE_S = 300


class WebhooksNotConfiguredError(SharpError):
    """No ``SHARP_WEBHOOK_SECRET_KEYS``: secrets could not be stored encrypted."""

    code = "webhooks_not_configured"
    status = 503
    retryable = False


# --------------------------------------------------------------------------- secrets
def cipher(settings: Settings) -> MultiFernet:
    if not settings.webhook_secret_keys:
        raise WebhooksNotConfiguredError(
            "webhooks are not configured on this deployment: the operator sets "
            "SHARP_WEBHOOK_SECRET_KEYS (docs/operations.md)",
            param="url",
        )
    return MultiFernet([Fernet(k) for k in settings.webhook_secret_keys])


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


# --------------------------------------------------------------------------- signing
def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}." + body`` keyed with the whole secret string."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver runs (docs/api.md has the same code): the ``Sharp-Signature`` header
    is well formed, its timestamp recent, and one of its ``v1`` values matches."""
    parts = [p.split("=", 1) for p in header.split(",") if "=" in p]
    stamps = [v for k, v in parts if k.strip() == "t"]
    sigs = [v.strip() for k, v in parts if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit() or not sigs:
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, t, body)
    return any(hmac.compare_digest(expected, s) for s in sigs)


# --------------------------------------------------------------------------- SSRF guard
#: (host, port) -> the addresses it resolves to.
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refused_address(address: str) -> str | None:
    """Why `address` is no place to send a webhook, or None if it is a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what, flag in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("unspecified", ip.is_unspecified),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if flag:
            return what
    if not ip.is_global:
        return "non-public"
    return None


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses its host resolved to (all allowed)."""

    url: httpx.URL
    addresses: tuple[str, ...]


def _bad_url(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="url", code="invalid_webhook_url")


def check_url(url: str, settings: Settings, *, resolver: Resolver = resolve) -> Target:
    """Refuse what is not a public https URL (unless the operator allows http or private
    targets), naming ``url``; return the addresses to connect to."""
    limit = settings.webhook_url_max_length
    if len(url) > limit:
        raise _bad_url(f"the URL is longer than {limit} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as e:
        raise _bad_url(f"not a URL: {e}") from None
    allowed = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parsed.scheme not in allowed:
        raise _bad_url(
            f"the URL must use {' or '.join(allowed)}"
            + ("" if settings.webhook_allow_http else " (the operator has not allowed http)")
        )
    if not parsed.host:
        raise _bad_url("the URL has no host")
    if parsed.userinfo:
        raise _bad_url("the URL must not carry credentials (user:password@)")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    host = parsed.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS see it
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = resolver(host, port)
        except (OSError, UnicodeError) as e:
            raise _bad_url(f"the host '{parsed.host}' does not resolve: {e}") from None
    if not addresses:
        raise _bad_url(f"the host '{parsed.host}' does not resolve")
    if not settings.webhook_allow_private:
        for a in addresses:
            why = refused_address(a)
            if why is not None:
                raise _bad_url(
                    f"the host '{parsed.host}' resolves to a {why} address ({a}); this "
                    "deployment only sends webhooks to public addresses"
                )
    return Target(parsed, tuple(addresses))


# --------------------------------------------------------------------------- the outbox
def job_summary(job: Job) -> dict[str, Any]:
    """The job in an event's ``data``: what a receiver acts on, without the spec."""

    def iso(t: dt.datetime | None) -> str | None:
        return t.isoformat().replace("+00:00", "Z") if t is not None else None

    return {
        "object": "job",
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "queue": job.queue,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "progress": {"step": job.step, "max_steps": job.max_steps},
        "metrics": dict(job.latest_metrics or {}),
        "error": job.error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "url": f"/v1/jobs/{job.id}",
    }


def enqueue_job_event(repo: JobRepository, job_id: str, status: str) -> list[str]:
    """A job has just reached terminal `status` in `repo`'s transaction: one delivery per
    endpoint of its team subscribed to the event (none: a single indexed query). Their
    Celery messages go out after the commit through ``repo.deliver``. Returns their ids."""
    event_type = EVENT_FOR_STATUS.get(status)
    if event_type is None:
        return []
    hooks = WebhookRepository(repo.session)
    endpoints = [e for e in hooks.endpoints_for_job(job_id) if event_type in (e.events or [])]
    if not endpoints:
        return []
    job = repo.get(job_id)
    assert job is not None
    return _enqueue(repo.session, endpoints, event_type, job_summary(job), job_id, repo.deliver)


def enqueue_event(
    session: Session,
    team_id: str,
    event_type: str,
    data: dict[str, Any],
    deliver: Callable[[str], None] | None = None,
) -> list[str]:
    """An event that is not a job's (``sweep.finished``): one delivery per endpoint of
    `team_id` subscribed to it, in the caller's transaction (the caller writes it exactly
    once, e.g. under a conditional UPDATE). Returns the delivery ids."""
    hooks = WebhookRepository(session)
    endpoints = [e for e in hooks.list_endpoints(team_id) if event_type in (e.events or [])]
    if not endpoints:
        return []
    return _enqueue(session, endpoints, event_type, data, None, deliver)


def _enqueue(
    session: Session,
    endpoints: Sequence[WebhookEndpoint],
    event_type: str,
    data: dict[str, Any],
    job_id: str | None,
    deliver: Callable[[str], None] | None,
) -> list[str]:
    now = utcnow()
    event_id = new_id("evt")
    event = {"id": event_id, "type": event_type, "created": int(now.timestamp()), "data": data}
    body = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    rows = [
        WebhookDelivery(
            id=new_id("whd"),
            endpoint_id=e.id,
            event_id=event_id,
            event_type=event_type,
            job_id=job_id,
            body=body,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        for e in endpoints
    ]
    WebhookRepository(session).add_deliveries(rows)
    ids = [r.id for r in rows]
    if deliver is not None:
        after_commit(session, lambda: send_each(deliver, ids))
    return ids


def send_each(send: Callable[[str], None], ids: Sequence[str]) -> None:
    """Send each delivery's message; one failing send does not stop the others."""
    for delivery_id in ids:
        try:
            send(delivery_id)
        except Exception:  # noqa: BLE001 - the sweeper re-sends it
            log.exception("could not send webhook delivery %s; the sweeper will", delivery_id)


# --------------------------------------------------------------------------- the API's side
@dataclass(frozen=True)
class DeliveryPage:
    deliveries: Sequence[WebhookDelivery]
    attempts: dict[str, list[WebhookAttempt]]
    next_cursor: str | None


@dataclass
class WebhookService:
    """What ``/v1/webhooks`` does. Another team's endpoint is a 404."""

    session: Session
    settings: Settings
    resolver: Resolver = resolve

    @property
    def repo(self) -> WebhookRepository:
        return WebhookRepository(self.session)

    def create(
        self, team: Team, url: str, events: Sequence[str] | None, description: str | None
    ) -> tuple[WebhookEndpoint, str]:
        """A new endpoint and its signing secret (returned once, stored encrypted)."""
        box = cipher(self.settings)
        check_url(url, self.settings, resolver=self.resolver)
        limit = self.settings.webhook_max_endpoints
        if self.repo.count_endpoints(team.id) >= limit:
            raise QuotaExceededError(
                f"a team has at most {limit} webhook endpoints; delete one first", param="url"
            )
        chosen = list(dict.fromkeys(events)) if events else list(EVENTS)
        for i, e in enumerate(chosen):
            if e not in EVENTS:
                raise InvalidRequestError(f"unknown event '{e}'", param=f"events.{i}")
        secret = new_secret()
        endpoint = WebhookEndpoint(
            id=new_id("wh"),
            team_id=team.id,
            url=url,
            events=chosen,
            description=description,
            secret_encrypted=box.encrypt(secret.encode()).decode(),
            secret_prefix=secret[:SECRET_VISIBLE],
            created_at=utcnow(),
        )
        return self.repo.add_endpoint(endpoint), secret

    def list_endpoints(self, team: Team) -> Sequence[WebhookEndpoint]:
        return self.repo.list_endpoints(team.id)

    def get(self, team: Team, endpoint_id: str) -> WebhookEndpoint:
        endpoint = self.repo.get_endpoint_for_team(team.id, endpoint_id)
        if endpoint is None:
            raise NotFoundError(f"no webhook '{endpoint_id}'", param="webhook_id")
        return endpoint

    def delete(self, team: Team, endpoint_id: str) -> None:
        """Its pending deliveries go with it (nothing more is sent)."""
        self.repo.delete_endpoint(self.get(team, endpoint_id).id)

    def deliveries(
        self, team: Team, endpoint_id: str, *, limit: int, after: str | None
    ) -> DeliveryPage:
        from service.jobs import decode_cursor, encode_cursor

        endpoint = self.get(team, endpoint_id)
        before = decode_cursor(after) if after else None
        rows = self.repo.list_deliveries(endpoint.id, limit=limit + 1, before_id=before)
        page = rows[:limit]
        cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
        return DeliveryPage(page, self.repo.attempts_of([d.id for d in page]), cursor)


# --------------------------------------------------------------------------- one attempt
@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Outcome:
    """What `attempt_delivery` did: ``skipped`` (not ours to attempt now), ``succeeded``,
    ``failed`` (out of attempts), or ``pending`` with `retry_in` seconds to the next."""

    delivery_id: str
    status: str
    attempt: int | None = None
    retry_in: float | None = None


def backoff(settings: Settings, attempt: int) -> float:
    """The wait after failed attempt `attempt` (1-based): doubling, capped."""
    return float(
        min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** (attempt - 1))
    )


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    settings: Settings,
    *,
    resolver: Resolver = resolve,
    verify: ssl.SSLContext | bool = True,
) -> AttemptResult:
    """Check the URL again, then POST to the address that check resolved (no redirects).
    `verify`: the TLS trust (default: the system's CAs; tests pass their own CA)."""
    started = time.perf_counter()

    def done(code: int | None, error: str | None) -> AttemptResult:
        return AttemptResult(code, error, round((time.perf_counter() - started) * 1000, 3))

    try:
        target = check_url(url, settings, resolver=resolver)
    except InvalidRequestError as e:
        return done(None, f"refused: {e.message}")
    host = target.url.raw_host.decode("ascii")
    address = target.addresses[0]
    pinned = target.url.copy_with(host=address)
    extensions: dict[str, Any] = {}
    if target.url.scheme == "https" and host != address:
        extensions["sni_hostname"] = host  # TLS checks the certificate against the name
    headers = {**headers, "Host": target.url.netloc.decode("ascii")}
    try:
        with (
            httpx.Client(
                timeout=settings.webhook_timeout_s,
                follow_redirects=False,
                trust_env=False,
                verify=verify,
            ) as client,
            client.stream(
                "POST", pinned, content=body, headers=headers, extensions=extensions
            ) as response,
        ):
            code = response.status_code
    except httpx.HTTPError as e:
        return done(None, f"{type(e).__name__}: {e}"[:500])
    return done(code, None if 200 <= code < 300 else f"HTTP {code}")


def attempt_delivery(
    db: Database, settings: Settings, delivery_id: str, *, resolver: Resolver = resolve
) -> Outcome:
    """Claim the delivery's next attempt, send it signed, log it, and schedule the next one
    (or settle the delivery). Safe to call for any id, any number of times."""
    start = utcnow()
    lease = start + dt.timedelta(seconds=2 * settings.webhook_timeout_s + 30)
    with db.session() as s:
        repo = WebhookRepository(s)
        n = repo.claim_attempt(delivery_id, start, lease, settings.webhook_max_attempts)
        if n is None:
            return Outcome(delivery_id, "skipped")
        delivery = repo.get_delivery(delivery_id)
        endpoint = repo.get_endpoint(delivery.endpoint_id) if delivery else None
        if delivery is None or endpoint is None:
            return Outcome(delivery_id, "skipped")
        url, token, body = endpoint.url, endpoint.secret_encrypted, delivery.body.encode()
        event_type = delivery.event_type
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: event_type,
    }
    try:
        secret = cipher(settings).decrypt(token.encode()).decode()
    except (InvalidToken, WebhooksNotConfiguredError):
        result = AttemptResult(
            None, "cannot decrypt the signing secret (check SHARP_WEBHOOK_SECRET_KEYS)", 0.0
        )
    else:
        t = int(time.time())
        headers[TIMESTAMP_HEADER] = str(t)
        headers[SIGNATURE_HEADER] = signature_header(secret, t, body)
        result = post(url, body, headers, settings, resolver=resolver)
    now = utcnow()
    if result.ok:
        status, due, retry_in = "succeeded", None, None
    elif n >= settings.webhook_max_attempts:
        status, due, retry_in = "failed", None, None
    else:
        retry_in = backoff(settings, n)
        status, due = "pending", now + dt.timedelta(seconds=retry_in)
    with db.session() as s:
        repo = WebhookRepository(s)
        if repo.get_delivery(delivery_id) is None:  # its endpoint was deleted meanwhile
            return Outcome(delivery_id, "skipped", n)
        repo.add_attempt(
            WebhookAttempt(
                delivery_id=delivery_id,
                attempt=n,
                started_at=start,
                duration_ms=result.duration_ms,
                status_code=result.status_code,
                error=result.error,
            )
        )
        if not repo.settle(
            delivery_id,
            n,
            status=status,
            next_attempt_at=due,
            status_code=result.status_code,
            now=now,
        ):
            return Outcome(delivery_id, "skipped", n)
    log.info(
        "webhook delivery %s attempt %d: %s (%s, %.0f ms)",
        delivery_id,
        n,
        status,
        result.status_code or result.error,
        result.duration_ms,
    )
    return Outcome(delivery_id, status, n, retry_in)
