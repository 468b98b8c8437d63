"""What the pipeline knows about each optionable underlying (cash indices, ETFs, stocks).

One frozen :class:`SymbolSpec` per symbol: its kind, the provider's ticker for it (``I:SPX``
for an index, ``SPY`` for a stock or ETF, which selects the chain path, the spot source and
the WS feed), which option roots belong to it and which of those are adjusted /
non-standard deliverables, settlement and exercise style, the carry we use where we compute
greeks ourselves, the contract multiplier, and the heatmap's strike widths.

Defaults exist for SPX, NDX, RUT, XSP, VIX, SPY, QQQ and IWM; any other symbol is a plain
equity (``generic_equity``): underlying = the symbol, root = the symbol, American exercise,
PM settlement, multiplier 100, widths derived from the listed strike spacing.

Overrides: ``MASSIVE_SYMBOL_SPECS`` is a JSON object ``{"AAPL": {"div_yield": 0.005},
"RUT": {"widths": [5, 10, 20]}}`` whose fields replace the default's (an unknown symbol
starts from the generic equity); an unknown field or a bad value fails at start with the
variable's name. Both variables are fields of the process's one settings object
(``streams.settings.RuntimeSettings``); :func:`configure` installs the process registry from
them (the CLI entry points and ``processors.registry.load`` pass them in), and metric labels
are bounded by ``MASSIVE_SYMBOLS``. Until then the registry holds the defaults.

Roots: an option's root (``SPXW`` in ``O:SPXW260107C06850000``) is *standard* when it is one
of ``roots`` or fully matches ``root_pattern``; *adjusted* when it is a standard root
followed by digits (``AAPL1`` after a corporate action: a non-standard deliverable), or when
its ``shares_per_contract`` differs from ``multiplier``. Adjusted contracts are skipped and
counted by default (``adjusted = "skip"``); ``"keep"`` accepts them (their own root, so the
heatmap never mixes them into a standard spread).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("index", "equity")
SETTLEMENTS = ("AM", "PM")
EXERCISE_STYLES = ("european", "american")
ADJUSTED_POLICIES = ("skip", "keep")

# classification of a root against a spec
STANDARD = "standard"
ADJUSTED = "adjusted"

_ADJ_SUFFIX = re.compile(r"^([A-Z]+?)(\d+)$")


class SymbolSpecError(ValueError):
    """A malformed symbol spec or override (the message names it)."""


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    symbol: str  # our name, e.g. "SPX", "SPY"
    kind: str = "equity"  # index | equity (stocks and ETFs)
    underlying: str = ""  # provider ticker: "I:SPX" | "SPY" (default: from kind and symbol)
    roots: tuple[str, ...] = ()  # standard roots (default: the symbol)
    root_pattern: str = ""  # or a regex (full match) for standard roots
    am_roots: tuple[str, ...] = ()  # AM-settled roots (open of the expiry date); others PM
    exercise: str = "american"  # european | american
    adjusted: str = "skip"  # skip | keep: adjusted / non-standard deliverables
    multiplier: float = 100.0  # standard shares_per_contract
    widths: tuple[float, ...] = ()  # heatmap strike widths; () = from the strike spacing
    div_yield: float | None = None  # continuous yield for greeks we compute (None: GEX setting)
    rate: float | None = None  # risk-free rate for greeks we compute (None: GEX setting)

    def __post_init__(self) -> None:
        self._check_values()
        self._check_underlying()
        self._check_roots()

    def _check_values(self) -> None:
        name = self.symbol
        if not name or not name.isalnum() or name != name.upper():
            raise SymbolSpecError(f"symbol {name!r}: must be upper-case alphanumeric")
        if self.kind not in KINDS:
            raise SymbolSpecError(f"{name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.exercise not in EXERCISE_STYLES:
            raise SymbolSpecError(f"{name}: exercise must be one of {EXERCISE_STYLES}")
        if self.adjusted not in ADJUSTED_POLICIES:
            raise SymbolSpecError(f"{name}: adjusted must be one of {ADJUSTED_POLICIES}")
        if not self.multiplier > 0:
            raise SymbolSpecError(f"{name}: multiplier must be > 0")
        if any(not w > 0 for w in self.widths):
            raise SymbolSpecError(f"{name}: widths must be positive")
        for label, v in (("div_yield", self.div_yield), ("rate", self.rate)):
            if v is not None and not -1.0 < v < 1.0:
                raise SymbolSpecError(f"{name}: {label} {v} is not a yearly rate")

    def _check_underlying(self) -> None:
        """Default the provider ticker from kind and symbol; the two must agree."""
        name = self.symbol
        if not self.underlying:
            tkr = f"I:{name}" if self.kind == "index" else name
            object.__setattr__(self, "underlying", tkr)
        if self.kind == "index" and not self.underlying.startswith("I:"):
            raise SymbolSpecError(f"{name}: an index underlying is spelled I:<ticker>")
        if self.kind == "equity" and self.underlying.startswith("I:"):
            raise SymbolSpecError(f"{name}: an equity underlying has no I: prefix")

    def _check_roots(self) -> None:
        name = self.symbol
        if not self.roots and not self.root_pattern:
            object.__setattr__(self, "roots", (name,))
        if self.root_pattern:
            try:
                re.compile(self.root_pattern)
            except re.error as exc:
                raise SymbolSpecError(f"{name}: root_pattern: {exc}") from None
        if any(r not in self.roots and not self._pattern_match(r) for r in self.am_roots):
            raise SymbolSpecError(f"{name}: am_roots must be standard roots")

    def _pattern_match(self, root: str) -> bool:
        return bool(self.root_pattern) and re.fullmatch(self.root_pattern, root) is not None

    @property
    def is_index(self) -> bool:
        return self.kind == "index"

    @property
    def ws_market(self) -> str:
        """The WS cluster carrying the spot: ``indices`` (``V.``) or ``stocks`` (``T.``/``Q.``)."""
        return "indices" if self.is_index else "stocks"

    def classify(self, root: str) -> str | None:
        """``standard``, ``adjusted`` (a standard root + digits: a non-standard deliverable)
        or None (the root belongs to another underlying)."""
        if root in self.roots or self._pattern_match(root):
            return STANDARD
        m = _ADJ_SUFFIX.match(root)
        if m is not None and (m.group(1) in self.roots or self._pattern_match(m.group(1))):
            return ADJUSTED
        return None

    def settlement(self, root: str) -> str:
        return "AM" if root in self.am_roots else "PM"

    def standard_deliverable(self, shares_per_contract: float | None) -> bool:
        """The provider's ``shares_per_contract`` is this symbol's standard multiplier (an
        absent value is taken as standard: the spec requires the field)."""
        return shares_per_contract is None or abs(shares_per_contract - self.multiplier) < 1e-9


def _index(symbol: str, roots: tuple[str, ...], am: tuple[str, ...], **kw: Any) -> SymbolSpec:
    return SymbolSpec(symbol, "index", roots=roots, am_roots=am, exercise="european", **kw)


# Index options are European and cash-settled; the standard monthlies of SPX/NDX/RUT are
# AM-settled (the special opening quotation), their weekly/daily roots PM. XSP (mini-SPX)
# is PM-settled. VIX options (VIX monthlies and VIXW weeklies) settle AM on Wednesdays.
# Widths keep the heatmap's former defaults for SPX/NDX.
DEFAULT_SPECS: dict[str, SymbolSpec] = {
    s.symbol: s
    for s in (
        _index("SPX", ("SPX", "SPXW"), ("SPX",), widths=(5, 10, 15, 20, 25, 30, 35, 40, 45, 50)),
        _index("NDX", ("NDX", "NDXP"), ("NDX",), widths=(25, 50, 75, 100, 125, 150, 175, 200)),
        _index("RUT", ("RUT", "RUTW"), ("RUT",), widths=(5, 10, 15, 20, 25, 50)),
        _index("XSP", ("XSP",), (), widths=(1, 2, 3, 4, 5, 10)),
        _index("VIX", ("VIX", "VIXW"), ("VIX", "VIXW"), widths=(1, 2, 3, 5)),
        # ETFs: American, PM, physically settled; yields are trailing approximations
        SymbolSpec("SPY", widths=(1, 2, 3, 4, 5, 10), div_yield=0.012),
        SymbolSpec("QQQ", widths=(1, 2, 3, 4, 5, 10), div_yield=0.006),
        SymbolSpec("IWM", widths=(1, 2, 3, 4, 5, 10), div_yield=0.012),
    )
}


def generic_equity(symbol: str) -> SymbolSpec:
    """A stock without a default: underlying = root = the symbol, American, PM, x100,
    widths from the listed strike spacing."""
    return SymbolSpec(symbol)


_FIELDS = {f.name: f for f in dataclasses.fields(SymbolSpec)}
_TUPLE_FIELDS = {"roots", "am_roots", "widths"}


def _override(base: SymbolSpec, raw: Mapping[str, Any], where: str) -> SymbolSpec:
    values: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in _FIELDS or k == "symbol":
            raise SymbolSpecError(f"{where}: unknown field {k!r}")
        if k in _TUPLE_FIELDS:
            if isinstance(v, str):
                v = [p.strip() for p in v.split(",") if p.strip()]
            if not isinstance(v, list):
                raise SymbolSpecError(f"{where}.{k}: expected a list")
            v = tuple(float(x) for x in v) if k == "widths" else tuple(str(x) for x in v)
        values[k] = v
    if "kind" in values and "underlying" not in values and values["kind"] != base.kind:
        values["underlying"] = ""  # re-derived from the new kind
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as exc:
        raise SymbolSpecError(f"{where}: {exc}") from None


def parse_overrides(raw: str, var: str = "MASSIVE_SYMBOL_SPECS") -> dict[str, SymbolSpec]:
    """The specs of a JSON override object (each field replaces the default's)."""
    if not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise SymbolSpecError(f"{var}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SymbolSpecError(f"{var}: expected a JSON object of symbol -> fields")
    out: dict[str, SymbolSpec] = {}
    for sym, fields in obj.items():
        name = str(sym).strip().upper()
        if not isinstance(fields, dict):
            raise SymbolSpecError(f"{var}.{name}: expected an object of fields")
        base = DEFAULT_SPECS.get(name) or generic_equity(name)
        out[name] = _override(base, fields, f"{var}.{name}")
    return out


class Registry:
    """The specs in force: the defaults, overridden, and the configured symbols."""

    def __init__(
        self,
        overrides: Mapping[str, SymbolSpec] | None = None,
        configured: Iterable[str] = (),
    ) -> None:
        self.specs: dict[str, SymbolSpec] = {**DEFAULT_SPECS, **(overrides or {})}
        self.configured = tuple(dict.fromkeys(s.strip().upper() for s in configured if s))
        self._roots: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for sym in sorted(self.specs, key=lambda s: (s in DEFAULT_SPECS, s)):  # overrides first
            sp = self.specs[sym]
            for r in sp.roots:
                self._roots.setdefault(r, sym)
            if sp.root_pattern:
                self._patterns.append((re.compile(sp.root_pattern), sym))
        self._labels = frozenset(self.specs) | frozenset(self.configured)

    def spec(self, symbol: str) -> SymbolSpec:
        return self.specs.get(symbol) or generic_equity(symbol)

    def symbol_of_root(self, root: str) -> str:
        """The underlying an option root belongs to: a known root (``SPXW`` -> ``SPX``), a
        root pattern, an adjusted root (``AAPL1`` -> ``AAPL``), else the root itself."""
        sym = self._roots.get(root)
        if sym is not None:
            return sym
        for pat, s in self._patterns:
            if pat.fullmatch(root):
                return s
        m = _ADJ_SUFFIX.match(root)
        if m is not None:
            return self.symbol_of_root(m.group(1))
        return root

    def symbol_of_underlying(self, ticker: str) -> str:
        """``I:SPX`` -> ``SPX``; ``SPY`` -> ``SPY`` (a configured spec may map another
        provider ticker to its symbol)."""
        for sp in self.specs.values():
            if sp.underlying == ticker:
                return sp.symbol
        return ticker[2:] if ticker.startswith("I:") else ticker

    def label(self, symbol: str | None) -> str:
        """A metric label: the symbol when it is configured or has a spec, else ``other``
        (cardinality bounded by configuration, whatever a feed sends)."""
        return symbol if symbol is not None and symbol in self._labels else "other"


def load(symbol_specs: str = "", symbols: Iterable[str] = ()) -> Registry:
    """A registry: ``symbol_specs`` (``MASSIVE_SYMBOL_SPECS``) overrides the defaults; labels
    bounded by ``symbols`` (``MASSIVE_SYMBOLS``) and the overridden symbols."""
    overrides = parse_overrides(symbol_specs)
    configured = [*overrides, *symbols]
    return Registry(overrides, [s.strip().upper() for s in configured if s.strip().isalnum()])


_process: tuple[tuple[str, tuple[str, ...]], Registry] | None = None


def configure(symbol_specs: str, symbols: Iterable[str]) -> Registry:
    """Install the process registry from the settings' ``symbol_specs`` and ``symbols``
    (``RuntimeSettings``); raises :class:`SymbolSpecError` naming a bad spec."""
    global _process
    key = (symbol_specs, tuple(symbols))
    if _process is None or _process[0] != key:
        _process = (key, load(*key))
    return _process[1]


def registry() -> Registry:
    """The process registry (:func:`configure`; the defaults until it runs)."""
    if _process is None:
        return configure("", ())
    return _process[1]


def reset() -> None:
    """Forget the process registry (tests)."""
    global _process
    _process = None


def derive_widths(lines: Iterable[Iterable[float]], n: int = 6) -> tuple[float, ...]:
    """Widths from the listed strike spacing: the most common gap between adjacent strikes
    of each line (one expiry and right; ties: the smaller gap) times 1, 2, 3, 4, 5 and 10,
    the first ``n``. () when no line lists two strikes."""
    gaps: dict[int, int] = {}
    for line in lines:
        ks = sorted({round(k * 1000) for k in line})
        for a, b in itertools.pairwise(ks):
            gaps[b - a] = gaps.get(b - a, 0) + 1
    if not gaps:
        return ()
    step = min(gaps, key=lambda g: (-gaps[g], g))
    return tuple(step * m / 1000 for m in (1, 2, 3, 4, 5, 10)[:n])
