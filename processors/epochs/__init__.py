"""Epochs: topology from chain snapshots (normalizer: stage, promote, carry, retire) and the
live contract values inside the active epoch (hydrator)."""
