"""Whole-pipeline harness for end-to-end fault tests and load benchmarks.

* :func:`redis_server` -- a private ``redis-server`` (``tests.util.RedisServer``), optionally
  durable: ``aof=True`` adds ``--appendonly yes --appendfsync always`` (data in the server's
  temp dir), so :meth:`DurableRedis.restart` (SIGKILL + start on the same port and dir)
  keeps every acknowledged write, like a Redis pod with a persistent AOF volume.
* :class:`Pipeline` -- processors as SUBPROCESSES (``python -m processors.ops.cli run <spec>``)
  with ``MASSIVE_*`` env settings, each with its own ``/metrics`` port and a stable consumer
  name. A supervisor task restarts any process that exits (like Kubernetes restarts a pod's
  container), so a test can ``kill(spec)`` with SIGKILL mid-flight and watch it come back.
* Recording/replay helpers: a recording is a list of ``processors.ops.replay.Record`` (chain
  pointers with their snapshot blobs, raw WS frames), produced once from the simulator by the
  real chain-poller + ws-ingest (+ normalizer, so ws-ingest has an epoch to subscribe to),
  and XADDed again into a fresh Redis by :func:`replay`.
* Model snapshots (:func:`published_models`), quiescence (:func:`wait_settled`: every
  consumer group of the pipeline has lag 0 and nothing pending AND the published versions
  stopped moving) and Prometheus text parsing (:func:`parse_metrics`).

Nothing here sleeps to wait for a condition except the polling loops with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
from redis.asyncio import Redis

from processors import INGEST, MODEL_PATH
from processors.ingest.chain_poller import PollerSettings
from processors.ops import replay as rp
from schemas import keys
from schemas.messages import (
    WS_PAYLOAD_FIELD,
    WS_RECV_FIELD,
    ChainPointer,
    ChainSnapshot,
    encode_snapshot,
    entry,
    from_entry,
)
from streams import admin
from streams.local_redis import die_with_parent
from tests.util import RedisServer, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Processors of the data path downstream of ingestion (what a replay drives).
DOWNSTREAM = MODEL_PATH

# Settings shared by every test process: fast polling and reclaim, quiet logs.
BASE_ENV = {
    "MASSIVE_LOG_LEVEL": "WARNING",
    "MASSIVE_BLOCK_MS": "100",
    "MASSIVE_MIN_IDLE_MS": "1000",
    "MASSIVE_RECLAIM_INTERVAL_S": "0.3",
    "MASSIVE_MAX_DELIVERIES": "5",
    "MASSIVE_GRACE_S": "5",
    # publishers / GEX: short leases so a SIGKILLed leader is replaced within ~2 s
    "MASSIVE_PUBLISHER_LEASE_TTL_MS": "1200",
    "MASSIVE_PUBLISHER_RENEW_MS": "400",
    "MASSIVE_PUBLISHER_MAX_INTERVAL_MS": "250",
    "MASSIVE_GEX_LEASE_TTL_MS": "1200",
    "MASSIVE_GEX_INTERVAL_S": "0.5",
    "MASSIVE_GEX_POLL_S": "0.1",
    # dollar GEX at the live spot: otherwise the dollar reference spot depends on WHEN
    # builds ran (history), and two runs of one input could differ legitimately
    "MASSIVE_GEX_DOLLAR_SPOT_STEP_BP": "0",
    "MASSIVE_SYMBOLS": "SPX",
    "PYTHONUNBUFFERED": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


def sim_env(rest_url: str, ws_url: str, api_key: str, **extra: str) -> dict[str, str]:
    """Env of chain-poller + ws-ingest pointed at a simulator (SPX only, small chain)."""
    env = {
        "MASSIVE_POLLER_API_KEY": api_key,
        "MASSIVE_POLLER_REST_URL": rest_url,
        "MASSIVE_SYMBOLS": "SPX",
        "MASSIVE_POLLER_EXPIRATIONS": "1",
        "MASSIVE_POLLER_BAND_POINTS": "150",
        "MASSIVE_POLLER_MIN_INTERVAL_S": "2",
        "MASSIVE_POLLER_BACKOFF_BASE_S": "0.05",
        "MASSIVE_POLLER_BACKOFF_MAX_S": "0.3",
        "MASSIVE_POLLER_RETRY_AFTER_MAX_S": "0.5",
        "MASSIVE_POLLER_CONTROL_BLOCK_MS": "100",
        "MASSIVE_POLLER_REFRESH_MIN_GAP_S": "0.05",
        "MASSIVE_WS_API_KEY": api_key,
        "MASSIVE_WS_URL": ws_url,
        "MASSIVE_WS_MARKET_HOURS": "always",
        "MASSIVE_WS_EPOCH_POLL_S": "0.2",
        "MASSIVE_WS_RECONNECT_BASE_S": "0.05",
        "MASSIVE_WS_RECONNECT_MAX_S": "0.3",
        "MASSIVE_WS_SILENCE_S": "1.0",
        "MASSIVE_WS_INDICES": "false",
    }
    env.update(extra)
    return env


# --- Redis --------------------------------------------------------------------------------
class DurableRedis(RedisServer):
    """A private redis-server; with ``aof`` every write is fsynced to the AOF in its temp
    dir, and :meth:`restart` kills it hard and starts it again on the same port and dir."""

    def __init__(self, *extra: str, aof: bool = False) -> None:
        more = ("--appendonly", "yes", "--appendfsync", "always") if aof else ()
        super().__init__(*more, *extra)
        self.aof = aof

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def restart(self, ready_timeout_s: float = 120.0) -> None:
        self.kill()
        self.start(ready_timeout_s)


def resilient_client(url: str) -> Redis:
    """The test's own (read-mostly) client: retries a command on a connection that died
    with a Redis restart, so the test observes the pipeline, not its own stale socket."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnError
    from redis.exceptions import TimeoutError as RedisTimeout

    return Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 20),
        retry_on_error=[RedisConnError, RedisTimeout, OSError],
    )


def redis_server(aof: bool = False) -> DurableRedis:
    srv = DurableRedis(aof=aof)
    srv.start()
    return srv


# --- supervised processor subprocesses ----------------------------------------------------
@dataclass
class Proc:
    spec: str  # e.g. "tile-builder:butterfly"
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)  # return codes seen by the supervisor

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 -- owned by the child
        log.write(f"--- start #{self.starts} {time.time():.3f}\n".encode())
        log.flush()
        self.popen = subprocess.Popen(
            [PY, "-m", "processors.ops.cli", "run", self.spec],
            env=self.env,
            cwd=str(ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> int | None:
        """Return code if this incarnation exited (with or without a supervisor)."""
        return None if self.popen is None else self.popen.poll()


def _slug(spec: str) -> str:
    return spec.replace(":", "-")


class Pipeline:
    """Processors as supervised subprocesses sharing one Redis.

    ``extra_env`` is added to every process (after :data:`BASE_ENV`); ``per_env`` maps a spec
    to env just for it. Each process gets ``MASSIVE_CONSUMER=<spec>-0`` (stable across
    restarts, like a StatefulSet pod name, so a restart drains its own pending entries) and a
    free ``MASSIVE_METRICS_PORT``."""

    def __init__(
        self,
        redis_url: str,
        log_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        per_env: Mapping[str, Mapping[str, str]] | None = None,
        restart_delay_s: float = 0.2,
        supervise: bool = True,
    ) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.per_env = {k: dict(v) for k, v in (per_env or {}).items()}
        self.restart_delay_s = restart_delay_s
        self.supervise = supervise
        self.procs: dict[str, Proc] = {}
        self._sup: asyncio.Task[None] | None = None
        self._stopping = False
        log_dir.mkdir(parents=True, exist_ok=True)

    def env_for(self, spec: str, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MASSIVE_")}
        env.update(BASE_ENV)
        env.update(self.extra_env)
        env.update(self.per_env.get(spec, {}))
        env.update(
            MASSIVE_REDIS_URL=self.redis_url,
            MASSIVE_CONSUMER=f"{_slug(spec)}-0",
            MASSIVE_METRICS_PORT=str(port),
        )
        return env

    def add(self, spec: str) -> Proc:
        port = free_port()
        p = Proc(spec, self.env_for(spec, port), self.log_dir / f"{_slug(spec)}.log", port)
        self.procs[spec] = p
        p.start()
        return p

    async def start(self, specs: Iterable[str], ready_timeout_s: float = 60.0) -> None:
        for s in specs:
            self.add(s)
        if self._sup is None and self.supervise:
            self._sup = asyncio.create_task(self._supervise(), name="supervisor")
        await self.wait_ready(list(self.procs), ready_timeout_s)

    async def _supervise(self) -> None:
        """Restart processes that exited (SIGKILL, crash) after ``restart_delay_s``."""
        while not self._stopping:
            for p in list(self.procs.values()):
                if p.popen is not None and p.popen.poll() is not None and not self._stopping:
                    p.exits.append(int(p.popen.returncode))
                    await asyncio.sleep(self.restart_delay_s)
                    if not self._stopping:
                        p.start()
            await asyncio.sleep(0.05)

    def kill(self, spec: str, sig: int = signal.SIGKILL) -> int:
        """Signal a processor (default SIGKILL); the supervisor restarts it. Returns the pid."""
        p = self.procs[spec]
        assert p.popen is not None and p.alive(), f"{spec} is not running"
        pid = p.popen.pid
        os.kill(pid, sig)
        return pid

    async def wait_restarted(self, spec: str, old_pid: int, timeout_s: float = 30.0) -> None:
        p = self.procs[spec]
        deadline = time.monotonic() + timeout_s
        while not (p.alive() and p.pid != old_pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"{spec} was not restarted within {timeout_s}s")
            await asyncio.sleep(0.02)
        await self.wait_ready([spec], timeout_s)

    async def _get(self, spec: str, path: str, wait_s: float = 2.0) -> httpx.Response | None:
        p = self.procs[spec]
        try:
            async with httpx.AsyncClient(timeout=wait_s) as c:
                return await c.get(f"http://127.0.0.1:{p.metrics_port}{path}")
        except httpx.HTTPError:
            return None

    async def wait_ready(self, specs: Sequence[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(specs)
        while waiting:
            still = []
            for s in waiting:
                r = await self._get(s, "/readyz")
                if r is None or r.status_code != 200:
                    still.append(s)
            waiting = still
            if waiting and time.monotonic() > deadline:
                tails = {s: self.log_tail(s) for s in waiting}
                raise AssertionError(f"not ready within {timeout_s}s: {tails}")
            if waiting:
                await asyncio.sleep(0.1)

    async def metrics(self, spec: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        r = await self._get(spec, "/metrics")
        if r is None or r.status_code != 200:
            return {}
        return parse_metrics(r.text)

    def log_tail(self, spec: str, n: int = 30) -> str:
        try:
            lines = self.procs[spec].log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def cpu_seconds(self, spec: str) -> float:
        """utime + stime of the CURRENT incarnation (``/proc/<pid>/stat``)."""
        pid = self.procs[spec].pid
        return proc_cpu_seconds(pid) if pid is not None else 0.0

    async def dump_tasks(self, wait_s: float = 2.0) -> None:
        """SIGUSR1 to every live process (``streams.runner`` logs its asyncio tasks) and
        wait until each log has grown; print where the logs are."""
        sizes: dict[str, int] = {}
        for spec, p in self.procs.items():
            if p.alive() and p.popen is not None:
                sizes[spec] = _size(p.log_path)
                p.popen.send_signal(signal.SIGUSR1)

        async def logged() -> bool:
            return all(_size(self.procs[s].log_path) > n for s, n in sizes.items())

        with contextlib.suppress(AssertionError):  # a process too stuck to answer: go on
            await eventually(logged, timeout_s=wait_s, interval_s=0.05)
        print(f"asyncio task stacks of {sorted(sizes)} logged in {self.log_dir}")

    async def stop(self) -> None:
        self._stopping = True
        if self._sup is not None:
            self._sup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sup
            self._sup = None
        for p in self.procs.values():
            if p.alive():
                assert p.popen is not None
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for p in self.procs.values():
            if p.popen is None:
                continue
            while p.popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait(5)


@contextlib.asynccontextmanager
async def pipeline(
    redis_url: str,
    log_dir: Path,
    specs: Iterable[str],
    extra_env: Mapping[str, str] | None = None,
    per_env: Mapping[str, Mapping[str, str]] | None = None,
    supervise: bool = True,
) -> AsyncIterator[Pipeline]:
    """Processors as subprocesses; ``supervise=False``: nobody restarts what exits (a test
    of in-process recovery must not hide a crash behind a restart)."""
    p = Pipeline(redis_url, log_dir, extra_env, per_env, supervise=supervise)
    try:
        await p.start(specs)
        yield p
    except BaseException:
        await p.dump_tasks()  # where each process waits, in its log, before it is stopped
        raise
    finally:
        await p.stop()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    rest = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(rest[11]) + int(rest[12])) / ticks


# --- Prometheus text ----------------------------------------------------------------------
def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, frozenset(labels)): value}`` from the Prometheus text format."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        labels: frozenset[tuple[str, str]] = frozenset()
        name = name_labels
        if "{" in name_labels:
            name, _, body = name_labels.partition("{")
            pairs = []
            for part in body.rstrip("}").split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    pairs.append((k.strip(), v.strip().strip('"')))
            labels = frozenset(pairs)
        try:
            out[(name, labels)] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# --- recordings ---------------------------------------------------------------------------
RECORDED_STREAMS = (keys.CHAIN_STREAM, keys.WS_STREAM)


async def record(redis: Redis) -> list[rp.Record]:
    """Everything on the chain and WS streams, in receive-time order, blobs included."""
    records, _ = await rp.record_range(redis, list(RECORDED_STREAMS))
    return records


def split_at_first_chain(records: Sequence[rp.Record]) -> tuple[list[rp.Record], list[rp.Record]]:
    """(records up to and including the first chain pointer, the rest)."""
    for i, r in enumerate(records):
        if r.stream == keys.CHAIN_STREAM:
            return list(records[: i + 1]), list(records[i + 1 :])
    raise ValueError("the recording has no chain snapshot")


def ws_event_counts(records: Iterable[rp.Record]) -> dict[str, int]:
    """Events per kind (Q/T/V/other) in the recorded WS frames (the count going in)."""
    from schemas.massive import IndexValue, Quote, Trade, decode_frame

    out = {"quote": 0, "trade": 0, "index": 0, "other": 0, "frames": 0}
    for r in records:
        if r.stream != keys.WS_STREAM:
            continue
        out["frames"] += 1
        payload = dict(r.fields).get(b"payload", b"")
        for ev in decode_frame(payload).events:
            kind = {Quote: "quote", Trade: "trade", IndexValue: "index"}.get(type(ev), "other")
            out[kind] += 1
    return out


async def replay(
    redis: Redis, records: Sequence[rp.Record], speed: float | None = None
) -> rp.ReplayStats:
    return await rp.replay_records(redis, records, speed=speed)


# --- published state ----------------------------------------------------------------------
class _Model(msgspec.Struct):
    version: int
    epoch: str
    items: dict[str, Any]


_model_dec = msgspec.json.Decoder(_Model)


def model_keys(symbol: str = "SPX") -> list[str]:
    return [keys.heatmap_model(symbol, s) for s in keys.STRATEGIES] + [keys.gex_model(symbol)]


async def published_models(redis: Redis, symbol: str = "SPX") -> dict[str, _Model | None]:
    names = model_keys(symbol)
    raw = await redis.mget(names)
    return {
        n: (_model_dec.decode(v) if v is not None else None)
        for n, v in zip(names, raw, strict=True)
    }


async def versions(redis: Redis, symbol: str = "SPX") -> dict[str, int | None]:
    return {
        k: (m.version if m else None) for k, m in (await published_models(redis, symbol)).items()
    }


async def wait_settled(
    redis: Redis,
    timeout_s: float = 60.0,
    quiet_s: float = 1.5,
    symbol: str = "SPX",
    require_models: bool = True,
) -> dict[str, _Model | None]:
    """Wait until no consumer group of the pipeline has unread or pending entries (counted
    by :func:`backlog`, not XINFO's ``lag``), and the published versions did not move for
    ``quiet_s``; returns the models."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, int | None] | None = None
    since = time.monotonic()
    while True:
        busy = await backlog(redis)
        cur = await versions(redis, symbol)
        complete = not require_models or all(v is not None for v in cur.values())
        if busy or cur != last or not complete:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return await published_models(redis, symbol)
        if time.monotonic() > deadline:
            raise AssertionError(f"pipeline not settled in {timeout_s}s: busy={busy} v={cur}")
        await asyncio.sleep(0.1)


@dataclass
class Backlog:
    stream: str
    group: str
    unread: int  # entries after the group's last-delivered-id (XRANGE, exact)
    pending: int
    redis_lag: int | None  # what XINFO GROUPS says (entries-added - entries-read)


async def _groups(redis: Redis) -> list[Backlog]:
    names = rp.pipeline_streams()
    pipe = redis.pipeline(transaction=False)
    for n in names:
        pipe.exists(n)
    present = [n for n, e in zip(names, await pipe.execute(), strict=True) if e]
    out: list[Backlog] = []
    for g in await admin.lag(redis, present):
        after: Any = await redis.xrange(g.stream, min="(" + g.last_delivered_id, count=10_000)
        out.append(Backlog(g.stream, g.group, len(after), g.pending, g.lag))
    return out


async def backlog(redis: Redis) -> list[Backlog]:
    """Groups of the pipeline's streams with unread or pending entries. ``unread`` is
    counted with XRANGE after last-delivered-id, because XINFO's ``lag`` derives from
    ``entries-read``, which can be stale after Redis reloads its AOF (seen with 7.0.15:
    lag stuck at N > 0 with nothing left to read); the Redis figure is kept for reporting."""
    return [b for b in await _groups(redis) if b.unread or b.pending]


async def lag_disagreements(redis: Redis) -> list[Backlog]:
    """Groups whose XINFO lag differs from the exact unread count (reporting only)."""
    return [b for b in await _groups(redis) if b.redis_lag != b.unread]


async def wait_epoch(redis: Redis, symbol: str = "SPX", timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        eid = await redis.get(keys.epoch_active(symbol))
        if eid:
            return eid.decode() if isinstance(eid, bytes) else str(eid)
        if time.monotonic() > deadline:
            raise AssertionError(f"no active {symbol} epoch within {timeout_s}s")
        await asyncio.sleep(0.05)


def chain_pointers(records: Iterable[rp.Record]) -> list[ChainPointer]:
    return [
        from_entry(dict(r.fields), ChainPointer) for r in records if r.stream == keys.CHAIN_STREAM
    ]


def diff_models(a: Mapping[str, _Model | None], b: Mapping[str, _Model | None]) -> list[str]:
    """Human-readable differences between two sets of published models (items + epoch)."""
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        ma, mb = a.get(k), b.get(k)
        if ma is None or mb is None:
            if ma is not mb:
                out.append(f"{k}: present in one run only")
            continue
        if ma.epoch != mb.epoch:
            out.append(f"{k}: epoch {ma.epoch} != {mb.epoch}")
        ka, kb = set(ma.items), set(mb.items)
        if ka != kb:
            out.append(f"{k}: item ids differ ({len(ka - kb)} only in A, {len(kb - ka)} in B)")
        bad = [i for i in ka & kb if ma.items[i] != mb.items[i]]
        if bad:
            i = sorted(bad)[0]
            out.append(f"{k}: {len(bad)} items differ, e.g. {i}: {ma.items[i]} != {mb.items[i]}")
    return out


# --- producing a recording from the simulator ---------------------------------------------
@dataclass
class Recording:
    records: list[rp.Record]
    sim_events: dict[str, int]  # what the simulator says it sent, by kind
    n_contracts: int


async def make_recording(
    log_dir: Path,
    seconds: float = 6.0,
    events_per_s: float = 300.0,
    seed: int = 11,
    min_snapshots: int = 2,
) -> Recording:
    """Run the simulator, chain-poller, ws-ingest and the normalizer (subprocesses) into a
    private Redis for ``seconds`` after the first epoch is active, then capture the chain and
    WS streams (with snapshot blobs). The market's spot does not walk (``walk_speed=0``) so
    every snapshot has the same topology (one epoch); values still move (quotes, trades)."""
    from simulator.market import MarketConfig
    from simulator.server import SimConfig, SimServer

    srv = redis_server()
    sim = SimServer(
        SimConfig(
            seed=seed,
            symbols=("SPX",),
            events_per_s=events_per_s,
            market=MarketConfig(walk_speed=0.0),
        )
    )
    await sim.start()
    r = Redis.from_url(srv.url)
    try:
        env = sim_env(sim.rest_url, sim.ws_url, sim.config.api_key)
        async with pipeline(srv.url, log_dir, ("normalizer", *INGEST), extra_env=env):
            await wait_epoch(r)
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end or await r.xlen(keys.CHAIN_STREAM) < min_snapshots:
                await asyncio.sleep(0.1)
                if time.monotonic() > t_end + 30:
                    raise AssertionError("too few chain snapshots while recording")
        records = await record(r)
        eid = await wait_epoch(r)
        n = int(await r.scard(keys.epoch_contracts("SPX", eid)))
        return Recording(records, dict(sim.stats.events_sent), n)
    finally:
        await r.aclose()
        await sim.stop()
        srv.stop()


# --- reference final contract state -------------------------------------------------------
@dataclass
class Expected:
    """Newest quote and trade per contract over a recording (chain seeds + WS events).
    Admission keeps exactly the newest of each kind, whatever the delivery order, so this is
    what every contract hash must hold once the pipeline is quiet: if an accepted event had
    been lost (or an older one had overwritten a newer one) a timestamp would differ."""

    quote_ts: dict[str, int] = field(default_factory=dict)
    quotes: dict[str, set[tuple[float, float]]] = field(default_factory=dict)  # at quote_ts
    trade_ts: dict[str, int] = field(default_factory=dict)
    trades: dict[str, set[float]] = field(default_factory=dict)
    ws_events: int = 0  # option Q/T events in the WS frames
    ws_in_topology: int = 0  # of which for contracts of the epoch

    def _q(self, cid: str, ts: int, bid: float, ask: float) -> None:
        cur = self.quote_ts.get(cid)
        if cur is None or ts > cur:
            self.quote_ts[cid], self.quotes[cid] = ts, {(bid, ask)}
        elif ts == cur:
            self.quotes[cid].add((bid, ask))

    def _t(self, cid: str, ts: int, last: float) -> None:
        cur = self.trade_ts.get(cid)
        if cur is None or ts > cur:
            self.trade_ts[cid], self.trades[cid] = ts, {last}
        elif ts == cur:
            self.trades[cid].add(last)


def expected_state(records: Iterable[rp.Record], topology: set[str]) -> Expected:
    exp = Expected()
    for r in records:
        if r.stream == keys.CHAIN_STREAM and r.blob is not None:
            if from_entry(dict(r.fields), ChainPointer).scope == "full":
                continue  # the whole chain feeds GEX only, never the epoch's contracts
            _expect_snapshot(exp, r.blob, topology)
        elif r.stream == keys.WS_STREAM:
            _expect_frame(exp, dict(r.fields).get(b"payload", b""), topology)
    return exp


def _expect_snapshot(exp: Expected, blob: bytes, topology: set[str]) -> None:
    from schemas.messages import decode_snapshot

    for c in decode_snapshot(blob).contracts:
        if c.cid not in topology:
            continue
        if c.bid is not None and c.ask is not None and c.quote_ts_ns:
            exp._q(c.cid, c.quote_ts_ns, c.bid, c.ask)
        if c.last is not None and c.trade_ts_ns:
            exp._t(c.cid, c.trade_ts_ns, c.last)


def _expect_frame(exp: Expected, payload: bytes, topology: set[str]) -> None:
    from schemas.massive import Quote, Trade, decode_frame

    for ev in decode_frame(payload).events:
        if isinstance(ev, Quote | Trade):
            exp.ws_events += 1
            if ev.sym not in topology:
                continue
            exp.ws_in_topology += 1
            if isinstance(ev, Quote):
                exp._q(ev.sym, ev.t * 1_000_000, ev.bp, ev.ap)
            else:
                exp._t(ev.sym, ev.t * 1_000_000, ev.p)


async def check_contracts(redis: Redis, eid: str, exp: Expected) -> list[str]:
    """Differences between the stored contract hashes of ``eid`` and ``exp``."""
    cids = sorted(set(exp.quote_ts) | set(exp.trade_ts))
    pipe = redis.pipeline(transaction=False)
    for cid in cids:
        pipe.hmget(
            keys.epoch_contract("SPX", eid, cid), "quote_ts", "bid", "ask", "trade_ts", "last"
        )
    out: list[str] = []
    for cid, (qts, bid, ask, tts, last) in zip(cids, await pipe.execute(), strict=True):
        if cid in exp.quote_ts:
            if qts is None or int(qts) != exp.quote_ts[cid]:
                out.append(f"{cid}: quote_ts {qts!r} != {exp.quote_ts[cid]}")
            elif (float(bid), float(ask)) not in exp.quotes[cid]:
                out.append(f"{cid}: quote {bid!r}/{ask!r} not in {exp.quotes[cid]}")
        if cid in exp.trade_ts:
            if tts is None or int(tts) != exp.trade_ts[cid]:
                out.append(f"{cid}: trade_ts {tts!r} != {exp.trade_ts[cid]}")
            elif float(last) not in exp.trades[cid]:
                out.append(f"{cid}: last {last!r} not in {exp.trades[cid]}")
    return out


def normalized_items(models: Mapping[str, Any]) -> dict[str, Any]:
    """Published items without provenance ``src`` fields: a WS event and a chain snapshot can
    carry the SAME quote (same timestamp and values); admission keeps whichever was written
    first, so ``src`` (chain|ws) depends on the race between normalizer and hydrator even in
    two undisturbed runs, while every value is identical."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "src"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    out: dict[str, Any] = {}
    for k, m in models.items():
        if m is None:
            out[k] = None
            continue
        items = {i: strip(t) for i, t in m.items.items()}
        if k.startswith("massive:heatmap"):  # legs: [qty, px, px_src]
            for t in items.values():
                t.pop("src", None)
        out[k] = {"epoch": m.epoch, "items": items}
    return out


def as_str(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


# --- load replayer ----------------------------------------------------------------------------
class LoadReplayer:
    """XADDs raw WS frames (what ws-ingest writes) at a fixed event rate: 80 % quotes,
    70 % of events on ``hot`` contracts, the rest uniform over ``cids``."""

    def __init__(self, cids: list[str], hot: list[str], seed: int = 1) -> None:
        self.cids = cids
        self.hot = hot
        self.rng = random.Random(seed)
        self.sent = 0
        self.frames = 0
        self.px: dict[str, float] = {}

    def _event(self, t_ms: int) -> dict[str, Any]:
        rng = self.rng
        cid = rng.choice(self.hot) if rng.random() < 0.7 else rng.choice(self.cids)
        px = self.px.get(cid, 5.0)
        px = max(0.05, round(px + rng.choice((-0.05, 0.0, 0.05)), 2))
        self.px[cid] = px
        if rng.random() < 0.8:
            return {"ev": "Q", "sym": cid, "bx": 1, "ax": 1, "bp": px, "ap": round(px + 0.1, 2),
                    "bs": 1, "as": 1, "t": t_ms, "q": 1}  # fmt: skip
        return {"ev": "T", "sym": cid, "x": 1, "p": px, "s": 1, "c": [209], "t": t_ms, "q": 1}

    # Frames are generated before the timed loop with a fixed-width placeholder for the
    # event time (13 digits, like a ms epoch), replaced by the send time as each frame goes
    # out: building ~1,000 events per tick in the loop capped the offered rate near 15k/s.
    _T_PLACEHOLDER = 9_999_999_999_999

    async def run(self, r: Redis, rate: float, seconds: float, tick_s: float) -> float:
        """XADD frames at ``rate`` events/s for ``seconds``; returns the achieved rate."""
        n_ticks = int(seconds / tick_s)
        plan: list[tuple[int, bytes]] = []
        carry = 0.0
        ph = str(self._T_PLACEHOLDER).encode()
        for _ in range(n_ticks):
            carry += rate * tick_s
            n = int(carry)
            carry -= n
            frame = orjson.dumps([self._event(self._T_PLACEHOLDER) for _ in range(n)]) if n else b""
            plan.append((n, frame))
        t0 = time.perf_counter()
        sent0 = self.sent
        for i, (n, frame) in enumerate(plan):
            due = t0 + i * tick_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if n == 0:
                continue
            now = time.time_ns()
            frame = frame.replace(ph, str(now // 1_000_000).encode())
            await r.xadd(
                keys.WS_STREAM,
                {WS_RECV_FIELD: str(time.time_ns()), WS_PAYLOAD_FIELD: frame},
                maxlen=500_000,
                approximate=True,
            )
            self.sent += n
            self.frames += 1
        return (self.sent - sent0) / (time.perf_counter() - t0)


async def install_chain(r: Redis, snap: ChainSnapshot) -> str:
    """Store ``snap`` as a blob + ChainPointer (what the chain-poller writes); returns the
    blob key. The normalizer (if running) builds/promotes the epoch from it."""
    key = keys.chain_snapshot(snap.symbol, snap.ts_ns)
    ptr = ChainPointer(
        symbol=snap.symbol,
        snapshot_key=key,
        ts_ns=snap.ts_ns,
        n_contracts=len(snap.contracts),
        spot=snap.spot,
    )
    # its own slot, before the pointer; kept as long as the chain-poller keeps its blobs (a
    # soak's listings must not pile up blobs a deployment would have let expire)
    ttl_s = PollerSettings().snapshot_ttl_s
    await r.set(key, encode_snapshot(snap), ex=ttl_s)
    await r.xadd(keys.CHAIN_STREAM, entry(ptr))  # type: ignore[arg-type]
    return key
