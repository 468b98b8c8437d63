"""Redis Cluster readiness of the key schema, checked on one node: every transaction, WATCH,
script call and multi-key command the pipeline sends keeps its keys in one hash slot
(tests/slot_check.py), and every Lua script names its keys in KEYS only."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from importlib import resources
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors import lua
from processors.ingest.chain_poller import FetchResult
from processors.registry import load
from schemas import keys
from schemas.messages import WS_PAYLOAD_FIELD, WS_RECV_FIELD, ChainSnapshot
from streams.consumer import Entry, GroupConsumer
from streams.processor import Deps, Processor
from streams.settings import RuntimeSettings
from streams.spec import StreamSpec
from tests.factories import contract
from tests.harness import install_chain
from tests.slot_check import SlotCheckingConnection, SlotLog, command_keys
from tests.util import RedisServer, eventually

SYMBOLS = ("SPX", "NDX")
MODEL_PATH = (
    "normalizer",
    "hydrator",
    *(f"tile-builder:{s}" for s in keys.STRATEGIES),
    *(f"publisher:{s}" for s in keys.STRATEGIES),
    "gex",
    "monitor",
)


def test_the_checker_flags_what_a_cluster_refuses() -> None:
    """The check itself: a cross-slot transaction, script and MGET are flagged, a
    single-slot one is not (so the pipeline test below can fail)."""
    log = SlotLog()
    conn = SlotCheckingConnection.__new__(SlotCheckingConnection)
    conn._watched, conn._multi = [], None
    SlotCheckingConnection.log = log
    for cmd in (
        ("WATCH", keys.epoch_active("SPX")),
        ("MULTI",),
        ("SET", keys.epoch_active("SPX"), "e"),
        ("XADD", keys.contracts_dirty_stream("SPX"), "*", "d", "x"),
        ("EXEC",),
    ):
        conn._observe(cmd)
    assert log.violations == [] and log.transactions == 1
    conn._observe(("WATCH", keys.epoch_active("NDX")))
    for cmd in (("MULTI",), ("SET", keys.epoch_active("SPX"), "e"), ("EXEC",)):
        conn._observe(cmd)
    conn._observe(("EVALSHA", "sha", 2, keys.gex_lease("SPX"), keys.gex_lease("NDX"), "a"))
    conn._observe(("MGET", keys.gex_model("SPX"), keys.gex_model("NDX")))
    assert len(log.violations) == 3, log.violations
    assert command_keys(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "b", ">", ">")) == [
        b"a",
        b"b",
    ]


def test_every_key_of_a_symbol_shares_its_slot_and_dead_letters_their_stream() -> None:
    from redis.crc import key_slot

    for sym in SYMBOLS:
        names = [
            keys.epoch_active(sym),
            keys.epoch_index(sym),
            *keys.epoch_fixed_keys(sym, "e1"),
            keys.epoch_contract(sym, "e1", "O:X"),
            keys.chain_snapshot(sym, 1),
            keys.chain_snapshot(sym, 1, "full"),
            keys.chain_band(sym),
            keys.gex_source(sym),
            keys.gex_model(sym),
            keys.gex_model_calls(sym),
            keys.gex_model_puts(sym),
            keys.gex_head(sym),
            keys.gex_lease(sym),
            keys.gex_fence(sym),
            *keys.symbol_streams([sym]),
        ]
        for st in keys.STRATEGIES:
            names += [
                keys.heatmap_staging(sym, st),
                keys.heatmap_manifest(sym, st),
                keys.heatmap_build(sym, st, "c1"),
                keys.heatmap_model(sym, st),
                keys.heatmap_version(sym, st),
                keys.heatmap_head(sym, st),
                keys.publisher_lease(sym, st),
                keys.publisher_fence(sym, st),
            ]
        assert {key_slot(n.encode()) for n in names} == {key_slot(sym.encode())}, sym
    for stream in (keys.WS_STREAM, keys.CHAIN_STREAM, keys.CONTROL_STREAM):
        dead = keys.dead_letter_stream(stream)
        assert key_slot(dead.encode()) == key_slot(stream.encode())
    assert key_slot(keys.SPOT_STREAM.encode()) == key_slot(keys.CHAIN_STREAM.encode())
    with pytest.raises(ValueError):
        keys.tag("S{P}X")


# call('<CMD>', <key>, ...) or call('XINFO', 'STREAM', <key>, ...)
_CALL = re.compile(r"call\(\s*'(\w+)'\s*,\s*(?:'(?:STREAM|GROUPS|CONSUMERS)'\s*,\s*)?([^,)]+)")


def test_every_lua_script_names_its_keys_in_KEYS() -> None:
    """No script builds a key name (from ARGV or by concatenation): a cluster routes a
    script by its KEYS, so a key it does not declare may live on another node."""
    for name in lua.NAMES:
        text = resources.files(lua).joinpath(f"{name}.lua").read_text(encoding="utf-8")
        code = "\n".join(line.split("--")[0] for line in text.splitlines())
        calls = _CALL.findall(code)
        assert calls, name
        for cmd, key in calls:
            key = key.strip()
            assert ".." not in key and "ARGV" not in key, (name, cmd, key)
            assert key.startswith("KEYS[") or re.fullmatch(r"[a-z_]\w*", key), (name, cmd, key)


def _chain(sym: str, spot: float, step: float, ts_ns: int) -> ChainSnapshot:
    today = dt.date.today()
    exps = [(today + dt.timedelta(days=d)).isoformat() for d in (20, 48)]
    root = {"SPX": "SPXW", "NDX": "NDXP"}[sym]
    cs = [
        contract(
            root,
            e,
            r,
            spot + k * step,
            bid=10.0 + k,
            ask=10.6 + k,
            iv=0.2,
            gamma=0.001,
            oi=100.0,
            delta=0.5,
        )
        for e in exps
        for k in range(-4, 5)
        for r in "CP"
    ]
    return ChainSnapshot(sym, ts_ns, spot, cs)


async def _published(r: Redis) -> bool:
    for sym in SYMBOLS:
        for st in keys.STRATEGIES:
            if not await r.get(keys.heatmap_version(sym, st)):
                return False
        if not await r.get(keys.gex_head(sym)):
            return False
    return True


async def test_the_pipeline_keeps_every_operation_in_one_slot(redis_server: RedisServer) -> None:
    """The model path (normalizer, hydrator, builders, publishers, GEX, monitor) and the
    chain-poller's write run in-process on a client that checks every command; SPX and NDX
    epochs, WS values and a re-seed flow through; both symbols publish every model."""
    log = SlotLog()
    SlotCheckingConnection.log = log
    url = redis_server.url
    plain = Redis.from_url(url)
    checked = Redis.from_url(url, connection_class=SlotCheckingConnection)
    await plain.flushall()
    settings = RuntimeSettings(redis_url=url, consumer="slots", symbols=SYMBOLS)
    deps = Deps(checked, settings, CollectorRegistry())
    procs: list[Processor] = [load(name, deps) for name in MODEL_PATH]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop), name=p.name) for p in procs]
    try:
        ts = dt.datetime.now(dt.UTC).timestamp()
        now_ns = int(ts * 1e9)
        snaps = {
            "SPX": _chain("SPX", 6000.0, 5.0, now_ns),
            "NDX": _chain("NDX", 21000.0, 25.0, now_ns),
        }
        # the chain-poller's write (blob, then the MULTI of pointer and spot tick) for SPX;
        # NDX as the tests' helper writes it
        poller: Any = load("chain-poller:SPX", deps)
        s = snaps["SPX"]
        await poller.write(FetchResult("SPX", s.contracts, s.spot, now_ns, 1, 0, 0.1), "test")
        await install_chain(plain, snaps["NDX"])
        await eventually(lambda: _epochs_active(plain), timeout_s=30)
        t_ms = now_ns // 1_000_000 + 1000
        frames: list[list[dict[str, Any]]] = []
        for sym, snap in snaps.items():
            for i, c in enumerate(snap.contracts[:6]):
                q = {"ev": "Q", "sym": c.cid, "bp": 11.0 + i, "ap": 11.4 + i, "t": t_ms + i}
                t = {"ev": "T", "sym": c.cid, "p": 11.2 + i, "s": 3, "t": t_ms + i}
                frames += [[{**q, "bx": 1, "ax": 1, "bs": 1, "as": 1, "q": 1}]]
                frames += [[{**t, "x": 1, "c": [209], "q": 1}]]
            idx = "I:" + sym
            frames.append([{"ev": "V", "T": idx, "val": snap.spot + 1, "t": t_ms}])
        for n, fr in enumerate(frames):
            await plain.xadd(
                keys.WS_STREAM, {WS_RECV_FIELD: str(now_ns + n), WS_PAYLOAD_FIELD: orjson.dumps(fr)}
            )
        # an unchanged topology: a re-seed of SPX
        s2 = ChainSnapshot("SPX", now_ns + 2 * 10**9, 6001.0, s.contracts)
        await poller.write(FetchResult("SPX", s2.contracts, 6001.0, now_ns, 1, 0, 0.1), "test")
        await eventually(lambda: _published(plain), timeout_s=90)
        await eventually(lambda: _drained(plain), timeout_s=30)
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for t in tasks:
            if not t.done():
                t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await checked.aclose()
        await plain.aclose()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert log.violations == [], "\n".join(log.violations[:20])
    # it did look: promotions, seeds, staging transactions, publishes, leases
    assert log.transactions >= 10 and log.scripts >= 20, log


async def _epochs_active(r: Redis) -> bool:
    return all([await r.exists(keys.epoch_active(s)) for s in SYMBOLS])


async def _drained(r: Redis) -> bool:
    for sym in SYMBOLS:
        stream = keys.contracts_dirty_stream(sym)
        for g in await r.xinfo_groups(stream):
            if g["lag"] or g["pending"]:
                return False
    return True


async def test_the_dead_letter_move_stays_in_its_stream_slot(redis_server: RedisServer) -> None:
    """A poison entry on every kind of consumed stream (shared, per symbol) goes to its
    ``<stream>:dead`` in one MULTI with its XACK, on the slot-checking client."""
    log = SlotLog()
    SlotCheckingConnection.log = log
    checked = Redis.from_url(redis_server.url, connection_class=SlotCheckingConnection)
    await checked.flushall()

    async def poison(_: list[Entry]) -> None:
        raise ValueError("poison")

    streams = [keys.WS_STREAM, keys.CHAIN_STREAM, keys.contracts_dirty_stream("NDX")]
    stop = asyncio.Event()
    tasks = []
    try:
        for s in streams:
            await checked.xadd(s, {"d": b"x"})
            sp = StreamSpec(
                stream=s, group="g", consumer="c", block_ms=20, min_idle_ms=50,
                reclaim_interval_s=0.05, max_deliveries=1,
            )  # fmt: skip
            gc = GroupConsumer(checked, sp, poison, CollectorRegistry(), "t")
            tasks.append(asyncio.create_task(gc.run(stop)))

        async def dead() -> bool:
            return all([await checked.xlen(keys.dead_letter_stream(s)) == 1 for s in streams])

        await eventually(dead, timeout_s=20)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await checked.aclose()
    assert log.violations == [], log.violations
    assert log.transactions >= len(streams)
