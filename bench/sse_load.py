"""SSE fan-out load, three scenarios.

``fanout`` (default): N concurrent SSE clients on loopback, one publisher writing versioned
diffs at a fixed rate; reports the delivery delay (diff ts_ns set at publish -> receipt by
the client) as p50/p99/max and checks that every client got every diff once, in order. The
gateway runs in its own process (``massive-pipeline run sse-gateway``) against a private
redis-server, so clients and server do not share an event loop.

    .venv/bin/python bench/sse_load.py [--clients 200] [--diffs 200] [--rate 20]

``scoped``: the model path end to end (every processor in its own process, as
bench/e2e_load.py: a 20,000-contract SPX epoch, ``--events`` WS events/s from the load
replayer) and ``--clients`` SSE clients spread over 20 views (butterfly and vertical x 5
expiries x C/P). Prints bytes/s per client, p99 tick->SSE per view (receipt minus the
diff's ``src_recv_ts_ns``), gateway CPU and RSS, the RSS per idle client (all clients
connected, no events) and after they all left.

    .venv/bin/python bench/sse_load.py --scenario scoped [--clients 1000] [--events 5000]

``acceptance``: ``massive-pipeline demo`` (the simulator, SPX) and, over the same
``--seconds`` (20), the bytes of ``/sse/heatmap/butterfly?symbol=SPX&expiry=<front>&right=C``
against the unscoped stream; checks that the scoped stream holds only that view's tiles.

    .venv/bin/python bench/sse_load.py --scenario acceptance [--seconds 20]

The clients are minimal asyncio socket readers (an HTTP client library would add its own
parsing cost to the delay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import orjson
from redis.asyncio import Redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.e2e_load import build_epoch, machine, rss_mb
from bench.publisher_rss import Sampler
from processors import MODEL_PATH
from processors.serve.gateway import SseSettings
from schemas.messages import PublishedModel, encode_model_pieces
from tests import harness as h
from tests.sse_client import Dechunk, ViewReader
from tests.sse_publisher import ModelWriter
from tests.util import RedisServer, eventually, free_port

KIND = "heatmap:butterfly"


@dataclass
class LoadResult:
    clients: int
    diffs: int
    received: int
    lost: int
    out_of_order: int
    delays_ms: list[float] = field(default_factory=list)
    connect_s: float = 0.0

    def pct(self, q: float) -> float:
        if not self.delays_ms:
            return float("nan")
        s = sorted(self.delays_ms)
        return s[min(len(s) - 1, int(q * len(s)))]

    @property
    def p50_ms(self) -> float:
        return self.pct(0.50)

    @property
    def p99_ms(self) -> float:
        return self.pct(0.99)

    @property
    def max_ms(self) -> float:
        return max(self.delays_ms) if self.delays_ms else float("nan")


class _Reader:
    def __init__(self) -> None:
        self.snapshot = asyncio.Event()
        self.done = asyncio.Event()
        self.target = 1 << 62
        self.versions: list[int] = []
        self.delays_ms: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self, host: str, port: int, path: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        buf = b""
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return
                now = time.time_ns()
                buf += chunk
                *frames, buf = buf.split(b"\r\n\r\n")
                for fr in frames:
                    if b"event: diff" in fr:
                        data = fr[fr.index(b"data: ") + 6 :]
                        d = orjson.loads(data)
                        self.versions.append(d["version"])
                        self.delays_ms.append((now - d["ts_ns"]) / 1e6)
                        if len(self.versions) >= self.target:
                            self.done.set()
                    elif b"event: snapshot" in fr:
                        self.snapshot.set()
        finally:
            writer.close()


async def run_load(
    redis: Redis,
    base_url: str,
    clients: int = 200,
    diffs: int = 200,
    rate_hz: float = 20.0,
    symbol: str = "SPX",
) -> LoadResult:
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    writer = ModelWriter(redis)
    await writer.publish(symbol, KIND, "bench", {"t0": {"v": -1}}, ts_ns=time.time_ns())
    readers = [_Reader() for _ in range(clients)]
    path = f"/sse/heatmap/butterfly?symbol={symbol}"
    t0 = time.monotonic()
    for r in readers:
        r.task = asyncio.create_task(r.run(host, port, path))
    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(r.snapshot.wait() for r in readers)), 60)
        except TimeoutError:
            n_ok = sum(r.snapshot.is_set() for r in readers)
            errs = [r.task.exception() for r in readers if r.task and r.task.done()]
            msg = f"only {n_ok}/{clients} clients got a snapshot; {errs[:3]}"
            raise RuntimeError(msg) from None
        connect_s = time.monotonic() - t0
        v0 = writer.models[(symbol, KIND)].version
        period = 1.0 / rate_hz
        for r in readers:
            r.target = diffs
        start = time.monotonic()
        for i in range(diffs):
            await writer.publish(
                symbol, KIND, "bench", {f"t{i % 50}": {"v": i}}, ts_ns=time.time_ns()
            )
            delay = start + (i + 1) * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in readers)), 10)
    finally:
        for r in readers:
            if r.task is not None:
                r.task.cancel()
        await asyncio.gather(*(r.task for r in readers if r.task), return_exceptions=True)
    expected = list(range(v0 + 1, v0 + diffs + 1))
    res = LoadResult(clients, diffs, 0, 0, 0, connect_s=connect_s)
    for r in readers:
        res.received += len(r.versions)
        res.lost += len(set(expected) - set(r.versions))
        res.out_of_order += int(r.versions != sorted(r.versions))
        res.delays_ms += r.delays_ms
    return res


async def _main(args: argparse.Namespace) -> None:
    srv = RedisServer().start()
    port = free_port()
    env = dict(
        os.environ,
        MASSIVE_REDIS_URL=srv.url,
        MASSIVE_SSE_HOST="127.0.0.1",
        MASSIVE_SSE_PORT=str(port),
        MASSIVE_LOG_LEVEL="WARNING",
    )
    exe = os.path.join(os.path.dirname(sys.executable), "massive-pipeline")
    proc = await asyncio.create_subprocess_exec(exe, "run", "sse-gateway", env=env)
    redis = Redis.from_url(srv.url)
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        res = await run_load(redis, f"http://127.0.0.1:{port}", args.clients, args.diffs, args.rate)
        print(
            f"sse_load clients={res.clients} diffs={res.diffs} rate={args.rate}/s "
            f"received={res.received}/{res.clients * res.diffs} lost={res.lost} "
            f"out_of_order_clients={res.out_of_order} connect_all={res.connect_s:.2f}s "
            f"delay_ms p50={res.p50_ms:.2f} p99={res.p99_ms:.2f} max={res.max_ms:.2f}"
        )
    finally:
        await redis.aclose()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        srv.stop()


# --- scoped / acceptance ----------------------------------------------------------------------
class _HeadScan:
    """The events of an SSE response as (event, "", the first bytes of its data), found in
    the raw (chunked) bytes without dechunking or copying payloads: the load clients share
    the two vCPUs with the gateway and the pipeline, so they only read frame heads. Each
    frame's head is inside one HTTP chunk (the gateway writes frames whole up to 1 MB; only
    snapshots are sliced, and their data is not read)."""

    MARK = b"\r\nevent: "
    HEAD = 400  # bytes of data read per event (the diff's head fields are in it)

    def __init__(self) -> None:
        self.buf = bytearray()

    def __iadd__(self, chunk: bytes) -> _HeadScan:
        self.buf += chunk
        return self

    def frames(self) -> list[tuple[str, str, bytes]]:
        out: list[tuple[str, str, bytes]] = []
        buf, i = self.buf, 0
        while True:
            j = buf.find(self.MARK, i)
            if j < 0:
                del buf[: max(i, len(buf) - len(self.MARK))]  # a mark may span two reads
                return out
            k = buf.find(b"\r\n", j + len(self.MARK))
            if k < 0:
                break
            ev = bytes(buf[j + len(self.MARK) : k]).decode()
            start = k + 2 + len(b"data: ")
            end = buf.find(b"\r\n", start, start + self.HEAD)  # a short frame's end
            if end < 0:
                if len(buf) < start + self.HEAD:
                    break  # the head is not all here yet
                end = start + self.HEAD
            out.append((ev, "", bytes(buf[start:end])))
            i = end
        del buf[:j]
        return out


class Tap:
    """One SSE client: counts wire bytes; per diff, the tick->SSE delay from the head of the
    frame (``src_recv_ts_ns``); optionally keeps the view (``ViewReader``)."""

    def __init__(self, path: str, keep: bool = False, read_delay_s: float = 0.0) -> None:
        self.path = path
        self.read_delay_s = read_delay_s  # a slow client: a pause after every read
        self.bytes = 0
        self.snapshot = asyncio.Event()
        self.delays_ms: list[float] = []  # tick (ingest receive) -> SSE
        self.publish_ms: list[float] = []  # publish -> SSE (the gateway's part)
        self.diffs = 0
        self.snapshots = 0
        self.counting = True
        self.reader = ViewReader() if keep else None
        self.task: asyncio.Task[None] | None = None

    async def run(self, host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        dc = Dechunk() if self.reader is not None else _HeadScan()
        try:
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"{self.path}: {status.decode().strip()}")
            dc += status
            while True:
                chunk = await reader.read(1 << 16 if self.read_delay_s else 1 << 18)
                if not chunk:
                    return
                if self.read_delay_s:
                    await asyncio.sleep(self.read_delay_s)
                now = time.time_ns()
                if self.counting:
                    self.bytes += len(chunk)
                dc += chunk
                for ev, eid, data in dc.frames():
                    self._on_event(ev, eid, data, now)
        finally:
            writer.close()

    def _on_event(self, ev: str, eid: str, data: bytes, now: int) -> None:
        if ev == "snapshot":
            self.snapshots += 1
            if self.reader is not None:
                self.reader.snapshot(data)
            self.snapshot.set()
        elif ev == "diff":
            self.diffs += 1
            if self.reader is not None:
                self.reader.diff(data, eid)
            if self.counting:
                src = _head_int(data, b'"src_recv_ts_ns":')
                if src is not None:
                    self.delays_ms.append((now - src) / 1e6)
                pub = _head_int(data, b'"ts_ns":')
                if pub is not None:
                    self.publish_ms.append((now - pub) / 1e6)

    def start(self, host: str, port: int) -> None:
        self.task = asyncio.create_task(self.run(host, port))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self.task


_DISPATCH_SERIES = (
    "massive_sse_dispatch_cpu_seconds_total{",
    "massive_sse_dispatched_entries_total{",
    "massive_sse_read_lag_seconds_sum{",
    "massive_sse_read_lag_seconds_count{",
)


async def _dispatch_metrics(admin_port: int) -> dict[str, list[float]]:
    """channel -> [dispatch CPU seconds, diff entries read, read lag sum (s), batches] from
    the gateway's /metrics."""
    async with httpx.AsyncClient(timeout=120) as http:  # a starved gateway answers late
        text = (await http.get(f"http://127.0.0.1:{admin_port}/metrics")).text
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for i, name in enumerate(_DISPATCH_SERIES):
            if line.startswith(name):
                ch = line.split('channel="', 1)[1].split('"', 1)[0]
                out.setdefault(ch, [0.0] * len(_DISPATCH_SERIES))[i] = float(line.rsplit(" ", 1)[1])
    return out


async def _gauges(admin_port: int, names: tuple[str, ...]) -> list[float]:
    """Each gauge of the gateway's /metrics summed over its labels."""
    async with httpx.AsyncClient(timeout=120) as http:
        text = (await http.get(f"http://127.0.0.1:{admin_port}/metrics")).text
    out = [0.0] * len(names)
    for line in text.splitlines():
        for i, name in enumerate(names):
            if line.startswith((name + "{", name + " ")):
                out[i] += float(line.rsplit(" ", 1)[1])
    return out


def _head_int(data: bytes, field: bytes) -> int | None:
    """An integer field of a compact diff's head, without parsing the diff."""
    i = data.find(field, 0, 400)
    if i < 0:
        return None
    j = i + len(field)
    k = data.find(b",", j)
    try:
        return int(data[j:k])
    except ValueError:
        return None


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _wait_snapshots(taps: list[Tap], timeout_s: float) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*(t.snapshot.wait() for t in taps)), timeout_s)
    except TimeoutError:
        n = sum(t.snapshot.is_set() for t in taps)
        errs = [t.task.exception() for t in taps if t.task and t.task.done()]
        raise RuntimeError(f"only {n}/{len(taps)} clients got a snapshot; {errs[:3]}") from None


async def _front_expiries(port: int, strategy: str) -> list[str]:
    deadline = time.monotonic() + 300
    while True:  # 404 until the gateway holds the model
        tap = Tap(f"/sse/heatmap/{strategy}?symbol=SPX&expiry=front&right=C", keep=True)
        tap.start("127.0.0.1", port)
        assert tap.task is not None
        got = asyncio.ensure_future(tap.snapshot.wait())
        await asyncio.wait({tap.task, got}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        got.cancel()
        await tap.stop()
        if tap.snapshot.is_set():
            break
        if time.monotonic() > deadline:
            raise RuntimeError("no front expiry from the gateway")
        await asyncio.sleep(1)
    assert tap.reader is not None and tap.reader.model is not None
    return list(tap.reader.model["expiries"])


async def acceptance(seconds: float, sim_rate: float) -> None:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "massive-pipeline")
    env = dict(os.environ, MASSIVE_LOG_LEVEL="WARNING")
    env.pop("MASSIVE_REDIS_URL", None)  # a private redis-server
    proc = await asyncio.create_subprocess_exec(
        exe, "demo", "--port", str(port), "--symbols", "SPX", "--rate", str(sim_rate), env=env
    )
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(1200):
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.get(f"http://127.0.0.1:{port}/api/heatmap/butterfly?symbol=SPX")
                    if r.status_code == 200 and r.json()["items"]:
                        break
                await asyncio.sleep(0.1)
        front = (await _front_expiries(port, "butterfly"))[0]
        # the window opens once the publisher is publishing (a first diff on a probe)
        probe = Tap("/sse/heatmap/butterfly?symbol=SPX")
        probe.start("127.0.0.1", port)
        for _ in range(600):
            if probe.diffs:
                break
            await asyncio.sleep(0.1)
        await probe.stop()
        scoped = Tap(f"/sse/heatmap/butterfly?symbol=SPX&expiry={front}&right=C", keep=True)
        whole = Tap("/sse/heatmap/butterfly?symbol=SPX", keep=True)
        for t in (scoped, whole):
            t.start("127.0.0.1", port)
        await asyncio.sleep(seconds)
        for t in (scoped, whole):
            t.counting = False
            await t.stop()
        assert scoped.reader is not None and scoped.reader.model is not None
        items = scoped.reader.model["items"]
        only = all(k.split(":")[1] == front and k.endswith(":C") for k in items)
        print(f"# machine: {machine()}")
        print(f"# date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
        print(
            f"acceptance (simulator SPX at {sim_rate:.0f} events/s, {seconds:.0f} s, same window, "
            f"each stream from its snapshot): scoped "
            f"expiry={front} right=C {scoped.bytes:,} B ({scoped.diffs} diffs, "
            f"{len(items)} tiles, only that view: {only}); unscoped {whole.bytes:,} B "
            f"({whole.diffs} diffs); scoped/unscoped = {100 * scoped.bytes / whole.bytes:.1f} %"
        )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot (/proc/stat): busy = all but idle and
    iowait."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(f[:8])  # guest time is inside user time
    return total - f[3] - f[4], total


class CpuShares:
    """How busy the machine was from now on, and each process's share (% of a core): is a
    latency figure the code's or a saturated machine's?"""

    def __init__(self, p: h.Pipeline, srv: h.DurableRedis) -> None:
        pids = {name: pr.pid for name, pr in p.procs.items() if pr.pid is not None}
        if srv.proc is not None:
            pids["redis-server"] = srv.proc.pid
        self.pids = pids
        self.cpu0 = {name: h.proc_cpu_seconds(pid) for name, pid in pids.items()}
        self.busy0 = machine_busy()

    def per_process(self, wall_s: float) -> dict[str, float]:
        """Process name -> % of a core since the start."""
        return {
            name: (h.proc_cpu_seconds(pid) - self.cpu0[name]) / wall_s * 100
            for name, pid in self.pids.items()
        }

    def line(self, per: dict[str, float]) -> str:
        busy, total = machine_busy()
        pct = 100 * (busy - self.busy0[0]) / max(1, total - self.busy0[1])
        return f"machine: {os.cpu_count()} CPUs {pct:.0f} % busy; % of a core: " + ", ".join(
            f"{n} {c:.0f}" for n, c in sorted(per.items(), key=lambda x: -x[1])
        )


async def scoped(args: argparse.Namespace) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="sse-scoped-"))
    srv = h.redis_server()
    r = Redis.from_url(srv.url)
    port, admin = free_port(), free_port()
    env = {
        "MASSIVE_LOG_LEVEL": "WARNING",
        "MASSIVE_SSE_PORT": str(port),
        "MASSIVE_SSE_ADMIN_PORT": str(admin),
        "MASSIVE_SSE_HOST": "127.0.0.1",
        "MASSIVE_SYMBOLS": "SPX",
        "MASSIVE_GEX_INTERVAL_S": "2",
        "MASSIVE_SSE_READ_INTERVAL_S": str(args.read_interval_s),
    }
    procs = (*MODEL_PATH, "monitor", "sse-gateway")
    p = h.Pipeline(srv.url, log_dir, extra_env=env)
    taps: list[Tap] = []
    try:
        await p.start(procs, ready_timeout_s=120)
        _eid, cids, hot, mem = await build_epoch(r, args.contracts, 1000)
        await h.wait_settled(r, timeout_s=300, quiet_s=1.0)
        gw_pid = p.procs["sse-gateway"].pid
        rss0 = rss_mb(gw_pid)
        exps = (await _front_expiries(port, "butterfly"))[:5]
        views = [
            f"/sse/heatmap/{s}?symbol=SPX&expiry={e}&right={right}"
            for s in ("butterfly", "vertical")
            for e in exps
            for right in "CP"
        ]
        print(f"# machine: {machine()}")
        print(f"# date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; logs {log_dir}")
        print(
            f"# {len(cids)} contracts, tiles "
            + ", ".join(f"{s}={int(mem['tiles_' + s])}" for s in ("butterfly", "vertical"))
            + f"; {len(views)} views; {args.clients} clients"
        )
        # idle memory: one client per view first (mirrors and views exist), then the rest
        taps = [Tap(v) for v in views]
        for t in taps:
            t.start("127.0.0.1", port)
        await _wait_snapshots(taps, 120)
        await asyncio.sleep(2)
        rss_views = rss_mb(gw_pid)
        rest = [Tap(views[i % len(views)]) for i in range(args.clients - len(views))]
        for t in rest:
            t.start("127.0.0.1", port)
        await _wait_snapshots(rest, 300)
        taps += rest
        await asyncio.sleep(2)
        rss_idle = rss_mb(gw_pid)
        per_idle_kb = (rss_idle - rss_views) * 1024 / max(1, len(rest))
        # load
        for t in taps:
            t.bytes, t.delays_ms, t.publish_ms, t.diffs = 0, [], [], 0
        rep = h.LoadReplayer(cids, hot)
        print(f"# load starts {time.strftime('%H:%M:%S')}", flush=True)
        m0 = await _dispatch_metrics(admin)
        t0 = time.monotonic()
        bench_cpu0 = time.process_time()
        shares = CpuShares(p, srv)
        rss_max = rss_idle
        done = 0.0
        while done < args.seconds:
            step = min(5.0, args.seconds - done)
            await rep.run(r, args.events, step, 0.05)
            done += step
            rss_max = max(rss_max, rss_mb(gw_pid))
        wall = time.monotonic() - t0
        bench_cpu = (time.process_time() - bench_cpu0) / wall * 100
        per_proc = shares.per_process(wall)
        cpu = per_proc["sse-gateway"]
        cpu_line = shares.line(per_proc)
        for t in taps:
            t.counting = False
        rss_load = rss_mb(gw_pid)
        m1 = await _dispatch_metrics(admin)
        per_client = [t.bytes / wall for t in taps]
        print(
            f"scoped: {args.clients} clients over {len(views)} views, {args.events:.0f} events/s "
            f"for {wall:.0f} s: bytes/s per client mean {sum(per_client) / len(per_client):,.0f}"
            f", max {max(per_client):,.0f}; gateway CPU {cpu:.0f} % of a core; gateway RSS "
            f"before clients {rss0:.0f} MB, {len(views)} views {rss_views:.0f} MB, all idle "
            f"{rss_idle:.0f} MB (idle client {per_idle_kb:.0f} kB), under load {rss_load:.0f} MB"
            f" (max {rss_max:.0f} MB); this bench process (clients + replayer) CPU "
            f"{bench_cpu:.0f} % of a core"
        )
        print(f"{cpu_line}, bench {bench_cpu:.0f}")
        for v in views:
            ds = [d for t in taps if t.path == v for d in t.delays_ms]
            ps = [d for t in taps if t.path == v for d in t.publish_ms]
            n = sum(t.diffs for t in taps if t.path == v)
            print(
                f"  {v.split('?')[0].rsplit('/', 1)[1]:9s} {v.split('expiry=')[1]}: "
                f"diffs {n}, tick->SSE p50 {pct(ds, 0.5):.0f} ms, p99 {pct(ds, 0.99):.0f} ms; "
                f"publish->SSE p50 {pct(ps, 0.5):.0f} ms, p99 {pct(ps, 0.99):.0f} ms"
            )
        for ch in sorted(m1):
            cpu_s, n, lag_s, batches = (
                a - b for a, b in zip(m1[ch], m0.get(ch, [0.0] * 4), strict=True)
            )
            if n:
                print(
                    f"  gateway {ch}: {n:.0f} model diffs read in {batches:.0f} batches, "
                    f"dispatch CPU {1000 * cpu_s / n:.1f} ms per diff ({cpu_s:.1f} s in all)"
                    f", read lag (entry id -> handed on) mean {1000 * lag_s / batches:.0f} ms"
                )
        for t in taps:
            await t.stop()
        taps = []
        after: list[tuple[int, float, float, float]] = []  # s, RSS, clients, views
        for s in range(5, 65, 5):
            await asyncio.sleep(5)
            g = await _gauges(admin, ("massive_sse_clients", "massive_sse_views"))
            after.append((s, rss_mb(gw_pid), g[0], g[1]))
        print(
            f"gateway RSS before clients {rss0:.0f} MB, with all clients idle {rss_idle:.0f} MB,"
            f" under load {rss_load:.0f} MB; 5 s after every client left {after[0][1]:.0f} MB, "
            f"30 s after {after[5][1]:.0f} MB, 60 s after {after[-1][1]:.0f} MB (views and "
            f"mirrors without clients linger {SseSettings().view_linger_s:.0f} s)"
        )
        print(
            "  after the clients left, every 5 s: RSS MB / clients / views "
            + ", ".join(f"{s} s {v:.0f}/{c:.0f}/{n:.0f}" for s, v, c, n in after)
        )
    finally:
        for t in taps:
            await t.stop()
        await p.stop()
        await r.aclose()
        srv.stop()


async def _promotions(
    args: argparse.Namespace,
    redis: Redis,
    http: httpx.AsyncClient,
    port: int,
    tap: Tap,
    sampler: Sampler,
    version: int,
    items: dict[str, object],
    head: str | None,
) -> list[tuple[float, float, float]]:
    """``--promotions`` snapshot versions (a promotion) with ``--whole-clients`` more
    whole-model clients connected and one /api request beside each, as at a soak's
    promotion: the gateway's RSS before, its peak within 10 s (``tap``'s sampler) and at 10 s."""
    from schemas import keys
    from schemas.messages import ModelDiff, encode

    pid = sampler.pid
    stream, key = (
        keys.heatmap_diffs_stream("butterfly", "SPX"),
        keys.heatmap_model("SPX", "butterfly"),
    )
    api_url = f"http://127.0.0.1:{port}/api/heatmap/butterfly?symbol=SPX"
    m = PublishedModel("SPX", "heatmap:butterfly", "e1", version, 0, items, {}, head)
    await redis.set(key, checkpoint(m))  # current: a joining client needs no backlog
    whole = [Tap("/sse/heatmap/butterfly?symbol=SPX") for _ in range(args.whole_clients)]
    for t in whole:
        t.start("127.0.0.1", port)
    await asyncio.gather(*(asyncio.wait_for(t.snapshot.wait(), 120) for t in whole))
    promo: list[tuple[float, float, float]] = []
    taps = [tap, *whole]
    try:
        for n in range(args.promotions):
            await asyncio.sleep(5)
            version += 1
            m0, r0 = time.monotonic(), rss_mb(pid) or 0.0
            seen = [t.snapshots for t in taps]
            sid = f"{time.time_ns() // 1_000_000 + 1}-0"
            m = PublishedModel(
                "SPX", "heatmap:butterfly", f"p{n}", version, time.time_ns(), items, {}, sid
            )
            snap = ModelDiff(
                "SPX", "heatmap:butterfly", f"p{n}", version, version - 1, m.ts_ns, {}, [], {},
                prev_id=head, snapshot=True,
            )  # fmt: skip
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(key, checkpoint(m))
                pipe.xadd(stream, {"d": encode(snap)}, id=sid, maxlen=200)
                await pipe.execute()
            head = sid
            await http.get(api_url)

            async def resnapped(seen: list[int] = seen) -> bool:
                return all(t.snapshots > k for t, k in zip(taps, seen, strict=True))

            await eventually(resnapped, timeout_s=120, interval_s=0.05)
            await asyncio.sleep(max(0.0, m0 + 10 - time.monotonic()))
            peak = sampler.peak_since(m0)
            promo.append((r0, max(r0, peak or 0.0), rss_mb(pid) or 0.0))
    finally:
        for t in whole:
            await t.stop()
    return promo


def checkpoint(m: PublishedModel) -> bytes:
    """A model's JSON as the publisher writes its checkpoint (marked)."""
    return b"".join(encode_model_pieces(m, marked=True))


async def rss_run(args: argparse.Namespace) -> None:
    """The gateway's RSS over time with one unscoped client and ``/api`` polled every 3 s, on
    a synthetic butterfly model of ``--tiles`` tiles with ``--changed`` tiles per diff at
    ``--rate`` diffs/s, the model key rewritten every 5 s (a checkpoint, as the publisher);
    then the RSS rise of ``--burst`` requests for it at once, three times; then
    ``--promotions`` snapshot versions (a new epoch's whole model, as the publisher writes
    one) with ``--whole-clients`` more whole-model clients connected and one /api request at
    each: the RSS before, the peak within 10 s and the RSS at 10 s."""
    import random

    from schemas import keys
    from schemas.messages import ModelDiff, encode

    srv = RedisServer().start()
    port = free_port()
    env = dict(
        os.environ,
        MASSIVE_REDIS_URL=srv.url,
        MASSIVE_SSE_HOST="127.0.0.1",
        MASSIVE_SSE_PORT=str(port),
        MASSIVE_LOG_LEVEL="WARNING",
    )
    if args.gateway_path:  # another checkout's gateway (e.g. `git archive` of an older main)
        env["PYTHONPATH"] = args.gateway_path
    exe = os.path.join(os.path.dirname(sys.executable), "massive-pipeline")
    proc = await asyncio.create_subprocess_exec(exe, "run", "sse-gateway", env=env)
    redis = Redis.from_url(srv.url)
    rng = random.Random(1)
    stream, key = (
        keys.heatmap_diffs_stream("butterfly", "SPX"),
        keys.heatmap_model("SPX", "butterfly"),
    )

    def tile(px: float) -> dict[str, object]:
        return {
            "legs": [[1, round(px, 2), "mid"], [-2, 12.35, "mid"], [1, 7.05, "mid"]],
            "debit": round(px - 17.65, 2),
            "debit_natural": round(px - 17.0, 2),
            "max_profit": round(27.65 - px, 2),
            "max_loss": round(px - 17.65, 2),
            "r2r": round((27.65 - px) / max(0.01, px - 17.65), 4),
            "convexity": round(1 - (px - 17.65) / 10, 4),
            "tradable": True,
            "age_s": 1,
            "stale": False,
            "px_src": "mid",
            "src": "ws",
            "flags": [],
        }

    exps = [f"2026-12-{d:02d}" for d in range(3, 8)]
    ids = [
        f"SPX:{e}:butterfly:{k:g}-{k + w:g}-{k + 2 * w:g}:{r}"
        for e in exps
        for r in "CP"
        for w in (5, 10, 15, 20, 25)
        for k in range(5000, 5000 + 5 * (args.tiles // 50), 5)
    ][: args.tiles]
    raw = msgspec.json.Encoder().encode
    items: dict[str, object] = {k: msgspec.Raw(raw(tile(20 + rng.random()))) for k in ids}
    pools = [  # diffs prepared up front: the bench must not be the bottleneck
        {k: msgspec.Raw(raw(tile(20 + rng.random()))) for k in rng.sample(ids, args.changed)}
        for _ in range(8)
    ]
    version, head = 1, None
    samples: list[tuple[float, float]] = []
    try:
        model = PublishedModel("SPX", "heatmap:butterfly", "e1", 1, time.time_ns(), items, {})
        await redis.set(key, checkpoint(model))
        async with httpx.AsyncClient(timeout=60) as http:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            tap = Tap("/sse/heatmap/butterfly?symbol=SPX", read_delay_s=args.read_delay_s)
            tap.start("127.0.0.1", port)
            await asyncio.wait_for(tap.snapshot.wait(), 120)
            # the RSS every 10 ms, to see what each /api request costs while it runs
            sampler = Sampler(proc.pid, 0.01)
            sampler.start()
            api_rise: list[float] = []
            api_url = f"http://127.0.0.1:{port}/api/heatmap/butterfly?symbol=SPX"

            def rise(m0: float, r0: float) -> float:
                """The gateway's RSS rise over ``r0`` since monotonic ``m0``."""
                peak = sampler.peak_since(m0)
                return (r0 if peak is None else max(peak, r0)) - r0

            t0 = time.monotonic()
            last_ckpt = last_api = last_rss = 0.0
            while (now := time.monotonic() - t0) < args.seconds:
                changed = pools[version % len(pools)]
                items.update(changed)
                version += 1
                d = ModelDiff(
                    "SPX", "heatmap:butterfly", "e1", version, version - 1, time.time_ns(),
                    changed, [], {}, prev_id=head,
                )  # fmt: skip
                head = (await redis.xadd(stream, {"d": encode(d)}, maxlen=200)).decode()
                if now - last_ckpt >= 5:
                    m = PublishedModel(
                        "SPX", "heatmap:butterfly", "e1", version, d.ts_ns, items, {}, head
                    )
                    await redis.set(key, checkpoint(m))
                    last_ckpt = now
                if now - last_api >= 3:
                    m0, r0 = time.monotonic(), rss_mb(proc.pid)
                    await http.get(api_url)
                    api_rise.append(rise(m0, r0))
                    last_api = now
                if now - last_rss >= 5:
                    samples.append((now, rss_mb(proc.pid)))
                    last_rss = now
                await asyncio.sleep(max(0.0, 1 / args.rate - (time.monotonic() - t0 - now)))
            # what a burst of pages polling /api at once costs (e.g. after a gateway restart)
            burst: list[float] = []
            for _ in range(3):
                await asyncio.sleep(1)
                m0, r0 = time.monotonic(), rss_mb(proc.pid)
                await asyncio.gather(*(http.get(api_url) for _ in range(args.burst)))
                burst.append(rise(m0, r0))
            promo = await _promotions(args, redis, http, port, tap, sampler, version, items, head)
            await tap.stop()
            sampler.stop.set()
        print(f"# machine: {machine()}")
        print(f"# date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
        print(
            f"rss: {args.tiles} tiles, {args.changed} changed per diff at {args.rate}/s, "
            f"client read pause {args.read_delay_s} s per 64 kB: {tap.diffs} diffs received, "
            f"{tap.snapshots} snapshots; gateway RSS (MB) every 5 s: "
            + " ".join(f"{v:.0f}" for _, v in samples)
        )
        rise = sorted(api_rise)
        print(
            f"/api (the whole model, every 3 s): RSS rise during the request (MB, 10 ms "
            f"samples) median {rise[len(rise) // 2]:.1f}, max {rise[-1]:.1f} over {len(rise)}"
        )
        print(
            f"/api, {args.burst} requests at once: RSS rise (MB) "
            + " ".join(f"{b:.1f}" for b in burst)
        )
        print(
            f"snapshot version with {1 + args.whole_clients} whole-model clients and one /api "
            "request: RSS before / peak within 10 s / at 10 s (MB): "
            + ", ".join(f"{a:.1f} / {b:.1f} / {c:.1f}" for a, b, c in promo)
        )
    finally:
        await redis.aclose()
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
        srv.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--diffs", type=int, default=200)
    p.add_argument("--rate", type=float, default=20.0, help="diffs per second")
    p.add_argument(
        "--scenario", choices=("fanout", "scoped", "acceptance", "rss"), default="fanout"
    )
    p.add_argument("--tiles", type=int, default=100_000, help="rss: model size")
    p.add_argument("--changed", type=int, default=7000, help="rss: tiles per diff")
    p.add_argument("--burst", type=int, default=20, help="rss: /api requests sent at once")
    p.add_argument("--gateway-path", default="", help="rss: PYTHONPATH of the gateway process")
    p.add_argument("--whole-clients", type=int, default=3, help="rss: at the promotions")
    p.add_argument("--promotions", type=int, default=3, help="rss: snapshot versions")
    p.add_argument("--read-delay-s", type=float, default=0.0, help="rss: slow client's pause")
    p.add_argument("--events", type=float, default=5000.0, help="scoped: WS events per second")
    p.add_argument(
        "--read-interval-s", type=float, default=0.0, help="scoped: the gateway's read_interval_s"
    )
    p.add_argument("--sim-rate", type=float, default=200.0, help="acceptance: simulator rate")
    p.add_argument("--contracts", type=int, default=20_000, help="scoped: chain size")
    p.add_argument("--seconds", type=float, default=0.0, help="scoped 30, acceptance 20")
    args = p.parse_args()
    if args.scenario == "rss":
        args.seconds = args.seconds or 120.0
        asyncio.run(rss_run(args))
    elif args.scenario == "acceptance":
        asyncio.run(acceptance(args.seconds or 20.0, args.sim_rate))
    elif args.scenario == "scoped":
        if args.clients == 200:
            args.clients = 1000
        args.seconds = args.seconds or 30.0
        asyncio.run(scoped(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
