"""Every Redis stream, group and key name used by the pipeline, cluster-ready.

Hash tags: every key and stream that one operation (MULTI/EXEC, WATCH, Lua script) touches
shares one slot. The data path is per symbol, so almost every name carries the symbol's tag
``{<SYM>}``: the epoch pointer and index, every key of the symbol's epochs
(``epoch:{<SYM>}:<eid>:...``), the chain blobs and band, the chain, spot, dirty, tile and
diff streams, staging, manifest, model, version, head, lease, fence and the GEX keys. Streams
that are not per symbol carry their own tag (``massive:{ws}:stream``), so their dead-letter
stream ``<stream>:dead`` lands in the same slot. Single-key state read and written alone
(``massive:spot:latest``, ``massive:ws:last_event_ns``) needs no tag.

Nothing outside this module spells a key or stream name.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "massive"

STRATEGIES = ("single", "vertical", "butterfly")


def tag(symbol: str) -> str:
    """``{<SYM>}``: the hash tag shared by every key and stream of one symbol."""
    if not symbol or "{" in symbol or "}" in symbol:
        raise ValueError(f"bad symbol for a key name: {symbol!r}")
    return f"{{{symbol}}}"


# --- streams not per symbol (own tag: the dead-letter stream shares the slot) ----------
WS_STREAM = "massive:{ws}:stream"
CONTROL_STREAM = "massive:{control}:stream"  # e.g. dormancy -> "refresh chain now"
# ChainPointer entries of every symbol (chain-poller -> normalizer). The chain-poller's MULTI
# adds the pointer and its SpotTick together: the spot stream shares the {chain} tag. The
# blob a pointer names is per symbol (another slot) and is written before the MULTI.
CHAIN_STREAM = "massive:{chain}:stream"
SPOT_STREAM = "massive:{chain}:spot:stream"  # SpotTick (read by ``record`` only)


# --- per-symbol streams ----------------------------------------------------------------
def contracts_dirty_stream(symbol: str) -> str:
    """DirtyEntry of one symbol (normalizer, hydrator -> tile builders)."""
    return f"massive:contracts:dirty:{tag(symbol)}"


def tiles_stream(strategy: str, symbol: str) -> str:
    return f"massive:tiles:{strategy}:{tag(symbol)}"


def heatmap_diffs_stream(strategy: str, symbol: str) -> str:
    return f"massive:heatmap:diffs:{strategy}:{tag(symbol)}"


def gex_diffs_stream(symbol: str) -> str:
    return f"massive:gex:diffs:{tag(symbol)}"


def gex_levels_stream(symbol: str) -> str:
    """Stream of GexLevels (spot, zero gamma, walls) on every GEX publish; trimmed by age
    (``MASSIVE_GEX_HISTORY_RETENTION_S``) by the GEX builder on every XADD."""
    return f"massive:gex:levels:{tag(symbol)}"


DEAD_SUFFIX = ":dead"


def dead_letter_stream(stream: str) -> str:
    """``<stream>:dead``: same hash tag, so the move (XADD dead + XACK) is one slot. Every
    stream of the pipeline has a tag; a stream without one (a test's, an operator's) gets
    ``{<stream>}:dead``, which hashes exactly as the untagged stream does."""
    if "{" not in stream:
        return f"{{{stream}}}{DEAD_SUFFIX}"
    return f"{stream}{DEAD_SUFFIX}"


def symbol_streams(symbols: Iterable[str]) -> list[str]:
    """Every per-symbol stream of ``symbols`` (monitor, retention, replay)."""
    out: list[str] = []
    for s in symbols:
        out.append(contracts_dirty_stream(s))
        out += [tiles_stream(st, s) for st in STRATEGIES]
        out += [heatmap_diffs_stream(st, s) for st in STRATEGIES]
        out += [gex_diffs_stream(s), gex_levels_stream(s)]
    return out


# --- consumer groups -----------------------------------------------------------------
NORMALIZER_GROUP = "normalizer"
HYDRATOR_GROUP = "hydrator"
PUBLISHER_GROUP = "publisher"
CHAIN_POLLER_CONTROL_GROUP = "chain-poller"


def tile_builder_group(strategy: str) -> str:
    return f"tiles-{strategy}"


# --- chain snapshots -----------------------------------------------------------------
def chain_snapshot(symbol: str, ts_ns: int, scope: str = "window") -> str:
    """Blob of one chain fetch: the heatmap window, or the whole chain (scope ``full``)."""
    if scope == "full":
        return f"massive:chain:snapshot:{tag(symbol)}:full:{ts_ns}"
    return f"massive:chain:snapshot:{tag(symbol)}:{ts_ns}"


def chain_band(symbol: str) -> str:
    """HASH spot, set_ns: the chain-poller's strike-band anchor (processors/ingest/strike_band.py),
    kept across poller restarts so a restart does not move the band."""
    return f"massive:chain:band:{tag(symbol)}"


# --- epochs --------------------------------------------------------------------------
def epoch_active(symbol: str) -> str:
    """STRING: the symbol's active epoch id (the promotion MULTI writes it)."""
    return f"massive:epoch:active:{tag(symbol)}"


def epoch_index(symbol: str) -> str:
    """ZSET epoch_id -> created ns of the symbol's epochs (sweep, inspection)."""
    return f"massive:epoch:index:{tag(symbol)}"


def epoch_key_prefix(symbol: str, eid: str) -> str:
    """``epoch:{<SYM>}:<eid>:`` -- every key of the epoch starts with it."""
    return f"epoch:{tag(symbol)}:{eid}:"


def epoch_meta(symbol: str, eid: str) -> str:
    return f"{epoch_key_prefix(symbol, eid)}meta"


def epoch_contract(symbol: str, eid: str, cid: str) -> str:
    return f"{epoch_key_prefix(symbol, eid)}contract:{cid}"


def epoch_contract_prefix(symbol: str, eid: str) -> str:
    return f"{epoch_key_prefix(symbol, eid)}contract:"


def epoch_by_strike(symbol: str, eid: str) -> str:
    return f"{epoch_key_prefix(symbol, eid)}by_strike"


def epoch_by_expiry(symbol: str, eid: str) -> str:
    return f"{epoch_key_prefix(symbol, eid)}by_expiry"


def epoch_contracts(symbol: str, eid: str) -> str:
    """SET of every contract id of the epoch (its frozen topology)."""
    return f"{epoch_key_prefix(symbol, eid)}contracts"


def epoch_gex(symbol: str, eid: str) -> str:
    """HASH cid -> packed GEX projection (gamma, oi, iv, strike, expiry, type)."""
    return f"{epoch_key_prefix(symbol, eid)}gex"


def epoch_fixed_keys(symbol: str, eid: str) -> list[str]:
    """The epoch's keys apart from its contract hashes (whose names the ``contracts`` SET
    gives): retiring or deleting an epoch needs these and that SET, never a SCAN."""
    return [
        epoch_meta(symbol, eid),
        epoch_contracts(symbol, eid),
        epoch_by_strike(symbol, eid),
        epoch_by_expiry(symbol, eid),
        epoch_gex(symbol, eid),
    ]


# --- heatmap -------------------------------------------------------------------------
def heatmap_staging(symbol: str, strategy: str) -> str:
    """HASH tile_id -> ``<seq>:<view json>`` (processors.heatmap.grid.staged_value)."""
    return f"heatmap:{tag(symbol)}:{strategy}:staging"


def heatmap_manifest(symbol: str, strategy: str) -> str:
    """HASH epoch, created_ns, expected, built_ns: which epoch the staging hash holds."""
    return f"heatmap:{tag(symbol)}:{strategy}:manifest"


def heatmap_build(symbol: str, strategy: str, consumer: str) -> str:
    """Temporary HASH a builder fills during a full epoch build (renamed onto staging)."""
    return f"heatmap:{tag(symbol)}:{strategy}:build:{consumer}"


def heatmap_model(symbol: str, strategy: str) -> str:
    return f"massive:heatmap:model:{tag(symbol)}:{strategy}"


def heatmap_model_tmp(symbol: str, strategy: str, token: int) -> str:
    """STRING a publisher leader (fencing ``token``) writes a checkpoint into, piece by piece,
    before its fenced script renames it onto the model key (lua/heatmap_checkpoint.lua);
    expires on its own if the writer dies."""
    return f"massive:heatmap:model:{tag(symbol)}:{strategy}:tmp:{token}"


def heatmap_version(symbol: str, strategy: str) -> str:
    """Current published version (integer) of the heatmap model of (symbol, strategy)."""
    return f"massive:heatmap:version:{tag(symbol)}:{strategy}"


def heatmap_head(symbol: str, strategy: str) -> str:
    """Stream id of the diff that produced the current version (the chain's head; the next
    diff's ``prev_id``). Written with the version key by the publish script."""
    return f"massive:heatmap:head:{tag(symbol)}:{strategy}"


def publisher_lease(symbol: str, strategy: str) -> str:
    """The leader lease of the heatmap publisher of (symbol, strategy)."""
    return f"massive:heatmap:leader:{tag(symbol)}:{strategy}"


def publisher_fence(symbol: str, strategy: str) -> str:
    """Counter INCRed on every lease acquisition: the fencing token (lease epoch)."""
    return f"massive:heatmap:leader:{tag(symbol)}:{strategy}:fence"


# --- GEX -----------------------------------------------------------------------------
def gex_model(symbol: str) -> str:
    return f"massive:gex:model:{tag(symbol)}"


def gex_model_calls(symbol: str) -> str:
    return f"massive:gex:model:{tag(symbol)}:calls"


def gex_model_puts(symbol: str) -> str:
    return f"massive:gex:model:{tag(symbol)}:puts"


def gex_head(symbol: str) -> str:
    """Stream id of the GEX diff that produced the current model version (see heatmap_head)."""
    return f"massive:gex:head:{tag(symbol)}"


def gex_source(symbol: str) -> str:
    """HASH ts_ns, spot, data: the latest full-chain GEX source of the symbol
    (schemas.messages.GexSource msgpack in ``data``), written by the normalizer from a
    full-chain snapshot; expires with ``MASSIVE_NORMALIZER_GEX_SOURCE_TTL_S``."""
    return f"massive:gex:source:{tag(symbol)}"


def gex_lease(symbol: str) -> str:
    """The leader lease of the GEX builder of one symbol."""
    return f"massive:gex:leader:{tag(symbol)}"


def gex_fence(symbol: str) -> str:
    """Counter INCRed on every GEX lease acquisition: the fencing token (lease epoch)."""
    return f"massive:gex:leader:{tag(symbol)}:fence"


# --- single keys (each read and written alone) --------------------------------------
WS_LAST_EVENT = "massive:ws:last_event_ns"

# Latest spot: HASH field "<SYM>" -> value, "<SYM>:ts_ns" -> its event time (ns).
# Written with admission (newer ts only, spot.lua) by the normalizer (chain underlying
# value) and the hydrator (WS events); read by tile builders and the GEX builder.
SPOT_LATEST = "massive:spot:latest"
