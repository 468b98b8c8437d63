"""streams.memory: freed heap goes back to the OS."""

from __future__ import annotations

import os

from streams.memory import release_freed_memory


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_dropped_model_of_medium_values_is_returned_to_the_os() -> None:
    # values beyond CPython's small-object allocator, as staged tiles and diffs are
    model = {f"t{i}": os.urandom(8) * 90 for i in range(150_000)}
    keep = {k: model[k] for k in list(model)[::50]}  # a few survive, scattered in the heap
    before = _rss_mb()
    del model
    assert release_freed_memory()  # glibc: the test machines and the image are Debian
    after = _rss_mb()
    assert before - after > 50, (before, after)  # ~110 MB were freed
    assert len(keep) == 3000
