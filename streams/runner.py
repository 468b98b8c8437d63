"""Run several processors in one process: signals, health/metrics endpoint, grace period.

The processors run as one ``asyncio.TaskGroup``. SIGTERM/SIGINT, ``stop``, or the end of any
processor (a crash included) sets ``stop``; every processor then has ``grace_s`` to finish and
ack its batch (``asyncio.timeout``), and those still running are cancelled and awaited before
``run_processors`` returns: their cleanup (lease release, ws-ingest's final flush) runs while
the caller's Redis client is still open. Every processor error is raised then: one as itself,
several as an ``ExceptionGroup`` (``massive-pipeline`` prints each on one line).

SIGUSR1 logs the stack of every asyncio task of the process (WARNING, one record): what a
processor that is alive but makes no progress is waiting on (``kubectl exec <pod> -- kill
-USR1 1``; the e2e tests' harness sends it to every process when a test fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from typing import Any

from streams.health import health_server
from streams.processor import Deps, Processor

logger = logging.getLogger(__name__)


async def run_processors(
    deps: Deps,
    processors: Sequence[Processor],
    stop: asyncio.Event | None = None,
    *,
    install_signals: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``, or a processor ends); then give processors
    ``grace_s`` to finish and ack their batch before cancelling them (see the module doc).
    A processor that crashes stops the others and its error propagates (the process exits
    non-zero and Kubernetes restarts it)."""
    stop = stop or asyncio.Event()
    procs = list(processors)
    # one processor ending ends the process (Kubernetes restarts it): it sets ``stop``
    sup = Supervisor(stop)
    stopped = asyncio.Event()
    with _stop_on_signals(stop, install_signals):
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(sup.watch(p.run(stop)), name=p.name) for p in procs]
            if deps.settings.metrics_port:
                health = serve_health(deps, procs, stopped)
                tg.create_task(sup.watch(health), name="health")
            await stop.wait()
            await stop_within(tasks, deps.settings.grace_s)
            stopped.set()  # the endpoint answers probes until the processors are done
    sup.raise_errors("processors")


class Supervisor:
    """What the children of a supervisor's ``asyncio.TaskGroup`` share: the first to end sets
    ``ended`` (the supervisor then stops the others), and an error does not cancel its
    siblings: it is kept and raised by :meth:`raise_errors` once all have stopped, one as
    itself, several as an ``ExceptionGroup``. With ``late_errors=False`` an error raised
    after ``ended`` (a sibling failing of the same cause while stopping) is only logged."""

    def __init__(self, ended: asyncio.Event | None = None, *, late_errors: bool = True) -> None:
        self.ended = ended or asyncio.Event()
        self.late_errors = late_errors
        self.errors: list[Exception] = []

    async def watch(self, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:
            if self.late_errors or not self.ended.is_set():
                self.errors.append(exc)
            else:
                logger.debug("error while stopping: %r", exc)
        finally:
            self.ended.set()

    def raise_errors(self, what: str) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ExceptionGroup(f"{len(self.errors)} {what} failed", self.errors)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event, install: bool) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` while inside (when ``install``)."""
    if not install:
        yield
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, log_task_stacks)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def log_task_stacks() -> None:
    """Log where every task of the running loop waits: its chain of awaits, innermost last.
    (``Task.print_stack`` shows only the outermost frame of a suspended coroutine.)"""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    for t in tasks:
        out.write(f"task {t.get_name()}:\n")
        aw: Any = t.get_coro()
        for _ in range(200):  # an await chain is finite; the cap guards a cycle
            if aw is None:
                break
            frame = getattr(aw, "cr_frame", None) or getattr(aw, "gi_frame", None)
            frame = frame or getattr(aw, "ag_frame", None)
            if frame is None:
                out.write(f"  {aw!r}\n")  # the Future (or foreign awaitable) at the end
                break
            code = frame.f_code
            out.write(f"  {code.co_filename}:{frame.f_lineno} {code.co_qualname}\n")
            aw = (
                getattr(aw, "cr_await", None)
                or getattr(aw, "gi_yieldfrom", None)
                or getattr(aw, "ag_await", None)
            )
    logger.warning("%d asyncio tasks:\n%s", len(tasks), out.getvalue())


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """``asyncio.TaskGroup`` for a supervisor whose one failure is said as itself: a lone
    exception leaves unwrapped, several as the ``ExceptionGroup``."""
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except ExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], resend_s: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until every one has ended. A cancellation that a library
    swallowed (redis-py can surface it as a dead socket and retry) is sent again every
    ``resend_s``. Their errors are retrieved, not raised (the caller is stopping them); a
    cancellation of the caller meanwhile is raised once they have ended."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    interrupted: asyncio.CancelledError | None = None
    while pending:
        for t in pending:
            t.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=resend_s)
        except asyncio.CancelledError as exc:
            interrupted = exc
            pending = {t for t in pending if not t.done()}
    for t in tasks:
        if not t.cancelled():
            t.exception()
    if interrupted is not None:
        raise interrupted


async def stop_within(tasks: Sequence[asyncio.Task[Any]], grace_s: float) -> None:
    """Give ``tasks`` (already told to stop) ``grace_s`` to end; cancel those still running
    and wait until they have ended (:func:`cancel_and_wait`)."""
    try:
        async with asyncio.timeout(grace_s):
            if tasks:
                await asyncio.wait(tasks)
    except TimeoutError:
        late = [t for t in tasks if not t.done()]
        for t in late:
            logger.warning("%s did not stop within grace, cancelling", t.get_name())
        await cancel_and_wait(late)


async def serve_health(deps: Deps, processors: Sequence[Processor], until: asyncio.Event) -> None:
    """``/metrics``, ``/healthz``, ``/readyz`` on ``MASSIVE_METRICS_PORT`` until ``until``."""
    server = health_server(deps, processors, deps.settings.metrics_port)
    serving = asyncio.create_task(server.serve(), name="health:uvicorn")
    ended = asyncio.create_task(until.wait(), name="health:until")
    try:
        await asyncio.wait([serving, ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        ended.cancel()
        server.should_exit = True
        try:
            await serving
        except SystemExit:  # uvicorn exits the process when it cannot bind
            raise RuntimeError(
                f"cannot serve /metrics on port {deps.settings.metrics_port}"
            ) from None
    if not until.is_set():
        raise RuntimeError("the /metrics HTTP server stopped unexpectedly (see log)")
