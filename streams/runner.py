"""Run several processors in one process: signals, health/metrics endpoint, grace period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams.processor import Deps, Processor

logger = logging.getLogger(__name__)


async def serve_health(
    deps: Deps, processors: Sequence[Processor], port: int, host: str = "0.0.0.0"
) -> asyncio.Server:
    """Tiny HTTP endpoint: /metrics (Prometheus), /healthz (loop alive + Redis PING),
    /readyz (every processor ready)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "/"
            ctype = "text/plain; charset=utf-8"
            if path.startswith("/metrics"):
                status, body, ctype = 200, generate_latest(deps.registry), CONTENT_TYPE_LATEST
            elif path.startswith("/healthz"):
                try:
                    await asyncio.wait_for(deps.redis.ping(), 2)
                    status, body = 200, b"ok\n"
                except Exception as exc:  # any failure is "unhealthy"
                    status, body = 503, f"redis: {exc}\n".encode()
            elif path.startswith("/readyz"):
                waiting = [p.name for p in processors if not p.ready]
                status = 503 if waiting else 200
                body = (f"not ready: {','.join(waiting)}\n" if waiting else "ready\n").encode()
            else:
                status, body = 404, b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_client, host, port)


async def run_processors(
    deps: Deps,
    processors: Sequence[Processor],
    stop: asyncio.Event | None = None,
    *,
    install_signals: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``); then give processors ``grace_s`` to finish
    and ack their batch before cancelling. A processor that crashes stops the others and
    the error propagates (the process exits non-zero and Kubernetes restarts it)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    server = None
    if deps.settings.metrics_port:
        server = await serve_health(deps, processors, deps.settings.metrics_port)
    tasks = [asyncio.create_task(p.run(stop), name=p.name) for p in processors]
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=deps.settings.grace_s)
        for t in pending:
            logger.warning("processor %s did not stop within grace, cancelling", t.get_name())
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                exc = t.exception() if t.done() and not t.cancelled() else None
                if exc is not None:
                    raise exc
    finally:
        stopper.cancel()
        if server is not None:
            server.close()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
