"""chain-poller: periodic, filtered options-chain snapshots from Massive REST.

One cycle = index spot (``/v3/snapshot/indices?ticker.any_of=I:SPX,I:NDX``, index symbols
only), then for each symbol the chain ``/v3/snapshot/options/<underlying>`` (``I:SPX`` for an
index, ``SPY`` for a stock or ETF: schemas/symbols.py) filtered server-side by expiry horizon
(``expiration_date.gte/.lte``) and a strike band (``strike_price.gte/.lte``) centred on an
anchor that follows spot with hysteresis (processors/ingest/strike_band.py), ``limit=250``,
following ``next_url`` to the end, only on the configured base URL. The result is trimmed
client-side to the first N expirations, decoded once into a compact :class:`ChainSnapshot`
blob and written: ``SET massive:chain:snapshot:{<SYM>}:<ts> EX ttl``, then ONE MULTI with
``XADD massive:{chain}:stream`` (pointer) + ``XADD massive:{chain}:spot:stream`` (spot).

Spot of a stock or ETF: the chain's ``underlying_asset.price`` (the REST fallback of the
stocks WS feed that ws-ingest subscribes), with its ``last_updated`` as its time; its age
at each fetch is ``massive_chain_poller_spot_age_seconds{symbol}`` (a delayed stocks plan
shows here). The next fetch's strike band is centred on it.

Whole chain for GEX: a task next to the window's loop fetches each symbol's WHOLE chain
(every expiration and strike, only expired dates filtered out) every ``full_interval_s`` and
writes it the same way with ``ChainPointer.scope = "full"`` (blob TTL
``full_snapshot_ttl_s``); the normalizer turns it into the GEX source, never into an epoch,
so the heatmap keeps its narrow window. A failed whole-chain fetch is counted and tried again
at the next interval; it never delays or fails the window's cycles.

Cadence: the next cycle starts ``max(min_interval_s, k * last_cycle_duration)`` after the
previous one completed (never overlapping, never faster than responses complete); a
``refresh_chain`` ControlMessage on massive:{control}:stream (WS dormancy) wakes the loop at
once; several requests are coalesced into one fetch.

Errors: the REST client (processors/ingest/rest_client.py: requests, pagination, ``next_url``
checks, redaction) retries 429 (Retry-After honoured), 5xx, timeouts, connection errors and
undecodable bodies with exponential backoff and full jitter; 401/403 stop the cycle with
:class:`AuthError` ("check MASSIVE_API_KEY"), counted, and the loop waits ``auth_retry_s``
before trying again (no crash loop, no spin). A cycle in which every symbol failed, or that
failed inside (Redis down), delays the next one with the same backoff policy
(streams/retry.py, equal jitter).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from dataclasses import dataclass

import httpx
import msgspec

from processors.ingest import strike_band
from processors.ingest.rest_client import AuthError, FetchError, MassiveRest, RestConfig
from schemas import keys
from schemas import symbols as symbol_specs
from schemas.messages import (
    ChainContract,
    ChainPointer,
    ChainSnapshot,
    ControlMessage,
    SpotTick,
    encode_snapshot,
    entry,
    from_entry,
)
from streams import metrics
from streams.clock import NY
from streams.consumer import Entry, GroupConsumer
from streams.processor import Deps
from streams.retry import REDIS_UNAVAILABLE, Backoff, sleep_or_stop
from streams.runner import cancel_and_wait, task_group
from streams.settings import env_settings, fallback_env, from_env, stage_symbols
from streams.spec import StreamSpec

logger = logging.getLogger(__name__)


@env_settings("MASSIVE_POLLER_")
@dataclass(frozen=True, slots=True)
class PollerSettings:
    """Env prefix ``MASSIVE_POLLER_``; the key is also read from ``MASSIVE_API_KEY``."""

    api_key: str = fallback_env("MASSIVE_API_KEY", "")
    rest_url: str = "https://api.massive.com"
    auth_mode: str = "query"  # query (?apiKey=, the spec) | bearer (Authorization header)
    band_pct: float = 0.08  # strike band: anchor * (1 +- band_pct) ...
    band_points: float = 0.0  # ... or anchor +- band_points when > 0
    # the band's anchor follows spot with hysteresis (processors/ingest/strike_band.py)
    band_recenter_frac: float = 0.5
    band_force_frac: float = 0.75
    band_min_interval_s: float = 300.0
    expirations: int = 5  # keep 0DTE + the next (expirations - 1) expiries
    max_days: int = 14  # server-side horizon: expiration_date.lte = today + max_days
    limit: int = 250
    min_interval_s: float = 5.0
    latency_factor: float = 2.0  # k: next start >= k * last cycle duration after it ended
    refresh_min_gap_s: float = 0.25  # floor between an on-demand refresh and the last cycle
    timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    max_retries: int = 5
    backoff_base_s: float = 0.25
    backoff_max_s: float = 10.0
    retry_after_max_s: float = 60.0
    auth_retry_s: float = 60.0
    snapshot_ttl_s: int = 600
    full_interval_s: float = 30.0  # whole-chain fetch for GEX (0 = never)
    full_snapshot_ttl_s: int = 90  # its blob only has to outlive the normalizer's read
    chain_stream_maxlen: int = 10_000
    spot_stream_maxlen: int = 100_000
    control_block_ms: int = 1000
    max_pages: int = 400  # safety stop for a runaway cursor chain

    def __post_init__(self) -> None:
        if self.auth_mode not in ("query", "bearer"):
            raise ValueError(f"auth_mode must be query or bearer, got {self.auth_mode!r}")
        if not 1 <= self.limit <= 250:
            raise ValueError(f"limit must be 1..250 (the API maximum), got {self.limit}")
        if self.expirations < 1:
            raise ValueError("expirations must be >= 1")
        if self.min_interval_s <= 0 or self.latency_factor < 1:
            raise ValueError("min_interval_s must be > 0 and latency_factor >= 1")
        if self.full_interval_s < 0 or self.full_snapshot_ttl_s < 1:
            raise ValueError("full_interval_s must be >= 0 and full_snapshot_ttl_s >= 1")
        self.band_rule()  # raises on a bad band
        self.backoff()  # raises on a bad backoff

    def band_rule(self) -> strike_band.BandRule:
        return strike_band.BandRule(
            pct=self.band_pct,
            points=self.band_points,
            recenter_frac=self.band_recenter_frac,
            force_frac=self.band_force_frac,
            min_interval_s=self.band_min_interval_s,
        )

    def backoff(self) -> Backoff:
        """REST retries: full jitter (many clients of one provider spread out)."""
        return Backoff(base_s=self.backoff_base_s, cap_s=self.backoff_max_s, jitter="full")

    def rest_config(self) -> RestConfig:
        return RestConfig(
            rest_url=self.rest_url,
            api_key=self.api_key,
            auth_mode=self.auth_mode,
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_retries=self.max_retries,
            retry_after_max_s=self.retry_after_max_s,
            max_pages=self.max_pages,
            backoff=self.backoff(),
        )


@dataclass(slots=True)
class FetchResult:
    symbol: str
    contracts: list[ChainContract]
    spot: float | None
    spot_ts_ns: int | None
    pages: int
    rejected: int
    seconds: float
    scope: str = "window"  # window (the heatmap's filtered chain) | full (GEX)


class ChainPoller:
    name = "chain-poller"

    def __init__(
        self, deps: Deps, settings: PollerSettings, symbols: tuple[str, ...] | None = None
    ) -> None:
        self.deps = deps
        self.redis = deps.redis
        self.clock = deps.clock
        self.settings = settings
        self.symbols = symbols or deps.settings.symbols
        self.rest = MassiveRest(settings.rest_config(), deps.registry)
        # after an internal failure (Redis down): min_interval_s, doubling up to backoff_max_s
        self._internal_backoff = Backoff(
            base_s=min(settings.min_interval_s, settings.backoff_max_s),
            cap_s=settings.backoff_max_s,
            jitter="equal",
        )
        self._band = settings.band_rule()
        self._anchors: dict[str, strike_band.Anchor | None] = {}
        self._ready = False
        self._wake = asyncio.Event()
        self._pending_reason: str | None = None
        self._stop: asyncio.Event | None = None
        self._last_spot: dict[str, tuple[float, int | None]] = {}
        self.last_error: FetchError | None = None
        self.cycles = 0
        reg_sym = symbol_specs.registry()
        self.specs = {sym: reg_sym.spec(sym) for sym in self.symbols}
        reg = deps.registry
        p = "massive_chain_poller_"
        self.m_fetches = metrics.counter(
            reg, p + "fetches_total", "Chain fetches per symbol and outcome", ("symbol", "outcome")
        )
        self.m_fetch_s = metrics.histogram(
            reg,
            p + "fetch_seconds",
            "Time to fetch one symbol's filtered chain (all pages)",
            ("symbol",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.m_cycle_s = metrics.gauge(reg, p + "cycle_seconds", "Duration of the last cycle")
        self.m_interval = metrics.gauge(
            reg, p + "next_interval_seconds", "Adaptive delay before the next cycle"
        )
        self.m_errors = metrics.counter(reg, p + "errors_total", "Errors by kind", ("kind",))
        self.m_rejected = metrics.counter(
            reg, p + "rejected_items_total", "Chain items rejected, by reason", ("reason",)
        )
        self.m_contracts = metrics.gauge(
            reg, p + "contracts", "Contracts in the last snapshot", ("symbol",)
        )
        self.m_full_contracts = metrics.gauge(
            reg, p + "full_contracts", "Contracts in the last whole-chain snapshot", ("symbol",)
        )
        self.m_refresh = metrics.counter(
            reg, p + "refresh_requests_total", "refresh_chain control messages", ("reason",)
        )
        self.m_auth_failed = metrics.gauge(
            reg, p + "auth_failed", "1 while the provider rejects the API key (401/403)"
        )
        self.m_band = metrics.counter(
            reg,
            p + "band_decisions_total",
            "Strike-band anchor decisions per fetch (initial, kept, moved, forced, deferred)",
            ("symbol", "outcome"),
        )
        self.m_anchor = metrics.gauge(
            reg, p + "band_anchor", "Spot the strike band is centred on", ("symbol",)
        )
        self.m_spot_age = metrics.gauge(
            reg,
            p + "spot_age_seconds",
            "Age of the spot written with the last snapshot (provider time to our clock)",
            ("symbol", "source"),
        )

    @property
    def ready(self) -> bool:
        return self._ready

    # --- fetches --------------------------------------------------------------------------
    async def fetch_spots(self, client: httpx.AsyncClient) -> dict[str, tuple[float, int | None]]:
        """Index levels from the index snapshot (stocks take theirs from their chain)."""
        by_ticker = {sp.underlying: sym for sym, sp in self.specs.items() if sp.is_index}
        if not by_ticker:
            return {}
        page = await self.rest.index_snapshot(client, ",".join(by_ticker))
        for r in page.rejections:
            self.m_rejected.labels(r.reason).inc()
            logger.warning("chain-poller: index snapshot item rejected: %s", r.detail)
        out: dict[str, tuple[float, int | None]] = {}
        for sp in page.spots:
            sym = by_ticker.get(f"I:{sp.symbol}")
            if sym is not None:
                out[sym] = (sp.value, sp.ts_ns)
        return out

    def today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.clock.time_ns() / 1e9, NY).date()

    def band(self, spot: float) -> tuple[float, float]:
        """Strike band [lo, hi] centred on ``spot`` (rounded to 0.001: the filter we send)."""
        return self._band.bounds(spot)

    async def strike_band(self, symbol: str, spot: float | None) -> tuple[float, float] | None:
        """The band to fetch ``symbol`` with: centred on its anchor, which follows ``spot``
        with hysteresis and is persisted (processors/ingest/strike_band.py). None: no band (off,
        or neither a spot nor an anchor known yet)."""
        if not self._band.enabled:
            return None
        if symbol not in self._anchors:
            raw = await self.redis.hgetall(keys.chain_band(symbol))
            self._anchors[symbol] = strike_band.decode(raw)
        anchor = self._anchors[symbol]
        if spot is not None and math.isfinite(spot) and spot > 0:
            anchor, outcome = strike_band.decide(self._band, anchor, spot, self.clock.time_ns())
            self.m_band.labels(symbol, outcome).inc()
            if outcome in strike_band.MOVED:
                await self.redis.hset(
                    keys.chain_band(symbol),
                    mapping=strike_band.encode(anchor),  # type: ignore[arg-type]
                )
                self._anchors[symbol] = anchor
                lo, hi = self._band.bounds(anchor.spot)
                logger.info(
                    "chain-poller: %s strike band %s: centred on %.2f [%.3f, %.3f] (spot %.2f)",
                    symbol,
                    outcome,
                    anchor.spot,
                    lo,
                    hi,
                    spot,
                )
        if anchor is None:
            return None
        self.m_anchor.labels(symbol).set(anchor.spot)
        return self._band.bounds(anchor.spot)

    def chain_params(self, band: tuple[float, float] | None) -> dict[str, str]:
        today = self.today()
        params = {
            "expiration_date.gte": today.isoformat(),
            "expiration_date.lte": (today + dt.timedelta(days=self.settings.max_days)).isoformat(),
            "limit": str(self.settings.limit),
            "sort": "ticker",
            "order": "asc",
        }
        if band is not None:
            lo, hi = band
            params["strike_price.gte"] = f"{lo:.3f}"
            params["strike_price.lte"] = f"{hi:.3f}"
        return params

    def full_params(self) -> dict[str, str]:
        """The whole chain: every expiration from today, every strike."""
        return {
            "expiration_date.gte": self.today().isoformat(),
            "limit": str(self.settings.limit),
            "sort": "ticker",
            "order": "asc",
        }

    def spec(self, symbol: str) -> symbol_specs.SymbolSpec:
        sp = self.specs.get(symbol)
        if sp is None:
            sp = self.specs[symbol] = symbol_specs.registry().spec(symbol)
        return sp

    async def fetch_chain(
        self, client: httpx.AsyncClient, symbol: str, spot: float | None, scope: str = "window"
    ) -> FetchResult:
        """``spot``: the level the strike band follows (an index's snapshot level; for a
        stock, the previous chain's). A stock's result carries its chain's own
        ``underlying_asset.price``."""
        t0 = self.clock.monotonic()
        spec = self.spec(symbol)
        # the whole chain (GEX) has no strike band: it never moves the window's anchor
        band = None if scope == "full" else await self.strike_band(symbol, spot)
        params = self.full_params() if scope == "full" else self.chain_params(band)
        seen: dict[str, ChainContract] = {}
        pages = rejected = 0
        u_value: float | None = None
        u_ts: int | None = None
        async for page in self.rest.chain_pages(client, symbol, spec.underlying, params):
            pages += 1
            for r in page.rejections:
                rejected += 1
                self.m_rejected.labels(r.reason).inc()
                logger.debug("chain-poller: %s item rejected: %s", symbol, r.detail)
            for c in page.contracts:
                seen[c.cid] = c  # a cid repeated across pages is kept once
            if u_value is None and page.underlying_value is not None:
                u_value, u_ts = page.underlying_value, page.underlying_ts_ns
        if spot is None and band is None and scope != "full":
            band = await self.strike_band(symbol, u_value)
        if spot is None or (not spec.is_index and u_value is not None):
            # a stock, or no index snapshot: the chain's underlying_asset price/value
            spot = u_value
        else:
            u_ts = None  # the index snapshot's own time (fetch_symbol)
        if scope == "full":
            contracts = sorted(seen.values(), key=lambda c: (c.expiry, c.strike, c.right, c.cid))
        else:
            contracts = self._trim(list(seen.values()), band)
        return FetchResult(
            symbol, contracts, spot, u_ts, pages, rejected, self.clock.monotonic() - t0, scope
        )

    def _trim(
        self, contracts: list[ChainContract], band: tuple[float, float] | None
    ) -> list[ChainContract]:
        """Keep the first N expirations (from today) and the strike band (client side too:
        the server filter is the same, this guards a server that ignores it)."""
        today = self.today().isoformat()
        expiries = sorted({c.expiry for c in contracts if c.expiry >= today})
        keep = set(expiries[: self.settings.expirations])
        lo, hi = band if band is not None else (-math.inf, math.inf)
        out = [c for c in contracts if c.expiry in keep and lo <= c.strike <= hi]
        out.sort(key=lambda c: (c.expiry, c.strike, c.right, c.cid))
        return out

    # --- one cycle ------------------------------------------------------------------------
    async def cycle(self, client: httpx.AsyncClient, reason: str) -> list[FetchResult]:
        try:
            spots = await self.fetch_spots(client)
        except AuthError:
            raise
        except FetchError as exc:
            self.m_errors.labels(exc.kind).inc()
            logger.warning("chain-poller: index snapshot failed (%s); using last spots", exc)
            spots = {}
        for sym, v in spots.items():
            self._last_spot[sym] = v
        results: list[FetchResult] = []
        failed: FetchError | None = None
        for sym in self.symbols:
            res = await self.fetch_symbol(client, sym, spots, "window")
            if isinstance(res, FetchError):
                self.last_error = failed = res
                continue
            await self.write(res, reason)
            self.m_fetch_s.labels(sym).observe(res.seconds)
            self.m_contracts.labels(sym).set(len(res.contracts))
            results.append(res)
        if not results and failed is not None:
            raise failed  # every symbol failed: the loop backs off
        return results

    async def fetch_symbol(
        self,
        client: httpx.AsyncClient,
        sym: str,
        spots: dict[str, tuple[float, int | None]],
        scope: str,
    ) -> FetchResult | FetchError:
        """One symbol's chain with its accounting (``massive_chain_poller_fetches_total``
        outcome ok | error, prefixed ``full_`` for the whole chain): an AuthError propagates,
        a FetchError is counted, logged and returned."""
        spot = spots.get(sym) or self._last_spot.get(sym)
        prefix = "full_" if scope == "full" else ""
        try:
            res = await self.fetch_chain(client, sym, spot[0] if spot else None, scope)
        except AuthError:
            self.m_fetches.labels(sym, "auth").inc()
            raise
        except FetchError as exc:
            self.m_fetches.labels(sym, prefix + "error").inc()
            self.m_errors.labels(exc.kind).inc()
            logger.error("chain-poller: %s %s fetch failed: %s", sym, scope, exc)
            return exc
        if res.spot_ts_ns is None and spot is not None and res.spot == spot[0]:
            res.spot_ts_ns = spot[1]  # the index snapshot's own time, not the chain's
        if not self.spec(sym).is_index and res.spot is not None:
            self._last_spot[sym] = (res.spot, res.spot_ts_ns)  # the next band's centre
        self.m_fetches.labels(sym, prefix + "ok").inc()
        return res

    async def full_loop(self, stop: asyncio.Event) -> None:
        """The whole chain every ``full_interval_s``, next to (not inside) the window's
        cycles, so its ~90 pages never delay the heatmap's snapshots."""
        async with self.rest.client() as client:
            while not stop.is_set():
                t0 = self.clock.monotonic()
                delay = self.settings.full_interval_s
                try:
                    await self.full_cycle(client, dict(self._last_spot), "cadence")
                except AuthError as exc:  # counted by the window's loop as well
                    logger.error("chain-poller: whole chain: %s", exc)
                    delay = max(delay, self.settings.auth_retry_s)
                except REDIS_UNAVAILABLE as exc:
                    self.m_errors.labels("redis").inc()
                    logger.warning("chain-poller: whole chain not written, redis: %s", exc)
                except Exception:  # never take the window's loop down with it
                    self.m_errors.labels("internal").inc()
                    logger.exception("chain-poller: whole-chain cycle failed")
                took = self.clock.monotonic() - t0
                if await sleep_or_stop(stop, max(0.0, delay - took)):
                    return

    async def full_cycle(
        self,
        client: httpx.AsyncClient,
        spots: dict[str, tuple[float, int | None]],
        reason: str,
    ) -> list[FetchResult]:
        """The whole chain of every symbol, for GEX (see the module doc)."""
        out: list[FetchResult] = []
        for sym in self.symbols:
            res = await self.fetch_symbol(client, sym, spots, "full")
            if isinstance(res, FetchError):
                continue
            await self.write(res, reason)
            self.m_full_contracts.labels(sym).set(len(res.contracts))
            out.append(res)
        return out

    async def write(self, res: FetchResult, reason: str) -> None:
        ts = self.clock.time_ns()
        key = keys.chain_snapshot(res.symbol, ts, res.scope)
        ttl = (
            self.settings.full_snapshot_ttl_s
            if res.scope == "full"
            else self.settings.snapshot_ttl_s
        )
        snap = ChainSnapshot(
            symbol=res.symbol,
            ts_ns=ts,
            spot=res.spot,
            contracts=res.contracts,
            spot_ts_ns=res.spot_ts_ns,
        )
        ptr = ChainPointer(
            symbol=res.symbol,
            snapshot_key=key,
            ts_ns=ts,
            n_contracts=len(res.contracts),
            spot=res.spot,
            fetch_s=round(res.seconds, 6),
            reason=reason,
            scope=res.scope,
        )
        # The blob first, alone (its {SYM} slot), then pointer and spot tick in one MULTI
        # (the {chain} slot): a pointer never names a blob not yet written; a crash between
        # leaves an unnamed blob that expires.
        await self.redis.set(key, encode_snapshot(snap), ex=ttl)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            keys.CHAIN_STREAM,
            entry(ptr),  # type: ignore[arg-type]
            maxlen=self.settings.chain_stream_maxlen,
            approximate=True,
        )
        if res.spot is not None:
            src = "index_snapshot" if self.spec(res.symbol).is_index else "underlying_asset"
            if res.spot_ts_ns is not None:
                self.m_spot_age.labels(res.symbol, src).set(max(0.0, (ts - res.spot_ts_ns) / 1e9))
            tick = SpotTick(
                symbol=res.symbol,
                value=res.spot,
                ts_ns=res.spot_ts_ns if res.spot_ts_ns is not None else ts,
                source="rest",
            )
            pipe.xadd(
                keys.SPOT_STREAM,
                entry(tick),  # type: ignore[arg-type]
                maxlen=self.settings.spot_stream_maxlen,
                approximate=True,
            )
        await pipe.execute()
        logger.info(
            "chain-poller: %s %s snapshot %d contracts, %d pages, %.3fs, spot=%s (%s)",
            res.symbol,
            res.scope,
            len(res.contracts),
            res.pages,
            res.seconds,
            res.spot,
            reason,
        )

    # --- control stream -------------------------------------------------------------------
    async def on_control(self, entries: list[Entry]) -> None:
        for _id, fields in entries:
            try:
                msg = from_entry(fields, ControlMessage)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.m_errors.labels("control_decode").inc()
                logger.warning("chain-poller: bad control message: %s", exc)
                continue
            if msg.kind != "refresh_chain":
                continue
            self.m_refresh.labels(msg.reason or "unspecified").inc()
            self.request_refresh(msg.reason)

    def request_refresh(self, reason: str = "") -> None:
        """Wake the loop now; several requests before the fetch starts coalesce."""
        if self._pending_reason is None:
            self._pending_reason = "dormancy" if reason == "ws_dormant" else "refresh"
        self._wake.set()

    # --- main loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = self.rest.stop = stop
        spec = StreamSpec(
            stream=keys.CONTROL_STREAM,
            group=keys.CHAIN_POLLER_CONTROL_GROUP,
            consumer=self.deps.settings.consumer,
            block_ms=self.settings.control_block_ms,
            start_id="$",
        )
        control = GroupConsumer(
            self.redis, spec, self.on_control, self.deps.registry, self.name, self.deps.heartbeats
        )
        # the control consumer and the whole-chain loop next to the window's cycles, in one
        # TaskGroup: a crashed helper stops the cycles and is raised (as itself)
        async with task_group() as tg:
            helpers = [tg.create_task(control.run(stop), name="chain-poller-control")]
            if self.settings.full_interval_s > 0:
                helpers.append(tg.create_task(self.full_loop(stop), name="chain-poller-full"))
            try:
                await self._cycles(stop)
            finally:
                # a helper that survives Redis errors can swallow one cancellation (a dead
                # socket): sent again until every helper ended, so an outage that ends the
                # cycles lets run_resilient re-enter instead of waiting here
                await cancel_and_wait(helpers)

    async def _cycles(self, stop: asyncio.Event) -> None:
        """The window's cycles until ``stop``, each after the delay the last one asks for."""
        reason = "startup"
        failures = 0
        async with self.rest.client() as client:
            while not stop.is_set():
                self._wake.clear()
                self._pending_reason = None
                t0 = self.clock.monotonic()
                delay: float
                try:
                    await self.cycle(client, reason)
                    self.m_auth_failed.set(0)
                    failures = 0
                    self._ready = True
                    self.cycles += 1
                    took = self.clock.monotonic() - t0
                    delay = max(self.settings.min_interval_s, self.settings.latency_factor * took)
                except AuthError as exc:
                    self.last_error = exc
                    self.m_errors.labels("auth").inc()
                    self.m_auth_failed.set(1)
                    logger.error(
                        "chain-poller: %s; retrying in %.0fs", exc, self.settings.auth_retry_s
                    )
                    took = self.clock.monotonic() - t0
                    delay = self.settings.auth_retry_s
                except FetchError as exc:  # every symbol failed (already counted)
                    self.last_error = exc
                    failures += 1
                    took = self.clock.monotonic() - t0
                    delay = self._failed_cycle_backoff(took).delay_s(min(failures, 6))
                except Exception as exc:  # Redis down etc.: log, back off, keep going
                    self.m_errors.labels("internal").inc()
                    logger.exception("chain-poller: cycle failed: %r", exc)
                    failures += 1
                    took = self.clock.monotonic() - t0
                    delay = self._internal_backoff.delay_s(failures - 1)
                self.m_cycle_s.set(took)
                self.m_interval.set(delay)
                reason = await self._wait_next(stop, delay)

    def _failed_cycle_backoff(self, took: float) -> Backoff:
        """After a cycle in which every symbol failed: the cadence delay, doubled per
        consecutive failed cycle, up to six times ``backoff_max_s``."""
        cap_s = self.settings.backoff_max_s * 6
        cadence = max(self.settings.min_interval_s, self.settings.latency_factor * took)
        return Backoff(base_s=min(cadence, cap_s), cap_s=cap_s, jitter="equal")

    async def _wait_next(self, stop: asyncio.Event, delay: float) -> str:
        """Wait ``delay`` (or until a refresh request / stop). Returns the next reason."""
        stop_w = asyncio.ensure_future(stop.wait())
        wake_w = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stop_w, wake_w}, timeout=delay, return_when="FIRST_COMPLETED")
        finally:
            stop_w.cancel()
            wake_w.cancel()
        if self._wake.is_set() and not stop.is_set():
            # never closer than refresh_min_gap_s to the end of the previous cycle
            await sleep_or_stop(self._stop, self.settings.refresh_min_gap_s)
            return self._pending_reason or "refresh"
        return "cadence"


def build(deps: Deps, arg: str | None) -> ChainPoller:
    """``chain-poller`` or ``chain-poller:SPX`` (the argument overrides MASSIVE_SYMBOLS)."""
    return ChainPoller(deps, from_env(PollerSettings), stage_symbols(deps.settings, arg))
