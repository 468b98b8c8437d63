"""Normalizer: chain snapshots -> epochs (DESIGN invariants 1-4, 7).

Reads ``massive:{chain}:stream`` (group ``normalizer``).
Each entry is a ``ChainPointer`` to a ``ChainSnapshot`` blob; a blob that vanished (TTL) is
a counted, logged skip. A pointer of scope ``full`` (the chain-poller's whole-chain fetch
for GEX) makes no epoch: its contracts become the columnar GEX source
``massive:gex:source:{<SYM>}`` (``lua/gex_source.lua``: only a
newer snapshot replaces it; TTL ``gex_source_ttl_s``). The rest is about ``window`` pointers
(the heatmap's filtered chain).

Epoch id: ``blake2b-64`` hex of ``"<symbol>|<expiries>|<sorted cids>"`` -- the underlying, its
expiries and the whole strike grid per (root, expiry, right), since a cid encodes all four.
Stable across processes and restarts; a new strike or expiry gives a new id.

* Same topology as the active epoch -> **re-seed**: one Lua call per chunk of contracts
  (``lua/seed.lua``) applies quotes/trades only if strictly newer and refreshes iv/greeks/oi;
  every quote the snapshot carries is marked received then (``quote_rx_ts``, not a change);
  the GEX projection ``epoch:{<SYM>}:<eid>:gex`` is rewritten from the snapshot; a
  ``DirtyEntry(reason="seed")`` names the contracts whose stored fields actually changed.
  Nothing is rebuilt, so a restarted normalizer just re-seeds (Redis is the state).
* Changed topology -> **build** a ``warming`` epoch (contract hashes, topology SET,
  by_strike/by_expiry ZSETs, GEX projection, meta) with pipelined writes, then **promote**
  it in ONE MULTI/EXEC (WATCH on ``massive:epoch:active:{<SYM>}``): old meta -> retired, new
  meta -> active, the pointer ``SET massive:epoch:active:{<SYM>} eid`` and the
  ``DirtyEntry(reason="epoch")`` chunks for every contract (all in the symbol's slot). Readers
  therefore never see a half-built active epoch, and promotion and its notifications are
  one atomic effect. Then every key of the old epoch gets a TTL
  (the contract hashes its ``contracts`` SET names, by SSCAN, then its fixed keys; ``EXPIRE NX``),
  and a sweep over ``massive:epoch:index:{<SYM>}`` expires
  epochs that a crash left retired/abandoned without TTLs, deletes retired epochs beyond the
  ``keep_retired`` newest (those the coming retirement would push beyond it go already when
  a build starts) and drops index entries whose meta is gone, so the key count stays
  bounded.
* **Carry**: quotes and trades the WS applied to the old epoch while the new one was warming
  (the hydrator writes only to the active epoch) are newer than the snapshot the new epoch was
  built from. They are read from the old epoch and applied to the new one through the
  hydrator's own admission script (``lua/hydrate.lua``: per kind, only a strictly newer ts
  replaces) twice: into the still warming epoch right before the promotion (its ``epoch``
  notifications cover them, so a replay stays deterministic), and right after it for what
  the WS applied in between, with a ``DirtyEntry(reason="carry")`` naming the contracts that
  took a value. Crash safety of the second pass: the promotion MULTI sets
  ``carry_from=<old eid>`` in the new epoch's meta; the dirty XADD and the ``HDEL`` of the
  mark are one MULTI. A later run of the same topology that still finds the mark (redelivery,
  or the next snapshot) carries again, sending every old value: the script reports an
  exactly equal stored value as applied, so values carried before the crash (maybe never
  notified) are notified again (the carry is idempotent). The old epoch's keys live for the
  retirement TTL.
* A snapshot older than the active epoch's snapshot with a different topology is stale
  (a redelivered or reordered pointer) and is skipped, never promoted back.

Crash safety of the re-seed (invariant 7): before the seed script runs, the meta field
``seeding_ts_ns`` is set to the snapshot ts (same pipeline, before the script); after the dirty
XADD, ``seeded_ts_ns`` is set in the same MULTI. If a later run finds the two different, an
earlier run died between its write and its notification, so that run notifies ALL contracts
of the epoch (over-notifying once is safe; losing a notification is not).

Spot: the snapshot's spot updates ``massive:spot:latest`` with admission (``lua/spot.lua``).
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgspec
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from processors import lua
from processors.gex import exposure as gex_math
from schemas import keys, symbols, ticker
from schemas.messages import (
    ChainContract,
    ChainPointer,
    DirtyEntry,
    GexRow,
    GexSource,
    LazyChainSnapshot,
    decode_contract,
    decode_contracts,
    decode_snapshot_lazy,
    encode_gex_source,
    entry,
    from_entry,
)
from streams import metrics
from streams.consumer import Entry
from streams.memory import fix_mmap_threshold, release_freed_memory
from streams.processor import ConsumerProcessor, Deps
from streams.producer import Fields, xadd_pipe
from streams.redis_client import as_str, opt_str
from streams.settings import env_settings, from_env

logger = logging.getLogger(__name__)


@env_settings("MASSIVE_NORMALIZER_")
@dataclass(frozen=True, slots=True)
class NormalizerSettings:
    """Env prefix ``MASSIVE_NORMALIZER_``."""

    retire_ttl_s: int = 300  # TTL on every key of a retired epoch
    # Retired epochs kept per symbol until their TTL (the newest): an older one is deleted at
    # the next promotion, so promotions close together (a fast-listing day) never hold more
    # than this many 20k-contract epochs (~20 MB each) beside the active one.
    keep_retired: int = 1
    dirty_chunk: int = 500  # cids per DirtyEntry
    # Contracts per build / seed script call, each its own round trip: bounds Redis blocking
    # time and this process's peak (a chunk's decoded contracts, rows and packed command).
    build_chunk: int = 500
    seed_chunk: int = 500
    promote_retries: int = 5  # WATCH conflicts tolerated before giving up (entry retried)
    key_batch: int = 2000  # epoch keys per SSCAN / EXISTS / EXPIRE / UNLINK call
    gex_source_ttl_s: int = 600  # massive:gex:source:{SYM} expires when no full chain comes

    def __post_init__(self) -> None:
        for name in (
            "retire_ttl_s",
            "dirty_chunk",
            "build_chunk",
            "seed_chunk",
            "gex_source_ttl_s",
            "keep_retired",
            "key_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True, slots=True)
class Topology:
    """The valid contracts of a snapshot, unique by cid, sorted by cid. They stay encoded
    (``raws``, slices of the snapshot blob) and are decoded a chunk at a time, their cids
    too: a 20k snapshot decoded whole was most of the normalizer's peak at a build (12 MB
    traced of 21), and its 20k cids another 1.6 MB (bench/normalizer_rss.py has the RSS)."""

    symbol: str
    eid: str
    roots: list[str]  # parallel to raws
    expiries: list[str]  # sorted
    raws: list[msgspec.Raw]  # each contract as its snapshot encodes it

    def __len__(self) -> int:
        return len(self.raws)

    def chunks(self, step: int) -> Iterator[tuple[int, list[ChainContract]]]:
        """(offset, the contracts decoded from there) per ``step`` contracts."""
        for off in range(0, len(self.raws), step):
            yield off, decode_contracts(self.raws[off : off + step])

    def cid_chunks(self, step: int) -> Iterator[list[str]]:
        """The cids, ``step`` at a time."""
        for _, cs in self.chunks(step):
            yield [c.cid for c in cs]


def epoch_id(symbol: str, cids: Iterable[str], expiries: Iterable[str]) -> str:
    """Stable short hex id of a topology (underlying + expiries + every cid): the digest of
    ``<symbol>|<sorted unique expiries, comma-joined>|<sorted unique cids, newline-joined>``,
    fed a cid at a time (a 20k topology's joined string and set need not exist)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(symbol.encode())
    h.update(b"|")
    h.update(",".join(sorted(set(expiries))).encode())
    h.update(b"|")
    ordered = cids if isinstance(cids, list) and _strictly_increasing(cids) else sorted(set(cids))
    for k, cid in enumerate(ordered):
        if k:
            h.update(b"\n")
        h.update(cid.encode())
    return h.hexdigest()


def _strictly_increasing(xs: list[str]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


def _label(symbol: str) -> str:
    return symbols.registry().label(symbol)  # bounded by configuration


def _f(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _fields(msg: DirtyEntry) -> Fields:
    return {k: v for k, v in entry(msg).items()}


_packer = msgspec.msgpack.Encoder()


def _pack(rows: Sequence[Sequence[str]]) -> bytes:
    """Rows as one msgpack argument (unpacked by cmsgpack in the Lua scripts): one argument
    per chunk instead of ~30 per contract keeps redis-py's per-argument encoding cost away."""
    return _packer.encode(rows)


_CARRY_OLD = ("quote_ts", "bid", "ask", "mid", "trade_ts", "last", "size")


def _snap_ts(c: ChainContract, snap: LazyChainSnapshot) -> tuple[int, int]:
    """The quote and trade ts a snapshot contract is stored with (0 = none), as in ``build``."""
    q = (c.quote_ts_ns or snap.ts_ns) if c.bid is not None and c.ask is not None else 0
    t = (c.trade_ts_ns or snap.ts_ns) if c.last is not None else 0
    return q, t


class Carried:
    """The quote and trade ts a carry sent per contract of a topology (by its index; 0: none),
    so the carry after the promotion does not send again what the warming one did. Two
    arrays of int64: held as a dict of (cid, kind) -> ts bytes, a 20k epoch whose every
    contract had WS values cost ~8 MB at each build, most of the normalizer's peak."""

    __slots__ = ("quote", "trade")

    def __init__(self, n: int) -> None:
        self.quote = array.array("q", bytes(8 * n))
        self.trade = array.array("q", bytes(8 * n))


def _carry_events(
    off: int,
    cids: Sequence[str],
    floors: Sequence[tuple[int, int]],
    rows: Sequence[bytes],
    sent: Carried,
) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """lua/fetch.lua rows of ``_CARRY_OLD`` for the contracts ``cids`` (of topology index
    ``off`` on) -> the quotes and trades newer than ``floors`` (per contract: quote ts, trade
    ts) and than what ``sent`` records (which records them), as lua/hydrate.lua's flat arrays
    (quotes: cid, ts, bid, ask, mid; trades: cid, ts, last, size), and per event, in the
    script's index order (quotes first), its topology index and ts. Incomplete slots (a
    quote without bid/ask/mid, a trade without price or size) and unparsable ts are not
    carried."""
    qs: list[str] = []
    ts: list[str] = []
    q_ids: list[tuple[int, int]] = []
    t_ids: list[tuple[int, int]] = []
    for k, (cid, (fq, ft), row) in enumerate(zip(cids, floors, rows, strict=True)):
        if not row:
            continue
        parts = row.split(b"|")
        if len(parts) != len(_CARRY_OLD):
            continue
        qts, bid, ask, mid, tts, last, size = parts
        i = off + k
        if qts and bid and ask and mid and qts.isdigit():
            q = int(qts)
            if q > fq and q != sent.quote[i]:
                sent.quote[i] = q
                qs += (cid, qts.decode(), bid.decode(), ask.decode(), mid.decode())
                q_ids.append((i, q))
        if tts and last and size and tts.isdigit():
            t = int(tts)
            if t > ft and t != sent.trade[i]:
                sent.trade[i] = t
                ts += (cid, tts.decode(), last.decode(), size.decode())
                t_ids.append((i, t))
    return qs, ts, q_ids + t_ids


class Normalizer(ConsumerProcessor):
    name = "normalizer"

    def __init__(self, deps: Deps, cfg: NormalizerSettings | None = None) -> None:
        # Symbols whose epochs the sweep visits: the configured ones and any seen since.
        self.symbols: set[str] = set(deps.settings.symbols)
        super().__init__(deps, keys.CHAIN_STREAM, keys.NORMALIZER_GROUP)
        self.settings = cfg or NormalizerSettings()
        self.clock = deps.clock
        self.maxlen = deps.settings.stream_maxlen
        self._seed = lua.get("seed")
        self._build = lua.get("build")
        self._spot = lua.get("spot")
        self._expire = lua.get("expire_keys")
        self._hydrate = lua.get("hydrate")
        self._fetch = lua.get("fetch")
        self._gex_source = lua.get("gex_source")
        self._swept_at_start = False
        reg = deps.registry
        self.m_snapshots = metrics.counter(
            reg,
            "massive_normalizer_snapshots_total",
            "Chain pointers handled, by result",
            ("symbol", "result"),
        )
        self.m_rejected = metrics.counter(
            reg,
            "massive_normalizer_contracts_rejected_total",
            "Snapshot contracts rejected (not part of the topology), by reason",
            ("reason",),
        )
        self.m_seed_changed = metrics.counter(
            reg,
            "massive_normalizer_seed_changed_total",
            "Contracts whose values changed on a re-seed",
            ("symbol",),
        )
        self.m_carried = metrics.counter(
            reg,
            "massive_epoch_carried_total",
            "Contracts that took a quote or trade from the previous epoch on promotion (WS "
            "values newer than the new epoch's snapshot)",
            ("symbol",),
        )
        self.m_promotions = metrics.counter(
            reg, "massive_epoch_promotions_total", "Epochs promoted to active", ("symbol",)
        )
        self.m_dropped = metrics.counter(
            reg,
            "massive_epoch_deleted_early_total",
            "Retired epochs deleted before their TTL (more than keep_retired retired)",
        )
        self.m_retired_keys = metrics.counter(
            reg, "massive_epoch_retired_keys_total", "Epoch keys given a retirement TTL"
        )
        self.m_build = metrics.histogram(
            reg,
            "massive_epoch_build_seconds",
            "Build + promote time of a new epoch",
            ("symbol",),
        )

    # --- stream entries ------------------------------------------------------------------
    async def handle(self, entries: list[Entry]) -> None:
        if not self._swept_at_start:
            await self.sweep()
            self._swept_at_start = True
        for eid, fields in entries:
            try:
                ptr = from_entry(fields, ChainPointer)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self.m_snapshots.labels(symbol="other", result="bad_pointer").inc()
                logger.warning("bad chain pointer id=%r: %s", eid, exc)
                continue
            await self.process(ptr)

    async def run(self, stop: asyncio.Event) -> None:
        fix_mmap_threshold()  # multi-MB blobs and pipelines must not move the threshold up
        await super().run(stop)

    async def process(self, ptr: ChainPointer) -> str:
        """Handle one pointer; returns the result label (built, reseeded, missing_blob, ...)."""
        self.symbols.add(ptr.symbol)
        result = await self._process(ptr)
        self.m_snapshots.labels(symbol=_label(ptr.symbol), result=result).inc()
        if result == "built":
            # A new epoch's build (the snapshot decoded, every contract written, the carry)
            # is the largest transient of the process: its pages go back to the OS.
            release_freed_memory()
        return result

    async def _load_snapshot(self, ptr: ChainPointer) -> LazyChainSnapshot | str:
        """The pointer's snapshot, or the result label why there is none to use."""
        if ptr.scope not in ("window", "full"):
            logger.warning("chain pointer with unknown scope %r skipped", ptr.scope)
            return "bad_pointer"
        blob: bytes | None = await self.redis.get(ptr.snapshot_key)  # type: ignore[assignment]
        if blob is None:
            logger.warning(
                "chain snapshot blob vanished (TTL?) key=%s symbol=%s",
                ptr.snapshot_key,
                ptr.symbol,
            )
            return "missing_blob"
        try:
            # its contracts stay encoded: decoded by the topology (or the GEX source), which
            # refuses the blob whole on a malformed one before anything is written
            snap = decode_snapshot_lazy(blob)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            logger.warning("undecodable chain snapshot key=%s: %s", ptr.snapshot_key, exc)
            return "bad_blob"
        if snap.symbol != ptr.symbol:
            logger.warning(
                "snapshot symbol %r != pointer symbol %r key=%s",
                snap.symbol,
                ptr.symbol,
                ptr.snapshot_key,
            )
            return "bad_blob"
        return snap

    async def _process(self, ptr: ChainPointer) -> str:
        snap = await self._load_snapshot(ptr)
        if isinstance(snap, str):
            return snap
        try:
            # every contract decodes, or the blob is refused whole: nothing written yet
            if ptr.scope == "full":
                src = gex_math.source_from_contracts(
                    snap.symbol, snap.ts_ns, snap.spot, map(decode_contract, snap.contracts)
                )
            else:
                topo = self.topology(snap)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            logger.warning(
                "undecodable contract in chain snapshot key=%s: %s", ptr.snapshot_key, exc
            )
            return "bad_blob"
        if ptr.scope == "full":
            return await self.gex_source(snap, src)
        if not len(topo):
            logger.warning("chain snapshot with no valid contracts key=%s", ptr.snapshot_key)
            return "empty"
        for _attempt in range(3):
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(keys.epoch_active(topo.symbol))
            pipe.hgetall(keys.epoch_meta(topo.symbol, topo.eid))
            active_raw, meta_raw = await pipe.execute()
            active = opt_str(active_raw)
            meta = {opt_str(k): opt_str(v) for k, v in meta_raw.items()}
            if active == topo.eid and meta.get("state") == "active":
                carry_from = meta.get("carry_from")
                if carry_from:  # an earlier run promoted but did not finish its carry
                    await self.carry(topo, carry_from, None)
                if await self.reseed(topo, snap, meta):
                    return "reseeded"
                continue  # the epoch was retired under us: decide again
            if active is not None and active != topo.eid:
                cur_ts = await self.redis.hget(
                    keys.epoch_meta(topo.symbol, active), "snapshot_ts_ns"
                )
                if cur_ts is not None and int(cur_ts) > snap.ts_ns:
                    logger.info(
                        "stale snapshot with another topology skipped symbol=%s ts=%d active=%s",
                        topo.symbol,
                        snap.ts_ns,
                        active,
                    )
                    return "stale"
            await self.build_and_promote(topo, snap, rebuild=bool(meta))
            return "built"
        raise RuntimeError(f"epoch {topo.eid} kept changing state; entry will be retried")

    async def gex_source(self, snap: LazyChainSnapshot, src: GexSource) -> str:
        """A full-chain snapshot (GEX universe, apart from the heatmap's epochs) and its
        source (its contracts decoded one at a time) -> the columnar
        ``massive:gex:source:{<SYM>}``, only if newer than the stored one."""
        spot = "" if snap.spot is None or not math.isfinite(snap.spot) else repr(snap.spot)

        def queue(pipe: Pipeline) -> None:
            self._gex_source.queue(
                pipe,
                [keys.gex_source(snap.symbol)],
                [str(snap.ts_ns), spot, encode_gex_source(src), self.settings.gex_source_ttl_s],
            )
            self._spot_call(pipe, snap)

        res = await lua.execute(self.redis, queue)
        return "gex_source" if int(res[0]) == lua.GexSource.WRITTEN else "stale_gex_source"

    # --- topology --------------------------------------------------------------------------
    def topology(self, snap: LazyChainSnapshot) -> Topology:
        """The valid contracts of ``snap``; msgspec.DecodeError / ValidationError when one
        does not decode (the rejections of the others then not counted: the blob is
        refused whole)."""
        by_cid: dict[str, int] = {}  # cid -> index in the snapshot
        rejected: list[str] = []
        roots: list[str] = []  # per index in the snapshot ("" = rejected)
        names: dict[str, str] = {}  # one str per distinct root and expiry
        expiries: set[str] = set()
        for k, c in enumerate(map(decode_contract, snap.contracts)):
            reason = None
            try:
                t = ticker.parse(c.cid)
            except ticker.TickerError:
                reason = "bad_ticker"
            else:
                if t.symbol != snap.symbol:
                    reason = "wrong_symbol"
                elif (
                    t.right != c.right
                    or t.expiry.isoformat() != c.expiry
                    or not math.isfinite(c.strike)
                    or abs(t.strike - c.strike) > 1e-6
                ):
                    reason = "ticker_mismatch"
            if reason is not None:
                rejected.append(reason)
                logger.debug("contract rejected cid=%r reason=%s", c.cid, reason)
                roots.append("")
                continue
            if c.cid in by_cid:
                rejected.append("duplicate")
            by_cid[c.cid] = k  # last one wins
            roots.append(names.setdefault(t.root, t.root))
            expiries.add(names.setdefault(c.expiry, c.expiry))
        for reason in rejected:
            self.m_rejected.labels(reason=reason).inc()
        cids = sorted(by_cid)
        return Topology(
            symbol=snap.symbol,
            eid=epoch_id(snap.symbol, cids, expiries),
            roots=[roots[by_cid[c]] for c in cids],
            expiries=sorted(expiries),
            raws=[snap.contracts[by_cid[c]] for c in cids],
        )

    # --- same topology: re-seed ------------------------------------------------------------
    @staticmethod
    def _gex_row(c: ChainContract, root: str, ts_ns: int) -> str:
        row = GexRow(root, c.expiry, c.strike, c.right, c.gamma, c.oi, c.iv, ts_ns)
        return msgspec.json.encode(row).decode()

    def _spot_call(self, pipe: Pipeline, snap: LazyChainSnapshot) -> None:
        if snap.spot is not None and math.isfinite(snap.spot):
            ts = snap.spot_ts_ns if snap.spot_ts_ns is not None else snap.ts_ns
            args = [snap.symbol, repr(float(snap.spot)), str(ts)]
            self._spot.queue(pipe, [keys.SPOT_LATEST], args)

    @classmethod
    def _seed_row(cls, c: ChainContract, root: str, snap: LazyChainSnapshot) -> tuple[str, ...]:
        """What seed.lua applies to contract ``c``: cid, quote (ts, bid, ask, mid), trade
        (ts, last, size), iv, delta, gamma, oi, the GexRow JSON ("" = absent)."""
        q = c.bid is not None and c.ask is not None
        t = c.last is not None
        return (
            c.cid,
            str(c.quote_ts_ns or snap.ts_ns) if q else "",
            _f(c.bid) if q else "",
            _f(c.ask) if q else "",
            repr((c.bid + c.ask) / 2) if q else "",  # type: ignore[operator]
            str(c.trade_ts_ns or snap.ts_ns) if t else "",
            _f(c.last) if t else "",
            _f(c.last_size) if t else "",
            _f(c.iv),
            _f(c.delta),
            _f(c.gamma),
            _f(c.oi),
            cls._gex_row(c, root, snap.ts_ns),
        )

    async def reseed(
        self, topo: Topology, snap: LazyChainSnapshot, meta: dict[str | None, str | None]
    ) -> bool:
        """Returns False when the epoch stopped being active before the write (nothing done
        from there on). One round trip per ``seed_chunk`` contracts: only that chunk's rows
        and its packed argument exist at a time."""
        eid = topo.eid
        meta_key = keys.epoch_meta(topo.symbol, eid)
        crashed_before = meta.get("seeding_ts_ns") != meta.get("seeded_ts_ns")
        step = self.settings.seed_chunk
        gex_key = keys.epoch_gex(topo.symbol, eid)
        prefix = keys.epoch_contract_prefix(topo.symbol, eid)
        n = len(topo)
        changed: list[str] = []
        for off, cs in topo.chunks(step):
            rows = [self._seed_row(c, topo.roots[off + k], snap) for k, c in enumerate(cs)]
            cids = [r[0] for r in rows]
            names = [meta_key, gex_key] + [prefix + c for c in cids]
            blob = _pack(rows)
            del rows, cs
            first, last = off == 0, off + step >= n

            def queue(
                pipe: Pipeline,
                names: list[str] = names,
                blob: bytes = blob,
                first: bool = first,
                last: bool = last,
            ) -> None:
                if first:  # the in-progress mark goes before the writes (module docstring)
                    pipe.hset(meta_key, "seeding_ts_ns", str(snap.ts_ns))
                self._seed.queue(pipe, names, [blob, str(snap.ts_ns)])
                if last:
                    self._spot_call(pipe, snap)

            res = await lua.execute(self.redis, queue)
            r = res[1] if first else res[0]
            if int(r[0]) == lua.EpochWrite.NOT_ACTIVE:
                logger.warning("epoch %s no longer active during re-seed", eid)
                return False
            if int(r[1]):
                logger.error("epoch %s lacks %d contract hashes of its topology", eid, r[1])
            changed += [cids[int(i)] for i in r[2:]]
        if crashed_before:
            logger.warning(
                "epoch %s: an earlier re-seed did not finish; notifying all contracts", eid
            )
            changed = [c for part in topo.cid_chunks(step) for c in part]
        self.m_seed_changed.labels(symbol=_label(topo.symbol)).inc(len(changed))
        prev_ts = int(meta.get("snapshot_ts_ns") or 0)
        tx = self.redis.pipeline(transaction=True)
        self._xadd_dirty(tx, topo, eid, changed, snap, "seed")
        upd = {"seeded_ts_ns": str(snap.ts_ns)}
        if snap.ts_ns >= prev_ts:
            upd["snapshot_ts_ns"] = str(snap.ts_ns)
            if snap.spot is not None:
                upd["spot"] = repr(float(snap.spot))
        tx.hset(meta_key, mapping=upd)  # type: ignore[arg-type]
        await tx.execute()
        return True

    def _xadd_dirty(
        self,
        pipe: Pipeline,
        topo: Topology,
        eid: str,
        cids: Sequence[str],
        snap: LazyChainSnapshot | None,
        reason: str,
        max_ts_ns: int = 0,
    ) -> int:
        """Dirty entries for ``cids``; their times are the snapshot's, or ``max_ts_ns`` and
        no receive time without one (a carry: the events' receive times are not kept)."""
        n = 0
        step = self.settings.dirty_chunk
        for off in range(0, len(cids), step):
            msg = DirtyEntry(
                symbol=topo.symbol,
                epoch=eid,
                cids=list(cids[off : off + step]),
                max_ts_ns=snap.ts_ns if snap is not None else max_ts_ns,
                recv_ts_ns=snap.ts_ns if snap is not None else None,
                reason=reason,
            )
            xadd_pipe(
                pipe, keys.contracts_dirty_stream(topo.symbol), _fields(msg), maxlen=self.maxlen
            )
            n += 1
        return n

    # --- changed topology: build, promote, carry, retire ----------------------------------
    async def carry(
        self,
        topo: Topology,
        old: str,
        snap: LazyChainSnapshot | None,
        sent: Carried | None = None,
        *,
        warming: bool = False,
    ) -> int:
        """Apply to epoch ``topo.eid`` the quotes and trades of epoch ``old`` newer than the
        ones ``snap`` (the snapshot it was built from) gave it, through the hydrator's
        admission script; ``sent`` records what was sent and is not sent again (None:
        nothing yet). ``warming``: the epoch is still warming, apply only (its promotion notifies
        every contract); else notify the contracts that took a value and clear the
        ``carry_from`` mark. ``snap`` None (a run after a crash): send every value, an equal
        one stored is reported (and notified) too. Returns how many contracts took a value."""
        eid, sym = topo.eid, topo.symbol
        meta_key = keys.epoch_meta(sym, eid)
        if not await self.redis.exists(keys.epoch_meta(sym, old)):
            if not warming:
                logger.warning("epoch %s: previous epoch %s is gone; nothing to carry", eid, old)
                await self.redis.hdel(meta_key, "carry_from")
            return 0
        step = self.settings.seed_chunk
        prefix = keys.epoch_contract_prefix(sym, old)
        new_prefix = keys.epoch_contract_prefix(sym, eid)
        sent = sent if sent is not None else Carried(len(topo))
        changed: list[str] = []
        took = bytearray(len(topo))  # per topology index: in ``changed`` already
        max_ts = 0
        for off, cs in topo.chunks(step):  # a round trip to read and one to apply per chunk
            cids = [c.cid for c in cs]
            floors = [(0, 0)] * len(cids) if snap is None else [_snap_ts(c, snap) for c in cs]
            del cs

            part = [prefix + c for c in cids]

            def read(pipe: Pipeline, part: list[str] = part) -> None:
                self._fetch.queue(pipe, part, _CARRY_OLD)

            (rows,) = await lua.execute(self.redis, read)
            qs, ts, ids = _carry_events(off, cids, floors, rows, sent)
            del rows, floors
            if not ids:
                continue
            args: list[lua.Arg] = [_packer.encode(qs), _packer.encode(ts)]
            if warming:
                args.append("warming")
            names = [meta_key] + [new_prefix + cids[i - off] for i, _ in ids]
            reply = await self._hydrate(self.redis, names, args)
            if int(reply[0]) == lua.EpochWrite.NOT_ACTIVE:
                # state changed: promoted (the next carry follows) or retired (a newer epoch
                # carries from this one)
                logger.info("epoch %s changed state during its carry from %s", eid, old)
                return len(changed)
            for j in reply[2:]:
                i, ts_ns = ids[int(j)]
                if not took[i]:
                    took[i] = 1
                    changed.append(cids[i - off])
                max_ts = max(max_ts, ts_ns)
        self.m_carried.labels(symbol=_label(topo.symbol)).inc(len(changed))
        if warming:
            return len(changed)
        tx = self.redis.pipeline(transaction=True)
        self._xadd_dirty(tx, topo, eid, changed, None, "carry", max_ts_ns=max_ts)
        tx.hdel(meta_key, "carry_from")
        await tx.execute()
        if changed:
            logger.info("epoch %s: %d contracts took newer values from %s", eid, len(changed), old)
        return len(changed)

    async def build_and_promote(
        self, topo: Topology, snap: LazyChainSnapshot, *, rebuild: bool
    ) -> None:
        t0 = time.perf_counter()
        eid = topo.eid
        # The active epoch is about to be retired: the retired ones it would push beyond
        # keep_retired go now, before the build, not at the sweep after the promotion. Else
        # Redis holds the new epoch, the active one and keep_retired more at once (~20 MB
        # each at 20k contracts): the peak of used_memory at every promotion.
        await self._sweep(topo.symbol, keep_retired=max(0, self.settings.keep_retired - 1))
        if rebuild or await self._has_leftovers(topo):
            # Leftovers of an earlier life of this id (a crashed build, or a retired epoch
            # whose topology came back, maybe with its meta already expired and the rest
            # not yet): start from nothing so no stale value and no TTL survives.
            await self.delete_epoch(topo.symbol, eid, topo.cid_chunks(self.settings.key_batch))
        await self.build(topo, snap)
        prev = opt_str(await self.redis.get(keys.epoch_active(topo.symbol)))
        sent = Carried(len(topo))
        if prev is not None and prev != eid:  # most of the carry, notified by the promotion
            await self.carry(topo, prev, snap, sent, warming=True)
        old = await self.promote(topo, snap)
        if old is not None and old != eid:  # what the WS applied since
            await self.carry(topo, old, snap, sent if old == prev else None)
        self.m_build.labels(symbol=_label(topo.symbol)).observe(time.perf_counter() - t0)
        self.m_promotions.labels(symbol=_label(topo.symbol)).inc()
        logger.info(
            "epoch promoted symbol=%s eid=%s contracts=%d expiries=%d previous=%s took=%.3fs",
            topo.symbol,
            eid,
            len(topo),
            len(topo.expiries),
            old,
            time.perf_counter() - t0,
        )
        if old is not None and old != eid:
            await self.retire(topo.symbol, old)
        await self.sweep()

    async def build(self, topo: Topology, snap: LazyChainSnapshot) -> None:
        eid = topo.eid
        now = self.clock.time_ns()
        sym = topo.symbol
        meta_key = keys.epoch_meta(sym, eid)
        # meta + index first: a crash mid-build leaves a findable 'warming' epoch (swept).
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            meta_key,
            mapping={
                "symbol": sym,
                "state": "warming",
                "created_ns": str(now),
                "n_contracts": str(len(topo)),
                "expiries": ",".join(topo.expiries),
                "spot": "" if snap.spot is None else repr(float(snap.spot)),
                "snapshot_ts_ns": str(snap.ts_ns),
            },
        )
        pipe.zadd(keys.epoch_index(sym), {eid: now})
        await pipe.execute()
        # One chunk at a time, each its own round trip: its contracts decoded, its rows, its
        # msgpack argument and the packed command exist for that chunk only. Built for all
        # 20k contracts first, they were the process's peak (84 MB traced at a build against
        # 14 MB between builds; bench/normalizer_rss.py has the RSS).
        step = self.settings.build_chunk
        fixed = keys.epoch_fixed_keys(sym, eid)
        prefix = keys.epoch_contract_prefix(sym, eid)
        n = len(topo)
        for off, cs in topo.chunks(step):
            rows = [self._build_row(c, topo.roots[off + k], sym, snap) for k, c in enumerate(cs)]
            del cs
            names = fixed + [prefix + r[0] for r in rows]
            blob = _pack(rows)
            del rows
            last = off + step >= n

            def queue(
                pipe: Pipeline, names: list[str] = names, blob: bytes = blob, last: bool = last
            ) -> None:
                self._build.queue(pipe, names, [blob])
                if last:
                    self._spot_call(pipe, snap)

            res = await lua.execute(self.redis, queue)
            if int(res[0]) == lua.Build.NOT_WARMING:
                raise RuntimeError(f"epoch {eid} left the warming state during its build")

    def _build_row(
        self, c: ChainContract, root: str, sym: str, snap: LazyChainSnapshot
    ) -> list[str]:
        """What build.lua writes for contract ``c`` (of root ``root``, underlying ``sym``):
        cid, strike, expiry as YYYYMMDD, the GexRow JSON, then the hash's field/value pairs."""
        g = self._gex_row(c, root, snap.ts_ns)
        strike = repr(float(c.strike))
        row = [c.cid, strike, c.expiry.replace("-", ""), g]
        row += ("symbol", sym, "root", root, "expiry", c.expiry, "strike", strike)
        row += ("type", c.right, "src", "chain")
        ts = 0
        if c.bid is not None and c.ask is not None:
            qts = c.quote_ts_ns or snap.ts_ns
            row += ("bid", repr(float(c.bid)), "ask", repr(float(c.ask)))
            row += ("mid", repr((c.bid + c.ask) / 2), "quote_ts", str(qts))
            row += ("quote_rx_ts", str(snap.ts_ns))  # received with this snapshot
            ts = qts
        if c.last is not None:
            tts = c.trade_ts_ns or snap.ts_ns
            row += ("last", repr(float(c.last)), "trade_ts", str(tts))
            if c.last_size is not None:
                row += ("size", repr(float(c.last_size)))
            ts = max(ts, tts)
        if ts:
            row += ("ts_ns", str(ts))
        for name, v in (("iv", c.iv), ("delta", c.delta), ("gamma", c.gamma), ("oi", c.oi)):
            if v is not None:
                row += (name, repr(float(v)))
        return row

    async def promote(self, topo: Topology, snap: LazyChainSnapshot) -> str | None:
        """Atomically: old -> retired, new -> active, active pointer, epoch dirty entries.
        Returns the previously active epoch id."""
        eid, sym = topo.eid, topo.symbol
        for _ in range(self.settings.promote_retries):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.epoch_active(sym))
                    old = opt_str(await pipe.get(keys.epoch_active(sym)))
                    now = str(self.clock.time_ns())
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if old is not None and old != eid:
                        pipe.hset(
                            keys.epoch_meta(sym, old),
                            mapping={"state": "retired", "retired_ns": now},
                        )
                    mark = {
                        "state": "active",
                        "promoted_ns": now,
                        "seeding_ts_ns": str(snap.ts_ns),
                        "seeded_ts_ns": str(snap.ts_ns),
                    }
                    if old is not None and old != eid:
                        mark["carry_from"] = old
                    pipe.hset(keys.epoch_meta(sym, eid), mapping=mark)  # type: ignore[arg-type]
                    pipe.set(keys.epoch_active(sym), eid)
                    for cids in topo.cid_chunks(self.settings.dirty_chunk):
                        self._xadd_dirty(pipe, topo, eid, cids, snap, "epoch")
                    await pipe.execute()
                    return old
                except WatchError:
                    logger.info("promotion of %s raced another writer; retrying", eid)
        raise RuntimeError(f"could not promote epoch {eid}: active pointer kept changing")

    async def _epoch_keys(
        self, symbol: str, eid: str, cid_batches: Iterable[Sequence[str]] = ()
    ) -> AsyncIterator[list[str]]:
        """Every key of the epoch, ``key_batch`` at a time: one contract hash per member of
        its ``contracts`` SET (build.lua writes a hash and its member in one script, so no
        hash exists without its member; SSCAN, not SCAN), those of ``cid_batches`` too, then its
        fixed keys, the SET among them, last (a caller deleting the keys must not lose the
        SET before it was read whole). A key may come twice (SSCAN)."""
        prefix = keys.epoch_contract_prefix(symbol, eid)
        step = self.settings.key_batch
        cursor = 0
        while True:
            cursor, members = await self.redis.sscan(
                keys.epoch_contracts(symbol, eid), cursor, count=step
            )
            if members:
                yield [prefix + as_str(c) for c in members]
            if not cursor:
                break
        for cids in cid_batches:
            yield [prefix + c for c in cids]
        yield keys.epoch_fixed_keys(symbol, eid)

    async def retire(self, symbol: str, eid: str) -> int:
        """TTL on every key of ``eid`` (its own key set; EXPIRE NX). Returns the number of
        keys that got a TTL now."""
        n = 0
        async for ks in self._epoch_keys(symbol, eid):
            n += int(await self._expire(self.redis, ks, [self.settings.retire_ttl_s]))
        self.m_retired_keys.inc(n)
        logger.info("epoch retired eid=%s keys=%d ttl=%ds", eid, n, self.settings.retire_ttl_s)
        return n

    async def _has_leftovers(self, topo: Topology) -> bool:
        """Whether any key a build of ``topo`` writes exists already."""
        eid, sym = topo.eid, topo.symbol
        if await self.redis.exists(*keys.epoch_fixed_keys(sym, eid)[1:]):
            return True
        prefix = keys.epoch_contract_prefix(sym, eid)
        for cids in topo.cid_chunks(self.settings.key_batch):
            if await self.redis.exists(*[prefix + c for c in cids]):
                return True
        return False

    async def delete_epoch(
        self, symbol: str, eid: str, cid_batches: Iterable[Sequence[str]] = ()
    ) -> None:
        """Delete every key of ``eid``: its own key set plus the contract hashes of
        ``cid_batches`` (the epoch id is a hash of its cids: a rebuild of the same id writes
        exactly them)."""
        async for ks in self._epoch_keys(symbol, eid, cid_batches):
            await self.redis.unlink(*ks)

    async def sweep(self) -> None:
        """Keep the epoch key count bounded: index entries whose meta expired are dropped;
        retired epochs without a TTL (crash between promotion and retirement) and warming
        epochs that are not active and older than the retire TTL (abandoned builds) get their
        TTLs; retired epochs beyond the ``keep_retired`` newest are deleted."""
        for sym in sorted(self.symbols):
            await self._sweep(sym)

    async def _sweep(self, sym: str, keep_retired: int | None = None) -> None:
        keep = self.settings.keep_retired if keep_retired is None else keep_retired
        index = keys.epoch_index(sym)
        raw: list[bytes] = await self.redis.zrange(index, 0, -1)  # type: ignore[assignment]
        eids = [e.decode() for e in raw]
        if not eids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for e in eids:
            pipe.hmget(keys.epoch_meta(sym, e), "state", "created_ns", "retired_ns")
            pipe.ttl(keys.epoch_meta(sym, e))
        res = await pipe.execute()
        active = opt_str(await self.redis.get(keys.epoch_active(sym)))
        now = self.clock.time_ns()
        gone: list[str] = []
        expiring: list[tuple[int, str]] = []  # (retired_ns, eid) of retired epochs with a TTL
        for k, e in enumerate(eids):
            (state_b, created_b, retired_b), ttl = res[2 * k], int(res[2 * k + 1])
            state = opt_str(state_b)
            if state is None:
                gone.append(e)
                continue
            if e == active:
                continue
            if ttl >= 0:
                if state == "retired":
                    expiring.append((int(retired_b or 0), e))
                continue
            age_s = (now - int(created_b or 0)) / 1e9
            if state == "retired" or (state == "warming" and age_s > self.settings.retire_ttl_s):
                logger.warning("sweep: epoch %s (%s) had no TTL; retiring its keys", e, state)
                if state == "warming":
                    await self.redis.hset(keys.epoch_meta(sym, e), "state", "retired")
                await self.retire(sym, e)
        for _, e in sorted(expiring, reverse=True)[keep:]:
            await self.delete_epoch(sym, e)
            gone.append(e)
            self.m_dropped.inc()
            logger.info("epoch %s deleted before its TTL: %d newer retired", e, len(expiring) - 1)
        if gone:
            await self.redis.zrem(index, *gone)


def build(deps: Deps, arg: str | None) -> Normalizer:
    return Normalizer(deps, from_env(NormalizerSettings))
