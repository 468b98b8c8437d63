"""Test factories: small chains and hand-seeded epochs following the documented key layout
(DESIGN.md + schemas/keys.py). Production code builds epochs in processors/epochs/normalizer.py;
these let model tests arrange exact contract values without running the normalizer."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from schemas import keys, ticker
from schemas.messages import ChainContract, ChainSnapshot, GexRow


def contract(
    root: str, expiry: str, right: str, strike: float, **values: float | int | None
) -> ChainContract:
    cid = ticker.encode(root, dt.date.fromisoformat(expiry), right, strike)
    return ChainContract(cid=cid, expiry=expiry, strike=strike, right=right, **values)  # type: ignore[arg-type]


async def seed_epoch(
    redis: Redis,
    eid: str,
    symbol: str,
    contracts: list[ChainContract],
    *,
    spot: float,
    state: str = "active",
    now_ns: int = 1_764_000_000_000_000_000,
) -> None:
    """Write an epoch's contract hashes, planes, GEX projection and meta; activate it."""
    pipe = redis.pipeline(transaction=True)
    for c in contracts:
        t = ticker.parse(c.cid)
        h: dict[str, str] = {
            "symbol": symbol,
            "root": t.root,
            "expiry": c.expiry,
            "strike": repr(c.strike),
            "type": c.right,
            "src": "chain",
        }
        if c.bid is not None and c.ask is not None:
            h.update(bid=repr(c.bid), ask=repr(c.ask), mid=repr((c.bid + c.ask) / 2))
            h["quote_ts"] = str(c.quote_ts_ns or now_ns)
            h["quote_rx_ts"] = str(now_ns)  # received with the snapshot (as the normalizer)
        if c.last is not None:
            h.update(last=repr(c.last), size=repr(c.last_size or 1))
            h["trade_ts"] = str(c.trade_ts_ns or now_ns)
        ts = max(int(h.get("quote_ts", 0)), int(h.get("trade_ts", 0)))
        if ts:
            h["ts_ns"] = str(ts)
        for name in ("iv", "delta", "gamma", "oi"):
            v = getattr(c, name)
            if v is not None:
                h[name] = repr(v)
        pipe.hset(keys.epoch_contract(symbol, eid, c.cid), mapping=h)  # type: ignore[arg-type]
        pipe.sadd(keys.epoch_contracts(symbol, eid), c.cid)
        pipe.zadd(keys.epoch_by_strike(symbol, eid), {c.cid: c.strike})
        pipe.zadd(keys.epoch_by_expiry(symbol, eid), {c.cid: int(c.expiry.replace("-", ""))})
        row = GexRow(t.root, c.expiry, c.strike, c.right, c.gamma, c.oi, c.iv, now_ns)
        pipe.hset(keys.epoch_gex(symbol, eid), c.cid, _json(row))
    expiries = sorted({c.expiry for c in contracts})
    pipe.hset(
        keys.epoch_meta(symbol, eid),
        mapping={
            "symbol": symbol,
            "state": state,
            "created_ns": now_ns,
            "promoted_ns": now_ns,
            "n_contracts": len(contracts),
            "expiries": ",".join(expiries),
            "spot": repr(spot),
            "snapshot_ts_ns": now_ns,
        },
    )
    if state == "active":
        pipe.set(keys.epoch_active(symbol), eid)
    pipe.hset(keys.SPOT_LATEST, mapping={symbol: repr(spot), f"{symbol}:ts_ns": now_ns})
    await pipe.execute()


def queue_ws_quotes(
    pipe: Pipeline, symbol: str, eid: str, cids: Iterable[str], rng: random.Random, ts_ns: int
) -> int:
    """Queue on ``pipe`` what the hydrator writes for a newer WS quote of each contract (a
    random mid, 1 ms apart from ``ts_ns`` on); returns the last timestamp."""
    for cid in cids:
        ts_ns += 1_000_000
        mid = round(rng.uniform(0.5, 80), 2)
        pipe.hset(
            keys.epoch_contract(symbol, eid, cid),
            mapping={
                "bid": mid - 0.05,
                "ask": mid + 0.05,
                "mid": mid,
                "quote_ts": ts_ns,
                "ts_ns": ts_ns,
                "src": "ws",
            },
        )
    return ts_ns


def _json(row: GexRow) -> bytes:
    import msgspec

    return msgspec.json.encode(row)


def _bs(spot: float, strike: float, t_years: float, vol: float, right: str) -> float:
    """Black-Scholes price (r = 0), enough to give test chains realistic, convex prices."""
    import math

    if t_years <= 0:
        return max(spot - strike, 0.0) if right == "C" else max(strike - spot, 0.0)
    sd = vol * math.sqrt(t_years)
    d1 = (math.log(spot / strike) + sd * sd / 2) / sd
    d2 = d1 - sd

    def n(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    if right == "C":
        return spot * n(d1) - strike * n(d2)
    return strike * n(-d2) - spot * n(-d1)


def option_chain(
    root: str,
    expiries: list[str],
    strikes: list[float],
    *,
    spot: float,
    asof: str,
    vol: float = 0.2,
    rights: tuple[str, ...] = ("C", "P"),
    quote_ts_ns: int = 1_764_000_000_000_000_000,
    trade_ts_ns: int | None = None,
) -> list[ChainContract]:
    """A full grid of contracts (every expiry x strike x right) priced with Black-Scholes
    (bid/ask on a 0.05 tick around the model price, last = model price). Used by the heatmap
    tests and bench/heatmap_incremental.py (e.g. 20 expiries x 500 strikes x 2 = 20,000)."""
    base = dt.date.fromisoformat(asof)
    out: list[ChainContract] = []
    for exp in expiries:
        t = max((dt.date.fromisoformat(exp) - base).days, 0) / 365 + 1 / 365 / 4
        for k in strikes:
            for right in rights:
                px = _bs(spot, k, t, vol, right)
                half = max(0.05, round(px * 0.01 / 0.05) * 0.05)
                bid = max(0.0, round((px - half) / 0.05) * 0.05)
                ask = round((px + half) / 0.05) * 0.05
                out.append(
                    contract(
                        root,
                        exp,
                        right,
                        k,
                        bid=round(bid, 2),
                        ask=round(ask, 2),
                        last=round(px, 2),
                        last_size=1,
                        quote_ts_ns=quote_ts_ns,
                        trade_ts_ns=trade_ts_ns or quote_ts_ns - 1_000_000_000,
                    )
                )
    return out


def big_chain(
    symbol: str = "SPX",
    n_contracts: int = 20_000,
    *,
    spot: float = 6000.0,
    ts_ns: int = 1_764_000_000_000_000_000,
    n_expiries: int = 20,
    first_expiry: str = "2026-12-01",
    step: float = 5.0,
    seed: int = 7,
) -> ChainSnapshot:
    """A realistic chain of ``n_contracts``: ``n_expiries`` expiries (SPXW dailies, SPX on
    the third-Friday-like first one), calls and puts on a ``step`` grid around spot, with
    quotes, trades, iv/greeks/oi drawn from a seeded generator (deterministic)."""
    import random

    rng = random.Random(seed)
    per_side = n_contracts // (2 * n_expiries)
    if per_side < 1:
        raise ValueError("n_contracts too small for n_expiries")
    d0 = dt.date.fromisoformat(first_expiry)
    roots = {"SPX": ("SPX", "SPXW"), "NDX": ("NDX", "NDXP")}[symbol]
    lo = spot - step * (per_side // 2)
    out: list[ChainContract] = []
    for e in range(n_expiries):
        exp = (d0 + dt.timedelta(days=e)).isoformat()
        root = roots[0] if e == 0 else roots[1]
        for k in range(per_side):
            strike = lo + k * step
            for right in ("C", "P"):
                intrinsic = max(0.0, spot - strike) if right == "C" else max(0.0, strike - spot)
                mid = round(intrinsic + rng.uniform(0.05, 30.0), 2)
                half = round(rng.uniform(0.05, 1.0), 2)
                out.append(
                    contract(
                        root,
                        exp,
                        right,
                        strike,
                        bid=max(0.0, round(mid - half, 2)),
                        ask=round(mid + half, 2),
                        last=mid,
                        last_size=float(rng.randint(1, 50)),
                        quote_ts_ns=ts_ns - rng.randint(0, 10**9),
                        trade_ts_ns=ts_ns - rng.randint(0, 10**10),
                        iv=round(rng.uniform(0.08, 0.6), 4),
                        delta=round(rng.uniform(-1, 1), 4),
                        gamma=round(rng.uniform(0, 0.01), 6),
                        oi=float(rng.randint(0, 20_000)),
                    )
                )
    return ChainSnapshot(symbol=symbol, ts_ns=ts_ns, spot=spot, contracts=out)
