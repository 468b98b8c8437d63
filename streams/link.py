"""Pinned, pipelined connections for a batch: send a request now, read its replies later.

A request is written and flushed at once (so Redis runs it while this process goes on
decoding the next sub-batch) and its replies are read later, in order. redis-py's pipeline
cannot do this: ``execute`` sends and waits for the replies in one call, and its send goes
through ``asyncio.wait_for`` (a task that only writes when the caller next yields), so a
decode started after it ran before the bytes left.

One node: one pooled connection held for the batch. A Redis Cluster: one connection per
node that owns a slot the request touches (each command's keys are in one slot), held for
the batch; a request is split by node, written to every node before any reply is read, and
its replies are put back in request order. Commands sent to different nodes run in
parallel, so a request must not rely on an order between commands of different slots.

Error replies: ``NOSCRIPT`` (Redis restarted, failed over, SCRIPT FLUSH) loads the scripts
with ``reload`` and re-sends the request once; ``MOVED`` (a slot changed owner) updates the
slot map and re-sends once; callers only send idempotent commands. Any other error reply is
raised (a cluster's ``ASK``/``TRYAGAIN``/``CLUSTERDOWN`` are in
:data:`streams.retry.REDIS_UNAVAILABLE`: the caller's loop retries). A lost connection on a
cluster makes the client re-read the slot map before its next command. A connection left
with unread replies (an error between send and read) is disconnected, never handed back to
the pool out of sync.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.redis_client import cluster_of, command_key

Command = tuple[Any, ...]
Reload = Callable[[Redis], Awaitable[None]]


class Link:
    """Use as ``async with Link(redis, reload) as link``: ``send`` a request, ``recv`` its
    replies (one request in flight at a time), or ``call`` for both."""

    def __init__(self, redis: Redis, reload: Reload) -> None:
        self.redis = redis
        self.reload = reload
        self._cluster: RedisCluster | None = cluster_of(redis)
        self._conn: AbstractConnection | None = None  # one node
        self._held: dict[str, tuple[ClusterNode, Connection]] = {}  # cluster
        # the request in flight: per connection, the request positions of its replies
        self._plan: list[tuple[AbstractConnection, list[int]]] = []
        self._cmds: Sequence[Command] = ()
        self._unread = 0
        self._entered = False

    async def __aenter__(self) -> Link:
        self._entered = True
        if self._cluster is None:
            self._conn = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        out_of_sync = self._unread > 0
        conn, self._conn = self._conn, None
        held, self._held = self._held, {}
        if conn is not None:
            try:
                if out_of_sync:
                    await conn.disconnect()
            finally:
                await self.redis.connection_pool.release(conn)
        for node, c in held.values():
            try:
                if out_of_sync:
                    await c.disconnect()
            finally:
                node.release(c)

    async def send(self, cmds: Sequence[Command]) -> None:
        if not self._entered:
            raise RuntimeError("Link used outside 'async with'")
        if self._unread:
            raise RuntimeError("a request is already in flight")
        self._cmds = cmds
        try:
            if self._cluster is None:
                assert self._conn is not None
                self._plan = [(self._conn, list(range(len(cmds))))]
            else:
                self._plan = await self._split(self._cluster, cmds)
            self._unread = len(cmds)
            for conn, idx in self._plan:
                await conn.send_packed_command(conn.pack_commands([cmds[i] for i in idx]))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._lost()
            raise

    async def _split(
        self, cluster: RedisCluster, cmds: Sequence[Command]
    ) -> list[tuple[AbstractConnection, list[int]]]:
        if cluster._initialize:  # a node was lost: read the slot map first
            await cluster.initialize()
        by_node: dict[str, list[int]] = {}
        for i, cmd in enumerate(cmds):
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(command_key(cmd)))
            by_node.setdefault(node.name, []).append(i)
            if node.name not in self._held:
                conn = node.acquire_connection()
                self._held[node.name] = (node, conn)
                await node.disconnect_if_needed(conn)
        return [(self._held[name][1], idx) for name, idx in by_node.items()]

    async def recv(self) -> list[Any]:
        """The replies of the request in flight, in request order; raises the first error
        reply (after one re-send for NOSCRIPT or MOVED)."""
        for attempt in (0, 1):
            out = await self._read()
            err = next((r for r in out if isinstance(r, ResponseError)), None)
            if err is None:
                return out
            if attempt:
                raise err
            if isinstance(err, NoScriptError):
                await self.reload(self.redis)
            elif isinstance(err, MovedError) and self._cluster is not None:
                for moved in (r for r in out if isinstance(r, MovedError)):
                    await self._cluster.nodes_manager.move_slot(moved)
            else:
                raise err
            await self.send(self._cmds)
        raise AssertionError("unreachable")

    async def call(self, cmds: Sequence[Command]) -> list[Any]:
        await self.send(cmds)
        return await self.recv()

    async def _read(self) -> list[Any]:
        out: list[Any] = [None] * len(self._cmds)
        try:
            for conn, idx in self._plan:
                for i in idx:
                    try:
                        r = await conn.read_response()
                    except ResponseError as exc:  # an error reply; the stream stays in sync
                        r = exc
                    self._unread -= 1
                    out[i] = r
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._lost()
            raise
        return out

    def _lost(self) -> None:
        if self._cluster is not None:
            # as redis-py does after a failed node: re-read the slot map before the next
            # command (a failover may have moved the slots)
            self._cluster._initialize = True
