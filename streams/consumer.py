"""Consumer-group read loop: at-least-once, pipelined acks, reclaim, dead letters.

Life of an entry: XREADGROUP ``>`` delivers it; the handler's effect is written to Redis;
its id is XACKed in the same round trip as the next XREADGROUP. A handler that raises
leaves its entries pending; the reclaim pass (XPENDING IDLE + XCLAIM, on this or any other
consumer) redelivers them after ``min_idle_ms``; an entry delivered ``max_deliveries`` times
without an ack is copied to ``<stream>:dead`` and acked, so one poison entry never stalls
the group. On start, and again after a lost Redis connection, a consumer first
re-processes its own pending entries (a crash, or a read whose reply was lost, left them
there); a handler cut off by a lost connection is not a poison entry: nothing is isolated or
counted as an error, the batch simply stays pending for that drain. A vanished group
(stream deleted, FLUSHALL) is re-created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas import keys
from streams.heartbeat import Heartbeats
from streams.metrics import ConsumerMetrics
from streams.redis_client import as_str
from streams.retry import REDIS_BACKOFF, REDIS_UNAVAILABLE, sleep_or_stop
from streams.spec import StreamSpec

logger = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
"""(stream entry id, fields) exactly as Redis returned them."""

Handler = Callable[[list[Entry]], Awaitable[None]]

# A handler failing with one of these leaves its batch pending as a whole (no isolation).
_NOT_A_BAD_ENTRY: tuple[type[BaseException], ...] = (asyncio.CancelledError, *REDIS_UNAVAILABLE)


class GroupConsumer:
    """Reads one stream through one consumer group and feeds batches to ``handler``.

    The handler is never called concurrently with itself. It must be idempotent: every
    entry is delivered at least once, possibly more (redelivery after a crash).
    """

    def __init__(
        self,
        redis: Redis,
        spec: StreamSpec,
        handler: Handler,
        registry: CollectorRegistry,
        processor: str,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.redis = redis
        self.spec = spec
        self.handler = handler
        self.heartbeats = heartbeats
        self.beat_name = f"{processor}:{spec.stream}"
        self.metrics = ConsumerMetrics(registry, processor, spec.stream, spec.group)
        self.dead_stream = keys.dead_letter_stream(spec.stream)
        self.ready = False
        self.backoff = REDIS_BACKOFF
        self._last_reclaim = 0.0
        # True while the read (XACK of the previous batch + XREADGROUP) is in flight: the
        # consumer holds no entry. A replay driver in the same process watches it (and
        # ``on_read``, called as each read is sent) to ask Redis whether the groups caught up
        # only when every consumer has finished what it held.
        self.reading = False
        self.on_read: Callable[[], None] | None = None

    # --- group lifecycle ---------------------------------------------------------------
    async def ensure_group(self) -> None:
        """XGROUP CREATE ... MKSTREAM, ignoring only BUSYGROUP (it already exists)."""
        try:
            await self.redis.xgroup_create(
                self.spec.stream, self.spec.group, id=self.spec.start_id, mkstream=True
            )
            logger.info("group created stream=%s group=%s", self.spec.stream, self.spec.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _on_nogroup(self, exc: ResponseError) -> bool:
        # NOGROUP: the group is gone; UNBLOCKED: the stream key was deleted under a BLOCK.
        if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
            return False
        logger.warning(
            "group vanished, re-creating stream=%s group=%s", self.spec.stream, self.spec.group
        )
        self.metrics.group_recreated.inc()
        await self.ensure_group()
        return True

    # --- main loop ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set. A lost Redis connection (restart, failover, AOF
        loading) is retried in-process with capped, jittered backoff rather than crashing the
        pod into CrashLoopBackOff; acks not known to have landed are re-sent (XACK is
        idempotent) and unacked entries stay pending for redelivery."""
        to_ack: list[bytes] = []
        started = False
        failures = 0
        try:
            while not stop.is_set():
                if self.heartbeats is not None:
                    self.heartbeats.beat(self.beat_name)
                try:
                    if not started:
                        await self.ensure_group()
                        if to_ack:
                            await self.redis.xack(self.spec.stream, self.spec.group, *to_ack)
                            to_ack = []
                        await self.recover(own=True)
                        started = True
                        self._last_reclaim = time.monotonic()
                    to_ack = await self._step(to_ack)
                    failures = 0
                    self.ready = True
                except REDIS_UNAVAILABLE as exc:
                    # Entries delivered by a read whose reply was lost, and the batch whose
                    # handler was cut off, sit in our own PEL: drain it again on reconnect
                    # rather than waiting min_idle_ms for the reclaim (or another replica).
                    self.ready = False
                    started = False
                    failures += 1
                    self.metrics.redis_errors.inc()
                    delay = self.backoff.delay_s(failures)
                    logger.warning(
                        "redis unavailable stream=%s group=%s attempt=%d retry_in_s=%.2f: %s",
                        self.spec.stream,
                        self.spec.group,
                        failures,
                        delay,
                        exc,
                    )
                    await sleep_or_stop(stop, delay)
        finally:
            if self.heartbeats is not None:
                self.heartbeats.forget(self.beat_name)
            if to_ack:
                # Finish what we processed: ack it before leaving (SIGTERM path).
                with contextlib.suppress(*REDIS_UNAVAILABLE):
                    await self.redis.xack(self.spec.stream, self.spec.group, *to_ack)

    async def _step(self, to_ack: list[bytes]) -> list[bytes]:
        """One read/handle iteration; returns the ids to ack with the next read."""
        spec = self.spec
        if time.monotonic() - self._last_reclaim >= spec.reclaim_interval_s:
            if to_ack:
                await self.redis.xack(spec.stream, spec.group, *to_ack)
                to_ack = []
            await self.recover(own=False)
            self._last_reclaim = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        if to_ack:
            pipe.xack(spec.stream, spec.group, *to_ack)
        pipe.xreadgroup(
            spec.group, spec.consumer, {spec.stream: ">"}, count=spec.count, block=spec.block_ms
        )
        self.reading = True
        if self.on_read is not None:
            self.on_read()
        try:
            res = await pipe.execute()
        except ResponseError as exc:
            if await self._on_nogroup(exc):
                return []
            raise
        finally:
            self.reading = False
        batch = res[-1]
        if not batch:
            return []
        entries: list[Entry] = batch[0][1]
        return await self._process(entries)

    async def _process(self, entries: list[Entry]) -> list[bytes]:
        """Run the handler; returns the ids to ack (the ones whose effect is done)."""
        live = [e for e in entries if e[1]]
        gone = [e[0] for e in entries if not e[1]]  # deleted/trimmed while pending
        if not live:
            return gone
        t0 = time.perf_counter()
        try:
            await self.handler(live)
            done = [e[0] for e in live]
        except _NOT_A_BAD_ENTRY:
            # Redis unavailable (a failover too) is not a bad entry: nothing is acked, the run
            # loop retries the connection and re-drains our pending entries.
            raise
        except Exception:
            # Isolate the bad entries: retry one by one, ack the good ones.
            done = []
            if len(live) == 1:
                self.metrics.errors.inc()
                logger.exception("handler failed id=%s stream=%s", live[0][0], self.spec.stream)
            else:
                for e in live:
                    try:
                        await self.handler([e])
                        done.append(e[0])
                    except _NOT_A_BAD_ENTRY:
                        raise
                    except Exception:
                        self.metrics.errors.inc()
                        logger.exception("handler failed id=%s stream=%s", e[0], self.spec.stream)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(live))
        self.metrics.processed.inc(len(done))
        return done + gone

    # --- recovery ----------------------------------------------------------------------
    async def recover(self, *, own: bool) -> int:
        """Re-process pending entries: our own (any idle time) at start, or anyone's idle
        past ``min_idle_ms``. Returns how many entries were handled or dead-lettered."""
        spec = self.spec
        cursor = "-"
        total = 0
        while True:
            try:
                pending: list[dict[str, Any]] = await self.redis.xpending_range(
                    spec.stream,
                    spec.group,
                    min=cursor,
                    max="+",
                    count=spec.count,
                    consumername=spec.consumer if own else None,
                    idle=None if own else spec.min_idle_ms,
                )
            except ResponseError as exc:
                if await self._on_nogroup(exc):
                    return total
                raise
            if not pending:
                return total
            cursor = "(" + as_str(pending[-1]["message_id"])
            total += await self._claim_and_process(pending, own=own)
            if len(pending) < spec.count:
                return total

    async def _claim_and_process(self, pending: Sequence[dict[str, Any]], *, own: bool) -> int:
        spec = self.spec
        ids = [p["message_id"] for p in pending]
        claimed: list[Entry] = await self.redis.xclaim(  # type: ignore[assignment]
            spec.stream,
            spec.group,
            spec.consumer,
            min_idle_time=0 if own else spec.min_idle_ms,
            message_ids=ids,
        )
        if not own:
            self.metrics.reclaimed.inc(len(claimed))
        delivered = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        poison = [e for e in claimed if e[1] and delivered.get(e[0], 0) >= spec.max_deliveries]
        retry = [e for e in claimed if not (e[1] and delivered.get(e[0], 0) >= spec.max_deliveries)]
        if poison:
            await self._dead_letter(poison, delivered)
        done = await self._process(retry) if retry else []
        if done:
            await self.redis.xack(spec.stream, spec.group, *done)
        return len(poison) + len(done)

    async def _dead_letter(self, entries: list[Entry], delivered: dict[bytes, int]) -> None:
        spec = self.spec
        pipe = self.redis.pipeline(transaction=True)
        for eid, fields in entries:
            dl = dict(fields)
            dl[b"_source_id"] = eid
            dl[b"_group"] = spec.group.encode()
            dl[b"_deliveries"] = str(delivered.get(eid, 0)).encode()
            pipe.xadd(self.dead_stream, dl, maxlen=spec.dead_letter_maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.xack(spec.stream, spec.group, *[e[0] for e in entries])
        await pipe.execute()
        self.metrics.dead_lettered.inc(len(entries))
        for eid, _ in entries:
            logger.error(
                "dead-lettered id=%s stream=%s group=%s deliveries=%d",
                as_str(eid),
                spec.stream,
                spec.group,
                delivered.get(eid, 0),
            )
