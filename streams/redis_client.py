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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.logs import one_line, redact

# What "Redis cannot be reached" raises (refused, reset, DNS, timeout, loading); an admin
# command reports it on one line (:func:`unreachable`) and exits 2.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
)
# An admin command (lag, offsets, epoch, record, replay) waits this long to connect.
ADMIN_CONNECT_TIMEOUT_S = 5.0

# An argument at least this large is sent as its own buffer, not copied into the packed
# command: a 2 MB heatmap diff cost ~4 ms to pack and a 15 MB model checkpoint ~34 ms on the
# benchmark VM (redis-py's own packer has the same cut-off idea).
BIG_ARG_BYTES = 64 * 1024


class HiredisPackingConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py: a multi-word command name ("CONFIG GET") is split into arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            # (only short commands are scanned: those with thousands of arguments, HSET of a
            # tile batch or HMGET, have small ones, and the scan would cost more than it saves)
            if len(args) <= 16 and any(
                isinstance(a, bytes | memoryview) and len(a) >= BIG_ARG_BYTES for a in args
            ):
                return _pack_with_big_args(args)
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None


def _pack_with_big_args(args: tuple[Any, ...]) -> list[bytes]:
    """RESP of ``args`` as a list of buffers; big bytes arguments are not copied."""
    out: list[bytes] = []
    head = bytearray(b"*%d\r\n" % len(args))
    for a in args:
        if isinstance(a, bytes | memoryview) and len(a) >= BIG_ARG_BYTES:
            head += b"$%d\r\n" % len(a)
            out.append(bytes(head))
            out.append(a if isinstance(a, bytes) else a.tobytes())
            head = bytearray(b"\r\n")
            continue
        head += hiredis.pack_command((a,))[4:]  # "*1\r\n" + one bulk string: keep the bulk
    out.append(bytes(head))
    return out


def connect(url: str, **kwargs: Any) -> Redis:
    """``Redis.from_url`` with hiredis command packing (TCP connections only)."""
    if url.startswith("redis://"):
        kwargs.setdefault("connection_class", HiredisPackingConnection)
    return Redis.from_url(url, **kwargs)


def admin_client(url: str, **kwargs: Any) -> Redis:
    """A client for a one-shot command: gives up connecting after a few seconds."""
    kwargs.setdefault("socket_connect_timeout", ADMIN_CONNECT_TIMEOUT_S)
    return connect(url, **kwargs)


def unreachable(url: str, exc: BaseException) -> str:
    """The line a command prints when Redis cannot be reached: the URL without its password
    and the reason, no traceback."""
    return f"error: cannot reach Redis at {redact(url)}: {one_line(exc)}"


def as_str(v: object) -> str:
    """A Redis reply value as text (bytes decoded; a str or a number as it reads)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def opt_str(v: object) -> str | None:
    """:func:`as_str`, with None (a missing key or field) kept."""
    return None if v is None else as_str(v)
