"""Re-processing: ``massive-pipeline offsets reset --stream S --group G --to <id|time>``
against a real Redis (>= 7.0).

Why ENTRIESREAD: ``XINFO GROUPS`` computes a group's ``lag`` as ``entries-added -
entries-read``. A plain ``XGROUP SETID s g <id>`` moves the group's last-delivered id but
invalidates ``entries-read``, so Redis reports ``lag`` = nil until the group reads to the end
again. KEDA's redis-streams scaler (``lagCount``) then reads -1 (inactive: it may scale the
consumers to zero in the middle of a replay) and redis_exporter reports 0: the backlog the
reset just created is invisible. ``streams.admin.reset_offset`` counts the entries after the
new position and passes ``ENTRIESREAD`` so the lag is exact immediately, also after the head
of the stream was trimmed (MAXLEN) and for ``0``. The one case Redis 7 still cannot tell is a
deleted entry (XDEL tombstone) in the unread range; the pipeline never XDELs, the monitor
exports such a lag as NaN with ``massive_stream_group_lag_unknown`` = 1.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import redis as sync_redis
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.ops import cli
from streams import admin
from streams.consumer import Entry, GroupConsumer
from streams.spec import StreamSpec
from tests.util import RedisServer, eventually

S = "massive:test:offsets"
G = "g"
BASE_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z
N = 20


def ms_of(eid: bytes) -> int:
    return int(eid.split(b"-")[0])


async def fill(redis: Redis, n: int = N) -> list[bytes]:
    """``n`` entries 1 ms apart, explicit ids so times are exact."""
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(S, {b"n": str(i).encode()}, id=f"{BASE_MS + i}-0")
    return [bytes(e) for e in await pipe.execute()]


async def consume_all(redis: Redis, consumer: str = "c1") -> list[bytes]:
    """Read everything new with ``>`` and ack it; returns the delivered ids."""
    out: list[bytes] = []
    while True:
        res = await redis.xreadgroup(G, consumer, {S: ">"}, count=7)
        if not res or not res[0][1]:
            return out
        ids = [eid for eid, _ in res[0][1]]
        await redis.xack(S, G, *ids)
        out += ids


async def info(redis: Redis) -> admin.GroupLag:
    (g,) = [g for g in await admin.lag(redis, [S]) if g.group == G]
    return g


@pytest.fixture
async def consumed(redis: Redis) -> list[bytes]:
    """A stream whose group has read and acked every entry (lag 0)."""
    ids = await fill(redis)
    await redis.xgroup_create(S, G, id="0")
    assert await consume_all(redis) == ids
    assert (await info(redis)).lag == 0
    return ids


async def test_reset_to_id_redelivers_the_entries_after_it(
    redis: Redis, consumed: list[bytes]
) -> None:
    pos, entries_read = await admin.reset_offset(redis, S, G, consumed[7].decode())
    assert (pos, entries_read) == (consumed[7].decode(), 8)
    g = await info(redis)
    assert (g.lag, g.entries_read, g.last_delivered_id) == (N - 8, 8, consumed[7].decode())
    assert await consume_all(redis) == consumed[8:]
    assert (await info(redis)).lag == 0


@pytest.mark.parametrize(
    "to_of_ms",
    [
        lambda ms: f"{ms}ms",
        lambda ms: dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(),
        lambda ms: (
            dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        ),
    ],
    ids=["millis", "iso", "iso-z"],
)
async def test_reset_to_time_redelivers_entries_at_or_after_it(
    redis: Redis, consumed: list[bytes], to_of_ms: object
) -> None:
    k = 12
    to = to_of_ms(BASE_MS + k)  # type: ignore[operator]
    await admin.reset_offset(redis, S, G, to)
    assert (await info(redis)).lag == N - k
    redelivered = await consume_all(redis)
    assert redelivered == consumed[k:]
    assert all(ms_of(e) >= BASE_MS + k for e in redelivered)
    assert (await info(redis)).lag == 0


async def test_reset_to_a_date_is_a_time_not_an_entry_id(
    redis: Redis, consumed: list[bytes]
) -> None:
    day = dt.datetime.fromtimestamp(BASE_MS / 1000, dt.UTC).date()
    await admin.reset_offset(redis, S, G, day.isoformat())  # midnight: before every entry
    assert (await info(redis)).lag == N
    await admin.reset_offset(redis, S, G, (day + dt.timedelta(days=1)).isoformat())
    assert (await info(redis)).lag == 0
    assert await consume_all(redis) == []
    with pytest.raises(ValueError, match="expected 0"):
        admin.parse_position("yesterday")


async def test_lag_is_exact_after_trimming(redis: Redis, consumed: list[bytes]) -> None:
    assert await redis.xtrim(S, maxlen=10, approximate=False) == 10
    kept = consumed[10:]
    # "0" and a position inside the trimmed head: every entry left is unread (10, not 20).
    for to in ("0", consumed[3].decode(), f"{BASE_MS + 5}ms"):
        await admin.reset_offset(redis, S, G, to)
        g = await info(redis)
        assert (g.lag, g.entries_read) == (10, 10), to
    assert await consume_all(redis) == kept
    assert (await info(redis)).lag == 0
    # A position inside what is left.
    await admin.reset_offset(redis, S, G, consumed[15].decode())
    assert (await info(redis)).lag == 4
    assert await consume_all(redis) == consumed[16:]
    # "$": nothing to re-deliver; entries added later are counted as they arrive.
    await admin.reset_offset(redis, S, G, "$")
    assert (await info(redis)).lag == 0
    await redis.xadd(S, {b"n": b"late"})
    assert (await info(redis)).lag == 1


async def test_plain_setid_without_entriesread_gives_nil_lag(
    redis: Redis, consumed: list[bytes]
) -> None:
    """The pitfall the CLI avoids: the lag KEDA and exporters read becomes nil."""
    await redis.xgroup_setid(S, G, consumed[7])
    g = await info(redis)
    assert (g.lag, g.entries_read) == (None, None)
    # The entries are still re-delivered; only the lag is lost ...
    assert len(await consume_all(redis)) == N - 8
    # ... until the group has read to the end again.
    assert (await info(redis)).lag == 0
    await redis.xgroup_setid(S, G, consumed[7])
    assert (await info(redis)).lag is None
    await admin.reset_offset(redis, S, G, consumed[7].decode())
    assert (await info(redis)).lag == N - 8


async def test_deleted_entry_in_unread_range_makes_lag_unknown_until_read_past(
    redis: Redis, consumed: list[bytes]
) -> None:
    """Redis 7 limitation (not fixable by ENTRIESREAD): a tombstone after the group's
    position makes XINFO lag nil. The pipeline never XDELs; the monitor flags it."""
    await redis.xdel(S, consumed[15])
    _, entries_read = await admin.reset_offset(redis, S, G, consumed[9].decode())
    assert entries_read == N - 9  # 20 added, 9 remaining after position 9 (one deleted)
    assert (await info(redis)).lag is None
    await admin.reset_offset(redis, S, G, consumed[16].decode())  # past the tombstone
    assert (await info(redis)).lag == N - 17


async def test_live_group_consumer_reprocesses_after_reset(
    redis: Redis, registry: CollectorRegistry
) -> None:
    ids = await fill(redis)
    seen: list[bytes] = []

    async def handler(entries: list[Entry]) -> None:
        seen.extend(e[0] for e in entries)

    spec = StreamSpec(stream=S, group=G, consumer="c1", count=5, block_ms=20)
    consumer = GroupConsumer(redis, spec, handler, registry, "test")
    await consumer.ensure_group()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:

        async def caught_up() -> bool:
            g = await info(redis)
            return len(seen) == N and g.lag == 0 and g.pending == 0

        await eventually(caught_up)
        await admin.reset_offset(redis, S, G, f"{BASE_MS + 14}ms")

        async def reprocessed() -> bool:
            g = await info(redis)
            return len(seen) == N + 6 and g.lag == 0 and g.pending == 0

        await eventually(reprocessed)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert seen == ids + ids[14:]


def test_cli_offsets_reset_prints_exact_lag(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    r = sync_redis.Redis.from_url(redis_server.url)
    try:
        r.flushall()
        for i in range(N):
            r.xadd(S, {b"n": str(i).encode()}, id=f"{BASE_MS + i}-0")
        r.xgroup_create(S, G, id="$")
        monkeypatch.setenv("MASSIVE_REDIS_URL", redis_server.url)
        to = f"{BASE_MS + 4}-0"
        rc = cli.main(["offsets", "reset", "--stream", S, "--group", G, "--to", to])
        assert rc == 0
        out = capsys.readouterr().out
        assert f"last-delivered-id={to} entries-read=5" in out
        assert "lag=15 pending=0 length=20" in out
        (g,) = r.xinfo_groups(S)
        assert (g["lag"], g["entries-read"]) == (15, 5)
        assert cli.main(["offsets", "reset", "--stream", S, "--group", G, "--to", "soon"]) == 2
    finally:
        r.close()
