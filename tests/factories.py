"""Test factories: small chains and hand-seeded epochs following the documented key layout
(DESIGN.md + schemas/keys.py). Production code builds epochs in processors/normalizer.py;
these let model tests arrange exact contract values without running the normalizer."""

from __future__ import annotations

import datetime as dt

from redis.asyncio import Redis

from schemas import keys, ticker
from schemas.messages import ChainContract, GexRow


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
        pipe.hset(keys.epoch_contract(eid, c.cid), mapping=h)  # type: ignore[arg-type]
        pipe.sadd(keys.epoch_contracts(eid), c.cid)
        pipe.zadd(keys.epoch_by_strike(eid), {c.cid: c.strike})
        pipe.zadd(keys.epoch_by_expiry(eid), {c.cid: int(c.expiry.replace("-", ""))})
        row = GexRow(t.root, c.expiry, c.strike, c.right, c.gamma, c.oi, c.iv, now_ns)
        pipe.hset(keys.epoch_gex(eid), c.cid, _json(row))
    expiries = sorted({c.expiry for c in contracts})
    pipe.hset(
        keys.epoch_meta(eid),
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
        pipe.hset(keys.EPOCH_ACTIVE, symbol, eid)
    pipe.hset(keys.SPOT_LATEST, mapping={symbol: repr(spot), f"{symbol}:ts_ns": now_ns})
    await pipe.execute()


def _json(row: GexRow) -> bytes:
    import msgspec

    return msgspec.json.encode(row)
