"""Symbol specs (schemas/symbols.py): defaults, overrides, root classification, labels,
widths from strike spacing, and what the chain decoding does with adjusted deliverables."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest

from processors.heatmap import grid as hm
from processors.heatmap.tile_builder import TileSettings
from schemas import massive_rest as mr
from schemas import symbols, ticker

EXP = dt.date(2026, 12, 18)


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    symbols.reset()
    yield
    symbols.reset()


def test_defaults_cover_the_issue_list() -> None:
    for sym in ("SPX", "NDX", "RUT", "XSP", "SPY", "QQQ", "IWM"):
        assert sym in symbols.DEFAULT_SPECS
    spx, spy = symbols.DEFAULT_SPECS["SPX"], symbols.DEFAULT_SPECS["SPY"]
    assert (spx.kind, spx.underlying, spx.exercise, spx.ws_market) == (
        "index",
        "I:SPX",
        "european",
        "indices",
    )
    assert (spy.kind, spy.underlying, spy.exercise, spy.ws_market) == (
        "equity",
        "SPY",
        "american",
        "stocks",
    )
    assert spx.settlement("SPX") == "AM" and spx.settlement("SPXW") == "PM"
    aapl = symbols.generic_equity("AAPL")
    assert (aapl.underlying, aapl.roots, aapl.multiplier) == ("AAPL", ("AAPL",), 100)
    assert aapl.widths == ()


def test_roots_resolve_to_their_underlying() -> None:
    reg = symbols.Registry()
    assert reg.symbol_of_root("SPXW") == "SPX"
    assert reg.symbol_of_root("NDXP") == "NDX"
    assert reg.symbol_of_root("RUTW") == "RUT"
    assert reg.symbol_of_root("VIXW") == "VIX"
    assert reg.symbol_of_root("AAPL") == "AAPL"
    assert reg.symbol_of_root("AAPL1") == "AAPL"  # adjusted after a corporate action
    assert ticker.parse("O:RUTW261218C02400000").symbol == "RUT"
    assert reg.symbol_of_underlying("I:SPX") == "SPX"
    assert reg.symbol_of_underlying("SPY") == "SPY"


def test_classify_standard_adjusted_other() -> None:
    aapl = symbols.generic_equity("AAPL")
    assert aapl.classify("AAPL") == symbols.STANDARD
    assert aapl.classify("AAPL1") == symbols.ADJUSTED
    assert aapl.classify("MSFT") is None
    assert aapl.standard_deliverable(100) and not aapl.standard_deliverable(150)
    rut = symbols.DEFAULT_SPECS["RUT"]
    assert rut.classify("RUTW") == symbols.STANDARD


def test_overrides_from_json_and_errors() -> None:
    raw = json.dumps(
        {
            "aapl": {"div_yield": 0.005, "widths": [2.5, 5]},
            "SPX": {"widths": "5,10"},
            "ZZZ": {"kind": "index"},
            "MSFT": {"root_pattern": "MSFT|MSFT7"},
        }
    )
    reg = symbols.load(raw, ("SPY", "AAPL"))
    assert reg.spec("AAPL").div_yield == 0.005 and reg.spec("AAPL").widths == (2.5, 5.0)
    assert reg.spec("SPX").widths == (5.0, 10.0) and reg.spec("SPX").am_roots == ("SPX",)
    assert reg.spec("ZZZ").underlying == "I:ZZZ"
    assert reg.symbol_of_root("MSFT7") == "MSFT"
    assert reg.spec("TSLA") == symbols.generic_equity("TSLA")
    for bad, what in (
        ("[1]", "JSON object"),
        ('{"AAPL": {"colour": 1}}', "unknown field"),
        ('{"AAPL": {"kind": "bond"}}', "kind"),
        ('{"AAPL": {"widths": [0]}}', "positive"),
        ("{not json", "not JSON"),
    ):
        with pytest.raises(symbols.SymbolSpecError, match=what):
            symbols.load(bad)


def test_labels_are_bounded_by_configuration() -> None:
    reg = symbols.load("", ("SPY", " aapl", "MSFT"))
    assert [reg.label(s) for s in ("SPY", "AAPL", "MSFT", "SPX", "GME", None)] == [
        "SPY",
        "AAPL",
        "MSFT",
        "SPX",
        "other",
        "other",
    ]


def test_widths_derived_from_strike_spacing() -> None:
    assert symbols.derive_widths([[100, 101, 102, 103], [100, 102.5, 105]]) == (
        1.0,
        2.0,
        3.0,
        4.0,
        5.0,
        10.0,
    )
    assert symbols.derive_widths([[180, 182.5, 185, 187.5, 190, 195]]) == (
        2.5,
        5.0,
        7.5,
        10.0,
        12.5,
        25.0,
    )
    assert symbols.derive_widths([[100]]) == ()
    cfg = TileSettings()
    assert cfg.widths("SPY") == (1, 2, 3, 4, 5, 10)
    assert cfg.widths("AAPL") == ()  # derived from the listed strikes by the grid
    cids = [ticker.encode("AAPL", EXP, r, k) for k in (190, 192.5, 195, 197.5, 200) for r in "CP"]
    grid = hm.build_grid("AAPL", "vertical", cids, cfg.widths("AAPL"), today=None, n_expiries=1)
    widths = sorted({s.width for s in grid.specs.values()})
    assert widths == [2.5, 5.0, 7.5, 10.0]  # 12.5 and 25 need strikes the chain lacks


def _item(cid: str, shares: float = 100, u: dict[str, Any] | None = None) -> bytes:
    t = ticker.parse(cid)
    return json.dumps(
        {
            "details": {
                "contract_type": "call" if t.right == "C" else "put",
                "exercise_style": "american",
                "expiration_date": t.expiry.isoformat(),
                "shares_per_contract": shares,
                "strike_price": t.strike,
                "ticker": cid,
            },
            "open_interest": 10,
            "underlying_asset": u or {"ticker": "AAPL", "price": 231.5},
        }
    ).encode()


def test_chain_items_adjusted_and_nonstandard_are_skipped_and_counted() -> None:
    std = ticker.encode("AAPL", EXP, "C", 230)
    adj = ticker.encode("AAPL1", EXP, "C", 230)
    other = ticker.encode("MSFT", EXP, "C", 430)
    body = b'{"status":"OK","request_id":"x","results":[%s]}' % b",".join(
        [_item(std), _item(adj), _item(std.replace("230", "235"), shares=150), _item(other)]
    )
    page = mr.parse_chain_page(body, "AAPL")
    assert [c.cid for c in page.contracts] == [std]
    assert page.contracts[0].shares == 100
    assert sorted(r.reason for r in page.rejections) == [
        mr.R_ADJUSTED,
        mr.R_ADJUSTED,
        mr.R_WRONG_UNDERLYING,
    ]
    assert page.underlying_value == 231.5  # a stock's underlying_asset.price


def test_chain_items_adjusted_kept_when_the_spec_says_so() -> None:
    symbols.configure('{"AAPL": {"adjusted": "keep"}}', ("AAPL",))
    adj = ticker.encode("AAPL1", EXP, "C", 230)
    body = b'{"status":"OK","request_id":"x","results":[%s]}' % _item(adj, shares=150)
    page = mr.parse_chain_page(body, "AAPL")
    assert [(c.cid, c.shares) for c in page.contracts] == [(adj, 150)]


def test_gex_multiplier_from_shares_per_contract_and_settlement_by_spec() -> None:
    from processors.gex import exposure as gex_math
    from schemas.messages import ChainContract, decode_gex_source, encode_gex_source

    assert gex_math.expiry_ns("2026-12-18", "RUT") < gex_math.expiry_ns("2026-12-18", "RUTW")
    assert gex_math.expiry_ns("2026-12-18", "AAPL") == gex_math.expiry_ns("2026-12-18", "SPXW")
    now_ns = gex_math.expiry_ns("2026-12-18", "AAPL") - 5 * 86400 * 10**9

    def chain(shares: float | None) -> dict[str, dict[str, float]]:
        cs = [
            ChainContract(
                ticker.encode("AAPL", EXP, r, k),
                EXP.isoformat(),
                k,
                r,
                iv=0.3,
                gamma=0.02,
                oi=1000.0,
                shares=shares,
            )
            for k in (220.0, 230.0, 240.0)
            for r in "CP"
        ]
        src = decode_gex_source(
            encode_gex_source(gex_math.source_from_contracts("AAPL", now_ns, 230.0, cs))
        )
        params = gex_math.Params(t_basis="clock", multiplier=100.0)
        ch = gex_math.prepare(gex_math.source_columns(src), now_ns, params, snap_spot=230.0)
        return gex_math.compute(ch, 230.0, params).items()

    std, mini, absent = chain(100.0), chain(10.0), chain(None)
    assert std == absent  # an absent shares_per_contract is the spec's multiplier
    assert std["230"]["calls"] == pytest.approx(0.02 * 1000 * 100)
    assert mini["230"]["calls"] == pytest.approx(std["230"]["calls"] / 10)


def test_a_bad_spec_fails_the_cli_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from processors.ops import cli

    monkeypatch.setenv("MASSIVE_SYMBOL_SPECS", '{"AAPL": {"colour": 1}}')
    symbols.reset()
    assert cli.main(["run", "hydrator"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "configuration error: MASSIVE_SYMBOL_SPECS.AAPL: unknown field 'colour'"


def test_a_process_takes_its_specs_from_its_settings_object(deps: Any) -> None:
    """No second reading of the environment: the processors' factory installs the registry
    from the RuntimeSettings it is given."""
    import dataclasses

    from processors.registry import load

    settings = dataclasses.replace(
        deps.settings, symbols=("AAPL",), symbol_specs='{"AAPL": {"adjusted": "keep"}}'
    )
    load("normalizer", dataclasses.replace(deps, settings=settings))
    reg = symbols.registry()
    assert reg.spec("AAPL").adjusted == "keep" and reg.label("AAPL") == "AAPL"
    load("normalizer", deps)  # another settings object: its specs (the defaults) again
    assert symbols.registry().spec("AAPL").adjusted == "skip"
