"""A stand-in for the publishers (heatmap + GEX) that writes models and diffs to Redis the
way the contract in notes/COMMON.md says: model key and diff entry in one atomic step, the
model carrying its diff's entry id. Tile values come from the real tile math
(processors.heatmap.grid) over Black-Scholes prices of a small synthetic chain, GEX items from
processors.gex.exposure, so the dashboard shows realistic shapes.

Used by tests/test_sse_gateway.py, tests/test_browser.py and bench/sse_load.py.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from typing import Any

import msgspec
from redis.asyncio import Redis

from processors import lua
from processors.gex import exposure as gex_math
from processors.heatmap import grid as heatmap
from schemas import keys, ticker
from schemas.messages import GexRow, ModelDiff, PublishedModel, encode, encode_model_pieces
from streams.clock import NY
from tests.heatmap_reference import compute_tile

# KEYS[1] model key, KEYS[2] diff stream; ARGV[1] model JSON up to `"diff_id":`,
# ARGV[2] diff entry JSON, ARGV[3] MAXLEN. Returns the diff entry id.
PUBLISH_LUA = """
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[2])
redis.call('SET', KEYS[1], ARGV[1] .. '"' .. id .. '"}')
return id
"""

_json = msgspec.json.Encoder()


class ModelWriter:
    """Keeps the items of published models and publishes versioned diffs atomically."""

    def __init__(self, redis: Redis, maxlen: int = 100_000, items_per_piece: int = 1024) -> None:
        self.redis = redis
        self.maxlen = maxlen
        # heatmap models are written marked, in pieces of this many items, as the publisher
        # writes its checkpoints (GEX models unmarked, as its publisher does)
        self.items_per_piece = items_per_piece
        self.models: dict[tuple[str, str], PublishedModel] = {}
        self._script = lua.Script("sse_publisher", PUBLISH_LUA)

    @staticmethod
    def keys_of(symbol: str, kind: str) -> tuple[str, str]:
        if kind == "gex":
            return keys.gex_model(symbol), keys.gex_diffs_stream(symbol)
        strategy = kind.split(":", 1)[1]
        return keys.heatmap_model(symbol, strategy), keys.heatmap_diffs_stream(strategy, symbol)

    async def publish(
        self,
        symbol: str,
        kind: str,
        epoch: str,
        changed: dict[str, Any],
        removed: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        ts_ns: int = 0,
        version: int | None = None,
        snapshot: bool = False,
    ) -> str:
        """Apply and publish one diff; returns its entry id. ``version`` overrides the next
        version number (tests use it to create a gap); ``snapshot``: a snapshot version, whose
        diff carries no items (the model key has them: ModelDiff.snapshot)."""
        removed = removed or []
        old = self.models.get((symbol, kind))
        if old is None or old.epoch != epoch:
            items: dict[str, Any] = {}
            prev = old.version if old is not None and old.epoch == epoch else 0
        else:
            items = dict(old.items)
            prev = old.version
        items.update(changed)
        for k in removed:
            items.pop(k, None)
        v = prev + 1 if version is None else version
        m = meta if meta is not None else (old.meta if old is not None else {})
        diff = ModelDiff(
            symbol=symbol,
            kind=kind,
            epoch=epoch,
            version=v,
            prev_version=v - 1,
            ts_ns=ts_ns,
            changed={} if snapshot else changed,
            removed=[] if snapshot else removed,
            meta=m,
            snapshot=snapshot,
        )
        model = PublishedModel(symbol, kind, epoch, v, ts_ns, items, m, None)
        body = b"".join(encode_model_pieces(model, self.items_per_piece, marked=kind != "gex"))
        assert body.endswith(b"null}")
        key, stream = self.keys_of(symbol, kind)
        raw_id = await self._script(
            self.redis, [key, stream], [body[:-5], encode(diff), self.maxlen]
        )
        diff_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        self.models[(symbol, kind)] = PublishedModel(
            symbol, kind, epoch, v, ts_ns, items, m, diff_id
        )
        return diff_id


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def bs_price(spot: float, strike: float, t: float, vol: float, right: str) -> float:
    if t <= 0 or vol <= 0:
        return max(0.0, spot - strike) if right == "C" else max(0.0, strike - spot)
    sd = vol * math.sqrt(t)
    d1 = (math.log(spot / strike) + 0.5 * sd * sd) / sd
    d2 = d1 - sd
    call = spot * _norm_cdf(d1) - strike * _norm_cdf(d2)
    return call if right == "C" else call - spot + strike


def bs_gamma(spot: float, strike: float, t: float, vol: float) -> float:
    sd = vol * math.sqrt(max(t, 1e-6))
    d1 = (math.log(spot / strike) + 0.5 * sd * sd) / sd
    return math.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi) / (spot * sd)


class FakeMarket:
    """A small SPX-like chain: a random-walking spot, a volatility smile, a few expiries."""

    def __init__(
        self,
        symbol: str = "SPX",
        spot: float = 6850.0,
        n_strikes: int = 20,
        step: float = 5.0,
        widths: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0),
        n_expiries: int = 2,
        epoch: str = "fake-epoch-1",
        today: dt.date | None = None,
        seed: int = 7,
    ) -> None:
        self.symbol = symbol
        self.spot = spot
        self.epoch = epoch
        self.rng = random.Random(seed)
        self.today = today or dt.date.today()
        self.expiries = [self.today + dt.timedelta(days=d) for d in range(n_expiries)]
        self.root = symbol + "W" if symbol == "SPX" else symbol
        mid = round(spot / step) * step
        self.strikes = [mid + step * (i - n_strikes // 2) for i in range(n_strikes + 1)]
        self.widths = widths
        self.cids: list[str] = []
        self.meta: dict[str, tuple[float, str, float]] = {}  # cid -> strike, right, t years
        self.oi: dict[str, float] = {}
        for i, e in enumerate(self.expiries):
            t = (i + 1.3) / 365.0
            for k in self.strikes:
                for right in ("C", "P"):
                    cid = ticker.encode(self.root, e, right, k)
                    self.cids.append(cid)
                    self.meta[cid] = (k, right, t)
                    self.oi[cid] = float(self.rng.randint(200, 9000))
        self.grids = {
            s: heatmap.build_grid(
                symbol,
                s,
                self.cids,
                widths,
                today=self.today,
                n_expiries=n_expiries,
            )
            for s in heatmap.STRATEGIES
        }
        self.ts_ns = 1_764_000_000_000_000_000
        self.quotes: dict[str, heatmap.LegQuote | None] = {}
        self._reprice(self.cids)

    def vol(self, strike: float) -> float:
        m = math.log(strike / self.spot)
        return 0.14 + 0.9 * m * m - 0.25 * m

    def _reprice(self, cids: list[str]) -> None:
        self.ts_ns += 1_000_000
        for cid in cids:
            k, right, t = self.meta[cid]
            mid = bs_price(self.spot, k, t, self.vol(k), right)
            half = min(mid, max(0.05, mid * 0.01))
            bid, ask = mid - half, mid + half
            self.quotes[cid] = heatmap.LegQuote(
                bid, ask, mid, self.ts_ns, None, None, self.ts_ns, "ws"
            )

    def tiles(self, strategy: str, cids: list[str] | None = None) -> dict[str, Any]:
        grid = self.grids[strategy]
        specs = grid.specs if cids is None else grid.affected(cids)
        out: dict[str, Any] = {}
        for tid, spec in specs.items():
            tile = compute_tile(spec, self.quotes, self.epoch, 10**12)
            out[tid] = msgspec.to_builtins(tile)
        return out

    def step(self, n_contracts: int = 6) -> list[str]:
        """Move spot and re-quote ``n_contracts`` contracts around a random strike."""
        self.spot *= math.exp(self.rng.gauss(0.0, 0.00005))
        i = self.rng.randrange(len(self.cids))
        chosen = self.cids[max(0, i - n_contracts // 2) : i + n_contracts // 2 + 1]
        self._reprice(chosen)
        return chosen

    def gex(self) -> tuple[dict[str, Any], dict[str, Any]]:
        rows = []
        for cid in self.cids:
            k, right, t = self.meta[cid]
            e = ticker.parse(cid).expiry.isoformat()
            g = bs_gamma(self.spot, k, t, self.vol(k))
            rows.append(GexRow(self.root, e, k, right, g, self.oi[cid], self.vol(k), self.ts_ns))
        now = int(dt.datetime.combine(self.today, dt.time(15, 0), tzinfo=NY).timestamp() * 1e9)
        chain = gex_math.prepare(rows, now)
        res = gex_math.compute(chain, self.spot)
        meta = {
            "spot": round(self.spot, 2),
            "levels": {"all": res.levels.as_dict(), "0dte": res.levels_0dte.as_dict()},
            "totals": res.totals(),
        }
        return res.items(), meta


async def publish_full(writer: ModelWriter, market: FakeMarket, ts_ns: int) -> None:
    for s in heatmap.STRATEGIES:
        await writer.publish(
            market.symbol,
            f"heatmap:{s}",
            market.epoch,
            market.tiles(s),
            meta={"strategy": s, "n_tiles": len(market.grids[s].specs)},
            ts_ns=ts_ns,
        )
    items, meta = market.gex()
    await writer.publish(market.symbol, "gex", market.epoch, items, meta=meta, ts_ns=ts_ns)


async def publish_step(
    writer: ModelWriter, market: FakeMarket, ts_ns: int, gex: bool = True
) -> None:
    cids = market.step()
    for s in heatmap.STRATEGIES:
        changed = market.tiles(s, cids)
        await writer.publish(
            market.symbol,
            f"heatmap:{s}",
            market.epoch,
            changed,
            meta={"strategy": s, "n_tiles": len(market.grids[s].specs)},
            ts_ns=ts_ns,
        )
    if gex:
        items, meta = market.gex()
        old = writer.models.get((market.symbol, "gex"))
        prev = old.items if old is not None else {}
        changed = {k: v for k, v in items.items() if prev.get(k) != v}
        removed = [k for k in prev if k not in items]
        await writer.publish(
            market.symbol, "gex", market.epoch, changed, removed, meta=meta, ts_ns=ts_ns
        )
