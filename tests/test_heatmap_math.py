"""Heatmap tile math: ids, grid topology, pricing rule, formulas, convexity, and the
reference full rebuild checked against an independent recomputation over plain dicts."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from processors.heatmap import grid as hm
from processors.heatmap.tile_builder import TileSettings
from schemas import keys, ticker
from schemas.heatmap import split_staged
from tests.factories import option_chain, seed_epoch
from tests.heatmap_reference import (
    Tile,
    compute_tile,
    decode_view,
    reference_full_build,
    stage_value,
    to_json,
    view,
)

NOW = 1_764_000_000_000_000_000  # 2025-11-24T16:00Z
SEC = 1_000_000_000


def cid(root: str, exp: str, right: str, k: float) -> str:
    return ticker.encode(root, dt.date.fromisoformat(exp), right, k)


def test_tile_ids_follow_the_documented_format() -> None:
    assert (
        hm.tile_id("SPX", "2026-11-24", "butterfly", (6000, 6010, 6020), "C")
        == "SPX:2026-11-24:butterfly:6000-6010-6020:C"
    )
    assert (
        hm.tile_id("SPX", "2026-11-24", "single", (6000.0,), "P") == "SPX:2026-11-24:single:6000:P"
    )
    assert hm.tile_id("NDX", "2026-11-24", "vertical", (20002.5, 20027.5), "C").endswith(
        ":20002.5-20027.5:C"
    )


def _grid(strategy: str, cids: list[str], widths: tuple[float, ...] = (5, 10)) -> hm.Grid:
    return hm.build_grid("SPX", strategy, cids, widths, today=dt.date(2026, 11, 24), n_expiries=5)


def test_butterfly_dirty_strike_touches_centers_k_minus_w_k_k_plus_w() -> None:
    strikes = [5980, 5985, 5990, 5995, 6000, 6005, 6010, 6015, 6020]
    cids = [cid("SPXW", "2026-11-24", r, k) for k in strikes for r in "CP"]
    g = _grid("butterfly", cids)
    hit = g.affected([cid("SPXW", "2026-11-24", "C", 6000)])
    assert sorted(hit) == sorted(
        f"SPX:2026-11-24:butterfly:{k - w}-{k}-{k + w}:C"
        for w in (5, 10)
        for k in (6000 - w, 6000, 6000 + w)
    )
    # edge: no tile needs a leg outside the grid
    assert "SPX:2026-11-24:butterfly:5970-5980-5990:C" not in g.specs
    assert "SPX:2026-11-24:butterfly:5975-5980-5985:C" not in g.specs


def test_vertical_legs_and_anchors() -> None:
    cids = [cid("SPXW", "2026-11-24", r, k) for k in (5990, 6000, 6010) for r in "CP"]
    g = _grid("vertical", cids, (10,))
    assert set(g.specs) == {
        "SPX:2026-11-24:vertical:5990-6000:C",
        "SPX:2026-11-24:vertical:6000-6010:C",
        "SPX:2026-11-24:vertical:5990-6000:P",
        "SPX:2026-11-24:vertical:6000-6010:P",
    }
    call = g.specs["SPX:2026-11-24:vertical:6000-6010:C"]
    assert [(k, q) for _, k, q in call.legs] == [(6000, 1), (6010, -1)]  # long lower call
    put = g.specs["SPX:2026-11-24:vertical:5990-6000:P"]
    assert [(k, q) for _, k, q in put.legs] == [(6000, 1), (5990, -1)]  # long upper put


def test_one_root_per_expiry_and_expiry_selection() -> None:
    cids = [cid("SPXW", "2026-11-20", "C", k) for k in (6000, 6005)]  # expired
    cids += [cid("SPX", "2026-12-18", "C", k) for k in (6000, 6005)]  # AM monthly
    cids += [cid("SPXW", "2026-12-18", "C", k) for k in (6000, 6005, 6010)]  # PM, more
    cids += [cid("SPXW", e, "C", 6000) for e in ("2026-11-24", "2026-11-25", "2026-11-27")]
    cids += [cid("NDXP", "2026-11-24", "C", 20000)]  # other symbol
    g = hm.build_grid("SPX", "single", cids, (), today=dt.date(2026, 11, 24), n_expiries=3)
    assert g.expiries == ["2026-11-24", "2026-11-25", "2026-11-27"]  # 0DTE first, expired gone
    g = hm.build_grid("SPX", "single", cids, (), today=dt.date(2026, 11, 24), n_expiries=9)
    roots = {ticker.parse(s.legs[0][0]).root for s in g.specs.values() if s.expiry == "2026-12-18"}
    assert roots == {"SPXW"}
    # a tie goes to the PM-settled weekly root
    tie = [cid(r, "2026-12-18", "C", 6000) for r in ("SPX", "SPXW")]
    g = hm.build_grid("SPX", "single", tie, (), today=None, n_expiries=1)
    assert [ticker.parse(s.legs[0][0]).root for s in g.specs.values()] == ["SPXW"]


def q(**kw: object) -> hm.LegQuote:
    base: dict[str, object] = dict(
        bid=None, ask=None, mid=None, quote_ts=None, last=None, trade_ts=None, ts_ns=0, src="chain"
    )
    base.update(kw)
    return hm.LegQuote(**base)  # type: ignore[arg-type]


def two_sided(mid: float, ts: int = NOW, **kw: object) -> hm.LegQuote:
    """A fresh two-sided quote around ``mid`` (bid > 0, ask >= bid)."""
    bid = max(mid - 0.05, 0.05)
    return q(bid=bid, ask=bid + 0.1, mid=mid, quote_ts=ts, ts_ns=ts, **kw)


def test_price_rule_own_quote_age_else_newer_trade_else_stale_mid() -> None:
    age = 5 * SEC
    fresh = q(mid=2.0, quote_ts=NOW, last=1.5, trade_ts=NOW + 4 * SEC, ts_ns=NOW + 4 * SEC)
    assert hm.price_leg(fresh, NOW + 4 * SEC, age) == (2.0, "mid", NOW, False, NOW)
    stale = q(mid=2.0, quote_ts=NOW, last=1.5, trade_ts=NOW + 6 * SEC, ts_ns=NOW + 6 * SEC)
    assert hm.price_leg(stale, NOW + 6 * SEC, age) == (
        1.5,
        "last",
        NOW + 6 * SEC,
        False,
        NOW + 6 * SEC,
    )
    # a quote too old for the tile's time, and a trade newer than it: the trade
    assert hm.price_leg(fresh, NOW + 9 * SEC, age) == (
        1.5,
        "last",
        NOW + 4 * SEC,
        False,
        NOW + 4 * SEC,
    )
    # a stale quote beats a much older trade (here 3 hours): stale mid, flagged
    old_trade = q(mid=2.0, quote_ts=NOW, last=1.5, trade_ts=NOW - 3 * 3600 * SEC, ts_ns=NOW)
    assert hm.price_leg(old_trade, NOW + 9 * SEC, age) == (2.0, "mid_stale", NOW, False, NOW)
    no_trade = q(mid=2.0, quote_ts=NOW, ts_ns=NOW)
    assert hm.price_leg(no_trade, NOW + 9 * SEC, age) == (2.0, "mid_stale", NOW, False, NOW)
    # age since last *received*: a quote unchanged for a minute, confirmed by a snapshot 1 s
    # ago, is fresh (its change time does not matter)
    confirmed = q(
        bid=1.9, ask=2.1, mid=2.0, quote_ts=NOW - 60 * SEC, quote_rx=NOW + 8 * SEC, ts_ns=NOW
    )
    assert confirmed.received == NOW + 8 * SEC
    # priced as the quote that has stood for a minute, fresh because received 1 s ago
    assert hm.price_leg(confirmed, NOW + 9 * SEC, age) == (
        2.0, "mid", NOW - 60 * SEC, True, NOW + 8 * SEC
    )  # fmt: skip
    # tradable needs a two-sided quote
    no_bid = q(bid=0.0, ask=0.05, mid=0.025, quote_ts=NOW, ts_ns=NOW)
    assert hm.price_leg(no_bid, NOW, age) == (0.025, "mid", NOW, False, NOW)
    crossed = q(bid=2.2, ask=2.1, mid=2.15, quote_ts=NOW, ts_ns=NOW)
    assert not hm.price_leg(crossed, NOW, age).tradable
    assert hm.price_leg(None, NOW, age) == (None, "none", 0, False, 0)
    # leg prices are rounded to 1e-6
    assert hm.price_leg(q(mid=377.70000000000005, quote_ts=NOW), NOW, age).px == 377.7
    assert hm.LegQuote.from_values([b"1", b"3", None, b"5", None, None, None, None, b"9"]) == q(
        bid=1.0, ask=3.0, mid=2.0, quote_ts=5, ts_ns=5, quote_rx=9
    )
    assert hm.LegQuote.from_values([None] * 9) is None
    bad = hm.LegQuote.from_values([b"nan", b"x", None, b"?", b"inf", None, b"7", b"ws", b"1"])
    assert bad == q(ts_ns=7, src="ws")  # no quote: its receipt time means nothing


def _spec(strategy: str, right: str, strikes: list[float], width: float) -> hm.TileSpec:
    qty = {"single": [1], "vertical": [1, -1], "butterfly": [1, -2, 1]}[strategy]
    legs = tuple((f"c{i}", k, n) for i, (k, n) in enumerate(zip(strikes, qty, strict=True)))
    return hm.TileSpec("t", "SPX", "2026-11-24", strategy, right, tuple(strikes), width, legs)


@settings(max_examples=300, deadline=None)
@given(
    prices=st.lists(st.floats(0, 60, allow_nan=False), min_size=3, max_size=3),
    width=st.sampled_from([5.0, 10.0, 25.0, 50.0]),
    right=st.sampled_from("CP"),
)
def test_butterfly_formulas_bounds_and_convexity(
    prices: list[float], width: float, right: str
) -> None:
    spec = _spec("butterfly", right, [6000 - width, 6000, 6000 + width], width)
    quotes = {f"c{i}": two_sided(p, NOW + i, trade_ts=i or None) for i, p in enumerate(prices)}
    t = compute_tile(spec, quotes, "e1", 5 * SEC)
    r = [hm._r6(p) for p in prices]
    d = 0.0 + r[0] - 2 * r[1] + r[2]  # the tile's own order of operations
    bid = {c: x.bid for c, x in quotes.items()}
    ask = {c: x.ask for c, x in quotes.items()}
    buy = 0.0 + ask["c0"] - 2 * bid["c1"] + ask["c2"]  # type: ignore[operator]
    sell = 0.0 + bid["c0"] - 2 * ask["c1"] + bid["c2"]  # type: ignore[operator]
    assert t.tradable and t.debit_natural == pytest.approx(buy, abs=1e-6)
    assert t.debit == pytest.approx(d, abs=1e-6)
    assert t.max_profit == pytest.approx(width - d, abs=1e-6)
    assert t.max_loss == pytest.approx(d, abs=1e-6)
    assert t.seq == 3 * NOW + 3 + 3 and t.ts == NOW + 2  # seq: sum of quote_ts + trade_ts
    assert ("mid_below_bound" in t.flags) == (d < -1e-9)
    assert ("mid_above_bound" in t.flags) == (d > width + 1e-9)
    assert ("below_bound" in t.flags) == (buy < -1e-9)  # executable: natural prices
    assert ("above_bound" in t.flags) == (sell > width + 1e-9)
    assert t.convexity is not None and 0.0 <= t.convexity <= 1.0
    if 1e-6 < d < width:
        assert t.r2r == pytest.approx((width - d) / d, rel=1e-5, abs=1e-5)
        assert t.convexity == pytest.approx(t.r2r / (1 + t.r2r), abs=2e-6)
    if d <= 0:
        assert t.convexity == 1.0 and t.r2r is None
    if d >= width:
        assert t.convexity == 0.0
    # the same tile with one leg lacking a bid: no convexity, no r2r, no executable flags
    quotes["c1"] = q(bid=0.0, ask=0.05, mid=prices[1], quote_ts=NOW + 1, ts_ns=NOW + 1)
    u = compute_tile(spec, quotes, "e1", 5 * SEC)
    assert not u.tradable and u.convexity is None and u.r2r is None
    assert not {"below_bound", "above_bound"} & set(u.flags)
    assert u.debit == t.debit


@given(d1=st.floats(-10, 60), d2=st.floats(-10, 60), width=st.sampled_from([5.0, 50.0]))
def test_convexity_is_monotone_in_debit(d1: float, d2: float, width: float) -> None:
    spec = _spec("vertical", "C", [6000, 6000 + width], width)

    def conv(d: float) -> float:
        quotes = {"c0": two_sided(d), "c1": two_sided(0.0)}
        c = compute_tile(spec, quotes, "e", SEC).convexity
        assert c is not None
        return c

    if d1 <= d2:
        assert conv(d1) >= conv(d2)


def test_convexity_is_comparable_across_widths() -> None:
    """Same debit-to-width ratio -> same score whatever the width."""
    scores = []
    for w in (5.0, 50.0):
        spec = _spec("butterfly", "C", [6000 - w, 6000, 6000 + w], w)
        p = {"c0": 0.3 * w, "c1": 0.0, "c2": 0.0}
        quotes = {c: two_sided(v) for c, v in p.items()}
        scores.append(compute_tile(spec, quotes, "e", SEC).convexity)
    assert scores[0] == scores[1] == pytest.approx(0.7)


def test_singles_and_unpriced_tiles() -> None:
    put = _spec("single", "P", [6000], 0)
    t = compute_tile(put, {"c0": two_sided(20.0)}, "e", SEC)
    assert (t.debit, t.max_profit, t.max_loss, t.convexity) == (20.0, 5980.0, 20.0, None)
    assert t.r2r == pytest.approx(299.0) and t.tradable and t.debit_natural == 20.05
    t = compute_tile(put, {"c0": q(mid=20.0, quote_ts=NOW, ts_ns=NOW)}, "e", SEC)
    assert t.r2r is None and not t.tradable and t.debit_natural is None  # no bid/ask
    call = _spec("single", "C", [6000], 0)
    t = compute_tile(call, {"c0": q(last=12.5, trade_ts=NOW, ts_ns=NOW)}, "e", SEC)
    assert (t.debit, t.max_profit, t.r2r, t.px_src) == (12.5, None, None, "last")
    fly = _spec("butterfly", "C", [5990, 6000, 6010], 10)
    t = compute_tile(fly, {"c0": q(mid=1.0, quote_ts=NOW, ts_ns=NOW)}, "e", SEC)
    assert t.debit is None and t.convexity is None and t.flags == ["no_price"]
    assert t.px_src == "none" and not t.stale


def test_tile_codecs_round_trip() -> None:
    fly = _spec("butterfly", "C", [5990, 6000, 6010], 10)
    quotes = {f"c{i}": two_sided(p, src="ws") for i, p in enumerate((5, 3, 2))}
    t = compute_tile(fly, quotes, "e", SEC)
    seq, js = split_staged(stage_value(t))
    assert seq == t.seq and js == to_json(t) and decode_view(js) == view(t)
    v = view(t)
    assert [(leg.qty, leg.px, leg.src) for leg in v.legs] == [
        (1, 5.0, "mid"),
        (-2, 3.0, "mid"),
        (1, 2.0, "mid"),
    ]
    assert js.startswith(
        b'{"legs":[[1,5.0,"mid"],[-2,3.0,"mid"],[1,2.0,"mid"]],"debit":1.0,"debit_natural":1.2,'
    )
    assert b'"convexity":0.9,"tradable":true,' in js
    assert t.src == "ws" and t.debit == 1.0 and t.convexity == 0.9


_opt_px = st.one_of(st.none(), st.floats(-5, 300, allow_nan=False).map(lambda x: round(x, 2)))
_opt_ts = st.one_of(st.none(), st.integers(0, 120 * SEC).map(lambda x: NOW + x))


@st.composite
def leg_quote(draw: st.DrawFn) -> hm.LegQuote | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    bid, ask, last = draw(_opt_px), draw(_opt_px), draw(_opt_px)
    mid = draw(st.one_of(st.none(), st.just((bid + ask) / 2 if bid and ask else None)))
    qts, tts, rx = draw(_opt_ts), draw(_opt_ts), draw(_opt_ts)
    ts = max(qts or 0, tts or 0)
    return q(bid=bid, ask=ask, mid=mid, quote_ts=qts, last=last, trade_ts=tts, ts_ns=ts,
             src=draw(st.sampled_from(["ws", "chain"])), quote_rx=rx)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    strategy=st.sampled_from(hm.STRATEGIES),
    right=st.sampled_from("CP"),
    width=st.sampled_from([5.0, 25.0]),
    legs=st.lists(leg_quote(), min_size=3, max_size=3),
    max_age_s=st.sampled_from([1, 10, 60]),
)
def test_production_staged_value_equals_the_reference_tile(
    strategy: str, right: str, width: float, legs: list[hm.LegQuote | None], max_age_s: int
) -> None:
    """The builders' fast path (no intermediate records) is byte-equal to the reference
    compute_tile -> stage_value, whatever the leg values (missing, stale, trades only...)."""
    k = 6000.0
    if strategy == "single":
        strikes, qty = [k], [1]
    elif strategy == "vertical":  # built long leg first: calls K, K+w; puts K, K-w
        strikes, qty = ([k, k + width], [1, -1]) if right == "C" else ([k, k - width], [1, -1])
    else:
        strikes, qty = [k - width, k, k + width], [1, -2, 1]
    cids = [f"O:SPXW261201{right}{round(x * 1000):08d}" for x in strikes]
    spec = hm.TileSpec(
        "t", "SPX", "2026-12-01", strategy, right, tuple(sorted(strikes)), width,
        tuple(zip(cids, strikes, qty, strict=True)),
    )  # fmt: skip
    quotes = dict(zip(cids, legs, strict=False))
    ref = compute_tile(spec, quotes, "e", max_age_s * SEC)
    assert hm.staged_value(spec, quotes, max_age_s * SEC) == stage_value(ref)
    v = view(ref)
    assert [leg.qty for leg in v.legs] == [
        n for _, n in sorted(zip(strikes, qty, strict=True))
    ]  # published in strike order (the id's)


# --- reference rebuild vs an independent recomputation -----------------------------------
def independent(
    h: dict[str, dict[str, str]], legs: list[tuple[str, int]], max_age_ns: int
) -> tuple[float | None, bool]:
    """(debit, tradable) of a tile straight from the contract hashes (plain string dicts)."""

    def received(v: dict[str, str]) -> int:
        return max(int(v.get("quote_ts", "0")), int(v.get("quote_rx_ts", "0")))

    as_of = max(max(int(h[c].get("ts_ns", "0")), received(h[c])) for c, _ in legs)
    total = 0.0
    tradable = True
    for c, qty in legs:
        v = h[c]
        quoted = "bid" in v and "ask" in v
        fresh = quoted and as_of - received(v) <= max_age_ns
        if fresh:
            price = (float(v["bid"]) + float(v["ask"])) / 2
            tradable = tradable and 0 < float(v["bid"]) <= float(v["ask"])
        elif "last" in v and (not quoted or int(v["trade_ts"]) > received(v)):
            price, tradable = float(v["last"]), False
        elif quoted:
            price, tradable = (float(v["bid"]) + float(v["ask"])) / 2, False
        else:
            return None, False
        total += qty * price
    return total, tradable


def _tile_legs(
    strategy: str,
    exp: str,
    right: str,
    k: int,
    widths: tuple[int, ...],
    by_key: dict[tuple[str, str, float], str],
) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """(tile id, legs) of every tile of ``strategy`` centred (or based) on strike ``k``,
    written out independently of processors/heatmap."""
    if strategy == "single":
        yield f"SPX:{exp}:single:{k}:{right}", [(by_key[(exp, right, k)], 1)]
        return
    for w in widths:
        if strategy == "vertical":
            o = k + w if right == "C" else k - w
            if (exp, right, o) not in by_key:
                continue
            lo, hi = sorted((k, o))
            legs = [(by_key[(exp, right, k)], 1), (by_key[(exp, right, o)], -1)]
            yield f"SPX:{exp}:vertical:{lo}-{hi}:{right}", legs
        elif (exp, right, k - w) in by_key and (exp, right, k + w) in by_key:
            legs = [
                (by_key[(exp, right, k - w)], 1),
                (by_key[(exp, right, k)], -2),
                (by_key[(exp, right, k + w)], 1),
            ]
            yield f"SPX:{exp}:butterfly:{k - w}-{k}-{k + w}:{right}", legs


@pytest.mark.parametrize("strategy", hm.STRATEGIES)
async def test_reference_rebuild_equals_independent_recomputation(
    redis: Redis, strategy: str
) -> None:
    exps = ["2026-12-01", "2026-12-02"]
    strikes = [5950 + 5 * i for i in range(21)]
    chain = option_chain("SPXW", exps, strikes, spot=6000, asof="2026-11-24")
    await seed_epoch(redis, "e1", "SPX", chain, spot=6000)
    # newer trades on a third of the contracts: their quotes become stale (> 10 s older)
    pipe = redis.pipeline()
    for i, c in enumerate(chain):
        k = keys.epoch_contract("SPX", "e1", c.cid)
        if i % 3 == 0:
            ts = NOW + 20 * SEC + i
            pipe.hset(k, mapping={"last": 1.0 + i / 100, "trade_ts": ts, "ts_ns": ts, "src": "ws"})
        if i % 11 == 0:
            pipe.hdel(k, "bid", "ask", "mid", "last")
    await pipe.execute()
    cfg = TileSettings(widths_spx=(5, 10, 25), n_expiries=5, drop_expired=False)
    tiles = await reference_full_build(redis, "e1", "SPX", strategy, cfg, NOW)
    hashes: dict[str, dict[str, str]] = {}
    for c in chain:
        raw = await redis.hgetall(keys.epoch_contract("SPX", "e1", c.cid))
        hashes[c.cid] = {k.decode(): v.decode() for k, v in raw.items()}
    by_key = {(c.expiry, c.right, float(c.strike)): c.cid for c in chain}
    expected = {
        tid: independent(hashes, legs, 10 * SEC)
        for exp in exps
        for right in "CP"
        for k in strikes
        for tid, legs in _tile_legs(strategy, exp, right, k, (5, 10, 25), by_key)
    }
    assert set(tiles) == set(expected)
    n_priced = n_tradable = 0
    for tid, (d, tradable) in expected.items():
        t: Tile = tiles[tid]
        assert t.tradable == tradable, tid
        n_tradable += tradable
        if d is None:
            assert t.debit is None and "no_price" in t.flags, tid
        else:
            n_priced += 1
            assert t.debit == pytest.approx(d, abs=1e-5), tid
            if strategy != "single" and tradable:
                assert t.convexity == pytest.approx(min(1, max(0, 1 - d / t.width)), abs=1e-5)
            elif strategy != "single":
                assert t.convexity is None
    assert n_priced > len(expected) // 2
    # a third of the contracts traded 20 s after every quote: their neighbours' quotes are
    # stale for the tiles they share (every butterfly here has such a leg)
    assert n_tradable < len(expected)
    assert n_tradable > 0 or strategy == "butterfly"


_num_text = st.one_of(
    st.just(b""),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x).encode()),
    st.integers(0, 2**63).map(lambda x: str(x).encode()),
    st.sampled_from([b"x", b"1e400", b"-0.0", b" 5"]),
)


@given(
    parts=st.lists(_num_text, min_size=7, max_size=7),
    src=st.sampled_from([b"", b"ws", b"chain"]),
    rx=_num_text,
)
def test_fast_leg_parser_agrees_with_the_careful_one(
    parts: list[bytes], src: bytes, rx: bytes
) -> None:
    values: list[bytes | None] = [p or None for p in [*parts, src, rx]]
    expected = hm.LegQuote.from_values(values)
    if expected is None:  # the Lua fetch sends "" for a missing hash, never all-empty fields
        return
    assert hm.LegQuote.from_joined(b"|".join([*parts, src, rx])) == expected


@given(st.floats(-1e5, 1e5, allow_nan=False))
def test_r6_rounds_to_six_decimals_half_up_without_negative_zero(x: float) -> None:
    r = hm._r6(x)
    assert abs(r - x) <= 5e-7 + 1e-9 * abs(x)
    assert r == round(r, 6)  # at most 6 decimals: the JSON stays short
    assert math.copysign(1.0, r) == 1.0 or r < 0
    assert hm._r6(-1e-9) == 0.0 and math.copysign(1.0, hm._r6(-1e-9)) == 1.0
