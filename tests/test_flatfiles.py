"""import-flatfiles: Massive options trades/quotes flat files (the documented columns) ->
a recording; its replay through the pipeline publishes the hand-computed tile prices.

The fixture files are written here: a few SPXW contracts of one session among rows the import
must filter (other underlyings, a longer root sharing the prefix, an expired contract,
another day) or count as malformed (wrong column count, unparsable numbers, a bad ticker, a
corrected trade)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from processors import MODEL_PATH
from processors.ops import flatfiles as ff
from processors.ops import replay as rp
from schemas import keys
from schemas.messages import ChainSnapshot
from streams.settings import RuntimeSettings

DAY = dt.date(2025, 11, 24)
EXP = "251124"  # 0DTE
T10 = 1_763_996_400_000_000_000  # 2025-11-24 10:00:00 New York (15:00 UTC)
S = 1_000_000_000
MS = 1_000_000


def cid(right: str, strike: int, root: str = "SPXW", exp: str = EXP) -> str:
    return f"O:{root}{exp}{right}{strike * 1000:08d}"


# The hand-checked set: final quotes (mid) per contract; P5920 trades only.
FINAL_MID = {
    cid("C", 5900): 12.2,
    cid("C", 5910): 6.2,
    cid("C", 5920): 2.2,
    cid("P", 5900): 1.1,
    cid("P", 5910): 3.2,
}
P5920_LAST = 7.5


def quote_row(ticker: str, bid: float, ask: float, ts: int, seq: int = 1) -> str:
    # the columns of ff.QUOTE_COLUMNS, in order
    return f"{ticker},301,{ask},10,302,{bid},12,{seq},{ts}"


def trade_row(ticker: str, price: float, size: int, ts: int, correction: int = 0) -> str:
    # the columns of ff.TRADE_COLUMNS, in order
    return f"{ticker},209,{correction},312,{price},{ts},{size}"


def quotes_lines() -> list[str]:
    c5900 = cid("C", 5900)
    rows = [
        # Sorted by ticker like the provider's files, not by time: the import must merge.
        quote_row(c5900, 11.0, 11.4, T10 + 1 * S, 1),
        quote_row(c5900, 11.8, 12.2, T10 + 5 * S + 100, 2),  # same millisecond as the next:
        quote_row(c5900, 12.0, 12.4, T10 + 5 * S + 900, 3),  # only the last one counts
        quote_row(cid("C", 5910), 5.0, 5.4, T10 + 2 * S, 1),
        quote_row(cid("C", 5910), 6.0, 6.4, T10 + 4 * S, 2),
        quote_row(cid("C", 5920), 2.0, 2.4, T10 + 3 * S, 1),
        quote_row(cid("P", 5900), 1.0, 1.2, T10 + 3 * S + 500 * MS, 1),
        quote_row(cid("P", 5910), 3.0, 3.4, T10 + 2 * S + 500 * MS, 1),
        # filtered by prefix (never parsed): other underlyings
        quote_row("O:SPY251124C00590000", 1.0, 1.1, T10 + S),
        quote_row(cid("C", 21000, root="NDX"), 50.0, 51.0, T10 + S),
        # prefix matches, not SPX: a longer root (an ETF's options)
        quote_row("O:SPXL251124C00100000", 1.0, 1.1, T10 + S),
        # expired contract, another session's timestamp
        quote_row(cid("C", 5900, exp="251121"), 1.0, 1.1, T10 + S),
        quote_row(cid("C", 5900), 1.0, 1.1, T10 - 86400 * S),
        # malformed: columns, numbers, timestamp, ticker
        f"{c5900},301,12.4,10,302,12.0,12,4",
        quote_row(c5900, float("nan"), 12.4, T10 + 6 * S),
        f"{c5900},301,abc,10,302,12.0,12,4,{T10 + 6 * S}",
        f"{c5900},301,12.4,-3,302,12.0,12,4,{T10 + 6 * S}",
        f"{c5900},301,12.4,10,302,12.0,12,4,tomorrow",
        quote_row("O:SPXW2511", 1.0, 1.1, T10 + S),
    ]
    return [",".join(ff.QUOTE_COLUMNS), *rows]


def trades_lines() -> list[str]:
    return [
        ",".join(ff.TRADE_COLUMNS),
        trade_row(cid("C", 5900), 11.5, 2, T10 + 2 * S),
        trade_row(cid("P", 5920), 7.0, 1, T10 + 1 * S),
        trade_row(cid("P", 5920), 7.5, 3, T10 + 4 * S + 500 * MS),
        trade_row(cid("P", 5920), 99.0, 1, T10 + 5 * S, correction=1),  # corrected: skipped
        trade_row(cid("P", 5920), 7.9, -1, T10 + 5 * S),  # negative size: malformed
    ]


def write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_gz(tmp_path / "2025-11-24-trades.csv.gz", trades_lines()),
        write_gz(tmp_path / "2025-11-24-quotes.csv.gz", quotes_lines()),
    )


def test_import_writes_a_recording_in_sip_order_with_counted_rejections(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    trades, quotes = files
    out = tmp_path / "day.mrec.gz"
    stats = ff.import_flatfiles(out, DAY, ["SPX"], trades, quotes, run_rows=3)
    assert stats.runs >= 3  # spilled: memory held at most 3 rows at a time
    assert stats.skipped == {
        "other_underlying": 1,
        "expired": 1,
        "other_date": 1,
        "columns": 1,
        "bad_number": 4,  # nan price, "abc", negative size (quote), negative size (trade)
        "bad_timestamp": 1,
        "bad_ticker": 1,
        "corrected": 1,
    }
    assert stats.rows["quotes_read"] == len(quotes_lines()) - 1
    assert stats.rows["quotes_filtered_out"] == 2  # SPY, NDX: never parsed
    assert stats.rows["quotes_kept"] == 8 and stats.rows["trades_kept"] == 3
    assert stats.superseded == 1
    assert dict(stats.events) == {"Q": 7, "T": 3}
    assert stats.contracts == {"SPX": 6}

    header, it = rp.read_recording(out)
    records = list(it)
    assert header.streams == [keys.CHAIN_STREAM, keys.WS_STREAM]
    chain, ws = records[0], records[1:]
    assert chain.stream == keys.CHAIN_STREAM and chain.blob is not None
    snap = msgspec.msgpack.decode(chain.blob, type=ChainSnapshot)
    assert sorted(c.cid for c in snap.contracts) == sorted([*FINAL_MID, cid("P", 5920)])
    assert all(c.oi is None and c.bid is None for c in snap.contracts)  # nothing invented
    assert [r.stream for r in ws] == [keys.WS_STREAM] * len(ws)
    times = [r.t_ns for r in records]
    assert times == sorted(times) and chain.t_ns < ws[0].t_ns
    events = [e for r in ws for e in json.loads(dict(r.fields)[b"payload"])]
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    # Units: the WebSocket's millisecond t, prices as given, the last quote of the millisecond.
    c5900 = [e for e in events if e["sym"] == cid("C", 5900) and e["ev"] == "Q"]
    assert c5900[-1] == {
        "ev": "Q", "sym": cid("C", 5900), "bp": 12.0, "ap": 12.4, "bs": 12, "as": 10,
        "t": (T10 + 5 * S) // MS, "bx": 302, "ax": 301, "q": 3,
    }  # fmt: skip
    p5920 = [e for e in events if e["sym"] == cid("P", 5920)]
    assert [(e["ev"], e["p"], e["s"]) for e in p5920] == [("T", 7.0, 1), ("T", 7.5, 3)]
    # The same recording whatever the run size (the merge is exact).
    again = tmp_path / "again.mrec.gz"
    ff.import_flatfiles(again, DAY, ["SPX"], trades, quotes, run_rows=1_000_000)
    assert list(rp.read_recording(again)[1]) == records


def test_bad_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trades = write_gz(tmp_path / "t.csv.gz", trades_lines())
    no_price = write_gz(tmp_path / "q.csv.gz", ["ticker,bid_price,sip_timestamp"])
    assert ff.main(["--date", "2025-11-24", "--trades", str(trades), "--quotes", str(no_price),
                    "-o", str(tmp_path / "x.mrec.gz")]) == 1  # fmt: skip
    assert "no column(s) ask_price" in capsys.readouterr().err
    missing = tmp_path / "nope.csv.gz"
    assert ff.main(["--date", "2025-11-24", "--trades", str(missing)]) == 1
    assert "nope.csv.gz" in capsys.readouterr().err
    empty = write_gz(tmp_path / "e.csv.gz", [",".join(ff.TRADE_COLUMNS)])
    assert ff.main(["--date", "2025-11-24", "--trades", str(empty)]) == 1
    assert "no SPX trades or quotes on 2025-11-24" in capsys.readouterr().err
    assert ff.main(["--date", "2025-11-24", "--symbols", "X-Y", "--trades", str(trades)]) == 2
    with pytest.raises(SystemExit):
        ff.main(["--date", "2025-11-24", "--spot", "SPX:5900", "--trades", str(trades)])


# --- replay: the hand-checked tile prices --------------------------------------------------
def replay_settings(settings: RuntimeSettings) -> RuntimeSettings:
    return RuntimeSettings(
        redis_url=settings.redis_url,
        consumer="ff",
        symbols=("SPX",),
        min_idle_ms=60_000,
        grace_s=5.0,
    )


async def models(redis: Redis) -> dict[str, Any]:
    out = {}
    for s in keys.STRATEGIES:
        raw = await redis.get(keys.heatmap_model("SPX", s))
        assert raw is not None, s
        out[s] = msgspec.json.decode(raw)["items"]
    raw = await redis.get(keys.gex_model("SPX"))
    out["gex"] = msgspec.json.decode(raw) if raw is not None else None
    return out


def metric(reg: CollectorRegistry, name: str) -> float:
    return sum(s.value for mt in reg.collect() for s in mt.samples if s.name == name)


def tid(strategy: str, strikes: str, right: str) -> str:
    return f"SPX:2025-11-24:{strategy}:{strikes}:{right}"


@pytest.fixture
def replay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASSIVE_PUBLISHER_LEASE_TTL_MS", "600000")
    monkeypatch.setenv("MASSIVE_GEX_LEASE_TTL_MS", "600000")


@pytest.mark.timeout(120)
async def test_replay_of_an_import_publishes_the_hand_checked_tile_prices(
    redis: Redis,
    settings: RuntimeSettings,
    files: tuple[Path, Path],
    tmp_path: Path,
    replay_env: None,
) -> None:
    trades, quotes = files
    out = tmp_path / "day.mrec.gz"
    ff.import_flatfiles(out, DAY, ["SPX"], trades, quotes, spots={"SPX": 5905.0})
    reg = CollectorRegistry()
    opts = rp.ReplayOptions(processors=list(MODEL_PATH))
    await rp.replay_file(redis, out, opts, replay_settings(settings), reg)
    m = await models(redis)
    single, vertical, fly = m["single"], m["vertical"], m["butterfly"]
    for c, mid in FINAL_MID.items():
        right, strike = c[-9], int(c[-8:]) // 1000
        item = single[tid("single", str(strike), right)]
        assert (item["debit"], item["px_src"], item["src"]) == (mid, "mid", "ws"), c
    p5920 = single[tid("single", "5920", "P")]
    assert (p5920["debit"], p5920["px_src"]) == (P5920_LAST, "last")
    assert vertical[tid("vertical", "5900-5910", "C")]["debit"] == pytest.approx(12.2 - 6.2)
    assert vertical[tid("vertical", "5910-5920", "C")]["debit"] == pytest.approx(6.2 - 2.2)
    assert vertical[tid("vertical", "5900-5920", "C")]["debit"] == pytest.approx(12.2 - 2.2)
    assert vertical[tid("vertical", "5900-5910", "P")]["debit"] == pytest.approx(3.2 - 1.1)
    assert vertical[tid("vertical", "5910-5920", "P")]["debit"] == pytest.approx(7.5 - 3.2)
    call_fly = fly[tid("butterfly", "5900-5910-5920", "C")]
    put_fly = fly[tid("butterfly", "5900-5910-5920", "P")]
    assert call_fly["debit"] == pytest.approx(12.2 - 2 * 6.2 + 2.2)
    assert put_fly["debit"] == pytest.approx(7.5 - 2 * 3.2 + 1.1)
    assert put_fly["px_src"] == "mixed"  # two mids and a last trade
    assert len(fly) == 2 and len(vertical) == 6 and len(single) == 6
    # No open interest in the files and no snapshot: GEX says so instead of inventing it.
    gex = m["gex"]
    assert gex is not None and gex["items"] == {}
    assert gex["meta"]["n_missing_greeks"] == 6 and gex["meta"]["spot"] == 5905.0
    assert metric(reg, "massive_hydrator_applied_total") == 10  # 7 quotes + 3 trades
    assert metric(reg, "massive_hydrator_geometry_miss_total") == 0


def chain_page(spot: float) -> dict[str, Any]:
    """A saved /v3/snapshot/options/I:SPX page: open interest and greeks for four of the
    contracts (C5920 and the puts but P5910 absent), a quote newer than every event."""

    def item(c: str, oi: float, gamma: float) -> dict[str, Any]:
        right, strike = c[-9], int(c[-8:]) // 1000
        return {
            "details": {"ticker": c, "contract_type": "call" if right == "C" else "put",
                        "expiration_date": "2025-11-24", "strike_price": strike},
            "greeks": {"delta": 0.5, "gamma": gamma, "theta": -1.0, "vega": 0.1},
            "implied_volatility": 0.2,
            "open_interest": oi,
            "last_quote": {"bid": 50.0, "ask": 51.0, "last_updated": T10 + 3600 * S},
            "underlying_asset": {"ticker": "I:SPX", "value": spot},
            "day": {},
            "break_even_price": 0,
        }  # fmt: skip

    items = [
        item(cid("C", 5900), 100, 0.01),
        item(cid("C", 5910), 200, 0.02),
        item(cid("P", 5900), 300, 0.01),
        item(cid("P", 5920), 50, 0.015),
    ]
    return {"status": "OK", "request_id": "x", "results": items}


@pytest.mark.timeout(120)
async def test_a_chain_snapshot_gives_topology_open_interest_and_spot(
    redis: Redis,
    settings: RuntimeSettings,
    files: tuple[Path, Path],
    tmp_path: Path,
    replay_env: None,
) -> None:
    trades, quotes = files
    snap = tmp_path / "chain.json"
    snap.write_text(json.dumps([chain_page(5907.5)]))
    out = tmp_path / "day.mrec.gz"
    stats = ff.import_flatfiles(out, DAY, ["SPX"], trades, quotes, chain=snap)
    assert stats.contracts == {"SPX": 4}
    reg = CollectorRegistry()
    await rp.replay_file(redis, out, rp.ReplayOptions(), replay_settings(settings), reg)
    m = await models(redis)
    # The snapshot's quotes (an hour later) were dropped: the files' prices stand.
    assert m["single"][tid("single", "5900", "C")]["debit"] == 12.2
    assert set(m["single"]) == {
        tid("single", "5900", "C"), tid("single", "5910", "C"),
        tid("single", "5900", "P"), tid("single", "5920", "P"),
    }  # fmt: skip
    gex = m["gex"]
    assert gex["meta"]["spot"] == 5907.5 and gex["meta"]["n_missing_greeks"] == 0
    assert gex["items"]  # gamma x OI by strike
    # C5920 and P5910 were traded/quoted but the snapshot did not list them.
    assert metric(reg, "massive_hydrator_geometry_miss_total") == 2


# --- invariants ----------------------------------------------------------------------------
_row = st.tuples(
    st.integers(0, 10**6),
    st.sampled_from([ff.TRADE, ff.QUOTE]),
    st.integers(0, 5),
    st.sampled_from(["O:SPXW251124C05900000", "O:SPX251219P05000000"]),
    st.floats(0, 100),
    st.floats(0, 100),
    st.integers(0, 9),
    st.integers(0, 9),
    st.integers(0, 9),
    st.integers(0, 9),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(_row, max_size=60), run_rows=st.integers(1, 20))
def test_sorted_rows_is_a_sorted_permutation_for_any_run_size(
    rows: list[ff.Row], run_rows: int, tmp_path: Path
) -> None:
    stats = ff.ImportStats()
    got = list(ff.sorted_rows([iter(rows[:25]), iter(rows[25:])], str(tmp_path), run_rows, stats))
    assert got == sorted(rows)


_cell = st.text(alphabet='0123456789.,-OSPXWC:abc"', max_size=12)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(st.lists(_cell, min_size=1, max_size=11).map(",".join), max_size=30))
def test_any_line_is_kept_filtered_or_counted_never_raised(
    lines: list[str], tmp_path: Path
) -> None:
    path = write_gz(tmp_path / "q.csv.gz", [",".join(ff.QUOTE_COLUMNS), *lines])
    stats = ff.ImportStats()
    reader = ff._Reader(path, ff.QUOTE, frozenset({"SPX"}), DAY, stats)
    kept = list(reader.rows())
    assert len(kept) == stats.rows["quotes_kept"]
    assert stats.rows["quotes_read"] == len(lines)
    assert stats.rows["quotes_kept"] + stats.rows["quotes_filtered_out"] + sum(
        stats.skipped.values()
    ) == len(lines)
