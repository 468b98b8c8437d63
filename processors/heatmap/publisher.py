"""Heatmap publisher (``massive-pipeline run publisher:<strategy>``): the single authority
that declares versions of ``massive:heatmap:model:{<SYM>}:<strategy>``, one leader per
(symbol, strategy): the processor runs one :class:`Publisher` per configured symbol.

Leadership
    Any number of replicas run; one leads: the fenced lease of processors/lease.py on
    ``keys.publisher_lease(symbol, strategy)`` and ``keys.publisher_fence(symbol, strategy)``
    (every key one publish touches is in the symbol's ``{<SYM>}`` slot). Standbys only
    retry acquisition; they never read the stream, so they cannot steal entries. A leader
    that crashes stops renewing; a standby takes over within ``lease_ttl_ms + renew_ms``.
    The lease is renewed by a background task every ``renew_ms`` (and by every publish); an
    expired lease whose fence still equals our token (nobody acquired since) is re-set, not
    lost, so an iteration longer than the TTL does not drop leadership. Every publish is one
    script (lua/heatmap_publish.lua, one round trip): it checks the fence counter equals this
    leader's token and the lease is not held by another owner, so a stale (paused, partitioned)
    leader's publish is rejected; it also checks the version is exactly current + 1 and the
    epoch is the active one, then XADDs the diff (explicit id, MINID ~ of its retention:
    age and bytes, :class:`DiffRetention`) and SETs the model
    with ``diff_id`` = that id, the version key and the lease.

Consumption (leader only; group ``publisher`` on ``massive:tiles:<strategy>:{<SYM>}``)
    Entries are acked only after the publish that covers them (or when they change
    nothing), so a crash leaves them pending; a new leader XAUTOCLAIMs every pending entry
    and first reconciles each symbol (staging vs. canonical model), so no staged change is
    lost across a takeover. Versions continue from the version key: never backwards,
    never duplicated (the script refuses anything but current + 1).

Publish conditions (OR, per symbol; ``massive_publishes_total{strategy,condition}``)
    complete  the staging hash holds every expected tile (manifest) of the active epoch
              and the model is of another epoch (or absent): first publish of the epoch;
    value     pending changed tiles >= ``min_changed_tiles`` or >= ``min_changed_pct`` %
              of the model;
    time      pending changes and ``max_interval_ms`` since this symbol's last publish.
    Nothing pending -> nothing published: a closed market gives the one "complete"
    publish and then no further versions.

Checkpoints
    A version is its diff (``massive:heatmap:diffs:<strategy>:{<SYM>}``, carrying every change);
    a whole model (a new epoch's first version, or a re-publish of every staged tile) is a
    *snapshot version* instead: its checkpoint is written first and renamed onto the model
    key by the publish script with a diff that carries no items (``ModelDiff.snapshot``),
    so no reader takes a ~15 MB grid out of the stream (a reader holding an earlier version
    reads the model key). The model key is also rewritten at most every
    ``checkpoint_ms`` under sustained changes, and once nothing is pending and nothing was
    published for ``checkpoint_idle_ms`` (so a quiet publisher leaves it exactly current).
    Rewriting a 50k-tile model (~15 MB) on every publish cost more than the diff itself.
    A reader of the model key gets version v and its ``diff_id``; the diffs after that id
    bring it to the latest version, which is what the SSE gateway already does for every
    client (snapshot, then diffs from the snapshot's ``diff_id``). A new leader loads the
    checkpoint and applies the diffs after it up to the version key (if the stream no
    longer reaches back, it re-publishes every staged tile). A checkpoint is written in
    pieces into a temp key of this leader's fence token and renamed onto the model key by
    a fenced script (lua/heatmap_checkpoint.lua): readers never see a part of one.

Latency: ``massive_tick_to_publish_seconds{model="heatmap:<strategy>"}`` observes publish
time minus the oldest ingest receive time (TileDelta.recv_ts_ns) behind the published
changes; the same value is the diff's ``src_recv_ts_ns``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from processors import lua
from processors.heatmap import checkpoint
from processors.lease import FencedLease
from schemas import keys
from schemas.heatmap import TileDelta, split_staged
from schemas.messages import (
    ModelDiff,
    PublishedModel,
    RawDiff,
    RawModel,
    encode,
    encode_model_pieces,
    from_entry,
)
from streams import metrics
from streams.clock import StepClock
from streams.consumer import Entry
from streams.memory import fix_mmap_threshold, release_freed_memory
from streams.processor import Deps, PerSymbol
from streams.redis_client import as_str
from streams.retry import REDIS_UNAVAILABLE, run_resilient, sleep_or_stop
from streams.runner import cancel_and_wait
from streams.settings import env_settings, from_env

logger = logging.getLogger(__name__)


@env_settings("MASSIVE_PUBLISHER_")
@dataclass(frozen=True)
class PublisherSettings:
    """Env prefix ``MASSIVE_PUBLISHER_``."""

    lease_ttl_ms: int = 3000
    renew_ms: int = 1000
    min_changed_tiles: int = 500
    min_changed_pct: float = 1.0
    max_interval_ms: int = 250
    tick_ms: int = 50  # XREADGROUP BLOCK while leading (bounds timer resolution)
    count: int = 1000
    # Resume window of the diff stream: diffs older than diff_retention_s, or beyond the
    # newest diff_retention_mb MiB, are trimmed with every publish (a client resuming from
    # an older id gets a snapshot). Bytes bind under load (a butterfly diff is ~1 MB at
    # 5k events/s), age in a quiet market.
    diff_retention_s: float = 300.0
    diff_retention_mb: float = 64.0
    # The model key is rewritten with a publish at most this often under sustained changes,
    # for every new epoch, and once nothing was published for checkpoint_idle_ms; the diffs
    # in between carry every change (see "Checkpoints" in the module doc).
    checkpoint_ms: int = 5000
    checkpoint_idle_ms: int = 1000

    def __post_init__(self) -> None:
        if self.renew_ms * 2 > self.lease_ttl_ms:
            raise ValueError("renew_ms must be at most half of lease_ttl_ms")
        if min(self.tick_ms, self.renew_ms, self.max_interval_ms, self.count) < 1:
            raise ValueError("tick_ms, renew_ms, max_interval_ms and count must be >= 1")
        if self.diff_retention_s <= 0 or self.diff_retention_mb <= 0:
            raise ValueError("diff_retention_s and diff_retention_mb must be > 0")


# Scripts (processors/lua): lease_acquire / lease_renew / lease_release (the fenced lease)
# and heatmap_publish (one version).

_REJECTED = {
    lua.Publish.FENCED: "fenced",
    lua.Publish.LEASE_HELD: "lease_lost",
    lua.Publish.INACTIVE_EPOCH: "inactive_epoch",
    lua.Publish.MOVED: "version",
    lua.Publish.TORN: "torn_checkpoint",
}
# A checkpoint's temp key outlives a writer that died mid-write by this much (refreshed with
# every piece written).
CHECKPOINT_TMP_TTL_MS = 60_000
_model_decoder = msgspec.json.Decoder(RawModel)
_diff_decoder = msgspec.json.Decoder(RawDiff)


class DiffRetention:
    """The diff stream's MINID for the next publish: the later of ``now - max_age`` and the
    oldest id such that the diffs from it on (the new one included) fit in ``max_bytes``.
    Sizes are those this leader published; older entries (a previous leader's) go by age,
    and by the retention janitor's byte backstop."""

    def __init__(self, max_age_ms: int, max_bytes: int) -> None:
        self.max_age_ms = max_age_ms
        self.max_bytes = max_bytes
        self._sizes: deque[tuple[int, int, int]] = deque()  # (ms, seq, bytes), oldest first
        self._total = 0
        self._floor = (0, 0)  # MINID (without a pin) of the last minid() call

    def minid(self, ms: int, seq: int, size: int, pin: tuple[int, int] | None = None) -> str:
        floor = (max(0, ms - self.max_age_ms), 0)
        total = self._total + size
        for e_ms, e_seq, e_size in self._sizes:
            if total <= self.max_bytes and (e_ms, e_seq) >= floor:
                break
            total -= e_size
            floor = max(floor, (e_ms, e_seq + 1))
        if total > self.max_bytes:  # the new diff alone is over budget: keep just it
            floor = max(floor, (ms, seq))
        self._floor = floor
        if pin is not None:
            floor = min(floor, pin)
        return f"{floor[0]}-{floor[1]}"

    def added(self, ms: int, seq: int, size: int) -> None:
        """The diff went in with the MINID of the last :meth:`minid` call."""
        self._sizes.append((ms, seq, size))
        self._total += size
        while self._sizes and self._sizes[0][:2] < self._floor:
            self._total -= self._sizes.popleft()[2]


@dataclass
class SymState:
    """The leader's copy of one symbol's canonical model plus unpublished changes."""

    symbol: str
    epoch: str | None = None
    version: int = 0
    items: dict[str, msgspec.Raw] = field(default_factory=dict)  # tile_id -> tile JSON
    pending: dict[str, msgspec.Raw | None] = field(default_factory=dict)  # None: removed
    pending_recv: dict[str, int] = field(default_factory=dict)
    needs_reconcile: bool = False
    reconcile_recv: int | None = None
    last_publish: float = float("-inf")  # monotonic seconds
    last_reconcile: float = float("-inf")
    diff_id: str | None = None  # of ``version``
    head: str | None = None  # the chain head in Redis: diff id of ``version`` (prev_id)
    ts_ns: int = 0  # of ``version``
    meta: dict[str, Any] = field(default_factory=dict)  # of ``version``
    checkpointed: int = 0  # version the model key holds
    checkpoint_id: str | None = None  # its diff id: the diffs after it must stay in the stream
    roots: dict[str, str] = field(default_factory=dict)  # expiry -> option root (manifest)
    last_checkpoint: float = float("-inf")  # monotonic seconds

    def note_reconcile(self, recv: int | None) -> None:
        self.needs_reconcile = True
        if recv is not None:
            cur = self.reconcile_recv
            self.reconcile_recv = recv if cur is None else min(cur, recv)


class Publisher:
    name = "publisher"

    def __init__(self, deps: Deps, strategy: str, cfg: PublisherSettings, symbol: str) -> None:
        if strategy not in keys.STRATEGIES:
            raise ValueError(f"publisher: unknown strategy {strategy!r} ({keys.STRATEGIES})")
        self.name = f"publisher:{strategy}:{symbol}"
        self.symbol = symbol
        self.deps = deps
        self.redis: Redis = deps.redis
        self.clock = deps.clock
        self.strategy = strategy
        self.kind = f"heatmap:{strategy}"
        self.settings = cfg
        self.stream = keys.tiles_stream(strategy, symbol)
        self.group = keys.PUBLISHER_GROUP
        self.consumer = deps.settings.consumer
        self.owner = f"{self.consumer}:{uuid.uuid4().hex[:12]}"
        self.lease = FencedLease(
            self.redis,
            keys.publisher_lease(symbol, strategy),
            keys.publisher_fence(symbol, strategy),
            self.owner,
            cfg.lease_ttl_ms,
        )
        self._publish = lua.get("heatmap_publish")
        self._checkpoint = lua.get("heatmap_checkpoint")
        self._last_diff_id = (0, 0)  # (ms, seq) of our last diff: ids we pick stay above it
        self._retention = DiffRetention(
            int(cfg.diff_retention_s * 1000), int(cfg.diff_retention_mb * 1024 * 1024)
        )
        self.syms: dict[str, SymState] = {}
        self.unacked: list[bytes] = []
        self._ready = False
        self._release_due = False  # a model of another epoch was dropped (see _evaluate)
        if isinstance(self.clock, StepClock):
            self.clock.join(self.name)  # a replay: one lead iteration per instant
        reg, s = deps.registry, strategy
        self.m_publishes = metrics.counter(
            reg,
            "massive_publishes_total",
            "Model versions published, by publish condition",
            ("strategy", "condition"),
        )
        self.m_latency = metrics.histogram(
            reg,
            "massive_tick_to_publish_seconds",
            "Publish time minus the oldest ingest receive time behind the published changes",
            ("model",),
        ).labels(model=self.kind)
        self.m_publish_s = metrics.histogram(
            reg,
            "massive_publish_seconds",
            "Time to build and write one model version (encode model + diff, transaction)",
            ("strategy",),
        ).labels(strategy=s)
        self.m_leader = metrics.gauge(
            reg,
            "massive_publisher_leader",
            "1 while this replica leads",
            ("strategy", "symbol"),
        ).labels(strategy=s, symbol=symbol)
        self.m_rejected = metrics.counter(
            reg,
            "massive_publisher_rejected_total",
            "Entries or publishes rejected, by reason",
            ("strategy", "reason"),
        )
        self.m_version = metrics.gauge(
            reg, "massive_published_version", "Last published version", ("strategy", "symbol")
        )
        self.m_redis_errors = metrics.redis_outages(reg, self.name)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def leader(self) -> bool:
        return self.lease.held

    @property
    def token(self) -> int | None:
        return self.lease.token

    # --- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Lead or stand by until ``stop``; a Redis outage (restart, failover, AOF load) is
        survived in-process: leadership is dropped locally, then kept (same fence) or
        re-acquired once Redis answers, and the publish script's version/chain-head checks
        resync any symbol whose history Redis no longer holds."""
        self._ready = True
        fix_mmap_threshold()  # a 15 MB checkpoint must not move the threshold up
        await run_resilient(
            self.name,
            lambda: self._run(stop),
            stop,
            log=logger,
            errors=self.m_redis_errors,
            on_unavailable=self._drop_leadership,
        )

    def _drop_leadership(self) -> None:
        self.lease.drop()
        self.m_leader.set(0)

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.deps.heartbeats.beat(self.name)  # the lead loop beats under the same name
            prev = self.lease.last_token
            tok = await self.lease.take()
            if tok == 0:
                await sleep_or_stop(stop, self.settings.renew_ms / 1000)
                continue
            # Nobody led between our previous token and this one (or we kept it): our state
            # is still what we published, so keep it instead of reconciling every symbol
            # from scratch. If Redis lost some of it, the publish script's chain check
            # resyncs that symbol.
            resume = prev is not None and tok in (prev, prev + 1)
            if not resume:
                self.syms.clear()
                self.unacked = []
            self.m_leader.set(1)
            logger.info(
                "publisher %s %s leads (token %d, owner %s)",
                self.strategy,
                self.symbol,
                tok,
                self.owner,
            )
            try:
                await self._lead(stop, resume)
            finally:
                if stop.is_set():
                    # Graceful stop: hand over at once (a crash skips this; the TTL expires).
                    with contextlib.suppress(*REDIS_UNAVAILABLE):
                        await self.lease.release()
                self._drop_leadership()

    async def _lead(self, stop: asyncio.Event, resume: bool = False) -> None:
        await self._ensure_group()
        await self._load_models()
        if not resume:
            for st in self.syms.values():
                st.needs_reconcile = True
        await self._claim_pending()
        renewer = asyncio.create_task(self._renew_loop(stop))
        try:
            await self._lead_loop(stop)
        finally:
            # Not cancel() + await: a renew in flight when Redis dies can surface the
            # cancellation as a dead-socket error, which the renewer survives; it then kept
            # renewing (against the restarted Redis) and this leader waited on it, reading
            # nothing, until the process stopped. cancel_and_wait sends it again.
            await cancel_and_wait([renewer])

    async def _renew_once(self) -> bool:
        if not self.lease.held:
            return False
        if not await self.lease.renew():
            logger.warning("publisher %s %s lost its lease", self.strategy, self.symbol)
            return False
        return True

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        """Renew every ``renew_ms`` independently of how long one lead iteration takes."""
        while not stop.is_set() and self.leader:
            await sleep_or_stop(stop, self.settings.renew_ms / 1000)
            if stop.is_set():
                return
            try:
                if not await self._renew_once():
                    return
            except REDIS_UNAVAILABLE:
                # the lead loop meets the same outage and drops leadership; a blip that only
                # this call saw is retried on the next tick (the lease TTL covers a few)
                continue

    async def _lead_loop(self, stop: asyncio.Event) -> None:
        if isinstance(self.clock, StepClock):
            await self._lead_stepped(stop, self.clock)
            return
        while not stop.is_set() and self.leader:
            self.deps.heartbeats.beat(self.name)
            await self._evaluate()
            await self._checkpoint_idle()
            await self._ack_if_idle()
            try:
                res: Any = await self.redis.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: ">"},
                    count=self.settings.count,
                    block=self._block_ms(),
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._ensure_group()
                    continue
                raise
            if res:
                await self._ingest(res[0][1])

    async def _lead_stepped(self, stop: asyncio.Event, clock: StepClock) -> None:
        """A replay (``StepClock``): one iteration per instant, on the state every record up
        to it left: read every tile delta written so far, then the same decisions as the live
        loop at the instant's time. The live loop's reads return whatever the builders have
        written when it wakes, which depends on timing; these do not."""
        due: float | None = None
        while self.leader and await clock.wait_step(self.name, due, stop):
            while True:
                try:
                    res: Any = await self.redis.xreadgroup(
                        self.group, self.consumer, {self.stream: ">"}, count=self.settings.count
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._ensure_group()
                    continue
                got = res[0][1] if res else []
                if got:
                    await self._ingest(got)
                if len(got) < self.settings.count:
                    break
            await self._evaluate()
            await self._checkpoint_idle()
            await self._ack_if_idle()
            due = self._due_s()

    def _due_s(self) -> float | None:
        """Clock seconds until ``_evaluate`` or ``_checkpoint_idle`` would act without new
        input (None: never): the time condition of pending changes, the retry of an
        incomplete reconcile, the idle checkpoint."""
        cfg = self.settings
        due = float("inf")
        for st in self.syms.values():
            if st.needs_reconcile:
                due = min(due, st.last_reconcile + cfg.max_interval_ms / 1000)
            elif st.pending:
                due = min(due, st.last_publish + cfg.max_interval_ms / 1000)
            elif st.version > st.checkpointed and st.diff_id is not None:
                due = min(due, st.last_publish + cfg.checkpoint_idle_ms / 1000)
        return None if due == float("inf") else due - self.clock.monotonic()

    def _block_ms(self) -> int:
        block = float(self.settings.tick_ms)
        now = self.clock.monotonic()
        for st in self.syms.values():
            if st.pending:
                due = st.last_publish + self.settings.max_interval_ms / 1000 - now
                block = min(block, max(due * 1000, 1.0))
        return max(1, int(block))

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim_pending(self) -> None:
        """Take over every entry left pending by a previous leader (or ourselves)."""
        start: bytes | str = "0-0"
        while True:
            nxt, claimed, *_ = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, 0, start_id=start, count=self.settings.count
            )
            if claimed:
                await self._ingest(claimed)
            if nxt in (b"0-0", "0-0"):
                return
            start = nxt

    # --- model state ----------------------------------------------------------------------
    async def _load_models(self) -> None:
        if await self.redis.exists(keys.epoch_active(self.symbol)):
            await self._state(self.symbol)

    async def _state(self, sym: str) -> SymState:
        st = self.syms.get(sym)
        if st is not None:
            return st
        st = SymState(sym, needs_reconcile=True)
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(keys.heatmap_model(sym, self.strategy))
        pipe.get(keys.heatmap_version(sym, self.strategy))
        pipe.get(keys.heatmap_head(sym, self.strategy))
        raw, ver, head = await pipe.execute()
        if raw is not None:
            m = _model_decoder.decode(raw)
            # Decoded Raw items are views of the whole ~15 MB checkpoint: copied, so the
            # buffer is not kept alive by the tiles that never change.
            items = {k: v.copy() for k, v in m.items.items()}
            st.epoch, st.version, st.items = m.epoch, m.version, items
            st.diff_id, st.ts_ns, st.meta = m.diff_id, m.ts_ns, m.meta
            st.checkpointed, st.checkpoint_id = m.version, m.diff_id
            roots = m.meta.get("roots")
            if isinstance(roots, dict):
                st.roots = {str(k): str(v) for k, v in roots.items()}
        if ver is not None and int(ver) > st.version:
            await self._catch_up(st, int(ver))
        # The next diff continues the chain Redis holds, whatever this process published
        # before (a lossy restart may have taken our last diffs).
        st.head = as_str(head) if head is not None else None
        self.syms[sym] = st
        return st

    async def _catch_up(self, st: SymState, target: int) -> None:
        """The model key is a checkpoint: apply the diffs published after it (up to the
        version key) so this leader's items equal what clients hold. If the diff stream no
        longer reaches back (trimmed), forget the items: the reconcile then re-publishes
        every staged tile, which brings clients back to the exact staging."""
        after = st.diff_id
        stream = keys.heatmap_diffs_stream(self.strategy, st.symbol)
        items = dict(st.items)
        version, epoch = st.version, st.epoch
        broken = False
        while version < target and not broken:
            batch = await checkpoint.diffs_page(self.redis, stream, after, 100)
            if not batch:
                break
            for eid, body in batch:
                after = eid
                try:
                    d = _diff_decoder.decode(body or b"")
                except (KeyError, msgspec.ValidationError, msgspec.DecodeError):
                    continue
                if d.symbol != st.symbol or d.version <= version:
                    continue
                # a snapshot version is installed with its checkpoint: one after the
                # checkpoint read means the model key was lost (a lossy restart)
                if d.version != version + 1 or d.snapshot:
                    broken = True
                    break
                items.update((k, v.copy()) for k, v in d.changed.items())  # not views
                for k in d.removed:
                    items.pop(k, None)
                version, epoch = d.version, d.epoch
                st.diff_id, st.ts_ns, st.meta = as_str(eid), d.ts_ns, d.meta
        if version == target:
            st.items, st.version, st.epoch = items, version, epoch
            return
        logger.error(
            "publisher %s %s: diffs after checkpoint v%d do not reach v%d; full re-publish",
            self.strategy,
            st.symbol,
            st.version,
            target,
        )
        st.items, st.version, st.epoch = {}, target, None

    # --- ingest ---------------------------------------------------------------------------
    async def _ingest(self, entries: list[Entry]) -> None:  # noqa: C901 -- owned by the heatmap helper
        wanted: dict[str, dict[str, int | None]] = {}  # sym -> tile id -> recv
        for eid, fields in entries:
            self.unacked.append(eid)
            if not fields:
                continue
            try:
                d = from_entry(fields, TileDelta)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                self.m_rejected.labels(self.strategy, "bad_entry").inc()
                logger.warning("rejected tile delta id=%r: %s", eid, exc)
                continue
            if d.strategy != self.strategy or d.symbol != self.symbol:
                self.m_rejected.labels(self.strategy, "wrong_strategy").inc()
                continue
            st = await self._state(d.symbol)
            if d.full or d.epoch != st.epoch:
                st.note_reconcile(d.recv_ts_ns)
                continue
            w = wanted.setdefault(d.symbol, {})
            r = d.recv_ts_ns
            if not w:
                w.update(dict.fromkeys(d.ids, r))
                continue
            for tid in d.ids:
                prev = w.get(tid, r)
                w[tid] = r if prev is None else (prev if r is None or prev < r else r)
        if not wanted:
            return
        syms = sorted(wanted)
        # MULTI: the staged epoch (manifest) and the values are read at one point in time
        # (an epoch install renames the staging hash and rewrites the manifest atomically).
        pipe = self.redis.pipeline(transaction=True)
        for sym in syms:
            pipe.hget(keys.heatmap_manifest(sym, self.strategy), "epoch")
            pipe.hmget(keys.heatmap_staging(sym, self.strategy), list(wanted[sym]))
        replies = await pipe.execute()
        for i, sym in enumerate(syms):
            man_b, vals = replies[2 * i], replies[2 * i + 1]
            st = self.syms[sym]
            if man_b is None or as_str(man_b) != st.epoch:
                for recv in wanted[sym].values():  # staging replaced since: another epoch
                    st.note_reconcile(recv)
                continue
            self._fold_staged(st, wanted[sym], vals)

    def _staged_json(self, tid: str | bytes, raw: bytes) -> msgspec.Raw | None:
        """The published view in a staged value ``b"<seq>:<json>"``; None (counted, logged)
        when unreadable. A view of ``raw``, not a copy: a new epoch's first publish reads
        the whole staging hash (48,900 butterfly tiles, ~15 MB) next to the old model."""
        c = raw.find(b":")
        if 0 < c < len(raw) - 1 and raw[:c].isdigit():  # hot path: no int() of the seq
            return msgspec.Raw(memoryview(raw)[c + 1 :])
        try:
            return msgspec.Raw(split_staged(raw)[1])
        except ValueError as exc:
            self.m_rejected.labels(self.strategy, "bad_staged_tile").inc()
            logger.error("unreadable staged tile %r: %s", tid, exc)
            return None

    def _fold_staged(
        self, st: SymState, wanted: dict[str, int | None], vals: list[bytes | None]
    ) -> None:
        """Fold the staged values read for ``wanted`` (tile id -> recv) like ``_fold``; a
        tile gone from staging asks for a reconcile. One loop without a call per tile on the
        usual path: it runs for every announced tile (~400k a minute in a replay of the
        simulator)."""
        items_get, pending, precv = st.items.get, st.pending, st.pending_recv
        raw_view = msgspec.Raw
        for (tid, recv), raw in zip(wanted.items(), vals, strict=True):
            if raw is None:
                st.note_reconcile(recv)
                continue
            c = raw.find(b":")
            if 0 < c < len(raw) - 1 and raw[:c].isdigit():
                js = raw_view(raw[c + 1 :])
            else:
                bad = self._staged_json(tid, raw)
                if bad is None:
                    continue
                js = bad
            if items_get(tid) == js:
                pending.pop(tid, None)
                precv.pop(tid, None)
                continue
            pending[tid] = js
            if recv is not None:
                cur = precv.get(tid)
                precv[tid] = recv if cur is None or recv < cur else cur

    @staticmethod
    def _fold(st: SymState, views: Iterable[tuple[str, msgspec.Raw, int | None]]) -> None:
        """Fold staged views into the pending changes: a view equal to the model's item
        cancels a pending change, any other becomes (or replaces) one, keeping the oldest
        receive time behind it. Runs for every announced tile: locals hoisted."""
        items_get, pending, precv = st.items.get, st.pending, st.pending_recv
        for tid, js, recv in views:
            if items_get(tid) == js:
                pending.pop(tid, None)
                precv.pop(tid, None)
                continue
            pending[tid] = js
            if recv is not None:
                cur = precv.get(tid)
                precv[tid] = recv if cur is None else min(cur, recv)

    # --- publish decisions ----------------------------------------------------------------
    async def _evaluate(self) -> None:
        try:
            await self._evaluate_symbols()
        finally:
            if self._release_due:
                # Here, not in _commit: the staging read and the checkpoint pieces
                # of the new epoch's first publish are garbage only once it returned.
                self._release_due = False
                release_freed_memory()

    async def _evaluate_symbols(self) -> None:
        now = self.clock.monotonic()
        for st in list(self.syms.values()):
            if not self.leader:
                return
            if st.needs_reconcile:
                # An incomplete staging is re-read at most once per max interval.
                if now - st.last_reconcile >= self.settings.max_interval_ms / 1000:
                    st.last_reconcile = now
                    await self._reconcile(st)
                continue
            if not st.pending:
                continue
            n = len(st.pending)
            if n >= self.settings.min_changed_tiles or (
                n * 100.0 >= self.settings.min_changed_pct * max(len(st.items), 1)
            ):
                await self._publish_pending(st, "value")
            elif now - st.last_publish >= self.settings.max_interval_ms / 1000:
                await self._publish_pending(st, "time")

    async def _reconcile(self, st: SymState) -> None:
        """Compare the staging hash with the model: first publish of a complete new epoch,
        or fold any difference into the pending changes."""
        sym = st.symbol
        pipe = self.redis.pipeline(transaction=True)  # manifest and staging at one instant
        pipe.hgetall(keys.heatmap_manifest(sym, self.strategy))
        pipe.get(keys.epoch_active(sym))
        pipe.hgetall(keys.heatmap_staging(sym, self.strategy))
        manifest, active_b, staged = await pipe.execute()
        man_epoch = as_str(manifest[b"epoch"]) if b"epoch" in manifest else None
        active = as_str(active_b) if active_b is not None else None
        if man_epoch is None or man_epoch != active:
            # Nothing staged, or staging holds a warming/retired epoch: publish nothing;
            # the builder announces the active epoch once installed.
            if man_epoch is not None:
                self.m_rejected.labels(self.strategy, "staging_not_active").inc()
            st.needs_reconcile = False
            return
        expected = int(manifest.get(b"expected", b"0"))
        try:
            st.roots = msgspec.json.decode(manifest.get(b"roots", b"{}"), type=dict[str, str])
        except msgspec.DecodeError:
            st.roots = {}
        tiles: dict[str, msgspec.Raw] = {}  # every staged tile is of the manifest's epoch
        for k, raw in staged.items():
            js = self._staged_json(k, raw)
            if js is not None:
                tiles[as_str(k)] = js
        del staged  # the whole staging hash as read: not kept alive through the publish
        recv = st.reconcile_recv
        if man_epoch != st.epoch:
            if len(tiles) < expected:
                return  # incomplete: keep needs_reconcile, retried on the next evaluation
            changed = {k: v for k, v in tiles.items() if st.items.get(k) != v}
            removed = sorted(set(st.items) - set(tiles))
            await self._commit(st, "complete", man_epoch, changed, removed, tiles, recv, expected)
            return
        st.needs_reconcile = False
        st.reconcile_recv = None
        self._fold(st, ((k, v, recv) for k, v in tiles.items()))
        gone = set(st.items) - set(tiles)
        for k in gone:  # cannot happen within one epoch (frozen topology); kept for safety
            st.pending[k] = None

    async def _publish_pending(self, st: SymState, condition: str) -> None:
        assert st.epoch is not None
        changed = {k: v for k, v in st.pending.items() if v is not None}
        removed = sorted(k for k, v in st.pending.items() if v is None)
        recvs = st.pending_recv.values()
        await self._commit(
            st, condition, st.epoch, changed, removed, None, min(recvs) if recvs else None, None
        )

    async def _commit(  # noqa: C901 -- owned by the heatmap helper
        self,
        st: SymState,
        condition: str,
        epoch: str,
        changed: dict[str, msgspec.Raw],
        removed: list[str],
        items: dict[str, msgspec.Raw] | None,
        recv: int | None,
        expected: int | None,
    ) -> None:
        """Publish version current + 1 = ``changed`` / ``removed`` applied to the model;
        ``items`` = the whole new model (a new epoch, or a re-publish of all staging), None
        = ``st.items`` with the changes applied (in place, once the publish succeeded: no
        copy of a 50k-item dict). A whole model is published as a snapshot version: its
        checkpoint installed with a diff that carries no items (``ModelDiff.snapshot``), so
        no reader takes the whole grid out of the stream."""
        t0 = self.clock.monotonic()
        version = st.version + 1
        now_ns = self.clock.time_ns()
        if items is None:
            n_items = len(st.items) + len(changed.keys() - st.items.keys())
            n_items -= len(st.items.keys() & removed)
        else:
            n_items = len(items)
        meta: dict[str, Any] = {"strategy": self.strategy, "n_tiles": n_items}
        if st.roots:
            meta["roots"] = st.roots  # option root per expiry (tickers of the legs)
        if expected is not None:
            meta["expected"] = expected
        snapshot = items is not None
        diff = ModelDiff(
            symbol=st.symbol,
            kind=self.kind,
            epoch=epoch,
            version=version,
            prev_version=version - 1,
            ts_ns=now_ns,
            changed={} if snapshot else changed,
            removed=[] if snapshot else removed,
            meta=meta,
            prev_id=st.head,
            src_recv_ts_ns=recv,
            snapshot=snapshot,
        )

        def model_of(its: dict[str, msgspec.Raw], diff_id: str) -> PublishedModel:
            return PublishedModel(
                symbol=st.symbol,
                kind=self.kind,
                epoch=epoch,
                version=version,
                ts_ns=now_ns,
                items=its,
                meta=meta,
                diff_id=diff_id,
            )

        whole = None if items is None else functools.partial(model_of, items)
        checkpoint = not snapshot and (
            t0 - st.last_checkpoint >= self.settings.checkpoint_ms / 1000
        )
        code, diff_id = await self._write(st.symbol, epoch, version, encode(diff), st.head, whole)
        if code == lua.Publish.OK and snapshot:
            st.checkpointed, st.last_checkpoint, st.checkpoint_id = version, t0, diff_id
        if code == lua.Publish.OK and items is None:
            items = st.items
            items.update(changed)
            for k in removed:
                items.pop(k, None)
        if code == lua.Publish.OK and checkpoint:
            assert items is not None
            model = model_of(items, diff_id)
            # Right after the diff, outside the publish script (a model of ~15 MB as a script
            # argument costs Redis two extra copies); a crash in between leaves the previous
            # checkpoint, which the diffs bring up to date.
            if await self._write_checkpoint(st.symbol, version, model) == lua.Publish.OK:
                st.checkpointed, st.last_checkpoint = version, t0
                st.checkpoint_id = diff_id
        self.m_publish_s.observe(self.clock.monotonic() - t0)
        if code == lua.Publish.OK:
            assert items is not None
            new_epoch = epoch != st.epoch
            st.epoch, st.version, st.items = epoch, version, items
            st.diff_id, st.ts_ns, st.meta = diff_id, now_ns, meta
            st.head = diff_id
            st.pending, st.pending_recv = {}, {}
            st.needs_reconcile, st.reconcile_recv = False, None
            st.last_publish = self.clock.monotonic()
            self.m_publishes.labels(self.strategy, condition).inc()
            self.m_version.labels(self.strategy, st.symbol).set(version)
            if recv is not None:
                self.m_latency.observe(max(0.0, (self.clock.time_ns() - recv) / 1e9))
            if new_epoch:  # the previous epoch's model was just dropped
                self._release_due = True
            return
        reason = _REJECTED[code]
        self.m_rejected.labels(self.strategy, reason).inc()
        logger.warning("publish %s %s v%d rejected: %s", self.strategy, st.symbol, version, reason)
        if code in (lua.Publish.FENCED, lua.Publish.LEASE_HELD):
            self.lease.drop()  # a stale leader: stop, leave entries pending for the new one
        elif code == lua.Publish.INACTIVE_EPOCH:
            st.pending, st.pending_recv = {}, {}
            st.needs_reconcile = True
            st.last_publish = self.clock.monotonic()  # retry no faster than max_interval
        elif code == lua.Publish.TORN:
            st.needs_reconcile = True  # the snapshot's temp key expired mid-write: redo it
        else:
            # Someone else moved the version, or Redis lost diffs we published (a restart
            # from an older RDB/AOF): continue from what Redis holds. Clients that saw the
            # lost versions see a prev_id that is not theirs and re-read.
            logger.warning(
                "publisher %s %s: version/chain head moved under us (had v%d); resync",
                self.strategy,
                st.symbol,
                st.version,
            )
            self.syms.pop(st.symbol, None)
            await self._state(st.symbol)

    async def _write(
        self,
        sym: str,
        epoch: str,
        version: int,
        diff_json: bytes,
        prev_id: str | None,
        whole: Callable[[str], PublishedModel] | None = None,
    ) -> tuple[lua.Publish, str]:
        """One script (lua/heatmap_publish.lua): check fence, lease holder, active epoch, version =
        current + 1 and ``prev_id`` = the chain head, then XADD the diff with an explicit
        id, SET the version key, the head and the lease: one round trip per publish. The diff
        id is picked here, above both the clock's millisecond and our previous id; if the
        stream's top id is higher anyway (another leader's diff in the same millisecond),
        the script says so and a later id is picked. An absent (expired) lease with an
        unchanged fence is still ours and is re-set. ``whole``: a snapshot version, whose
        model (given its diff id) is first written piece by piece into this leader's temp
        key, which the script renames onto the model key with the diff. Returns (code, diff
        id); the codes are ``lua.Publish`` (never ID_TOO_LOW: that one is retried here)."""
        token = self.token
        if whole is not None and token is None:
            return lua.Publish.FENCED, ""
        tmp = keys.heatmap_model_tmp(sym, self.strategy, token or 0)
        k = [
            self.lease.fence_key,
            self.lease.lease_key,
            keys.epoch_active(sym),
            keys.heatmap_version(sym, self.strategy),
            keys.heatmap_diffs_stream(self.strategy, sym),
            keys.heatmap_head(sym, self.strategy),
        ]
        floor = self._last_diff_id
        while True:
            now_ms = self.clock.time_ns() // 1_000_000
            ms, seq = (now_ms, 0) if now_ms > floor[0] else (floor[0], floor[1] + 1)
            diff_id = f"{ms}-{seq}"
            extra_k: list[str] = []
            extra_a: list[str] = []
            if whole is not None:
                size = await self._stage_model(tmp, whole(diff_id))
                extra_k = [tmp, keys.heatmap_model(sym, self.strategy)]
                extra_a = [str(size)]
            res: Any = await self._publish(
                self.redis,
                k + extra_k,
                [
                    str(self.lease.token),
                    self.lease.value,
                    epoch,
                    str(version),
                    diff_id,
                    diff_json,
                    str(self.settings.lease_ttl_ms),
                    self._retention.minid(ms, seq, len(diff_json), self._pinned()),
                    prev_id or "",
                    *extra_a,
                ],
            )
            code = lua.Publish(int(res[0]))
            if code == lua.Publish.ID_TOO_LOW:
                lm, ls = (int(x) for x in as_str(res[1]).split("-"))
                floor = max(floor, (lm, ls))
                continue
            if code == lua.Publish.OK:
                self._last_diff_id = (ms, seq)
                self._retention.added(ms, seq, len(diff_json))
            return code, diff_id

    def _pinned(self) -> tuple[int, int] | None:
        """The oldest checkpoint whose later diffs a reader still needs (checkpoint + the
        diffs after it = the current model): retention never trims past it, so the stream
        keeps at least ``checkpoint_ms`` of diffs whatever its byte budget."""
        pins = [
            _stream_id(st.checkpoint_id)
            for st in self.syms.values()
            if st.checkpoint_id and st.checkpointed < st.version
        ]
        return min(pins) if pins else None

    async def _checkpoint_idle(self) -> None:
        """Nothing pending and nothing published for ``checkpoint_idle_ms``: write the model
        key for the last published version, so a quiet publisher leaves the canonical model
        exactly current."""
        now = self.clock.monotonic()
        for st in list(self.syms.values()):
            if not self.leader:
                return
            if st.pending or st.needs_reconcile or st.version <= st.checkpointed:
                continue
            if st.epoch is None or st.diff_id is None:
                continue
            if now - st.last_publish < self.settings.checkpoint_idle_ms / 1000:
                continue
            model = PublishedModel(
                symbol=st.symbol,
                kind=self.kind,
                epoch=st.epoch,
                version=st.version,
                ts_ns=st.ts_ns,
                items=st.items,
                meta=st.meta,
                diff_id=st.diff_id,
            )
            rc = await self._write_checkpoint(st.symbol, st.version, model)
            if rc == lua.Publish.OK:
                st.checkpointed, st.last_checkpoint = st.version, self.clock.monotonic()
                st.checkpoint_id = st.diff_id
            elif rc == lua.Publish.TORN:  # the temp key expired mid-write: next idle tick
                continue
            elif rc == lua.Publish.FENCED:
                self.lease.drop()  # fenced: a stale leader stops
                return
            else:  # the version moved on under us: resync
                self.syms.pop(st.symbol, None)
                await self._state(st.symbol)

    async def _write_checkpoint(self, sym: str, version: int, model: PublishedModel) -> lua.Publish:
        """Make ``model`` (an already published ``version``) the model key, if this leader
        is not fenced and the version key still says ``version``: its JSON is written piece
        by piece into this leader's temp key, then one fenced script
        (lua/heatmap_checkpoint.lua) renames it onto the model key, so readers see the old
        checkpoint or the new one whole. Never one ~15 MB buffer here: built and sent whole
        (the JSON, and the transport's copy of it), a butterfly checkpoint raised the
        publisher's RSS from 116.5 to up to 131.2 MB (12.6 %) at its writes; in pieces it
        stayed within 112.2-116.9 MB (4.2 %): bench/publisher_rss.py, docs/performance.md
        "Process RSS". OK written, FENCED fenced or lease held by
        another owner, MOVED version moved on, TORN the temp key expired mid-write."""
        token = self.token
        if token is None:
            return lua.Publish.FENCED
        tmp = keys.heatmap_model_tmp(sym, self.strategy, token)
        size = await self._stage_model(tmp, model)
        res: Any = await self._checkpoint(
            self.redis,
            [
                self.lease.fence_key,
                self.lease.lease_key,
                keys.heatmap_version(sym, self.strategy),
                tmp,
                keys.heatmap_model(sym, self.strategy),
            ],
            [str(token), self.lease.value, str(version), str(size)],
        )
        return lua.Publish(int(res))

    async def _stage_model(self, tmp: str, model: PublishedModel) -> int:
        """Write ``model``'s marked JSON into temp key ``tmp`` piece by piece; its size."""
        pieces = encode_model_pieces(model, marked=True)
        return await checkpoint.write_pieces(self.redis, tmp, pieces, CHECKPOINT_TMP_TTL_MS)

    async def _ack_if_idle(self) -> None:
        if not self.unacked or not self.leader:
            return
        if any(st.pending or st.needs_reconcile for st in self.syms.values()):
            return
        await self.redis.xack(self.stream, self.group, *self.unacked)
        self.unacked = []


def _stream_id(v: str) -> tuple[int, int]:
    a, _, b = v.partition("-")
    return int(a), int(b or 0)


class Publishers(PerSymbol):
    """``publisher:<strategy>``: one :class:`Publisher` per configured symbol, each with its
    own lease, tile stream and keys (one ``{<SYM>}`` slot), so the symbols of a strategy are
    led, and published, independently: by different replicas, from different shards."""

    def __init__(self, deps: Deps, strategy: str, cfg: PublisherSettings) -> None:
        members = [Publisher(deps, strategy, cfg, s) for s in deps.settings.symbols]
        super().__init__(f"publisher:{strategy}", members)


def build(deps: Deps, arg: str | None) -> Publishers:
    if not arg:
        raise ValueError(f"publisher needs a strategy: publisher:<{'|'.join(keys.STRATEGIES)}>")
    return Publishers(deps, arg, from_env(PublisherSettings))
