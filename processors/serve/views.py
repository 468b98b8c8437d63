"""View-scoped, compact SSE streams of the gateway (issue 15).

A **view** is what one dashboard panel shows: a model (``heatmap:<strategy>`` or ``gex``)
of one symbol, narrowed by :class:`ViewSpec` (expiry, right, strike range, widths for a
heatmap; ``all``/``0dte`` fields for GEX). No filter = the whole model.

The gateway keeps one :class:`Mirror` per (model, symbol) that has subscribers: the model
at its latest version, every item flattened to a list of values (``Shape``), kept current
from the shared diff feed. Each distinct view has one :class:`ViewFeed`: per model diff it
keeps the changed items of its own tiles, once, encodes one compact frame and hands that
same object to every subscriber. A model diff that changes nothing in a view (and not the
meta) produces no view diff.

Versions of a view: a view diff carries the model ``version`` it brings the view to and
``prev_version``/``prev_id`` = version and stream id of the previous view diff of that view
(or the view snapshot it follows), so a client checks ``prev_id == the id it holds`` exactly
as with whole-model diffs. A view snapshot's ``version``/``diff_id`` are those of the last
diff that changed the view (the view is identical at every model version up to the next).

Wire format (JSON in SSE ``data``; README "SSE wire format" has the same):

snapshot::

    {"symbol", "kind", "epoch", "version", "ts_ns", "diff_id",
     "view": {...the filters...}, "expiries": [all expiries of the model],
     "kt": key template, "f": [field names], "d": [[key, v1, v2, ...], ...],
     "o": {key: item, ...}, "meta": {...}}

diff::

    {"epoch", "version", "prev_version", "prev_id", "ts_ns", "src_recv_ts_ns",
     "c": [{"f": [field names], "d": [[key, v, ...], ...]}, ...],
     "o": {key: item}, "r": [removed keys], "meta": {...} (only when it changed)}

Items are flattened: field ``name`` is a top-level key, ``name.i.j`` element ``j`` of the
``i``-th array of an array of arrays (a tile's ``legs``). A ``c`` group lists the fields
that changed for its rows, in the group's field order; a row for a key the client does not
hold carries every field (such a group has ``"n": 1``: its rows replace whole items). ``o``
holds whole items that do not have the model's shape. Keys: the tile id with the parts
fixed by the view left out; ``kt`` is the id split on ``:`` with ``null`` where the key's
parts go, in order (a key starting with ``=`` is a whole id); no ``kt`` = keys are ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgspec

logger = logging.getLogger(__name__)

PartKey = tuple[str, str] | None  # (expiry, right) of a heatmap tile id; None otherwise
SEP = b"\r\n"

_json = msgspec.json.Encoder()
_decode_any = msgspec.json.Decoder()


# --- view specification ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ViewSpec:
    """Filters of a view; all None = the whole model."""

    expiry: str | None = None
    right: str | None = None
    strikes: tuple[float, float] | None = None
    widths: frozenset[float] | None = None
    scope: str | None = None  # gex: "all" | "0dte" (fields of that scope only)

    @property
    def rows_filtered(self) -> bool:
        return self.strikes is not None or self.widths is not None

    def covers(self, part: PartKey) -> bool:
        if self.expiry is None and self.right is None and not self.rows_filtered:
            return True
        if part is None:
            return False
        return (self.expiry is None or part[0] == self.expiry) and (
            self.right is None or part[1] == self.right
        )

    def keep(self, key: str) -> bool:
        """Strike range and widths of a heatmap tile id (covers() already held)."""
        try:
            strikes = [float(x) for x in key.split(":")[3].split("-")]
        except (IndexError, ValueError):
            return False
        if self.strikes is not None:
            lo, hi = self.strikes
            if strikes[0] < lo or strikes[-1] > hi:
                return False
        if self.widths is not None:
            width = strikes[1] - strikes[0] if len(strikes) > 1 else 0.0
            if width not in self.widths:
                return False
        return True

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.expiry is not None:
            out["expiry"] = self.expiry
        if self.right is not None:
            out["right"] = self.right
        if self.strikes is not None:
            out["strikes"] = list(self.strikes)
        if self.widths is not None:
            out["widths"] = sorted(self.widths)
        if self.scope is not None:
            out["expiry"] = self.scope
        return out


FRONT = "front"


def _num(s: str, what: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"bad {what} {s!r}") from None
    if v != v or v in (float("inf"), float("-inf")) or v < 0:
        raise ValueError(f"bad {what} {s!r}")
    return v


def parse_view(params: Mapping[str, str], gex: bool) -> ViewSpec:
    """Query parameters -> ViewSpec; ValueError (-> 400) for a malformed one."""
    expiry = (params.get("expiry") or "").strip()
    if gex:
        return _gex_view(params, expiry)
    right = (params.get("right") or "").strip().upper() or None
    if right not in (None, "C", "P"):
        raise ValueError(f"bad right {right!r} (C or P)")
    if expiry.lower() == "front":
        expiry = FRONT  # the model's first expiry, resolved when the stream opens
    elif expiry:
        _date(expiry)
    return ViewSpec(
        expiry or None,
        right,
        _strikes((params.get("strikes") or "").strip()),
        _widths((params.get("widths") or "").strip()),
    )


def _gex_view(params: Mapping[str, str], expiry: str) -> ViewSpec:
    for name in ("right", "strikes", "widths"):
        if params.get(name):
            raise ValueError(f"{name} is not a GEX filter")
    if not expiry:
        return ViewSpec()
    if expiry.lower() in ("all", "0dte"):
        return ViewSpec(scope=expiry.lower())
    _date(expiry)
    return ViewSpec(expiry=expiry)  # resolved against the model (today -> 0dte)


def _strikes(raw: str) -> tuple[float, float] | None:
    if not raw:
        return None
    lo_s, dash, hi_s = raw.partition("-")
    if not dash:
        raise ValueError(f"bad strikes {raw!r} (lo-hi)")
    lo, hi = _num(lo_s, "strike"), _num(hi_s, "strike")
    if lo > hi:
        raise ValueError(f"bad strikes {raw!r} (lo > hi)")
    return lo, hi


def _widths(raw: str) -> frozenset[float] | None:
    if not raw:
        return None
    widths = frozenset(_num(w, "width") for w in raw.split(",") if w.strip())
    if not widths:
        raise ValueError(f"bad widths {raw!r}")
    return widths


def _date(s: str) -> None:
    try:
        dt.date.fromisoformat(s)
    except ValueError:
        raise ValueError(f"bad expiry {s!r} (YYYY-MM-DD)") from None
    if len(s) != 10:
        raise ValueError(f"bad expiry {s!r} (YYYY-MM-DD)")


def heat_part(key: str) -> PartKey:
    p = key.split(":")
    return (p[1], p[4]) if len(p) == 5 else None


def gex_part(key: str) -> PartKey:
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection during a burst of allocations that makes no cycles (decoding and
    applying a diff of thousands of items): each one would traverse every object the
    process holds. Only around synchronous code (no await inside)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- flattened items ---------------------------------------------------------------------------
class Odd:
    """An item without the model's shape: sent whole."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Odd) and _same(self.obj, other.obj)

    __hash__ = None  # type: ignore[assignment]


REMOVED = None  # a removed key in a change list
# Rows are tuples: a tuple of plain values is untracked by the cyclic GC, so the ~100k rows of
# a mirror cost nothing to each full collection (lists would be traversed every time).
Row = tuple[Any, ...] | Odd
# a change: (field indexes, values) | a whole item | removed; tuples of plain values, so a
# view's history of changes (its ring, backlogs) is untracked by the cyclic GC too
Change = tuple[tuple[int, ...], tuple[Any, ...]] | Odd | None

_interned: dict[str, str] = {}


def flatten(obj: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """An item -> (signature, values); None when it is not a JSON object. Arrays of arrays
    (a tile's legs) are flattened one level, element by element; other arrays become tuples
    (the same JSON), so a row of plain values is untracked by the cyclic GC: a list in each
    of ~100k rows made every collection traverse them all."""
    if type(obj) is not dict:
        return None
    sig: list[Any] = []
    vals: list[Any] = []
    for k, v in obj.items():
        if type(v) is list and v and type(v[0]) is list:
            lens = []
            for sub in v:
                if type(sub) is not list:
                    return None
                lens.append(len(sub))
                for x in sub:
                    vals.append(_interned.setdefault(x, x) if type(x) is str and len(x) < 24 else x)
            sig.append((k, tuple(lens)))
        elif type(v) is list:  # a list of values (a tile's flags): a tuple, not GC-tracked
            vals.append(_tuple(v))
            sig.append(k)
        else:
            vals.append(_interned.setdefault(v, v) if type(v) is str and len(v) < 24 else v)
            sig.append(k)
    return tuple(sig), tuple(vals)


_interned_t: dict[tuple[str, ...], tuple[str, ...]] = {}


def _tuple(v: list[Any]) -> tuple[Any, ...]:
    """A list value as a tuple; a few strings (a tile's flags) as one tuple shared by every
    row that holds them. A new tuple inside a new row kept the row GC-tracked through its
    first collection (the collector untracks a tuple only once its items are): ~80k rows
    waited in the young generations, and each gen1 collection took ~50 ms."""
    if not v:
        return ()
    t = tuple(v)
    if len(t) < 8 and type(t[0]) is str:
        try:
            return _interned_t.setdefault(t, t)
        except TypeError:  # an unhashable item
            return t
    return t


def _intern(x: Any) -> Any:
    """Short strings (price sources, flags) shared by every item that holds them."""
    return _interned.setdefault(x, x) if type(x) is str and len(x) < 24 else x


def compile_flatten(
    sig: tuple[Any, ...], sample: tuple[Any, ...]
) -> Callable[[Any], tuple[Any, ...] | None]:
    """``flatten`` specialised to one shape: the values of an item of signature ``sig``, None
    for any other item (then ``flatten`` tells). Positions holding a string in ``sample``
    are interned, a list (``flatten`` made it a tuple) made a tuple."""
    keys = tuple(s[0] if isinstance(s, tuple) else s for s in sig)
    lines = ["def f(d):", "    if type(d) is not dict or len(d) != N or tuple(d) != KEYS:"]
    lines.append("        return None")
    vals: list[str] = []
    for n, s in enumerate(sig):
        if isinstance(s, tuple):
            k, lens = s
            lines.append(f"    a{n} = d[{k!r}]")
            lines.append(f"    if type(a{n}) is not list or len(a{n}) != {len(lens)}:")
            lines.append("        return None")
            for i, ln in enumerate(lens):
                lines.append(f"    b{n}_{i} = a{n}[{i}]")
                lines.append(f"    if type(b{n}_{i}) is not list or len(b{n}_{i}) != {ln}:")
                lines.append("        return None")
                vals += [f"b{n}_{i}[{j}]" for j in range(ln)]
        else:
            lines.append(f"    v{n} = d[{s!r}]")
            lines.append(f"    if type(v{n}) is list and v{n} and type(v{n}[0]) is list:")
            lines.append("        return None")
            vals.append(f"v{n}")
    vals = [
        f"(I({v}, {v}) if type({v}) is str and len({v}) < 24 else {v})"
        if type(x) is str
        else f"(T({v}) if type({v}) is list else {v})"
        if type(x) is tuple
        else v
        for v, x in zip(vals, sample, strict=True)
    ]
    lines.append(f"    return ({', '.join(vals)},)")
    scope: dict[str, Any] = {"N": len(keys), "KEYS": keys, "I": _interned.setdefault, "T": _tuple}
    # keys enter the source only as repr() literals
    exec("\n".join(lines), scope)
    return cast(Callable[[Any], tuple[Any, ...] | None], scope["f"])


def field_names(sig: tuple[Any, ...]) -> list[str]:
    out: list[str] = []
    for s in sig:
        if isinstance(s, tuple):
            k, lens = s
            out += [f"{k}.{i}.{j}" for i, n in enumerate(lens) for j in range(n)]
        else:
            out.append(s)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (1 and 1.0 and True differ on the wire)."""
    return type(a) is type(b) and a == b


def unflatten(names: list[str], vals: Iterable[Any]) -> dict[str, Any]:
    """The reader's side of ``flatten`` (tests)."""
    out: dict[str, Any] = {}
    for name, v in zip(names, vals, strict=True):
        set_field(out, name, v)
    return out


def set_field(item: dict[str, Any], name: str, v: Any) -> None:
    k, dot, rest = name.partition(".")
    if not dot:
        item[k] = v
        return
    i_s, _, j_s = rest.partition(".")
    i, j = int(i_s), int(j_s)
    arr = item.setdefault(k, [])
    while len(arr) <= i:
        arr.append([])
    sub = arr[i]
    while len(sub) <= j:
        sub.append(None)
    sub[j] = v


def row_change(old: Row | None, new: Row, n: int, all_idx: tuple[int, ...]) -> Change | bool:
    """The change from ``old`` to ``new``; False when nothing changed."""
    if type(new) is tuple:
        if type(old) is tuple:
            # one pass; ``a is b`` first: interned strings, small ints, shared flags
            idx = tuple(
                [
                    i
                    for i, (a, b) in enumerate(zip(old, new, strict=True))
                    if a is not b and (a != b or type(a) is not type(b))
                ]
            )
            return (idx, tuple([new[i] for i in idx])) if idx else False
        return (all_idx, new)
    assert isinstance(new, Odd)
    if isinstance(old, Odd) and old == new:
        return False
    return new


# --- frames ------------------------------------------------------------------------------------
def frame(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One SSE frame. ``data`` is single-line JSON (raw newlines in JSON are whitespace)."""
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r", b" ").replace(b"\n", b" ")
    head = b"" if event_id is None else b"id: " + event_id.encode() + SEP
    # One join: chained ``+`` copies a MB-sized ``data`` once per operand after it.
    return b"".join((head, b"event: ", event.encode(), SEP, b"data: ", data, SEP, SEP))


@dataclass(slots=True)
class ViewDiff:
    """One diff of a view, encoded once and shared by its subscribers. It does not keep its
    rows as objects: a view's history and its clients' backlogs would hold thousands of
    them per model diff, each traversed by the cyclic GC until it dies."""

    id: tuple[int, int]
    id_s: str
    version: int
    prev_version: int
    prev_id: str | None
    epoch: str
    ts_ns: int
    src_recv_ts_ns: int | None
    meta: bytes | None
    frame: bytes  # its rows are read back from it when a backlog is merged (``diff_rows``)


def encode_diff(
    names: list[str],
    epoch: str,
    version: int,
    prev_version: int,
    prev_id: str | None,
    ts_ns: int,
    src_recv_ts_ns: int | None,
    rows: Iterable[tuple[str, Change]],
    meta: bytes | None,
) -> bytes:
    groups: dict[tuple[int, ...], list[list[Any]]] = {}
    odd: dict[str, Any] = {}
    removed: list[str] = []
    for key, ch in rows:
        if ch is REMOVED:
            removed.append(key)
        elif isinstance(ch, Odd):
            odd[key] = ch.obj
        else:
            idx, vals = ch
            groups.setdefault(idx, []).append([key, *vals])
    body: dict[str, Any] = {
        "epoch": epoch,
        "version": version,
        "prev_version": prev_version,
        "prev_id": prev_id,
        "ts_ns": ts_ns,
    }
    if src_recv_ts_ns is not None:
        body["src_recv_ts_ns"] = src_recv_ts_ns
    n = len(names)
    body["c"] = [
        {"f": [names[i] for i in idx], "d": d, "n": 1}
        if len(idx) == n
        else {"f": [names[i] for i in idx], "d": d}
        for idx, d in groups.items()
    ]
    if odd:
        body["o"] = odd
    if removed:
        body["r"] = removed
    if meta is not None:
        body["meta"] = msgspec.Raw(meta)
    return _json.encode(body)


_decode_diff = msgspec.json.Decoder()


def diff_rows(vd: ViewDiff, names: list[str]) -> list[tuple[str, Change]]:
    """The rows of a view diff, read back from its frame (``names``: the view's fields)."""
    data = vd.frame[vd.frame.index(b"data: ") + 6 : len(vd.frame) - 2 * len(SEP)]
    body = _decode_diff.decode(data)
    pos = {name: i for i, name in enumerate(names)}
    rows: list[tuple[str, Change]] = []
    for g in body.get("c", ()):
        idx = tuple([pos[name] for name in g["f"]])
        rows += [(row[0], (idx, tuple(row[1:]))) for row in g["d"]]
    rows += [(key, Odd(obj)) for key, obj in body.get("o", {}).items()]
    rows += [(key, REMOVED) for key in body.get("r", ())]
    return rows


def conflate(diffs: list[ViewDiff], names: list[str]) -> ViewDiff:
    """One diff frame equal to applying ``diffs`` in order (merged per item and field)."""
    acc: dict[str, dict[int, Any] | Odd | None] = {}
    for vd in diffs:
        for key, ch in diff_rows(vd, names):
            if ch is REMOVED or isinstance(ch, Odd):
                acc[key] = ch
                continue
            idx, vals = ch
            cur = acc.get(key)
            if isinstance(cur, dict):
                cur.update(zip(idx, vals, strict=True))
            else:  # new, or after a removal / a whole item: a row with every field
                acc[key] = dict(zip(idx, vals, strict=True))
    rows: list[tuple[str, Change]] = []
    for key, c in acc.items():
        if isinstance(c, dict):
            idx = tuple(sorted(c))
            rows.append((key, (idx, tuple([c[i] for i in idx]))))
        else:
            rows.append((key, c))
    first, last = diffs[0], diffs[-1]
    meta = next((d.meta for d in reversed(diffs) if d.meta is not None), None)
    body = encode_diff(
        names,
        last.epoch,
        last.version,
        first.prev_version,
        first.prev_id,
        last.ts_ns,
        last.src_recv_ts_ns,
        rows,
        meta,
    )
    return ViewDiff(
        last.id,
        last.id_s,
        last.version,
        first.prev_version,
        first.prev_id,
        last.epoch,
        last.ts_ns,
        last.src_recv_ts_ns,
        meta,
        frame("diff", body, last.id_s),
    )


# --- subscribers -------------------------------------------------------------------------------
class Subscriber:
    """One client of a view: references to the shared view diffs it has not been sent yet,
    bounded in bytes; beyond the bound it is marked for a fresh snapshot (resync)."""

    __slots__ = (
        "closed",
        "head",
        "max_bytes",
        "need_snapshot",
        "pending",
        "pending_bytes",
        "reason",
        "wake",
    )

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.pending: list[ViewDiff] = []
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        self.need_snapshot = True
        self.reason = ""
        self.closed = False
        self.head: str | None = None  # id of the last view diff (or snapshot) sent

    def push(self, vd: ViewDiff) -> bool:
        if self.need_snapshot:
            return True
        self.pending.append(vd)
        self.pending_bytes += len(vd.frame)
        self.wake.set()
        return self.pending_bytes <= self.max_bytes or len(self.pending) == 1

    def resync(self, reason: str) -> None:
        self.pending = []
        self.pending_bytes = 0
        self.need_snapshot = True
        self.reason = reason
        self.wake.set()

    def take(self) -> list[ViewDiff]:
        out = self.pending
        self.pending = []
        self.pending_bytes = 0
        return out

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    async def woken(self, timeout_s: float) -> bool:
        """Wait for the next wake-up (the model loaded, a resync, close); False on timeout."""
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # no task per wait (wait_for makes one)
                await self.wake.wait()
        return self.wake.is_set()

    async def wait(self, timeout_s: float | None = None) -> None:
        if self.pending or self.closed:
            return
        self.wake.clear()
        if timeout_s is None:
            await self.wake.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):  # no task per wait (wait_for makes one)
                    await self.wake.wait()


# --- the mirror of one model and its views -----------------------------------------------------
class Part:
    """The items of one partition: flattened rows while a view covers it (``hot``), else
    their JSON as published (``cold``: a diff's items are stored, not decoded)."""

    __slots__ = ("cold", "hot", "items")

    def __init__(self, hot: bool) -> None:
        self.hot = hot
        self.items: dict[str, Row] = {}
        self.cold: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self.items) + len(self.cold)


def _all_parts(pk: PartKey) -> bool:
    return True


class Model:
    """A model held by partition (heatmap: expiry x right): flattened where a view looks
    (``wants``), raw JSON elsewhere, flattened when a view first covers it."""

    def __init__(
        self, part_of: Callable[[str], PartKey], wants: Callable[[PartKey], bool] = _all_parts
    ) -> None:
        self.part_of = part_of
        self.wants = wants
        self.parts: dict[PartKey, Part] = {}
        self.sig: tuple[Any, ...] | None = None
        self.names: list[str] = []
        self.all_idx: tuple[int, ...] = ()
        self.epoch = ""
        self.version = 0
        self.head: str | None = None
        self.head_sid: tuple[int, int] = (0, 0)
        self.ts_ns = 0
        self.meta = b"{}"
        self._fast: Callable[[Any], tuple[Any, ...] | None] | None = None
        # partition of every key (parsed once; partition tuples shared)
        self._where: dict[str, PartKey | bool] = {}
        self._pks: dict[PartKey, PartKey] = {}

    def _row(self, obj: Any) -> Row:
        fast = self._fast
        if fast is not None:
            vals = fast(obj)
            if vals is not None:
                return vals
        flat = flatten(obj)
        if flat is None:
            return Odd(obj)
        sig, vals = flat
        if self.sig is None:
            self.sig = sig
            self.names = field_names(sig)
            self.all_idx = tuple(range(len(self.names)))
            self._fast = compile_flatten(sig, vals)
        return vals if sig == self.sig else Odd(obj)

    def _part_key(self, key: str) -> PartKey:
        pk = self._where.get(key, False)
        if pk is False:
            pk = self.part_of(key)
            pk = self._where[key] = self._pks.setdefault(pk, pk)
        return cast(PartKey, pk)

    def set(self, key: str, obj: Any) -> tuple[PartKey, Change | bool]:
        """``obj``: the item, or its JSON (``msgspec.Raw``, bytes)."""
        pk = self._part_key(key)
        part = self.parts.get(pk)
        if part is None:
            part = self.parts[pk] = Part(self.wants(pk))
        if not part.hot:  # nobody looks: keep the JSON (a copy: a Raw pins its whole diff)
            part.cold[key] = (
                bytes(obj) if isinstance(obj, (msgspec.Raw, bytes)) else _json.encode(obj)
            )
            return pk, False
        if isinstance(obj, (msgspec.Raw, bytes)):
            obj = _decode_any.decode(obj)
        new = self._row(obj)
        old = part.items.get(key)
        part.items[key] = new
        return pk, row_change(old, new, len(self.names), self.all_idx)

    def remove(self, key: str) -> tuple[PartKey, bool]:
        pk = self._part_key(key)
        del self._where[key]
        part = self.parts.get(pk)
        if part is None:
            return pk, False
        had = part.items.pop(key, None) is not None or part.cold.pop(key, None) is not None
        if not part:
            del self.parts[pk]
        return pk, had and part.hot

    def heat(self, covers: Callable[[PartKey], bool]) -> int:
        """Flatten the cold partitions ``covers`` selects (a view was added); the number of
        items flattened."""
        n = 0
        for pk, part in self.parts.items():
            if part.hot or not covers(pk):
                continue
            with gc_paused():
                for key, raw in part.cold.items():
                    part.items[key] = self._row(_decode_any.decode(raw))
            n += len(part.cold)
            part.cold = {}
            part.hot = True
        return n

    def expiries(self) -> list[str]:
        return sorted({pk[0] for pk in self.parts if pk is not None})

    def n_items(self) -> int:
        return sum(len(p) for p in self.parts.values())


def apply_changes(
    m: Model, changed: Mapping[str, Any], removed: Iterable[str]
) -> dict[PartKey, list[tuple[str, Change]]]:
    """Apply a model diff's items (objects, or their JSON) to ``m``; the effective changes
    of its flattened partitions, by partition."""
    out: dict[PartKey, list[tuple[str, Change]]] = {}
    for key, obj in changed.items():
        pk, ch = m.set(key, obj)
        if ch is not False:
            out.setdefault(pk, []).append((key, cast(Change, ch)))
    for key in removed:
        pk, had = m.remove(key)
        if had:
            out.setdefault(pk, []).append((key, REMOVED))
    return out


def merge_diff(
    changed: dict[str, Any],
    removed: set[str],
    d_changed: Mapping[str, Any],
    d_removed: Iterable[str],
) -> None:
    """Fold the next model diff's items into ``changed``/``removed`` (in place), so that
    ``apply_changes(m, changed, removed)`` equals applying both diffs in order."""
    if removed:
        removed.difference_update(d_changed)
    changed.update(d_changed)
    for k in d_removed:  # within one diff a removal wins (apply_changes' order)
        changed.pop(k, None)
        removed.add(k)


GEX_0DTE_KEEP = ("strike", "n")
_MERGED_KEPT = 8  # merged backlogs kept per view (subscribers a few diffs apart)


class ViewFeed:
    """One distinct view of a mirror: its version chain, recent diffs (resume), the encoded
    snapshot of its current version, and its subscribers."""

    def __init__(
        self,
        spec: ViewSpec,
        model: Model,
        kind: str,
        symbol: str,
        strategy: str | None,
        history_bytes: int,
        pending_max_bytes: int,
    ) -> None:
        self.spec = spec
        self.model = model
        self.kind = kind
        self.symbol = symbol
        self.strategy = strategy
        self.history_bytes = history_bytes
        self.pending_max_bytes = pending_max_bytes
        self.subs: set[Subscriber] = set()
        self.ring: deque[ViewDiff] = deque()
        self.ring_bytes = 0
        self.version = 0
        self.head: str | None = None
        self.ts_ns = 0
        self.epoch = ""
        self.snap: tuple[str | None, bytes] | None = None
        self.filled = True  # False: a derived view (GEX by date) before its first content
        # backlogs merged for slow subscribers, by (prev_id of the first, id of the last):
        # the subscribers of a view fall behind together, so one merge serves them all
        self._merged: dict[tuple[str | None, str], ViewDiff] = {}
        self.idle_since = 0.0
        self._proj: tuple[int, ...] | None = None
        self._proj_sig: tuple[Any, ...] | None = None
        self._pos: dict[int, int] = {}
        self._names: list[str] = []
        # key template: heatmap ids are SYM:EXPIRY:STRATEGY:STRIKES:RIGHT
        self.kt: list[str | None] | None = None
        self._free: tuple[int, ...] = ()
        self._pre: str | None = None
        self._suf = ""
        if strategy is not None:
            self.kt = [symbol, spec.expiry, strategy, None, spec.right]
            self._free = tuple(i for i, p in enumerate(self.kt) if p is None)
            if spec.expiry is not None:
                self._pre = f"{symbol}:{spec.expiry}:{strategy}:"
            if spec.right is not None:
                self._suf = ":" + spec.right

    # -- keys and fields --
    def short(self, key: str) -> str:
        """The key of a tile id in this view (see the module doc)."""
        kt = self.kt
        if kt is None:
            return key
        pre, suf = self._pre, self._suf
        if pre is not None:  # expiry fixed: SYM:EXPIRY:STRATEGY: + STRIKES[:RIGHT]
            if key.startswith(pre) and key.endswith(suf):
                rest = key[len(pre) : len(key) - len(suf)]
                if rest.count(":") == (0 if suf else 1):
                    return rest
            return "=" + key
        p = key.split(":")
        if len(p) != 5 or p[0] != kt[0] or p[2] != kt[2] or (suf and ":" + p[4] != suf):
            return "=" + key
        return ":".join([p[i] for i in self._free])

    def _projection(self) -> tuple[int, ...] | None:
        """Field indexes of a GEX scope (None: every field)."""
        m = self.model
        if self.spec.scope is None:
            self._names = m.names
            return None
        if self._proj_sig is not m.sig:
            zero = self.spec.scope == "0dte"
            self._proj = tuple(
                i
                for i, name in enumerate(m.names)
                if name in GEX_0DTE_KEEP or (("_0dte" in name) == zero)
            )
            self._names = [m.names[i] for i in self._proj]
            self._pos = {i: n for n, i in enumerate(self._proj)}
            self._proj_sig = m.sig
        return self._proj

    @property
    def names(self) -> list[str]:
        self._projection()
        return self._names

    # -- lifecycle --
    def reset(self, reason: str) -> int:
        """The mirror was (re)loaded: the chain restarts at its state; every subscriber
        gets a fresh snapshot. Returns how many were resynced."""
        m = self.model
        self.ring.clear()
        self.ring_bytes = 0
        self.version, self.head, self.ts_ns, self.epoch = m.version, m.head, m.ts_ns, m.epoch
        self.snap = None
        self._merged.clear()
        n = 0
        for sub in self.subs:
            if not sub.need_snapshot:
                n += 1
            sub.resync(reason)
        return n

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.pending_max_bytes)
        self.subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber, now: float) -> None:
        self.subs.discard(sub)
        if not self.subs:
            self.idle_since = now

    # -- per model diff --
    def on_diff(
        self,
        sid: tuple[int, int],
        id_s: str,
        ts_ns: int,
        src_recv_ts_ns: int | None,
        changes: Mapping[PartKey, list[tuple[str, Change]]],
        meta: bytes | None,
    ) -> ViewDiff | None:
        spec = self.spec
        proj = self._projection()
        rows: list[tuple[str, Change]] = []
        for pk, lst in changes.items():
            if not spec.covers(pk):
                continue
            for key, ch in lst:
                if spec.rows_filtered and not spec.keep(key):
                    continue
                if proj is not None and isinstance(ch, tuple):
                    pos = self._pos
                    idx, vals = ch
                    sel = [(pos[i], v) for i, v in zip(idx, vals, strict=True) if i in pos]
                    if not sel:
                        continue
                    ch = (tuple([i for i, _ in sel]), tuple([v for _, v in sel]))
                rows.append((self.short(key), ch))
        if not rows and meta is None:
            return None
        m = self.model
        body = encode_diff(
            self._names,
            m.epoch,
            m.version,
            self.version,
            self.head,
            ts_ns,
            src_recv_ts_ns,
            rows,
            meta,
        )
        vd = ViewDiff(
            sid,
            id_s,
            m.version,
            self.version,
            self.head,
            m.epoch,
            ts_ns,
            src_recv_ts_ns,
            meta,
            frame("diff", body, id_s),
        )
        self.version, self.head, self.ts_ns = m.version, id_s, ts_ns
        self.snap = None
        self.ring.append(vd)
        self.ring_bytes += len(vd.frame)
        while self.ring and self.ring_bytes > self.history_bytes:
            self.ring_bytes -= len(self.ring.popleft().frame)
        return vd

    def merged(self, diffs: list[ViewDiff]) -> ViewDiff:
        """``conflate(diffs)``, computed once for every subscriber with the same backlog (a
        backlog is a run of this view's chain: its ends identify it)."""
        key = (diffs[0].prev_id, diffs[-1].id_s)
        vd = self._merged.get(key)
        if vd is None:
            vd = self._merged[key] = conflate(diffs, self.names)
            while len(self._merged) > _MERGED_KEPT:
                del self._merged[next(iter(self._merged))]
        return vd

    def replay_after(self, last: str) -> list[ViewDiff] | None:
        """The view diffs after id ``last`` (still in the recent history), or None."""
        if last == self.head:
            return []
        ring = self.ring
        if ring and last == ring[0].prev_id:
            return list(ring)
        for i, vd in enumerate(ring):
            if vd.id_s == last:
                return list(ring)[i + 1 :]
        return None

    # -- snapshot --
    def snapshot(self) -> bytes:
        """The encoded snapshot of the view's current version (built once per version)."""
        if self.snap is not None and self.snap[0] == self.head:
            return self.snap[1]
        m, spec = self.model, self.spec
        proj = self._projection()
        rows: list[list[Any]] = []
        odd: dict[str, Any] = {}
        for pk, part in m.parts.items():
            if not spec.covers(pk):
                continue
            for key, row in part.items.items():
                if spec.rows_filtered and not spec.keep(key):
                    continue
                if type(row) is tuple:
                    vals = row if proj is None else [row[i] for i in proj]
                    rows.append([self.short(key), *vals])
                else:
                    assert isinstance(row, Odd)
                    odd[self.short(key)] = row.obj
        body: dict[str, Any] = {
            "symbol": self.symbol,
            "kind": self.kind,
            "epoch": m.epoch,
            "version": self.version,
            "ts_ns": self.ts_ns,
            "diff_id": self.head,
            "view": spec.as_json(),
            "expiries": m.expiries(),
        }
        if self.kt is not None:
            body["kt"] = self.kt
        body |= {"f": self._names, "d": rows, "o": odd, "meta": msgspec.Raw(m.meta)}
        data = frame("snapshot", _json.encode(body), self.head)
        self.snap = (self.head, data)
        return data


def decode_any(raw: bytes) -> Any:
    return _decode_any.decode(raw)
