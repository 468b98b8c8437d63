"""Time to build and promote a 20,000-contract SPX epoch (target <= 1.5 s).

Starts a private redis-server (tests.util.RedisServer), stores a realistic chain snapshot
blob (tests.factories.big_chain) and a ChainPointer, then times ``Normalizer.process``:
(1) first snapshot: build + promote a new epoch (no previous one);
(2) a topology change (one strike added): build + carry (two passes over 20k contracts, both
    epochs read) + promote + retire the previous epoch;
(3) the same topology again: re-seed only (no rebuild).
Each is repeated ``--rounds`` times on a fresh Redis database; prints every figure.

    .venv/bin/python bench/epoch_build.py [--contracts 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import msgspec.structs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors.epochs.normalizer import Normalizer, NormalizerSettings
from schemas import keys
from schemas.messages import ChainPointer, ChainSnapshot, encode_snapshot
from streams.processor import Deps
from streams.redis_client import connect
from streams.settings import RuntimeSettings
from tests.factories import big_chain, contract
from tests.util import RedisServer


async def _store(r: Redis, snap: ChainSnapshot) -> ChainPointer:
    key = keys.chain_snapshot(snap.symbol, snap.ts_ns)
    await r.set(key, encode_snapshot(snap), ex=600)
    return ChainPointer(
        symbol=snap.symbol, snapshot_key=key, ts_ns=snap.ts_ns, n_contracts=len(snap.contracts)
    )


async def one_round(url: str, n: int) -> dict[str, float]:
    r = connect(url)
    await r.flushall()
    settings = RuntimeSettings(redis_url=url, consumer="bench")
    norm = Normalizer(Deps(r, settings, CollectorRegistry()), NormalizerSettings())
    snap1 = big_chain("SPX", n, ts_ns=1_764_000_000_000_000_000)
    extra = contract("SPXW", snap1.contracts[-1].expiry, "C", 99_995.0, bid=0.05, ask=0.1)
    snap2 = msgspec.structs.replace(
        snap1, ts_ns=snap1.ts_ns + 10**10, contracts=[*snap1.contracts, extra]
    )
    snap3 = msgspec.structs.replace(snap2, ts_ns=snap2.ts_ns + 10**10)
    out: dict[str, float] = {}
    for label, snap, expect in (
        ("first_build_promote_s", snap1, "built"),
        ("change_build_promote_retire_s", snap2, "built"),
        ("reseed_same_topology_s", snap3, "reseeded"),
    ):
        ptr = await _store(r, snap)
        t0 = time.perf_counter()
        res = await norm.process(ptr)
        out[label] = time.perf_counter() - t0
        if res != expect:
            raise SystemExit(f"{label}: expected {expect}, got {res}")
    # The build+promote part alone of the change (retire and sweep excluded), from the metric.
    hist = norm.m_build.labels(symbol="SPX")
    out["build_promote_hist_sum_s"] = float(hist._sum.get())  # type: ignore[attr-defined]
    eid = (await r.get(keys.epoch_active("SPX"))).decode()  # type: ignore[union-attr]
    out["n_contracts"] = float(await r.scard(keys.epoch_contracts("SPX", eid)))
    out["keys_total"] = float(await r.dbsize())
    await r.aclose()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contracts", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    srv = RedisServer().start()
    try:
        rounds = [await one_round(srv.url, a.contracts) for _ in range(a.rounds)]
    finally:
        srv.stop()
    print(f"epoch build bench: {a.contracts} contracts, {a.rounds} rounds (private redis-server)")
    for k in rounds[0]:
        vals = [r[k] for r in rounds]
        print(
            f"  {k:32} median {statistics.median(vals):9.3f}  " + " ".join(f"{v:.3f}" for v in vals)
        )
    med = statistics.median(r["first_build_promote_s"] for r in rounds)
    print(
        f"  target first build+promote <= 1.5 s: {'OK' if med <= 1.5 else 'MISSED'} ({med:.3f} s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
