"""Liveness and readiness over HTTP: ``/metrics``, ``/healthz`` (no loop stuck, see
:mod:`streams.heartbeat`, and Redis PING), ``/readyz`` (every processor ready). A Starlette
app served by uvicorn on ``MASSIVE_METRICS_PORT`` (see :func:`streams.runner.run_processors`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from streams.processor import Deps, Processor


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers (the runner owns SIGTERM/SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def health_app(deps: Deps, processors: Sequence[Processor]) -> Starlette:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(deps.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        stuck = deps.heartbeats.stuck(deps.settings.liveness_s)
        if stuck:
            return PlainTextResponse(f"stuck: {','.join(stuck)}\n", status_code=503)
        try:
            await asyncio.wait_for(deps.redis.ping(), 2)
        except Exception as exc:  # any failure is "unhealthy"
            return PlainTextResponse(f"redis: {exc}\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        waiting = [p.name for p in processors if not p.ready]
        if waiting:
            return PlainTextResponse(f"not ready: {','.join(waiting)}\n", status_code=503)
        return PlainTextResponse("ready\n")

    return Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )


def health_server(
    deps: Deps, processors: Sequence[Processor], port: int, host: str = "0.0.0.0"
) -> QuietServer:
    config = uvicorn.Config(
        health_app(deps, processors),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    return QuietServer(config)
