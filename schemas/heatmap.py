"""Convexity heatmap records: a tile's published (JSON) and staged forms, and the tile delta
entry on ``massive:tiles:<strategy>`` (tile builders -> publisher).

What leaves the builder is a tile's compact **view** (the full record with every leg's
contract and price time is the tests' reference, tests/heatmap_reference.py), one item of a
published heatmap model, keyed by tile id; the id carries the structure
(``<SYM>:<expiry>:<strategy>:<strikes>:<C|P>``, width = strike spacing), the model's
``meta.roots`` the option root per expiry (SPX or SPXW)::

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

Formulas and the convexity definition: see processors/heatmap/grid.py.
"""

from __future__ import annotations

import msgspec

from schemas.messages import Message


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
NS_PER_S = 1_000_000_000


def root_of(cid: str) -> str:
    """OCC option ticker ``O:<root><yymmdd><C|P><strike*1000:08d>`` -> root."""
    return cid[2:-15] if cid.startswith("O:") and len(cid) > 17 else ""


def encode_view(v: TileView) -> bytes:
    return _json.encode(v)


def split_staged(raw: bytes) -> tuple[int, bytes]:
    """A staging value -> (seq, published JSON). Raises ValueError when malformed."""
    seq, sep, js = raw.partition(b":")
    if not sep or not js:
        raise ValueError(f"malformed staged tile {raw[:40]!r}")
    return int(seq), js
