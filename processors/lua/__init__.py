"""Every Lua script of the pipeline: the epoch stages (normalizer, hydrator), the contract
reads (tile builder legs, the normalizer's carry), heatmap staging, the publishers' fenced
lease and their publish scripts. Status codes the scripts return are the IntEnums below.

The ``.lua`` files are package data read through importlib.resources. Every script declares
every key it touches in KEYS (no name is built from ARGV) and those keys share ONE hash slot
(one symbol's ``{<SYM>}`` keys: its epochs, staging, publisher and GEX keys; or the single
spot hash), so the scripts stay valid on Redis Cluster (tests/test_cluster_slots.py). All
timestamps are passed as decimal strings and compared as strings (length first, then
lexicographically): Lua numbers are doubles and cannot hold every nanosecond timestamp
exactly.

Scripts are queued on pipelines as plain ``EVALSHA`` (redis-py's own pipeline script support
sends ``SCRIPT EXISTS`` before every execute: one extra round trip per batch). ``execute``
recovers from ``NOSCRIPT`` (Redis restarted, SCRIPT FLUSH) by loading the scripts and
rebuilding the pipeline once; callers only queue idempotent commands next to scripts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

NAMES = (
    "hydrate",
    "seed",
    "build",
    "spot",
    "expire_keys",
    "fetch",
    "gex_source",
    "stage",
    "install",
    "lease_acquire",
    "lease_renew",
    "lease_release",
    "heatmap_publish",
    "heatmap_checkpoint",
    "gex_publish",
)


class EpochWrite(IntEnum):
    """First element of hydrate.lua / seed.lua replies."""

    APPLIED = 0
    NOT_ACTIVE = 1  # the epoch is not in the required state: nothing written


class Build(IntEnum):
    """build.lua: the number of contracts written, or NOT_WARMING."""

    NOT_WARMING = -1


class GexSource(IntEnum):
    WRITTEN = 1
    NOT_NEWER = 0


class Stage(IntEnum):
    """stage.lua: one per tile, or WRONG_EPOCH for the whole call."""

    ADMITTED = 1
    EQUAL = 0
    OLDER = -1
    WRONG_EPOCH = -9


class Install(IntEnum):
    INSTALLED = 1
    ALREADY_INSTALLED = 0  # this epoch is staged: the build is dropped, admission merges
    SUPERSEDED = -1  # a newer epoch is staged


class Publish(IntEnum):
    """heatmap_publish.lua (first element of the reply); also heatmap_checkpoint.lua (OK,
    FENCED, MOVED, TORN)."""

    OK = 1
    FENCED = -1
    LEASE_HELD = -2  # by another owner
    INACTIVE_EPOCH = -3
    MOVED = -4  # version is not current + 1, or prev id is not the chain head
    ID_TOO_LOW = -5  # diff id not above the stream's last id (second element: that id)
    TORN = -6  # a checkpoint (or a snapshot version's): the temp key is not what was written


class GexPublish(IntEnum):
    """gex_publish.lua: the diff id, or one of these."""

    FENCED = -1  # a stale leader
    MOVED = 0  # prev id is not the chain head: reload and rebuild


Arg = str | bytes | int | float


@cache
def source(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown Lua script {name!r}")
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Script:
    """One Lua script addressed by its SHA1."""

    def __init__(self, name: str, text: str | None = None) -> None:
        """The packaged script ``name``, or ``text`` under that name (tests' own scripts)."""
        self.name = name
        self.source = source(name) if text is None else text
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def queue(self, pipe: Pipeline, keys: Sequence[Arg], args: Sequence[Arg]) -> None:
        # (not pipe.evalsha: a cluster pipeline refuses that method, not the command)
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, redis: Redis) -> None:
        sha = await redis.script_load(self.source)
        if sha != self.sha:  # pragma: no cover - would mean a broken SHA1 computation
            raise RuntimeError(f"script {self.name}: server sha {sha} != {self.sha}")

    async def __call__(self, redis: Redis, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


@cache
def get(name: str) -> Script:
    return Script(name)


async def load_all(redis: Redis) -> None:
    for name in NAMES:
        await get(name).load(redis)


async def execute(
    redis: Redis, build: Callable[[Pipeline], None], *, transaction: bool = False
) -> list[Any]:
    """Build a pipeline with ``build`` and execute it; on NOSCRIPT load every script and
    build + execute it again (so ``build`` must only queue idempotent commands)."""
    for attempt in (0, 1):
        pipe = redis.pipeline(transaction=transaction)
        build(pipe)
        try:
            res: list[Any] = await pipe.execute()
            return res
        except NoScriptError:
            if attempt:
                raise
            await load_all(redis)
    raise AssertionError("unreachable")
