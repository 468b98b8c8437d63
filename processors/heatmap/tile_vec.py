"""Vectorised tile math: the staging values of a whole batch of tiles at once (numpy), the
production path of the tile builders. Byte-equal to ``heatmap.staged_value`` tile by tile
(a hypothesis test holds them equal); the rules and formulas are in processors/heatmap/grid.py.

Why: at 5,000 WS events/s a spread builder recomputes 10-15k tiles per batch, and the
per-tile Python of ``staged_value`` (~9 us per tile on the benchmark VM) was two thirds of
the builder's CPU and most of the tick-to-SSE latency of the vertical and butterfly heatmaps.
Here one batch is a few dozen numpy operations over (tiles x legs) arrays, plus one
formatting pass per tile; numbers are rendered by msgspec (one encode per column, split on
commas), so they are the exact bytes the reference encoder writes.

``TileTable`` is the array form of one ``heatmap.Grid`` (fixed for an epoch): a row per tile,
the leg -> contract index matrix in the spec's leg order (the debit is summed in that order,
as the reference does, for identical floats) and the permutation to strike order (the
published leg order), plus per-contract quote arrays that each batch refreshes for the
contracts it read. Values outside what the arrays hold exactly (negative or huge
timestamps, non-finite results) send the batch through the reference path instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from processors.heatmap import grid as hm
from schemas.heatmap import NS_PER_S

_enc = msgspec.json.Encoder()
_NAN = float("nan")
# Leg price source codes -> published names.
_MID, _LAST, _STALE, _NONE = 0, 1, 2, 3
_SRC_NAMES = np.array([b"mid", b"last", b"mid_stale", b"none"], dtype=object)
_PX_SRC = np.array([b"mid", b"last", b"mixed", b"none"], dtype=object)
_WS = np.array([b"chain", b"ws"], dtype=object)
_BOOL = np.array([b"false", b"true"], dtype=object)
# Flag bits, in the order the reference lists them (heatmap.FLAG_ORDER), then no_price.
_F_STALE, _F_ABOVE, _F_BELOW, _F_MID_ABOVE, _F_MID_BELOW, _F_ZERO = (1 << i for i in range(6))
_F_NOPRICE = 64
_FLAG_NAMES = tuple((1 << i, name) for i, name in enumerate(hm.FLAG_ORDER))
_N_FLAGS = 128
_FLAGS = np.array(
    [
        _enc.encode(["no_price"] if m & _F_NOPRICE else [n for b, n in _FLAG_NAMES if m & b])
        for m in range(_N_FLAGS)
    ],
    dtype=object,
)
# Below this many tiles the per-tile reference is faster (measured crossover ~80 tiles).
SMALL_BATCH = 64
# Tiles per vectorised pass. Its temporaries (the (n, legs) arrays and the byte pieces each
# row is joined from) are ~3.8 KB a butterfly tile: a full-build or re-seed chunk of 4,096
# tiles traced +15.7 MB in one pass and +4.2 MB in passes of 1,024, at the same speed; the
# builder's RSS rose by about that much in a build and after a large dirty batch.
COMPUTE_ROWS = 1024
# Timestamps and admission sums must fit the integer arrays exactly.
_TS_MAX = 2**61  # ns: year 2043; 3 legs x 2 timestamps sum below 2**64 (uint64)

IntArr = npt.NDArray[np.int64]
FloatArr = npt.NDArray[np.float64]
BoolArr = npt.NDArray[np.bool_]


def _col(values: FloatArr | list[int | None]) -> list[bytes]:
    """Each value as the JSON the reference encoder writes (NaN / None -> null)."""
    seq = values.tolist() if isinstance(values, np.ndarray) else values
    if not seq:
        return []
    return _enc.encode(seq)[1:-1].split(b",")


def _r6(x: FloatArr) -> FloatArr:
    out: FloatArr = np.floor(x * 1e6 + 0.5) / 1e6  # heatmap._r6, elementwise
    return out


QuoteRow = tuple[float, float, int, int, int, int, int, int, int, float, float, int]


def quote_row(q: hm.LegQuote | None) -> QuoteRow:
    """(mid, last, quote_ts, trade_ts, ts_ns, present, has mid, has quote_ts, bits, bid, ask,
    quote_rx) of one contract; bits: 1 has last, 2 src == ws. Absent numbers are NaN / 0."""
    if q is None:
        return _NAN, _NAN, 0, 0, 0, 0, 0, 0, 0, _NAN, _NAN, 0
    return (
        _NAN if q.mid is None else q.mid,
        _NAN if q.last is None else q.last,
        q.quote_ts or 0,
        q.trade_ts or 0,
        q.ts_ns,
        1,
        q.mid is not None,
        q.quote_ts is not None,
        (q.last is not None) | ((q.src == "ws") << 1),
        _NAN if q.bid is None else q.bid,
        _NAN if q.ask is None else q.ask,
        q.quote_rx or 0,
    )


class TileTable:
    """Array form of one grid (see module doc). Not thread-safe; one per builder and epoch."""

    def __init__(self, grid: hm.Grid, epoch: str = "", compute_rows: int = COMPUTE_ROWS) -> None:
        specs = list(grid.specs.values())
        self.specs = specs
        self.epoch = epoch
        self.compute_rows = max(compute_rows, 2 * SMALL_BATCH)
        self.ids = np.array([s.id for s in specs], dtype=object)
        self.n_legs = n_legs = len(specs[0].legs) if specs else 1
        if any(len(s.legs) != n_legs for s in specs):
            raise ValueError("a grid's tiles must all have the same number of legs")
        cids = grid.leg_cids(specs)
        self.cids = np.array(cids, dtype=object)
        self.cidx = {c: i for i, c in enumerate(cids)}
        n = len(specs)
        self.leg = np.array(
            [[self.cidx[c] for c, _, _ in s.legs] for s in specs], dtype=np.intp
        ).reshape(n, n_legs)
        self.qty = np.array([[q for _, _, q in s.legs] for s in specs], dtype=np.int64).reshape(
            n, n_legs
        )
        # strike-order position p -> spec leg index (put verticals are built long leg first)
        rev = np.array([len(s.legs) > 1 and s.legs[0][1] > s.legs[-1][1] for s in specs], bool)
        fwd = np.arange(n_legs)
        self.perm = np.where(rev[:, None], fwd[::-1][None, :], fwd[None, :]).reshape(n, n_legs)
        self.qty_ord = np.take_along_axis(self.qty, self.perm, axis=1)
        self.width = np.array([s.width for s in specs], dtype=np.float64)
        self.single = bool(specs) and specs[0].strategy == "single"
        self.strike0 = np.array([s.strikes[0] for s in specs], dtype=np.float64)
        self.put = np.array([s.right == "P" for s in specs], dtype=bool)
        by_cid: dict[str, list[int]] = {}
        for i, s in enumerate(specs):
            for c, _, _ in s.legs:
                by_cid.setdefault(c, []).append(i)
        self.rows_of = {c: np.array(r, dtype=np.intp) for c, r in by_cid.items()}
        # per-contract quote arrays (refreshed by ``load``)
        nc = len(cids)
        self.mid = np.full(nc, _NAN)
        self.last = np.full(nc, _NAN)
        self.qts = np.zeros(nc, dtype=np.int64)
        self.tts = np.zeros(nc, dtype=np.int64)
        self.ts = np.zeros(nc, dtype=np.int64)
        self.present = np.zeros(nc, dtype=bool)
        self.has_mid = np.zeros(nc, dtype=bool)
        self.has_qts = np.zeros(nc, dtype=bool)
        self.has_last = np.zeros(nc, dtype=bool)
        self.ws = np.zeros(nc, dtype=bool)
        self.bid = np.full(nc, _NAN)
        self.ask = np.full(nc, _NAN)
        self.rx = np.zeros(nc, dtype=np.int64)
        self.exotic = np.zeros(nc, dtype=bool)  # values the arrays cannot hold exactly
        # Per row, a key of the published view this builder last announced (tile_builder's
        # "announce only what changed"): the view's numbers as int64 bits and its codes.
        self.key_width = 2 * n_legs + 9
        self.last_key = np.zeros((n, self.key_width), dtype=np.int64)
        self.last_ok = np.zeros(n, dtype=bool)

    # --- topology -------------------------------------------------------------------------
    def affected(self, cids: Iterable[str]) -> npt.NDArray[np.intp]:
        """Rows of the tiles using any of ``cids`` (sorted, unique)."""
        parts = [r for c in cids if (r := self.rows_of.get(c)) is not None]
        if not parts:
            return np.zeros(0, dtype=np.intp)
        return np.unique(np.concatenate(parts))

    def leg_contracts(self, rows: npt.NDArray[np.intp]) -> list[str]:
        idx = np.unique(self.leg[rows].ravel())
        out: list[str] = self.cids[idx].tolist()
        return out

    def all_rows(self) -> npt.NDArray[np.intp]:
        return np.arange(len(self.specs), dtype=np.intp)

    def tile_ids(self, rows: npt.NDArray[np.intp]) -> list[str]:
        out: list[str] = self.ids[rows].tolist()
        return out

    # --- quotes ---------------------------------------------------------------------------
    def load(self, quotes: dict[str, hm.LegQuote | None]) -> None:
        """Store the quotes just read (contracts outside the table are ignored)."""
        cids = [c for c in quotes if c in self.cidx]
        self.load_rows(cids, [quote_row(quotes[c]) for c in cids])

    def load_rows(self, cids: Sequence[str], rows: Sequence[QuoteRow]) -> None:
        """Store ``quote_row``s of the contracts ``cids`` (all in the table)."""
        if not cids:
            return
        cidx = self.cidx
        idx = np.array([cidx[c] for c in cids], dtype=np.intp)
        mid, last, qts, tts, ts, present, has_mid, has_qts, bits, bid, ask, rx = zip(
            *rows, strict=True
        )
        self.mid[idx] = mid
        self.last[idx] = last
        self.bid[idx] = bid
        self.ask[idx] = ask
        ints = [qts, tts, ts, rx]
        big = any(max(v) >= _TS_MAX or min(v) < 0 for v in ints)
        exotic = np.zeros(len(idx), dtype=bool)
        if big:  # out of the exact range: keep the rows, mark them for the reference path
            for j, v in enumerate(zip(qts, tts, ts, rx, strict=True)):
                if max(v) >= _TS_MAX or min(v) < 0:
                    exotic[j] = True
            qts, tts, ts, rx = (tuple(0 if e else x for x, e in zip(v, exotic, strict=True))
                                for v in ints)  # fmt: skip
        self.qts[idx] = qts
        self.tts[idx] = tts
        self.ts[idx] = ts
        self.rx[idx] = rx
        self.exotic[idx] = exotic
        self.present[idx] = present
        self.has_mid[idx] = has_mid
        self.has_qts[idx] = has_qts
        b = np.array(bits, dtype=np.int64)
        self.has_last[idx] = (b & 1).astype(bool)
        self.ws[idx] = (b & 2).astype(bool)

    # --- values ---------------------------------------------------------------------------
    def staged_values(
        self,
        rows: npt.NDArray[np.intp],
        quotes: dict[str, hm.LegQuote | None],
        max_quote_age_ns: int,
    ) -> list[bytes]:
        """Staging value of each tile in ``rows`` (``heatmap.staged_value`` bytes), from the
        quotes ``load``-ed; ``quotes`` (the same, as LegQuote) serve the reference path."""
        return self.staged_values_keyed(rows, quotes, max_quote_age_ns)[0]

    def staged_values_keyed(
        self,
        rows: npt.NDArray[np.intp],
        quotes: dict[str, hm.LegQuote | None],
        max_quote_age_ns: int,
    ) -> tuple[list[bytes], IntArr | None]:
        """``staged_values`` plus each tile's view key (equal keys = equal published views;
        None when the batch, or a pass of it, took the per-tile reference path). A batch of
        more than ``compute_rows`` tiles is computed in equal passes of at most that many
        (each at least ``SMALL_BATCH``)."""
        n = len(rows)
        if n <= self.compute_rows:
            return self._keyed(rows, quotes, max_quote_age_ns)
        size = -(-n // -(-n // self.compute_rows))
        values: list[bytes] = []
        parts: list[IntArr] | None = []
        for i in range(0, n, size):
            v, k = self._keyed(rows[i : i + size], quotes, max_quote_age_ns)
            values += v
            if parts is not None and k is not None:
                parts.append(k)
            else:
                parts = None
        return values, None if parts is None else np.concatenate(parts)

    def _keyed(
        self,
        rows: npt.NDArray[np.intp],
        quotes: dict[str, hm.LegQuote | None],
        max_quote_age_ns: int,
    ) -> tuple[list[bytes], IntArr | None]:
        if len(rows) < SMALL_BATCH:  # numpy's fixed cost per call exceeds the per-tile path
            return self._reference(rows, quotes, max_quote_age_ns), None
        lc = self.leg[rows]  # (n, L) contract indices, spec leg order
        if self.exotic[lc].any():
            return self._reference(rows, quotes, max_quote_age_ns), None
        out = self._compute(rows, lc, max_quote_age_ns)
        if out is None:
            return self._reference(rows, quotes, max_quote_age_ns), None
        return out

    # --- announced views (see tile_builder: a lone builder announces only changes) --------
    def forget_announced(self) -> None:
        self.last_ok[:] = False

    def view_changed(self, rows: npt.NDArray[np.intp], key: IntArr | None) -> BoolArr:
        """Which of ``rows`` have a view other than the one last announced (or unknown)."""
        if key is None:
            return np.ones(len(rows), dtype=bool)
        out: BoolArr = ~self.last_ok[rows] | (self.last_key[rows] != key).any(axis=1)
        return out

    def announced(self, rows: npt.NDArray[np.intp], key: IntArr | None) -> None:
        """``rows`` were announced with views ``key`` (None: not known, forget them)."""
        if key is None:
            self.last_ok[rows] = False
        else:
            self.last_key[rows] = key
            self.last_ok[rows] = True

    def _reference(
        self, rows: npt.NDArray[np.intp], quotes: dict[str, hm.LegQuote | None], age: int
    ) -> list[bytes]:
        specs = self.specs
        return [hm.staged_value(specs[r], quotes, age) for r in rows.tolist()]

    def _compute(
        self, rows: npt.NDArray[np.intp], lc: npt.NDArray[np.intp], max_age: int
    ) -> tuple[list[bytes], IntArr] | None:
        n, n_legs = lc.shape
        present = self.present[lc]
        qts, tts, rxc = self.qts[lc], self.tts[lc], self.rx[lc]
        ts = np.where(present, self.ts[lc], 0)
        as_of = ts.max(axis=1)
        seq_qt = np.where(present, qts + tts, 0).astype(np.uint64).sum(axis=1)  # < 3 * 2**62
        seq_rx = np.where(present, rxc, 0).astype(np.uint64).sum(axis=1)  # < 3 * 2**61
        # the sum of both may pass 2**64: add them as Python ints
        seq = [a + b for a, b in zip(seq_qt.tolist(), seq_rx.tolist(), strict=True)]
        received = np.maximum(qts, rxc)  # heatmap.LegQuote.received
        has_mid = self.has_mid[lc]
        has_last = self.has_last[lc] & present
        # heatmap.price_leg, column-wise
        fresh = present & has_mid & self.has_qts[lc] & (as_of[:, None] - received <= max_age)
        use_last = ~fresh & has_last & (~has_mid | (tts > received))
        stale_mid = present & ~fresh & ~use_last & has_mid
        bid, ask = self.bid[lc], self.ask[lc]
        with np.errstate(invalid="ignore"):
            leg_tradable = fresh & (bid > 0) & (ask >= bid)
        tradable = leg_tradable.all(axis=1)
        code = np.full((n, n_legs), _NONE, dtype=np.int8)
        code[fresh] = _MID
        code[use_last] = _LAST
        code[stale_mid] = _STALE
        mid_kind = fresh | stale_mid
        px = _r6(np.where(mid_kind, self.mid[lc], np.where(use_last, self.last[lc], _NAN)))
        pts = np.where(mid_kind, qts, np.where(use_last, tts, 0))
        info = np.where(mid_kind, received, np.where(use_last, tts, 0))
        priced = (code != _NONE).all(axis=1)
        qty = self.qty[rows]
        debit = np.zeros(n)
        for j in range(n_legs):  # the reference's order: ((0 + q0 p0) + q1 p1) + ...
            debit = debit + qty[:, j] * np.where(priced, px[:, j], 0.0)
        nat_ok = (present & ~np.isnan(bid) & ~np.isnan(ask)).all(axis=1)
        buy = np.zeros(n)
        sell = np.zeros(n)
        for j in range(n_legs):
            b = np.where(nat_ok, bid[:, j], 0.0)
            a = np.where(nat_ok, ask[:, j], 0.0)
            long = qty[:, j] > 0
            buy = buy + qty[:, j] * np.where(long, a, b)
            sell = sell + qty[:, j] * np.where(long, b, a)
        all_mid = mid_kind.all(axis=1)
        all_last = use_last.all(axis=1)
        px_src = np.where(~priced, 3, np.where(all_mid, 0, np.where(all_last, 1, 2))).astype(
            np.intp
        )
        oldest = pts.min(axis=1)
        age = np.where(priced, as_of - oldest, 0)
        stale = priced & (as_of - info.min(axis=1) > max_age)
        ws = (present & self.ws[lc]).any(axis=1)
        stale_quote = stale_mid.any(axis=1)
        d = debit
        eps = hm.EPS
        flags = np.where(stale_quote, _F_STALE, 0)
        if self.single:
            k = self.strike0[rows]
            put = self.put[rows]
            cap = np.where(put, k, _NAN)
            max_profit = np.where(put, k - d, _NAN)
            max_loss = d
            conv = np.full(n, _NAN)
        else:
            cap = self.width[rows]
            max_profit, max_loss = cap - d, d
            conv = np.where(tradable, _r6(np.minimum(1.0, np.maximum(0.0, 1.0 - d / cap))), _NAN)
        with np.errstate(invalid="ignore"):
            flags |= np.where(tradable & nat_ok & (sell > cap + eps), _F_ABOVE, 0)
            flags |= np.where(tradable & nat_ok & (buy < -eps), _F_BELOW, 0)
            flags |= np.where(d > cap + eps, _F_MID_ABOVE, 0)
        flags |= np.where(d < -eps, _F_MID_BELOW, np.where(np.abs(d) <= eps, _F_ZERO, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r2r = np.where((d > eps) & ~np.isnan(max_profit) & tradable, _r6(max_profit / d), _NAN)
        natural = np.where(nat_ok, _r6(buy), _NAN)
        vals = (_r6(d), natural, _r6(max_profit), _r6(max_loss), r2r, conv)
        if not np.isfinite(natural[nat_ok]).all() or not np.isfinite(px[~np.isnan(px)]).all():
            return None  # the reference decides what a non-finite value does
        for v in (vals[0], *vals[2:]):
            if not np.isfinite(v[priced & ~np.isnan(v)]).all():
                return None
        nan_if = ~priced
        num = [_col(np.where(nan_if, _NAN, v)) for v in (vals[0], *vals[2:])]
        num.insert(1, _col(natural))  # debit_natural does not need a mid price
        age_s = np.where(nan_if, -1, age // NS_PER_S)
        age_l: list[int | None] = age_s.tolist()
        for i in np.flatnonzero(nan_if).tolist():
            age_l[i] = None
        perm = self.perm[rows]
        code_o = np.take_along_axis(code, perm, axis=1).astype(np.intp)
        px_o = np.take_along_axis(px, perm, axis=1)
        qty_o = self.qty_ord[rows]
        tail = (
            (stale.astype(np.intp) * 4 + px_src) * 2 + ws.astype(np.intp)
        ) * _N_FLAGS + np.where(priced, flags, _F_NOPRICE)
        # One row = these pieces; every row ends with b"\n" (never inside JSON), so the whole
        # batch is ONE join and ONE split instead of a format per tile.
        pieces: list[list[bytes]] = [_col(seq), _glue(None, qty_o[:, 0])]
        for j in range(n_legs):
            pieces.append(_col(px_o[:, j]))
            nxt = qty_o[:, j + 1] if j + 1 < n_legs else None
            pieces.append(_glue(code_o[:, j], nxt))
        for name, col in zip(_NUM_KEYS, num, strict=True):
            pieces += ([name] * n, col)
        pieces.append(_TRADABLE[tradable.astype(np.intp)].tolist())
        pieces += ([b',"age_s":'] * n, _col(age_l), _TAILS[tail].tolist())
        m = len(pieces)
        flat: list[bytes] = [b""] * (n * m)
        for j, piece in enumerate(pieces):
            flat[j::m] = piece
        key = np.empty((n, self.key_width), dtype=np.int64)
        key[:, :n_legs] = np.where(np.isnan(px_o), _NAN, px_o).view(np.int64)
        key[:, n_legs : 2 * n_legs] = code_o
        for j, v in enumerate(vals):
            hide = np.isnan(v) if j == 1 else nan_if | np.isnan(v)
            key[:, 2 * n_legs + j] = np.where(hide, _NAN, v).view(np.int64)
        key[:, 2 * n_legs + 6] = age_s
        key[:, 2 * n_legs + 7] = tail
        key[:, 2 * n_legs + 8] = tradable
        return b"".join(flat).split(b"\n")[:n], key


_NUM_KEYS = (
    b"",
    b',"debit_natural":',
    b',"max_profit":',
    b',"max_loss":',
    b',"r2r":',
    b',"convexity":',
)
_TRADABLE = np.array([b',"tradable":false', b',"tradable":true'], dtype=object)
# (stale, px_src, src, flags) -> the JSON after age_s, newline-terminated
_TAILS = np.array(
    [
        b',"stale":%b,"px_src":"%b","src":"%b","flags":%b}\n'
        % (_BOOL[st], _PX_SRC[ps], _WS[w], _FLAGS[f])
        for st in range(2)
        for ps in range(4)
        for w in range(2)
        for f in range(_N_FLAGS)
    ],
    dtype=object,
)


def _glue(src: npt.NDArray[np.intp] | None, qty: IntArr | None) -> list[bytes]:
    """The bytes between two leg prices: the previous leg's source and the next leg's
    quantity (the first: the row head up to the first price; the last: up to "debit")."""
    n = len(src) if src is not None else len(qty)  # type: ignore[arg-type]
    head = b':{"legs":[' if src is None else b""
    if qty is None:
        uq, q_inv = np.zeros(1, dtype=np.int64), np.zeros(n, dtype=np.intp)
    else:
        uq, q_inv = np.unique(qty, return_inverse=True)
    s_idx = np.zeros(n, dtype=np.intp) if src is None else src
    table = []
    for s in range(len(_SRC_NAMES)):
        for q in uq.tolist():
            b = head
            if src is not None:
                b += b',"' + _SRC_NAMES[s] + b'"]'
            b += b'],"debit":' if qty is None else (b"," if src is not None else b"") + b"[%d," % q
            table.append(b)
    lut = np.array(table, dtype=object)
    out: list[bytes] = lut[s_idx * len(uq) + q_inv].tolist()
    return out
