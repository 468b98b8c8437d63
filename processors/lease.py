"""The fenced leader lease of the publishers (heatmap ``publisher:<strategy>`` and ``gex``).

Two keys: the lease, holding ``"<token>:<owner>"`` with a PX TTL, and the fence, a counter
INCRed on every acquisition whose value is the token (a lease epoch that only grows).
Scripts: lua/lease_acquire.lua (absent -> INCR fence, SET the lease), lua/lease_renew.lua,
lua/lease_release.lua. A publish script checks the fence equals the publisher's token (and
that no other owner holds the lease), so a stale leader (paused, partitioned) is refused.

What keeps a leader through a Redis blip: renewing re-sets an absent lease while the fence
still equals our token (nobody acquired since: Redis restarted without the lease, or one
iteration outlasted the TTL), and :meth:`FencedLease.take` first tries to renew the last
token we held (Redis restored from an AOF that still holds our lease) before acquiring anew.
"""

from __future__ import annotations

from redis.asyncio import Redis

from processors import lua


class FencedLease:
    """One replica's view of a fenced lease. ``token`` is None while we do not lead."""

    def __init__(self, redis: Redis, lease_key: str, fence_key: str, owner: str, ttl_ms: int):
        self.redis = redis
        self.lease_key = lease_key
        self.fence_key = fence_key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.token: int | None = None
        self.last_token: int | None = None  # the last token we held (kept when dropped)
        self._acquire = lua.get("lease_acquire")
        self._renew = lua.get("lease_renew")
        self._release = lua.get("lease_release")

    @property
    def held(self) -> bool:
        return self.token is not None

    @property
    def value(self) -> str:
        """The lease key's value while we hold it."""
        return f"{self.token}:{self.owner}"

    async def take(self) -> int:
        """Lead: keep our last token when the lease is still ours, else acquire a new one.
        Returns the token (also in ``token``), or 0 when another owner holds the lease."""
        last = self.last_token
        if last is not None and await self._renew_token(last):
            tok = last
        else:
            keys = [self.lease_key, self.fence_key]
            tok = int(await self._acquire(self.redis, keys, [self.owner, self.ttl_ms]))
        if tok:
            self.token = self.last_token = tok
        return tok

    async def renew(self) -> bool:
        """Extend the lease we hold; on False (someone else acquired) ``token`` is None."""
        if self.token is None:
            return False
        if await self._renew_token(self.token):
            return True
        self.token = None
        return False

    async def release(self) -> None:
        """Hand over at once (a crash skips this: the TTL expires)."""
        if self.token is not None:
            await self._release(self.redis, [self.lease_key], [self.value])
            self.token = None

    def drop(self) -> None:
        """Stop leading locally (Redis unreachable, a publish was fenced)."""
        self.token = None

    async def _renew_token(self, token: int) -> bool:
        value = f"{token}:{self.owner}"
        keys = [self.lease_key, self.fence_key]
        return bool(int(await self._renew(self.redis, keys, [value, self.ttl_ms, str(token)])))
