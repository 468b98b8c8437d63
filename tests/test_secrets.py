"""Secrets never reach a log (streams/logs.py), and the CLI reports unreachable Redis and a
refused key on one line, without a traceback.

The acceptance run: chain-poller, ws-ingest (and the normalizer, so ws-ingest subscribes to
contracts) as subprocesses at MASSIVE_LOG_LEVEL=DEBUG against ``massive-pipeline simulate
--api-key <random>``: the key appears nowhere in their output."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from processors.ingest import chain_poller as cp
from processors.ops import replay as rp
from schemas import keys
from simulator.server import SimConfig, SimServer
from streams import logs
from streams.processor import Deps
from tests.util import FakeHttp, RedisServer, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def render(logger: logging.Logger, emit: object) -> str:
    """What a stream handler on ``logger`` prints while ``emit()`` runs."""
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        emit()  # type: ignore[operator]
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)
    return out.getvalue()


# --- redaction ----------------------------------------------------------------------------
key_st = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="\"'&@/%\\"),
    min_size=8,
    max_size=64,
)


@given(key=key_st)
def test_redact_masks_secret_patterns_whatever_the_value(key: str) -> None:
    """No registration needed: query keys, bearer tokens, the WS auth frame (also cut short
    as websockets prints long frames) and URL passwords."""
    texts = [
        f"GET https://api.massive.com/v3/snapshot?limit=250&apiKey={key}&x=1",
        f"HTTP Request: GET http://sim:8765/v3?apiKey={key} 200",
        f"headers: Authorization: Bearer {key}",
        f'> TEXT \'{{"action":"auth","params":"{key}"}}\' [40 bytes]',
        f'> TEXT \'{{"action": "auth", "params": "{key[:5]}...{key[-3:]}',
        f'{{"params":"{key}","action":"auth"}}',
        f"cannot reach redis://user:{key}@redis.internal:6380/0",
    ]
    for t in texts:
        clean = logs.redact(t)
        assert key not in clean and logs.MASK in clean, (t, clean)
        # a cut key is masked too (unless the text around it holds that prefix anyway)
        if "..." not in t and key[:-1] not in t.replace(key, ""):
            assert key[:-1] not in clean


def test_secrets_from_env_names_and_url_passwords() -> None:
    env = {
        "MASSIVE_API_KEY": "generic-key",
        "MASSIVE_POLLER_API_KEY": "poller-key",
        "MASSIVE_WS_API_KEY": "ws-key",
        "MASSIVE_REDIS_URL": "rediss://default:redis-pw@host:6380/0",
        "MASSIVE_GATEWAY_TOKENS": "tok-one, tok-two",
        "MASSIVE_ADMIN_TOKEN": "admin-tok",
        "REDIS_PASSWORD": "keda-pw",
        "MASSIVE_SOME_SECRET": "s3cr3t",
        "MASSIVE_POLLER_REST_URL": "http://sim:8765",
        "MASSIVE_LOG_LEVEL": "DEBUG",
        "MASSIVE_POLLER_AUTH_MODE": "query",
        "MASSIVE_X_TOKEN": "ab",  # too short to be masked everywhere
    }
    assert logs.secrets_from_env(env) == {
        "generic-key",
        "poller-key",
        "ws-key",
        "redis-pw",
        "tok-one",
        "tok-two",
        "admin-tok",
        "keda-pw",
        "s3cr3t",
    }


def test_every_record_is_scrubbed_message_args_traceback_and_stack() -> None:
    key = "rec-" + secrets.token_hex(12)
    logs.add_secret(key)
    log = logging.getLogger("websockets.client")

    def emit() -> None:
        log.debug("> TEXT %r [%d bytes]", f'{{"action":"auth","params":"{key}"}}', 40)
        log.info("plain %s and %s", key, {"nested": [key]})
        try:
            raise RuntimeError(f"boom at https://h/x?token={key}")
        except RuntimeError:
            log.exception("failed")
        log.warning("where", stack_info=True, extra={"color_message": f"{key} %s"})
        log.error("bad format %d", key)  # a wrong argument type: still no key

    text = render(log, emit)
    assert key not in text
    assert text.count(logs.MASK) >= 5
    assert "RuntimeError: boom at https://h/x?token=***" in text  # the traceback is kept


def test_a_record_keeps_its_arguments_when_redacting_them_suffices() -> None:
    """Formatters that use the arguments (uvicorn's access log unpacks them) still get them."""
    key = "acc-" + secrets.token_hex(12)
    logs.add_secret(key)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    log = logging.getLogger("uvicorn.access.test")
    h = Keep()
    log.addHandler(h)
    try:
        log.warning('%s - "%s %s HTTP/%s" %d', "10.0.0.1:5", "GET", f"/v3?apiKey={key}", "1.1", 200)
        log.warning("wrapped %r", {"k": key})  # not a str argument: the message is frozen
    finally:
        log.removeHandler(h)
    access, wrapped = seen
    assert isinstance(access.args, tuple) and len(access.args) == 5
    assert access.args[2] == "/v3?apiKey=***" and access.getMessage().endswith('HTTP/1.1" 200')
    assert wrapped.args is None and key not in wrapped.getMessage()


async def test_an_error_body_echoing_the_url_is_redacted(
    deps: Deps, caplog: pytest.LogCaptureFixture
) -> None:
    key = "echo-" + secrets.token_hex(12)

    def answer(target: str) -> tuple[int, object]:
        return 400, {"status": "ERROR", "request_id": "r", "error": f"bad request GET {target}"}

    async with FakeHttp(answer) as provider:
        p = cp.ChainPoller(
            deps,
            cp.PollerSettings(api_key=key, rest_url=provider.url),
            ("SPX",),
        )
        caplog.set_level(logging.DEBUG)
        async with p.rest.client() as client:
            with pytest.raises(cp.FetchError) as ei:
                await p.cycle(client, "startup")
    assert all(f"apiKey={key}" in t for t in provider.requests)  # the key was sent ...
    assert "apiKey=***" in str(ei.value)  # ... and echoed, but never kept or logged
    assert key not in str(ei.value) and key not in repr(p.last_error)
    assert "apiKey=***" in caplog.text and key not in caplog.text


# --- subprocesses -------------------------------------------------------------------------
def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASSIVE_")}
    env.update(PYTHONUNBUFFERED="1", MASSIVE_GRACE_S="3", **extra)
    return env


def cli(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "processors.ops.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], *, code: int | None) -> str:
    err = res.stderr
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if code is None:
        assert res.returncode != 0
    else:
        assert res.returncode == code, (res.returncode, err)
    return lines[0]


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "one.mrec.gz"
    with rp.RecordingWriter(path, [keys.WS_STREAM], time.time_ns()) as w:
        fields = [(b"recv_ts_ns", b"1"), (b"payload", b"[]")]
        w.write(rp.Record(t_ns=1, stream=keys.WS_STREAM, fields=fields))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ("lag",),
        ("offsets", "reset", "--stream", keys.WS_STREAM, "--group", "hydrator", "--to", "0"),
        ("record", "-o", "{tmp}/out.mrec.gz"),
        ("replay", "{recording}", "--as-fast-as-possible"),
        ("epoch", "inspect"),
    ],
    ids=lambda a: a[0],
)
def test_cli_with_redis_unreachable_says_so_on_one_line(
    args: tuple[str, ...], tmp_path: Path, recording: Path
) -> None:
    password = "pw-" + secrets.token_hex(8)
    port = free_port()
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    # (not str.format: stream names hold hash-tag braces)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{recording}", str(recording)) for a in args]
    res = cli(*argv, env=base_env(MASSIVE_REDIS_URL=url))
    line = assert_one_line_error(res, code=2)
    assert line.startswith(f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: ")
    assert password not in res.stderr + res.stdout


async def test_ws_ingest_with_a_bad_key_exits_with_one_line(redis_server: RedisServer) -> None:
    sim = SimServer(SimConfig(api_key="the-right-key", symbols=("SPX",)))
    await sim.start()
    bad = "wrong-" + secrets.token_hex(8)
    try:
        env = base_env(
            MASSIVE_REDIS_URL=redis_server.url,
            MASSIVE_API_KEY=bad,
            MASSIVE_WS_URL=sim.ws_url,
            MASSIVE_SYMBOLS="SPX",
        )
        proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "processors.ops.cli",
            "run",
            "ws-ingest",
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await sim.stop()
    res = subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode())
    line = assert_one_line_error(res, code=2)
    assert "auth_failed" in line and "MASSIVE_API_KEY" in line
    assert bad not in res.stderr


# --- acceptance: the key is absent from all output at DEBUG ---------------------------------
def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout_s}s")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def test_the_key_is_absent_from_all_ingest_output_at_debug(
    tmp_path: Path, redis_server: RedisServer, procs: list[subprocess.Popen[bytes]]
) -> None:
    key = secrets.token_urlsafe(24)
    sim_port = free_port()
    redis = Redis.from_url(redis_server.url)
    await redis.flushall()

    def spawn(name: str, *args: str, **env: str) -> Path:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "processors.ops.cli", *args],
                    env=base_env(**env),
                    cwd=ROOT,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
        return log

    spawn("simulator", "simulate", "--port", str(sim_port), "--api-key", key, "--rate", "300")
    _wait_port(sim_port, 30)
    common = {
        "MASSIVE_REDIS_URL": redis_server.url,
        "MASSIVE_LOG_LEVEL": "DEBUG",
        "MASSIVE_API_KEY": key,
        "MASSIVE_POLLER_REST_URL": f"http://127.0.0.1:{sim_port}",
        "MASSIVE_SYMBOLS": "SPX",
        "MASSIVE_POLLER_EXPIRATIONS": "1",
        "MASSIVE_POLLER_BAND_POINTS": "100",
        "MASSIVE_POLLER_LIMIT": "50",  # several pages: next_url followed with the key
        "MASSIVE_POLLER_MIN_INTERVAL_S": "0.5",
        "MASSIVE_WS_URL": f"ws://127.0.0.1:{sim_port}",
        "MASSIVE_WS_MARKET_HOURS": "always",
        "MASSIVE_WS_EPOCH_POLL_S": "0.2",
        "MASSIVE_BLOCK_MS": "100",
    }
    ingest_logs = [
        spawn("chain-poller", "run", "chain-poller", **common),
        spawn("ws-ingest", "run", "ws-ingest", **common),
    ]
    spawn("normalizer", "run", "normalizer", **common)

    async def ingested() -> bool:
        n_chain = await redis.xlen(keys.CHAIN_STREAM)
        n_ws = await redis.xlen(keys.WS_STREAM)
        subscribed = b'"ev":"T"' in b"".join(
            e[1][b"payload"] for e in await redis.xrevrange(keys.WS_STREAM, count=50)
        )
        return n_chain >= 3 and n_ws >= 20 and subscribed

    try:
        await eventually(ingested, timeout_s=90, interval_s=0.2)
    finally:
        await redis.aclose()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)
    for log in ingest_logs:
        text = log.read_text(errors="replace")
        assert key not in text, f"{log.name} leaks the key"
        assert "DEBUG" in text
    poller, ws = (log.read_text(errors="replace") for log in ingest_logs)
    # what would have carried the key was logged, redacted
    assert "apiKey=***" in poller and "cursor=" in poller
    assert '"action":"auth","params":"***"' in ws
    assert not any(p.returncode not in (0, -signal.SIGTERM) for p in procs[1:])
