"""Stream retention: age and bytes budgets, never silently past a consumer group, and the
publishers' own diff-stream window."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.heatmap.publisher import DiffRetention
from streams.retention import MB, Policy, RetentionSettings, StreamJanitor

S = "massive:test:stream"


def _sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def _fill(r: Redis, n: int, size: int, start_ms: int) -> list[bytes]:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(S, {"d": b"x" * size}, id=f"{start_ms + i}-0")
    return [e if isinstance(e, bytes) else str(e).encode() for e in await pipe.execute()]


async def _read(r: Redis, group: str, n: int, ack: int) -> None:
    got = await r.xreadgroup(group, "c1", {S: ">"}, count=n)
    ids = [i for i, _ in got[0][1]][:ack]
    if ids:
        await r.xack(S, group, *ids)


async def test_age_trims_old_entries_but_nothing_a_group_still_needs(redis: Redis) -> None:
    reg = CollectorRegistry()
    j = StreamJanitor(redis, reg)
    now_ms = int(time.time() * 1000)
    await _fill(redis, 1000, 100, now_ms - 600_000)  # ten minutes old, 1 entry / 600 ms
    await redis.xgroup_create(S, "slow", id="0")
    await redis.xgroup_create(S, "fast", id="0")
    await _read(redis, "fast", 1000, 1000)
    await _read(redis, "slow", 400, 300)  # 300 acked, 100 pending, 600 unread
    t = await j.trim(S, Policy(max_age_s=60, max_bytes=100 * MB), now_ms)
    first = (await redis.xrange(S, "-", "+", count=1))[0][0]
    # the oldest pending entry of "slow" (the 301st) is kept, and everything after it
    assert int(first.split(b"-")[0]) <= now_ms - 600_000 + 300
    assert await redis.xlen(S) >= 700
    assert t.unread == {} and t.by_bytes == 0
    assert _sample(reg, "massive_stream_trimmed_unread_total", stream=S, group="slow") == 0
    # once "slow" has caught up, age alone decides
    await _read(redis, "slow", 1000, 1000)
    pend = await redis.xpending_range(S, "slow", "-", "+", 1000)
    await redis.xack(S, "slow", *[p["message_id"] for p in pend])
    t = await j.trim(S, Policy(max_age_s=60, max_bytes=100 * MB), now_ms)
    assert await redis.xlen(S) <= 150  # ~100 entries younger than 60 s, plus one node
    assert t.by_age > 0
    assert _sample(reg, "massive_stream_trimmed_total", stream=S, reason="age") >= t.by_age


async def test_byte_budget_trims_and_counts_what_a_group_had_not_processed(redis: Redis) -> None:
    reg = CollectorRegistry()
    j = StreamJanitor(redis, reg)
    now_ms = int(time.time() * 1000)
    await _fill(redis, 1000, 10_000, now_ms - 1000)  # ~10 MB, all young
    await redis.xgroup_create(S, "g", id="0")
    await _read(redis, "g", 300, 200)  # 200 acked, 100 pending (ids 201-300), 700 unread
    t = await j.trim(S, Policy(max_age_s=3600, max_bytes=2 * MB), now_ms)
    after = await redis.xlen(S)
    assert 150 <= after <= 400, after
    used = await redis.memory_usage(S)
    assert used is not None and used < 3 * MB
    expected = (700 - after) + 100  # unread beyond what is left, and every pending entry
    assert t.unread == {"g": expected}
    assert _sample(reg, "massive_stream_trimmed_unread_total", stream=S, group="g") == expected
    assert t.by_bytes == 1000 - after


async def test_no_group_and_missing_stream(redis: Redis) -> None:
    j = StreamJanitor(redis, CollectorRegistry())
    now_ms = int(time.time() * 1000)
    t = await j.trim(S, Policy(max_age_s=1, max_bytes=MB), now_ms)  # absent: nothing to do
    assert (t.by_age, t.by_bytes) == (0, 0)
    await _fill(redis, 200, 100, now_ms - 10_000)
    await _fill(redis, 10, 100, now_ms)
    t = await j.trim(S, Policy(max_age_s=5, max_bytes=MB), now_ms)
    assert 10 <= await redis.xlen(S) <= 110


def test_every_pipeline_stream_and_its_dead_letters_have_a_policy() -> None:
    from processors.ops.monitor import pipeline_streams
    from schemas import keys

    pol = RetentionSettings().policies(("SPX", "NDX"))
    for s in pipeline_streams(("SPX", "NDX")):
        if s in (keys.gex_levels_stream("SPX"), keys.gex_levels_stream("NDX")):
            continue  # no dead letters: no group reads it
        assert s in pol and keys.dead_letter_stream(s) in pol, s
    # per-symbol streams: the GEX levels history (trimmed by age by its writer; bytes here)
    per_symbol = RetentionSettings(gex_levels_max_mb=3).policies(("SPX", "NDX"))
    for sym in ("SPX", "NDX"):
        assert per_symbol[keys.gex_levels_stream(sym)].max_bytes == 3 * 1024 * 1024


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=60),
    budget=st.integers(1, 20_000),
    age_ms=st.integers(1, 100),
    pin=st.none() | st.integers(0, 80),
)
def test_diff_retention_keeps_the_newest_diffs_within_age_and_bytes(
    sizes: list[int], budget: int, age_ms: int, pin: int | None
) -> None:
    r = DiffRetention(age_ms, budget)
    kept: list[tuple[int, int]] = []  # (ms, size) in the stream
    for ms, size in enumerate(sizes, start=1):
        pin_id = (pin, 0) if pin is not None else None
        floor = tuple(int(x) for x in r.minid(ms, 0, size, pin_id).split("-"))
        kept = [(m, s) for m, s in kept if (m, 0) >= floor] + [(ms, size)]
        r.added(ms, 0, size)
        ages_ok = all(m >= ms - age_ms or (pin_id and (m, 0) >= pin_id) for m, _ in kept)
        assert ages_ok
        total = sum(s for _, s in kept)
        newest_alone = len(kept) == 1
        pinned = pin_id is not None and any((m, 0) >= pin_id for m, _ in kept[:-1])
        assert total <= budget or newest_alone or pinned
        # nothing is trimmed that both limits would keep
        if pin_id is None:
            keep_all = sum(s for m, s in kept) + 0
            assert keep_all == total
