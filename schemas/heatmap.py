"""Convexity heatmap records: the computed tile, its published (JSON) and staged forms, and
the tile delta entry on ``massive:tiles:<strategy>`` (tile builders -> publisher).

``Tile`` is the full computed record (tile builders, tests, reference mode). What leaves the
builder is its compact **view**, one item of a published heatmap model, keyed by tile id;
the id carries the structure (``<SYM>:<expiry>:<strategy>:<strikes>:<C|P>``, width = strike
spacing), the model's ``meta.roots`` the option root per expiry (SPX or SPXW)::

    "SPX:2026-11-24:butterfly:6000-6010-6020:C": {
     "legs": [[qty, price, price_src], ...],          # in strike order, as in the id
     "debit": 2.4, "debit_natural": 2.9, "max_profit": 7.6, "max_loss": 2.4,
     "r2r": 3.1667, "convexity": 0.76, "tradable": true,
     "age_s": <whole seconds between the newest leg information and the oldest price used>,
     "stale": false, "px_src": "mid|last|mixed|none", "src": "chain|ws",
     "flags": ["stale_quote" | "above_bound" | "below_bound" | "mid_above_bound" |
               "mid_below_bound" | "zero_debit" | "no_price"]}

The view leaves out what the id says and what changes on every event without changing what
a trader sees (event timestamps, the admission clock, per-leg price times, the legs' tickers:
root + expiry + right + strike name them), so a quote that does not move a mid re-announces
an identical item and the publisher drops it from the diff. The staging HASH holds
``b"<seq>:" + view`` per tile id: the admission clock the staging Lua compares, then the
bytes the publisher publishes as they are (no decode/re-encode on the publish path).

Formulas and the convexity definition: see processors/heatmap.py.
"""

from __future__ import annotations

import msgspec

from schemas.messages import Message


class Leg(msgspec.Struct, frozen=True, array_like=True):
    """One leg of a tile: encoded as an array ``[cid, strike, qty, px, src, ts]``.

    ``qty`` is signed (+1 long, -1 short, -2 the body of a butterfly); ``src`` is the price
    source actually used (``mid``, ``last``, ``mid_stale`` or ``none``); ``ts`` is the event
    time of that price (quote_ts for a mid, trade_ts for a last; 0 when unknown)."""

    cid: str
    strike: float
    qty: int
    px: float | None
    src: str
    ts: int


class Tile(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    symbol: str
    epoch: str
    expiry: str
    strategy: str  # single | vertical | butterfly
    right: str  # C | P
    strikes: list[float]  # ascending
    width: float  # 0 for singles
    legs: list[Leg]
    debit: float | None  # mid price paid (negative = credit: flagged mid_below_bound)
    debit_natural: float | None  # buying at the natural price: longs at the ask, shorts at bid
    max_profit: float | None  # None = unbounded (single call) or no price
    max_loss: float | None
    r2r: float | None  # max_profit / max_loss; None when max_loss <= 0, untradable, undefined
    convexity: float | None  # spreads: clamp(1 - debit / width, 0, 1) if tradable; else None
    tradable: bool  # every leg has a fresh two-sided quote
    ts: int  # newest information time (ns) over the legs' contracts
    seq: (
        int  # admission clock: sum of legs' quote_ts + trade_ts + quote_rx_ts (grows on any update)
    )
    age_ns: int | None  # ts - oldest price used (staleness of the tile's inputs)
    stale: bool  # age_ns > max quote age setting
    px_src: str  # mid | last | mixed | none
    src: str  # ws if any leg was updated from the WebSocket, else chain
    flags: list[str]


class TileDelta(Message, frozen=True):
    """Entry on ``massive:tiles:<strategy>``: these staged tiles were (re)computed.

    Carries ids only, not values: the staging HASH is the authority and the publisher reads
    the current staged values (so several deltas touching one tile coalesce naturally).
    ``full`` = the whole epoch was (re)installed in staging (``ids`` is then empty and the
    publisher re-reads the entire staging hash); ``expected`` = number of tiles of the epoch.
    ``recv_ts_ns`` = oldest ingest receive time behind the change (latency accounting)."""

    symbol: str
    strategy: str
    epoch: str
    ids: list[str]
    full: bool = False
    expected: int = 0
    recv_ts_ns: int | None = None
    max_ts_ns: int = 0
    n_dirty: int = 0


class ViewLeg(msgspec.Struct, frozen=True, array_like=True):
    """Published leg: ``[qty, px, src]``; legs are in strike order, so the strike is the
    id's strike at the same index."""

    qty: int
    px: float | None
    src: str


class TileView(msgspec.Struct, frozen=True, kw_only=True):
    """Published item of a heatmap model (see module doc)."""

    legs: list[ViewLeg]
    debit: float | None
    debit_natural: float | None
    max_profit: float | None
    max_loss: float | None
    r2r: float | None
    convexity: float | None
    tradable: bool
    age_s: int | None
    stale: bool
    px_src: str
    src: str
    flags: list[str]


_json = msgspec.json.Encoder()
_view_decoder = msgspec.json.Decoder(TileView)
NS_PER_S = 1_000_000_000


def root_of(cid: str) -> str:
    """OCC option ticker ``O:<root><yymmdd><C|P><strike*1000:08d>`` -> root."""
    return cid[2:-15] if cid.startswith("O:") and len(cid) > 17 else ""


def view(tile: Tile) -> TileView:
    legs = tile.legs
    if len(legs) > 1 and legs[0].strike > legs[-1].strike:
        legs = legs[::-1]  # put verticals are built long-leg first: publish in strike order
    return TileView(
        legs=[ViewLeg(leg.qty, leg.px, leg.src) for leg in legs],
        debit=tile.debit,
        debit_natural=tile.debit_natural,
        max_profit=tile.max_profit,
        max_loss=tile.max_loss,
        r2r=tile.r2r,
        convexity=tile.convexity,
        tradable=tile.tradable,
        age_s=tile.age_ns // NS_PER_S if tile.age_ns is not None else None,
        stale=tile.stale,
        px_src=tile.px_src,
        src=tile.src,
        flags=tile.flags,
    )


def to_json(tile: Tile) -> bytes:
    """Published encoding (JSON object) of a tile: its view."""
    return _json.encode(view(tile))


def encode_view(v: TileView) -> bytes:
    return _json.encode(v)


def stage_value(tile: Tile) -> bytes:
    """Staging encoding: ``b"<seq>:" + to_json(tile)``."""
    return b"%d:%b" % (tile.seq, _json.encode(view(tile)))


def split_staged(raw: bytes) -> tuple[int, bytes]:
    """A staging value -> (seq, published JSON). Raises ValueError when malformed."""
    seq, sep, js = raw.partition(b":")
    if not sep or not js:
        raise ValueError(f"malformed staged tile {raw[:40]!r}")
    return int(seq), js


def decode_view(js: bytes) -> TileView:
    return _view_decoder.decode(js)
