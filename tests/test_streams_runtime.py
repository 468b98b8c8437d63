"""The consumer-group runtime against a real Redis: delivery, crash recovery, dead letters,
offset reset, group re-creation and graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from schemas import keys
from streams import admin
from streams.consumer import Entry, GroupConsumer
from streams.retry import Backoff
from streams.spec import StreamSpec
from tests.util import RedisServer, eventually

STREAM = "massive:test:stream"
GROUP = "g"


def spec(consumer: str = "c1", **kw: object) -> StreamSpec:
    params: dict[str, object] = dict(
        stream=STREAM,
        group=GROUP,
        consumer=consumer,
        count=50,
        block_ms=20,
        min_idle_ms=150,
        reclaim_interval_s=0.05,
        max_deliveries=3,
    )
    params.update(kw)
    return StreamSpec(**params)  # type: ignore[arg-type]


async def fill(redis: Redis, n: int, start: int = 0) -> list[bytes]:
    pipe = redis.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd(STREAM, {b"n": str(i).encode()})
    return list(await pipe.execute())


async def group_info(redis: Redis) -> dict[str, int | None]:
    for g in await admin.lag(redis, [STREAM]):
        if g.group == GROUP:
            return {"pending": g.pending, "lag": g.lag, "entries_read": g.entries_read}
    return {"pending": None, "lag": None, "entries_read": None}


class Recorder:
    def __init__(self) -> None:
        self.seen: Counter[int] = Counter()
        self.failures: Counter[int] = Counter()  # n -> times it still fails
        self.poison: set[int] = set()
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, entries: list[Entry]) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        for _, fields in entries:
            n = int(fields[b"n"])
            if n in self.poison:
                raise ValueError(f"poison {n}")
            if self.failures[n] > 0:
                self.failures[n] -= 1
                raise RuntimeError(f"transient {n}")
        for _, fields in entries:
            self.seen[int(fields[b"n"])] += 1


async def test_every_entry_processed_and_acked(redis: Redis, registry: CollectorRegistry) -> None:
    await fill(redis, 1000)
    rec = Recorder()
    # Fails in its batch and in the one-by-one retry: left pending, then reclaimed.
    rec.failures.update({7: 2, 500: 2})
    stop = asyncio.Event()
    c = GroupConsumer(redis, spec(), rec, registry, "t")
    task = asyncio.create_task(c.run(stop))

    async def done() -> bool:
        info = await group_info(redis)
        return set(rec.seen) == set(range(1000)) and info["pending"] == 0

    await eventually(done, timeout_s=10)
    stop.set()
    await task
    info = await group_info(redis)
    assert info == {"pending": 0, "lag": 0, "entries_read": 1000}
    # Transient failures were retried by the reclaim pass; good entries of their batch
    # were not held back.
    assert rec.seen[7] == 1 and rec.seen[500] == 1
    assert (
        registry.get_sample_value(
            "massive_errors_total", {"processor": "t", "stream": STREAM, "group": GROUP}
        )
        == 2.0
    )


async def test_killed_consumer_entries_reclaimed_by_another(
    redis: Redis, registry: CollectorRegistry
) -> None:
    await fill(redis, 120)
    stuck = Recorder()
    stuck.gate = asyncio.Event()  # never opens: the consumer hangs mid-batch
    a = GroupConsumer(redis, spec("a", count=40), stuck, registry, "t")
    stop_a = asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    await asyncio.wait_for(stuck.entered.wait(), 5)
    task_a.cancel()  # crash: nothing acked
    with pytest.raises(asyncio.CancelledError):
        await task_a
    pending = await redis.xpending(STREAM, GROUP)
    assert pending["pending"] == 40

    rec = Recorder()
    b = GroupConsumer(redis, spec("b"), rec, registry, "t")
    stop_b = asyncio.Event()
    task_b = asyncio.create_task(b.run(stop_b))

    async def all_done() -> bool:
        return set(rec.seen) == set(range(120)) and (await group_info(redis))["pending"] == 0

    await eventually(all_done, timeout_s=10)
    stop_b.set()
    await task_b
    assert (
        registry.get_sample_value(
            "massive_reclaimed_total", {"processor": "t", "stream": STREAM, "group": GROUP}
        )
        == 40.0
    )


async def test_restarted_consumer_drains_its_own_pending_first(
    redis: Redis, registry: CollectorRegistry
) -> None:
    await fill(redis, 10)
    stuck = Recorder()
    stuck.gate = asyncio.Event()
    task = asyncio.create_task(
        GroupConsumer(redis, spec("same", min_idle_ms=60_000), stuck, registry, "t").run(
            asyncio.Event()
        )
    )
    await asyncio.wait_for(stuck.entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Same consumer name, long min_idle: only the start-up drain can recover them.
    rec = Recorder()
    stop = asyncio.Event()
    t2 = asyncio.create_task(
        GroupConsumer(redis, spec("same", min_idle_ms=60_000), rec, registry, "t").run(stop)
    )
    await eventually(lambda: _async(set(rec.seen) == set(range(10))), timeout_s=5)
    stop.set()
    await t2
    assert (await group_info(redis))["pending"] == 0


async def test_poison_entry_dead_lettered_and_processing_continues(
    redis: Redis, registry: CollectorRegistry
) -> None:
    await fill(redis, 30)
    rec = Recorder()
    rec.poison = {13}
    stop = asyncio.Event()
    task = asyncio.create_task(GroupConsumer(redis, spec(), rec, registry, "t").run(stop))
    await fill(redis, 30, start=30)

    async def done() -> bool:
        dead = await redis.xlen(keys.dead_letter_stream(STREAM))
        return dead == 1 and len(rec.seen) == 59 and (await group_info(redis))["pending"] == 0

    await eventually(done, timeout_s=10)
    stop.set()
    await task
    [(_, fields)] = await redis.xrange(keys.dead_letter_stream(STREAM))
    assert fields[b"n"] == b"13"
    assert int(fields[b"_deliveries"]) == 3
    assert fields[b"_group"] == GROUP.encode()
    assert 13 not in rec.seen
    assert (
        registry.get_sample_value(
            "massive_dead_lettered_total", {"processor": "t", "stream": STREAM, "group": GROUP}
        )
        == 1.0
    )


async def test_offset_reset_redelivers_and_lag_is_right(
    redis: Redis, registry: CollectorRegistry
) -> None:
    ids = await fill(redis, 100)
    rec = Recorder()
    stop = asyncio.Event()
    task = asyncio.create_task(GroupConsumer(redis, spec(), rec, registry, "t").run(stop))
    await eventually(lambda: _async(len(rec.seen) == 100), timeout_s=5)
    stop.set()
    await task
    assert (await group_info(redis))["lag"] == 0

    # Reset to just after entry #59: entries 60..99 are re-delivered.
    _, entries_read = await admin.reset_offset(redis, STREAM, GROUP, ids[59].decode())
    assert entries_read == 60
    assert await group_info(redis) == {"pending": 0, "lag": 40, "entries_read": 60}
    rec2 = Recorder()
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(GroupConsumer(redis, spec(), rec2, registry, "t").run(stop2))
    await eventually(lambda: _async(set(rec2.seen) == set(range(60, 100))), timeout_s=5)
    stop2.set()
    await task2
    assert await group_info(redis) == {"pending": 0, "lag": 0, "entries_read": 100}

    # Reset by time to the start of the stream, and to "0": full replay, lag = length.
    ms = int(ids[0].split(b"-")[0])
    await admin.reset_offset(redis, STREAM, GROUP, f"{ms}ms")
    assert (await group_info(redis))["lag"] == 100
    await admin.reset_offset(redis, STREAM, GROUP, "$")
    assert (await group_info(redis))["lag"] == 0


async def test_vanished_group_is_recreated(redis: Redis, registry: CollectorRegistry) -> None:
    await fill(redis, 5)
    rec = Recorder()
    stop = asyncio.Event()
    task = asyncio.create_task(GroupConsumer(redis, spec(), rec, registry, "t").run(stop))
    await eventually(lambda: _async(len(rec.seen) == 5), timeout_s=5)
    await redis.delete(STREAM)  # stream and its groups gone (e.g. an operator's mistake)
    await fill(redis, 5, start=100)
    await eventually(lambda: _async(set(rec.seen) >= set(range(100, 105))), timeout_s=5)
    stop.set()
    await task
    assert (
        registry.get_sample_value(
            "massive_group_recreated_total", {"processor": "t", "stream": STREAM, "group": GROUP}
        )
        >= 1.0
    )


def test_spec_rejects_bad_combinations() -> None:
    with pytest.raises(ValueError, match="block_ms"):
        spec(block_ms=0)
    with pytest.raises(ValueError, match="max_deliveries"):
        spec(max_deliveries=0)


SIGTERM_SCRIPT = (
    textwrap.dedent(
        """
    import asyncio, sys
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis
    from streams.processor import ConsumerProcessor, Deps
    from streams.runner import run_processors
    from streams.settings import RuntimeSettings

    class Slow(ConsumerProcessor):
        name = "slow"
        async def handle(self, entries):
            # Each batch takes a while, so SIGTERM lands mid-batch.
            await asyncio.sleep(0.3)
            pipe = self.redis.pipeline(transaction=False)
            for eid, _ in entries:
                pipe.sadd("handled", eid)
            await pipe.execute()
            print("batch", flush=True)

    async def main():
        s = RuntimeSettings(redis_url=sys.argv[1], consumer="pod-1", count=20, block_ms=50,
                            grace_s=10)
        deps = Deps(redis=Redis.from_url(s.redis_url), settings=s, registry=CollectorRegistry())
        await run_processors(deps, [Slow(deps, "STREAM", "GROUP")])
        await deps.redis.aclose()
        print("exited", flush=True)

    asyncio.run(main())
    """
    )
    .replace('"STREAM"', repr(STREAM))
    .replace('"GROUP"', repr(GROUP))
)


async def test_sigterm_finishes_batch_acks_and_exits(
    redis: Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    await fill(redis, 200)
    script = tmp_path / "slow.py"
    script.write_text(SIGTERM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), redis_server.url, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 15)  # a batch done: mid-flight now
    assert line.strip() == b"batch"
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert out.strip().endswith(b"exited")
    info = await group_info(redis)
    handled = await redis.scard("handled")
    assert info["pending"] == 0, "SIGTERM left entries pending"
    assert 0 < handled < 200, "expected an interrupted run"
    assert info["entries_read"] == handled  # everything read was handled and acked


async def _async(v: bool) -> bool:
    return v


async def test_consumer_survives_a_redis_restart(registry: CollectorRegistry) -> None:
    srv = RedisServer().start()
    r = Redis.from_url(srv.url)
    try:
        await fill(r, 5)
        rec = Recorder()
        stop = asyncio.Event()
        c = GroupConsumer(r, spec(), rec, registry, "t")
        c.backoff = Backoff(base_s=0.01, cap_s=0.2)
        task = asyncio.create_task(c.run(stop))
        await eventually(lambda: _async(len(rec.seen) == 5), timeout_s=5)
        assert srv.proc is not None
        srv.proc.kill()  # Redis dies (no persistence here: it comes back empty)
        srv.proc.wait()
        labels = {"processor": "t", "stream": STREAM, "group": GROUP}
        await eventually(
            lambda: _async(
                (registry.get_sample_value("massive_redis_errors_total", labels) or 0) > 0
            ),
            timeout_s=5,
        )
        assert not task.done(), "the consumer must retry in-process, not crash"
        srv.start()  # same port
        await eventually(lambda: _async(c.ready), timeout_s=10)
        await fill(r, 5, start=200)
        await eventually(lambda: _async(set(rec.seen) >= set(range(200, 205))), timeout_s=10)
        stop.set()
        await task
    finally:
        await r.aclose()
        srv.stop()


async def test_handler_cut_off_by_lost_connection_is_redrained_not_isolated(
    redis: Redis, registry: CollectorRegistry
) -> None:
    """A handler that fails because Redis went away is not a poison batch: no one-by-one
    isolation, no error counted, nothing acked; after the reconnect the consumer drains its
    own pending entries at once (min_idle_ms is far longer than the test)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    await fill(redis, 20)
    calls: list[int] = []
    seen: Counter[int] = Counter()
    failed = False

    async def handler(entries: list[Entry]) -> None:
        nonlocal failed
        calls.append(len(entries))
        if not failed:
            failed = True
            raise RedisConnectionError("Connection closed by server.")
        for _, f in entries:
            seen[int(f[b"n"])] += 1

    stop = asyncio.Event()
    c = GroupConsumer(redis, spec(min_idle_ms=600_000), handler, registry, "t")
    c.backoff = Backoff(base_s=0.01, cap_s=0.05)
    task = asyncio.create_task(c.run(stop))
    await eventually(lambda: _async(set(seen) == set(range(20))), timeout_s=5)
    await eventually(lambda: _async(c.ready), timeout_s=5)
    stop.set()
    await task
    assert calls[0] == 20 and 1 not in calls[:2], calls  # the batch was not split up
    assert all(v == 1 for v in seen.values())
    labels = {"processor": "t", "stream": STREAM, "group": GROUP}
    assert registry.get_sample_value("massive_errors_total", labels) in (None, 0.0)
    assert (registry.get_sample_value("massive_redis_errors_total", labels) or 0) == 1
    assert (await group_info(redis))["pending"] == 0


async def test_lag_view_does_not_report_a_lag_no_entry_backs(redis: Redis) -> None:
    # Redis 7.0 after an AOF restart (or a SETID with a wrong ENTRIESREAD) can report lag > 0
    # with nothing unread; the lag view counts what is really after last-delivered-id.
    ids = await fill(redis, 20)
    await redis.xgroup_create(STREAM, GROUP, id="0")
    await redis.execute_command(  # type: ignore[no-untyped-call]
        "XGROUP", "SETID", STREAM, GROUP, ids[-1], "ENTRIESREAD", 15
    )
    raw = (await redis.xinfo_groups(STREAM))[0]
    assert raw["lag"] == 5  # what Redis itself claims
    assert (await group_info(redis))["lag"] == 0
    await redis.execute_command(  # type: ignore[no-untyped-call]
        "XGROUP", "SETID", STREAM, GROUP, ids[9], "ENTRIESREAD", 10
    )
    assert (await group_info(redis))["lag"] == 10  # a true lag is left alone


async def test_lag_view_reads_at_most_one_entry_per_group(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The monitor polls the lag every second; entries can be MBs (a full build's tile
    # deltas), so the phantom-lag check must not read the backlog to count it.
    ids = await fill(redis, 50)
    await redis.xgroup_create(STREAM, GROUP, id="0")
    await redis.execute_command(  # type: ignore[no-untyped-call]
        "XGROUP", "SETID", STREAM, GROUP, ids[9], "ENTRIESREAD", 10
    )
    counts: list[int | None] = []
    real = redis.xrange

    async def spy(*args: Any, **kwargs: Any) -> Any:
        counts.append(kwargs.get("count"))
        return await real(*args, **kwargs)

    monkeypatch.setattr(redis, "xrange", spy)
    assert (await group_info(redis))["lag"] == 40
    assert counts and all(c is not None and c <= 1 for c in counts)
