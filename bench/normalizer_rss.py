"""The normalizer's RSS over repeated 20,000-contract builds, per allocator.

Each build is a new epoch (every snapshot lists one more strike than the previous one, so
the topology changes and the normalizer builds, promotes and retires). Before each build
every contract of the active epoch takes a WS quote and trade newer than the snapshot, so
the build carries 20k contracts' values into the new epoch, as it does on a trading day.
After each build the same snapshot comes again (a re-seed) and then as a whole chain for
GEX (``scope="full"``).
They run in a child process (``Normalizer.process`` in process, after
``fix_mmap_threshold`` as its ``run`` does) once on CPython's pymalloc, which the normalizer
runs on, and once with ``PYTHONMALLOC=malloc`` for comparison, on a private redis-server;
prints the RSS after each cycle and the peaks during each step (a thread of the child reads
its VmRSS every ``--sample-s``), and max / min - 1 of all of them: the soak's "flat"
reading.

    .venv/bin/python bench/normalizer_rss.py [--contracts 20000] [--builds 8] [--sample-s 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client import CollectorRegistry
from publisher_rss import Sampler  # bench/publisher_rss.py

from bench.e2e_load import machine, rss_mb
from processors.epochs.normalizer import Normalizer, NormalizerSettings
from schemas import keys
from schemas.messages import ChainPointer, encode_snapshot
from streams.memory import fix_mmap_threshold
from streams.processor import Deps
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.factories import big_chain, contract
from tests.util import RedisServer


async def store(url: str, n: int, builds: int) -> list[ChainPointer]:
    """``builds`` snapshots, each with one more strike than the one before."""
    r = connect(url)
    await r.flushall()
    base = big_chain("SPX", n, ts_ns=1_764_000_000_000_000_000)
    expiry = base.contracts[-1].expiry
    ptrs = []
    for i in range(builds):
        extra = [
            contract("SPXW", expiry, "C", 90_000.0 + 5 * j, bid=0.05, ask=0.1) for j in range(i)
        ]
        snap = msgspec.structs.replace(
            base, ts_ns=base.ts_ns + i * 10**10, contracts=[*base.contracts, *extra]
        )
        key = keys.chain_snapshot(snap.symbol, snap.ts_ns)
        await r.set(key, encode_snapshot(snap), ex=3600)
        ptrs.append(
            ChainPointer(
                symbol=snap.symbol, snapshot_key=key, ts_ns=snap.ts_ns, n_contracts=len(extra) + n
            )
        )
    await r.aclose()
    return ptrs


# Every contract of the active epoch takes a WS quote and trade (server-side: the bench's own
# process stays out of the RSS it measures), as hours of 5,000 events/s leave it.
_WS_VALUES = """
for _, c in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('HSET', ARGV[1] .. c, 'quote_ts', ARGV[2], 'bid', '1.1', 'ask', '1.3', 'mid', '1.2',
    'trade_ts', ARGV[2], 'last', '1.25', 'size', '3')
end
return 1
"""


async def ws_values(r: Redis, ptr: ChainPointer) -> None:
    """WS values newer than ``ptr``'s snapshot on every contract of the active epoch: what
    the next build carries into the new epoch (none before the first build)."""
    eid = await r.get(keys.epoch_active(ptr.symbol))
    if eid is None:
        return
    members = keys.epoch_contracts(ptr.symbol, eid.decode())
    prefix = keys.epoch_contract_prefix(ptr.symbol, eid.decode())
    await r.eval(_WS_VALUES, 1, members, prefix, str(ptr.ts_ns + 10**9))  # type: ignore[misc]


async def child(url: str, ptrs: list[ChainPointer], sample_s: float) -> None:
    r = connect(url)
    settings = RuntimeSettings(redis_url=url, consumer="bench")
    norm = Normalizer(Deps(r, settings, CollectorRegistry()), NormalizerSettings())
    fix_mmap_threshold()
    sampler = Sampler(os.getpid(), sample_s)
    sampler.start()
    rss = [rss_mb(os.getpid())]
    peaks: list[float] = []
    others: dict[str, list[float]] = {"reseeded": [], "gex_source": []}
    for ptr in ptrs:
        await ws_values(r, ptr)
        t0, m0 = time.perf_counter(), time.monotonic()
        res = await norm.process(ptr)
        if res != "built":
            raise SystemExit(f"expected a build, got {res}")
        peak = sampler.peak_since(m0)
        peaks.append(float("nan") if peak is None else peak)
        took = time.perf_counter() - t0
        # what a trading day runs between builds: the next poll of the same topology (a
        # re-seed) and the whole chain for GEX (``scope="full"``)
        for p in (ptr, msgspec.structs.replace(ptr, scope="full")):
            m1 = time.monotonic()
            kind = await norm.process(p)
            others[kind].append(sampler.peak_since(m1) or float("nan"))
        rss.append(rss_mb(os.getpid()))
        print(
            f"    build {took:.2f} s, peak {peaks[-1]:.1f} MB; then a re-seed (peak "
            f"{others['reseeded'][-1]:.1f}) and a whole chain for GEX (peak "
            f"{others['gex_source'][-1]:.1f}): RSS after {rss[-1]:.1f} MB"
        )
    sampler.stop.set()
    await r.aclose()
    first = rss[1]
    print(
        f"  PYTHONMALLOC={os.environ.get('PYTHONMALLOC', '(unset)')}: RSS MB before "
        f"{rss[0]:.0f}, after each build "
        + " ".join(f"{v:.0f}" for v in rss[1:])
        + f"; last - first build {rss[-1] - first:+.1f} MB"
        + f" ({100 * (rss[-1] - first) / first:+.0f} %); peak during builds {max(peaks):.0f} MB,"
        + f" re-seeds {max(others['reseeded']):.0f} MB, whole chains"
        + f" {max(others['gex_source']):.0f} MB; max / min of all - 1:"
        + f" {100 * (max(peaks + rss[1:]) / min(rss[1:]) - 1):.1f} %",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contracts", type=int, default=20_000)
    ap.add_argument("--builds", type=int, default=8)
    ap.add_argument("--sample-s", type=float, default=0.02)
    ap.add_argument("--child", nargs=2, metavar=("URL", "PTR_FILE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        url, ptr_file = a.child
        asyncio.run(
            child(
                url,
                msgspec.json.decode(Path(ptr_file).read_bytes(), type=list[ChainPointer]),
                a.sample_s,
            )
        )
        return
    base = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    print(f"# machine: {machine()}")
    print(f"# normalizer: {a.builds} builds of {a.contracts} contracts, one process each")
    srv = RedisServer().start()
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            for label, env in (
                ("pymalloc (what it runs on)", base),
                ("the C library's malloc", {**base, "PYTHONMALLOC": "malloc"}),
            ):
                ptrs = asyncio.run(store(srv.url, a.contracts, a.builds))
                Path(f.name).write_bytes(msgspec.json.encode(ptrs))
                print(f"- {label}:", flush=True)
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--sample-s",
                        str(a.sample_s),
                        "--child",
                        srv.url,
                        f.name,
                    ],
                    env=env,
                    check=True,
                )
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
