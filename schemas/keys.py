"""Every Redis stream, group and key name used by the pipeline (DESIGN.md "Redis keys").

Keys of one epoch share the hash tag ``{<eid>}`` so they live in one cluster slot.
Nothing outside this module spells a key or stream name.
"""

from __future__ import annotations

PREFIX = "massive"

# --- streams -------------------------------------------------------------------------
CHAIN_STREAM = "massive:chain:stream"
SPOT_STREAM = "massive:spot:stream"
WS_STREAM = "massive:ws:stream"
CONTRACTS_DIRTY_STREAM = "massive:contracts:dirty"
GEX_DIFFS_STREAM = "massive:gex:diffs"
CONTROL_STREAM = "massive:control:stream"  # e.g. dormancy -> "refresh chain now"

STRATEGIES = ("single", "vertical", "butterfly")


def tiles_stream(strategy: str) -> str:
    return f"massive:tiles:{strategy}"


def heatmap_diffs_stream(strategy: str) -> str:
    return f"massive:heatmap:diffs:{strategy}"


def dead_letter_stream(stream: str) -> str:
    return f"{stream}:dead"


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
        return f"massive:chain:snapshot:{symbol}:full:{ts_ns}"
    return f"massive:chain:snapshot:{symbol}:{ts_ns}"


def chain_band(symbol: str) -> str:
    """HASH spot, set_ns: the chain-poller's strike-band anchor (processors/ingest/strike_band.py),
    kept across poller restarts so a restart does not move the band."""
    return f"massive:chain:band:{symbol}"


# --- epochs --------------------------------------------------------------------------
EPOCH_ACTIVE = "massive:epoch:active"  # HASH symbol -> epoch_id
EPOCH_INDEX = "massive:epoch:index"  # ZSET epoch_id -> created ts (for inspection)


def epoch_meta(eid: str) -> str:
    return f"epoch:{{{eid}}}:meta"


def epoch_contract(eid: str, cid: str) -> str:
    return f"epoch:{{{eid}}}:contract:{cid}"


def epoch_contract_prefix(eid: str) -> str:
    return f"epoch:{{{eid}}}:contract:"


def epoch_by_strike(eid: str) -> str:
    return f"epoch:{{{eid}}}:by_strike"


def epoch_by_expiry(eid: str) -> str:
    return f"epoch:{{{eid}}}:by_expiry"


def epoch_contracts(eid: str) -> str:
    """SET of every contract id of the epoch (its frozen topology)."""
    return f"epoch:{{{eid}}}:contracts"


def epoch_gex_contract(eid: str, cid: str) -> str:
    return f"epoch:{{{eid}}}:gex:contract:{cid}"


def epoch_gex(eid: str) -> str:
    """HASH cid -> packed GEX projection (gamma, oi, iv, strike, expiry, type)."""
    return f"epoch:{{{eid}}}:gex"


def epoch_key_pattern(eid: str) -> str:
    return f"epoch:{{{eid}}}:*"


# --- heatmap -------------------------------------------------------------------------
def heatmap_staging(symbol: str, strategy: str) -> str:
    """HASH tile_id -> ``<seq>:<view json>`` (processors.heatmap.grid.staged_value)."""
    return f"heatmap:{{{symbol}:{strategy}}}:staging"


def heatmap_model(symbol: str, strategy: str) -> str:
    return f"massive:heatmap:model:{symbol}:{strategy}"


def publisher_lease(strategy: str) -> str:
    return f"massive:heatmap:leader:{strategy}"


# --- GEX -----------------------------------------------------------------------------
def gex_model(symbol: str) -> str:
    return f"massive:gex:model:{symbol}"


def gex_model_calls(symbol: str) -> str:
    return f"massive:gex:model:{symbol}:calls"


def gex_model_puts(symbol: str) -> str:
    return f"massive:gex:model:{symbol}:puts"


def gex_source(symbol: str) -> str:
    """HASH ts_ns, spot, data: the latest full-chain GEX source of the symbol
    (schemas.messages.GexSource msgpack in ``data``), written by the normalizer from a
    full-chain snapshot; expires with ``MASSIVE_NORMALIZER_GEX_SOURCE_TTL_S``."""
    return f"massive:gex:source:{symbol}"


def gex_levels_stream(symbol: str) -> str:
    """Stream of GexLevels (spot, zero gamma, walls) on every GEX publish; trimmed by age
    (``MASSIVE_GEX_HISTORY_RETENTION_S``) by the GEX builder on every XADD."""
    return f"massive:gex:levels:{symbol}"


def gex_lease() -> str:
    return "massive:gex:leader"


def gex_fence() -> str:
    """Counter INCRed on every GEX lease acquisition: the fencing token (lease epoch)."""
    return "massive:gex:leader:fence"


# --- liveness ------------------------------------------------------------------------
WS_LAST_EVENT = "massive:ws:last_event_ns"

# Latest index spot: HASH field "<SYM>" -> value, "<SYM>:ts_ns" -> its event time (ns).
# Written with admission (newer ts only) by the normalizer (chain underlying value) and the
# hydrator (WS V. events); read by tile builders and the GEX builder.
SPOT_LATEST = "massive:spot:latest"


# --- heatmap staging internals (tile builders; same hash tag as the staging HASH) ----
def heatmap_manifest(symbol: str, strategy: str) -> str:
    """HASH epoch, created_ns, expected, built_ns: which epoch the staging hash holds."""
    return f"heatmap:{{{symbol}:{strategy}}}:manifest"


def heatmap_build(symbol: str, strategy: str, consumer: str) -> str:
    """Temporary HASH a builder fills during a full epoch build (renamed onto staging)."""
    return f"heatmap:{{{symbol}:{strategy}}}:build:{consumer}"


# --- heatmap publisher internals -------------------------------------------------------
def publisher_fence(strategy: str) -> str:
    """Counter INCRed on every lease acquisition: the fencing token (lease epoch)."""
    return f"massive:heatmap:leader:{strategy}:fence"


def heatmap_version(symbol: str, strategy: str) -> str:
    """Current published version (integer) of massive:heatmap:model:{SYM}:{strategy}."""
    return f"massive:heatmap:version:{symbol}:{strategy}"


def heatmap_head(symbol: str, strategy: str) -> str:
    """Stream id of the diff that produced the current version (the chain's head; the next
    diff's ``prev_id``). Written with the version key by the publish script."""
    return f"massive:heatmap:head:{symbol}:{strategy}"


def gex_head(symbol: str) -> str:
    """Stream id of the GEX diff that produced the current model version (see heatmap_head)."""
    return f"massive:gex:head:{symbol}"


def epoch_key_prefix(eid: str) -> str:
    """``epoch:{<eid>}:`` -- every key of the epoch starts with it (Lua scripts append
    ``contract:<cid>``, ``contracts``, ``by_strike``, ``by_expiry``, ``gex``)."""
    return f"epoch:{{{eid}}}:"
