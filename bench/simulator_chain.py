"""Time to serve the full simulated I:SPX chain through all pages (limit=250).

Prints, for a few rounds: pages, contracts, wall time over loopback HTTP (httpx client,
Bearer auth, following next_url), and the server-side cost alone (page selection + item
building + JSON encoding, in process, no HTTP). Round 1 includes the first touch of every
contract (lazy seeding); later rounds re-price after market ticks.

    .venv/bin/python bench/simulator_chain.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
import orjson

from simulator.server import SimConfig, SimServer, _ChainQuery


async def page_http(srv: SimServer, client: httpx.AsyncClient) -> tuple[int, int, int]:
    url: str | None = f"{srv.rest_url}/v3/snapshot/options/I:SPX?limit=250"
    pages = n = nbytes = 0
    while url:
        r = await client.get(url, headers={"Authorization": "Bearer sim-key"})
        r.raise_for_status()
        body = r.json()
        pages += 1
        n += len(body["results"])
        nbytes += len(r.content)
        url = body.get("next_url")
    return pages, n, nbytes


def page_inprocess(srv: SimServer) -> int:
    q = _ChainQuery(limit=250)
    st = srv.market.indices["SPX"]
    pages = 0
    while True:
        page, more = srv._page("SPX", q)
        orjson.dumps({"results": [srv._item(c, st) for c in page]})
        pages += 1
        if not more:
            return pages
        q = _ChainQuery(q.sort, q.order, q.limit, None, (), (), page[-1].ticker)


async def main(rounds: int) -> None:
    t0 = time.perf_counter()
    srv = SimServer(SimConfig())
    await srv.start()
    print(f"server start (market build): {time.perf_counter() - t0:.3f} s")
    print(f"SPX contracts: {len(srv.market.by_symbol['SPX'])}")
    async with httpx.AsyncClient(timeout=30.0) as client:
        for i in range(rounds):
            t = time.perf_counter()
            pages, n, nbytes = await page_http(srv, client)
            dt_http = time.perf_counter() - t
            srv.market.advance(srv.clock())
            t = time.perf_counter()
            page_inprocess(srv)
            dt_srv = time.perf_counter() - t
            print(
                f"round {i + 1}: {pages} pages, {n} contracts, {nbytes / 1e6:.1f} MB JSON; "
                f"HTTP full chain {dt_http:.2f} s ({1000 * dt_http / pages:.1f} ms/page); "
                f"server-side only {dt_srv:.2f} s ({1000 * dt_srv / pages:.1f} ms/page)"
            )
    await srv.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(ap.parse_args().rounds))
