"""The processors ``massive-pipeline run`` knows: name -> builder, in pipeline order.

``run <name>[:<arg>]`` calls ``builder(deps, arg)``, e.g. ``tile-builder:butterfly``. Importing
this module imports every stage, so every settings class is registered (the start-up check of
``MASSIVE_*`` names needs all of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from processors.epochs import hydrator, normalizer
from processors.gex import calculator as gex
from processors.heatmap import publisher, tile_builder
from processors.ingest import chain_poller, ws_ingest
from processors.ops import monitor
from processors.serve import gateway as sse_gateway
from schemas import symbols
from streams.processor import Deps, Processor

Builder = Callable[[Deps, "str | None"], Processor]


@dataclass(frozen=True, slots=True)
class Stage:
    build: Builder
    usage: str  # name[:arg] as typed after ``run``
    summary: str


PROCESSORS: dict[str, Stage] = {
    "chain-poller": Stage(
        chain_poller.build,
        "chain-poller[:SPX,...]",
        "REST chain snapshots -> massive:{chain}:stream",
    ),
    "ws-ingest": Stage(
        ws_ingest.build,
        "ws-ingest[:SPX,...]",
        "WebSocket trades, quotes, indices -> massive:{ws}:stream",
    ),
    "normalizer": Stage(normalizer.build, "normalizer", "chain snapshots -> epochs"),
    "hydrator": Stage(hydrator.build, "hydrator", "WS frames -> contract values of the epoch"),
    "tile-builder": Stage(
        tile_builder.build,
        "tile-builder:<strategy>",
        "dirty contracts -> staged heatmap tiles (single | vertical | butterfly)",
    ),
    "publisher": Stage(
        publisher.build, "publisher:<strategy>", "staged tiles -> heatmap model versions + diffs"
    ),
    "gex": Stage(gex.build, "gex[:SPX,...]", "whole chain -> GEX models and levels"),
    # Stays on pymalloc: with 1,000 clients over 20 views at 5,000 events/s, 30 s after they
    # all left (views dropped, trimmed) it held 229 and 252 MB under pymalloc, 167, 199 and
    # 285 MB under malloc (93-95 MB before clients), and 60 vs 69 kB per idle client: no gain
    # that the run-to-run spread does not cover (docs/performance.md, "SSE views").
    "sse-gateway": Stage(sse_gateway.build, "sse-gateway", "models -> browsers (SSE, dashboard)"),
    "monitor": Stage(monitor.build, "monitor", "Prometheus gauges of the Redis state, retention"),
}


def load(spec: str, deps: Deps) -> Processor:
    """``"tile-builder:butterfly"`` -> tile_builder.build(deps, "butterfly"), with the
    process's symbol specs taken from ``deps.settings`` (schemas/symbols.py)."""
    name, _, arg = spec.partition(":")
    stage = PROCESSORS.get(name)
    if stage is None:
        raise ValueError(f"unknown processor {name!r} (known: {', '.join(PROCESSORS)})")
    symbols.configure(deps.settings.symbol_specs, deps.settings.symbols)
    return stage.build(deps, arg or None)


def describe() -> str:
    """The processor list of ``run --help``."""
    width = max(len(s.usage) for s in PROCESSORS.values())
    return "\n".join(f"  {s.usage:<{width}}  {s.summary}" for s in PROCESSORS.values())
