"""Decode benchmark that chose the schema library: WS frames of 10 events (trades and
quotes, the provider's exact shapes) decoded with orjson (to dicts, then validated by hand)
vs msgspec (typed, validated structs, schemas/massive.py). Prints events/s.

    .venv/bin/python bench/ws_decode.py
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson

from schemas.massive import Quote, Trade, decode_frame


def frames(n: int, per_frame: int = 10) -> list[bytes]:
    rnd = random.Random(1)
    out = []
    for _ in range(n):
        evs: list[dict[str, Any]] = []
        for _ in range(per_frame):
            sym = f"O:SPXW261124{'CP'[rnd.randrange(2)]}{rnd.randrange(5000, 7000) * 1000:08d}"
            t = 1764000000000 + rnd.randrange(10**6)
            if rnd.random() < 0.5:
                evs.append(
                    {
                        "ev": "T",
                        "sym": sym,
                        "x": 65,
                        "p": round(rnd.uniform(0.05, 200), 2),
                        "s": rnd.randrange(1, 50),
                        "c": [233],
                        "t": t,
                        "q": rnd.randrange(10**9),
                    }
                )
            else:
                bp = round(rnd.uniform(0.05, 200), 2)
                evs.append(
                    {
                        "ev": "Q",
                        "sym": sym,
                        "bx": 302,
                        "ax": 302,
                        "bp": bp,
                        "ap": bp + 0.1,
                        "bs": 17,
                        "as": 24,
                        "t": t,
                        "q": rnd.randrange(10**9),
                    }
                )
        out.append(orjson.dumps(evs))
    return out


def orjson_validated(raw: bytes) -> list[Any]:
    # The equivalent of what msgspec checks: types of the fields we use, non-negative prices.
    out = []
    for e in orjson.loads(raw):
        ev = e["ev"]
        if ev == "T":
            p, s, t = e["p"], e["s"], e["t"]
            if not (isinstance(p, (int, float)) and isinstance(s, int) and isinstance(t, int)):
                raise ValueError("bad trade")
            if p < 0 or s < 0:
                raise ValueError("negative")
            out.append(Trade(sym=e["sym"], p=float(p), s=s, t=t))
        elif ev == "Q":
            bp, ap, t = e["bp"], e["ap"], e["t"]
            if not (isinstance(bp, (int, float)) and isinstance(ap, (int, float))):
                raise ValueError("bad quote")
            if bp < 0 or ap < 0:
                raise ValueError("negative")
            out.append(Quote(sym=e["sym"], bp=float(bp), ap=float(ap), t=t))
    return out


def run(name: str, fn: Callable[[bytes], object], data: list[bytes], per_frame: int) -> float:
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for f in data:
            fn(f)
        rate = len(data) * per_frame / (time.perf_counter() - t0)
        best = max(best, rate)
    print(f"{name:34} {best:>14,.0f} events/s")
    return best


def main() -> None:
    data = frames(20_000)
    run("orjson.loads only (dicts, no checks)", orjson.loads, data, 10)
    a = run("orjson + hand validation -> structs", orjson_validated, data, 10)
    b = run("msgspec typed decode (decode_frame)", decode_frame, data, 10)
    print(f"msgspec / orjson-validated = {b / a:.2f}x")


if __name__ == "__main__":
    main()
