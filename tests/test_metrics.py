"""Get-or-create metrics on explicit registries."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from streams import metrics


def test_same_registry_same_metric_and_fresh_registry_fresh_metric() -> None:
    a = CollectorRegistry()
    c1 = metrics.counter(a, "massive_t_total", "t", ("k",))
    assert metrics.counter(a, "massive_t_total", "t", ("k",)) is c1
    c1.labels(k="x").inc()
    # Registries come and go (one per test or per fuzz example); a new one must never get a
    # metric registered on an older one, even if CPython reuses the old object's id.
    for _ in range(30):
        del a
        gc.collect()
        a = CollectorRegistry()
        c = metrics.counter(a, "massive_t_total", "t", ("k",))
        c.labels(k="x").inc()
        assert a.get_sample_value("massive_t_total", {"k": "x"}) == 1.0
