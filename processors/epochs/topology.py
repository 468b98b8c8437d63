"""The active-topology cache: each symbol's active epoch and that epoch's contract ids.

An epoch's topology (its ``keys.epoch_contracts`` SET) is frozen once the epoch is
built, so a stage that maps contracts to symbols (the hydrator), subscribes to them
(ws-ingest) or lays tiles over them (the tile builders) reads it once per epoch change and
keeps it: a derived local cache (invariant 2), never a source of truth. Each processor holds
one :class:`ActiveTopology`; what it derives from the contract ids (parsed tickers, tile
grids) it keys by the epoch id.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.asyncio import Redis

from schemas import keys
from streams.redis_client import as_str


def _topology_key(symbol: str, eid: str) -> str:
    """The topology SET of ``symbol``'s epoch ``eid``."""
    return keys.epoch_contracts(symbol, eid)


async def read_topology(redis: Redis, symbol: str, eid: str) -> list[str]:
    """The contract ids of ``symbol``'s epoch ``eid`` (SMEMBERS order; empty for an unknown
    epoch)."""
    return [as_str(c) for c in await redis.smembers(_topology_key(symbol, eid))]


class ActiveTopology:
    """Symbol -> active epoch (``active``), its contract ids (``cids``) and the reverse map
    contract id -> symbol (``by_cid``); ``version`` grows with every change. The dicts are
    updated in place, so a caller may keep references to them."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.active: dict[str, str] = {}
        self.cids: dict[str, list[str]] = {}
        self.by_cid: dict[str, str] = {}
        self.version = 0

    async def sync(self, active: Mapping[str, str]) -> set[str]:
        """Bring the cache to ``active`` (symbol -> epoch id, every symbol that has one):
        the topology of each symbol whose epoch changed is read again, in one round trip,
        and symbols missing from ``active`` are dropped. Returns the symbols that changed."""
        held = self.active
        changed = {s for s in {*active, *held} if active.get(s) != held.get(s)}
        if not changed:
            return changed
        self.version += 1
        loading = [s for s in changed if s in active]
        pipe = self.redis.pipeline(transaction=False)
        for s in loading:
            pipe.smembers(_topology_key(s, active[s]))
        members = await pipe.execute() if loading else []
        for s in changed:
            for cid in self.cids.pop(s, ()):
                self.by_cid.pop(cid, None)
            held.pop(s, None)
        for s, mem in zip(loading, members, strict=True):
            cids = [as_str(c) for c in mem]
            self.cids[s] = cids
            for cid in cids:
                self.by_cid[cid] = s
            held[s] = active[s]
        return changed

    async def epoch(self, symbol: str, eid: str) -> list[str]:
        """The contract ids of ``eid``, now ``symbol``'s active epoch (read on a change)."""
        if self.active.get(symbol) != eid:
            await self.sync({**self.active, symbol: eid})
        return self.cids[symbol]
