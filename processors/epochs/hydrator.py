"""Hydrator: raw WS frames -> contract values of the active epoch (DESIGN invariants 1, 4, 7).

Reads ``massive:{ws}:stream`` (group ``hydrator``); entries carry ``recv_ts_ns`` and ``payload``
(the provider's frame). Per batch:

1. Decode every frame with ``schemas.massive.decode_frame``; rejected frames/events are counted
   by reason and logged, the good events of the same frame still apply.
2. Conflate: only the newest event per contract per kind (quote / trade) goes on (equal
   timestamps keep the first in stream order, which is what sequential admission keeps);
   index ``V`` events are conflated per index, and so are the stock ``T``/``Q`` events of the
   stock and ETF underlyings (``sym`` without ``O:``, of a symbol that runs or is
   configured): a trade's price or a two-sided quote's mid is that symbol's spot, admitted
   like an index level.
3. Resolve: the cid IS the event's ``sym``; the derived local cache maps cid -> symbol for the
   topology SET of each symbol's active epoch (``schemas.ticker.parse(cid).symbol``). A cid
   outside the active topology is a counted ``geometry_miss`` and never creates a hash.
4. ONE round trip: a GET of every configured symbol's ``massive:epoch:active:{<SYM>}`` (the
   cheap once-per-batch epoch check) followed by one ``EVALSHA lua/hydrate.lua`` per active
   epoch touched (its meta and the contract hash of every event in KEYS, one ``{<SYM>}``
   slot; normally one or two calls) with the events packed as two msgpack arguments, and
   the spot admission script for ``V`` events. The Lua script enforces admission A/B/C per
   kind and refuses to write unless the epoch's meta state is ``active`` (promotion flips it
   in the same MULTI as the active pointer), so nothing is ever written into a retired or
   half-built epoch. If the epoch changed, the cache is refreshed (SMEMBERS of the new
   topology) and the affected events are resolved and applied again.
   Steps 1-4 run per sub-batch (``sub_batch`` entries), in stream order, on one held
   connection (on a cluster, one per node the request touches: ``streams/link.py``):
   sub-batch k's request is flushed to the socket before sub-batch k+1 is decoded, so Redis
   runs k's Lua while this process decodes k+1 (see ``handle``). The
   script's fast path relies on every writer keeping ``ts_ns = max(quote_ts, trade_ts)``
   (normalizer build, ``seed.lua``, ``hydrate.lua``): see ``lua/hydrate.lua``.
5. XADD ``DirtyEntry{symbol, epoch, cids, max_ts_ns, recv_ts_ns}`` for the contracts changed
   on the symbol's ``massive:contracts:dirty:{<SYM>}`` (events are routed by symbol here),
   then return (the runtime acks in its next round trip).

Crash safety (invariant 7), chosen design: the Lua script reports, besides the events it
applied, every event whose exact values and timestamp are already stored (so it was applied
by an earlier delivery of the same entry). If the process dies after the Lua write and before
the dirty XADD, the entries stay pending, are redelivered (own-PEL drain at restart, or
reclaimed by another replica), and the redelivered batch re-emits their dirty notifications.
Having the script XADD the dirty entry itself would also be atomic (the symbol's dirty
stream shares the epoch's slot now), but the crash-safe redelivery above already covers it.
Side effect: a duplicated WS event (same ts, same values) re-notifies its contract; that is
harmless (recompute of an unchanged tile) and never loses a notification.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from processors import lua
from processors.epochs.topology import ActiveTopology
from schemas import keys, symbols, ticker
from schemas.massive import Event, IndexValue, Quote, Trade, decode_frame
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, DirtyEntry, entry
from streams import metrics
from streams.consumer import Entry
from streams.link import Link
from streams.processor import ConsumerProcessor, Deps
from streams.producer import Fields, xadd_pipe
from streams.redis_client import as_str
from streams.settings import env_settings, from_env

logger = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
_MAX = sys.maxsize
_packer = msgspec.msgpack.Encoder()
_FMT_CACHE_MAX = 1 << 16  # formatted prices remembered (cleared when full)


@env_settings("MASSIVE_HYDRATOR_")
@dataclass(frozen=True, slots=True)
class HydratorSettings:
    """Env prefix ``MASSIVE_HYDRATOR_``."""

    dirty_chunk: int = 500  # cids per DirtyEntry
    count: int = 0  # XREADGROUP COUNT override (0: RuntimeSettings.count)
    max_attempts: int = 3  # re-resolutions after an epoch change within one batch
    sub_batch: int = 100  # stream entries per Lua call (pipelined against decoding)

    def __post_init__(self) -> None:
        if self.dirty_chunk < 1 or self.count < 0 or self.max_attempts < 1 or self.sub_batch < 1:
            raise ValueError(
                "dirty_chunk >= 1, count >= 0, max_attempts >= 1 and sub_batch >= 1 required"
            )


def _label(symbol: str | None) -> str:
    return symbols.registry().label(symbol)  # bounded by configuration


def _symbol_of(cid: str) -> str | None:
    try:
        return ticker.parse(cid).symbol
    except ticker.TickerError:
        return None


def _stock_value(ev: Quote | Trade) -> IndexValue | None:
    """A stock event as a spot: a trade's price, a two-sided quote's mid."""
    if isinstance(ev, Trade):
        return IndexValue(val=ev.p, ticker=ev.sym, t=ev.t) if ev.p > 0 else None
    if ev.bp > 0 and ev.ap >= ev.bp:
        return IndexValue(val=round((ev.bp + ev.ap) / 2, 6), ticker=ev.sym, t=ev.t)
    return None


@dataclass(slots=True)
class _Dirty:
    recv: dict[str, int]  # cid -> earliest receive time behind its change (insertion order)
    max_ts_ms: int


def _merge(acc: dict[tuple[str, str], _Dirty], new: dict[tuple[str, str], _Dirty]) -> None:
    for key, d in new.items():
        cur = acc.get(key)
        if cur is None:
            acc[key] = d
            continue
        for cid, r in d.recv.items():
            if r < cur.recv.get(cid, _MAX):
                cur.recv[cid] = r
        cur.max_ts_ms = max(cur.max_ts_ms, d.max_ts_ms)


@dataclass(slots=True)
class _Routed:
    version: int  # of the epoch cache this routing used
    groups: dict[str, tuple[list[Quote], list[Trade]]]
    order: list[str]
    eids: list[str]
    blobs: list[tuple[bytes, bytes]]
    misses_q: list[Quote]
    misses_t: list[Trade]


_Ev = TypeVar("_Ev", Quote, Trade, IndexValue)


def _keep_newest(newest: dict[str, _Ev], key: str, ev: _Ev) -> None:
    """Conflation: an equal timestamp keeps the first in stream order."""
    old = newest.get(key)
    if old is None or ev.t > old.t:
        newest[key] = ev


def _book_applied(
    qs: list[Quote],
    ts: list[Trade],
    applied: Sequence[int],
    recv: dict[str, int],
    got: dict[str, int],
    max_ts: int,
) -> tuple[int, int]:
    """Record in ``got`` the contracts of the ``applied`` event indices (quote indices first,
    ascending, then trades) with their earliest receive time; returns the number of quotes
    among them and the newest event time (at least ``max_ts``)."""
    nq = len(qs)
    n_q = 0
    for i in applied:
        ev: Quote | Trade
        if i < nq:
            ev = qs[i]
            n_q += 1
        else:
            ev = ts[i - nq]
        got[ev.sym] = recv.get(ev.sym, _MAX)
        max_ts = max(max_ts, ev.t)
    return n_q, max_ts


@dataclass(slots=True)
class _Batch:
    quotes: dict[str, Quote]
    trades: dict[str, Trade]
    spots: dict[str, IndexValue]
    recv: dict[str, int]  # cid -> min receive time of the frames carrying its events


class Hydrator(ConsumerProcessor):
    name = "hydrator"

    def __init__(self, deps: Deps, cfg: HydratorSettings | None = None) -> None:
        self.settings = cfg or HydratorSettings()
        overrides: dict[str, object] = {"count": self.settings.count} if self.settings.count else {}
        super().__init__(deps, keys.WS_STREAM, keys.HYDRATOR_GROUP, **overrides)
        self.maxlen = deps.settings.stream_maxlen
        self._hydrate = lua.get("hydrate")
        self._spot = lua.get("spot")
        # Every request starts with one GET per symbol's active pointer (one slot each).
        self.symbols = deps.settings.symbols
        self._pointer_reads = [("GET", keys.epoch_active(s)) for s in self.symbols]
        # Derived local cache (invariant 2): active epoch per symbol and its frozen topology.
        self.topology = ActiveTopology(self.redis)
        self._active = self.topology.active
        self._cid_sym = self.topology.by_cid
        self._fmt: dict[float, str] = {}  # price -> repr(price)
        reg = deps.registry
        self.m_events = metrics.counter(
            reg, "massive_hydrator_events_total", "WS events decoded, by kind", ("kind",)
        )
        self.m_rejected = metrics.counter(
            reg,
            "massive_hydrator_rejected_total",
            "WS entries/frames/events rejected, by reason",
            ("reason",),
        )
        self.m_miss = metrics.counter(
            reg,
            "massive_hydrator_geometry_miss_total",
            "WS events for contracts outside the active epoch topology",
            ("symbol",),
        )
        self.m_applied = metrics.counter(
            reg,
            "massive_hydrator_applied_total",
            "Conflated events applied (or found already applied), by kind",
            ("kind",),
        )
        self.m_discarded = metrics.counter(
            reg,
            "massive_hydrator_discarded_total",
            "Conflated events discarded by admission (not newer than the stored event)",
        )
        self.m_conflated = metrics.counter(
            reg,
            "massive_hydrator_conflated_total",
            "Events superseded within their batch by a newer one of the same contract/kind",
        )
        self.m_dirty = metrics.counter(
            reg, "massive_hydrator_dirty_cids_total", "Contract ids notified as dirty"
        )
        self.m_refresh = metrics.counter(
            reg,
            "massive_hydrator_epoch_refresh_total",
            "Local epoch cache refreshes (active epoch changed)",
            ("symbol",),
        )

    # --- decode + conflate -----------------------------------------------------------------
    def _collect(self, entries: list[Entry]) -> _Batch:
        b = _Batch({}, {}, {}, {})
        n = dict.fromkeys(("quote", "trade", "index", "stock", "stock_bad", "other"), 0)
        for eid, fields in entries:
            try:
                recv = int(fields[WS_RECV_FIELD])
                payload = fields[WS_PAYLOAD_FIELD]
            except (KeyError, ValueError) as exc:
                self.m_rejected.labels(reason="bad_entry").inc()
                logger.warning("ws entry %r without valid recv_ts_ns/payload: %r", eid, exc)
                continue
            fr = decode_frame(payload)
            for err in fr.errors:
                reason = "bad_frame" if err.startswith("frame") else "bad_event"
                self.m_rejected.labels(reason=reason).inc()
                logger.warning("ws entry %r rejected (%s): %s", eid, reason, err)
            self._conflate(fr.events, recv, b, n)
        for kind in ("quote", "trade", "index", "stock", "other"):
            self.m_events.labels(kind=kind).inc(n[kind])
        n_spot = n["index"] + n["stock"] - n["stock_bad"]
        self.m_conflated.inc(
            n["quote"] + n["trade"] + n_spot - len(b.quotes) - len(b.trades) - len(b.spots)
        )
        return b

    def _conflate(self, events: list[Event], recv: int, b: _Batch, n: dict[str, int]) -> None:
        """Keep each event of one frame (received at ``recv``) in ``b`` if it is the newest
        of its kind and contract, counted by kind in ``n``; an option contract's earliest
        receive time goes to ``b.recv``. (``type(ev) is``: the hot path, no isinstance.)"""
        quotes, trades, recv_of = b.quotes, b.trades, b.recv
        n_q = n_t = 0
        for ev in events:
            cls = type(ev)
            if cls is Quote or cls is Trade:
                sym: str = ev.sym  # type: ignore[union-attr]
                if not sym.startswith("O:") and self._is_stock(sym):
                    # a stock/ETF underlying from /stocks: its spot (anything else without
                    # O: goes on as an option event and is a geometry miss)
                    self._stock_spot(ev, b, n)  # type: ignore[arg-type]
                    continue
                if cls is Quote:
                    n_q += 1
                    q = quotes.get(sym)
                    if q is None or ev.t > q.t:  # type: ignore[union-attr]
                        quotes[sym] = ev  # type: ignore[assignment]
                else:
                    n_t += 1
                    t = trades.get(sym)
                    if t is None or ev.t > t.t:  # type: ignore[union-attr]
                        trades[sym] = ev  # type: ignore[assignment]
                if recv < recv_of.get(sym, _MAX):
                    recv_of[sym] = recv
            elif cls is IndexValue:
                n["index"] += 1
                iv: IndexValue = ev  # type: ignore[assignment]
                _keep_newest(b.spots, iv.ticker, iv)
            else:
                n["other"] += 1
        n["quote"] += n_q
        n["trade"] += n_t

    def _stock_spot(self, ev: Quote | Trade, b: _Batch, n: dict[str, int]) -> None:
        n["stock"] += 1
        sv = _stock_value(ev)
        if sv is None:
            n["stock_bad"] += 1
            self.m_rejected.labels(reason="stock_no_price").inc()
        else:
            _keep_newest(b.spots, sv.ticker, sv)

    def _is_stock(self, sym: str) -> bool:
        """A stock or ETF ticker of a symbol that runs (an active epoch) or is configured /
        has a spec: a feed's garbage never becomes a spot."""
        known = symbols.registry()
        name = known.symbol_of_underlying(sym)
        if name not in self._active and known.label(name) == "other":
            return False
        try:
            return not known.spec(name).is_index
        except symbols.SymbolSpecError:  # not a ticker
            return False

    # --- local epoch cache -----------------------------------------------------------------
    async def _refresh(self, active: dict[str, str]) -> set[str]:
        """Bring the cache to ``active``; returns the symbols whose epoch changed."""
        changed = await self.topology.sync(active)
        for s in changed & active.keys():
            self.m_refresh.labels(symbol=_label(s)).inc()
            n = len(self.topology.cids[s])
            logger.info("active epoch %s=%s (%d contracts) cached", s, active[s], n)
        return changed

    # --- the batch -------------------------------------------------------------------------
    async def handle(self, entries: list[Entry]) -> None:
        """Sub-batches are applied strictly in stream order, one request in flight on one
        held connection. The request of sub-batch k is written to the socket and flushed
        BEFORE this process decodes sub-batch k+1, so Redis runs the Lua of k while Python
        decodes k+1 (the two CPUs overlap). When k's replies come back clean (every epoch
        still active, the active pointer equal to the cache k+1 was routed with), k+1 is
        sent before k's replies are booked, so Redis does not wait for that either;
        otherwise k is settled first (re-resolution, retries) and k+1 routed again if the
        cache moved. The first sub-batches are smaller, so Redis starts early. The dirty
        entries of the whole batch are emitted once, at the end."""
        acc: dict[tuple[str, str], _Dirty] = {}
        async with Link(self.redis, lua.load_all) as link:
            sent: tuple[_Batch, _Routed] | None = None
            for chunk in self._chunks(entries):
                b = self._collect(chunk)
                routed = self._route(list(b.quotes.values()), list(b.trades.values()))
                todo = bool(b.quotes or b.trades or b.spots)
                if sent is not None:
                    res = await link.recv()
                    if (
                        todo
                        and self._clean(sent[1], res)
                        and routed.version == self.topology.version
                    ):
                        await link.send(self._commands(routed, list(b.spots.values())))
                        _merge(acc, await self._settle(link, *sent, res))  # makes no call
                        sent = (b, routed)
                        continue
                    _merge(acc, await self._settle(link, *sent, res))
                    sent = None
                if todo:
                    if routed.version != self.topology.version:  # the cache moved while settling
                        routed = self._route(list(b.quotes.values()), list(b.trades.values()))
                    await link.send(self._commands(routed, list(b.spots.values())))
                    sent = (b, routed)
            if sent is not None:
                _merge(acc, await self._settle(link, *sent, await link.recv()))
        dirty = self._dirty_entries(acc)
        if dirty:
            await self._emit_dirty(dirty)

    def _chunks(self, entries: list[Entry]) -> Iterator[list[Entry]]:
        """Sub-batches of ``sub_batch`` entries, the first two a quarter and a half of that."""
        step = self.settings.sub_batch
        start = 0
        for size in (max(1, step // 4), max(1, step // 2)):
            if start < len(entries):
                yield entries[start : start + size]
                start += size
        for off in range(start, len(entries), step):
            yield entries[off : off + step]

    def _clean(self, rt: _Routed, res: list[Any]) -> bool:
        """``res`` (replies of ``rt``) needs no re-resolution: every epoch was active and the
        active pointer equals the cache. Settling it then makes no Redis call."""
        n = len(self.symbols)
        return all(int(r[0]) == lua.EpochWrite.APPLIED for r in res[n : n + len(rt.order)]) and (
            self._pointers(res) == self._active
        )

    def _dirty_entries(self, acc: dict[tuple[str, str], _Dirty]) -> list[DirtyEntry]:
        out: list[DirtyEntry] = []
        step = self.settings.dirty_chunk
        for (s, eid), d in acc.items():
            cids = list(d.recv)
            for off in range(0, len(cids), step):
                part = cids[off : off + step]
                out.append(
                    DirtyEntry(
                        symbol=s,
                        epoch=eid,
                        cids=part,
                        max_ts_ns=d.max_ts_ms * NS_PER_MS,
                        recv_ts_ns=min(d.recv[c] for c in part),
                        reason="ws",
                    )
                )
        return out

    def _route(self, pend_q: list[Quote], pend_t: list[Trade]) -> _Routed:
        """Group events by the symbol of their cid in the cached topologies and pack them:
        per symbol, flat msgpack arrays of strings (see lua/hydrate.lua), built in the same
        pass. Prices are formatted with ``repr`` through a cache (prices sit on a tick
        grid; a dict hit costs a quarter of a ``repr``)."""
        groups: dict[str, tuple[list[Quote], list[Trade]]] = {}
        flats: dict[str, tuple[list[str], list[str]]] = {}
        misses_q: list[Quote] = []
        misses_t: list[Trade] = []
        cid_sym = self._cid_sym
        fmt = self._fmt.get
        miss = self._fmt_miss
        for q in pend_q:
            s = cid_sym.get(q.sym)
            if s is None:
                misses_q.append(q)
                continue
            g = groups.get(s)
            if g is None:
                g = groups[s] = ([], [])
                flats[s] = ([], [])
            g[0].append(q)
            bp = q.bp
            ap = q.ap
            mid = (bp + ap) / 2
            flats[s][0].extend(
                (
                    q.sym,
                    str(q.t * NS_PER_MS),
                    fmt(bp) or miss(bp),
                    fmt(ap) or miss(ap),
                    fmt(mid) or miss(mid),
                )
            )
        for t in pend_t:
            s = cid_sym.get(t.sym)
            if s is None:
                misses_t.append(t)
                continue
            g = groups.get(s)
            if g is None:
                g = groups[s] = ([], [])
                flats[s] = ([], [])
            g[1].append(t)
            p = t.p
            flats[s][1].extend((t.sym, str(t.t * NS_PER_MS), fmt(p) or miss(p), str(t.s)))
        order = list(groups)
        enc = _packer.encode
        return _Routed(
            version=self.topology.version,
            groups=groups,
            order=order,
            eids=[self._active[s] for s in order],
            blobs=[(enc(flats[s][0]), enc(flats[s][1])) for s in order],
            misses_q=misses_q,
            misses_t=misses_t,
        )

    def _pointers(self, res: list[Any]) -> dict[str, str]:
        """symbol -> active epoch id from the replies of ``_pointer_reads`` (first in ``res``)."""
        return {s: as_str(v) for s, v in zip(self.symbols, res, strict=False) if v is not None}

    def _fmt_miss(self, x: float) -> str:
        """``repr(x)``, remembered (never for zero: -0.0 == 0.0 but they print apart)."""
        r = repr(x)
        if x:
            if len(self._fmt) >= _FMT_CACHE_MAX:
                self._fmt.clear()
            self._fmt[x] = r
        return r

    async def _settle(
        self, link: Link, b: _Batch, routed: _Routed, res: list[Any]
    ) -> dict[tuple[str, str], _Dirty]:
        """Book the replies ``res`` of ``routed`` and finish the sub-batch:
        events of an epoch found inactive, and geometry misses after a cache refresh, are
        re-resolved and applied again (synchronously, so stream order holds). Returns, per
        (symbol, epoch), the contracts to notify (with their earliest receive time) and the
        newest event time behind them."""
        # (symbol, eid) -> cid changed -> its earliest receive time; max event time
        changed: dict[tuple[str, str], dict[str, int]] = {}
        recv = b.recv
        max_ts: dict[tuple[str, str], int] = {}
        applied_q = applied_t = sent = hash_missing = 0
        rt = routed
        pend_q: list[Quote] = []
        pend_t: list[Trade] = []
        for attempt in range(self.settings.max_attempts):
            if attempt:
                rt = self._route(pend_q, pend_t)
                res = await link.call(self._commands(rt, []))
            groups, order, eids = rt.groups, rt.order, rt.eids
            misses_q, misses_t = rt.misses_q, rt.misses_t
            active = self._pointers(res)
            n = len(self.symbols)
            pend_q, pend_t = [], []
            stale: set[str] = set()
            for s, eid, r in zip(order, eids, res[n : n + len(order)], strict=True):
                qs, ts = groups[s]
                if int(r[0]) == lua.EpochWrite.NOT_ACTIVE:
                    stale.add(s)
                    pend_q += qs
                    pend_t += ts
                    continue
                sent += len(qs) + len(ts)
                hash_missing += int(r[1])
                if int(r[1]):
                    # Topology SET and contract hashes disagree (should not happen).
                    logger.error("epoch %s: %d events hit missing contract hashes", eid, r[1])
                    self.m_miss.labels(symbol=_label(s)).inc(int(r[1]))
                key = (s, eid)
                n_q, max_ts[key] = _book_applied(
                    qs, ts, r[2:], recv, changed.setdefault(key, {}), max_ts.get(key, 0)
                )
                applied_q += n_q
                applied_t += len(r) - 2 - n_q
            if stale and active == self._active:
                # The epoch was retired after our read: read the pointers again.
                active = self._pointers(await link.call(self._pointer_reads))
            await self._refresh(active)
            if rt.version != self.topology.version and (misses_q or misses_t):
                # Resolved against an older cache: a new epoch may know these contracts.
                pend_q += misses_q
                pend_t += misses_t
                misses_q, misses_t = [], []
            if not (pend_q or pend_t):
                break
        else:
            if pend_q or pend_t:
                raise RuntimeError("active epoch kept changing during one batch; will retry")
        self.m_applied.labels(kind="quote").inc(applied_q)
        self.m_applied.labels(kind="trade").inc(applied_t)
        self.m_discarded.inc(sent - applied_q - applied_t - hash_missing)
        self._count_misses([m.sym for m in misses_q] + [m.sym for m in misses_t])
        return {key: _Dirty(got, max_ts[key]) for key, got in changed.items() if got}

    def _commands(self, rt: _Routed, spots: list[IndexValue]) -> list[tuple[Any, ...]]:
        """The active pointers, one hydrate call per epoch (its meta and the contract hash
        of every event in KEYS), the spot script."""
        cmds: list[tuple[Any, ...]] = list(self._pointer_reads)
        sha = self._hydrate.sha
        for s, eid, (qb, tb) in zip(rt.order, rt.eids, rt.blobs, strict=True):
            qs, ts = rt.groups[s]
            p = keys.epoch_contract_prefix(s, eid)
            names = [keys.epoch_meta(s, eid), *[p + q.sym for q in qs], *[p + t.sym for t in ts]]
            cmds.append(("EVALSHA", sha, len(names), *names, qb, tb))
        if spots:
            args: list[str] = []
            known = symbols.registry()
            for v in spots:
                sym = known.symbol_of_underlying(v.ticker)
                args += (sym, repr(v.val), str(v.t * NS_PER_MS))
            cmds.append(("EVALSHA", self._spot.sha, 1, keys.SPOT_LATEST, *args))
        return cmds

    def _count_misses(self, cids: Iterable[str]) -> None:
        per: dict[str, int] = {}
        n = 0
        for cid in cids:
            lbl = _label(_symbol_of(cid))
            per[lbl] = per.get(lbl, 0) + 1
            n += 1
        for lbl, k in per.items():
            self.m_miss.labels(symbol=lbl).inc(k)
        if n:
            logger.debug("geometry_miss: %d events outside the active topologies", n)

    async def _emit_dirty(self, dirty: list[DirtyEntry]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for d in dirty:
            xadd_pipe(pipe, keys.contracts_dirty_stream(d.symbol), _fields(d), maxlen=self.maxlen)
            n += len(d.cids)
        await pipe.execute()
        self.m_dirty.inc(n)


def _hash(reply: Any) -> dict[str, str]:
    """A raw HGETALL reply (RESP2 flat list or RESP3 map) as a str dict."""
    if isinstance(reply, dict):
        return {as_str(k): as_str(v) for k, v in reply.items()}
    return {as_str(k): as_str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


def _fields(msg: DirtyEntry) -> Fields:
    return {k: v for k, v in entry(msg).items()}


def build(deps: Deps, arg: str | None) -> Hydrator:
    return Hydrator(deps, from_env(HydratorSettings))
