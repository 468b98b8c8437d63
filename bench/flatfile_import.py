"""import-flatfiles throughput and memory: a synthetic day of options quotes and trades in the
provider's flat-file columns (every underlying, sorted by ticker like the real files), of which
``--share`` are SPX/SPXW, imported for SPX. Prints rows/s read, rows kept, events written and
the peak RSS of the process, for two run sizes: memory follows ``--run-rows``, not the file.

    .venv/bin/python bench/flatfile_import.py [--rows 2000000] [--share 0.2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processors.ops import flatfiles as ff

DAY = dt.date(2025, 11, 24)
OPEN_NS = 1_763_994_600_000_000_000  # 2025-11-24 09:30 New York
SESSION_NS = 6 * 3600 * 10**9 + 30 * 60 * 10**9


def write_files(tmp: Path, rows: int, share: float, seed: int = 1) -> tuple[Path, Path]:
    rnd = random.Random(seed)
    spx = [f"O:SPXW251124{r}{k * 1000:08d}" for k in range(5500, 6500, 5) for r in "CP"]
    other = [f"O:{root}251219C{k * 1000:08d}" for root in ("AAPL", "SPY", "QQQ", "TSLA")
             for k in range(50, 800, 5)]  # fmt: skip
    n_spx = int(rows * share)
    quotes = tmp / "quotes.csv.gz"
    trades = tmp / "trades.csv.gz"
    with gzip.open(quotes, "wt", compresslevel=1) as f:
        f.write(",".join(ff.QUOTE_COLUMNS) + "\n")
        picks = [(rnd.choice(other), 0) for _ in range(rows - n_spx)]
        picks += [(rnd.choice(spx), 1) for _ in range(n_spx)]
        picks.sort()  # the provider's files are grouped by ticker
        for i, (cid, _) in enumerate(picks):
            ts = OPEN_NS + rnd.randrange(SESSION_NS)
            bid = round(rnd.uniform(0.05, 50), 2)
            f.write(f"{cid},301,{bid + 0.2:.2f},10,302,{bid:.2f},12,{i},{ts}\n")
    with gzip.open(trades, "wt", compresslevel=1) as f:
        f.write(",".join(ff.TRADE_COLUMNS) + "\n")
        for cid in sorted(rnd.choice(spx + other) for _ in range(rows // 20)):
            ts = OPEN_NS + rnd.randrange(SESSION_NS)
            f.write(f"{cid},209,0,312,{rnd.uniform(0.05, 50):.2f},{ts},{rnd.randint(1, 20)}\n")
    return trades, quotes


def peak_rss_mb() -> float:
    """VmHWM of this process (getrusage's ru_maxrss survives exec: it would report the
    parent's peak, which wrote the fixture)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def import_once(trades: Path, quotes: Path, out: Path, run_rows: int) -> None:
    """One import in this (child) process; prints its figures and its own peak RSS."""
    t0 = time.perf_counter()
    st = ff.import_flatfiles(out, DAY, ["SPX"], trades, quotes, run_rows=run_rows)
    took = time.perf_counter() - t0
    read = st.rows["quotes_read"] + st.rows["trades_read"]
    kept = st.rows["quotes_kept"] + st.rows["trades_kept"]
    print(
        f"run rows {run_rows:>7,}: {took:6.1f} s, {read / took:,.0f} rows/s read, "
        f"{kept:,} kept, {st.frames:,} frames, {st.runs} runs spilled, "
        f"peak RSS {peak_rss_mb():.0f} MB, recording {out.stat().st_size / 1e6:.1f} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000, help="quote rows (trades: rows/20)")
    ap.add_argument("--share", type=float, default=0.2, help="share of SPX/SPXW rows")
    ap.add_argument("--import-only", nargs=3, metavar=("TRADES", "QUOTES", "RUN_ROWS"))
    args = ap.parse_args()
    if args.import_only:
        t, q, n = args.import_only
        import_once(Path(t), Path(q), Path(q).with_suffix(f".{n}.mrec.gz"), int(n))
        return
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tmp = Path(tempfile.mkdtemp(prefix="massive-bench-ff-"))
    t0 = time.perf_counter()
    trades, quotes = write_files(tmp, args.rows, args.share)
    size = (trades.stat().st_size + quotes.stat().st_size) / 1e6
    print(f"fixture: {args.rows:,} quote + {args.rows // 20:,} trade rows, {size:.0f} MB gzip "
          f"({time.perf_counter() - t0:.1f} s to write)")  # fmt: skip
    for run_rows in (50_000, 500_000):  # each import in its own process: its own peak RSS
        cmd = [sys.executable, __file__, "--import-only", str(trades), str(quotes), str(run_rows)]
        subprocess.run(cmd, check=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
