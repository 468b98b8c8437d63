"""Tile builder (``massive-pipeline run tile-builder:<strategy>``): keeps the staging tiles of
one strategy (single | vertical | butterfly) up to date from ``massive:contracts:dirty:{<SYM>}``
of every configured symbol (one group reader per symbol stream; batches handled one at a time).

Each strategy is an independent consumer group (``keys.tile_builder_group``) so the three
builders scale and lag independently; replicas of one strategy share the group. Every key and
stream of one symbol's batch (epoch keys, staging, manifest, tile stream) shares the symbol's
``{<SYM>}`` slot.

Per batch of DirtyEntry (hot path, a fixed number of round trips whatever the batch size):
  1. one pipeline: the active epoch of each symbol + the epoch the staging hash holds;
  2. entries of a non-active epoch are skipped (counted); a symbol whose active epoch is not
     installed in staging (new epoch, DirtyEntry reason "epoch", or a replica that lost the
     race) gets a FULL build: every tile of the epoch computed into a temporary hash, then
     one Lua script renames it onto the staging hash and rewrites the manifest (atomic
     replacement: readers see the old epoch's tiles or the new one's, never a mix; tiles of
     the old epoch disappear with it). An older epoch never replaces a newer one
     (manifest created_ns);
  3. otherwise the tiles using the dirty contracts (the epoch's grid as arrays,
     ``tile_vec.TileTable``: frozen topology -> tile rows and cid -> rows) are recomputed
     (``incremental``): WATCH staging + manifest, Lua calls read every leg hash (HMGET of
     LEG_FIELDS per key, one pipelined round trip), the batch's tile values are computed
     vectorised, then ONE MULTI/EXEC writes them as plain HSETs with the TileDelta XADD on
     ``massive:tiles:<strategy>:{<SYM>}`` (a batch touching more than ``build_chunk`` tiles
     goes in parts, a transaction and a delta each, to bound its memory). Only when staging
     was written between the WATCH and the EXEC (a replica, an install) do the values go
     through the admission script instead:
     strictly greater ``seq`` (sum of the legs' quote_ts + trade_ts + quote_rx_ts) admitted,
     equal = same inputs (discarded), older refused; rejected wholesale when the batch's epoch
     is not the staged one; then a separate XADD.
On the admission path the delta lists the ids admitted OR found equal (an equal tile may be a
redelivery whose first delta was lost in a crash: re-announcing it is harmless, the publisher
compares values); tiles refused as older are left to the replica that wrote the newer value.
On the optimistic path, a builder that was the sole writer since its last batch lists only the
tiles whose published view changed (see ``incremental``).

The tile math (formulas, convexity score, staleness) is in processors/heatmap/grid.py; its batch
form, byte-equal, in processors/heatmap/tile_vec.py.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from processors import lua
from processors.epochs.topology import ActiveTopology, read_topology
from processors.heatmap import grid as hm
from processors.heatmap import tile_vec as tv
from schemas import keys, symbols
from schemas.heatmap import TileDelta
from schemas.messages import DirtyEntry, entry, from_entry
from streams import metrics, producer
from streams.consumer import Entry
from streams.memory import fix_mmap_threshold, release_freed_memory
from streams.processor import ConsumerProcessor, Deps
from streams.redis_client import as_str
from streams.settings import env_settings, from_env

logger = logging.getLogger(__name__)


@env_settings("MASSIVE_TILES_")
@dataclass(frozen=True)
class TileSettings:
    """Env prefix ``MASSIVE_TILES_`` (e.g. MASSIVE_TILES_WIDTHS_SPX=5,10,15).

    Widths per symbol: ``widths_spx`` / ``widths_ndx`` for SPX / NDX, else the symbol's spec
    (schemas/symbols.py, ``MASSIVE_SYMBOL_SPECS``), else ``widths_other`` when set, else
    derived from the listed strike spacing (``symbols.derive_widths``)."""

    widths_spx: tuple[float, ...] = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)
    widths_ndx: tuple[float, ...] = (25, 50, 75, 100, 125, 150, 175, 200)
    widths_other: tuple[float, ...] = ()
    n_expiries: int = 5  # expirations per symbol: 0DTE (when listed) first, then the next ones
    drop_expired: bool = True  # ignore expiries before today (America/New_York)
    max_quote_age_ms: int = 10_000  # quote mid used when as_of - quote_ts <= this
    # Per script call (pipelined): a script blocks Redis for everyone while it runs, so the
    # chunks bound that (a 5,000-tile staging call ran up to ~90 ms under load).
    fetch_chunk: int = 500  # contract hashes per Lua read call
    write_chunk: int = 1000  # tiles per staging write call
    # Tiles computed and written per step of a full build (and the most an incremental batch
    # writes at once): a whole 49k-tile epoch's values and write commands at once peaked at
    # 288 MB RSS, 135 MB in steps of 4,096 (bench/tile_build_rss.py).
    build_chunk: int = 4096
    tiles_maxlen: int = 100_000  # MAXLEN ~ of massive:tiles:<strategy>
    bootstrap: bool = True  # at start, full-build any active epoch not installed in staging

    def __post_init__(self) -> None:
        for name in ("widths_spx", "widths_ndx", "widths_other"):
            if any(w <= 0 for w in getattr(self, name)):
                raise ValueError(f"{name} must be positive")
        if min(self.n_expiries, self.fetch_chunk, self.write_chunk, self.build_chunk) < 1:
            raise ValueError("n_expiries, fetch_chunk, write_chunk and build_chunk must be >= 1")

    def widths(self, symbol: str) -> tuple[float, ...]:
        """() = derive from the listed strike spacing (heatmap.build_grid)."""
        if symbol == "SPX":
            return self.widths_spx
        if symbol == "NDX":
            return self.widths_ndx
        return symbols.registry().spec(symbol).widths or self.widths_other

    @property
    def max_quote_age_ns(self) -> int:
        return self.max_quote_age_ms * 1_000_000


# Scripts (processors/lua): fetch.lua reads legs (also the normalizer's carry), stage.lua
# is staging admission, install.lua installs a full build.


class QuoteParser:
    """lua/fetch.lua reply -> LegQuote (and its ``tile_vec.quote_row``), memoised on the reply
    bytes (a pure function of them): most legs read for a batch are neighbours of the dirty
    contracts whose values did not change since the previous batch.

    Bounded by two generations of ``max_entries / 2``: a full young generation becomes the
    old one (the previous old one is dropped) and a hit in the old one moves back to the
    young. At ~740 B an entry (reply, LegQuote, row), 20k entries are ~15 MB at the most, and
    what is live swings by one generation (~7 MB); clearing one 50k memo at once swung the
    builder's live memory by ~37 MB every few seconds at 5,000 events/s, which its RSS
    followed after every trim. A generation holds seconds of replies at that rate, far more
    than the one batch between a neighbour's two reads."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self.generation = max(1, max_entries // 2)
        self._young: dict[bytes, tuple[hm.LegQuote | None, tv.QuoteRow]] = {}
        self._old: dict[bytes, tuple[hm.LegQuote | None, tv.QuoteRow]] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def pair(self, joined: bytes) -> tuple[hm.LegQuote | None, tv.QuoteRow]:
        p = self._young.get(joined)
        if p is None:
            p = self._old.get(joined)
            if p is None:
                q = hm.LegQuote.from_joined(joined) if joined else None
                p = (q, tv.quote_row(q))
            if len(self._young) >= self.generation:
                self._old, self._young = self._young, {}
            self._young[joined] = p
        return p

    def __call__(self, joined: bytes) -> hm.LegQuote | None:
        return self.pair(joined)[0]


async def fetch_rows(
    redis: Redis,
    symbol: str,
    eid: str,
    cids: Sequence[str],
    chunk: int,
    parser: QuoteParser,
    manifest: str | None = None,
) -> tuple[dict[str, hm.LegQuote | None], list[tv.QuoteRow], list[Any]]:
    """``fetch_quotes`` for the vectorised path: the quotes and their array rows, in the
    order of ``cids``; with ``manifest``, its ``epoch`` and ``writer`` read in the same
    round trip, before the legs (else ``[]``)."""
    if not cids and manifest is None:
        return {}, [], []
    script = lua.get("fetch")
    prefix = keys.epoch_contract_prefix(symbol, eid)

    def queue(pipe: Pipeline) -> None:
        if manifest is not None:
            pipe.hmget(manifest, ["epoch", "writer"])
        for i in range(0, len(cids), chunk):
            script.queue(pipe, [prefix + c for c in cids[i : i + chunk]], hm.LEG_FIELDS)

    replies = await lua.execute(redis, queue)
    head: list[Any] = replies[0] if manifest is not None else []
    pair = parser.pair
    pairs = [pair(j) for rep in replies[1 if manifest is not None else 0 :] for j in rep]
    quotes = dict(zip(cids, [p[0] for p in pairs], strict=True))
    return quotes, [p[1] for p in pairs], head


async def load_grid(
    redis: Redis, eid: str, symbol: str, strategy: str, cfg: TileSettings, now_ns: int
) -> hm.Grid:
    return make_grid(await read_topology(redis, symbol, eid), symbol, strategy, cfg, now_ns)


def make_grid(
    cids: list[str], symbol: str, strategy: str, cfg: TileSettings, now_ns: int
) -> hm.Grid:
    today = hm.market_date(now_ns) if cfg.drop_expired else None
    return hm.build_grid(
        symbol, strategy, cids, cfg.widths(symbol), today=today, n_expiries=cfg.n_expiries
    )


class TileBuilder(ConsumerProcessor):
    name = "tile-builder"

    def __init__(self, deps: Deps, strategy: str, cfg: TileSettings) -> None:
        if strategy not in keys.STRATEGIES:
            raise ValueError(f"tile-builder: unknown strategy {strategy!r} ({keys.STRATEGIES})")
        self.name = f"tile-builder:{strategy}"
        self.symbols = deps.settings.symbols
        streams = [keys.contracts_dirty_stream(s) for s in self.symbols]
        super().__init__(deps, streams, keys.tile_builder_group(strategy))
        self.strategy = strategy
        self.settings = cfg
        self.clock = deps.clock
        self._stage = lua.get("stage")
        self._install = lua.get("install")
        self.topology = ActiveTopology(self.redis)
        self._grids: dict[str, tuple[str, hm.Grid]] = {}
        self._tables: dict[str, tuple[str, tv.TileTable]] = {}
        self._parse = QuoteParser()
        self.owner = f"{self.spec.consumer}:{uuid.uuid4().hex[:12]}"  # staging writer id
        reg, lbl = deps.registry, {"strategy": strategy}
        self.m_computed = metrics.counter(
            reg, "massive_tiles_computed_total", "Tiles computed", ("strategy", "mode")
        )
        self.m_staged = metrics.counter(
            reg,
            "massive_tiles_staged_total",
            "Staging writes by admission result (admitted|equal|older)",
            ("strategy", "result"),
        )
        self.m_skipped = metrics.counter(
            reg,
            "massive_tile_builder_skipped_total",
            "Dirty entries/contracts not turned into tiles, by reason",
            ("strategy", "reason"),
        )
        self.m_stage_conflicts = metrics.counter(
            reg,
            "massive_tile_stage_conflicts_total",
            "Optimistic staging writes aborted (staging written meanwhile: a replica or an "
            "epoch install); their tiles went through the admission script",
            ("strategy",),
        ).labels(**lbl)
        self.m_unchanged = metrics.counter(
            reg,
            "massive_tiles_unchanged_total",
            "Recomputed and staged tiles not announced: same published view as announced",
            ("strategy",),
        ).labels(**lbl)
        self.m_full = metrics.counter(
            reg,
            "massive_tile_full_builds_total",
            "Full epoch builds by result (installed|merged|superseded)",
            ("strategy", "result"),
        )
        self.m_seconds = metrics.histogram(
            reg, "massive_tile_build_seconds", "Tile build time per call", ("strategy", "mode")
        )
        self.m_deltas = metrics.counter(
            reg, "massive_tile_deltas_total", "Tile delta entries written", ("strategy",)
        ).labels(**lbl)

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: Any) -> None:
        fix_mmap_threshold()  # a full build's buffers must not move the threshold up
        if self.settings.bootstrap:
            try:
                await self.bootstrap()
            except Exception:  # a failed bootstrap is retried by the next dirty entry
                logger.exception("bootstrap failed strategy=%s", self.strategy)
        await super().run(stop)

    async def bootstrap(self) -> None:
        """Full-build every active epoch that staging does not hold yet (e.g. a builder
        started after the promotion, with no dirty traffic: market closed)."""
        for sym in sorted(self.symbols):
            eid_b = await self.redis.get(keys.epoch_active(sym))
            if eid_b is None:
                continue
            eid = as_str(eid_b)
            installed = await self.redis.hget(keys.heatmap_manifest(sym, self.strategy), "epoch")
            if installed is None or as_str(installed) != eid:
                await self.full_build(sym, eid, recv_ts_ns=None, n_dirty=0)

    # --- batch handling -------------------------------------------------------------------
    async def handle(self, entries: list[Entry]) -> None:  # noqa: C901 -- owned by the heatmap helper
        by_sym: dict[str, list[DirtyEntry]] = {}
        for eid, fields in entries:
            try:
                d = from_entry(fields, DirtyEntry)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self.m_skipped.labels(self.strategy, "bad_entry").inc()
                logger.warning("rejected dirty entry id=%r: %s", eid, exc)
                continue
            by_sym.setdefault(d.symbol, []).append(d)
        if not by_sym:
            return
        syms = sorted(by_sym)
        pipe = self.redis.pipeline(transaction=False)
        for s in syms:
            pipe.get(keys.epoch_active(s))
            pipe.hget(keys.heatmap_manifest(s, self.strategy), "epoch")
        res = await pipe.execute()
        for i, sym in enumerate(syms):
            act_b, inst_b = res[2 * i], res[2 * i + 1]
            act = act_b.decode() if act_b is not None else None
            inst = inst_b.decode() if inst_b is not None else None
            live = [d for d in by_sym[sym] if d.epoch == act]
            if len(live) < len(by_sym[sym]):
                self.m_skipped.labels(self.strategy, "inactive_epoch").inc(
                    len(by_sym[sym]) - len(live)
                )
            if not live or act is None:
                continue
            recvs = [d.recv_ts_ns for d in live if d.recv_ts_ns is not None]
            recv = min(recvs) if recvs else None
            max_ts = max(d.max_ts_ns for d in live)
            if inst != act:
                await self.full_build(sym, act, recv_ts_ns=recv, n_dirty=len(live))
                continue
            if any(d.reason == "epoch" for d in live):
                # Installed already (by us earlier, a replica, or bootstrap): re-announce the
                # full epoch so a publisher that missed the first announcement reconciles.
                grid = await self._grid(sym, act)
                await self._announce_full(sym, act, len(grid.specs), recv, len(live))
            cids: dict[str, None] = {}
            for d in live:
                if d.reason != "epoch":
                    cids.update(dict.fromkeys(d.cids))
            if cids:
                await self.incremental(sym, act, list(cids), recv, max_ts, len(live))

    def _drop_other_epoch(self, sym: str, eid: str) -> None:
        """Forget the grid and table ``sym`` has of another epoch BEFORE building ``eid``'s:
        the new ones then reuse the old ones' memory instead of adding to it (holding both
        is what a process keeps as its RSS afterwards)."""
        dropped = False
        for cache in (self._grids, self._tables):
            held = cache.get(sym)
            if held is not None and held[0] != eid:
                del cache[sym]
                dropped = True
        if dropped:
            gc.unfreeze()  # frozen objects are never collected: let the old epoch's go

    async def _grid(self, sym: str, eid: str) -> hm.Grid:
        cached = self._grids.get(sym)
        if cached is not None and cached[0] == eid:
            return cached[1]
        self._drop_other_epoch(sym, eid)
        cids = await self.topology.epoch(sym, eid)
        grid = make_grid(cids, sym, self.strategy, self.settings, self.clock.time_ns())
        self._grids[sym] = (eid, grid)
        return grid

    async def _table(self, sym: str, eid: str) -> tv.TileTable:
        cached = self._tables.get(sym)
        if cached is not None and cached[0] == eid:
            return cached[1]
        self._drop_other_epoch(sym, eid)
        table = tv.TileTable(await self._grid(sym, eid), eid)
        self._tables[sym] = (eid, table)
        # The grid and table are ~500k small objects that live for the epoch: out of the
        # cyclic GC's reach, a full collection no longer walks them (measured: gen2 pauses
        # of up to 100 ms, ~1 s per 90 s at 20k events/s, straight into tick-to-SSE latency).
        # Freed by reference counting when the epoch's table is dropped; the previous
        # table's pages go back to the OS here.
        release_freed_memory()
        gc.freeze()
        return table

    async def _values(
        self,
        table: tv.TileTable,
        rows: Any,
        cids: list[str],
        quotes: dict[str, hm.LegQuote | None],
        qrows: list[tv.QuoteRow],
    ) -> tuple[list[str], list[bytes], Any]:
        """The staging values (and view keys) of the tiles ``rows`` from their legs just
        read (``cids``: ``table.leg_contracts(rows)``). A coroutine although it does no
        I/O: the step between the reads and the optimistic write, where a test lets a
        replica write staging."""
        table.load_rows(cids, qrows)
        values, key = table.staged_values_keyed(rows, quotes, self.settings.max_quote_age_ns)
        return table.tile_ids(rows), values, key

    async def incremental(
        self,
        sym: str,
        eid: str,
        cids: list[str],
        recv_ts_ns: int | None,
        max_ts_ns: int,
        n_dirty: int,
    ) -> list[str]:
        """Recompute and stage the tiles using ``cids``; returns the announced tile ids.

        Optimistic path (one writer, the usual case): WATCH staging + manifest, check the
        staged epoch, THEN read the legs and compute, then one MULTI / EXEC with the HSETs,
        the manifest's ``writer`` and the XADD of the tile delta. If EXEC succeeds, no one
        wrote staging between the WATCH and the EXEC, so everything staged was computed from
        leg values read before our reads: ours are at least as new, and plain HSETs are
        exactly what the admission script would have admitted (at ~1/6 of its Redis time:
        no old values read, no Lua strings); the delta lands with the values or not at all.
        If anyone wrote (a replica of this builder, an epoch install), EXEC aborts and the
        same values go through the admission script (lua/stage.lua), which decides per tile.

        Announcing only what changed: every optimistic write sets the manifest's ``writer``
        to this builder's owner id; the admission script sets it to "admission" when it
        writes, and an install rewrites the manifest. Finding our id at the WATCH means
        staging holds only our writes since our last one, each announced in the same
        transaction, so the views we announced (``TileTable.announced``, as view keys) are
        what the publisher has: a recomputed tile with the same view is staged (its seq
        moves) but not announced. Otherwise they are forgotten and every recomputed tile is
        announced."""
        t0 = time.perf_counter()
        table = await self._table(sym, eid)
        rows = table.affected(cids)
        step_tiles = self.settings.build_chunk
        if len(rows) > step_tiles and len(cids) > 1:
            # A batch touching more tiles than a full build's chunk (a consumer catching up,
            # a re-seed that moved many contracts) goes in parts, so its values and write
            # commands are bounded like a full build's: one transaction and delta per part.
            per_part = -(-len(cids) // -(-len(rows) // step_tiles))
            out: list[str] = []
            for i in range(0, len(cids), per_part):
                part = cids[i : i + per_part]
                out += await self.incremental(sym, eid, part, recv_ts_ns, max_ts_ns, n_dirty)
            return out
        outside = sum(1 for c in cids if c not in table.rows_of)
        if outside:
            self.m_skipped.labels(self.strategy, "outside_grid").inc(outside)
        if not len(rows):
            return []
        k_st = keys.heatmap_staging(sym, self.strategy)
        k_man = keys.heatmap_manifest(sym, self.strategy)
        k_tiles = keys.tiles_stream(self.strategy, sym)

        def delta(ids: list[str]) -> producer.Fields:
            return _fields(
                TileDelta(
                    symbol=sym,
                    strategy=self.strategy,
                    epoch=eid,
                    ids=ids,
                    recv_ts_ns=recv_ts_ns,
                    max_ts_ns=max_ts_ns,
                    n_dirty=n_dirty,
                )
            )

        async with self.redis.pipeline(transaction=True) as tx:
            await tx.watch(k_st, k_man)
            # After the WATCH, in one round trip: the staged epoch and writer, and the legs
            # (used only if the epoch is the staged one, the usual case).
            legs = table.leg_contracts(rows)
            quotes, qrows, (staged, writer) = await fetch_rows(
                self.redis, sym, eid, legs, self.settings.fetch_chunk, self._parse, manifest=k_man
            )
            if staged is not None and as_str(staged) == eid:
                if writer is None or as_str(writer) != self.owner:
                    table.forget_announced()
                tids, values, key = await self._values(table, rows, legs, quotes, qrows)
                ids = await self._try_optimistic(
                    tx, (k_st, k_man, k_tiles), table, rows, tids, values, key, delta
                )
                if ids is not None:
                    self.m_seconds.labels(self.strategy, "incremental").observe(
                        time.perf_counter() - t0
                    )
                    return ids
        if staged is None or as_str(staged) != eid:  # another epoch staged (replaced): rebuild
            await self.full_build(sym, eid, recv_ts_ns=recv_ts_ns, n_dirty=n_dirty)
            return []
        # Staging was written meanwhile: the admission script decides per tile.
        table.forget_announced()
        statuses = await self._stage_tiles(sym, eid, tids, values)
        if statuses is None:  # staging holds another epoch (replaced meanwhile): rebuild
            await self.full_build(sym, eid, recv_ts_ns=recv_ts_ns, n_dirty=n_dirty)
            return []
        # Admitted or equal (an equal tile may be a redelivery whose delta was lost).
        ids = [t for t, st in zip(tids, statuses, strict=True) if st >= lua.Stage.EQUAL]
        if ids:
            await producer.xadd(self.redis, k_tiles, delta(ids), self.settings.tiles_maxlen)
            self.m_deltas.inc()
        self.m_seconds.labels(self.strategy, "incremental").observe(time.perf_counter() - t0)
        return ids

    async def _try_optimistic(
        self,
        tx: Any,
        names: tuple[str, str, str],
        table: tv.TileTable,
        rows: Any,
        tids: list[str],
        values: list[bytes],
        key: Any,
        delta: Callable[[list[str]], producer.Fields],
    ) -> list[str] | None:
        """The optimistic write of ``incremental`` on the WATCHing pipeline ``tx``: MULTI
        (HSETs of the values computed, writer, delta) / EXEC. Returns the announced ids, or
        None when EXEC aborted. ``names``: staging, manifest, tile stream (one slot)."""
        k_st, k_man, k_tiles = names
        self.m_computed.labels(self.strategy, "incremental").inc(len(tids))
        changed = table.view_changed(rows, key)
        tx.multi()
        for items in _pairs(tids, values, self.settings.write_chunk):
            tx.hset(k_st, items=items)
        tx.hset(k_man, "writer", self.owner)
        ids: list[str] = table.ids[rows[changed]].tolist()
        if ids:
            producer.xadd_pipe(tx, k_tiles, delta(ids), self.settings.tiles_maxlen)
        try:
            await tx.execute()
        except WatchError:
            self.m_stage_conflicts.inc()
            return None
        self.m_staged.labels(self.strategy, "admitted").inc(len(tids))
        if len(ids) < len(tids):
            self.m_unchanged.inc(len(tids) - len(ids))
        if ids:
            self.m_deltas.inc()
        table.announced(rows[changed], None if key is None else key[changed])
        return ids

    async def _stage_tiles(
        self, sym: str, eid: str, tids: list[str], values: list[bytes]
    ) -> list[int] | None:
        """Admission write of the tiles ``tids`` with staging ``values``; None when staging
        holds another epoch."""
        k = [keys.heatmap_staging(sym, self.strategy), keys.heatmap_manifest(sym, self.strategy)]
        chunks = _pairs(tids, values, self.settings.write_chunk)

        def queue(pipe: Pipeline) -> None:
            for pairs in chunks:
                self._stage.queue(pipe, k, [eid, *pairs])

        out: list[int] = []
        for rep in await lua.execute(self.redis, queue):
            if not isinstance(rep, list):  # lua.Stage.WRONG_EPOCH
                return None
            out += rep
        for name, code in (
            ("admitted", lua.Stage.ADMITTED),
            ("equal", lua.Stage.EQUAL),
            ("older", lua.Stage.OLDER),
        ):
            c = out.count(code)
            if c:
                self.m_staged.labels(self.strategy, name).inc(c)
        return out

    async def full_build(self, sym: str, eid: str, *, recv_ts_ns: int | None, n_dirty: int) -> str:
        """Compute every tile of epoch ``eid`` and install it (see module doc). Returns
        installed | merged | superseded."""
        try:
            return await self._full_build(sym, eid, recv_ts_ns=recv_ts_ns, n_dirty=n_dirty)
        finally:
            # Every tile's value, its leg reads and the write pipeline (tens of MB of small
            # objects, once per epoch) are garbage now: give their pages back.
            release_freed_memory()

    async def _full_build(self, sym: str, eid: str, *, recv_ts_ns: int | None, n_dirty: int) -> str:
        t0 = time.perf_counter()
        created = await self.redis.hget(keys.epoch_meta(sym, eid), "created_ns")
        created_ns = int(created) if created is not None else 0
        grid = await self._grid(sym, eid)
        table = await self._table(sym, eid)
        quotes = await self._load_all_legs(table, sym, eid)
        n_tiles = len(table.specs)
        self.m_computed.labels(self.strategy, "full").inc(n_tiles)
        consumer = self.spec.consumer
        b_key = keys.heatmap_build(sym, self.strategy, consumer)
        await self.redis.delete(b_key)
        for tids, values in self._full_values(table, quotes):
            pipe = self.redis.pipeline(transaction=False)
            for flat in _pairs(tids, values, self.settings.write_chunk):
                pipe.hset(b_key, items=flat)
            await pipe.execute()
        rc = await self._install(
            self.redis,
            [
                keys.heatmap_staging(sym, self.strategy),
                keys.heatmap_manifest(sym, self.strategy),
                b_key,
            ],
            [
                eid,
                str(created_ns),
                str(n_tiles),
                str(self.clock.time_ns()),
                msgspec.json.encode(grid.roots),
            ],
        )
        rc = int(rc)
        if rc == lua.Install.SUPERSEDED:
            result = "superseded"
            logger.warning("full build of %s epoch=%s superseded by a newer epoch", sym, eid)
        else:
            if rc == lua.Install.ALREADY_INSTALLED:
                # A replica installed this epoch meanwhile: go through admission, with the
                # legs as they are now (newer or equal inputs than the build's).
                result = "merged"
                quotes = await self._load_all_legs(table, sym, eid)
                for tids, values in self._full_values(table, quotes):
                    await self._stage_tiles(sym, eid, tids, values)
            else:
                result = "installed"
                self.m_staged.labels(self.strategy, "admitted").inc(n_tiles)
            await self._announce_full(sym, eid, n_tiles, recv_ts_ns, n_dirty)
            logger.info(
                "full build %s %s epoch=%s tiles=%d result=%s in %.3fs",
                self.strategy,
                sym,
                eid,
                n_tiles,
                result,
                time.perf_counter() - t0,
            )
        self.m_full.labels(self.strategy, result).inc()
        self.m_seconds.labels(self.strategy, "full").observe(time.perf_counter() - t0)
        return result

    async def _load_all_legs(
        self, table: tv.TileTable, sym: str, eid: str
    ) -> dict[str, hm.LegQuote | None]:
        """Read every leg of the epoch into ``table`` (one pipelined round trip)."""
        cids = table.leg_contracts(table.all_rows())
        quotes, qrows, _ = await fetch_rows(
            self.redis, sym, eid, cids, self.settings.fetch_chunk, self._parse
        )
        table.load_rows(cids, qrows)
        return quotes

    def _full_values(
        self, table: tv.TileTable, quotes: dict[str, hm.LegQuote | None]
    ) -> Iterator[tuple[list[str], list[bytes]]]:
        """Every tile's id and staging value, ``build_chunk`` tiles at a time: only one
        chunk's values (and write commands) are alive at once."""
        rows = table.all_rows()
        step = self.settings.build_chunk
        age_ns = self.settings.max_quote_age_ns
        for i in range(0, len(rows), step):
            part = rows[i : i + step]
            yield table.tile_ids(part), table.staged_values_keyed(part, quotes, age_ns)[0]

    async def _announce_full(
        self, sym: str, eid: str, expected: int, recv_ts_ns: int | None, n_dirty: int
    ) -> None:
        delta = TileDelta(
            symbol=sym,
            strategy=self.strategy,
            epoch=eid,
            ids=[],
            full=True,
            expected=expected,
            recv_ts_ns=recv_ts_ns,
            n_dirty=n_dirty,
        )
        stream = keys.tiles_stream(self.strategy, sym)
        await producer.xadd(self.redis, stream, _fields(delta), self.settings.tiles_maxlen)
        self.m_deltas.inc()


def _pairs(ids: list[str], values: list[bytes], n: int) -> list[list[str | bytes]]:
    """``id, value, id, value, ...`` in chunks of ``n`` tiles (staging writes)."""
    out: list[list[str | bytes]] = []
    for i in range(0, len(ids), n):
        part = ids[i : i + n]
        flat: list[str | bytes] = [b""] * (2 * len(part))
        flat[0::2] = part
        flat[1::2] = values[i : i + n]
        out.append(flat)
    return out


def _fields(msg: TileDelta) -> producer.Fields:
    return cast(producer.Fields, entry(msg))


def build(deps: Deps, arg: str | None) -> TileBuilder:
    if not arg:
        raise ValueError(
            f"tile-builder needs a strategy: tile-builder:<{'|'.join(keys.STRATEGIES)}>"
        )
    return TileBuilder(deps, arg, from_env(TileSettings))
