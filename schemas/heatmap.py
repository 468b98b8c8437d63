"""Convexity heatmap records: the tile (staged as msgpack, published as JSON) and the tile
delta entry on ``massive:tiles:<strategy>`` (tile builders -> publisher).

Tile JSON (one item of a published heatmap model, ``items[tile_id]``)::

    {"id": "SPX:2026-11-24:butterfly:6000-6010-6020:C", "symbol": "SPX", "epoch": "...",
     "expiry": "2026-11-24", "strategy": "butterfly", "right": "C",
     "strikes": [6000.0, 6010.0, 6020.0], "width": 10.0,
     "legs": [[cid, strike, qty, price, price_src, price_ts_ns], ...],
     "debit": 2.4, "max_profit": 7.6, "max_loss": 2.4, "r2r": 3.1667, "convexity": 0.76,
     "ts": <newest leg event ns>, "seq": <sum of the legs' quote_ts + trade_ts>,
     "age_ns": <ts - oldest used price ns>, "stale": false, "px_src": "mid|last|mixed|none",
     "src": "chain|ws",
     "flags": ["below_bound" | "above_bound" | "zero_debit" | "no_price" | ...]}

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
    debit: float | None  # price paid (negative = credit: flagged below_bound)
    max_profit: float | None  # None = unbounded (single call) or no price
    max_loss: float | None
    r2r: float | None  # max_profit / max_loss; None when max_loss <= 0 or undefined
    convexity: float | None  # spreads: clamp(1 - debit / width, 0, 1); singles: None
    ts: int  # newest event time (ns) over the legs' contracts
    seq: int  # admission clock: sum of legs' quote_ts + trade_ts (grows on any leg update)
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


_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder(Tile)
_json = msgspec.json.Encoder()


def pack(tile: Tile) -> bytes:
    """Staging encoding (msgpack) of a tile."""
    return _packer.encode(tile)


def unpack(raw: bytes) -> Tile:
    return _unpacker.decode(raw)


def to_json(tile: Tile) -> bytes:
    """Published encoding (JSON object) of a tile."""
    return _json.encode(tile)
