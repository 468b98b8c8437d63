"""Soak: a compressed trading day, to see what a one-minute run hides.

Every processor of the model path (normalizer, hydrator, the three tile builders and
publishers, GEX), the monitor (stream retention) and the SSE gateway run as their own
processes with NO supervisor: a process that exits stays dead and is reported. Redis is
durable (AOF, ``appendfsync everysec``) so it can be killed and restarted mid-run.

Timeline (``--minutes``, default 24, i.e. 20 minutes of open market):
* pre-market: a 20,000-contract SPX epoch, ``--premarket-rate`` events/s for 1 minute;
* open: ``--rate`` events/s (default 5,000; the e2e bench's replayer and event mix);
* every ``--topology-every-min`` minutes a new strike is listed (a new chain snapshot, a new
  epoch promotion, every client re-snapshots);
* at half time Redis is SIGKILLed and restarted from its AOF (in-process recovery);
* the close: the last ``--closed-min`` minutes carry no events.

Meanwhile one SSE client per model (``tests.sse_client.ModelClient``: applies diffs,
checks the diff chain) is compared with ``/api`` every few seconds: the fingerprint of the
client's items at the version ``/api`` served must equal ``/api``'s (a mismatch is counted,
so is any diff that did not continue the client's chain). The clients and their checker run
in a process of their own, as browsers would: in the replayer's process they were starved of
CPU, fell behind and their backlogs measured the bench rather than the gateway.

Redis runs with the deployment's memory settings (``REDIS_MEMORY_ARGS``: active
defragmentation, so its RSS follows ``used_memory`` instead of keeping the pages of trimmed
stream entries) where its build has them: a server linked to the system's jemalloc (Debian's)
refuses ``activedefrag``, and the soak says so and runs without. The first ``redis-server`` on
``PATH`` is used: put one built from the Redis sources (bundled jemalloc, as in the official
image) first to measure what a deployment runs. Its allocator's own ratios
are printed every minute (frag: active / allocated, fragmentation that only defragmenting
returns; rss: resident / active, dirty pages jemalloc returns on its own decay).

Every ``--sample-s`` (15 s) it samples Redis ``used_memory``, the RSS of every process, the
active epoch and the epoch of each published heatmap model; it prints them with the
promotions, stream trims (and entries trimmed unread) and the client checks.

Warm-up, and what "flat" means. A process holds at most two epochs' state at a promotion (the
tables or model of the old one while the new one is built), so its RSS can only be judged
once it has been through one: warm-up ends when the first epoch promoted after the start
(the first new strike) is what every published heatmap model holds, i.e. every builder built
it and every publisher published it whole, and not before the retention windows are full
(3 minutes of open market: the WS stream keeps 120 s). Four more promotions follow in the
default timeline, so growth per epoch still shows. Flat = max/min - 1 of the samples from
the end of warm-up to the close, within ``--flat-pct`` (10 %): PASS or FAIL per process and
for Redis. The range over the whole open is printed too; nothing is averaged away. Beside
each range: the farthest sample from the median, and the growth (the median and the max of
the last third of the samples against the first third's), printed only.

    nice -n 10 .venv/bin/python bench/soak.py [--minutes 24] [--rate 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing as mp
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import msgspec
from redis.asyncio import Redis

from bench.e2e_load import machine, memory_breakdown, rss_mb
from processors import MODEL_PATH
from schemas import keys, ticker
from schemas.messages import ChainContract, ChainSnapshot
from streams.retry import sleep_or_stop
from tests import harness as h
from tests.factories import big_chain
from tests.sse_client import ModelClient, raw_fingerprint
from tests.util import free_port

PROCS = (*MODEL_PATH, "monitor", "sse-gateway")
# As deploy/k8s/overlays/dev/redis.yaml: defragment once the allocator holds 16 MB and 5 %
# more than the data (the defaults, 100 MB and 10 %, never start on a ~400 MB instance).
REDIS_MEMORY_ARGS = (
    "--activedefrag",
    "yes",
    "--active-defrag-ignore-bytes",
    "16mb",
    "--active-defrag-threshold-lower",
    "5",
)
CHANNELS = (*(f"heatmap/{s}" for s in keys.STRATEGIES), "gex")
# The epoch of a published model, from its first bytes (PublishedModel encodes symbol, kind,
# epoch first; the monitor reads its stamp the same way).
_MODEL_EPOCH = re.compile(rb'\{"symbol":"[^"\\]*","kind":"[^"\\]*","epoch":"([^"\\]*)"')


def redis_memory_args() -> tuple[str, ...]:
    """REDIS_MEMORY_ARGS if this redis-server accepts them (a probe server), else ()."""
    try:
        h.RedisServer(*REDIS_MEMORY_ARGS).start().stop()
    except RuntimeError:
        return ()
    return REDIS_MEMORY_ARGS


async def allocator_ratios(r: Redis) -> tuple[float, float]:
    """(allocator_frag_ratio, allocator_rss_ratio) of INFO memory."""
    info = await r.info("memory")
    return float(info.get("allocator_frag_ratio", 0)), float(info.get("allocator_rss_ratio", 0))


async def epochs(r: Redis, symbol: str) -> tuple[str | None, list[str | None]]:
    """The active epoch of ``symbol`` and the epoch of each heatmap model (None: absent)."""
    pipe = r.pipeline(transaction=False)
    pipe.get(keys.epoch_active(symbol))
    for s in keys.STRATEGIES:
        pipe.getrange(keys.heatmap_model(symbol, s), 0, 511)
    active, *heads = await pipe.execute()
    models = [m[1].decode() if (m := _MODEL_EPOCH.match(b or b"")) else None for b in heads]
    return (active.decode() if active else None), models


def flat(xs: list[float], limit_pct: float | None = None) -> str:
    """min, max, last, the range max/min - 1 of ``xs`` (PASS/FAIL against ``limit_pct``),
    the farthest sample from the median (the "+-" reading of the same limit) and, from six
    samples on, the growth: the median and the max of the last third of the samples against
    those of the first third (whether the process grows over the day; both printed only)."""
    if len(xs) < 2:
        return "n/a (fewer than 2 samples)" + (": FAIL" if limit_pct is not None else "")
    lo, hi, last = min(xs), max(xs), xs[-1]
    pct = 100 * (hi / lo - 1)
    med = statistics.median(xs)
    dev = 100 * max(hi / med - 1, 1 - lo / med)
    out = f"min {lo:.0f} max {hi:.0f} last {last:.0f} ({pct:.1f} % range, "
    out += f"+-{dev:.1f} % of the median"
    if len(xs) >= 6:
        k = len(xs) // 3
        first, end = xs[:k], xs[-k:]
        grow_med = 100 * (statistics.median(end) / statistics.median(first) - 1)
        grow_max = 100 * (max(end) / max(first) - 1)
        out += f"; last third vs first: median {grow_med:+.1f} %, max {grow_max:+.1f} %"
    out += ")"
    if limit_pct is not None:
        out += ": PASS" if pct <= limit_pct else ": FAIL"
    return out


def with_new_strike(base: ChainSnapshot, k: int, ts_ns: int) -> ChainSnapshot:
    """``base`` plus ``k`` strikes listed above its highest one (calls and puts of the
    front expiry), like listings during a session."""
    front = min(c.expiry for c in base.contracts)
    calls = [c for c in base.contracts if c.expiry == front and c.right == "C"]
    top = max(calls, key=lambda c: c.strike)
    root = ticker.parse(top.cid).root
    extra: list[ChainContract] = []
    for i in range(1, k + 1):
        strike = top.strike + 5.0 * i
        for right in ("C", "P"):
            cid = ticker.encode(root, dt.date.fromisoformat(front), right, strike)
            extra.append(msgspec.structs.replace(top, cid=cid, strike=strike, right=right))
    return msgspec.structs.replace(base, contracts=[*base.contracts, *extra], ts_ns=ts_ns)


class Checker:
    """Compares each client with /api every ``every_s``."""

    def __init__(self, api: str, clients: list[ModelClient], every_s: float) -> None:
        self.api = api
        self.clients = clients
        self.every_s = every_s
        self.checks = 0
        self.mismatches = 0
        self.unverified = 0  # /api version no longer (or not yet) in the client's history
        self.details: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                for c in self.clients:
                    await self.check(http, c)
                await sleep_or_stop(stop, self.every_s)

    async def check(self, http: httpx.AsyncClient, c: ModelClient) -> None:
        try:
            resp = await http.get(f"{self.api}/api/{c.channel}?symbol=SPX")
        except httpx.HTTPError:
            return
        if resp.status_code != 200:
            return
        v, fp = raw_fingerprint(resp.content)
        deadline = time.monotonic() + 15
        while c.version < v and time.monotonic() < deadline:  # noqa: ASYNC110 -- a poll
            await asyncio.sleep(0.05)
        got = c.history.get(v)
        if got is None:
            self.unverified += 1
            return
        self.checks += 1
        if got != fp:
            self.mismatches += 1
            self.details.append(f"{c.channel} v{v}")


def run_clients(api: str, every_s: float, stop: Any, out: Any) -> None:
    """The clients' process: one ModelClient per channel and the checker until ``stop``
    (a multiprocessing Event) is set; then their counts go back through ``out`` (a Pipe)."""

    async def go() -> dict[str, Any]:
        clients = [ModelClient(api, ch, "SPX", history_max=5000, raw=True) for ch in CHANNELS]
        checker = Checker(api, clients, every_s)
        done = asyncio.Event()
        for c in clients:
            c.start()
        task = asyncio.create_task(checker.run(done))
        while not stop.is_set():  # noqa: ASYNC110 -- a flag of another process
            await asyncio.sleep(0.5)
        done.set()
        await task
        for c in clients:
            await c.stop()
        return {
            "checks": checker.checks,
            "mismatches": checker.mismatches,
            "unverified": checker.unverified,
            "details": checker.details,
            "clients": [(c.channel, c.version, c.snapshots, c.chain_breaks) for c in clients],
        }

    out.send(asyncio.run(go()))


async def main() -> int:  # noqa: C901 -- owned by the rss helper (bench/soak.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=24.0)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--premarket-rate", type=float, default=500.0)
    ap.add_argument("--closed-min", type=float, default=2.0)
    ap.add_argument("--topology-every-min", type=float, default=4.0)
    ap.add_argument("--contracts", type=int, default=20_000)
    ap.add_argument("--check-every-s", type=float, default=3.0)
    ap.add_argument("--sample-s", type=float, default=15.0)
    ap.add_argument("--flat-pct", type=float, default=10.0)
    ap.add_argument("--logs", default="")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of every pipeline process (e.g. PYTHONMALLOC=malloc)",
    )
    args = ap.parse_args()
    log_dir = Path(args.logs or tempfile.mkdtemp(prefix="soak-"))
    mem_args = redis_memory_args()
    srv = h.DurableRedis("--appendonly", "yes", "--appendfsync", "everysec", *mem_args)
    srv.start()
    r = h.resilient_client(srv.url)
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = {
        "MASSIVE_LOG_LEVEL": "WARNING",
        "MASSIVE_SSE_PORT": str(port),
        "MASSIVE_SSE_HOST": "127.0.0.1",
        "MASSIVE_SYMBOLS": "SPX",
        **dict(e.split("=", 1) for e in args.env),
    }
    p = h.Pipeline(srv.url, log_dir, extra_env=env, supervise=False)
    mem: list[tuple[float, float]] = []
    parts: list[tuple[float, dict[str, float]]] = []
    rss: list[tuple[float, dict[str, float]]] = []
    events: list[tuple[float, str]] = []
    ctx = mp.get_context("spawn")
    clients_stop = ctx.Event()
    results, results_w = ctx.Pipe(duplex=False)
    clients = ctx.Process(
        target=run_clients,
        args=(api, args.check_every_s, clients_stop, results_w),
        name="soak-clients",
        daemon=True,
    )
    report: dict[str, Any] = {}
    merged = resyncs = 0.0
    stop = asyncio.Event()
    t0 = time.monotonic()

    def at() -> float:
        return time.monotonic() - t0

    # warm-up: the first epoch promoted after the start, and when every model held it
    first_eid: str | None = None
    warm_end: float | None = None
    active_eid = ""

    async def sample() -> None:
        nonlocal first_eid, warm_end, active_eid
        while not stop.is_set():
            try:
                if int((await r.info("persistence")).get("loading", 0)):
                    # the restarted server answers while it loads the AOF: its used_memory
                    # is that of a partly loaded dataset, not a point of the series
                    events.append((at(), "redis loading its AOF: memory sample skipped"))
                    await sleep_or_stop(stop, 1.0)
                    continue
                b = await memory_breakdown(r)
                b["frag"], b["rss"] = await allocator_ratios(r)
                mem.append((at(), b["used"]))
                parts.append((at(), b))
                act, models = await epochs(r, "SPX")
                if act is not None and act != active_eid:
                    events.append((at(), f"promotion: active epoch {act}"))
                    active_eid = act
                    if first_eid is None:
                        first_eid = act
                if first_eid is not None and warm_end is None and models == [first_eid] * 3:
                    warm_end = at()
                    events.append((warm_end, "every heatmap model holds the first new epoch"))
            except Exception as exc:  # Redis restarting: a gap in the series
                events.append((at(), f"memory sample failed: {type(exc).__name__}"))
            snap = {s: rss_mb(p.procs[s].pid) for s in PROCS}
            snap["redis-server"] = rss_mb(srv.proc.pid if srv.proc else None)
            snap["soak-clients"] = rss_mb(clients.pid)
            rss.append((at(), snap))
            await sleep_or_stop(stop, args.sample_s)

    print(f"# machine: {machine()}")
    print(f"# date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; logs {log_dir}")
    if args.env:
        print(f"# extra environment: {' '.join(args.env)}")
    info = await r.info("server")
    print(
        f"# redis-server {info.get('redis_version')} ({shutil.which('redis-server')}), "
        f"allocator {(await r.info('memory')).get('mem_allocator')}"
    )
    print(
        f"# redis memory settings: {' '.join(mem_args)}"
        if mem_args
        else "# redis memory settings: none (this redis-server build refuses activedefrag)"
    )
    total_s = args.minutes * 60
    open_s, close_s = 60.0, total_s - args.closed_min * 60
    restart_at = (open_s + close_s) / 2
    restart_s: float | None = None  # when Redis answered again after the kill
    try:
        await p.start(PROCS, ready_timeout_s=120)
        first = (dt.date.today() + dt.timedelta(days=1)).isoformat()
        base = big_chain("SPX", args.contracts, first_expiry=first, ts_ns=time.time_ns())
        await h.install_chain(r, base)
        active_eid = await h.wait_epoch(r, timeout_s=120)  # pre-market: not a promotion
        await h.wait_settled(r, timeout_s=300, quiet_s=1.0)
        cids = sorted(c.cid for c in base.contracts)
        front = sorted({c.expiry for c in base.contracts})[:2]
        near = sorted(
            (c for c in base.contracts if c.expiry in front), key=lambda c: abs(c.strike - 6000)
        )
        rep = h.LoadReplayer(cids, [c.cid for c in near[:1000]])
        clients.start()
        t0 = time.monotonic()
        tasks = [asyncio.create_task(sample())]
        listed = 0
        next_topo = open_s + args.topology_every_min * 60
        restarted = False
        while at() < total_s:
            now = at()
            if not restarted and now >= restart_at:
                events.append((now, "redis kill -9 + restart from AOF"))
                await asyncio.to_thread(srv.restart)
                restart_s = at()
                events.append((restart_s, "redis back"))
                restarted = True
                continue
            if now >= next_topo and now < close_s:
                listed += 1
                chain = with_new_strike(base, listed, time.time_ns())
                await h.install_chain(r, chain)
                events.append((now, f"new strike listed ({listed})"))
                next_topo += args.topology_every_min * 60
            rate = args.premarket_rate if now < open_s else args.rate if now < close_s else 0.0
            step = min(5.0, total_s - now)
            if rate > 0:
                try:
                    await rep.run(r, rate, step, 0.05)
                except Exception as exc:  # Redis restarting: the feed waits like ws-ingest
                    events.append((at(), f"replayer: {type(exc).__name__}"))
                    await asyncio.sleep(0.5)
            else:
                await asyncio.sleep(step)
        stop.set()
        await asyncio.gather(*tasks)
        clients_stop.set()
        if await asyncio.to_thread(results.poll, 120):
            report = results.recv()
        brk = await memory_breakdown(r)
        norm = await p.metrics("normalizer")
        promotions = h.metric_sum(norm, "massive_epoch_promotions_total")
        mon = await p.metrics("monitor")
        trimmed = h.metric_sum(mon, "massive_stream_trimmed_total")
        unread = h.metric_sum(mon, "massive_stream_trimmed_unread_total")
        gw = await p.metrics("sse-gateway")
        merged = h.metric_sum(gw, "massive_sse_conflated_total")
        resyncs = h.metric_sum(gw, "massive_sse_resyncs_total")
        exits = {s: pr.exited() for s, pr in p.procs.items() if pr.exited() is not None}
    finally:
        stop.set()
        clients_stop.set()
        if clients.pid is not None:
            await asyncio.to_thread(clients.join, 30)
            if clients.is_alive():
                clients.kill()
        await p.stop()
        await r.aclose()
        srv.stop()

    print("\n# events")
    for t, e in events:
        print(f"{t:8.0f}s  {e}")
    print("\n# redis used_memory (MB), every 15 s")
    print(" ".join(f"{m:.0f}" for _, m in mem))
    print("\n# what holds it (MB), every minute: used = streams + models + staging + rest")
    top = sorted({k for _, b in parts for k in b if k.startswith("stream ")})
    print(
        "t_s     used streams models staging buffers  rest  frag   rss  "
        + " ".join(k[7:] for k in top)
    )
    next_t = 0.0
    for t, b in parts:
        if t < next_t:
            continue
        next_t = t + 60
        print(
            f"{t:6.0f} {b['used']:5.0f} {b['streams']:7.0f} {b['models']:6.0f} "
            f"{b['staging']:7.0f} {b['buffers']:7.0f} {b['rest']:5.0f}  "
            f"{b.get('frag', 0.0):4.2f}  {b.get('rss', 0.0):4.2f}  "
            + " ".join(f"{b.get(k, 0.0):.0f}" for k in top)
        )
    print(f"\n# RSS (MB), every {args.sample_s:.0f} s")
    names = [*PROCS, "redis-server", "soak-clients"]
    print("t_s     " + " ".join(f"{n[:14]:>14}" for n in names))
    for t, snap in rss:
        print(f"{t:6.0f}  " + " ".join(f"{snap.get(n, float('nan')):14.0f}" for n in names))

    lim = args.flat_pct
    print("\n# summary")
    if warm_end is None:
        warm = float("inf")
        print("warm-up never ended (no promotion after the start reached every model): no verdict")
    else:
        warm = max(warm_end, open_s + 180)
        print(
            f"warm-up ends at {warm:.0f} s: the first epoch promoted after the start "
            f"({first_eid}) held by every heatmap model at {warm_end:.0f} s, retention "
            f"windows full at {open_s + 180:.0f} s; flat = max/min - 1 from then to the "
            f"close ({close_s:.0f} s) within {lim:g} %"
        )
    in_open = [m for t, m in mem if warm <= t < close_s]
    print(f"redis used_memory after warm-up (MB): {flat(in_open, lim)}")
    print(
        f"redis used_memory at the end (MB): {brk['used']:.0f} = streams "
        f"{brk['streams']:.0f} + models {brk['models']:.0f} + staging {brk['staging']:.0f} "
        f"+ buffers {brk['buffers']:.0f} + rest {brk['rest']:.0f}"
    )
    print(f"RSS (MB) per process: whole open ({open_s:.0f}-{close_s:.0f} s) | after warm-up")
    for n in names:
        whole = [snap[n] for t, snap in rss if open_s <= t < close_s and n in snap]
        after = [snap[n] for t, snap in rss if warm <= t < close_s and n in snap]
        verdict = None if n == "soak-clients" else lim  # the bench's own clients: shown only
        print(f"  {n:24} {flat(whole)} | {flat(after, verdict)}")
    if restart_s is not None:
        # the kill -9 ends one redis-server process; its successor starts from the AOF with
        # a fresh heap and refills the streams to their budgets: each process on its own
        srv_rss = [(t, snap["redis-server"]) for t, snap in rss if "redis-server" in snap]
        before = [m for t, m in srv_rss if warm <= t < restart_s]
        after_kill = [m for t, m in srv_rss if restart_s <= t < close_s]
        # the restarted server starts with a compact heap (the AOF loaded in order) and
        # reaches its steady fragmentation as the streams turn over: its own warm-up, as
        # long as the first one (the retention windows)
        settled = [m for t, m in srv_rss if restart_s + 180 <= t < close_s]
        print(
            f"  redis-server by process, after warm-up: before the kill {flat(before, lim)}; "
            f"the restarted one {flat(after_kill)}, from 180 s after its start "
            f"{flat(settled, lim)}"
        )
    print(f"epoch promotions: {promotions:.0f} (new strikes listed: {listed}, plus the first)")
    print(f"stream entries trimmed: {trimmed:,.0f}; trimmed before a group read them: {unread:.0f}")
    if not report:
        print("client checks against /api: NO REPORT (the clients' process did not answer)")
    else:
        print(
            f"client checks against /api: {report['checks']} compared, "
            f"{report['mismatches']} mismatches, {report['unverified']} not comparable "
            "(version left the history)"
        )
        print(
            "clients: "
            + ", ".join(
                f"{ch} v{v} {snaps} snapshots {breaks} chain breaks"
                for ch, v, snaps, breaks in report["clients"]
            )
        )
        print(
            f"gateway: {merged:.0f} slow-client backlogs merged, {resyncs:.0f} resyncs "
            "(a client that keeps up needs neither)"
        )
        if report["details"]:
            print("mismatches: " + ", ".join(report["details"][:20]))
    print(f"processes that exited (no supervisor): {exits or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
