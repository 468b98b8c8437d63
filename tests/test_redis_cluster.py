"""Connection modes on real servers: a private 3-master Redis Cluster (and one with replicas
for failover), a Sentinel-managed master; the URL checks; the streams runtime, the Lua
loading path and the hydrator's pinned link on a cluster; the runtime going on through a
cluster failover and a Sentinel promotion."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from processors import lua
from processors.ops import cli
from schemas import keys
from streams import admin
from streams.consumer import Entry, GroupConsumer
from streams.link import Link
from streams.redis_client import (
    BIG_ARG_BYTES,
    CLUSTER,
    NODE,
    SENTINEL,
    FastCluster,
    HiredisPackingConnection,
    HiredisPackingSentinelConnection,
    HiredisPackingSSLConnection,
    cluster_of,
    command_key,
    connect,
    parse_url,
)
from streams.retry import Backoff, retrying
from streams.settings import RuntimeSettings
from streams.spec import StreamSpec
from tests.redis_cluster import LocalCluster, LocalSentinel, TlsFiles
from tests.util import RedisServer, eventually, free_port

log = logging.getLogger(__name__)

# Two streams on different masters of a 3-master cluster: {a} is slot 15495 (the third
# master's range), {b} 3300 (the first's); {c} is 7365 (the second's).
S1, S2 = "{a}massive:test:stream", "{b}massive:test:stream"
ECHO = "return {KEYS[1], ARGV[1]}"


# --- URLs -----------------------------------------------------------------------------------
def test_url_modes() -> None:
    t = parse_url("redis://127.0.0.1:6379/2")
    assert (t.mode, t.tls, t.nodes) == (NODE, False, (("127.0.0.1", 6379),))
    t = parse_url("rediss+cluster://u:p%40w@h1:7000,[::1]:7001?ssl_cert_reqs=none")
    assert (t.mode, t.tls, t.nodes) == (CLUSTER, True, (("h1", 7000), ("::1", 7001)))
    assert t.base_url == "rediss://u:p%40w@h1:7000?ssl_cert_reqs=none"
    t = parse_url("redis+sentinel://s1:26379,s2/mymaster/3")
    assert (t.mode, t.master, t.nodes) == (SENTINEL, "mymaster", (("s1", 26379), ("s2", 6379)))
    assert t.base_url == "redis://s1:26379/3"
    assert parse_url("unix:///run/redis.sock?db=1").mode == NODE


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h:1", "unknown Redis URL scheme"),
        ("redis:/:hunter2@h:1", "not a Redis URL"),
        ("redis://h1:1,h2:2", "takes one host"),
        ("redis+cluster://:hunter2@h:1/2", "only database 0"),
        ("redis+cluster://h:99999", "bad port"),
        ("redis+cluster://h:1,:2", "missing host"),
        ("redis+sentinel://:hunter2@s:26379", "needs the master's name"),
        ("redis://h:1/x", "not a number"),
        ("redis://h:1/0?socket_timeout=soon", "socket_timeout"),
    ],
)
def test_bad_url_is_one_line_without_the_password(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_url(url)
    with pytest.raises(ValueError) as info:
        RuntimeSettings(redis_url=url, consumer="c")
    assert "MASSIVE_REDIS_URL: " in str(info.value) and "hunter2" not in str(info.value)


def test_cli_refuses_a_bad_url_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MASSIVE_REDIS_URL", "redis+sentinel://:hunter2@s:26379")
    assert cli.main(["lag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MASSIVE_REDIS_URL" in err and "hunter2" not in err


def test_command_keys() -> None:
    assert command_key(("EVALSHA", "f00", 2, "{x}k", "{x}j", "arg")) == "{x}k"
    xrg = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 5, "BLOCK", 10, "STREAMS")
    assert command_key((*xrg, "s1", ">")) == "s1"
    assert command_key((*xrg, "s2", "s1", ">", ">")) == "s2"
    assert command_key(("HGETALL", "h")) == "h"
    with pytest.raises(ValueError):
        command_key(("EVALSHA", "f00", 0))


# --- the cluster client -----------------------------------------------------------------------
async def _getkeys_calls(cluster: LocalCluster) -> int:
    n = 0
    for node in cluster.masters():
        with node.client() as c:
            stats = c.info("commandstats")
            n += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
    return n


async def test_cluster_client_packs_with_hiredis_and_finds_stream_slots_itself(
    redis_cluster: LocalCluster, cluster_redis: Redis
) -> None:
    assert isinstance(cluster_of(cluster_redis), FastCluster)
    await cluster_redis.xgroup_create(S1, "g", id="0", mkstream=True)
    for node in cluster_redis.get_nodes():  # type: ignore[attr-defined]
        assert node.connection_class is HiredisPackingConnection
    before = await _getkeys_calls(redis_cluster)
    pipe = cluster_redis.pipeline(transaction=False)
    for s in (S1, S2):
        pipe.xadd(s, {"n": "1"})
    pipe.xreadgroup("g", "c", {S1: ">"}, count=10, block=10)
    res = await pipe.execute()
    assert res[-1][0][0] == S1.encode() and len(res[-1][0][1]) == 1
    # redis-py would ask a node (COMMAND GETKEYS) for the slot of every XREADGROUP
    assert await _getkeys_calls(redis_cluster) == before
    # a single-slot MULTI works (the key schema tags what one transaction touches)
    tx = cluster_redis.pipeline(transaction=True)
    tx.xadd(S1, {"n": "2"})
    tx.xadd(keys.dead_letter_stream(S1), {"n": "2"})
    assert len(await tx.execute()) == 2


def test_tls_and_sentinel_keep_the_hiredis_packer() -> None:
    r = connect("rediss://127.0.0.1:1/0?ssl_cert_reqs=none")
    assert r.connection_pool.connection_class is HiredisPackingSSLConnection
    c = cluster_of(connect("rediss+cluster://127.0.0.1:1"))
    assert c is not None and c.connection_kwargs["connection_class"] is HiredisPackingSSLConnection
    s = connect("redis+sentinel://127.0.0.1:1/m")
    assert s.connection_pool.connection_class is HiredisPackingSentinelConnection


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if shutil.which("openssl") is None:
        pytest.skip("openssl absent (apt-get install openssl)")
    return TlsFiles.make(str(tmp_path_factory.mktemp("tls")))


async def _round_trip(r: Redis) -> None:
    big = b"x" * (BIG_ARG_BYTES + 1)  # the big-argument path of the packer too
    await r.xadd("{t}s", {"n": "1", "big": big})
    await r.xgroup_create("{t}s", "g", id="0")
    pipe = r.pipeline(transaction=False)
    pipe.xreadgroup("g", "c", {"{t}s": ">"}, count=10)
    ((_, entries),) = (await pipe.execute())[0]
    assert entries[0][1] == {b"n": b"1", b"big": big}
    assert await r.xack("{t}s", "g", entries[0][0]) == 1


async def test_tls_one_node_and_cluster_with_the_hiredis_packer(tls_files: TlsFiles) -> None:
    """``rediss://`` and ``rediss+cluster://`` against TLS servers: the packing connection
    class is the TLS one and commands, pipelines and big arguments go through."""
    port = free_port()
    srv = RedisServer(*tls_files.server_args(port)).start()
    try:
        r = connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls_files.cert}")
        try:
            await _round_trip(r)
            conn = await r.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            assert isinstance(conn, HiredisPackingSSLConnection)
            await r.connection_pool.release(conn)
        finally:
            await r.aclose()
    finally:
        srv.stop()
    cluster = LocalCluster(masters=3, tls=tls_files).start()
    try:
        r = connect(cluster.tls_url)
        try:
            await _round_trip(r)
            nodes = cluster_of(r).get_nodes()  # type: ignore[union-attr]
            assert {n.port for n in nodes} == set(cluster.tls_ports)  # found over TLS
            assert all(n.connection_class is HiredisPackingSSLConnection for n in nodes)
        finally:
            await r.aclose()
    finally:
        cluster.stop()


# --- the streams runtime on a cluster ------------------------------------------------------
def _spec(stream: str, consumer: str = "c1", **kw: object) -> StreamSpec:
    params: dict[str, object] = dict(
        stream=stream,
        group="g",
        consumer=consumer,
        count=50,
        block_ms=20,
        min_idle_ms=150,
        reclaim_interval_s=0.05,
        max_deliveries=3,
    )
    params.update(kw)
    return StreamSpec(**params)  # type: ignore[arg-type]


class Recorder:
    def __init__(self, poison: frozenset[str] = frozenset()) -> None:
        self.seen: Counter[str] = Counter()
        self.poison = poison

    async def __call__(self, entries: list[Entry]) -> None:
        for _eid, fields in entries:
            n = fields[b"n"].decode()
            if n in self.poison:
                raise ValueError(f"poison {n}")
            self.seen[n] += 1


@contextlib.asynccontextmanager
async def consuming(redis: Redis, spec: StreamSpec, handler: Recorder) -> AsyncIterator[None]:
    stop = asyncio.Event()
    consumer = GroupConsumer(redis, spec, handler, CollectorRegistry(), "test")
    consumer.backoff = Backoff(base_s=0.02, cap_s=0.2)
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _settled(redis: Redis, stream: str) -> bool:
    groups = await _again(lambda: admin.lag(redis, [stream]))
    return bool(groups) and all(g.pending == 0 and g.lag == 0 for g in groups)


async def test_group_consumer_delivers_acks_reclaims_and_dead_letters_on_a_cluster(
    cluster_redis: Redis,
) -> None:
    r = cluster_redis
    for s in (S1, S2):
        await r.xgroup_create(s, "g", id="0", mkstream=True)
    pipe = r.pipeline(transaction=False)
    for i in range(300):
        pipe.xadd(S1 if i % 2 else S2, {"n": str(i)})
    await pipe.execute()
    # a consumer that died holding 20 entries of S1: reclaimed by c1 after min_idle_ms
    await r.xreadgroup("g", "dead", {S1: ">"}, count=20)
    rec1, rec2 = Recorder(poison=frozenset({"299"})), Recorder()
    async with consuming(r, _spec(S1), rec1), consuming(r, _spec(S2), rec2):
        await eventually(lambda: _settled(r, S1), timeout_s=20)
        await eventually(lambda: _settled(r, S2), timeout_s=20)
    assert set(rec1.seen) == {str(i) for i in range(1, 299, 2)}
    assert set(rec2.seen) == {str(i) for i in range(0, 300, 2)}
    dead: list[Entry] = await r.xrange(keys.dead_letter_stream(S1))  # type: ignore[assignment]
    assert [f[b"n"] for _, f in dead] == [b"299"]


async def test_admin_lag_and_offsets_reach_streams_on_every_shard(cluster_redis: Redis) -> None:
    """``lag`` finds the pipeline's streams on every master (SCAN of each) and ``offsets
    reset`` works on a stream's own shard."""
    names = [f"massive:test:{{{t}}}" for t in "abc"]  # one per master
    for n in names:
        await cluster_redis.xadd(n, {"n": "1"})
        await cluster_redis.xgroup_create(n, "g", id="0")
    assert set(await admin.stream_names(cluster_redis)) == set(names)
    lags = {g.stream: g.lag for g in await admin.lag(cluster_redis)}
    assert lags == dict.fromkeys(names, 1)
    await admin.reset_offset(cluster_redis, names[0], "g", "$")
    assert {g.stream: g.lag for g in await admin.lag(cluster_redis, names[:1])} == {names[0]: 0}


# --- Lua on a cluster ------------------------------------------------------------------------
async def test_lua_scripts_load_on_every_master_and_reload_after_noscript(
    redis_cluster: LocalCluster, cluster_redis: Redis
) -> None:
    script = lua.Script("echo", ECHO)
    for key in ("{a}k", "{b}k", "{c}k"):
        assert await script(cluster_redis, [key], ["x"]) == [key.encode(), b"x"]
    redis_cluster.flushall()  # SCRIPT FLUSH on every master
    # the pipeline path: NOSCRIPT -> load_all -> rebuilt once

    def build(p: Pipeline) -> None:
        lua.get("spot").queue(p, ["{a}spot"], ["SPX", "6000.5", "1"])
        lua.get("spot").queue(p, ["{b}spot"], ["NDX", "21000.25", "1"])
        p.set("{c}x", 1)

    assert await lua.execute(cluster_redis, build) == [1, 1, True]
    for node in redis_cluster.masters():  # load_all loads on every master
        with node.client() as c:
            assert c.script_exists(lua.get("spot").sha) == [True]


async def test_link_splits_a_request_by_node_and_keeps_request_order(
    redis_cluster: LocalCluster, cluster_redis: Redis
) -> None:
    script = lua.Script("echo", ECHO)
    loads: list[int] = []

    async def reload(r: Redis) -> None:
        loads.append(1)
        await script.load(r)

    cmds: list[tuple[Any, ...]] = [
        (("EVALSHA", script.sha, 1, f"{{{t}}}k", str(i)) if i % 3 else ("HGETALL", f"{{{t}}}h"))
        for i, t in enumerate("abcabcabc")
    ]
    async with Link(cluster_redis, reload) as link:
        out = await link.call(cmds)  # NOSCRIPT on every node: loaded once, re-sent
        assert loads == [1]
        for i, (cmd, reply) in enumerate(zip(cmds, out, strict=True)):
            assert reply == ({} if cmd[0] == "HGETALL" else [cmd[3].encode(), str(i).encode()])
        # pipelined: the next request is sent before the previous replies are read
        await link.send(cmds[:3])
        first = await link.recv()
        await link.send(cmds[3:])
        assert first + await link.recv() == out
    # a slot moved to another master: MOVED, the slot map is updated, the request re-sent
    owner = redis_cluster.master_of_key("{a}k")
    other = next(n for n in redis_cluster.masters() if n is not owner)
    slot = FastCluster.keyslot(cluster_of(cluster_redis), "{a}k")  # type: ignore[arg-type]
    redis_cluster.assign_slot(slot, other)
    async with Link(cluster_redis, reload) as link:
        assert await link.call([("EVALSHA", script.sha, 1, "{a}k", "m")]) == [[b"{a}k", b"m"]]
    assert redis_cluster.master_of_key("{a}k") is other


# --- failover --------------------------------------------------------------------------------
@pytest.fixture
def cluster_with_replicas() -> Iterator[LocalCluster]:
    cluster = LocalCluster(masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


async def _produce(redis: Redis, stream: str, n: int, start: int, acked: list[str]) -> None:
    """XADD one entry at a time through the retry policy; ``acked`` gets every entry whose
    XADD was answered (what the producer may rely on)."""
    for i in range(start, start + n):
        await retrying(
            "produce",
            lambda i=i: redis.xadd(stream, {"n": str(i)}),  # type: ignore[misc]
            None,
            log=log,
            backoff=Backoff(base_s=0.05, cap_s=0.3),
        )
        acked.append(str(i))
        await asyncio.sleep(0.002)  # a steady trickle across the failover


async def test_cluster_failover_the_runtime_goes_on_and_loses_no_acked_entry(
    cluster_with_replicas: LocalCluster,
) -> None:
    cluster = cluster_with_replicas
    r = connect(cluster.url)
    try:
        script = lua.Script("echo", ECHO)
        assert await script(r, [S1], ["before"]) == [S1.encode(), b"before"]
        await r.xgroup_create(S1, "g", id="0", mkstream=True)
        rec = Recorder()
        acked: list[str] = []
        old = cluster.master_of_key(S1)
        replica = cluster.replica_of(old)
        async with consuming(r, _spec(S1), rec):
            producer = asyncio.create_task(_produce(r, S1, 400, 0, acked))
            await eventually(lambda: _async(len(acked) >= 100), timeout_s=20)
            await asyncio.to_thread(cluster.failover, replica)  # coordinated: no write lost
            cluster.kill(old)  # kill -9 of the old master (now a replica)
            await asyncio.wait_for(producer, 60)
            await eventually(lambda: _settled(r, S1), timeout_s=30)
        assert cluster.master_of_key(S1) is replica
        assert set(acked) <= set(rec.seen)  # every answered XADD was processed
        assert len(acked) == 400
        # the promoted master had no scripts: NOSCRIPT -> loaded again -> EVALSHA answers
        assert await _again(lambda: script(r, [S1], ["after"])) == [S1.encode(), b"after"]
    finally:
        await r.aclose()


async def _again(call: Callable[[], Awaitable[Any]]) -> Any:
    """The test's own call through the retry policy, as the processors' loops make theirs:
    its first command after a failover may meet a connection the failover closed."""
    return await retrying("test", call, None, log=log, backoff=Backoff(0.05, 0.3), attempts=30)


async def _async(v: bool) -> bool:
    return v


# --- Sentinel --------------------------------------------------------------------------------
@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    s = LocalSentinel().start()
    yield s
    s.stop()


async def test_sentinel_promotion_the_runtime_goes_on(sentinel: LocalSentinel) -> None:
    r = connect(sentinel.url)
    try:
        stream = "{t}massive:test:stream"
        await r.xgroup_create(stream, "g", id="0", mkstream=True)
        script = lua.Script("echo", ECHO)
        assert await script(r, ["k"], ["before"]) == [b"k", b"before"]
        rec = Recorder()
        acked: list[str] = []
        async with consuming(r, _spec(stream), rec):
            await _produce(r, stream, 100, 0, acked)
            await eventually(lambda: _settled(r, stream), timeout_s=20)
            # the replica has everything acked so far (replication is asynchronous: what
            # the master had not sent before it died is lost, as in any Sentinel setup)
            assert await r.execute_command("WAIT", 1, 5000) == 1  # type: ignore[no-untyped-call]
            old = sentinel.master_port()
            new = await asyncio.to_thread(sentinel.kill_master)
            assert new != old
            await _produce(r, stream, 100, 100, acked)
            await eventually(lambda: _settled(r, stream), timeout_s=30)
        assert set(rec.seen) == {str(i) for i in range(200)}
        conn = await r.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            assert conn.port == new
        finally:
            await r.connection_pool.release(conn)
        assert await _again(lambda: script(r, ["k"], ["after"])) == [b"k", b"after"]
    finally:
        await r.aclose()
