"""Pipeline stages: one module per processor, each exposing ``build(deps, arg)``."""

from schemas.keys import STRATEGIES

# The data path from chain snapshots and WS frames to published models (what a replay drives).
MODEL_PATH = (
    "normalizer",
    "hydrator",
    *(f"tile-builder:{s}" for s in STRATEGIES),
    *(f"publisher:{s}" for s in STRATEGIES),
    "gex",
)
INGEST = ("chain-poller", "ws-ingest")
