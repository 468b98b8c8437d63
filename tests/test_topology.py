"""The active-topology cache (processors/epochs/topology.py) that the hydrator, ws-ingest and
the tile builders share: a topology is read once per epoch change, never again while its
epoch stays active, and a symbol whose epoch went away is dropped."""

from __future__ import annotations

from redis.asyncio import Redis

from processors.epochs import topology
from processors.epochs.topology import ActiveTopology


async def test_a_topology_is_read_once_per_epoch_change(redis: Redis) -> None:
    await redis.sadd(topology._topology_key("SPX", "e1"), "O:A", "O:B")
    await redis.sadd(topology._topology_key("NDX", "e2"), "O:C")
    t = ActiveTopology(redis)
    assert await t.sync({"SPX": "e1"}) == {"SPX"}
    assert sorted(t.cids["SPX"]) == ["O:A", "O:B"]
    assert t.by_cid == {"O:A": "SPX", "O:B": "SPX"} and t.active == {"SPX": "e1"}
    version = t.version
    # a topology is frozen: while its epoch stays active it is not read again
    await redis.sadd(topology._topology_key("SPX", "e1"), "O:Z")
    assert await t.sync({"SPX": "e1"}) == set()
    assert t.version == version and "O:Z" not in t.by_cid
    # one symbol's epoch at a time (ws-ingest, the builders) keeps the others
    assert await t.epoch("NDX", "e2") == ["O:C"]
    assert t.active == {"SPX": "e1", "NDX": "e2"} and t.version == version + 1
    # the whole map (the hydrator): a symbol without an active epoch is dropped
    assert await t.sync({"NDX": "e2"}) == {"SPX"}
    assert t.by_cid == {"O:C": "NDX"} and t.active == {"NDX": "e2"} and "SPX" not in t.cids
    assert await topology.read_topology(redis, "SPX", "e1") != []
    assert await topology.read_topology(redis, "SPX", "nope") == []
