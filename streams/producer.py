"""Bounded XADD helpers (MAXLEN ~ N): every producer trims, nothing grows without bound."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

DEFAULT_MAXLEN = 500_000

Fields = Mapping[bytes | str, bytes | str | int | float]


async def xadd(redis: Redis, stream: str, fields: Fields, maxlen: int = DEFAULT_MAXLEN) -> bytes:
    eid: Any = await redis.xadd(stream, dict(fields), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return bytes(eid) if not isinstance(eid, bytes) else eid


def xadd_pipe(pipe: Pipeline, stream: str, fields: Fields, maxlen: int = DEFAULT_MAXLEN) -> Any:
    return pipe.xadd(stream, dict(fields), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
