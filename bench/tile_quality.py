"""Heatmap quality on a live simulator run (issue 19): tradability, convexity >= 0.99 among
untradable tiles, executable-arbitrage flags, mid-bound flags, -0.0, leg price decimals and
legs priced from trades, per strategy.

Runs the simulator and chain-poller, ws-ingest, normalizer, hydrator and the three tile
builders in this process on a private redis-server (tests/tile_quality.py), then reads every
staged tile (the bytes the publishers publish).
Run: ``.venv/bin/python bench/tile_quality.py [--duration 120] [--symbols SPX,NDX]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tile_quality import run, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds after warm-up")
    ap.add_argument("--symbols", default="SPX")
    ap.add_argument("--rate", type=float, default=400.0, help="simulated WS events/s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--expiries", type=int, default=5, help="expirations tiled per symbol")
    args = ap.parse_args()
    symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
    report = asyncio.run(
        run(args.duration, symbols=symbols, seed=args.seed, rate=args.rate,
            n_expiries=args.expiries)
    )  # fmt: skip
    for line in summary(report):
        print(line)
    worst = max(s.share(s.bound) for s in report.by_strategy.values())
    bad = sum(s.convex_99_untradable for s in report.by_strategy.values())
    fields = all(s.with_fields == s.tiles for s in report.by_strategy.values())
    ok = worst <= 0.005 and bad == 0 and fields
    print(
        f"RESULT bound_flags_max_pct={100 * worst:.3f} convex99_untradable={bad} "
        f"all_tiles_have_fields={fields} {'OK' if ok else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
