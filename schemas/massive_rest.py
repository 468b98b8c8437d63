"""Massive REST snapshot wire formats (reference/massive_api.md sections 1 and 2).

* Options chain snapshot ``GET /v3/snapshot/options/{I:SPX}``: envelope with ``results`` (a
  list of :class:`OptionSnapshotItem`) and an optional absolute ``next_url``.
* Single-contract snapshot ``GET /v3/snapshot/options/{I:SPX}/{O:...}``: same item, but
  ``results`` is one object.
* Index snapshot ``GET /v3/snapshot/indices?ticker.any_of=I:SPX,I:NDX`` (and the universal
  ``/v3/snapshot``): ``results`` items carry ``value`` (the level) or a per-ticker ``error``.

Units: every REST timestamp (``last_quote.last_updated``, ``last_trade.sip_timestamp``,
``day.last_updated``, ``underlying_asset.last_updated``, index ``last_updated``) is
**nanoseconds** since the epoch (WS ``t`` is milliseconds; see schemas/massive.py).

Robustness: the envelope is decoded with ``results`` kept raw, then every item is decoded and
validated on its own, so one bad item is rejected with a short reason (a bounded label set,
fit for a Prometheus counter) and never costs the rest of the page. A page that is not a
JSON object at all (truncated body, HTML error page) raises :class:`RestDecodeError`.
Nothing here raises anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec

from schemas import symbols
from schemas import ticker as ticker_codec
from schemas.messages import ChainContract

# Timestamps outside this range are not nanoseconds since the epoch (a value in ms or s is
# orders of magnitude smaller): 1990-01-01 .. 2200-01-01 in ns.
MIN_TS_NS = 631_152_000_000_000_000
MAX_TS_NS = 7_258_118_400_000_000_000
# Prices/levels/greeks beyond this are garbage (SPX/NDX levels are ~1e4).
MAX_ABS_VALUE = 1e9

# --- rejection reasons (the label values of the rejected-items counter) ----------------
R_DECODE = "decode"  # the item is not an object of the documented shape (wrong types)
R_NO_TICKER = "no_ticker"  # details.ticker missing
R_BAD_TICKER = "bad_ticker"  # details.ticker does not parse as O:<root><yymmdd><C|P><strike>
R_MISMATCH = "details_mismatch"  # details disagree with the ticker (expiry/strike/type)
R_BAD_TYPE = "bad_contract_type"  # contract_type other than call/put
R_WRONG_UNDERLYING = "wrong_underlying"  # a root that does not belong to the requested symbol
# an adjusted root (AAPL1) or shares_per_contract other than the symbol's multiplier, skipped
# by the symbol's policy (schemas/symbols.py)
R_ADJUSTED = "adjusted_deliverable"
R_NON_FINITE = "non_finite"  # NaN/inf or absurd magnitude in a number we use
R_NEGATIVE = "negative_value"  # negative price/size/OI/IV
R_BAD_TS = "bad_timestamp"  # timestamp not plausible nanoseconds
R_TICKER_ERROR = "ticker_error"  # index snapshot per-ticker error (NOT_FOUND/NOT_ENTITLED)
R_NO_VALUE = "no_value"  # index snapshot item without a level
R_BAD_INDEX_TICKER = "bad_index_ticker"

REASONS = (
    R_DECODE,
    R_NO_TICKER,
    R_BAD_TICKER,
    R_MISMATCH,
    R_BAD_TYPE,
    R_WRONG_UNDERLYING,
    R_ADJUSTED,
    R_NON_FINITE,
    R_NEGATIVE,
    R_BAD_TS,
    R_TICKER_ERROR,
    R_NO_VALUE,
    R_BAD_INDEX_TICKER,
)


class RestDecodeError(ValueError):
    """A whole response body that cannot be decoded (truncated JSON, wrong top-level type)."""


class ItemRejected(ValueError):
    """One result item rejected; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- wire structs ------------------------------------------------------------------------
# Every field is optional (the provider omits objects depending on plan and liquidity;
# the official client makes every model field Optional). Unknown fields are ignored.


class Day(msgspec.Struct, frozen=True):
    change: float | None = None
    change_percent: float | None = None  # percent units (-7.64 = -7.64 %)
    close: float | None = None
    high: float | None = None
    low: float | None = None
    open: float | None = None
    previous_close: float | None = None
    volume: float | None = None
    vwap: float | None = None
    last_updated: int | None = None  # ns


class Details(msgspec.Struct, frozen=True):
    ticker: str | None = None
    contract_type: str | None = None  # call | put | other
    exercise_style: str | None = None
    expiration_date: str | None = None  # YYYY-MM-DD
    shares_per_contract: float | None = None
    strike_price: float | None = None


class Greeks(msgspec.Struct, frozen=True):
    delta: float | None = None
    gamma: float | None = None
    theta: float | None = None
    vega: float | None = None


class LastQuote(msgspec.Struct, frozen=True):
    bid: float | None = None
    ask: float | None = None
    bid_size: float | None = None
    ask_size: float | None = None
    midpoint: float | None = None
    bid_exchange: int | None = None
    ask_exchange: int | None = None
    last_updated: int | None = None  # ns
    timeframe: str | None = None  # REAL-TIME | DELAYED


class LastTrade(msgspec.Struct, frozen=True):
    price: float | None = None
    size: float | None = None
    exchange: int | None = None
    sip_timestamp: int | None = None  # ns
    conditions: list[int] | None = None
    timeframe: str | None = None


class UnderlyingAsset(msgspec.Struct, frozen=True):
    ticker: str | None = None  # "AAPL" or "I:SPX"
    price: float | None = None  # stock/ETF underlyings
    value: float | None = None  # index underlyings
    change_to_break_even: float | None = None
    last_updated: int | None = None  # ns
    timeframe: str | None = None


class OptionSnapshotItem(msgspec.Struct, frozen=True):
    details: Details | None = None
    break_even_price: float | None = None
    day: Day | None = None
    fmv: float | None = None
    greeks: Greeks | None = None
    implied_volatility: float | None = None
    last_quote: LastQuote | None = None
    last_trade: LastTrade | None = None
    open_interest: float | None = None
    underlying_asset: UnderlyingAsset | None = None


class _ChainEnvelope(msgspec.Struct, frozen=True):
    status: str | None = None
    request_id: str | None = None
    results: list[msgspec.Raw] | None = None
    next_url: str | None = None
    error: str | None = None
    message: str | None = None


class _ContractEnvelope(msgspec.Struct, frozen=True):
    status: str | None = None
    request_id: str | None = None
    results: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: str | None = None
    message: str | None = None


class IndexSession(msgspec.Struct, frozen=True):
    change: float | None = None
    change_percent: float | None = None
    close: float | None = None
    high: float | None = None
    low: float | None = None
    open: float | None = None
    previous_close: float | None = None


class IndexSnapshotItem(msgspec.Struct, frozen=True):
    ticker: str | None = None  # "I:SPX" (or "SPX" in the older mock)
    value: float | None = None
    name: str | None = None
    type: str | None = None
    market_status: str | None = None
    timeframe: str | None = None
    last_updated: int | None = None  # ns
    session: IndexSession | None = None
    error: str | None = None  # NOT_FOUND | NOT_ENTITLED (HTTP status stays 200)
    message: str | None = None


_chain_env_dec = msgspec.json.Decoder(_ChainEnvelope)
_contract_env_dec = msgspec.json.Decoder(_ContractEnvelope)
_item_dec = msgspec.json.Decoder(OptionSnapshotItem)
_index_item_dec = msgspec.json.Decoder(IndexSnapshotItem)


# --- results -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str


@dataclass(slots=True)
class ChainPage:
    """One decoded page of a chain snapshot."""

    status: str | None
    request_id: str | None
    next_url: str | None
    contracts: list[ChainContract] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # Index level seen in underlying_asset.value/price (with its ns time), if any.
    underlying_value: float | None = None
    underlying_ts_ns: int | None = None
    error: str | None = None  # envelope-level error text (status ERROR etc.)


@dataclass(frozen=True, slots=True)
class IndexSpot:
    symbol: str  # without the "I:" prefix, e.g. "SPX"
    value: float
    ts_ns: int | None  # provider time (ns); None when the response has no last_updated
    market_status: str | None = None


@dataclass(slots=True)
class IndexPage:
    status: str | None
    request_id: str | None
    next_url: str | None
    spots: list[IndexSpot] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    error: str | None = None


# --- helpers -----------------------------------------------------------------------------
def index_symbol(tkr: str) -> str:
    """``"I:SPX"`` -> ``"SPX"``; ``"SPX"`` -> ``"SPX"``."""
    return tkr[2:] if tkr.startswith("I:") else tkr


def _num(name: str, v: float | None, *, nonneg: bool = False) -> float | None:
    if v is None:
        return None
    if not math.isfinite(v) or abs(v) > MAX_ABS_VALUE:
        raise ItemRejected(R_NON_FINITE, f"{name}={v!r}")
    if nonneg and v < 0:
        raise ItemRejected(R_NEGATIVE, f"{name}={v!r}")
    return float(v)


def _ts(name: str, v: int | None) -> int | None:
    if v is None:
        return None
    if not (MIN_TS_NS <= v <= MAX_TS_NS):
        raise ItemRejected(R_BAD_TS, f"{name}={v} is not nanoseconds since the epoch")
    return v


def _envelope_error(status: str | None, error: str | None, message: str | None) -> str | None:
    if error or (status is not None and status not in ("OK", "DELAYED")):
        return error or message or f"status {status}"
    return None


# --- option items ------------------------------------------------------------------------
def _check_details(d: Details, cid: str, t: ticker_codec.OptionTicker) -> None:
    """The details' expiration, strike and type, when given, agree with the ticker."""
    if d.expiration_date is not None and d.expiration_date != t.expiry.isoformat():
        raise ItemRejected(R_MISMATCH, f"{cid}: expiration_date {d.expiration_date!r}")
    if d.strike_price is not None:
        _num("details.strike_price", d.strike_price)
        if abs(d.strike_price - t.strike) > 1e-6:
            raise ItemRejected(R_MISMATCH, f"{cid}: strike_price {d.strike_price!r}")
    if d.contract_type is not None:
        right = {"call": "C", "put": "P"}.get(d.contract_type)
        if right is None:
            raise ItemRejected(R_BAD_TYPE, f"{cid}: contract_type {d.contract_type!r}")
        if right != t.right:
            raise ItemRejected(R_MISMATCH, f"{cid}: contract_type {d.contract_type!r}")


def _check_underlying(
    symbol: str,
    cid: str,
    t: ticker_codec.OptionTicker,
    shares: float | None,
    raw_shares: float | None,
) -> None:
    """The contract's root belongs to ``symbol`` by its spec, with a deliverable it keeps."""
    spec = symbols.registry().spec(symbol)
    kind = spec.classify(t.root)
    if kind is None:
        raise ItemRejected(R_WRONG_UNDERLYING, f"{cid}: root {t.root} is not {symbol}")
    if spec.adjusted == "skip" and (
        kind == symbols.ADJUSTED or not spec.standard_deliverable(shares)
    ):
        raise ItemRejected(R_ADJUSTED, f"{cid}: root {t.root}, shares_per_contract {raw_shares}")


def to_contract(item: OptionSnapshotItem, symbol: str | None = None) -> ChainContract:
    """Convert one chain result item to a :class:`ChainContract`.

    ``symbol`` (e.g. "SPX", "AAPL"), when given, must be the underlying the contract's root
    belongs to by its spec (schemas/symbols.py: SPXW is SPX's, RUTW RUT's); an adjusted or
    non-standard deliverable is rejected as ``adjusted_deliverable`` unless the spec keeps
    them. Raises :class:`ItemRejected` with a reason; nothing else.
    """
    d = item.details
    if d is None or not d.ticker:
        raise ItemRejected(R_NO_TICKER, "details.ticker missing")
    cid = d.ticker
    try:
        t = ticker_codec.parse(cid)
    except ticker_codec.TickerError as exc:
        raise ItemRejected(R_BAD_TICKER, str(exc)) from None
    expiry = t.expiry.isoformat()
    _check_details(d, cid, t)
    shares = _num("details.shares_per_contract", d.shares_per_contract, nonneg=True)
    if symbol is not None:
        _check_underlying(symbol, cid, t, shares, d.shares_per_contract)

    bid = ask = quote_ts = None
    q = item.last_quote
    if q is not None:
        bid = _num("last_quote.bid", q.bid, nonneg=True)
        ask = _num("last_quote.ask", q.ask, nonneg=True)
        quote_ts = _ts("last_quote.last_updated", q.last_updated)
    last = last_size = trade_ts = None
    tr = item.last_trade
    if tr is not None:
        last = _num("last_trade.price", tr.price, nonneg=True)
        last_size = _num("last_trade.size", tr.size, nonneg=True)
        trade_ts = _ts("last_trade.sip_timestamp", tr.sip_timestamp)
    g = item.greeks
    delta = gamma = theta = vega = None
    if g is not None:
        delta = _num("greeks.delta", g.delta)
        gamma = _num("greeks.gamma", g.gamma)
        theta = _num("greeks.theta", g.theta)
        vega = _num("greeks.vega", g.vega)
    iv = _num("implied_volatility", item.implied_volatility, nonneg=True)
    oi = _num("open_interest", item.open_interest, nonneg=True)
    volume = None
    if item.day is not None:
        volume = _num("day.volume", item.day.volume, nonneg=True)
    return ChainContract(
        cid=cid,
        expiry=expiry,
        strike=t.strike,
        right=t.right,
        bid=bid,
        ask=ask,
        last=last,
        last_size=last_size,
        quote_ts_ns=quote_ts,
        trade_ts_ns=trade_ts,
        iv=iv,
        delta=delta,
        gamma=gamma,
        theta=theta,
        vega=vega,
        oi=oi,
        volume=volume,
        shares=shares,
    )


def decode_item(raw: bytes | msgspec.Raw) -> OptionSnapshotItem:
    """Decode one raw result item; raises :class:`ItemRejected` (reason ``decode``)."""
    try:
        return _item_dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ItemRejected(R_DECODE, str(exc)) from None


def convert_item(raw: bytes | msgspec.Raw, symbol: str | None = None) -> ChainContract:
    """Decode and convert one raw item; raises :class:`ItemRejected` only."""
    return to_contract(decode_item(raw), symbol)


def _underlying(item: OptionSnapshotItem) -> tuple[float | None, int | None]:
    u = item.underlying_asset
    if u is None:
        return None, None
    v = u.value if u.value is not None else u.price
    if v is None or not math.isfinite(v) or not (0 < v <= MAX_ABS_VALUE):
        return None, None
    ts = u.last_updated
    if ts is not None and not (MIN_TS_NS <= ts <= MAX_TS_NS):
        ts = None
    return float(v), ts


def _convert_into(page: ChainPage, raw: msgspec.Raw, symbol: str | None) -> None:
    try:
        item = decode_item(raw)
        page.contracts.append(to_contract(item, symbol))
    except ItemRejected as rej:
        page.rejections.append(Rejection(rej.reason, rej.detail))
        return
    if page.underlying_value is None:
        page.underlying_value, page.underlying_ts_ns = _underlying(item)


def parse_chain_page(body: bytes | str, symbol: str | None = None) -> ChainPage:
    """Decode one chain snapshot page. Raises :class:`RestDecodeError` if the body is not
    a JSON object of the envelope shape; bad items are returned as rejections."""
    try:
        env = _chain_env_dec.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RestDecodeError(f"chain snapshot page: {exc}") from None
    page = ChainPage(
        status=env.status,
        request_id=env.request_id,
        next_url=env.next_url or None,
        error=_envelope_error(env.status, env.error, env.message),
    )
    for raw in env.results or ():
        _convert_into(page, raw, symbol)
    return page


def parse_contract_snapshot(body: bytes | str, symbol: str | None = None) -> ChainPage:
    """Decode a single-contract snapshot (``results`` is one object) as a one-item page."""
    try:
        env = _contract_env_dec.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RestDecodeError(f"contract snapshot: {exc}") from None
    page = ChainPage(
        status=env.status,
        request_id=env.request_id,
        next_url=None,
        error=_envelope_error(env.status, env.error, env.message),
    )
    if bytes(env.results).strip() != b"null":
        _convert_into(page, env.results, symbol)
    return page


# --- index snapshot ----------------------------------------------------------------------
def to_index_spot(item: IndexSnapshotItem) -> IndexSpot:
    """Raises :class:`ItemRejected` for per-ticker errors, missing or absurd values."""
    if item.error is not None:
        raise ItemRejected(R_TICKER_ERROR, f"{item.ticker}: {item.error} {item.message or ''}")
    if not item.ticker:
        raise ItemRejected(R_BAD_INDEX_TICKER, "ticker missing")
    sym = index_symbol(item.ticker)
    if not sym or not sym.isalnum():
        raise ItemRejected(R_BAD_INDEX_TICKER, f"ticker {item.ticker!r}")
    if item.value is None:
        raise ItemRejected(R_NO_VALUE, f"{item.ticker}: no value")
    value = _num("value", item.value, nonneg=True)
    if not value:
        raise ItemRejected(R_NO_VALUE, f"{item.ticker}: value 0")
    ts = _ts("last_updated", item.last_updated)
    return IndexSpot(sym, value, ts, item.market_status)


def parse_index_snapshot(body: bytes | str) -> IndexPage:
    """Decode ``/v3/snapshot/indices`` (or the universal ``/v3/snapshot``) responses.
    Raises :class:`RestDecodeError` only for an undecodable body."""
    try:
        env = _chain_env_dec.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RestDecodeError(f"index snapshot: {exc}") from None
    page = IndexPage(
        status=env.status,
        request_id=env.request_id,
        next_url=env.next_url or None,
        error=_envelope_error(env.status, env.error, env.message),
    )
    for raw in env.results or ():
        try:
            item = _index_item_dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            page.rejections.append(Rejection(R_DECODE, str(exc)))
            continue
        try:
            page.spots.append(to_index_spot(item))
        except ItemRejected as rej:
            page.rejections.append(Rejection(rej.reason, rej.detail))
    return page
