"""Access control of the SSE gateway's public port: ASGI middleware, applied in
:func:`processors.serve.gateway.create_app` (outermost first).

* :class:`SecurityHeaders` -- every response (both ports) carries a CSP that allows only the
  page's own scripts, styles and connections (inline ``style=`` attributes are allowed: the
  grid colours its cells with them), ``nosniff``, ``Referrer-Policy: no-referrer`` and no
  framing.
* :class:`Guard` -- on ``/sse/*`` and ``/api/*`` (the admin port: the Redis part only):

  - optional bearer tokens (``MASSIVE_SSE_TOKENS`` and/or ``MASSIVE_SSE_TOKEN_FILE``, one
    per line, re-read when it changes): ``Authorization: Bearer <t>`` or
    ``?access_token=<t>`` (EventSource cannot set headers); compared in constant time
    against every configured token; 401 otherwise.
    Off when no token is configured (the demo). The page, its static files and ``/healthz``
    stay open: they hold no data.
  - connection caps on SSE streams, global (``MAX_CLIENTS``) and per client IP
    (``MAX_PER_IP``; behind ``TRUSTED_PROXY_HOPS`` proxies the IP is taken from
    ``X-Forwarded-For``): 429 with ``Retry-After``; a slot is held for the stream's life and
    released when it ends (client gone, server shutdown).
  - Redis loading or just restarted: a request whose handler fails on Redis before it
    answered is retried a few times (a pooled connection that died with the server fails
    once, then redis-py reconnects); then 503 with ``Retry-After``, never a 500. An SSE stream
    first checks that Redis serves reads (``EXISTS``: a loading Redis answers ``PING`` but
    refuses reads), so a browser gets a 503 instead of a stream that ends at once.

Every refusal is counted in ``massive_sse_http_rejected_total{reason}``; held SSE slots are
the gauge ``massive_sse_connections``. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis

from schemas import keys
from streams.metrics import counter, gauge
from streams.retry import REDIS_UNAVAILABLE, Backoff, retrying

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)

# Short: a request waits at most ~0.5 s for Redis before it is told to come back later.
REQUEST_BACKOFF = Backoff(base_s=0.05, cap_s=0.3, jitter="equal")
REQUEST_ATTEMPTS = 3


class Tokens:
    """The accepted bearer tokens: ``fixed`` ones plus the non-empty, non-comment lines of
    ``path``, re-read when the file changes (a mounted Secret is updated in place, so a
    rotation needs no restart). Auth is on when any token or a file is configured; an empty
    file then refuses everyone (fail closed). Raises ValueError (naming the file, never a
    token) when the file is unreadable at start; later read errors keep the last tokens."""

    def __init__(self, fixed: tuple[str, ...] = (), path: str = "") -> None:
        self.fixed = tuple(t.strip().encode() for t in fixed if t.strip())
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: tuple[bytes, ...] = ()
        if path:
            self._reload(at_start=True)

    @property
    def enabled(self) -> bool:
        return bool(self.fixed or self.path)

    def current(self) -> tuple[bytes, ...]:
        if self.path:
            self._reload(at_start=False)
        return self.fixed + self._from_file

    def _reload(self, at_start: bool) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return
            text = Path(self.path).read_text()
        except OSError as exc:
            if at_start:
                raise ValueError(f"token file {self.path}: {exc.strerror or exc}") from None
            logger.warning("token file %s unreadable, keeping the last tokens: %s", self.path, exc)
            return
        lines = [ln.strip() for ln in text.splitlines()]
        self._from_file = tuple(ln.encode() for ln in lines if ln and not ln.startswith("#"))
        self._stamp = stamp
        logger.info("token file %s: %d tokens", self.path, len(self._from_file))


def token_ok(given: str | None, accepted: tuple[bytes, ...]) -> bool:
    """Constant-time check of ``given`` against every accepted token (no early exit)."""
    if given is None:
        return False
    raw = given.encode()
    ok = False
    for t in accepted:
        ok |= hmac.compare_digest(raw, t)
    return ok


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AccessMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected: Counter = counter(
            registry,
            "massive_sse_http_rejected_total",
            "Requests refused by the gateway (unauthorized, over_capacity, per_ip_limit, "
            "redis_unavailable)",
            ("reason",),
        )
        self.connections: Gauge = gauge(
            registry, "massive_sse_connections", "SSE streams holding a connection slot"
        )


class Slots:
    """Connection slots: at most ``max_total`` overall and ``max_per_ip`` per client IP
    (0: unlimited)."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> str | None:
        """Take a slot; None on success, else the refusal reason."""
        if self.max_total and self.total >= self.max_total:
            return "over_capacity"
        held = self.per_ip.get(ip, 0)
        if self.max_per_ip and held >= self.max_per_ip:
            return "per_ip_limit"
        self.total += 1
        self.per_ip[ip] = held + 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


class _Unretryable(Exception):
    """A Redis error after the response had started: it cannot be answered again."""


class Guard:
    """Auth, connection caps and Redis-unavailable answers for ``/sse/*`` and ``/api/*``
    (module docstring). ``auth=False`` and ``caps=False`` for the admin port."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        redis: Redis,
        registry: CollectorRegistry,
        tokens: Tokens | None = None,
        max_clients: int = 0,
        max_per_ip: int = 0,
        trusted_proxy_hops: int = 0,
        retry_after_s: int = 2,
        redis_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.app = app
        self.redis = redis
        # the gateway's bound on concurrent Redis calls: a thousand clients connecting at
        # once must queue for the pool, not exhaust it (MaxConnectionsError read as an outage)
        self.redis_slots = redis_slots or asyncio.Semaphore(32)
        self.tokens = tokens
        self.slots = Slots(max_clients, max_per_ip)
        self.hops = trusted_proxy_hops
        self.retry_after = str(retry_after_s).encode()
        self.metrics = AccessMetrics(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        is_sse, is_api = path.startswith("/sse/"), path.startswith("/api/")
        if scope["type"] != "http" or not (is_sse or is_api):
            await self.app(scope, receive, send)
            return
        tokens = self.tokens
        if tokens is not None and tokens.enabled and not token_ok(_token(scope), tokens.current()):
            await self._refuse(send, 401, "unauthorized", b"missing or wrong access token\n")
            return
        if is_api:
            await self._api(scope, receive, send)
            return
        ip = self.client_ip(scope)
        reason = self.slots.acquire(ip)
        if reason is not None:
            await self._refuse(send, 429, reason, b"too many streams, retry later\n")
            return
        self.metrics.connections.inc()
        try:
            try:
                await retrying(
                    "sse-gateway: stream",
                    self._redis_serves_reads,
                    None,
                    log=logger,
                    backoff=REQUEST_BACKOFF,
                    attempts=REQUEST_ATTEMPTS,
                )
            except REDIS_UNAVAILABLE:
                await self._unavailable(send)
                return
            await self.app(scope, receive, send)
        finally:
            self.slots.release(ip)
            self.metrics.connections.dec()

    async def _redis_serves_reads(self) -> None:
        async with self.redis_slots:
            await self.redis.exists(keys.SPOT_LATEST)

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        async def attempt() -> None:
            try:
                await self.app(scope, receive, tracked)
            except REDIS_UNAVAILABLE as exc:
                if started:
                    raise _Unretryable(str(exc)) from exc
                raise

        try:
            await retrying(
                f"sse-gateway: {scope.get('path', '')}",
                attempt,
                None,
                log=logger,
                backoff=REQUEST_BACKOFF,
                attempts=REQUEST_ATTEMPTS,
            )
        except REDIS_UNAVAILABLE:
            await self._unavailable(send)

    def client_ip(self, scope: Scope) -> str:
        peer = scope.get("client")
        ip = str(peer[0]) if peer else "-"
        if self.hops:
            for name, value in scope.get("headers", ()):
                if name == b"x-forwarded-for":
                    hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                    if hops:
                        # the entry our own proxies appended; anything left of it is the
                        # client's word
                        ip = hops[max(0, len(hops) - self.hops)]
                    break
        return ip

    async def _unavailable(self, send: Send) -> None:
        await self._refuse(send, 503, "redis_unavailable", b"redis unavailable, retry later\n")

    async def _refuse(self, send: Send, status: int, reason: str, body: bytes) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="massive-pipeline"'))
        else:
            headers.append((b"retry-after", self.retry_after))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, cred = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and cred.strip():
                return str(cred.strip())
    qs = scope.get("query_string", b"")
    if b"access_token" in qs:
        found = parse_qs(qs.decode("latin-1")).get("access_token")
        if found:
            return str(found[0])
    return None
