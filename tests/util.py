"""Test helpers: a private redis-server and condition polling (never bare sleeps)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from streams.local_redis import RedisServer, free_port

__all__ = ["FakeHttp", "RedisServer", "eventually", "free_port"]

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout_s: float = 5.0, interval_s: float = 0.02
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last={last!r})")
        await asyncio.sleep(interval_s)


class FakeHttp:
    """A tiny HTTP/1.1 server on a free loopback port: ``answer(target)`` returns (status,
    JSON-able body); every request target is recorded (a fake provider, or a host that must
    never be reached)."""

    def __init__(self, answer: Callable[[str], tuple[int, object]] | None = None) -> None:
        self.answer = answer or (lambda _target: (404, {"status": "NOT_FOUND"}))
        self.requests: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeHttp:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split(" ")
            target = parts[1] if len(parts) >= 2 else ""
            self.requests.append(target)
            status, body = self.answer(target)
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        finally:
            writer.close()
