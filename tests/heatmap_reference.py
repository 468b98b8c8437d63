"""The readable reference of the heatmap math, for tests and benchmarks only: the full tile
record (``Tile``, every leg with its contract, strike and price time), its published view
and staging bytes, and a full rebuild of an epoch's tiles from the contract hashes.
Production computes the staging bytes directly (``heatmap.staged_value`` per tile,
``tile_vec`` per batch); property tests hold both byte-equal to ``stage_value(compute_tile)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
from redis.asyncio import Redis

from processors.heatmap import grid as hm
from processors.heatmap.grid import Grid, LegQuote, TileSpec, _price_tile, _r6, _values
from processors.heatmap.tile_builder import QuoteParser, TileSettings, fetch_rows, load_grid
from schemas.heatmap import NS_PER_S, TileView, ViewLeg

_json = msgspec.json.Encoder()
_view_decoder = msgspec.json.Decoder(TileView)


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


def stage_value(tile: Tile) -> bytes:
    """Staging encoding: ``b"<seq>:" + to_json(tile)``."""
    return b"%d:%b" % (tile.seq, _json.encode(view(tile)))


def decode_view(js: bytes) -> TileView:
    return _view_decoder.decode(js)


def compute_tile(
    spec: TileSpec,
    quotes: Mapping[str, LegQuote | None],
    epoch: str,
    max_quote_age_ns: int,
) -> Tile:
    """The full tile record (the readable reference; ``staged_value`` is its staged bytes)."""
    p = _price_tile(spec, quotes, max_quote_age_ns)
    legs = [
        Leg(cid, k, qty, lp.px, lp.src, lp.ts)
        for (cid, k, qty), lp in zip(spec.legs, p.legs, strict=True)
    ]
    if p.debit is None:
        flags, max_profit, max_loss, r2r, conv = ["no_price"], None, None, None, None
        debit = None
    else:
        debit, max_profit, max_loss, r2r, conv, flags = _values(spec, p)
    return Tile(
        id=spec.id,
        symbol=spec.symbol,
        epoch=epoch,
        expiry=spec.expiry,
        strategy=spec.strategy,
        right=spec.right,
        strikes=list(spec.strikes),
        width=spec.width,
        legs=legs,
        debit=debit,
        debit_natural=_r6(p.natural) if p.natural is not None else None,
        max_profit=max_profit,
        max_loss=max_loss,
        r2r=r2r,
        convexity=conv,
        tradable=p.tradable,
        ts=p.as_of,
        seq=p.seq,
        age_ns=p.age,
        stale=p.stale,
        px_src=p.px_src,
        src="ws" if p.ws else "chain",
        flags=flags,
    )


def compute_all(
    grid: Grid, quotes: Mapping[str, LegQuote | None], epoch: str, max_quote_age_ns: int
) -> dict[str, Tile]:
    return {tid: compute_tile(s, quotes, epoch, max_quote_age_ns) for tid, s in grid.specs.items()}


async def fetch_quotes(
    redis: Redis, symbol: str, eid: str, cids: Sequence[str], chunk: int = 2000
) -> dict[str, hm.LegQuote | None]:
    """Read LEG_FIELDS of every contract in ``cids`` (one pipelined round trip)."""
    return (await fetch_rows(redis, symbol, eid, cids, chunk, QuoteParser()))[0]


async def reference_full_build(
    redis: Redis, eid: str, symbol: str, strategy: str, cfg: TileSettings, now_ns: int
) -> dict[str, Tile]:
    """Every tile of ``strategy`` for epoch ``eid`` recomputed from the contract hashes
    (reference mode for tests and benchmarks; production uses the incremental path)."""
    grid = await load_grid(redis, eid, symbol, strategy, cfg, now_ns)
    quotes = await fetch_quotes(
        redis, symbol, eid, grid.leg_cids(grid.specs.values()), cfg.fetch_chunk
    )
    return compute_all(grid, quotes, eid, cfg.max_quote_age_ns)
