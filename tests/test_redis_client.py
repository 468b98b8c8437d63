"""The processors' Redis client packs commands with hiredis: same bytes in Redis as redis-py."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError

from streams.redis_client import BIG_ARG_BYTES, HiredisPackingConnection, connect
from tests.util import RedisServer


async def test_values_round_trip_like_redis_py(redis_server: RedisServer) -> None:
    fast, plain = connect(redis_server.url), Redis.from_url(redis_server.url)
    try:
        conn = await fast.connection_pool.get_connection()
        assert isinstance(conn, HiredisPackingConnection)
        await fast.connection_pool.release(conn)
        values = [0.1, 6850.05, 1e20, -3, 2**62, "é€", b"\xff\x00", ""]
        for i, v in enumerate(values):
            await fast.set(f"f{i}", v)
            await plain.set(f"p{i}", v)
            assert await plain.get(f"f{i}") == await plain.get(f"p{i}")
        assert await fast.execute_command("CONFIG GET", "port") == await plain.execute_command(
            "CONFIG GET", "port"
        )
        pipe = fast.pipeline(transaction=True)
        pipe.xadd("s", {"d": b"x"})
        pipe.xlen("s")
        assert (await pipe.execute())[1] == 1
        with pytest.raises(DataError):
            await fast.set("k", None)  # type: ignore[arg-type]
        # arguments from BIG_ARG_BYTES up are sent as their own buffers (not copied)
        big = bytes(range(256)) * (BIG_ARG_BYTES // 256 + 7)
        await fast.execute_command("SET", "big", big)
        await fast.execute_command("HSET", "h", "a", "x", "big", memoryview(big), "n", 1.5)
        assert await plain.get("big") == big
        assert await plain.hgetall("h") == {b"a": b"x", b"big": big, b"n": b"1.5"}
        pipe = fast.pipeline(transaction=False)
        pipe.set("big2", big + b"!")
        pipe.eval("return #ARGV[1] .. ':' .. ARGV[2]", 0, big, "é")
        assert (await pipe.execute())[1] == f"{len(big)}:é".encode()
        assert await plain.get("big2") == big + b"!"
        with pytest.raises(DataError):
            await fast.execute_command("SET", big, None)
    finally:
        await fast.aclose()
        await plain.aclose()


async def test_a_large_reply_leaves_no_buffer_and_loses_no_pipelined_reply(
    redis_server: RedisServer,
) -> None:
    """hiredis keeps its buffer at the largest reply's size until more bytes come: after a
    large reply the connection gets a fresh reader, but never while the next reply of a
    pipeline is already buffered."""
    r = connect(redis_server.url)
    try:
        big = bytes(range(256)) * 16_384  # 4 MiB: ~64 socket reads
        await r.set("big", big)
        conn = await r.connection_pool.get_connection()
        try:
            reader = conn._parser._reader  # type: ignore[attr-defined]
            await conn.send_command("GET", "small")
            assert await conn.read_response() is None
            assert conn._parser._reader is reader  # type: ignore[attr-defined]
            await conn.send_command("GET", "big")
            assert await conn.read_response() == big
            assert conn._parser._reader is not reader  # type: ignore[attr-defined]
        finally:
            await r.connection_pool.release(conn)
        for _ in range(3):  # the big replies' tails and the small ones arrive together
            pipe = r.pipeline(transaction=False)
            for i in range(6):
                pipe.get("big")
                pipe.set(f"k{i}", i)
                pipe.get(f"k{i}")
            assert await pipe.execute() == [
                big,
                True,
                b"0",
                big,
                True,
                b"1",
                big,
                True,
                b"2",
                big,
                True,
                b"3",
                big,
                True,
                b"4",
                big,
                True,
                b"5",
            ]
    finally:
        await r.aclose()
