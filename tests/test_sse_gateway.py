"""SSE gateway against a real uvicorn server on a free port and a real Redis, with real SSE
clients (httpx-sse, and a raw socket for the stalled client)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from redis.asyncio import Redis

from processors.serve.gateway import (
    DiffFeed,
    Item,
    Metrics,
    SseGateway,
    SseSettings,
    WholeSubscriber,
    channels,
    frame,
    parse_id,
)
from schemas import keys
from schemas.messages import ModelDiff, encode
from streams.processor import Deps
from tests.sse_client import Dechunk, ViewReader
from tests.sse_publisher import FakeMarket, ModelWriter, publish_full, publish_step
from tests.util import eventually

SETTINGS = SseSettings(host="127.0.0.1", port=0, ping_s=15.0, block_ms=200, admin_port=0)
HEAT = "heatmap:butterfly"


@contextlib.asynccontextmanager
async def gateway(deps: Deps, settings: SseSettings = SETTINGS) -> AsyncIterator[SseGateway]:
    gw = SseGateway(deps, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))

    async def up() -> bool:
        if task.done():
            task.result()
        return gw.ready

    await eventually(up, timeout_s=10)
    try:
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def base(gw: SseGateway) -> str:
    return f"http://127.0.0.1:{gw.port}"


def admin(gw: SseGateway) -> str:
    """The admin port: /metrics, /api/epochs (never on the public port)."""
    return f"http://127.0.0.1:{gw.admin_port}"


class Client:
    """Collects the events of one SSE connection in the background."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: asyncio.Queue[ServerSentEvent] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as http,
            aconnect_sse(http, "GET", self.url, headers=self.headers) as es,
        ):
            assert es.response.status_code == 200
            async for ev in es.aiter_sse():
                if ev.event == "message" and not ev.data:
                    continue  # a bare "retry:" block (browsers dispatch nothing for it)
                await self.events.put(ev)

    async def __aenter__(self) -> Client:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def next(self, timeout_s: float = 5.0) -> ServerSentEvent:
        assert self.task is not None
        get = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait(
            [get, self.task], timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
        if get in done:
            return get.result()
        get.cancel()
        if self.task.done():
            self.task.result()
            raise AssertionError("SSE stream ended")
        raise AssertionError(f"no SSE event within {timeout_s}s")

    async def next_data(self, event: str | None = None, timeout_s: float = 5.0) -> ServerSentEvent:
        """Next snapshot/diff/status event (skips nothing else: pings are comments)."""
        ev = await self.next(timeout_s)
        if event is not None:
            assert ev.event == event, (ev.event, ev.data[:200])
        return ev


def norm(items: dict[str, Any]) -> dict[str, Any]:
    """Items as JSON text gives them (tuples -> lists)."""
    return cast(dict[str, Any], json.loads(json.dumps(items)))


def apply(items: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(items)
    out.update(diff["changed"])
    for k in diff["removed"]:
        out.pop(k, None)
    return out


async def test_snapshot_then_diffs_filtered_by_symbol(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx, ndx = FakeMarket("SPX"), FakeMarket("NDX", spot=21000.0, step=10.0, seed=3)
    await publish_full(writer, spx, 1)
    await publish_full(writer, ndx, 1)
    async with gateway(deps) as gw, Client(f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX") as c:
        snap = await c.next_data("snapshot")
        model = json.loads(snap.data)
        assert model["version"] == 1 and model["symbol"] == "SPX" and model["kind"] == HEAT
        assert snap.id == writer.models[("SPX", HEAT)].diff_id
        ids = []
        for i in range(5):
            await publish_step(writer, ndx, 10 + i)  # other symbol: filtered out
            await publish_step(writer, spx, 10 + i)
            ids.append(writer.models[("SPX", HEAT)].diff_id)
        items = model["items"]
        for i in range(5):
            ev = await c.next_data("diff")
            diff = json.loads(ev.data)
            assert diff["symbol"] == "SPX"
            assert diff["version"] == 2 + i and ev.id == ids[i]
            items = apply(items, diff)
        assert items == writer.models[("SPX", HEAT)].items
        assert c.events.empty()


async def test_checkpoint_model_is_followed_by_the_diffs_after_it(deps: Deps, redis: Redis) -> None:
    """A heatmap model key is a checkpoint that may lag its diffs (the publisher rewrites it
    at most every few seconds under load): a new client gets the checkpoint, then at once
    the diffs after its diff_id, then live diffs, with no resync loop."""
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    key = keys.heatmap_model("SPX", "butterfly")
    checkpoint = await redis.get(key)
    for i in range(3):
        await publish_step(writer, spx, 10 + i)  # v2..v4 as diffs
    await redis.set(key, checkpoint)  # the model key still holds v1
    async with gateway(deps) as gw, Client(f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX") as c:
        snap = await c.next_data("snapshot")
        items = json.loads(snap.data)["items"]
        assert json.loads(snap.data)["version"] == 1
        for v in (2, 3, 4):
            diff = json.loads((await c.next_data("diff")).data)
            assert diff["version"] == v
            items = apply(items, diff)
        await publish_step(writer, spx, 20)  # live
        diff = json.loads((await c.next_data("diff")).data)
        assert diff["version"] == 5
        items = apply(items, diff)
        assert items == writer.models[("SPX", HEAT)].items
        assert (
            await metric(gw, 'massive_sse_resyncs_total{channel="heatmap:butterfly",reason="gap"}')
            == 0
        )
        # the JSON endpoint serves the latest version too (checkpoint + diffs applied)
        await redis.set(key, checkpoint)
        resp = await _get(gw, "/api/heatmap/butterfly?symbol=SPX")
        api = resp.json()
        assert api["version"] == 5 and api["items"] == items
        assert api["diff_id"] == writer.models[("SPX", HEAT)].diff_id
        # encoded as it is sent (a whole model is ~15 MB), not built whole first
        assert "content-length" not in resp.headers
        expiry = next(iter(items)).split(":")[1]
        view = (await _get(gw, f"/api/heatmap/butterfly?symbol=SPX&expiry={expiry}")).json()
        assert view["version"] == 5
        assert view["items"] == {k: v for k, v in items.items() if k.split(":")[1] == expiry}


async def test_a_spooled_checkpoint_answers_api_and_snapshots_with_the_diffs_laid_over_it(
    deps: Deps, redis: Redis, tmp_path: Path
) -> None:
    """A marked checkpoint (here in pieces of 7 tiles) is answered from a spool file a piece
    at a time: /api (whole and a view) equals the model at its latest version, whatever the
    diffs after the checkpoint did to a tile (changed, removed, added, removed then added
    again); a whole-model client's snapshot is the checkpoint as stored; and no spool file
    stays open once the answers are sent."""
    writer = ModelWriter(redis, items_per_piece=7)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    key = keys.heatmap_model("SPX", "butterfly")
    stored = await redis.get(key)
    assert stored is not None and stored.count(b"\t") > 3
    tiles = list(writer.models[("SPX", HEAT)].items)
    one, two, three = tiles[0], tiles[len(tiles) // 2], tiles[-1]
    new = one.replace(one.split(":")[-1], "9999")
    assert new not in tiles

    async def step(changed: dict[str, Any], removed: list[str]) -> None:
        await writer.publish("SPX", HEAT, spx.epoch, changed, removed, ts_ns=2)

    await step({one: {"v": 1}, new: {"v": 2}}, [two])
    await step({}, [three, one])
    await step({three: {"v": 3}, one: {"v": 4}}, [])
    await redis.set(key, stored)  # the model key still holds v1: three diffs after it
    truth = writer.models[("SPX", HEAT)]
    assert truth.version == 4 and two not in truth.items and new in truth.items

    def spool_fds() -> list[str]:
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
                    fds.append(fd)
        return fds

    settings = replace(SETTINGS, spool_dir=str(tmp_path), view_linger_s=1.0)
    async with gateway(deps, settings) as gw:
        resp = await _get(gw, "/api/heatmap/butterfly?symbol=SPX")
        api = resp.json()
        assert (api["version"], api["ts_ns"], api["diff_id"]) == (4, 2, truth.diff_id)
        assert api["items"] == norm(truth.items)
        assert api["meta"] == truth.meta
        expiry = one.split(":")[1]
        view = (await _get(gw, f"/api/heatmap/butterfly?symbol=SPX&expiry={expiry}")).json()
        assert view["version"] == 4
        assert view["items"] == {k: v for k, v in norm(truth.items).items() if expiry in k}
        async with Client(f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX") as c:
            snap = await c.next_data("snapshot")
            assert snap.data.encode() == stored and snap.id == json.loads(stored)["diff_id"]
            items = json.loads(snap.data)["items"]
            for _ in range(3):
                items = apply(items, json.loads((await c.next_data("diff")).data))
            assert items == norm(truth.items)
        # a view's feed loads its model from the same spooled checkpoint, a piece at a time
        right = one.split(":")[-1]
        q = f"symbol=SPX&expiry={expiry}&right={right}"
        async with Client(f"{base(gw)}/sse/heatmap/butterfly?{q}") as vc:
            reader = ViewReader()
            vsnap = reader.snapshot((await vc.next_data("snapshot")).data)
            assert vsnap["items"] == view_truth(writer, HEAT, expiry, right) != {}

        async def closed() -> bool:  # the snapshot's share time over, the janitor drops it
            gc.collect()
            return spool_fds() == [] and await metric(gw, "massive_sse_spool_bytes") == 0

        await eventually(closed, timeout_s=10)


async def test_a_checkpoint_with_an_undecodable_piece_is_a_counted_rejection(
    deps: Deps, redis: Redis
) -> None:
    """A view feed reads a marked checkpoint a piece at a time: a piece that is not JSON is
    a counted ``bad_model`` (no crash, nothing sent); the next good model is served."""
    writer = ModelWriter(redis, items_per_piece=7)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    key = keys.heatmap_model("SPX", "butterfly")
    stored = await redis.get(key)
    assert stored is not None
    cut = [m.start() for m in re.finditer(b"\t", stored)][2]
    await redis.set(key, stored[:cut] + b"\t{not json," + stored[cut + 1 :])
    expiry = next(iter(writer.models[("SPX", HEAT)].items)).split(":")[1]
    q = f"symbol=SPX&expiry={expiry}"
    bad = 'massive_sse_rejected_total{channel="heatmap:butterfly",reason="bad_model"}'
    settings = replace(SETTINGS, no_model_poll_s=0.2)
    async with gateway(deps, settings) as gw, Client(f"{base(gw)}/sse/heatmap/butterfly?{q}") as c:

        async def rejected() -> bool:
            return await metric(gw, bad) >= 1

        await eventually(rejected)
        await redis.set(key, stored)  # the writer's next checkpoint
        snap = ViewReader().snapshot((await c.next_data("snapshot", timeout_s=10)).data)
        truth = writer.models[("SPX", HEAT)].items
        assert snap["items"] == norm({k: v for k, v in truth.items() if expiry in k})


async def test_api_requests_in_flight_together_share_one_read(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests for the same model while its read is in flight get that read (every page
    polls /api/gex); a request after it reads again; a filtered answer leaves the shared
    model whole."""
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    await publish_step(writer, spx, 2)
    async with gateway(deps) as gw:
        reads: list[str] = []
        release = asyncio.Event()
        read = gw.gateway.current_model

        async def slow_read(channel: Any, symbol: str) -> Any:
            reads.append(channel.name)
            await release.wait()
            return await read(channel, symbol)

        monkeypatch.setattr(gw.gateway, "current_model", slow_read)
        asked = 0
        shared = gw.gateway.shared_model

        async def counted(channel: Any, symbol: str) -> Any:
            nonlocal asked
            asked += 1
            return await shared(channel, symbol)

        monkeypatch.setattr(gw.gateway, "shared_model", counted)
        path = "/api/heatmap/butterfly?symbol=SPX"
        async with httpx.AsyncClient(base_url=base(gw), timeout=10) as http:
            asks = [asyncio.create_task(http.get(path)) for _ in range(5)]
            expiry = next(iter(writer.models[("SPX", HEAT)].items)).split(":")[1]
            asks.append(asyncio.create_task(http.get(f"{path}&expiry={expiry}")))

            async def all_waiting() -> bool:
                return asked == 6

            await eventually(all_waiting)
            release.set()
            answers = await asyncio.gather(*asks)
        truth = writer.models[("SPX", HEAT)]
        for r in answers[:5]:
            assert r.status_code == 200
            assert (r.json()["version"], r.json()["items"]) == (truth.version, norm(truth.items))
        view = answers[5].json()
        assert view["items"] == {k: v for k, v in norm(truth.items).items() if expiry in k}
        assert reads == ["heatmap:butterfly"]
        assert (await _get(gw, path)).json()["items"] == norm(truth.items)
        assert len(reads) == 2


async def metric(gw: SseGateway, series: str) -> float:
    """Value of one exposition line of /metrics (0 when absent)."""
    for line in (await _get(gw, "/metrics", admin(gw))).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _get(gw: SseGateway, path: str, url: str | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url or base(gw)) as http:
        return await http.get(path)


async def test_resume_by_last_event_id_replays_every_missed_diff_once_in_order(
    deps: Deps, redis: Redis
) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    url = ""
    async with gateway(deps) as gw:
        url = f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX"
        async with Client(url) as c:
            await c.next_data("snapshot")
            for i in range(3):
                await publish_step(writer, spx, 10 + i)
            last = None
            for _ in range(3):
                last = await c.next_data("diff")
        assert last is not None
        missed = []
        for i in range(7):
            await publish_step(writer, spx, 20 + i)
            missed.append(writer.models[("SPX", HEAT)].diff_id)
        async with Client(url, {"Last-Event-ID": last.id}) as c2:
            got = [await c2.next_data("diff") for _ in range(7)]
            assert [e.id for e in got] == missed
            assert [json.loads(e.data)["version"] for e in got] == list(range(5, 12))
            # live diffs continue after the replay, nothing duplicated
            await publish_step(writer, spx, 99)
            ev = await c2.next_data("diff")
            assert json.loads(ev.data)["version"] == 12
            assert c2.events.empty()
        # the query parameter works like the header (hand-made reconnects)
        async with Client(url + f"&last_event_id={missed[-2]}") as c3:
            ev = await c3.next_data("diff")
            assert ev.id == missed[-1]


async def test_resume_from_trimmed_id_sends_fresh_snapshot(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    async with gateway(deps) as gw:
        url = f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX"
        async with Client(url) as c:
            old = (await c.next_data("snapshot")).id
        for i in range(6):
            await publish_step(writer, spx, 10 + i)
        await redis.xtrim(
            keys.heatmap_diffs_stream("butterfly", "SPX"), maxlen=2, approximate=False
        )
        async with Client(url, {"Last-Event-ID": old}) as c2:
            snap = await c2.next_data("snapshot")
            model = json.loads(snap.data)
            assert model["version"] == 7
            assert model["items"] == writer.models[("SPX", HEAT)].items
            assert snap.id == writer.models[("SPX", HEAT)].diff_id
        # an id that never existed (well after the head) also falls back to a snapshot
        async with Client(url, {"Last-Event-ID": "1-1"}) as c3:
            assert json.loads((await c3.next_data("snapshot")).data)["version"] == 7
        metrics = (await _get(gw, "/metrics", admin(gw))).text
        assert 'massive_sse_resyncs_total{channel="heatmap:butterfly",reason="resume"} 2.0' in (
            metrics
        )


async def test_version_gap_and_epoch_change_resync_live_clients(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    async with gateway(deps) as gw:
        url = f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX"
        async with Client(url) as c:
            await c.next_data("snapshot")
            await publish_step(writer, spx, 2)
            assert json.loads((await c.next_data("diff")).data)["version"] == 2
            # a publisher jumps a version (e.g. a lost diff): the client is re-snapshotted
            await writer.publish("SPX", HEAT, spx.epoch, spx.tiles("butterfly"), version=5)
            snap = await c.next_data("snapshot")
            assert json.loads(snap.data)["version"] == 5
            # new epoch: versions restart, the client gets the new model, not a diff
            spx.epoch = "fake-epoch-2"
            await writer.publish("SPX", HEAT, spx.epoch, spx.tiles("butterfly"))
            snap = await c.next_data("snapshot")
            model = json.loads(snap.data)
            assert (model["epoch"], model["version"]) == ("fake-epoch-2", 1)
            await publish_step(writer, spx, 3)
            diff = json.loads((await c.next_data("diff")).data)
            assert (diff["epoch"], diff["version"]) == ("fake-epoch-2", 2)
        metrics = (await _get(gw, "/metrics", admin(gw))).text
        for reason in ("gap", "epoch"):
            assert (
                f'massive_sse_resyncs_total{{channel="heatmap:butterfly",reason="{reason}"}} 1.0'
                in metrics
            )


async def test_a_view_client_gets_a_new_epochs_model_as_a_snapshot(
    deps: Deps, redis: Redis
) -> None:
    """A new epoch's first diff carries the whole new model: a view feed resyncs on it (the
    head tells) and reloads, so a tile the new epoch dropped is gone from the view."""
    writer, spx, front, q = await front_calls_view(redis)
    async with gateway(deps) as gw, Client(f"{base(gw)}/sse/heatmap/butterfly?{q}") as c:
        reader = ViewReader()
        reader.snapshot((await c.next_data("snapshot")).data)
        tiles = spx.tiles("butterfly")
        dropped = min(k for k in tiles if k.split(":")[1] == front and k.endswith(":C"))
        spx.epoch = "fake-epoch-2"
        await writer.publish(
            "SPX", HEAT, spx.epoch, {k: v for k, v in tiles.items() if k != dropped}
        )
        snap = reader.snapshot((await c.next_data("snapshot")).data)
        assert snap["items"] == view_truth(writer, HEAT, front, "C") != {}
        assert dropped not in snap["items"]


async def test_a_snapshot_version_resyncs_whole_and_view_clients_from_the_model_key(
    deps: Deps, redis: Redis
) -> None:
    """A snapshot version's diff carries no items (the publisher's whole-model publish:
    ModelDiff.snapshot): a whole-model client and a view client both get the model key as a
    fresh snapshot, within the same epoch too, and the diffs after it apply."""
    writer, spx, front, q = await front_calls_view(redis)
    async with (
        gateway(deps) as gw,
        Client(f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX") as whole,
        Client(f"{base(gw)}/sse/heatmap/butterfly?{q}") as view,
    ):
        assert json.loads((await whole.next_data("snapshot")).data)["version"] == 1
        reader = ViewReader()
        reader.snapshot((await view.next_data("snapshot")).data)
        tiles = spx.tiles("butterfly")
        calls = sorted(k for k in tiles if k.split(":")[1] == front and k.endswith(":C"))
        dropped, moved = calls[0], calls[1]
        await writer.publish(
            "SPX", HEAT, spx.epoch, {moved: {"debit": 99.5}}, [dropped], snapshot=True
        )
        truth = norm(writer.models[("SPX", HEAT)].items)
        snap = json.loads((await whole.next_data("snapshot")).data)
        assert snap["version"] == 2 and snap["items"] == truth and dropped not in truth
        vsnap = reader.snapshot((await view.next_data("snapshot")).data)
        assert vsnap["items"] == view_truth(writer, HEAT, front, "C")
        assert vsnap["items"][moved] == {"debit": 99.5} and dropped not in vsnap["items"]
        await writer.publish("SPX", HEAT, spx.epoch, {moved: {"debit": 98.5}})
        d = json.loads((await whole.next_data("diff")).data)
        assert (d["version"], d["prev_version"], d["changed"]) == (3, 2, {moved: {"debit": 98.5}})
        touched: set[str] = set()
        await eventually(lambda: _drained(view, reader, touched), timeout_s=5)
        assert reader.model is not None
        assert reader.model["items"] == view_truth(writer, HEAT, front, "C")
        metrics = (await _get(gw, "/metrics", admin(gw))).text
        assert 'massive_sse_resyncs_total{channel="heatmap:butterfly",reason="snapshot"}' in metrics


async def test_whole_model_clients_resyncing_together_share_one_read_of_the_model(
    deps: Deps, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a snapshot version every whole-model client resyncs at once: they share one read
    of the model key (a 15 MB butterfly checkpoint spooled once, not once per client), and
    each gets the new version."""
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    url = "/sse/heatmap/butterfly?symbol=SPX"
    async with gateway(deps) as gw, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(f"{base(gw)}{url}")) for _ in range(4)]
        for c in clients:
            assert json.loads((await c.next_data("snapshot")).data)["version"] == 1
        reads: list[str] = []
        spool = gw.gateway.spool

        async def counted(channel: Any, symbol: str) -> Any:
            reads.append(channel.name)
            await asyncio.sleep(0.05)  # a 15 MB copy takes ~100 ms: the others resync meanwhile
            return await spool(channel, symbol)

        monkeypatch.setattr(gw.gateway, "spool", counted)
        key = next(iter(spx.tiles("butterfly")))
        await writer.publish("SPX", HEAT, spx.epoch, {key: {"debit": 42.5}}, snapshot=True)
        truth = norm(writer.models[("SPX", HEAT)].items)
        for c in clients:
            snap = json.loads((await c.next_data("snapshot")).data)
            assert snap["version"] == 2 and snap["items"] == truth
        assert reads == [HEAT]


async def _drained(c: Client, reader: ViewReader, touched: set[str]) -> bool:
    await drain(c, reader, touched)
    return reader.model is not None and reader.model["version"] >= 3


async def test_stream_waits_for_a_model_that_does_not_exist_yet(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    settings = replace(SETTINGS, no_model_poll_s=5.0)  # the first diff wakes it, not the timer
    async with gateway(deps, settings) as gw, Client(f"{base(gw)}/sse/gex?symbol=SPX") as c:
        status = await c.next_data("status")
        assert json.loads(status.data) == {"state": "no_model"}
        await publish_full(writer, spx, 1)
        snap = await c.next_data("snapshot", timeout_s=3)
        model = json.loads(snap.data)
        assert model["kind"] == "gex" and "levels" in model["meta"]
        await publish_step(writer, spx, 2)
        assert json.loads((await c.next_data("diff")).data)["version"] == 2


class _Diff:
    """What WholeSubscriber reads of an Item: its entry id and frame (the items it rewrites
    ride along so the merge below can size the union)."""

    def __init__(self, seq: int, keys: frozenset[str], size_per_key: int) -> None:
        self.id = (seq, 0)
        self.keys = keys
        self.frame = b"x" * (size_per_key * len(keys))


def test_whole_subscriber_merges_a_slow_backlog_early_and_in_linear_work() -> None:
    """A slow whole-model client holds about one merged diff plus whole_conflate_bytes,
    not whole_pending_max_bytes of frames; each merge covers at least as many new bytes as
    the merged head it rewrites; a client with no base yet is held to the bound only."""
    merged_bytes = 0

    def merge(items: list[Any]) -> Any:
        nonlocal merged_bytes
        merged_bytes += sum(len(it.frame) for it in items)
        keys = frozenset().union(*(it.keys for it in items))
        out = _Diff(items[-1].id[0], keys, 1000)
        return out

    kb = 1000
    sub = WholeSubscriber("SPX", 10_000 * kb, 200 * kb, merge)
    sub.hold((0, 0))
    held: list[int] = []
    pushed = 0
    for i in range(1, 2001):  # 100 kB diffs over a hot set of 150 items
        d = _Diff(i, frozenset(f"k{(i * 7 + j) % 150}" for j in range(100)), 1000)
        assert sub.push(cast(Item, d))
        pushed += len(d.frame)
        held.append(sub.nbytes)
    # one merged head (<= the 150-item model, 150 kB) plus at most max(conflate, head) more
    assert max(held) <= 150 * kb + max(200 * kb, 150 * kb) + 100 * kb
    assert merged_bytes <= 3 * pushed  # linear, not a re-merge of the head per push
    assert not sub.overflowed

    # no base yet (the snapshot is still loading): nothing to merge onto, only the bound
    fresh = WholeSubscriber("SPX", 1000 * kb, 200 * kb, merge)
    for i in range(1, 11):
        assert fresh.push(cast(Item, _Diff(i, frozenset({f"a{i}"}), 100 * kb)))
    assert len(fresh.buf) == 10 and not fresh.overflowed
    assert not fresh.push(cast(Item, _Diff(11, frozenset({"b"}), 100 * kb)))
    assert fresh.overflowed


def _frames(dc: Dechunk) -> list[tuple[str, str, str]]:
    """Pop complete frames of a raw HTTP response as (event, id, data); comments skipped."""
    return [(ev, eid, data.decode()) for ev, eid, data in dc.frames()]


@pytest.mark.slow
async def test_stalled_client_is_bounded_and_resynced_without_blocking_others(
    deps: Deps, redis: Redis
) -> None:
    writer = ModelWriter(redis)
    await writer.publish("SPX", HEAT, "e1", {"seed": 0}, ts_ns=1)
    # the stalled client must stay connected however long the machine takes to send the rest
    # ~8 diffs of 100 kB held, merged beyond 2
    settings = replace(
        SETTINGS,
        whole_pending_max_bytes=800_000,
        whole_conflate_bytes=200_000,
        send_timeout_s=600.0,
    )
    n = 80
    blob = "x" * 100_000  # 80 x 100 kB: more than the socket buffers can absorb
    async with gateway(deps, settings) as gw:
        url = f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX"
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", gw.port))
        slow.sendall(b"GET /sse/heatmap/butterfly?symbol=SPX HTTP/1.1\r\nHost: x\r\n\r\n")
        slow.setblocking(False)
        try:
            async with Client(url) as fast:
                await fast.next_data("snapshot")

                async def slow_subscribed() -> bool:
                    m = (await _get(gw, "/metrics", admin(gw))).text
                    return 'massive_sse_clients{channel="heatmap:butterfly"} 2.0' in m

                await eventually(slow_subscribed)
                for i in range(n):
                    await writer.publish("SPX", HEAT, "e1", {f"t{i}": blob}, ts_ns=i)
                versions = [
                    json.loads((await fast.next_data("diff", 20)).data)["version"] for _ in range(n)
                ]
                assert versions == list(range(2, n + 2))  # every diff, in order, no resync

                async def dropped() -> float:
                    return await metric(
                        gw, 'massive_sse_dropped_total{channel="heatmap:butterfly"}'
                    )

                # the stalled client's buffer overflowed (entries dropped for it alone) while
                # the reader and the fast client went on
                assert await eventually(dropped, timeout_s=5) > 0
                # now the slow client reads: a consistent prefix (snapshot v1, diffs v2..vk),
                # then a fresh snapshot (a stored model shared by clients joining within
                # SNAPSHOT_SHARE_S may be a few versions old) and the diffs after it, up to
                # the latest version: every event continues the model it holds. Its tiny
                # receive buffer was there to stall it; it reads with a normal one now (through
                # a window of a few kB the ~11 MB trickled at a pace that depended on how the
                # response headers aligned the stream).
                slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                loop = asyncio.get_running_loop()
                buf = Dechunk()
                reader = ViewReader()
                snapshots = 0
                deadline = time.monotonic() + 300  # a hang guard, not a speed target
                while snapshots < 2 or reader.model is None or reader.model["version"] < n + 1:
                    assert time.monotonic() < deadline, (snapshots, reader.head)
                    chunk = await asyncio.wait_for(loop.sock_recv(slow, 1 << 20), 10)
                    assert chunk, "slow stream closed"
                    buf += chunk
                    for e, eid, d in _frames(buf):
                        if e == "snapshot":
                            snapshots += 1
                            reader.snapshot(d)
                        elif e == "diff":
                            reader.diff(d, eid)
                assert reader.model["items"] == writer.models[("SPX", HEAT)].items
                # and after the resync, live diffs flow again
                await writer.publish("SPX", HEAT, "e1", {"after": 1}, ts_ns=n + 1)
                while reader.model["version"] < n + 2:
                    buf += await asyncio.wait_for(loop.sock_recv(slow, 1 << 20), 10)
                    for e, eid, d in _frames(buf):
                        assert e == "diff"
                        reader.diff(d, eid)
                overflow = (
                    'massive_sse_resyncs_total{channel="heatmap:butterfly",reason="overflow"}'
                )
                assert await metric(gw, overflow) == 1
        finally:
            slow.close()


@pytest.mark.slow
async def test_stalled_whole_client_gets_its_backlog_merged_not_a_new_snapshot(
    deps: Deps, redis: Redis
) -> None:
    """Diffs that rewrite the same items merge into one diff of about one diff's size: a
    stalled unfiltered client catches up from it, with no second snapshot."""
    writer = ModelWriter(redis)
    await writer.publish("SPX", HEAT, "e1", {"seed": 0, "gone": 1}, ts_ns=1)
    settings = replace(
        SETTINGS,
        whole_pending_max_bytes=800_000,
        whole_conflate_bytes=200_000,
        send_timeout_s=600.0,
    )
    n = 80
    async with gateway(deps, settings) as gw:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", gw.port))
        slow.sendall(b"GET /sse/heatmap/butterfly?symbol=SPX HTTP/1.1\r\nHost: x\r\n\r\n")
        slow.setblocking(False)
        try:

            async def subscribed() -> bool:
                m = (await _get(gw, "/metrics", admin(gw))).text
                return 'massive_sse_clients{channel="heatmap:butterfly"} 1.0' in m

            await eventually(subscribed)
            await asyncio.sleep(0.5)  # the snapshot is out: the client holds v1
            for i in range(n):
                changed = {"hot": f"{i:03d}" + "x" * 100_000, f"k{i % 3}": i}
                await writer.publish("SPX", HEAT, "e1", changed, ["gone"] if i == 5 else [])

            async def conflated() -> float:
                return await metric(gw, 'massive_sse_conflated_total{channel="heatmap:butterfly"}')

            assert await eventually(conflated, timeout_s=10) > 0
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            loop = asyncio.get_running_loop()
            buf, reader, snapshots = Dechunk(), ViewReader(), 0
            deadline = time.monotonic() + 300  # a hang guard, not a speed target
            while reader.model is None or reader.model["version"] < n + 1:
                assert time.monotonic() < deadline, reader.head
                chunk = await asyncio.wait_for(loop.sock_recv(slow, 1 << 20), 10)
                assert chunk, "slow stream closed"
                buf += chunk
                for e, eid, d in _frames(buf):
                    if e == "snapshot":
                        snapshots += 1
                        reader.snapshot(d)
                    elif e == "diff":
                        reader.diff(d, eid)  # raises ChainBreak if a merge broke the chain
            assert snapshots == 1
            assert reader.model["items"] == writer.models[("SPX", HEAT)].items
            assert "gone" not in reader.model["items"]
            for reason in ("overflow", "gap", "rewrite"):
                series = (
                    f'massive_sse_resyncs_total{{channel="heatmap:butterfly",reason="{reason}"}}'
                )
                assert await metric(gw, series) == 0
        finally:
            slow.close()


async def test_client_that_stops_reading_is_dropped_with_one_info_line(
    deps: Deps, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    writer = ModelWriter(redis)
    await writer.publish("SPX", HEAT, "e1", {"seed": 0}, ts_ns=1)
    # a queue deeper than what the socket can hold, so the session blocks in send, not overflow
    settings = replace(SETTINGS, send_timeout_s=0.5)
    blob = "x" * 100_000
    caplog.set_level(logging.INFO)
    uvicorn_errors: list[logging.LogRecord] = []
    collect = logging.Handler(logging.ERROR)
    collect.emit = uvicorn_errors.append  # type: ignore[method-assign]
    async with gateway(deps, settings) as gw:
        # uvicorn's loggers don't propagate, and its start-up replaces their handlers
        logging.getLogger("uvicorn.error").addHandler(collect)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", gw.port))
        stuck.sendall(b"GET /sse/heatmap/butterfly?symbol=SPX HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            series = 'massive_sse_send_timeouts_total{channel="heatmap:butterfly"}'
            for i in range(80):
                await writer.publish("SPX", HEAT, "e1", {f"t{i}": blob}, ts_ns=i + 2)

            async def dropped() -> bool:
                return await metric(gw, series) == 1

            await eventually(dropped, timeout_s=20)
        finally:
            stuck.close()
        # the gateway serves on
        assert (await _get(gw, "/api/heatmap/butterfly?symbol=SPX")).status_code == 200
    logging.getLogger("uvicorn.error").removeHandler(collect)
    errors = [r for r in [*caplog.records, *uvicorn_errors] if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    infos = [r.getMessage() for r in caplog.records if "dropped SSE client" in r.getMessage()]
    assert len(infos) == 1 and "heatmap:butterfly" in infos[0], infos


async def test_json_endpoints_health_metrics_and_keepalive(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    await redis.set(keys.epoch_active("SPX"), "eid1")
    await redis.hset(keys.epoch_meta("SPX", "eid1"), mapping={"state": "active", "spot": "6850.1"})
    async with (
        gateway(deps, replace(SETTINGS, ping_s=0.2)) as gw,
        httpx.AsyncClient(base_url=base(gw)) as http,
    ):
        r = await http.get("/api/heatmap/vertical", params={"symbol": "spx"})
        assert r.status_code == 200
        assert r.json()["version"] == writer.models[("SPX", "heatmap:vertical")].version
        assert (await http.get("/api/gex?symbol=SPX")).json()["kind"] == "gex"
        assert (await http.get("/api/gex?symbol=NDX")).status_code == 404
        assert (await http.get("/api/heatmap/condor?symbol=SPX")).status_code == 400
        assert (await http.get("/sse/heatmap/condor?symbol=SPX")).status_code == 400
        assert (await http.get("/api/gex?symbol=S%20X")).status_code == 400
        ep = (await http.get(admin(gw) + "/api/epochs")).json()
        assert ep["active"]["SPX"] == {
            "epoch": "eid1",
            "meta": {"state": "active", "spot": "6850.1"},
        }
        assert ep["strategies"] == list(keys.STRATEGIES)
        # the page's view of it, on the public port (internal APIs are not)
        sy = (await http.get("/api/symbols")).json()
        assert sy["active"]["SPX"] == {"epoch": "eid1", "state": "active", "n_contracts": None}
        for internal in ("/api/epochs", "/metrics"):
            assert (await http.get(internal)).status_code == 404
        assert (await http.get(admin(gw) + "/readyz")).text == "ready\n"
        assert (await http.get("/healthz")).text == "ok\n"
        page = await http.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert (await http.get("/static/app.js")).status_code == 200
        # keep-alive comments while no data flows
        async with http.stream("GET", "/sse/gex?symbol=SPX") as resp:
            body = b""
            async for chunk in resp.aiter_bytes():
                body += chunk
                if body.count(b": ping") >= 2:
                    break
            assert b"event: snapshot" in body
        metrics = (await http.get(admin(gw) + "/metrics")).text
        assert 'massive_sse_events_sent_total{channel="gex",event="snapshot"} 1.0' in metrics


async def test_stop_ends_open_streams_promptly(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    await writer.publish("SPX", "gex", "e", {"6000": {"strike": 6000.0}}, ts_ns=1)
    gw = SseGateway(deps, SETTINGS)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))

    async def up() -> bool:
        return gw.ready

    await eventually(up, timeout_s=10)
    async with Client(f"http://127.0.0.1:{gw.port}/sse/gex?symbol=SPX") as c:
        await c.next_data("snapshot")
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - t0 < 3
        assert c.task is not None
        await asyncio.wait_for(asyncio.shield(c.task), 5)  # the stream ended cleanly


def test_ids_and_frames() -> None:
    assert parse_id("1700000000000-3") == (1700000000000, 3)
    assert parse_id(b"5") == (5, 0)
    assert parse_id("x-1") is None and parse_id(None) is None and parse_id("-1-2") is None
    assert frame("diff", b'{"a":\n1}', "1-0") == b'id: 1-0\r\nevent: diff\r\ndata: {"a": 1}\r\n\r\n'


@pytest.mark.slow
async def test_many_clients_short_load(deps: Deps, redis: Redis) -> None:
    """A short version of bench/sse_load.py: 50 clients, every diff reaches every client."""
    from bench.sse_load import run_load

    async with gateway(deps) as gw:
        res = await run_load(redis, base(gw), clients=50, diffs=40, rate_hz=40.0)
    assert res.lost == 0 and res.received == 50 * 40
    assert res.p99_ms < 2000


async def test_bind_failure_raises_instead_of_exiting(deps: Deps) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = SseGateway(deps, replace(SETTINGS, port=port))
        with pytest.raises(RuntimeError, match="cannot serve"):
            await asyncio.wait_for(gw.run(asyncio.Event()), 10)


async def test_build_reads_env_settings(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    from processors.registry import load

    monkeypatch.setenv("MASSIVE_SSE_PORT", "0")
    monkeypatch.setenv("MASSIVE_SSE_PENDING_MAX_BYTES", "7000")
    proc = load("sse-gateway", deps)
    assert isinstance(proc, SseGateway) and proc.name == "sse-gateway"
    assert proc.settings.pending_max_bytes == 7000
    with pytest.raises(ValueError, match="no argument"):
        load("sse-gateway:x", deps)


def view_truth(writer: ModelWriter, kind: str, expiry: str, right: str) -> dict[str, Any]:
    items = writer.models[("SPX", kind)].items
    return norm(
        {k: v for k, v in items.items() if k.split(":")[1] == expiry and k.endswith(":" + right)}
    )


async def drain(c: Client, reader: ViewReader, touched: set[str]) -> None:
    """Apply every event received so far."""
    while not c.events.empty():
        ev = c.events.get_nowait()
        if ev.event == "diff":
            touched.update(reader.diff(ev.data, ev.id)[1])
        elif ev.event == "snapshot":
            reader.snapshot(ev.data)


async def front_calls_view(redis: Redis) -> tuple[ModelWriter, FakeMarket, str, str]:
    """Published models of a FakeMarket, its front expiry and the query of that expiry's
    calls."""
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    front = min(e.isoformat() for e in spx.expiries)
    return writer, spx, front, f"symbol=SPX&expiry={front}&right=C"


async def test_view_stream_carries_only_its_tiles(deps: Deps, redis: Redis) -> None:
    writer, spx, front, q = await front_calls_view(redis)
    async with gateway(deps) as gw, Client(f"{base(gw)}/sse/heatmap/butterfly?{q}") as c:
        reader = ViewReader()
        snap = reader.snapshot((await c.next_data("snapshot")).data)
        truth = view_truth(writer, HEAT, front, "C")
        assert snap["items"] == truth and 0 < len(truth) < len(writer.models[("SPX", HEAT)].items)
        assert snap["view"] == {"expiry": front, "right": "C"}
        assert snap["expiries"] == sorted(e.isoformat() for e in spx.expiries)
        touched: set[str] = set()
        for i in range(30):
            await publish_step(writer, spx, 10 + i)

        async def caught_up() -> bool:
            await drain(c, reader, touched)
            assert reader.model is not None
            return reader.model["items"] == view_truth(writer, HEAT, front, "C")

        await eventually(caught_up)
        assert touched and touched <= set(truth)  # every diff stayed inside the view
        # the same view as JSON
        api = (await _get(gw, f"/api/heatmap/butterfly?{q}")).json()
        assert api["items"] == view_truth(writer, HEAT, front, "C")
        # front = the first expiry
        async with Client(f"{base(gw)}/sse/heatmap/butterfly?symbol=SPX&expiry=front") as c2:
            s2 = ViewReader().snapshot((await c2.next_data("snapshot")).data)
            assert s2["view"] == {"expiry": front}
            assert {k.split(":")[1] for k in s2["items"]} == {front}
        # GEX: the 0DTE fields only
        async with Client(f"{base(gw)}/sse/gex?symbol=SPX&expiry=0dte") as g:
            gs = ViewReader().snapshot((await g.next_data("snapshot")).data)
            one = next(iter(gs["items"].values()))
            assert "calls_0dte" in one and "calls" not in one and "strike" in one
            full = writer.models[("SPX", "gex")].items
            assert set(gs["items"]) == set(full)
            api = (await _get(gw, "/api/gex?symbol=SPX&expiry=0dte")).json()
            assert api["items"] == gs["items"]


async def test_view_work_is_shared_and_unknown_views_are_refused(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    front = min(e.isoformat() for e in spx.expiries)
    url = f"/sse/heatmap/butterfly?symbol=SPX&expiry={front}&right=P"
    async with gateway(deps) as gw, Client(base(gw) + url) as a, Client(base(gw) + url) as b:
        sa, sb = await a.next_data("snapshot"), await b.next_data("snapshot")
        assert sa.data == sb.data
        for i in range(10):
            await publish_step(writer, spx, 10 + i)
        ea, eb = await a.next_data("diff"), await b.next_data("diff")
        assert (ea.id, ea.data) == (eb.id, eb.data)  # one frame, shared
        assert await metric(gw, 'massive_sse_views{channel="heatmap:butterfly"}') == 1
        assert await metric(gw, 'massive_sse_clients{channel="heatmap:butterfly"}') == 2
        async with httpx.AsyncClient(base_url=base(gw)) as http:
            for path, status in [
                ("/sse/heatmap/butterfly?symbol=QQQ", 404),  # neither offered nor published
                ("/api/heatmap/butterfly?symbol=QQQ", 404),
                ("/sse/heatmap/butterfly?symbol=SPX&expiry=2001-01-01", 404),
                ("/api/heatmap/butterfly?symbol=SPX&expiry=2001-01-01", 404),
                ("/sse/gex?symbol=SPX&expiry=2001-01-01", 404),  # not a listed expiry
                ("/sse/heatmap/butterfly?symbol=SPX&right=X", 400),
                ("/sse/heatmap/butterfly?symbol=SPX&strikes=9-1", 400),
                ("/sse/gex?symbol=SPX&right=C", 400),
            ]:
                assert (await http.get(path)).status_code == status, path


async def _gex_with_dates(
    writer: ModelWriter, redis: Redis, calls: dict[str, dict[str, float]], puts: dict[str, Any]
) -> None:
    """A GEX model listing three expiries, and its per-expiry keys at the same version (the
    keys first: the gateway reads them when the diff arrives, as after the publish script)."""
    old = writer.models.get(("SPX", "gex"))
    version = 1 if old is None else old.version + 1
    for key, side in ((keys.gex_model_calls("SPX"), calls), (keys.gex_model_puts("SPX"), puts)):
        body = {"version": version, "epoch": "e1", "expirations": side}
        await redis.set(key, json.dumps(body))
    meta = {"expiries": ["2026-12-01", "2026-12-04", "2026-12-18"], "today": "2026-12-01"}
    meta |= {"dollar_spot": 100.0, "spot": 100.2}
    items = {k: {"strike": float(k), "calls": 1.0, "calls_0dte": 0.5} for k in ("95", "100")}
    await writer.publish("SPX", "gex", "e1", items, meta=meta, ts_ns=version)


async def test_gex_view_of_any_listed_expiry(deps: Deps, redis: Redis) -> None:
    """``/sse/gex?expiry=<date>``: all, 0dte, today's date (= 0dte) or any listed expiry; an
    unlisted date is a 404. A date view follows the model's versions."""
    writer = ModelWriter(redis)
    day = "2026-12-04"
    calls = {"2026-12-01": {"100": 5.0}, day: {"95": 2.0, "100": 3.0}, "2026-12-18": {}}
    puts = {"2026-12-01": {}, day: {"100": 1.5, "105": 4.0}, "2026-12-18": {"90": 1.0}}
    await _gex_with_dates(writer, redis, calls, puts)

    def want(c: dict[str, float], p: dict[str, float]) -> dict[str, Any]:
        out = {}
        for k in sorted(c.keys() | p.keys(), key=float):
            cv, pv = c.get(k, 0.0), -p.get(k, 0.0)
            net = round(cv + pv, 6)
            out[k] = {"strike": float(k), "calls": cv, "puts": pv, "net": net}
            out[k] |= {"calls_usd": cv * 100.0, "puts_usd": pv * 100.0, "net_usd": net * 100.0}
        return out

    async with gateway(deps) as gw:
        async with Client(f"{base(gw)}/sse/gex?symbol=SPX&expiry={day}") as c:
            reader = ViewReader()
            snap = reader.snapshot((await c.next_data("snapshot")).data)
            assert snap["view"] == {"expiry": day}
            assert snap["items"] == want(calls[day], puts[day])
            assert snap["version"] == writer.models[("SPX", "gex")].version
            api = (await _get(gw, f"/api/gex?symbol=SPX&expiry={day}")).json()
            assert api["items"] == snap["items"] and api["version"] == snap["version"]
            # the next version: one strike changes, one goes, one comes
            calls[day] = {"95": 2.5, "110": 1.0}
            await _gex_with_dates(writer, redis, calls, puts)
            ev = await c.next_data("diff")
            reader.diff(ev.data, ev.id)
            assert reader.model is not None
            assert reader.model["items"] == want(calls[day], puts[day])
            assert reader.model["version"] == writer.models[("SPX", "gex")].version
        async with Client(f"{base(gw)}/sse/gex?symbol=SPX&expiry=2026-12-01") as t:
            today = ViewReader().snapshot((await t.next_data("snapshot")).data)
            assert today["view"] == {"expiry": "0dte"}
        async with httpx.AsyncClient(base_url=base(gw)) as http:
            for path, status in [
                ("/sse/gex?symbol=SPX&expiry=2026-12-05", 404),  # not listed
                ("/api/gex?symbol=SPX&expiry=2026-12-05", 404),
                ("/api/gex?symbol=SPX&expiry=2026-12-18", 200),
                ("/api/gex?symbol=SPX&expiry=all", 200),
            ]:
                assert (await http.get(path)).status_code == status, path


async def test_view_resume_by_last_event_id(deps: Deps, redis: Redis) -> None:
    writer = ModelWriter(redis)
    spx = FakeMarket("SPX")
    await publish_full(writer, spx, 1)
    front = min(e.isoformat() for e in spx.expiries)
    q = f"symbol=SPX&expiry={front}&right=C"
    async with gateway(deps) as gw:
        url = f"{base(gw)}/sse/heatmap/butterfly?{q}"
        reader = ViewReader()
        async with Client(url) as c:
            reader.snapshot((await c.next_data("snapshot")).data)
            for i in range(10):
                await publish_step(writer, spx, 10 + i)

            async def moved() -> bool:
                await drain(c, reader, set())
                return reader.model is not None and reader.model["version"] > 1

            await eventually(moved)
        assert reader.head is not None
        held = reader.head
        for i in range(20):  # missed while away
            await publish_step(writer, spx, 30 + i)
        async with Client(url, {"Last-Event-ID": held}) as c2:
            first = await c2.next_data("diff")  # no snapshot: the missed diffs (merged or not)
            touched = set(reader.diff(first.data, first.id)[1])

            async def caught_up() -> bool:
                await drain(c2, reader, touched)
                assert reader.model is not None
                return reader.model["items"] == view_truth(writer, HEAT, front, "C")

            await eventually(caught_up)
        resumed = 'massive_sse_resyncs_total{channel="heatmap:butterfly",reason="resume"}'
        assert await metric(gw, resumed) == 0


@pytest.mark.slow
async def test_slow_view_client_is_conflated_then_resynced_without_slowing_others(
    deps: Deps, redis: Redis
) -> None:
    """A view client that reads slowly gets its backlog merged per tile (many versions in one
    diff); one that stops reading exceeds the bound even merged and is resynced; a fast
    client of the same view gets a continuous chain meanwhile."""
    writer = ModelWriter(redis)
    day = "2026-12-03"
    tid = [f"SPX:{day}:butterfly:{6000 + 5 * i}-{6005 + 5 * i}-{6010 + 5 * i}:C" for i in range(40)]
    await writer.publish("SPX", HEAT, "e1", {t: {"v": 0, "x": ""} for t in tid}, ts_ns=1)
    path = f"/sse/heatmap/butterfly?symbol=SPX&expiry={day}&right=C"
    settings = replace(SETTINGS, pending_max_bytes=300_000)
    async with gateway(deps, settings) as gw:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", gw.port))
        stuck.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stuck.setblocking(False)
        try:
            async with Client(base(gw) + path) as fast:
                reader = ViewReader()
                reader.snapshot((await fast.next_data("snapshot")).data)

                async def both() -> bool:
                    m = 'massive_sse_clients{channel="heatmap:butterfly"} 2.0'
                    return m in (await _get(gw, "/metrics", admin(gw))).text

                await eventually(both)
                # phase 1: the same two tiles over and over, 400 kB in all (the merged
                # backlog stays at two tiles), then big values on every tile (the merged
                # backlog exceeds the bound)
                pad = "y" * 2000
                for i in range(200):
                    await writer.publish("SPX", HEAT, "e1", {tid[i % 2]: {"v": i, "x": pad}})
                blob = "x" * 100_000  # 8 MB: more than the socket buffers can absorb
                for i in range(80):
                    await writer.publish("SPX", HEAT, "e1", {tid[i % 40]: {"v": i, "x": blob}})
                last = writer.models[("SPX", HEAT)].version
                while reader.model is not None and reader.model["version"] < last:
                    ev = await fast.next_data("diff", 20)
                    reader.diff(ev.data, ev.id)
                assert reader.model is not None
                assert reader.model["items"] == writer.models[("SPX", HEAT)].items

                async def dropped() -> float:
                    series = 'massive_sse_dropped_total{channel="heatmap:butterfly"}'
                    return await metric(gw, series)

                assert await eventually(dropped, timeout_s=10) >= 1
                conflated = 'massive_sse_conflated_total{channel="heatmap:butterfly"}'
                assert await metric(gw, conflated) >= 1
                # the stuck client now reads: a consistent prefix, then a fresh snapshot of
                # the latest version, then live diffs
                loop = asyncio.get_running_loop()
                dc = Dechunk()
                slow = ViewReader()
                deadline = time.monotonic() + 30
                while slow.model is None or slow.model["version"] < last:
                    assert time.monotonic() < deadline
                    dc += await asyncio.wait_for(loop.sock_recv(stuck, 1 << 20), 10)
                    for ev, eid, data in dc.frames():
                        if ev == "snapshot":
                            slow.snapshot(data)
                        elif ev == "diff":
                            slow.diff(data, eid)
                assert slow.model["items"] == writer.models[("SPX", HEAT)].items
                overflow = 'reason="overflow"'
                series = f'massive_sse_resyncs_total{{channel="heatmap:butterfly",{overflow}}}'
                assert await metric(gw, series) >= 1
        finally:
            stuck.close()


def test_clients_behind_together_share_a_merge_and_the_feed_keeps_none(deps: Deps) -> None:
    """Two whole-model clients with the same backlog reach the bound on the same entry and
    share one merge; once that entry is handed out, the feed holds no merged diff (each up
    to a whole model's size) for later."""
    ch = channels()["heatmap:butterfly"]
    feed = DiffFeed(cast(Redis, None), ch, "SPX", SETTINGS, Metrics(deps))
    subs = [feed.subscribe_whole("SPX", 10_000_000, 4_000) for _ in range(2)]
    for sub in subs:
        sub.hold((0, 0))
    prev: str | None = None
    for v in range(1, 60):
        changed = {f"t{(v * 7 + j) % 40}": {"v": v, "pad": "x" * 80} for j in range(5)}
        diff = ModelDiff("SPX", ch.name, "e1", v, v - 1, v, changed, [], prev_id=prev)
        prev = f"{v}-0"
        feed.route((prev.encode(), {b"d": encode(diff)}))
        assert not feed._merged
    merges = deps.registry.get_sample_value(
        "massive_sse_conflated_total", {"channel": "heatmap:butterfly"}
    )
    assert merges is not None and merges > 2
    a, b = (sub.take() for sub in subs)
    assert [it.frame for it in a] == [it.frame for it in b]
    assert a[0].frame is b[0].frame  # the merged head: one object for both
