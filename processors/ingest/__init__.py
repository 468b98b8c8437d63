"""Ingest: the provider's REST chain snapshots (chain-poller) and live WS frames (ws-ingest).

The strike band decides which part of the chain the poller asks for and subscribes to.
"""
