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
