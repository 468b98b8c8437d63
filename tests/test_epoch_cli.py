"""``massive-pipeline epoch inspect`` against a real Redis populated by the real normalizer."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.epochs.normalizer import Normalizer
from processors.ops import cli, epoch_cli
from schemas import keys
from schemas.messages import ChainPointer, ChainSnapshot, encode_snapshot
from streams.processor import Deps
from streams.settings import RuntimeSettings
from tests.factories import contract
from tests.util import RedisServer, free_port

NS = 1_764_000_000_000_000_000


def snap(ts: int, strikes: list[float]) -> ChainSnapshot:
    cs = [contract("SPXW", "2026-12-18", r, k, bid=1.0, ask=1.1) for k in strikes for r in "CP"]
    return ChainSnapshot("SPX", ts, 6000.0, cs)


async def populate(url: str) -> tuple[str, str]:
    r = Redis.from_url(url)
    try:
        await r.flushall()
        n = Normalizer(Deps(r, RuntimeSettings(redis_url=url, consumer="t"), CollectorRegistry()))
        eids = []
        for ts, strikes in ((NS, [6000.0, 6005.0]), (NS + 10**9, [6000.0, 6005.0, 6010.0])):
            s = snap(ts, strikes)
            key = keys.chain_snapshot("SPX", ts)
            await r.set(key, encode_snapshot(s))
            await n.process(ChainPointer(symbol="SPX", snapshot_key=key, ts_ns=ts, n_contracts=4))
            eids.append((await r.get(keys.epoch_active("SPX"))).decode())  # type: ignore[union-attr]
        # A tile builder group that has read nothing yet: its lag is the whole stream.
        await r.xgroup_create(keys.contracts_dirty_stream("SPX"), "tiles-single", id="0")
        return eids[0], eids[1]
    finally:
        await r.aclose()


def test_inspect_reports_epochs_states_counts_and_dirty_lag(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = asyncio.run(populate(redis_server.url))
    monkeypatch.setenv("MASSIVE_REDIS_URL", redis_server.url)
    assert cli.main(["epoch", "inspect", "--json"]) == 0
    rep = orjson.loads(capsys.readouterr().out)
    assert rep["active"] == {"SPX": new}
    by = {e["eid"]: e for e in rep["epochs"]}
    assert set(by) == {old, new}
    assert by[new]["state"] == "active" and by[new]["is_active"] is True
    assert by[new]["n_contracts"] == by[new]["topology"] == 6 and by[new]["consistent"]
    assert by[new]["ttl_s"] == -1 and by[new]["expiries"] == ["2026-12-18"]
    assert by[new]["carry_from"] is None  # the promotion's carry finished
    assert by[old]["state"] == "retired" and by[old]["is_active"] is False
    assert by[old]["topology"] == 4 and 0 < by[old]["ttl_s"] <= 300
    assert by[new]["age_s"] is not None and by[new]["age_s"] >= 0
    # 1 dirty entry per epoch (4 and 6 cids, chunk 500) -> lag 2 for the fresh group
    assert rep["dirty_length"] == 2
    assert [(g["group"], g["lag"], g["pending"]) for g in rep["dirty"]] == [("tiles-single", 2, 0)]

    assert epoch_cli.main(["inspect"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["symbol", "epoch", "state"]
    assert any(new in ln and "active" in ln and "*" in ln for ln in lines)
    assert any(old in ln and "retired" in ln for ln in lines)
    assert "group tiles-single" in text and "lag        2" in text
    assert "!!" not in text


def test_inspect_flags_an_inconsistent_epoch_and_a_pointer_without_meta(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def setup() -> None:
        r = Redis.from_url(redis_server.url)
        await r.flushall()
        await r.set(keys.epoch_active("SPX"), "gone")
        await r.set(keys.epoch_active("NDX"), "half")
        await r.hset(
            keys.epoch_meta("NDX", "half"),
            mapping={"symbol": "NDX", "state": "active", "n_contracts": 5},
        )
        await r.sadd(keys.epoch_contracts("NDX", "half"), "a", "b")
        await r.hset(keys.epoch_meta("NDX", "half"), "carry_from", "prev")  # a crashed carry
        await r.aclose()

    asyncio.run(setup())
    monkeypatch.setenv("MASSIVE_REDIS_URL", redis_server.url)
    assert epoch_cli.main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "!! n_contracts != topology" in out
    assert "!! carry from prev pending" in out
    assert any("gone" in ln and "missing" in ln for ln in out.splitlines())
    assert "no consumer groups" in out


def test_inspect_on_an_empty_redis_and_an_unreachable_one(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def flush() -> None:
        r = Redis.from_url(redis_server.url)
        await r.flushall()
        await r.aclose()

    asyncio.run(flush())
    monkeypatch.setenv("MASSIVE_REDIS_URL", redis_server.url)
    assert epoch_cli.main(["inspect"]) == 0
    assert "no epochs" in capsys.readouterr().out
    monkeypatch.setenv("MASSIVE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert epoch_cli.main(["inspect"]) == 2
    assert "error: cannot reach Redis at redis://127.0.0.1:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        epoch_cli.main([])
