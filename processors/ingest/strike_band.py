"""The chain-poller's strike band, anchored so that spot moving a few points does not change
the topology.

A band centred on the current spot moves with every fetch: with spot near a strike at the
band's edge that strike enters and leaves the chain, and every such flip is a new epoch
(measured: the SPX topology flipped four times in a few minutes, each flip a full snapshot
to every client and a WS resubscription). So the band is centred on an **anchor**, a spot
value that changes only when spot has really moved:

* the band is ``anchor * (1 +- pct)`` (or ``anchor +- points``); half-width ``h``;
* spot within ``recenter_frac * h`` of the anchor: the band stays (strikes near its edges
  stay in or out, whatever spot does inside that range);
* beyond it: the anchor moves to spot, at most once per ``min_interval_s`` (a band-only
  topology change is rate limited); beyond ``force_frac * h`` it moves at once (spot would
  otherwise leave the strikes it needs);
* the anchor is persisted (``massive:chain:band:{SYM}``), so a restarted poller keeps it.

New listings and new expiries change the topology inside a fixed band, so they still
promote at the next fetch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["initial", "kept", "moved", "forced", "deferred"]
MOVED: frozenset[str] = frozenset({"initial", "moved", "forced"})


@dataclass(frozen=True, slots=True)
class BandRule:
    pct: float = 0.08  # half-width as a fraction of the anchor ...
    points: float = 0.0  # ... or in index points when > 0
    recenter_frac: float = 0.5  # re-centre when spot is this far from the anchor (of h)
    force_frac: float = 0.75  # ... at once (no rate limit) beyond this
    min_interval_s: float = 300.0  # at most one rate-limited re-centre per interval

    def __post_init__(self) -> None:
        if self.pct < 0 or self.points < 0:
            raise ValueError("band must be >= 0")
        if not 0 < self.recenter_frac <= self.force_frac <= 1:
            raise ValueError("band: need 0 < recenter_frac <= force_frac <= 1")
        if self.min_interval_s < 0:
            raise ValueError("band: min_interval_s must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.points > 0 or self.pct > 0

    def half_width(self, centre: float) -> float:
        return self.points if self.points > 0 else abs(centre) * self.pct

    def bounds(self, centre: float) -> tuple[float, float]:
        """[lo, hi] around ``centre``, rounded to 0.001 (the filter sent to the provider)."""
        h = self.half_width(centre)
        return round(centre - h, 3), round(centre + h, 3)


@dataclass(frozen=True, slots=True)
class Anchor:
    spot: float  # the band's centre
    set_ns: int  # wall time it was set (for the rate limit, across restarts)


def decide(
    rule: BandRule, anchor: Anchor | None, spot: float, now_ns: int
) -> tuple[Anchor, Outcome]:
    """The anchor to use for a fetch at ``spot`` and why."""
    if anchor is None:
        return Anchor(spot, now_ns), "initial"
    h = rule.half_width(anchor.spot)
    d = abs(spot - anchor.spot)
    if d <= rule.recenter_frac * h:
        return anchor, "kept"
    if d > rule.force_frac * h:
        return Anchor(spot, now_ns), "forced"
    if now_ns - anchor.set_ns >= rule.min_interval_s * 1e9:
        return Anchor(spot, now_ns), "moved"
    return anchor, "deferred"


def encode(anchor: Anchor) -> dict[str, str]:
    return {"spot": repr(float(anchor.spot)), "set_ns": str(anchor.set_ns)}


def decode(fields: Mapping[bytes | str, bytes | str]) -> Anchor | None:
    """The persisted anchor, or None when absent or unreadable (a fresh one is taken)."""
    raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        spot = float(raw["spot"])
        set_ns = int(raw["set_ns"])  # bytes and str both parse
    except (KeyError, ValueError, TypeError):
        return None
    if not spot > 0 or spot == float("inf"):
        return None
    return Anchor(spot, set_ns)
