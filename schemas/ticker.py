"""Massive option ticker codec: ``O:SPXW260107C06850000`` <-> (root, expiry, C/P, strike).

Format: ``O:<ROOT><YYMMDD><C|P><strike x 1000, 8 digits>``; root is 1-6 chars.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from schemas import symbols as _symbols


class TickerError(ValueError):
    """A string that is not a valid Massive option ticker."""


@dataclass(frozen=True, slots=True)
class OptionTicker:
    root: str
    expiry: dt.date
    right: str  # "C" or "P"
    strike: float

    @property
    def symbol(self) -> str:
        """Underlying the root belongs to (SPXW -> SPX, AAPL1 -> AAPL, by the process's
        symbol registry); unknown roots map to themselves."""
        return _symbols.registry().symbol_of_root(self.root)

    def encode(self) -> str:
        return encode(self.root, self.expiry, self.right, self.strike)


def parse(ticker: str) -> OptionTicker:
    """Parse ``O:SPXW260107C06850000``; raises TickerError with the reason."""
    if not isinstance(ticker, str):
        raise TickerError(f"ticker must be a string, got {type(ticker).__name__}")
    body = ticker[2:] if ticker.startswith("O:") else None
    if body is None:
        raise TickerError(f"option ticker must start with 'O:': {ticker!r}")
    if len(body) < 16 or len(body) > 21:
        raise TickerError(f"option ticker has wrong length: {ticker!r}")
    root, tail = body[:-15], body[-15:]
    if not root.isalnum() or root != root.upper():
        raise TickerError(f"bad root in option ticker: {ticker!r}")
    ymd, right, strike_digits = tail[:6], tail[6], tail[7:]
    if right not in ("C", "P"):
        raise TickerError(f"option type must be C or P: {ticker!r}")
    if not ymd.isdigit() or not strike_digits.isdigit():
        raise TickerError(f"bad date or strike digits: {ticker!r}")
    try:
        expiry = dt.date(2000 + int(ymd[:2]), int(ymd[2:4]), int(ymd[4:6]))
    except ValueError as exc:
        raise TickerError(f"bad expiry date in {ticker!r}: {exc}") from None
    strike = int(strike_digits) / 1000.0
    return OptionTicker(root, expiry, right, strike)


def encode(root: str, expiry: dt.date, right: str, strike: float) -> str:
    if right not in ("C", "P"):
        raise TickerError(f"option type must be C or P, got {right!r}")
    if not (1 <= len(root) <= 6) or not root.isalnum():
        raise TickerError(f"bad root {root!r}")
    milli = Decimal(str(strike)) * 1000
    if milli != milli.to_integral_value() or milli < 0 or milli >= 10**8:
        raise TickerError(f"strike {strike} is not representable in 8 digits x 1000")
    return f"O:{root}{expiry:%y%m%d}{right}{int(milli):08d}"
