"""GEX by strike for one expiry date: ``/sse/gex?symbol=&expiry=YYYY-MM-DD`` and
``/api/gex?symbol=&expiry=YYYY-MM-DD`` for any expiry the GEX model lists.

The GEX model's items are per strike for all expiries and for 0DTE only. The per-expiry,
per-strike exposures are in the ``:calls`` and ``:puts`` keys (``{version, epoch,
expirations: {expiry: {strike: shares}}}``, shares >= 0), written by the same publish script
as the model and its diff (processors/gex/calculator.py), so one MULTI read of the three
gives a consistent version. A view of one date has items ``{strike, calls, puts, net,
calls_usd, puts_usd, net_usd}`` with the model's signs and units (puts <= 0, net = calls +
puts, $ per 1 % move = shares x dollar_spot^2 x 0.01), at the model's version and with its
``diff_id``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from schemas import keys


class _Head(msgspec.Struct):
    symbol: str
    epoch: str
    version: int
    ts_ns: int = 0
    meta: msgspec.Raw = msgspec.Raw(b"{}")
    diff_id: str | None = None


class _MetaHead(msgspec.Struct):
    dollar_spot: float | None = None
    spot: float | None = None
    expiries: list[str] = []
    today: str | None = None


class _Side(msgspec.Struct):
    version: int
    epoch: str = ""
    expirations: dict[str, dict[str, float]] = {}


_head = msgspec.json.Decoder(_Head)
_meta = msgspec.json.Decoder(_MetaHead)
_side = msgspec.json.Decoder(_Side)
_encoder = msgspec.json.Encoder()


class GexExpiries(msgspec.Struct):
    """The GEX model's head and its per-expiry exposures at one version."""

    symbol: str
    epoch: str
    version: int
    ts_ns: int
    diff_id: str | None
    meta: msgspec.Raw
    dollar_factor: float
    calls: dict[str, dict[str, float]]
    puts: dict[str, dict[str, float]]

    def items(self, expiry: str) -> dict[str, dict[str, float]]:
        """Items of one expiry, keyed by strike as the model keys them."""
        c, p = self.calls.get(expiry, {}), self.puts.get(expiry, {})
        f = self.dollar_factor
        out: dict[str, dict[str, float]] = {}
        for k in sorted(c.keys() | p.keys(), key=float):
            cv, pv = c.get(k, 0.0), -p.get(k, 0.0)
            net = round(cv + pv, 6)
            out[k] = {
                "strike": float(k),
                "calls": cv,
                "puts": pv,
                "net": net,
                "calls_usd": round(cv * f, 2),
                "puts_usd": round(pv * f, 2),
                "net_usd": round(net * f, 2),
            }
        return out

    def model_json(self, expiry: str) -> bytes:
        """The view as a PublishedModel JSON (the ``/api`` form)."""
        body: dict[str, Any] = {
            "symbol": self.symbol,
            "kind": "gex",
            "epoch": self.epoch,
            "version": self.version,
            "ts_ns": self.ts_ns,
            "items": self.items(expiry),
            "meta": self.meta,
            "diff_id": self.diff_id,
            "view": {"expiry": expiry},
        }
        return _encoder.encode(body)


def listed(raw_model: bytes) -> tuple[list[str], str | None]:
    """(expiries, today) of a stored GEX model."""
    m = _meta.decode(_head.decode(raw_model).meta)
    return m.expiries, m.today


async def read(redis: Redis, symbol: str) -> GexExpiries | None:
    """The model's head and per-expiry exposures at the same version; None when there is no
    model yet, or a side key is missing or at another version (undecodable: ValueError)."""
    pipe = redis.pipeline(transaction=True)
    pipe.get(keys.gex_model(symbol))
    pipe.get(keys.gex_model_calls(symbol))
    pipe.get(keys.gex_model_puts(symbol))
    raw, raw_calls, raw_puts = await pipe.execute()
    if raw is None or raw_calls is None or raw_puts is None:
        return None
    try:
        head = _head.decode(raw)
        meta = _meta.decode(head.meta)
        calls, puts = _side.decode(raw_calls), _side.decode(raw_puts)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"undecodable GEX model of {symbol}: {exc}") from None
    if calls.version != head.version or puts.version != head.version:
        return None
    ds = meta.dollar_spot if meta.dollar_spot is not None else meta.spot
    return GexExpiries(
        symbol,
        head.epoch,
        head.version,
        head.ts_ns,
        head.diff_id,
        msgspec.Raw(bytes(head.meta)),
        (ds or 0.0) ** 2 * 0.01,
        calls.expirations,
        puts.expirations,
    )
