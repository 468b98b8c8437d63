"""Gamma exposure: the math and key levels (exposure) and the interval-driven stage that
builds and publishes them per symbol (calculator)."""
