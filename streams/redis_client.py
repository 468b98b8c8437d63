"""The Redis client every processor uses: redis-py asyncio, with commands packed by hiredis.

redis-py's asyncio connection packs commands in pure Python (about 4 us per argument); an
XACK of a 500-entry batch or a pipeline of XADDs spent more time packing than Redis spent
executing. hiredis (already our reply parser) packs in C. Same wire bytes, same semantics.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError


class HiredisPackingConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py: a multi-word command name ("CONFIG GET") is split into arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None


def connect(url: str, **kwargs: Any) -> Redis:
    """``Redis.from_url`` with hiredis command packing (TCP connections only)."""
    if url.startswith("redis://"):
        kwargs.setdefault("connection_class", HiredisPackingConnection)
    return Redis.from_url(url, **kwargs)
