"""The Redis client every processor uses: redis-py asyncio, with commands packed by hiredis,
on one node, a Redis Cluster or a Sentinel-managed master, chosen by the URL.

redis-py's asyncio connection packs commands in pure Python (about 4 us per argument); an
XACK of a 500-entry batch or a pipeline of XADDs spent more time packing than Redis spent
executing. hiredis (already our reply parser) packs in C. Same wire bytes, same semantics.
Every mode below keeps it (plain TCP and TLS alike).

``MASSIVE_REDIS_URL`` (:func:`parse_url` checks it when the settings are read):

* ``redis://[user:pass@]host:port[/db]``, ``rediss://`` (TLS), ``unix://path``: one node.
* ``redis+cluster://[user:pass@]host:port[,host:port...]``, ``rediss+cluster://``: a Redis
  Cluster, discovered from any of the listed nodes (redis-py's asyncio ``RedisCluster``). No
  database number: a cluster has only db 0.
* ``redis+sentinel://[user:pass@]host:port[,host:port...]/<master>[/db]``,
  ``rediss+sentinel://``: the master that the listed sentinels name ``<master>``
  (``Sentinel.master_for``); the password is the master's, the sentinels take none.

The query string carries redis-py's connection options (``?socket_timeout=5``,
``?ssl_cert_reqs=none``) in every mode.

A cluster client is handed out typed as :class:`redis.asyncio.Redis`: the commands, pipelines
and Lua calls the pipeline makes are the same methods on both, and cluster pipelines split by
node themselves. The one place that holds raw connections, :mod:`streams.link`, asks
:func:`cluster_of`. One node and Sentinel: redis-py retries no command (its default).
A cluster client keeps redis-py's cluster default: after a lost connection or
``CLUSTERDOWN`` it re-reads the slot map and re-sends the command (up to 10 times), and it
follows MOVED/ASK. A write whose reply was lost may so be applied twice; the pipeline
tolerates that (consumers are idempotent, fence tokens only grow, the publish scripts check
version = current + 1). With those retries off, redis-py's cluster pipelines kept sending
to a dead master and the failover test (tests/test_e2e_cluster.py) did not converge. What
still fails surfaces as one of :data:`streams.retry.REDIS_UNAVAILABLE` and the loops retry
whole iterations.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection
from redis.asyncio.connection import parse_url as redis_parse_url
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.logs import one_line, redact

# What "Redis cannot be reached" raises (refused, reset, DNS, timeout, loading); an admin
# command reports it on one line (:func:`unreachable`) and exits 2.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
)
# An admin command (lag, offsets, epoch, record, replay) waits this long to connect.
ADMIN_CONNECT_TIMEOUT_S = 5.0

# An argument at least this large is sent as its own buffer, not copied into the packed
# command: a 2 MB heatmap diff cost ~4 ms to pack and a 15 MB model checkpoint ~34 ms on the
# benchmark VM (redis-py's own packer has the same cut-off idea).
BIG_ARG_BYTES = 64 * 1024

NODE, CLUSTER, SENTINEL = "node", "cluster", "sentinel"
_SCHEMES = {
    "redis": (NODE, False),
    "rediss": (NODE, True),
    "unix": (NODE, False),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
}


def _pack(args: tuple[Any, ...]) -> list[bytes]:
    # As redis-py: a multi-word command name ("CONFIG GET") is split into arguments.
    if isinstance(args[0], str):
        args = (*args[0].encode().split(), *args[1:])
    elif b" " in args[0]:
        args = (*args[0].split(), *args[1:])
    try:
        # (only short commands are scanned: those with thousands of arguments, HSET of a
        # tile batch or HMGET, have small ones, and the scan would cost more than it saves)
        if len(args) <= 16 and any(
            isinstance(a, bytes | memoryview) and len(a) >= BIG_ARG_BYTES for a in args
        ):
            return _pack_with_big_args(args)
        return [hiredis.pack_command(args)]
    except TypeError as exc:
        raise DataError(str(exc)) from None


def _pack_with_big_args(args: tuple[Any, ...]) -> list[bytes]:
    """RESP of ``args`` as a list of buffers; big bytes arguments are not copied."""
    out: list[bytes] = []
    head = bytearray(b"*%d\r\n" % len(args))
    for a in args:
        if isinstance(a, bytes | memoryview) and len(a) >= BIG_ARG_BYTES:
            head += b"$%d\r\n" % len(a)
            out.append(bytes(head))
            out.append(a if isinstance(a, bytes) else a.tobytes())
            head = bytearray(b"\r\n")
            continue
        head += hiredis.pack_command((a,))[4:]  # "*1\r\n" + one bulk string: keep the bulk
    out.append(bytes(head))
    return out


# A master that turns replica (failover, CLUSTER FAILOVER, REPLICAOF) answers the clients it
# had blocked (XREADGROUP BLOCK) with this error: the server is gone for them, like a lost
# connection. ("UNBLOCKED the stream key no longer exists" is another matter: the consumer
# re-creates its group.)
_DEMOTED = "UNBLOCKED force unblock from blocking operation, instance state changed"


# Socket reads (of redis-py's 64 KiB) of a reply past which the reader's buffer is handed back
_SHRINK_AFTER_READS = 16


class ShrinkingHiredisParser(_AsyncHiredisParser):
    """redis-py's hiredis reply parser, with a fresh reader after a reply of more than
    ``_SHRINK_AFTER_READS`` socket reads. hiredis keeps its buffer at the size of the largest
    reply until the next bytes arrive on that connection, so a pooled connection that read a
    15 MB model checkpoint, an 8 MB page of diffs or a chain snapshot kept that much while it
    sat idle, one such buffer per connection (measured: a GET of a 15 MB value left the
    process 14.4 MB larger after the value was freed, until that connection was used
    again)."""

    _reads = 0
    _owner: weakref.ref[Any] | None = None

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        self._owner = weakref.ref(connection)

    async def read_from_socket(self) -> bool:
        self._reads += 1
        return cast(bool, await super().read_from_socket())  # type: ignore[no-untyped-call]

    async def read_response(
        self, disable_decoding: bool = False, push_request: bool = False
    ) -> Any:
        self._reads = 0
        response = await super().read_response(disable_decoding, push_request)
        reader = self._reader
        if self._reads > _SHRINK_AFTER_READS and reader is not None and not reader.has_data():
            # nothing of a next reply is buffered: a new reader loses nothing
            conn = self._owner() if self._owner is not None else None
            if conn is not None:
                super().on_connect(conn)
        return response


class _Fast:
    """hiredis packing, a reply parser that gives back large buffers, and a demoted master's
    UNBLOCKED reply as a ConnectionError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", ShrinkingHiredisParser)
        super().__init__(*args, **kwargs)

    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError as exc:
            if str(exc).startswith(_DEMOTED):
                raise RedisConnectionError(str(exc)) from exc
            raise


class HiredisPackingConnection(_Fast, Connection):
    pass


class HiredisPackingSSLConnection(_Fast, SSLConnection):
    pass


class HiredisPackingSentinelConnection(_Fast, SentinelManagedConnection):
    pass


class HiredisPackingSentinelSSLConnection(_Fast, SentinelManagedSSLConnection):
    pass


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``MASSIVE_REDIS_URL``: the mode, the nodes to start from (cluster seeds or
    sentinels), the sentinel master name, and a one-host URL that carries the credentials,
    database and query options in redis-py's own form."""

    mode: str  # node | cluster | sentinel
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    master: str
    base_url: str  # redis(s)://[userinfo@]<first node>[/db][?query], or the unix:// URL


def parse_url(url: str) -> RedisTarget:
    """Check and parse a Redis URL (see the module doc); ValueError says what is wrong,
    without the password."""
    scheme, sep, _ = url.partition("://")
    known = ", ".join(f"{s}://" for s in _SCHEMES)
    if not sep:  # (nothing of the text is echoed: it may hold a password)
        raise ValueError(f"not a Redis URL (no '://'; one of {known})")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"unknown Redis URL scheme {scheme + sep!r} (one of {known})")
    mode, tls = _SCHEMES[scheme.lower()]
    if scheme.lower() == "unix":
        _redis_options(url)
        return RedisTarget(NODE, False, (), "", url)
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    nodes = tuple(_host_port(h) for h in hostlist.split(","))
    if mode == NODE and len(nodes) > 1:
        raise ValueError(f"{scheme}:// takes one host; a cluster is {scheme}+cluster://")
    path = unquote(parts.path).strip("/")
    master, db = "", path
    if mode == SENTINEL:
        master, _, db = path.partition("/")
        if not master:
            raise ValueError(f"{scheme}:// needs the master's name: {scheme}://host:port/<master>")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    if mode == CLUSTER and db not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    host, port = nodes[0]
    hp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = f"{'rediss' if tls else 'redis'}://{userinfo + '@' if userinfo else ''}{hp}"
    base += f"/{db}" if db else ""
    base += f"?{parts.query}" if parts.query else ""
    opts = _redis_options(base)
    if mode != NODE and "db" in opts and int(opts["db"]) != (int(db) if db else 0):
        raise ValueError("the database is given in the path, not as ?db=")
    return RedisTarget(mode, tls, nodes, master, base)


def _host_port(text: str) -> tuple[str, int]:
    host, port = text, "6379"
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad host {text!r}")
            port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return unquote(host), int(port)


def _redis_options(url: str) -> dict[str, Any]:
    try:
        return dict(redis_parse_url(url))
    except ValueError as exc:
        raise ValueError(redact(str(exc))) from None


def connect(url: str, **kwargs: Any) -> Redis:
    """A client for ``url`` (one node, cluster or sentinel) with hiredis command packing.
    A cluster client is returned typed as ``Redis`` (see the module doc)."""
    t = parse_url(url)
    if t.mode == CLUSTER:
        seeds = [ClusterNode(h, p) for h, p in t.nodes[1:]]
        return cast(Redis, FastCluster.from_url(t.base_url, startup_nodes=seeds, **kwargs))
    if t.mode == SENTINEL:
        return _sentinel_master(t, **kwargs)
    # As Redis.from_url (the URL's options win over ``kwargs``), with the packing class.
    opts = {**kwargs, **_redis_options(url)}
    cls = opts.get("connection_class")
    if cls is None:
        opts["connection_class"] = HiredisPackingConnection
    elif cls is SSLConnection:
        opts["connection_class"] = HiredisPackingSSLConnection
    return Redis.from_pool(ConnectionPool(**opts))


class FastCluster(RedisCluster):
    """redis-py's asyncio RedisCluster with hiredis packing, and the slot of XREAD /
    XREADGROUP found here: redis-py asks a node (``COMMAND GETKEYS``, one more round trip)
    for every command whose keys move, and a consumer reads with XREADGROUP all day."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        packing = HiredisPackingSSLConnection if kwargs.get("ssl") else HiredisPackingConnection
        # The nodes found later are built from these kwargs (redis-py takes no
        # connection_class argument for a cluster); the seeds were built already.
        self.connection_kwargs["connection_class"] = packing
        for node in self.startup_nodes:
            node.connection_class = packing

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> FastCluster:
        """Discovery failing (no node reachable, slots not covered mid-failover, nodes
        disagreeing) is the cluster being unavailable: a ConnectionError, which the loops
        retry (redis-py raises a plain RedisClusterException)."""
        try:
            await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise RedisConnectionError(str(exc)) from exc
        return self

    async def _determine_slot(self, command: str, *args: Any) -> int:
        keys = stream_keys(command, args)
        if keys is None:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(k) for k in keys}
        if len(slots) != 1:
            return await super()._determine_slot(command, *args)  # raises cross-slot
        return slots.pop()


def command_key(cmd: tuple[Any, ...]) -> Any:
    """The (first) key of a command as the pipeline sends it: the one after ``numkeys`` of
    EVAL / EVALSHA / FCALL, the first stream of XREAD / XREADGROUP, else the first
    argument. (A cluster command's keys share one slot, so one key gives the slot.)"""
    name = cmd[0].decode() if isinstance(cmd[0], bytes) else str(cmd[0])
    upper = name.upper()
    if upper in ("EVAL", "EVALSHA", "FCALL", "FCALL_RO"):
        if int(cmd[2]) < 1:
            raise ValueError(f"{name} without keys has no slot")
        return cmd[3]
    streams = stream_keys(name, cmd[1:])
    if streams is not None:
        return streams[0]
    return cmd[1]


def stream_keys(command: Any, args: tuple[Any, ...]) -> list[Any] | None:
    """The stream keys of an XREAD / XREADGROUP (``args`` without the command name), else
    None."""
    name = command.decode() if isinstance(command, bytes) else str(command)
    if name.upper() not in ("XREAD", "XREADGROUP"):
        return None
    for i, a in enumerate(args):
        word = a.decode() if isinstance(a, bytes) else a
        if isinstance(word, str) and word.upper() == "STREAMS":
            rest = args[i + 1 :]
            return list(rest[: len(rest) // 2]) or None
    return None


class _SentinelPool(SentinelConnectionPool):
    """Closing the client closes the sentinels' connections too."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client is closing (not a master change)
            await self.sentinel_manager.aclose()

    async def get_master_address(self) -> Any:
        try:
            return await super().get_master_address()  # type: ignore[no-untyped-call]
        except MasterNotFoundError:
            # (redis-py's message lists every sentinel client's whole repr)
            where = ",".join(
                f"{s.connection_pool.connection_kwargs.get('host')}:"
                f"{s.connection_pool.connection_kwargs.get('port')}"
                for s in self.sentinel_manager.sentinels
            )
            raise MasterNotFoundError(
                f"no sentinel at {where} knows a master named {self.service_name!r}"
            ) from None


def _sentinel_master(t: RedisTarget, **kwargs: Any) -> Redis:
    opts = _redis_options(t.base_url)
    for k in ("host", "port", "connection_class"):
        opts.pop(k, None)
    opts.update(kwargs)
    # The sentinels are reached with the socket options only (no password, no db).
    sentinel_kwargs = {k: v for k, v in opts.items() if k.startswith("socket_")}
    sentinel = Sentinel(list(t.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    packing = HiredisPackingSentinelSSLConnection if t.tls else HiredisPackingSentinelConnection
    opts.setdefault("connection_class", packing)
    if t.tls:
        opts["ssl"] = True
    client: Redis = sentinel.master_for(t.master, connection_pool_class=_SentinelPool, **opts)
    return client


def cluster_of(redis: Redis) -> RedisCluster | None:
    """The cluster client behind ``redis`` (from :func:`connect`), or None for one node."""
    r: object = redis
    return r if isinstance(r, RedisCluster) else None


def admin_client(url: str, **kwargs: Any) -> Redis:
    """A client for a one-shot command: gives up connecting after a few seconds."""
    kwargs.setdefault("socket_connect_timeout", ADMIN_CONNECT_TIMEOUT_S)
    return connect(url, **kwargs)


def unreachable(url: str, exc: BaseException) -> str:
    """The line a command prints when Redis cannot be reached: the URL without its password
    and the reason, no traceback."""
    return f"error: cannot reach Redis at {redact(url)}: {one_line(exc)}"


def as_str(v: object) -> str:
    """A Redis reply value as text (bytes decoded; a str or a number as it reads)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def opt_str(v: object) -> str | None:
    """:func:`as_str`, with None (a missing key or field) kept."""
    return None if v is None else as_str(v)
