"""The Massive REST client of the chain-poller: requests, retries, pagination, redaction.

* Every request goes to the configured base URL (``MASSIVE_POLLER_REST_URL``); the key goes
  as ``?apiKey=`` (the provider's spec) or as a bearer header, and is registered with the
  log redaction (streams/logs.py) so it never reaches a log line or an error message.
* Retries: 429 (``Retry-After`` honoured, capped), 413/499/5xx, timeouts, connection errors
  and undecodable 200 bodies are retried with the pipeline's one backoff policy
  (streams/retry.py, full jitter); 401/403 raise :class:`AuthError` at once; any other
  status raises :class:`FetchError`.
* Pagination: ``next_url`` is followed only on the configured scheme, host and port and
  under the base path (:meth:`MassiveRest.next_page_url`), so the key never goes to another
  host; at most ``max_pages`` pages per chain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from prometheus_client import CollectorRegistry

from schemas import massive_rest as mr
from streams import metrics
from streams.logs import add_secret, redact
from streams.retry import Backoff, sleep_or_stop

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({413, 429, 499, 500, 502, 503, 504})


# --- errors ---------------------------------------------------------------------------------
class FetchError(Exception):
    """A request that failed for good (after retries); ``kind`` labels the metric."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class AuthError(FetchError):
    """401/403: the key is missing, wrong or not entitled. Not retried within a cycle."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__("auth", f"HTTP {status}: {message} (check MASSIVE_API_KEY)")
        self.status = status


def _error_text(resp: httpx.Response) -> str:
    """The provider's error message, redacted (an error body may echo the URL, key included)
    before it is cut (a cut key would no longer match its value)."""
    try:
        body = msgspec.json.decode(resp.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return redact(resp.text)[:200]
    if isinstance(body, dict):
        text = str(body.get("error") or body.get("message") or body.get("status") or "")
        return redact(text)[:200]
    return redact(resp.text)[:200]


def retry_after_s(resp: httpx.Response, now: dt.datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent/bad."""
    raw = resp.headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        v = float(raw)
        return v if math.isfinite(v) and v >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    now = now or dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def _origin(u: httpx.URL) -> tuple[str, str, int | None]:
    port = u.port if u.port is not None else {"http": 80, "https": 443}.get(u.scheme)
    return u.scheme, u.host, port


def _origin_text(u: httpx.URL) -> str:
    scheme, host, port = _origin(u)
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True, slots=True)
class RestConfig:
    """What the client needs of the poller's settings (``PollerSettings.rest_config``)."""

    rest_url: str
    api_key: str
    auth_mode: str  # query (?apiKey=, the spec) | bearer (Authorization header)
    timeout_s: float
    connect_timeout_s: float
    max_retries: int
    retry_after_max_s: float
    max_pages: int
    backoff: Backoff


class MassiveRest:
    """The provider's REST endpoints the poller uses, with retries and metrics
    (``massive_chain_poller_requests_total``, ``retries_total``, ``errors_total{kind=decode}``,
    ``pages_total``). ``stop`` (set by the poller's run) cuts retry sleeps short."""

    def __init__(self, cfg: RestConfig, registry: CollectorRegistry) -> None:
        self.settings = cfg
        self.stop: asyncio.Event | None = None
        self.base_url = httpx.URL(cfg.rest_url.rstrip("/") + "/")
        add_secret(cfg.api_key)
        if not cfg.api_key:
            logger.warning("chain-poller: no API key configured (set MASSIVE_API_KEY)")
        p = "massive_chain_poller_"
        self.m_requests = metrics.counter(
            registry, p + "requests_total", "HTTP requests by status (0 = no response)", ("status",)
        )
        self.m_retries = metrics.counter(
            registry, p + "retries_total", "Retries by kind", ("kind",)
        )
        self.m_errors = metrics.counter(registry, p + "errors_total", "Errors by kind", ("kind",))
        self.m_pages = metrics.counter(
            registry, p + "pages_total", "Chain pages fetched", ("symbol",)
        )

    # --- URLs -----------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        headers = {"Accept-Encoding": "gzip", "User-Agent": "massive-pipeline chain-poller"}
        if self.settings.auth_mode == "bearer" and self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        timeout = httpx.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s)
        return httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=False)

    def _on_base(self, raw_path: bytes) -> httpx.URL:
        """``raw_path`` (path and query) on the configured scheme, host and port, never
        resolved as a reference (a path that is itself a URL stays a path); in query-auth
        mode (re-)append ``apiKey``."""
        url = self.base_url.copy_with(raw_path=raw_path)
        if (
            self.settings.auth_mode == "query"
            and self.settings.api_key
            and "apiKey" not in url.params
        ):
            url = url.copy_add_param("apiKey", self.settings.api_key)
        return url

    def url(self, path: str) -> httpx.URL:
        """An endpoint path relative to the configured base URL."""
        return self._on_base(self.base_url.raw_path + path.lstrip("/").encode())

    def next_page_url(self, next_url: str) -> httpx.URL:
        """The request for ``next_url``, which is absolute: followed only on the configured
        base (same scheme, host and port, a plain path under the base path), so the key
        never goes to another host. Else :class:`FetchError` ``next_url_foreign`` (another
        origin) or ``next_url_bad_path``."""
        base = self.base_url
        try:
            u = httpx.URL(next_url)
        except httpx.InvalidURL as exc:
            raise FetchError("next_url_bad_path", f"unparsable next_url: {exc}") from None
        if _origin(u) != _origin(base):
            raise FetchError(
                "next_url_foreign",
                f"next_url points to {_origin_text(u)}, not the configured "
                f"{_origin_text(base)}: not followed",
            )
        segments = u.path.split("/")[1:]
        if (
            not u.path.startswith(base.path)
            or "://" in u.path
            or any(seg in ("", ".", "..") for seg in segments[:-1])
            or segments[-1] in (".", "..")
        ):
            raise FetchError(
                "next_url_bad_path", f"next_url path {redact(u.path)[:120]!r} not followed"
            )
        return self._on_base(u.raw_path)

    # --- requests -------------------------------------------------------------------------
    async def get(self, client: httpx.AsyncClient, url: httpx.URL) -> bytes:
        """GET with retries; returns the body of a 200. Raises FetchError/AuthError."""
        last: FetchError | None = None
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                assert last is not None
                self.m_retries.labels(last.kind).inc()
            try:
                resp = await client.get(url)
            except httpx.TimeoutException as exc:
                self.m_requests.labels("0").inc()
                last, delay = FetchError("timeout", f"timeout: {type(exc).__name__}"), None
            except httpx.TransportError as exc:
                self.m_requests.labels("0").inc()
                last, delay = FetchError("connection", f"connection error: {exc!r}"), None
            else:
                self.m_requests.labels(str(resp.status_code)).inc()
                if resp.status_code == 200:
                    return resp.content
                last, delay = self._retryable(resp)
            if attempt == self.settings.max_retries or (
                self.stop is not None and self.stop.is_set()
            ):
                break
            backoff = self.settings.backoff.delay_s(attempt)
            await sleep_or_stop(self.stop, backoff if delay is None else max(delay, backoff))
        assert last is not None
        raise last

    def _retryable(self, resp: httpx.Response) -> tuple[FetchError, float | None]:
        """The error of a non-200 response worth retrying, with the server's requested
        delay (Retry-After, capped); raises the others."""
        st = resp.status_code
        if st in (401, 403):
            raise AuthError(st, _error_text(resp))
        if st not in RETRY_STATUSES:
            raise FetchError(f"http_{st}", f"HTTP {st}: {_error_text(resp)}")
        kind = "rate_limited" if st == 429 else f"http_{st // 100}xx"
        ra = retry_after_s(resp)
        delay = min(ra, self.settings.retry_after_max_s) if ra is not None else None
        return FetchError(kind, f"HTTP {st}: {_error_text(resp)}"), delay

    async def get_page(
        self, client: httpx.AsyncClient, url: httpx.URL, parse: Any, *args: Any
    ) -> Any:
        """GET + decode; an undecodable 200 body (truncated) is retried like a 5xx."""
        for attempt in range(self.settings.max_retries + 1):
            body = await self.get(client, url)
            try:
                return parse(body, *args)
            except mr.RestDecodeError as exc:
                self.m_errors.labels("decode").inc()
                logger.warning("chain-poller: undecodable response (%s), retrying", exc)
                if attempt == self.settings.max_retries:
                    raise FetchError("decode", str(exc)) from None
                self.m_retries.labels("decode").inc()
                await sleep_or_stop(self.stop, self.settings.backoff.delay_s(attempt))
        raise FetchError("decode", "unreachable")  # pragma: no cover

    # --- endpoints ------------------------------------------------------------------------
    async def index_snapshot(self, client: httpx.AsyncClient, tickers: str) -> mr.IndexPage:
        """``/v3/snapshot/indices?ticker.any_of=<tickers>`` (comma-separated ``I:`` tickers)."""
        url = self.url("v3/snapshot/indices").copy_merge_params({"ticker.any_of": tickers})
        page: mr.IndexPage = await self.get_page(client, url, mr.parse_index_snapshot)
        return page

    async def chain_pages(
        self,
        client: httpx.AsyncClient,
        symbol: str,
        underlying: str,
        params: Mapping[str, str],
    ) -> AsyncIterator[mr.ChainPage]:
        """The pages of ``/v3/snapshot/options/<underlying>`` with ``params``, following
        ``next_url`` to the end. A page with an error status raises ``api_error``; more than
        ``max_pages`` pages raise ``too_many_pages``."""
        url = self.url(f"v3/snapshot/options/{underlying}").copy_merge_params(dict(params))
        pages = 0
        while True:
            page: mr.ChainPage = await self.get_page(client, url, mr.parse_chain_page, symbol)
            pages += 1
            self.m_pages.labels(symbol).inc()
            if page.error:
                raise FetchError("api_error", f"{symbol}: {page.error}")
            yield page
            if not page.next_url:
                return
            if pages >= self.settings.max_pages:
                raise FetchError("too_many_pages", f"{symbol}: more than {pages} pages")
            url = self.next_page_url(page.next_url)
