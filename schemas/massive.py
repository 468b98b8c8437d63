"""Massive WebSocket wire formats (reference/massive_api.md section 3).

Every server frame is a JSON array of events routed by ``ev``. Options ``T``/``Q`` and index
``V`` times are **milliseconds**; ``FMV`` is nanoseconds. Decoding is strict about the
fields we use (types, ranges) and ignores fields we do not use.

``decode_frame`` is the hot path: the whole frame is decoded in one msgspec call; when that
fails (one bad event), it falls back to per-event decoding so the good events of the frame
are kept and each bad one is reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import msgspec

NonNeg = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
Size = Annotated[int, msgspec.Meta(ge=0, le=10**9)]
TsMs = Annotated[int, msgspec.Meta(ge=0, le=10**14)]


class Trade(msgspec.Struct, frozen=True, tag_field="ev", tag="T"):
    sym: str
    p: NonNeg
    s: Size
    t: TsMs
    x: int = 0
    q: int = 0
    c: list[int] = []


class Quote(msgspec.Struct, frozen=True, tag_field="ev", tag="Q", rename={"as_": "as"}):
    sym: str
    bp: NonNeg
    ap: NonNeg
    t: TsMs
    bs: Size = 0
    as_: Size = 0
    bx: int = 0
    ax: int = 0
    q: int = 0


class IndexValue(msgspec.Struct, frozen=True, tag_field="ev", tag="V", rename={"ticker": "T"}):
    val: NonNeg
    ticker: str
    t: TsMs


class Status(msgspec.Struct, frozen=True, tag_field="ev", tag="status"):
    status: str
    message: str = ""


class Aggregate(msgspec.Struct, frozen=True, tag_field="ev", tag="A"):
    sym: str
    s: int = 0
    e: int = 0


class MinuteAggregate(msgspec.Struct, frozen=True, tag_field="ev", tag="AM"):
    sym: str
    s: int = 0
    e: int = 0


class FairMarketValue(msgspec.Struct, frozen=True, tag_field="ev", tag="FMV"):
    sym: str
    fmv: float
    t: int  # nanoseconds


Event = Trade | Quote | IndexValue | Status | Aggregate | MinuteAggregate | FairMarketValue

_frame_decoder = msgspec.json.Decoder(list[Event])
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_event_decoder = msgspec.json.Decoder(Event)


@dataclass(slots=True)
class DecodedFrame:
    events: list[Event] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one reason per rejected event/frame


def decode_frame(raw: bytes | str) -> DecodedFrame:
    """Decode one WS frame; never raises. Rejections are returned with their reason."""
    try:
        return DecodedFrame(_frame_decoder.decode(raw))
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    out = DecodedFrame()
    try:
        items = _raw_list_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        out.errors.append(f"frame: {exc}")
        return out
    for i, item in enumerate(items):
        try:
            out.events.append(_event_decoder.decode(item))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            out.errors.append(f"event[{i}]: {exc}")
    return out


def ms_to_ns(ms: int) -> int:
    return ms * 1_000_000
