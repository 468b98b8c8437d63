"""Simulated Massive API (REST + WebSocket) driven by a seeded market model."""
