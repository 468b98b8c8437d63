"""Record / replay throughput.

1. Feed path: N synthetic WS frames (plus chain pointers with blobs) recorded to a .mrec.gz
   file, then fed as fast as possible into an empty Redis (``replay --feed``): records/s
   of each phase and the file size.
2. Pipeline replay, causal (the default) and lockstep (the reference) side by side: a
   simulator recording (SPX and NDX, default rate; made here with ``simulate``, the
   chain-poller, ws-ingest, the normalizer and ``record --follow``, or ``--recording``)
   replayed through normalizer, hydrator, the three tile builders and publishers and GEX on
   the recording's clock: wall time, times real time, records/s, instants, and whether the
   two outputs (every diff, the final models) are identical; then CPU seconds per replayed
   minute of the replay process (and of each processor in it) and of redis-server (from
   /proc: the figures other load on the machine distorts least), and the range of x real
   time they allow on an idle 2-vCPU machine.

Starts its own redis-server (and simulator and processes when it records).

    .venv/bin/python bench/replay_throughput.py [--n 100000] [--seconds 60]
        [--recording FILE] [--skip-lockstep] [--step-ms 250] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors import MODEL_PATH
from processors.ops import replay as rp
from processors.ops import replay_compare as rc
from schemas import keys
from schemas.messages import (
    WS_PAYLOAD_FIELD,
    WS_RECV_FIELD,
    ChainPointer,
    ChainSnapshot,
    encode_snapshot,
    entry,
)
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.factories import option_chain
from tests.util import RedisServer, free_port

T0 = 1_764_000_000_000_000_000
PY = sys.executable


# --- 1. feed path ------------------------------------------------------------------------
async def fill(r: Redis, n: int, chains: int) -> None:
    contracts = option_chain(
        "SPXW",
        ["2025-11-24", "2025-11-25"],
        [5800.0 + 5 * i for i in range(80)],
        spot=5900.0,
        asof="2025-11-24",
    )
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        c = contracts[i % len(contracts)]
        t = T0 + i * 1_000_000
        frame = json.dumps(
            [{"ev": "Q", "sym": c.cid, "bp": 1.05, "ap": 1.25, "bs": 3, "as": 4, "t": t // 10**6}]
        ).encode()
        pipe.xadd(keys.WS_STREAM, {WS_RECV_FIELD: str(t), WS_PAYLOAD_FIELD: frame})
        if len(pipe) >= 1000:
            await pipe.execute()
    for j in range(chains):
        ts = T0 + j * n * 1_000_000 // max(chains, 1)
        snap = ChainSnapshot("SPX", ts, 5900.0, contracts)
        key = keys.chain_snapshot("SPX", ts)
        pipe.set(key, encode_snapshot(snap))
        pipe.xadd(keys.CHAIN_STREAM, entry(ChainPointer("SPX", key, ts, len(contracts))))  # type: ignore[arg-type]
    await pipe.execute()


async def feed_path(url: str, n: int, chains: int, tmp: Path) -> None:
    r = Redis.from_url(url)
    path = tmp / "feed.mrec.gz"
    try:
        await r.flushall()
        await fill(r, n, chains)
        total = n + chains
        t0 = time.perf_counter()
        records, _ = await rp.record_range(r, list(rp.FEEDS.values()))
        with rp.RecordingWriter(path, list(rp.FEEDS.values()), T0) as w:
            for rec in records:
                w.write(rec)
        rec_s = time.perf_counter() - t0
        size = path.stat().st_size
        await r.flushall()
        t0 = time.perf_counter()
        _, it = rp.read_recording(path)
        stats = await rp.replay_records(r, it, speed=None)
        rep_s = time.perf_counter() - t0
        assert sum(stats.records.values()) == total
        print(f"records: {total} ({n} WS frames, {chains} chain pointers+blobs)")
        print(
            f"record (XRANGE + GET blobs + sort + gzip msgpack): {rec_s:.2f} s, "
            f"{total / rec_s:,.0f} records/s"
        )
        print(f"file: {size / 1e6:.2f} MB, {size / total:.1f} B/record")
        print(
            f"feed as fast as possible (pipelined, 500 per round trip): {rep_s:.2f} s, "
            f"{total / rep_s:,.0f} records/s"
        )
    finally:
        await r.aclose()


# --- 2. a simulator recording ------------------------------------------------------------
def simulator_recording(url: str, seconds: float, out: Path, logs: Path) -> None:
    """simulate + chain-poller + ws-ingest + normalizer, then ``record --follow``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASSIVE_")}
    env.update(
        MASSIVE_REDIS_URL=url,
        MASSIVE_LOG_LEVEL="WARNING",
        MASSIVE_POLLER_API_KEY="sim-key",
        MASSIVE_POLLER_REST_URL=f"http://127.0.0.1:{port}",
        MASSIVE_WS_API_KEY="sim-key",
        MASSIVE_WS_URL=f"ws://127.0.0.1:{port}",
        MASSIVE_WS_MARKET_HOURS="always",
    )
    cli = [PY, "-m", "processors.ops.cli"]
    procs = []
    try:
        with open(logs / "sim.log", "wb") as log:
            sim = [*cli, "simulate", "--port", str(port)]
            procs.append(subprocess.Popen(sim, env=env, stdout=log, stderr=log))
        time.sleep(1.5)
        with open(logs / "ingest.log", "wb") as log:
            run = [*cli, "run", "chain-poller", "ws-ingest", "normalizer"]
            procs.append(subprocess.Popen(run, env=env, stderr=log))
        time.sleep(3.0)  # first snapshots, epochs and subscriptions: the recording starts live
        rec = [*cli, "record", "-o", str(out), "--follow", "--duration", str(seconds)]
        subprocess.run(rec, env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


# --- 3. pipeline replay --------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat): robust to
    other load on the machine, unlike wall time."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Timed(Coroutine[Any, Any, Any]):
    """A task's coroutine whose every step is timed (thread CPU) into ``cpu[name]``."""

    __slots__ = ("_c", "_cpu", "_name")

    def __init__(self, c: Coroutine[Any, Any, Any], name: str, cpu: Counter[str]) -> None:
        self._c, self._name, self._cpu = c, name, cpu

    def send(self, value: Any) -> Any:
        t = time.thread_time()
        try:
            return self._c.send(value)
        finally:
            self._cpu[self._name] += time.thread_time() - t

    def throw(self, *args: Any) -> Any:
        t = time.thread_time()
        try:
            return self._c.throw(*args)
        finally:
            self._cpu[self._name] += time.thread_time() - t

    def close(self) -> None:
        self._c.close()

    def __await__(self) -> Any:
        return self


def _task_name(coro: Coroutine[Any, Any, Any]) -> str:
    owner = getattr(coro, "cr_frame", None)
    obj = owner.f_locals.get("self") if owner is not None else None
    name = getattr(obj, "name", None)
    return str(name) if name is not None else "other tasks (redis-py, clock)"


def time_tasks(cpu: Counter[str]) -> None:
    """Attribute the CPU of every task created from now on to its processor (its name)."""
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        return asyncio.Task(_Timed(coro, _task_name(coro), cpu), loop=loop, **kw)

    loop.set_task_factory(factory)  # type: ignore[arg-type]


@dataclass
class Run:
    stats: rp.ReplayStats
    cpu_s: float  # the replay process (driver + every in-process processor)
    redis_cpu_s: float
    output_cpu_s: float  # saving the diffs after each instant (--output), in cpu_s
    tasks: Counter[str]


async def replay(srv: RedisServer, path: Path, mode: str, step_ms: float, out: Path) -> Run:
    redis = connect(srv.url)
    await redis.flushall()
    settings = RuntimeSettings(redis_url=srv.url, consumer=f"bench-{mode}", log_level="WARNING")
    opts = rp.ReplayOptions(mode=mode, processors=list(MODEL_PATH), step_ms=step_ms)
    w = rc.OutputWriter(out)
    tasks: Counter[str] = Counter()
    out_cpu = [0.0]

    async def collect() -> None:
        t = time.thread_time()
        await w.collect(redis)
        out_cpu[0] += time.thread_time() - t

    assert srv.proc is not None
    time_tasks(tasks)
    cpu0, rcpu0 = time.process_time(), proc_cpu_s(srv.proc.pid)
    try:
        stats = await rp.replay_file(
            redis, path, opts, settings, CollectorRegistry(), on_instant=collect
        )
        cpu, rcpu = time.process_time() - cpu0, proc_cpu_s(srv.proc.pid) - rcpu0
        await w.finish(redis)
    finally:
        asyncio.get_running_loop().set_task_factory(None)
        w.close()
        await redis.aclose()
    return Run(stats, cpu, rcpu, out_cpu[0], tasks)


def print_cpu(runs: dict[str, Run]) -> None:
    """CPU seconds per replayed minute, per process and per in-process participant, and
    what they imply for an idle machine of 2 vCPUs: the replay process is one thread and
    Redis another, so the wall time is at least the larger of the two (perfect overlap) and
    at most their sum (every round trip waited for)."""
    print("\nCPU seconds per replayed minute (the figures load on the machine distorts least):")
    names = sorted({n for r in runs.values() for n in r.tasks}, key=lambda n: n.lower())
    head = f"{'':32}" + "".join(f"{m:>12}" for m in runs)
    print(head)

    def row(label: str, get: Callable[[Run], float]) -> None:
        vals = "".join(f"{get(r) / (r.stats.span_s / 60):12.2f}" for r in runs.values())
        print(f"{label:32}{vals}")

    row("replay process", lambda r: r.cpu_s)
    for n in names:
        row(f"  {n}", lambda r, n=n: r.tasks.get(n, 0.0))  # type: ignore[misc]
    row("  saving the output (--output)", lambda r: r.output_cpu_s)
    row(
        "  driver, event loop, rest",
        lambda r: r.cpu_s - sum(r.tasks.values()) - r.output_cpu_s,
    )
    row("redis-server", lambda r: r.redis_cpu_s)
    for m, r in runs.items():
        lo, hi = max(r.cpu_s, r.redis_cpu_s), r.cpu_s + r.redis_cpu_s
        print(
            f"{m}: on an idle 2-vCPU machine (replay process on one core, Redis on the other) "
            f"{r.stats.span_s / hi:.1f}x .. {r.stats.span_s / lo:.1f}x real time "
            f"(CPU sum {hi:.1f} s .. larger process {lo:.1f} s for {r.stats.span_s:.0f} s)"
        )


async def pipeline_replays(
    srv: RedisServer, path: Path, step_ms: float, lockstep: bool, tmp: Path
) -> None:
    _, it = rp.read_recording(path)
    n = sum(1 for _ in it)
    print(f"\nrecording {path}: {n} records")
    modes = ["causal", "lockstep"] if lockstep else ["causal"]
    outs: dict[str, Path] = {}
    runs: dict[str, Run] = {}
    print(
        f"{'mode':9} {'wall s':>8} {'x real time':>12} {'records/s':>10} {'instants':>9} "
        f"{'replay CPU s':>13} {'redis CPU s':>12} {'load':>5}"
    )
    for mode in modes:
        outs[mode] = tmp / f"{mode}.mout.gz"
        r = runs[mode] = await replay(srv, path, mode, step_ms, outs[mode])
        st = r.stats
        print(
            f"{mode:9} {st.wall_s:8.2f} {st.span_s / st.wall_s:11.1f}x "
            f"{sum(st.records.values()) / st.wall_s:10,.0f} {st.instants:9d} {r.cpu_s:13.1f} "
            f"{r.redis_cpu_s:12.1f} {os.getloadavg()[0]:5.1f}"
        )
    print_cpu(runs)
    if lockstep:
        res = await rc.compare(
            rc.open_source(str(outs["causal"])), rc.open_source(str(outs["lockstep"]))
        )
        if res.difference is None:
            print(f"causal == lockstep: {sum(res.diffs.values())} diffs, {res.models} final models")
        else:
            print(f"causal != lockstep: {res.difference}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000, help="feed path: WS frames")
    ap.add_argument("--chains", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulator recording length")
    ap.add_argument("--recording", type=Path, help="replay this recording instead")
    ap.add_argument("--skip-lockstep", action="store_true")
    ap.add_argument("--skip-feed", action="store_true")
    ap.add_argument("--step-ms", type=float, default=rp.DEFAULT_STEP_MS)
    ap.add_argument("--keep", action="store_true", help="keep the replays' outputs (.mout.gz)")
    args = ap.parse_args()
    # Leases: their TTL runs in Redis real time while the clock is the recording's.
    for var in ("MASSIVE_PUBLISHER_LEASE_TTL_MS", "MASSIVE_GEX_LEASE_TTL_MS"):
        os.environ.setdefault(var, str(rp.LONG_LEASE_MS))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    srv = RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="massive-bench-replay-"))
    try:
        if not args.skip_feed:
            await feed_path(srv.url, args.n, args.chains, tmp)
        path = args.recording
        if path is None:
            path = tmp / "sim.mrec.gz"
            print(f"\nrecording {args.seconds:.0f} s of the simulator (SPX, NDX, default rate)")
            simulator_recording(srv.url, args.seconds, path, tmp)
        await pipeline_replays(srv, path, args.step_ms, not args.skip_lockstep, tmp)
    finally:
        srv.stop()
        if args.keep:
            print(f"outputs kept in {tmp} (replay --compare A B)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    from processors.ops.cli import run_loop

    run_loop(main())  # uvloop, as the CLI
