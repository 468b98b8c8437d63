"""Each processor runs on the allocator its registry entry asks for (processors/registry.py
``Stage.system_malloc``): ``run`` re-executes itself with ``PYTHONMALLOC=malloc``."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors import registry
from processors.ops.cli import allocator_env
from tests import harness as h
from tests.util import RedisServer


def _environ(pid: int | None) -> dict[str, str]:
    assert pid is not None
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}


def test_the_choice_is_per_process_and_an_explicit_value_wins() -> None:
    assert registry.wants_system_malloc(["normalizer"])
    assert not registry.wants_system_malloc(["sse-gateway"])
    assert not registry.wants_system_malloc(["hydrator"])
    assert not registry.wants_system_malloc(["normalizer", "tile-builder:vertical"])
    assert not registry.wants_system_malloc(["no-such-processor"])
    assert not registry.wants_system_malloc([])
    env = allocator_env(["normalizer"], {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "PYTHONMALLOC": "malloc"}
    assert allocator_env(["normalizer"], {"PYTHONMALLOC": "pymalloc"}) is None
    assert allocator_env(["hydrator"], {}) is None


async def test_processes_started_by_run_carry_their_allocator(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    p = h.Pipeline(redis_server.url, tmp_path / "default", supervise=False)
    try:
        await p.start(["normalizer", "hydrator"])  # ready: past the point of the re-exec
        assert _environ(p.procs["normalizer"].pid).get("PYTHONMALLOC") == "malloc"
        assert "PYTHONMALLOC" not in _environ(p.procs["hydrator"].pid)
    finally:
        await p.stop()
    explicit = h.Pipeline(
        redis_server.url,
        tmp_path / "explicit",
        extra_env={"PYTHONMALLOC": "pymalloc"},
        supervise=False,
    )
    try:
        await explicit.start(["normalizer"])
        assert _environ(explicit.procs["normalizer"].pid).get("PYTHONMALLOC") == "pymalloc"
    finally:
        await explicit.stop()
