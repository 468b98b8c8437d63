"""The publishers' fenced lease (processors/lease.py) against a real Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from processors.lease import FencedLease

LEASE, FENCE = "test:lease", "test:lease:fence"


def lease(redis: Redis, owner: str) -> FencedLease:
    return FencedLease(redis, LEASE, FENCE, owner, ttl_ms=5000)


async def test_one_holder_tokens_grow_and_a_standby_waits(redis: Redis) -> None:
    a, b = lease(redis, "a"), lease(redis, "b")
    assert await a.take() == 1 and a.held and a.value == "1:a"
    assert await redis.get(LEASE) == b"1:a"
    assert await b.take() == 0 and not b.held
    assert await a.renew()
    await a.release()
    assert not a.held and await redis.get(LEASE) is None
    assert await b.take() == 2 and await redis.get(LEASE) == b"2:b"


async def test_an_expired_lease_is_kept_while_nobody_moved_the_fence(redis: Redis) -> None:
    """A Redis restart without the lease, or an iteration longer than the TTL: renewing
    re-sets it under the same token; after a local drop, take() keeps the token too."""
    a = lease(redis, "a")
    await a.take()
    await redis.delete(LEASE)
    assert await a.renew() and await redis.get(LEASE) == b"1:a"
    a.drop()
    await redis.delete(LEASE)
    assert await a.take() == 1 and await redis.pttl(LEASE) > 0


async def test_a_restored_lease_of_ours_is_reclaimed_and_a_moved_fence_loses_it(
    redis: Redis,
) -> None:
    a, b = lease(redis, "a"), lease(redis, "b")
    await a.take()
    a.drop()  # Redis came back from its AOF with our lease (and fence) in it
    assert await a.take() == 1
    await redis.delete(LEASE)
    await redis.incr(FENCE)  # someone acquired meanwhile (and lost it again)
    assert not await a.renew() and not a.held
    assert await b.take() == 3
    assert await a.take() == 0
    await a.release()  # not ours: nothing released
    assert await redis.get(LEASE) == b"3:b"


async def test_a_stale_holder_neither_renews_nor_releases_the_new_lease(redis: Redis) -> None:
    a, b = lease(redis, "a"), lease(redis, "b")
    await a.take()
    await redis.delete(LEASE)  # a paused past its TTL
    assert await b.take() == 2
    await a.release()  # still believes it holds token 1
    assert await redis.get(LEASE) == b"2:b"
    a.token = 1
    assert not await a.renew() and await redis.get(LEASE) == b"2:b"
