"""``monitor``: Prometheus gauges for the pipeline's Redis state, refreshed on a cadence.

Every ``interval_s`` it reads (Redis >= 7 for lag):

* per stream: ``massive_stream_length{stream}``; per consumer group (``XINFO GROUPS`` via
  :func:`streams.admin.lag`): ``massive_stream_group_lag{stream,group}``,
  ``massive_stream_group_pending``, ``massive_stream_group_consumers``. A lag Redis cannot
  tell (offsets reset by a plain ``XGROUP SETID`` without ``ENTRIESREAD``, or deletions in
  the unread range) is exported as NaN with ``massive_stream_group_lag_unknown`` = 1,
  never as a fake 0;
* dead letters: ``massive_dead_letter_length{stream}`` (length of ``<stream>:dead``, labelled
  with the source stream);
* ``massive_epoch_active_age_seconds{symbol}`` (now - promoted_ns of the active epoch);
* per published model: ``massive_model_publish_age_seconds{symbol,model}`` (now - the model
  key's ts_ns) and ``massive_model_version{symbol,model}``, read from the key's first
  ``STAMP_PREFIX_BYTES`` (GETRANGE: the models are megabytes; a value laid out otherwise is
  read and decoded whole); a heatmap model key is a
  checkpoint (see processors/heatmap/publisher.py), at most ``checkpoint_ms`` (5 s) behind the
  latest diff while publishing, so both trail the diffs by that much at most;
* WS dormancy: ``massive_ws_last_event_age_seconds`` (now - ``keys.WS_LAST_EVENT``).

Series of streams, groups and models that disappeared are removed, not frozen. Its
``/metrics`` is served by the runner on ``MASSIVE_METRICS_PORT``. Settings: env prefix
``MASSIVE_MONITOR_``.

Retention: the monitor also runs the stream janitor (:mod:`streams.retention`, settings
``MASSIVE_RETENTION_``) every ``interval_s`` of those settings: every pipeline stream is kept
within its age and byte budget, never trimming past a consumer group without counting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import keys
from schemas import symbols as known_symbols
from streams import admin
from streams.metrics import counter, gauge, histogram, redis_outages
from streams.processor import Deps
from streams.redis_client import as_str
from streams.retention import Policy, RetentionSettings, StreamJanitor, Trimmed
from streams.retry import REDIS_UNAVAILABLE, sleep_or_stop
from streams.runner import cancel_and_wait
from streams.settings import env_settings, from_env

logger = logging.getLogger(__name__)

NS = 1_000_000_000


@env_settings("MASSIVE_MONITOR_")
@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """Env prefix ``MASSIVE_MONITOR_``."""

    interval_s: float = 5.0
    # Extra streams to watch, found with SCAN MATCH (empty: only the pipeline's own streams).
    scan_pattern: str = ""

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("interval_s must be > 0")


def every_symbol() -> list[str]:
    """Every symbol configured (``MASSIVE_SYMBOLS``) or with a spec: the per-symbol streams
    a tool looks for when it is not told which symbols ran."""
    reg = known_symbols.registry()
    return list(dict.fromkeys([*reg.configured, *reg.specs]))


def pipeline_streams(symbols: Iterable[str] | None = None) -> list[str]:
    """Every stream the pipeline defines (schemas.keys), without dead-letter streams: the
    shared ones and the per-symbol ones of ``symbols`` (default: every symbol configured or
    with a spec; a stream that does not exist is skipped by the callers)."""
    if symbols is None:
        symbols = every_symbol()
    out = [keys.CHAIN_STREAM, keys.SPOT_STREAM, keys.WS_STREAM, keys.CONTROL_STREAM]
    return out + keys.symbol_streams(symbols)


def model_keys(symbol: str) -> list[tuple[str, str]]:
    """(model label, canonical model key) of every published model of ``symbol``."""
    out = [(f"heatmap:{s}", keys.heatmap_model(symbol, s)) for s in keys.STRATEGIES]
    out.append(("gex", keys.gex_model(symbol)))
    return out


class _ModelStamp(msgspec.Struct):
    """The part of a PublishedModel the monitor needs (other fields are skipped)."""

    version: int
    ts_ns: int


_stamp_decoder = msgspec.json.Decoder(_ModelStamp)
# A model key holds megabytes (a 50k-tile heatmap ~15 MB); its stamp is in the first bytes:
# PublishedModel / RawModel encode symbol, kind, epoch, version, ts_ns before the items.
STAMP_PREFIX_BYTES = 512
_STAMP_RE = re.compile(
    rb'\{"symbol":"[^"\\]*","kind":"[^"\\]*","epoch":"[^"\\]*","version":(\d+),"ts_ns":(\d+)[,}]'
)


def _stamp(prefix: bytes) -> _ModelStamp | None:
    """Version and ts_ns from the first bytes of a model key; None when they are not laid
    out as the model structs write them (the caller then reads the whole value)."""
    m = _STAMP_RE.match(prefix)
    return None if m is None else _ModelStamp(version=int(m[1]), ts_ns=int(m[2]))


class _Family:
    """A labelled gauge whose label sets not seen in the latest poll are removed."""

    def __init__(self, deps: Deps, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.gauge = gauge(deps.registry, name, doc, labels)
        self.seen: set[tuple[str, ...]] = set()
        self.previous: set[tuple[str, ...]] = set()

    def set(self, labels: tuple[str, ...], value: float) -> None:
        (self.gauge.labels(*labels) if labels else self.gauge).set(value)
        self.seen.add(labels)

    def sweep(self) -> None:
        for gone in self.previous - self.seen:
            if gone:
                with contextlib.suppress(KeyError):
                    self.gauge.remove(*gone)
            else:  # an unlabelled gauge cannot be removed: NaN says "no value"
                self.gauge.set(math.nan)
        self.previous, self.seen = self.seen, set()


class Monitor:
    name = "monitor"

    def __init__(
        self, deps: Deps, settings: MonitorSettings, retention: RetentionSettings | None = None
    ) -> None:
        self.deps = deps
        self.redis: Redis = deps.redis
        self.clock = deps.clock
        self.settings = settings
        self._ready = False
        reg = deps.registry
        self.length = _Family(deps, "massive_stream_length", "XLEN of a stream", ("stream",))
        self.lag = _Family(
            deps,
            "massive_stream_group_lag",
            "Entries of the stream not yet delivered to the group (XINFO GROUPS lag; NaN "
            "when Redis cannot tell)",
            ("stream", "group"),
        )
        self.lag_unknown = _Family(
            deps,
            "massive_stream_group_lag_unknown",
            "1 when XINFO GROUPS reports a nil lag (offset reset without ENTRIESREAD, or "
            "deleted entries in the unread range)",
            ("stream", "group"),
        )
        self.pending = _Family(
            deps,
            "massive_stream_group_pending",
            "Entries delivered to the group and not yet acked (PEL size)",
            ("stream", "group"),
        )
        self.consumers = _Family(
            deps, "massive_stream_group_consumers", "Consumers in the group", ("stream", "group")
        )
        self.dead = _Family(
            deps,
            "massive_dead_letter_length",
            "Entries in <stream>:dead (labelled with the source stream)",
            ("stream",),
        )
        self.epoch_age = _Family(
            deps,
            "massive_epoch_active_age_seconds",
            "Seconds since the active epoch of a symbol was promoted",
            ("symbol",),
        )
        self.publish_age = _Family(
            deps,
            "massive_model_publish_age_seconds",
            "Seconds since the published model's ts_ns",
            ("symbol", "model"),
        )
        self.version = _Family(
            deps, "massive_model_version", "Version of the published model", ("symbol", "model")
        )
        self.ws_age = _Family(
            deps,
            "massive_ws_last_event_age_seconds",
            "Seconds since the last WebSocket event (keys.WS_LAST_EVENT); WS dormancy",
            (),
        )
        self.families = [
            self.length,
            self.lag,
            self.lag_unknown,
            self.pending,
            self.consumers,
            self.dead,
            self.epoch_age,
            self.publish_age,
            self.version,
            self.ws_age,
        ]
        self.retention = retention or RetentionSettings()
        self.janitor = StreamJanitor(self.redis, reg)
        self.m_redis_errors = redis_outages(reg, self.name)
        self.polls = counter(reg, "massive_monitor_polls_total", "Completed monitor polls")
        self.poll_errors = counter(
            reg, "massive_monitor_poll_errors_total", "Monitor poll failures", ("reason",)
        )
        self.poll_seconds = histogram(
            reg, "massive_monitor_poll_duration_seconds", "Time to read one snapshot"
        )
        self.last_poll = gauge(
            reg,
            "massive_monitor_last_poll_timestamp_seconds",
            "Clock time of the last completed poll (unix seconds)",
        )

    @property
    def ready(self) -> bool:
        return self._ready

    async def run(self, stop: asyncio.Event) -> None:
        await self._check_version()
        janitor = None
        if self.retention.enabled:
            janitor = asyncio.create_task(self._retention_loop(stop), name="monitor:retention")
        try:
            while not stop.is_set():
                self.deps.heartbeats.beat(self.name)
                await self.poll_once()
                await sleep_or_stop(stop, self.settings.interval_s)
        finally:
            if janitor is not None:
                # a pass in flight when Redis dies can swallow one cancellation (it skips
                # the pass on a dead socket and sleeps): sent again until it ends
                await cancel_and_wait([janitor])

    async def _retention_loop(self, stop: asyncio.Event) -> None:
        policies = self.retention.policies(self.deps.settings.symbols)
        while not stop.is_set():
            await self.retention_pass(policies)
            await sleep_or_stop(stop, self.retention.interval_s)

    async def retention_pass(self, policies: dict[str, Policy]) -> list[Trimmed]:
        """One janitor pass over every existing stream; a Redis outage skips the pass."""
        out: list[Trimmed] = []
        now_ms = self.clock.time_ns() // 1_000_000
        try:
            pipe = self.redis.pipeline(transaction=False)
            for name in policies:
                pipe.type(name)
            types = await pipe.execute()
            for (name, policy), t in zip(policies.items(), types, strict=True):
                if as_str(t) == "stream":
                    out.append(await self.janitor.trim(name, policy, now_ms))
        except REDIS_UNAVAILABLE as exc:
            self.m_redis_errors.inc()
            logger.warning("monitor: retention pass skipped, redis unavailable: %s", exc)
        return out

    async def _check_version(self) -> None:
        try:
            info: dict[str, Any] = await self.redis.info("server")
        except RedisError as exc:
            logger.warning("monitor: INFO server failed: %s", exc)
            return
        version = str(info.get("redis_version", "0"))
        if int(version.split(".")[0] or 0) < 7:
            logger.warning(
                "monitor: Redis %s < 7.0: XINFO GROUPS has no lag; lag series will be NaN",
                version,
            )

    async def poll_once(self) -> bool:
        """Read one snapshot and update every gauge; False (counted, logged) on failure."""
        t0 = self.clock.monotonic()
        try:
            await self._poll()
        except (RedisError, OSError, ValueError) as exc:
            reason = type(exc).__name__
            self.poll_errors.labels(reason).inc()
            logger.warning("monitor poll failed: %s: %s", reason, exc)
            for fam in self.families:
                fam.seen = set(fam.previous)  # keep the last values; sweep nothing
            return False
        for fam in self.families:
            fam.sweep()
        self.poll_seconds.observe(max(0.0, self.clock.monotonic() - t0))
        self.polls.inc()
        self.last_poll.set(self.clock.time_ns() / NS)
        self._ready = True
        return True

    async def _streams(self) -> list[str]:
        base = pipeline_streams(self.deps.settings.symbols)
        names = base + [keys.dead_letter_stream(s) for s in base]
        if self.settings.scan_pattern:
            names += await admin.stream_names(self.redis, self.settings.scan_pattern)
        names = sorted(set(names))
        pipe = self.redis.pipeline(transaction=False)
        for n in names:
            pipe.type(n)
        types = await pipe.execute()
        return [n for n, t in zip(names, types, strict=True) if as_str(t) == "stream"]

    async def _poll_models(self, sym: str, now_ns: int) -> None:
        """Publish age and version of every model of ``sym``."""
        labels_keys = model_keys(sym)
        pipe = self.redis.pipeline(transaction=False)
        for _, k in labels_keys:
            pipe.getrange(k, 0, STAMP_PREFIX_BYTES - 1)
        prefixes = await pipe.execute()
        for (model, key), prefix in zip(labels_keys, prefixes, strict=True):
            if not prefix:  # absent (a model is never empty)
                continue
            stamp = _stamp(prefix)
            if stamp is None:  # not the usual layout: decode the whole value
                raw = await self.redis.get(key)
                if raw is None:
                    continue
                try:
                    stamp = _stamp_decoder.decode(raw)
                except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                    self.poll_errors.labels("bad_model").inc()
                    logger.warning("monitor: unreadable model %s: %s", key, exc)
                    continue
            self.publish_age.set((sym, model), (now_ns - stamp.ts_ns) / NS)
            self.version.set((sym, model), stamp.version)

    async def _poll(self) -> None:
        now_ns = self.clock.time_ns()
        streams = await self._streams()
        dead_suffix = keys.DEAD_SUFFIX
        for s in streams:
            length = int(await self.redis.xlen(s))
            self.length.set((s,), length)
            if s.endswith(dead_suffix):
                self.dead.set((s[: -len(dead_suffix)],), length)
        for g in await admin.lag(self.redis, streams):
            lbl = (g.stream, g.group)
            self.lag.set(lbl, math.nan if g.lag is None else g.lag)
            self.lag_unknown.set(lbl, 1 if g.lag is None else 0)
            self.pending.set(lbl, g.pending)
            self.consumers.set(lbl, g.consumers)

        # MASSIVE_SYMBOLS are watched even before an epoch is active
        symbols = sorted(self.deps.settings.symbols)
        pipe = self.redis.pipeline(transaction=False)
        for sym in symbols:
            pipe.get(keys.epoch_active(sym))
        replies = await pipe.execute()
        active = {s: as_str(v) for s, v in zip(symbols, replies, strict=True) if v is not None}
        for sym in symbols:
            eid = active.get(sym)
            if eid is not None:
                meta = await self.redis.hmget(
                    keys.epoch_meta(sym, eid), ["promoted_ns", "created_ns"]
                )
                since = meta[0] or meta[1]
                if since:
                    self.epoch_age.set((sym,), (now_ns - int(since)) / NS)
            await self._poll_models(sym, now_ns)

        last_ws = await self.redis.get(keys.WS_LAST_EVENT)
        if last_ws is not None:
            self.ws_age.set((), (now_ns - int(last_ws)) / NS)


def build(deps: Deps, arg: str | None) -> Monitor:
    if arg:
        raise ValueError(f"monitor takes no argument (got {arg!r})")
    return Monitor(
        deps,
        from_env(MonitorSettings),
        from_env(RetentionSettings),
    )
