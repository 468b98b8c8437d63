"""Typed, immutable stream entries and Redis records (DESIGN.md "Stages and streams").

Wire convention: every stream entry except the raw WS stream carries one field ``d`` holding
the JSON encoding of one of these structs. The raw WS stream carries ``recv_ts_ns`` and
``payload`` (the provider's frame, byte for byte). Timestamps are integers in nanoseconds
unless a name says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

import msgspec

FIELD = b"d"
WS_RECV_FIELD = b"recv_ts_ns"
WS_PAYLOAD_FIELD = b"payload"


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every stream message."""


M = TypeVar("M", bound=Message)

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(raw: bytes | str, typ: type[M]) -> M:
    """Decode ``raw`` as ``typ``; raises msgspec.ValidationError/DecodeError with the reason."""
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    return dec.decode(raw)  # type: ignore[no-any-return]


def entry(msg: Message) -> dict[bytes, bytes]:
    """Stream entry fields for ``msg``."""
    return {FIELD: encode(msg)}


def from_entry(fields: dict[bytes, bytes], typ: type[M]) -> M:
    try:
        raw = fields[FIELD]
    except KeyError:
        raise msgspec.ValidationError(f"stream entry has no {FIELD!r} field") from None
    return decode(raw, typ)


# --- chain snapshots (chain-poller -> normalizer) -------------------------------------
class ChainContract(msgspec.Struct, frozen=True, array_like=True):
    """One contract of a compact chain snapshot blob (array-encoded to keep blobs small).

    Prices in index points; ``quote_ts_ns``/``trade_ts_ns`` are the provider's own times.
    Optional values are None when the provider omitted them.
    """

    cid: str
    expiry: str  # YYYY-MM-DD
    strike: float
    right: str  # "C" | "P"
    bid: float | None = None
    ask: float | None = None
    last: float | None = None
    last_size: float | None = None
    quote_ts_ns: int | None = None
    trade_ts_ns: int | None = None
    iv: float | None = None
    delta: float | None = None
    gamma: float | None = None
    theta: float | None = None
    vega: float | None = None
    oi: float | None = None
    volume: float | None = None
    shares: float | None = None  # shares_per_contract: the contract's multiplier


class ChainSnapshot(msgspec.Struct, frozen=True):
    """The whole filtered chain of one symbol at one fetch, stored once as a blob."""

    symbol: str
    ts_ns: int  # fetch completion (our clock)
    spot: float | None
    contracts: list[ChainContract]
    # the provider's time of ``spot`` (index snapshot / underlying_asset.last_updated); None:
    # unknown (then ``ts_ns``). A delayed REST price never outranks a newer live WS spot.
    spot_ts_ns: int | None = None


_snap_encoder = msgspec.msgpack.Encoder()
_snap_decoder = msgspec.msgpack.Decoder(ChainSnapshot)


def encode_snapshot(snap: ChainSnapshot) -> bytes:
    """Blob stored at massive:chain:snapshot:{SYM}:{ts} (msgpack, contracts array-encoded)."""
    return _snap_encoder.encode(snap)


def decode_snapshot(blob: bytes) -> ChainSnapshot:
    return _snap_decoder.decode(blob)


class LazyChainSnapshot(msgspec.Struct, frozen=True):
    """A ``ChainSnapshot`` blob decoded but for its contracts: each stays the slice of the
    blob that encodes it (``msgspec.Raw`` keeps the blob, no copy) until
    :func:`decode_contracts`. A 20k-contract blob is 2.7 MB and its raws 1.1 MB; decoded
    whole it is 12 MB of structs and floats, which a consumer that works a chunk at a time
    (the normalizer) need not hold."""

    symbol: str
    ts_ns: int
    spot: float | None
    contracts: list[msgspec.Raw]
    spot_ts_ns: int | None = None


_lazy_snap_decoder = msgspec.msgpack.Decoder(LazyChainSnapshot)
_contract_decoder = msgspec.msgpack.Decoder(ChainContract)


def decode_snapshot_lazy(blob: bytes) -> LazyChainSnapshot:
    return _lazy_snap_decoder.decode(blob)


def decode_contract(raw: msgspec.Raw) -> ChainContract:
    """A contract of a :class:`LazyChainSnapshot` (msgspec.DecodeError / ValidationError on a
    malformed one, as ``decode_snapshot`` would have raised for the whole blob)."""
    return _contract_decoder.decode(raw)


def decode_contracts(raws: Iterable[msgspec.Raw]) -> list[ChainContract]:
    return [_contract_decoder.decode(r) for r in raws]


class ChainPointer(Message, frozen=True):
    """Entry on massive:{chain}:stream pointing at a stored ChainSnapshot blob."""

    symbol: str
    snapshot_key: str
    ts_ns: int
    n_contracts: int
    spot: float | None = None
    fetch_s: float = 0.0
    reason: str = "cadence"  # cadence | dormancy | startup
    # window: the heatmap's filtered chain (-> epochs); full: the whole chain, for GEX only
    # (-> massive:gex:source:{SYM})
    scope: str = "window"


class SpotTick(Message, frozen=True):
    """Entry on massive:{chain}:spot:stream."""

    symbol: str
    value: float
    ts_ns: int
    source: str  # rest | ws


class ControlMessage(Message, frozen=True):
    """Entry on massive:{control}:stream (e.g. WS dormancy asks for a chain refresh)."""

    kind: str  # "refresh_chain"
    ts_ns: int
    symbol: str | None = None
    reason: str = ""


# --- hydration (normalizer/hydrator -> tile builders) ---------------------------------
class DirtyEntry(Message, frozen=True):
    """Entry on massive:contracts:dirty:{<SYM>}: these contracts of this epoch changed."""

    symbol: str
    epoch: str
    cids: list[str]
    max_ts_ns: int
    recv_ts_ns: int | None = None  # earliest ingest receive time behind the change
    reason: str = "ws"  # ws | seed | epoch | carry (old epoch values on promotion)


class ContractRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Typed view of ``epoch:{<SYM>}:<eid>:contract:<cid>`` (a Redis HASH)."""

    cid: str
    symbol: str
    expiry: str
    strike: float
    right: str
    bid: float | None = None
    ask: float | None = None
    mid: float | None = None
    quote_ts_ns: int | None = None
    last: float | None = None
    size: float | None = None
    trade_ts_ns: int | None = None
    ts_ns: int | None = None  # newest accepted event of either kind
    iv: float | None = None
    delta: float | None = None
    gamma: float | None = None
    oi: float | None = None
    src: str = "chain"  # chain | ws

    @classmethod
    def from_hash(cls, cid: str, h: dict[bytes, bytes]) -> ContractRecord:
        def f(name: str) -> float | None:
            v = h.get(name.encode())
            return float(v) if v not in (None, b"") else None

        def i(name: str) -> int | None:
            v = h.get(name.encode())
            return int(v) if v not in (None, b"") else None

        return cls(
            cid=cid,
            symbol=h[b"symbol"].decode(),
            expiry=h[b"expiry"].decode(),
            strike=float(h[b"strike"]),
            right=h[b"type"].decode(),
            bid=f("bid"),
            ask=f("ask"),
            mid=f("mid"),
            quote_ts_ns=i("quote_ts"),
            last=f("last"),
            size=f("size"),
            trade_ts_ns=i("trade_ts"),
            ts_ns=i("ts_ns"),
            iv=f("iv"),
            delta=f("delta"),
            gamma=f("gamma"),
            oi=f("oi"),
            src=(h.get(b"src") or b"chain").decode(),
        )


# --- published models (publishers/gex -> SSE) -----------------------------------------
class ModelDiff(Message, frozen=True):
    """Entry on a diff stream. Applying ``changed``/``removed`` to the ``items`` of the model
    at ``prev_version`` gives the model at ``version``; a client seeing a gap re-reads."""

    symbol: str
    kind: str  # "heatmap:<strategy>" | "gex"
    epoch: str
    version: int
    prev_version: int
    ts_ns: int
    changed: dict[str, Any]
    removed: list[str]
    meta: dict[str, Any] = {}
    # Stream entry id of the diff that produced ``prev_version`` of this symbol on the same
    # diff stream (None: none known). A reader holding version v from diff X applies this
    # diff only if prev_id == X: after Redis lost writes, re-issued versions carry another
    # prev_id and a client that saw the lost ones re-reads instead of mixing histories.
    prev_id: str | None = None
    src_recv_ts_ns: int | None = None  # oldest ingest time behind this publish (latency)
    # True: the whole model at ``version`` is the checkpoint installed by the same publish
    # (the model key, whose ``diff_id`` is this entry), and ``changed``/``removed`` are
    # empty. A new epoch's first version (a heatmap's whole grid, ~15 MB for butterfly) is
    # published so, and every reader holding an earlier version reads the model key instead
    # of taking the whole grid out of the stream.
    snapshot: bool = False


class PublishedModel(msgspec.Struct, frozen=True):
    """Value stored at a canonical model key (JSON), e.g. massive:heatmap:model:{SPX}:butterfly."""

    symbol: str
    kind: str
    epoch: str
    version: int
    ts_ns: int
    items: dict[str, Any]
    meta: dict[str, Any] = {}
    diff_id: str | None = None  # diff stream entry id of this version (SSE resume point)


class ModelHead(msgspec.Struct, frozen=True):
    """The fields of a PublishedModel before its items (the monitor reads them from the
    first bytes of a model key: processors/ops/monitor.py)."""

    symbol: str
    kind: str
    epoch: str
    version: int
    ts_ns: int


class ModelTail(msgspec.Struct, frozen=True):
    meta: dict[str, Any]
    diff_id: str | None


# Where a marked model JSON (``encode_model_pieces(marked=True)``) may be cut into pieces: a
# tab, JSON whitespace that the compact encoding never writes elsewhere (a tab in a string is
# escaped). A reader reads such a model a piece at a time (processors/heatmap/checkpoint.py
# ``spool``); any JSON decoder still reads it whole.
PIECE_MARK = b"\t"
ITEMS_PER_PIECE = 1024  # items per piece of a checkpoint, and of an /api answer


def encode_model_pieces(
    model: PublishedModel | RawModel,
    items_per_piece: int = ITEMS_PER_PIECE,
    *,
    marked: bool = False,
) -> Iterator[bytes]:
    """``encode(model)`` byte for byte, as consecutive pieces of ``items_per_piece`` items
    each (plus the fields around them), encoded as they are consumed: a 50k-tile model
    (~15 MB of JSON) is never one buffer in the writer (processors/heatmap/checkpoint.py
    write_pieces). ``marked``: a ``PIECE_MARK`` before each piece of items and before the
    closing brace of the items, so that splitting the JSON at the marks gives the head
    (``{...,"items":{``), each piece of items (with the comma that follows it) and the tail
    (``},"meta":...}``)."""
    head = _encoder.encode(
        ModelHead(model.symbol, model.kind, model.epoch, model.version, model.ts_ns)
    )
    mark = PIECE_MARK if marked else b""
    lead, sep = head[:-1] + b',"items":{', b""
    rest = iter(model.items.items())
    while part := dict(islice(rest, items_per_piece)):
        body = _encoder.encode(part)
        yield b"".join((lead, sep, mark, memoryview(body)[1:-1]))
        lead, sep = b"", b","
    yield lead + mark + b"}," + _encoder.encode(ModelTail(model.meta, model.diff_id))[1:]


class RawModel(msgspec.Struct):
    """A stored model decoded with its items left as raw JSON (mutable: the publisher and
    the SSE gateway apply diffs to it without decoding or re-encoding the items)."""

    symbol: str
    kind: str
    epoch: str
    version: int
    ts_ns: int
    items: dict[str, msgspec.Raw]
    meta: dict[str, Any] = {}
    diff_id: str | None = None


class RawDiff(msgspec.Struct):
    """A diff stream entry with its changed items left as raw JSON (see RawModel)."""

    symbol: str
    epoch: str
    version: int
    prev_version: int
    ts_ns: int
    changed: dict[str, msgspec.Raw]
    removed: list[str] = []
    meta: dict[str, Any] = {}
    prev_id: str | None = None
    snapshot: bool = False  # see ModelDiff.snapshot


class GexRow(msgspec.Struct, frozen=True, array_like=True):
    """One contract of an epoch's GEX projection: value of HASH ``epoch:{<SYM>}:<eid>:gex`` field
    <cid>, written by the normalizer from every chain snapshot (WS carries no greeks)."""

    root: str
    expiry: str
    strike: float
    right: str  # "C" | "P"
    gamma: float | None
    oi: float | None
    iv: float | None
    ts_ns: int


class GexLevels(Message, frozen=True):
    """Entry on ``massive:gex:levels:{SYM}``: the key levels of one GEX publish (the
    history behind ``/api/gex/history``). Levels are index points, None when undefined."""

    symbol: str
    ts_ns: int
    version: int
    spot: float
    zero_gamma: float | None
    zero_gamma_0dte: float | None
    call_wall: float | None
    put_wall: float | None
    abs_gamma_strike: float | None
    call_wall_0dte: float | None = None
    put_wall_0dte: float | None = None
    net_usd: float | None = None  # net dollar GEX per 1 % move, all expiries
    net_0dte_usd: float | None = None


class GexSource(msgspec.Struct, frozen=True, array_like=True):
    """The whole chain of one symbol for the GEX builder, column-wise: the value of field
    ``data`` of HASH ``massive:gex:source:{SYM}`` (msgpack), written by the normalizer from a
    full-chain snapshot (``ChainPointer.scope == "full"``). Numbers are little-endian numpy
    buffers, one entry per contract (NaN = absent): ``root``/``expiry`` int16 codes into
    ``roots``/``expiries``, ``right`` int8 (1 call, 0 put), the rest float64 (``mult``: the
    contract's ``shares_per_contract``)."""

    symbol: str
    ts_ns: int  # the snapshot's fetch time (the instant its greeks refer to)
    spot: float | None  # the index level fetched with it
    roots: list[str]
    expiries: list[str]
    root: bytes
    expiry: bytes
    strike: bytes
    right: bytes
    gamma: bytes
    oi: bytes
    iv: bytes
    # float64 shares_per_contract per contract (NaN: not given); empty: none given at all
    mult: bytes = b""


_gex_source_encoder = msgspec.msgpack.Encoder()
_gex_source_decoder = msgspec.msgpack.Decoder(GexSource)


def encode_gex_source(src: GexSource) -> bytes:
    return _gex_source_encoder.encode(src)


def decode_gex_source(blob: bytes) -> GexSource:
    return _gex_source_decoder.decode(blob)
