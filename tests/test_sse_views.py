"""Views and the compact wire format without a server (processors/serve/views.py): applying a
view's compact snapshot and diffs (tests/sse_client.py's reader, as the page does) gives the
full model filtered to the view; a merged (conflated) backlog gives the same, and so do model
diffs merged into one view diff (a reader behind); a slow subscriber is merged, then
resynced."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.serve.views import (
    Model,
    ViewFeed,
    ViewSpec,
    apply_changes,
    conflate,
    heat_part,
    merge_diff,
    parse_view,
)
from tests.sse_client import ViewReader

SYM, STRAT = "SPX", "butterfly"
EXPIRIES = ("2026-12-01", "2026-12-02", "2026-12-05")
STRIKES = (6000.0, 6005.0, 6010.0, 6020.0, 6030.0)


def tile_id(expiry: str, lo: float, width: float, right: str) -> str:
    ks = (lo, lo + width, lo + 2 * width)
    return f"{SYM}:{expiry}:{STRAT}:{'-'.join(f'{k:g}' for k in ks)}:{right}"


ids = st.builds(
    tile_id,
    st.sampled_from(EXPIRIES),
    st.sampled_from(STRIKES),
    st.sampled_from((5.0, 10.0)),
    st.sampled_from("CP"),
)
num = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False), st.integers(-5, 5))
leg = st.tuples(st.sampled_from((1, -2)), num, st.sampled_from(("mid", "last", "none"))).map(list)
tile = st.fixed_dictionaries(
    {
        "legs": st.lists(leg, min_size=3, max_size=3),
        "debit": num,
        "r2r": num,
        "tradable": st.booleans(),
        "px_src": st.sampled_from(("mid", "mixed")),
        "flags": st.lists(st.sampled_from(("stale_quote", "zero_debit")), max_size=2),
    }
)
# items without the model's shape: sent whole (JSON integers: 64-bit, as msgspec reads them)
odd = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.fixed_dictionaries({"legs": st.just([]), "debit": num})
)
item = st.one_of(tile, tile, tile, odd)
diff = st.tuples(
    st.dictionaries(ids, item, max_size=12),
    st.lists(ids, max_size=3),
    st.one_of(st.none(), st.fixed_dictionaries({"n": st.integers(0, 3)})),
)
VIEWS = (
    ViewSpec(),
    ViewSpec(expiry=EXPIRIES[0], right="C"),
    ViewSpec(right="P"),
    ViewSpec(expiry=EXPIRIES[1]),
    ViewSpec(strikes=(6005.0, 6030.0)),
    ViewSpec(expiry=EXPIRIES[2], right="C", widths=frozenset({10.0})),
)


def in_view(spec: ViewSpec, key: str) -> bool:
    return spec.covers(heat_part(key)) and (not spec.rows_filtered or spec.keep(key))


def data_of(frame: bytes) -> tuple[str, bytes]:
    """(id, data) of one SSE frame."""
    eid, data = "", b""
    for line in frame.split(b"\r\n"):
        if line.startswith(b"id: "):
            eid = line[4:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]
    return eid, data


def as_json(items: dict[str, Any]) -> dict[str, msgspec.Raw]:
    """Items as the gateway gets them from a diff entry."""
    return {k: msgspec.Raw(msgspec.json.encode(v)) for k, v in items.items()}


def feed(spec: ViewSpec, model: Model) -> ViewFeed:
    v = ViewFeed(spec, model, f"heatmap:{STRAT}", SYM, STRAT, 1 << 30, 1 << 30)
    v.reset("")
    return v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.dictionaries(ids, item, max_size=25),
    diffs=st.lists(diff, max_size=12),
    vi=st.sampled_from(range(len(VIEWS))),
    later=st.tuples(st.sampled_from(range(len(VIEWS))), st.integers(0, 12)),
)
def test_compact_view_diffs_applied_to_the_view_snapshot_equal_the_filtered_model(
    initial: dict[str, Any],
    diffs: list[tuple[dict[str, Any], list[str], dict[str, Any] | None]],
    vi: int,
    later: tuple[int, int],
) -> None:
    """Also: only the partitions a view covers are flattened (items arrive as JSON, as
    from the diff stream); a view added after ``later[1]`` diffs flattens its own."""
    spec = VIEWS[vi]
    specs = [spec]
    model = Model(heat_part, lambda pk: any(s.covers(pk) for s in specs))
    model.epoch, model.version, model.head = "e1", 1, "1-0"
    truth: dict[str, Any] = {}
    apply_changes(model, as_json(initial), [])
    truth.update(initial)
    view = feed(spec, model)
    reader = ViewReader()
    reader.snapshot(data_of(view.snapshot())[1])
    base = ViewReader()
    base.snapshot(data_of(view.snapshot())[1])
    # the same diffs merged before they are applied (a reader behind), to a copy of the model
    batch = ViewReader()
    batch.snapshot(data_of(view.snapshot())[1])
    model_b = Model(heat_part, lambda pk: spec.covers(pk))
    model_b.epoch, model_b.version, model_b.head = "e1", 1, "1-0"
    apply_changes(model_b, as_json(initial), [])
    batched = feed(spec, model_b)
    acc: dict[str, Any] = {}
    acc_removed: set[str] = set()
    batch_meta = None
    sent = []
    second: ViewFeed | None = None
    for i, (changed, removed, meta) in enumerate(diffs):
        if i == later[1]:
            specs.append(VIEWS[later[0]])
            model.heat(VIEWS[later[0]].covers)
            second = feed(VIEWS[later[0]], model)
        changes = apply_changes(model, as_json(changed), removed)
        truth.update(changed)
        for k in removed:
            truth.pop(k, None)
        meta_b = None
        if meta is not None:
            meta_b = str(meta).replace("'", '"').encode()
            if meta_b == model.meta:
                meta_b = None
            else:
                model.meta = meta_b
        model.version, model.head = i + 2, f"{i + 2}-0"
        merge_diff(acc, acc_removed, as_json(changed), removed)
        batch_meta = meta_b or batch_meta
        vd = view.on_diff((i + 2, 0), model.head, i, None, changes, meta_b)
        if vd is not None:
            sent.append(vd)
            reader.diff(*reversed(data_of(vd.frame)))
    want = {k: v for k, v in truth.items() if in_view(spec, k)}
    assert reader.model is not None and reader.model["items"] == want
    assert reader.model["version"] == view.version <= model.version
    # a fresh snapshot of the view says the same
    fresh = ViewReader().snapshot(data_of(view.snapshot())[1])
    assert fresh["items"] == want and fresh["version"] == view.version
    if second is not None:
        other = ViewReader().snapshot(data_of(second.snapshot())[1])
        assert other["items"] == {k: v for k, v in truth.items() if in_view(second.spec, k)}
    # the model diffs merged into one view diff, applied to the first snapshot, too
    changes = apply_changes(model_b, acc, acc_removed)
    model_b.version, model_b.head = model.version, model.head
    one = batched.on_diff((99, 0), model.head or "", 0, None, changes, batch_meta)
    if one is not None:
        batch.diff(*reversed(data_of(one.frame)))
    assert batch.model is not None and batch.model["items"] == want
    # the backlog merged into one diff, applied to the first snapshot, too
    if sent:
        merged = conflate(sent, view.names)
        base.diff(*reversed(data_of(merged.frame)))
        assert base.model is not None and base.model["items"] == want
        # a view is resumable from any id it sent
        assert view.replay_after(sent[0].id_s) == sent[1:]
        assert view.replay_after(sent[0].prev_id or "") == sent


def test_compact_diff_is_small_per_changed_tile() -> None:
    """A typical tile change (one leg's price and the numbers derived from it) in a view."""
    model = Model(heat_part)
    model.epoch, model.version, model.head = "e1", 1, "1-0"

    def tile_view(px: float) -> dict[str, Any]:
        return {
            "legs": [[1, round(px, 2), "mid"], [-2, 12.35, "mid"], [1, 7.05, "mid"]],
            "debit": round(px - 17.65, 2),
            "debit_natural": round(px - 17.0, 2),
            "max_profit": round(27.65 - px, 2),
            "max_loss": round(px - 17.65, 2),
            "r2r": round((27.65 - px) / (px - 17.65), 4),
            "convexity": round(1 - (px - 17.65) / 10, 4),
            "tradable": True,
            "age_s": 1,
            "stale": False,
            "px_src": "mid",
            "src": "ws",
            "flags": [],
        }

    keys = [tile_id(EXPIRIES[0], 5800.0 + 5 * i, 10.0, "C") for i in range(200)]
    apply_changes(model, {k: tile_view(20.15 + i / 100) for i, k in enumerate(keys)}, [])
    view = feed(ViewSpec(expiry=EXPIRIES[0], right="C"), model)
    changes = apply_changes(model, {k: tile_view(20.55 + i / 100) for i, k in enumerate(keys)}, [])
    vd = view.on_diff((2, 0), "2-0", 0, None, changes, None)
    assert vd is not None
    per_tile = len(vd.frame) / len(keys)
    print(f"compact bytes per changed tile: {per_tile:.1f}")
    assert per_tile <= 80, per_tile


def test_slow_subscriber_backlog_is_merged_then_resynced() -> None:
    model = Model(heat_part)
    model.epoch, model.version, model.head = "e1", 1, "1-0"
    keys = [tile_id(EXPIRIES[0], 6000.0, 5.0, "C"), tile_id(EXPIRIES[0], 6005.0, 5.0, "C")]
    apply_changes(model, {k: {"v": 0, "w": 0} for k in keys}, [])
    view = feed(ViewSpec(), model)
    reader = ViewReader()
    reader.snapshot(data_of(view.snapshot())[1])
    sub = view.subscribe()
    sub.need_snapshot = False
    sub.max_bytes = 1000
    merges = 0
    for i in range(2, 60):  # the same two tiles over and over: the merged backlog stays small
        model.version, model.head = i, f"{i}-0"
        changes = apply_changes(model, {keys[i % 2]: {"v": i, "w": 0}}, [])
        vd = view.on_diff((i, 0), model.head, i, None, changes, None)
        assert vd is not None
        if not sub.push(vd):
            merged = conflate(sub.take(), view.names)
            merges += 1
            assert len(merged.frame) <= sub.max_bytes
            sub.pending, sub.pending_bytes = [merged], len(merged.frame)
    assert merges > 0 and not sub.need_snapshot
    for vd in sub.take():
        reader.diff(*reversed(data_of(vd.frame)))
    assert reader.model is not None and reader.model["version"] == 59
    assert reader.model["items"] == {keys[0]: {"v": 58, "w": 0}, keys[1]: {"v": 59, "w": 0}}


@pytest.mark.parametrize(
    ("params", "gex", "want"),
    [
        ({}, False, ViewSpec()),
        ({"expiry": "2026-12-01", "right": "c"}, False, ViewSpec("2026-12-01", "C")),
        ({"strikes": "6000-6100", "widths": "5,10"}, False, None),
        ({"expiry": "0dte"}, True, ViewSpec(scope="0dte")),
        ({"expiry": "front"}, False, ViewSpec(expiry="front")),
    ],
)
def test_parse_view(params: dict[str, str], gex: bool, want: ViewSpec | None) -> None:
    got = parse_view(params, gex)
    if want is not None:
        assert got == want
    else:
        assert got.strikes == (6000.0, 6100.0) and got.widths == frozenset({5.0, 10.0})


@pytest.mark.parametrize(
    ("params", "gex"),
    [
        ({"right": "X"}, False),
        ({"expiry": "2026-13-01"}, False),
        ({"strikes": "6100-6000"}, False),
        ({"strikes": "abc"}, False),
        ({"widths": "-5"}, False),
        ({"right": "C"}, True),
        ({"expiry": "tomorrow"}, True),
    ],
)
def test_parse_view_rejects(params: dict[str, str], gex: bool) -> None:
    with pytest.raises(ValueError, match=r"bad|not a GEX"):
        parse_view(params, gex)
