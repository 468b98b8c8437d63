"""Simulated Massive API: REST snapshots and the options/indices/stocks WebSockets on one port.

Index underlyings (SPX, NDX) answer on ``/v3/snapshot/options/I:SPX`` with
``underlying_asset.value`` and their level on ``/v3/snapshot/indices`` and the ``/indices``
WS (``V``); stock and ETF underlyings (SPY, AAPL, any ticker) on ``/v3/snapshot/options/SPY``
with ``underlying_asset.price``, ``exercise_style: american``, their snapshot on
``/v2/snapshot/locale/us/markets/stocks/tickers/SPY`` and ``T``/``Q`` on the ``/stocks`` WS.

Wire formats follow shared/reference/massive_api.md (official OpenAPI/WS specs and the
official Python client): ns timestamps in REST, ms in WS, ``next_url`` with an opaque
``cursor`` (unpadded base64url of the URL-encoded query state, as the provider's cursors
decode), ``apiKey`` query parameter or ``Authorization: Bearer``, error bodies
``{"status": "ERROR", "request_id": ..., "error": ...}``.

Usage::

    srv = SimServer(SimConfig(seed=7))
    await srv.start(host="127.0.0.1", port=0)
    srv.rest_url, srv.ws_url      # http://127.0.0.1:<port>, ws://127.0.0.1:<port>
    srv.fail_next(3, status=429)  # controls take effect immediately
    await srv.stop()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import math
import secrets
import socket
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from schemas.ticker import TickerError
from schemas.ticker import parse as parse_ticker
from simulator.market import (
    Contract,
    Event,
    IndexState,
    Market,
    MarketConfig,
    generic_equity,
    ns_at,
)
from streams.clock import NY
from streams.health import QuietServer

log = logging.getLogger(__name__)

RATE_LIMIT_MESSAGE = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your "
    "subscription to continue. https://massive.com/pricing"
)
SORTS = ("ticker", "expiration_date", "strike_price")
RANGE_OPS = ("gte", "gt", "lte", "lt")
OPTIONS_EVS = ("T", "Q", "A", "AM", "FMV")
INDICES_EVS = ("V", "A", "AM")
STOCKS_EVS = ("T", "Q", "A", "AM")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 1
    api_key: str = "sim-key"
    symbols: tuple[str, ...] = ("SPX", "NDX")
    events_per_s: float = 200.0
    quotes: bool = True
    market_open: bool = True
    page_limit_max: int = 250
    # limit above page_limit_max: "error" answers 400 (the spec's maximum), "clamp" serves max
    limit_over_max: str = "error"
    # simultaneous authenticated connections per market (/options, /indices) and key;
    # None = unlimited (the provider's default plan allows 1)
    max_connections: int | None = None
    max_quote_subscriptions: int = 1000
    tick_interval_s: float = 0.05  # market tick and WS batching interval
    index_interval_s: float = 1.0  # V events cadence
    auth_timeout_s: float = 10.0
    retry_after_s: int = 1
    frame_max_events: int = 500
    queue_max_frames: int = 5000  # per connection; beyond it: slow_consumer + close
    include_fmv: bool = False  # fmv is a Business-plan field
    spots: tuple[tuple[str, float], ...] = ()  # e.g. (("SPX", 5800.0),): starting levels
    market: MarketConfig = field(default_factory=MarketConfig)  # vols, grid, expirations, r, q


@dataclass
class SimStats:
    requests: int = 0
    frames_sent: int = 0
    events_sent: dict[str, int] = field(default_factory=dict)
    connections: int = 0  # currently open WS connections
    connections_total: int = 0
    responses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    malformed_sent: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Out:
    """One text frame to write, with what to count once it is written."""

    text: str
    counts: tuple[tuple[str, int], ...]  # (event kind, n); "status" for status frames
    malformed: bool = False


@dataclass(eq=False)
class _Conn:
    ws: WebSocket
    market: str  # "options" | "indices" | "stocks"
    queue: asyncio.Queue[_Out | int]  # int: close with that code after the queued frames
    authed: bool = False
    closing: bool = False
    t_all: bool = False
    q_all: bool = False  # Q.* (stocks only: the provider refuses it for options)
    v_all: bool = False
    trades: set[str] = field(default_factory=set)
    quotes: set[str] = field(default_factory=set)
    values: set[str] = field(default_factory=set)
    other: set[str] = field(default_factory=set)  # acknowledged, never fed (A, AM, FMV)


def _status(status: str, message: str) -> dict[str, str]:
    return {"ev": "status", "status": status, "message": message}


def _frame(events: Iterable[dict[str, Any]]) -> str:
    return orjson.dumps(list(events)).decode()


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")


def _unb64(s: str) -> str:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


def _sort_key(sort: str, c: Contract) -> tuple[Any, ...]:
    if sort == "expiration_date":
        return (c.exp_s, c.ticker)
    if sort == "strike_price":
        return (c.strike, c.ticker)
    return (c.ticker,)


def _marker_key(sort: str, ticker: str) -> tuple[Any, ...]:
    t = parse_ticker(ticker)
    if sort == "expiration_date":
        return (t.expiry.isoformat(), ticker)
    if sort == "strike_price":
        return (t.strike, ticker)
    return (ticker,)


@dataclass(frozen=True)
class _ChainQuery:
    sort: str = "ticker"
    order: str = "asc"
    limit: int = 10
    contract_type: str | None = None
    strike: tuple[tuple[str, float], ...] = ()  # (op, value), op in eq/gte/gt/lte/lt
    expiry: tuple[tuple[str, str], ...] = ()
    marker: str | None = None  # last ticker served

    def state(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.contract_type:
            out.append(("contract_type", self.contract_type))
        for op, v in self.expiry:
            out.append(("expiration_date" + ("" if op == "eq" else f".{op}"), v))
        out.append(("limit", str(self.limit)))
        out.append(("order", self.order))
        if self.marker:
            out.append(("page_marker", self.marker))
        out.append(("sort", self.sort))
        for op, f in self.strike:
            out.append(("strike_price" + ("" if op == "eq" else f".{op}"), repr(f)))
        return out

    def matches(self, c: Contract) -> bool:
        if self.contract_type is not None and c.contract_type != self.contract_type:
            return False
        for op, f in self.strike:
            if not _cmp(op, c.strike, f):
                return False
        return all(_cmp(op, c.exp_s, e) for op, e in self.expiry)


def _cmp(op: str, a: Any, b: Any) -> bool:
    if op == "eq":
        return bool(a == b)
    if op == "gte":
        return bool(a >= b)
    if op == "gt":
        return bool(a > b)
    if op == "lte":
        return bool(a <= b)
    return bool(a < b)


def _cursor_params(cursor: str) -> dict[str, str]:
    """The query parameters a next_url cursor carries (it always holds a page marker)."""
    try:
        items = parse_qsl(_unb64(cursor), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ApiError(400, "Invalid cursor") from None
    params: dict[str, str] = dict(items)
    if "page_marker" not in params:
        raise ApiError(400, "Invalid cursor")
    return params


def _range_filters(
    params: dict[str, str],
) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, str], ...]]:
    """The strike_price and expiration_date filters (eq and the range operators)."""
    strike: list[tuple[str, float]] = []
    expiry: list[tuple[str, str]] = []
    for op in ("eq", *RANGE_OPS):
        suffix = "" if op == "eq" else f".{op}"
        raw = params.get("strike_price" + suffix)
        if raw is not None:
            try:
                v = float(raw)
            except ValueError:
                raise ApiError(400, f"strike_price{suffix}: not a number: {raw!r}") from None
            if not math.isfinite(v):
                raise ApiError(400, f"strike_price{suffix}: not a number: {raw!r}")
            strike.append((op, v))
        rawd = params.get("expiration_date" + suffix)
        if rawd is not None:
            try:
                expiry.append((op, dt.date.fromisoformat(rawd).isoformat()))
            except ValueError:
                raise ApiError(
                    400, f"expiration_date{suffix}: expected YYYY-MM-DD, got {rawd!r}"
                ) from None
    return tuple(strike), tuple(expiry)


class SimServer:
    """REST + WebSocket simulator of the Massive API, backed by :class:`Market`."""

    def __init__(self, config: SimConfig | None = None, clock: Callable[[], int] | None = None):
        self.config = config or SimConfig()
        self.clock = clock or time.time_ns
        cfg = self.config
        mcfg = cfg.market
        if cfg.spots:
            levels = dict(cfg.spots)
            known = {i.symbol for i in mcfg.indices}
            extra = tuple(generic_equity(s) for s in cfg.symbols if s in levels and s not in known)
            mcfg = replace(
                mcfg,
                indices=tuple(
                    replace(i, spot=levels.get(i.symbol, i.spot)) for i in (*mcfg.indices, *extra)
                ),
            )
        self.market = Market(
            seed=cfg.seed,
            symbols=cfg.symbols,
            config=mcfg,
            now_ns=self.clock(),
            events_per_s=cfg.events_per_s,
            quotes=cfg.quotes,
        )
        self.stats = SimStats()
        self._open = cfg.market_open
        self._silent = False
        self._fail: deque[int] = deque()
        self._malformed = 0
        self._malformed_kind = 0
        self._conns: set[_Conn] = set()
        self._sorted: dict[tuple[str, str], tuple[int, list[Contract], list[tuple[Any, ...]]]] = {}
        self._server: QuietServer | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.app = Starlette(
            routes=[
                Route("/v3/snapshot/options/{underlying}", self._chain),
                Route("/v3/snapshot/options/{underlying}/{contract}", self._contract),
                Route("/v3/snapshot/indices", self._indices),
                Route("/v2/snapshot/locale/us/markets/stocks/tickers/{ticker}", self._stock),
                Route("/v1/marketstatus/now", self._market_status),
                WebSocketRoute("/options", self._ws_options),
                WebSocketRoute("/indices", self._ws_indices),
                WebSocketRoute("/stocks", self._ws_stocks),
            ],
            exception_handlers={404: self._not_found, 405: self._not_found},
        )

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        # bind here so a busy port raises OSError to the caller (uvicorn would sys.exit)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = QuietServer(config)
        self._serve_task = asyncio.create_task(
            self._server.serve(sockets=[sock]), name="sim-uvicorn"
        )
        while not self._server.started:
            if self._serve_task.done():
                self._serve_task.result()
                raise RuntimeError("simulator server exited during start")
            await asyncio.sleep(0.005)
        self.host, self.port = host, int(sock.getsockname()[1])
        self._pump_task = asyncio.create_task(self._pump(), name="sim-pump")

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            self._pump_task = None
        self.drop_ws()
        if self._server is not None and self._serve_task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._serve_task), 5.0)
            except TimeoutError:
                self._server.force_exit = True
                await self._serve_task
            self._server = None
            self._serve_task = None

    # --- controls ---------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 429) -> None:
        """The next ``n`` REST requests answer ``status`` with the provider's error body."""
        self._fail.extend([status] * n)

    def drop_ws(self) -> None:
        """Close every WebSocket connection abruptly (TCP close, no close frame)."""
        for conn in list(self._conns):
            conn.closing = True
            if not _abort_transport(conn.ws):
                conn.queue.put_nowait(1012)

    def set_silent(self, silent: bool) -> None:
        self._silent = silent

    def set_market_open(self, is_open: bool) -> None:
        if is_open and not self._open:
            self.market.resync(self.clock())
        self._open = is_open

    @property
    def market_open(self) -> bool:
        return self._open

    def list_new_strike(self, symbol: str, strike: float | None = None) -> list[str]:
        return self.market.list_new_strike(symbol, strike)

    def list_new_expiry(self, symbol: str, expiry: dt.date | None = None) -> list[str]:
        return self.market.list_new_expiry(symbol, expiry)

    def set_spot(self, symbol: str, value: float | None) -> None:
        """Hold the index at ``value`` (REST index snapshot, chain underlying, WS ``V``);
        None lets it walk again."""
        self.market.set_spot(symbol, value)

    def inject_malformed(self, n: int) -> None:
        """The next ``n`` WS data frames are malformed (cycling: truncated JSON, wrong types,
        NaN literals, unknown ticker, not an array)."""
        self._malformed += n

    # --- REST plumbing ------------------------------------------------------------------------
    def _json(
        self, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        self.stats.responses[status] = self.stats.responses.get(status, 0) + 1
        return Response(
            orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
        )

    def _error(self, status: int, message: str) -> Response:
        rid = secrets.token_hex(16)
        if status == 404:
            return self._json({"status": "NOT_FOUND", "request_id": rid, "message": message}, 404)
        if status == 403:
            return self._json(
                {"status": "NOT_AUTHORIZED", "request_id": rid, "message": message}, 403
            )
        headers = {"Retry-After": str(self.config.retry_after_s)} if status == 429 else None
        return self._json({"status": "ERROR", "request_id": rid, "error": message}, status, headers)

    def _guard(self, request: Request) -> Response | None:
        self.stats.requests += 1
        if self._fail:
            status = self._fail.popleft()
            if status == 429:
                return self._error(429, RATE_LIMIT_MESSAGE)
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "Error"
            return self._error(status, phrase)
        key = request.query_params.get("apiKey")
        if key is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
        if not key:
            return self._error(401, "API Key was not provided")
        if key != self.config.api_key:
            return self._error(401, "Unknown API Key")
        return None

    def _ok(self, request: Request, results: Any, next_url: str | None = None) -> Response:
        body: dict[str, Any] = {"status": "OK", "request_id": secrets.token_hex(16)}
        body["results"] = results
        if next_url:
            body["next_url"] = next_url
        return self._json(body)

    def _symbol(self, underlying: str) -> str | None:
        """The chain of ``I:SPX`` (an index; the bare ``SPX`` is answered too, as the
        provider did) or ``SPY`` (a stock or ETF: never with ``I:``)."""
        sym = underlying[2:] if underlying.startswith("I:") else underlying
        st = self.market.indices.get(sym)
        if st is None or (st.spec.is_equity and underlying.startswith("I:")):
            return None
        return sym

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        self.stats.requests += 1
        return self._error(404, "Not found.")

    # --- REST: chain --------------------------------------------------------------------------
    def _parse_chain_query(self, request: Request) -> _ChainQuery:
        qp = request.query_params
        cursor = qp.get("cursor")
        params = _cursor_params(cursor) if cursor is not None else dict(qp)
        sort = params.get("sort", "ticker")
        if sort not in SORTS:
            raise ApiError(400, f"sort: invalid value {sort!r}, must be one of {list(SORTS)}")
        order = params.get("order", "asc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: invalid value {order!r}, must be asc or desc")
        limit = self._limit(params)
        ctype = params.get("contract_type")
        if ctype is not None and ctype not in ("call", "put"):
            raise ApiError(400, f"contract_type: invalid value {ctype!r}, must be call or put")
        strike, expiry = _range_filters(params)
        marker = params.get("page_marker") if cursor is not None else None
        if marker is not None:
            try:
                parse_ticker(marker)
            except TickerError:
                raise ApiError(400, "Invalid cursor") from None
        return _ChainQuery(sort, order, limit, ctype, strike, expiry, marker)

    def _limit(self, params: dict[str, str]) -> int:
        try:
            limit = int(params.get("limit", "10"))
        except ValueError:
            raise ApiError(400, "limit: must be an integer") from None
        lim_max = self.config.page_limit_max
        if limit < 1:
            raise ApiError(400, "limit: must be at least 1")
        if limit > lim_max:
            if self.config.limit_over_max != "clamp":
                raise ApiError(400, f"limit: must be less than or equal to {lim_max}")
            limit = lim_max
        return limit

    def _sorted_chain(self, symbol: str, sort: str) -> tuple[list[Contract], list[tuple[Any, ...]]]:
        cached = self._sorted.get((symbol, sort))
        if cached is not None and cached[0] == self.market.topology_version:
            return cached[1], cached[2]
        lst = sorted(self.market.by_symbol[symbol], key=lambda c: _sort_key(sort, c))
        keys = [_sort_key(sort, c) for c in lst]
        self._sorted[(symbol, sort)] = (self.market.topology_version, lst, keys)
        return lst, keys

    def _page(self, symbol: str, q: _ChainQuery) -> tuple[list[Contract], bool]:
        lst, keys = self._sorted_chain(symbol, q.sort)
        n = len(lst)
        if q.order == "asc":
            i = 0 if q.marker is None else bisect_right(keys, _marker_key(q.sort, q.marker))
            step = 1
        else:
            i = n - 1 if q.marker is None else bisect_left(keys, _marker_key(q.sort, q.marker)) - 1
            step = -1
        out: list[Contract] = []
        while 0 <= i < n:
            c = lst[i]
            if q.matches(c):
                if len(out) == q.limit:
                    return out, True
                out.append(c)
            i += step
        return out, False

    async def _chain(self, request: Request) -> Response:
        denied = self._guard(request)
        if denied is not None:
            return denied
        try:
            q = self._parse_chain_query(request)
        except ApiError as exc:
            return self._error(exc.status, exc.message)
        underlying = request.path_params["underlying"]
        symbol = self._symbol(underlying)
        if symbol is None:
            return self._ok(request, [])
        page, more = self._page(symbol, q)
        st = self.market.indices[symbol]
        results = [self._item(c, st) for c in page]
        next_url = None
        if more and page:
            marker = _ChainQuery(
                q.sort, q.order, q.limit, q.contract_type, q.strike, q.expiry, page[-1].ticker
            )
            base = str(request.base_url).rstrip("/")
            next_url = f"{base}{request.url.path}?cursor={_b64(urlencode(marker.state()))}"
        return self._ok(request, results, next_url)

    async def _contract(self, request: Request) -> Response:
        denied = self._guard(request)
        if denied is not None:
            return denied
        symbol = self._symbol(request.path_params["underlying"])
        c = self.market.contracts.get(request.path_params["contract"])
        if symbol is None or c is None or c.symbol != symbol:
            return self._error(404, "Data not found.")
        return self._ok(request, self._item(c, self.market.indices[symbol]))

    def _item(self, c: Contract, st: IndexState) -> dict[str, Any]:
        m = self.market.refresh(c).model
        assert m is not None
        mid = round((c.bid + c.ask) / 2, 4)
        out: dict[str, Any] = {
            "break_even_price": round(c.strike + mid if c.call else c.strike - mid, 4),
            "day": self._day(c),
            "details": {
                "contract_type": c.contract_type,
                "exercise_style": "american" if st.spec.is_equity else "european",
                "expiration_date": c.exp_s,
                "shares_per_contract": 100,
                "strike_price": c.strike,
                "ticker": c.ticker,
            },
        }
        if self.config.include_fmv:
            out["fmv"] = round(m.price, 4)
        # like the provider: no greeks/iv without a valid price (no bid) or deep in the money
        if c.bid > 0 and abs(m.delta) < 0.999:
            out["greeks"] = {
                "delta": round(m.delta, 6),
                "gamma": round(m.gamma, 8),
                "theta": round(m.theta, 6),
                "vega": round(m.vega, 6),
            }
            out["implied_volatility"] = round(c.iv, 6)
        x = st.spec.exchange
        out["last_quote"] = {
            "ask": c.ask,
            "ask_exchange": x,
            "ask_size": c.ask_size,
            "bid": c.bid,
            "bid_exchange": x,
            "bid_size": c.bid_size,
            "last_updated": c.quote_ts,
            "midpoint": mid,
            "timeframe": "REAL-TIME",
        }
        if c.trade_price is not None:
            out["last_trade"] = {
                "conditions": [209],
                "exchange": x,
                "price": c.trade_price,
                "sip_timestamp": c.trade_ts,
                "size": c.trade_size,
                "timeframe": "REAL-TIME",
            }
        out["open_interest"] = c.oi
        if st.spec.is_equity:  # a stock's last price is "price" (an index's level "value")
            out["underlying_asset"] = {
                "change_to_break_even": round(out["break_even_price"] - st.value, 4),
                "last_updated": st.ts,
                "price": st.value,
                "ticker": st.spec.symbol,
                "timeframe": "REAL-TIME",
            }
            return out
        out["underlying_asset"] = {
            "change_to_break_even": round(out["break_even_price"] - st.value, 4),
            "last_updated": st.ts,
            "ticker": f"I:{st.spec.symbol}",
            "timeframe": "REAL-TIME",
            "value": st.value,
        }
        return out

    def _day(self, c: Contract) -> dict[str, Any]:
        """The session bar as the provider sends it: every field; a contract not traded
        today carries its previous close as open/high/low/close, volume 0, change 0."""
        prev = c.prev_close
        start = ns_at(self.market.session, 0, 0)
        if c.day_volume == 0 or c.trade_price is None:
            if prev is None:
                return {}
            return {
                "change": 0.0,
                "change_percent": 0.0,
                "close": prev,
                "high": prev,
                "last_updated": start,
                "low": prev,
                "open": prev,
                "previous_close": prev,
                "volume": 0,
                "vwap": prev,
            }
        close = c.trade_price
        day: dict[str, Any] = {
            "close": close,
            "high": c.day_high,
            "last_updated": c.day_ts,
            "low": c.day_low,
            "open": c.day_open,
            "volume": c.day_volume,
            "vwap": round(c.day_notional / c.day_volume, 4),
        }
        if prev:
            day["change"] = round(close - prev, 4)
            day["change_percent"] = round(100 * (close - prev) / prev, 3)
            day["previous_close"] = prev
        return dict(sorted(day.items()))

    # --- REST: indices and market status ------------------------------------------------------
    async def _indices(self, request: Request) -> Response:
        denied = self._guard(request)
        if denied is not None:
            return denied
        qp = request.query_params
        any_of = qp.get("ticker.any_of")
        if any_of is not None:
            tickers = [t.strip() for t in any_of.split(",") if t.strip()]
            if len(tickers) > 250:
                return self._error(400, "ticker.any_of: at most 250 tickers")
        else:
            tickers = sorted(
                f"I:{s}" for s, st in self.market.indices.items() if not st.spec.is_equity
            )
            one = qp.get("ticker")
            if one is not None:
                tickers = [t for t in tickers if t == one]
        results: list[dict[str, Any]] = []
        status = "open" if self._open else "closed"
        for t in tickers:
            sym = t[2:] if t.startswith("I:") else None
            st = self.market.indices.get(sym) if sym else None
            if st is None or st.spec.is_equity:
                results.append({"ticker": t, "error": "NOT_FOUND", "message": "Ticker not found."})
                continue
            change = round(st.value - st.prev_close, 2)
            results.append(
                {
                    "last_updated": st.ts,
                    "market_status": status,
                    "name": st.spec.name,
                    "session": {
                        "change": change,
                        "change_percent": round(100 * change / st.prev_close, 3),
                        "close": st.value,
                        "high": st.high,
                        "low": st.low,
                        "open": st.open,
                        "previous_close": st.prev_close,
                    },
                    "ticker": t,
                    "timeframe": "REAL-TIME",
                    "type": "indices",
                    "value": st.value,
                }
            )
        return self._ok(request, results)

    async def _stock(self, request: Request) -> Response:
        """``/v2/snapshot/locale/us/markets/stocks/tickers/{ticker}``: the stock's day bar,
        last quote and trade (ns times; the quote's ask is ``P``/``S``, its bid ``p``/``s``)."""
        denied = self._guard(request)
        if denied is not None:
            return denied
        tkr = request.path_params["ticker"]
        st = self.market.indices.get(tkr)
        if st is None or not st.spec.is_equity:
            return self._error(404, "Ticker not found.")
        change = round(st.value - st.prev_close, 2)
        v = st.value
        minute = ns_at(self.market.session, 9, 30) // 1_000_000
        body = {
            "status": "OK",
            "request_id": secrets.token_hex(16),
            "ticker": {
                "day": {"c": v, "h": st.high, "l": st.low, "o": st.open, "v": 1_000_000, "vw": v},
                "lastQuote": {
                    "P": round(v + 0.01, 2),
                    "S": 2,
                    "p": round(v - 0.01, 2),
                    "s": 3,
                    "t": st.ts,
                },
                "lastTrade": {"c": [0], "i": "1", "p": v, "s": 100, "t": st.ts, "x": 4},
                "min": {
                    "av": 1_000_000,
                    "c": v,
                    "h": v,
                    "l": v,
                    "n": 1,
                    "o": v,
                    "t": minute,
                    "v": 100,
                    "vw": v,
                },
                "prevDay": {
                    "c": st.prev_close,
                    "h": st.prev_close,
                    "l": st.prev_close,
                    "o": st.prev_close,
                    "v": 1_000_000,
                    "vw": st.prev_close,
                },
                "ticker": tkr,
                "todaysChange": change,
                "todaysChangePerc": round(100 * change / st.prev_close, 3),
                "updated": st.ts,
            },
        }
        return self._json(body)

    async def _market_status(self, request: Request) -> Response:
        denied = self._guard(request)
        if denied is not None:
            return denied
        status = "open" if self._open else "closed"
        now = dt.datetime.fromtimestamp(self.clock() / 1e9, NY).replace(microsecond=0)
        body = {
            "afterHours": False,
            "currencies": {"crypto": "open", "fx": "open"},
            "earlyHours": False,
            "exchanges": {"nasdaq": status, "nyse": status, "otc": status},
            "indicesGroups": {"s_and_p": status, "nasdaq": status, "cgi": status},
            "market": status,
            "serverTime": now.isoformat(),
        }
        return self._json(body)

    # --- WebSocket ------------------------------------------------------------------------------
    async def _ws_options(self, ws: WebSocket) -> None:
        await self._ws_session(ws, "options")

    async def _ws_indices(self, ws: WebSocket) -> None:
        await self._ws_session(ws, "indices")

    async def _ws_stocks(self, ws: WebSocket) -> None:
        await self._ws_session(ws, "stocks")

    def _enqueue(self, conn: _Conn, out: _Out) -> None:
        if conn.closing:
            return
        try:
            conn.queue.put_nowait(out)
        except asyncio.QueueFull:
            conn.closing = True
            log.warning("simulator: slow consumer on /%s, disconnecting", conn.market)
            _abort_transport(conn.ws)

    def _close_after(self, conn: _Conn, code: int) -> None:
        conn.closing = True
        with contextlib.suppress(asyncio.QueueFull):
            conn.queue.put_nowait(code)

    async def _sender(self, conn: _Conn) -> None:
        ws = conn.ws
        with contextlib.suppress(Exception):
            while True:
                item = await conn.queue.get()
                if isinstance(item, int):
                    await ws.close(code=item)
                    return
                await ws.send_text(item.text)
                # counted when actually written, so frames_sent/events_sent match the peer
                self.stats.frames_sent += 1
                if item.malformed:
                    self.stats.malformed_sent += 1
                for kind, n in item.counts:
                    self._count(kind, n)

    async def _ws_session(self, ws: WebSocket, market: str) -> None:
        await ws.accept()
        conn = _Conn(ws, market, asyncio.Queue(self.config.queue_max_frames))
        self._conns.add(conn)
        self.stats.connections += 1
        self.stats.connections_total += 1
        sender = asyncio.create_task(self._sender(conn))
        hello = _frame([_status("connected", "Connected Successfully")])
        conn.queue.put_nowait(_Out(hello, (("status", 1),)))
        try:
            await self._ws_loop(conn)
        except Exception as exc:  # a broken connection must never hurt the server
            log.debug("simulator ws session ended: %r", exc)
        finally:
            self._conns.discard(conn)
            self.stats.connections -= 1
            conn.closing = True
            try:
                conn.queue.put_nowait(1000)  # flush what is queued, then close (or exit)
            except asyncio.QueueFull:
                sender.cancel()
            try:
                await asyncio.wait_for(sender, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                sender.cancel()

    async def _receive(self, conn: _Conn, limit_s: float | None) -> str | None:
        msg = await asyncio.wait_for(conn.ws.receive(), limit_s)
        if msg["type"] == "websocket.disconnect":
            return None
        text = msg.get("text")
        if text is None and msg.get("bytes") is not None:
            text = msg["bytes"].decode("utf-8", "replace")
        return str(text or "")

    def _reply(self, conn: _Conn, status: str, message: str) -> None:
        self._enqueue(conn, _Out(_frame([_status(status, message)]), (("status", 1),)))

    async def _ws_loop(self, conn: _Conn) -> None:
        if await self._authenticate(conn) and self._admit(conn):
            await self._serve_actions(conn)

    async def _authenticate(self, conn: _Conn) -> bool:
        """Answer messages until an auth with the API key (True); False when the client
        left, timed out or failed (then the connection is closing)."""
        while not conn.authed:
            try:
                text = await self._receive(conn, self.config.auth_timeout_s)
            except TimeoutError:
                self._reply(conn, "auth_timeout", "authentication timed out")
                self._close_after(conn, 1008)
                return False
            if text is None:
                return False
            msg = _decode_action(text)
            if msg is None:
                self._reply(conn, "error", "invalid message")
                continue
            action, params = msg
            if action == "auth":
                if params == self.config.api_key:
                    conn.authed = True
                    self._reply(conn, "auth_success", "authenticated")
                else:
                    self._reply(conn, "auth_failed", "authentication failed")
                    self._close_after(conn, 1008)
                    return False
            elif action in ("subscribe", "unsubscribe"):
                self._reply(conn, "auth_required", "authentication required")
            else:
                self._reply(conn, "error", f"unknown action: {action}")
        return True

    def _admit(self, conn: _Conn) -> bool:
        """The per-market connection limit: False (and closing) when exceeded."""
        limit = self.config.max_connections
        if limit is not None:
            peers = [
                c for c in self._conns if c is not conn and c.authed and c.market == conn.market
            ]
            if len(peers) >= limit:
                self._reply(conn, "max_connections", "Maximum number of connections exceeded.")
                self._close_after(conn, 1008)
                return False
        return True

    async def _serve_actions(self, conn: _Conn) -> None:
        while True:
            text = await self._receive(conn, None)
            if text is None or conn.closing:
                return
            msg = _decode_action(text)
            if msg is None:
                self._reply(conn, "error", "invalid message")
                continue
            action, params = msg
            if action == "subscribe":
                for p in _split_params(params):
                    self._subscribe(conn, p)
            elif action == "unsubscribe":
                for p in _split_params(params):
                    self._unsubscribe(conn, p)
            if action in ("subscribe", "unsubscribe"):
                # One status reply per param: let the sender drain them before reading the
                # next request, so a client sending many large subscribe messages back to
                # back is not mistaken for a slow consumer by its own acknowledgements.
                backlog = conn.queue.maxsize // 2
                while conn.queue.qsize() > backlog and not conn.closing:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            elif action == "auth":
                self._reply(conn, "auth_success", "authenticated")
            else:
                self._reply(conn, "error", f"unknown action: {action}")

    def _subscribe(self, conn: _Conn, p: str) -> None:
        ev, dot, ticker = p.partition(".")
        allowed = {"options": OPTIONS_EVS, "indices": INDICES_EVS, "stocks": STOCKS_EVS}
        if not dot or not ticker or ev not in allowed[conn.market]:
            self._reply(conn, "error", f"invalid subscription: {p}")
            return
        if conn.market == "stocks" and ev in ("T", "Q"):
            if ticker == "*":
                conn.t_all = conn.t_all or ev == "T"
                conn.q_all = conn.q_all or ev == "Q"
            else:
                (conn.trades if ev == "T" else conn.quotes).add(ticker)
        elif conn.market == "options" and ev == "Q":
            if ticker == "*":
                self._reply(conn, "error", f"wildcard not allowed for quotes: {p}")
                return
            if (
                ticker not in conn.quotes
                and len(conn.quotes) >= self.config.max_quote_subscriptions
            ):
                self._reply(
                    conn,
                    "error",
                    f"maximum of {self.config.max_quote_subscriptions} quote subscriptions "
                    f"per connection exceeded: {p}",
                )
                return
            conn.quotes.add(ticker)
        elif ev == "T" and conn.market == "options":
            if ticker == "*":
                conn.t_all = True
            else:
                conn.trades.add(ticker)
        elif ev == "V":
            if ticker == "*":
                conn.v_all = True
            else:
                conn.values.add(ticker)
        else:
            conn.other.add(p)
        self._reply(conn, "success", f"subscribed to: {p}")

    def _unsubscribe(self, conn: _Conn, p: str) -> None:
        ev, _, ticker = p.partition(".")
        if ev == "Q":
            if ticker == "*":
                conn.q_all = False
            conn.quotes.discard(ticker)
        elif ev == "T":
            if ticker == "*":
                conn.t_all = False
            conn.trades.discard(ticker)
        elif ev == "V":
            if ticker == "*":
                conn.v_all = False
            conn.values.discard(ticker)
        conn.other.discard(p)
        self._reply(conn, "success", f"unsubscribed to: {p}")

    def _count(self, kind: str, n: int = 1) -> None:
        self.stats.events_sent[kind] = self.stats.events_sent.get(kind, 0) + n

    # --- event pump --------------------------------------------------------------------------
    async def _pump(self) -> None:
        cfg = self.config
        next_v = 0
        while True:
            await asyncio.sleep(cfg.tick_interval_s)
            try:
                now = self.clock()
                if not self._open:
                    continue
                if now - self.market.now_ns > 2_000_000_000:  # stalled loop: no event storm
                    self.market.resync(now - int(cfg.tick_interval_s * 1e9))
                events = self.market.generate(now)
                if now >= next_v:
                    events.extend(self.market.index_values())
                    events.extend(self.market.stock_events())
                    next_v = now + int(cfg.index_interval_s * 1e9)
                if events and not self._silent:
                    self._fan_out(events)
            except Exception:  # never let one bad tick stop the market
                log.exception("simulator pump tick failed")

    def _fan_out(self, events: list[Event]) -> None:
        fmax = self.config.frame_max_events
        for conn in list(self._conns):
            if not conn.authed or conn.closing:
                continue
            if conn.market == "indices":
                mine = [
                    e
                    for e in events
                    if e.kind == "V"
                    and e.market == "indices"
                    and (conn.v_all or e.key in conn.values)
                ]
            else:
                mine = [
                    e
                    for e in events
                    if e.market == conn.market
                    and (
                        (e.kind == "T" and (conn.t_all or e.key in conn.trades))
                        or (e.kind == "Q" and (conn.q_all or e.key in conn.quotes))
                    )
                ]
            for i in range(0, len(mine), fmax):
                chunk = mine[i : i + fmax]
                if self._malformed > 0:
                    self._malformed -= 1
                    out = _Out(self._malform([e.payload for e in chunk]), (), malformed=True)
                else:
                    counts: dict[str, int] = {}
                    for e in chunk:
                        counts[e.kind] = counts.get(e.kind, 0) + 1
                    out = _Out(_frame(e.payload for e in chunk), tuple(counts.items()))
                self._enqueue(conn, out)

    def _malform(self, payloads: list[dict[str, Any]]) -> str:
        kind = self._malformed_kind % 5
        self._malformed_kind += 1
        first = dict(payloads[0])
        if kind == 0:  # truncated JSON
            text = _frame(payloads)
            return text[: max(1, len(text) // 2)]
        if kind == 1:  # wrong types
            for f in ("p", "bp", "val"):
                if f in first:
                    first[f] = "abc"
            first["t"] = "yesterday"
            return _frame([first, *payloads[1:]])
        if kind == 2:  # NaN-like garbage (not valid JSON numbers)
            text = _frame(payloads)
            for f in ('"p":', '"bp":', '"val":'):
                i = text.find(f)
                if i >= 0:
                    j = i + len(f)
                    k = j
                    while k < len(text) and text[k] not in ",}":
                        k += 1
                    return text[:j] + "NaN" + text[k:]
            return text
        if kind == 3:  # unknown ticker
            if "sym" in first:
                first["sym"] = "O:SPXW991231C99999000"
            else:
                first["T"] = "I:NOPE"
            return _frame([first, *payloads[1:]])
        return orjson.dumps({"ev": "T", "garbage": True}).decode()  # not an array


def _decode_action(text: str) -> tuple[str, str] | None:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    action, params = obj.get("action"), obj.get("params", "")
    if not isinstance(action, str) or not isinstance(params, str):
        return None
    return action, params


def _split_params(params: str) -> list[str]:
    return [p.strip() for p in params.split(",") if p.strip()]


def _abort_transport(ws: WebSocket) -> bool:
    """Abort the TCP connection under a Starlette WebSocket served by uvicorn (no close
    frame, like a network drop). Returns False when the transport cannot be found."""
    obj: Any = getattr(ws, "_send", None)
    for _ in range(6):
        owner = getattr(obj, "__self__", None)
        transport = getattr(owner, "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()
            return True
        cells = getattr(obj, "__closure__", None) or ()
        nxt = None
        for cell in cells:
            v = cell.cell_contents
            if callable(v):
                nxt = v
                break
        if nxt is None:
            return False
        obj = nxt
    return False
