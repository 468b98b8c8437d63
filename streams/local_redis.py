"""A private ``redis-server`` on a free loopback port, in its own temp dir: used by the demo
(when no Redis is configured), the tests and the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive the process that started it (Linux:
    SIGKILL when the parent dies; elsewhere nothing). A test run or a demo killed before
    its cleanup otherwise leaves a Redis, or processors retrying forever to reach one whose
    port a later Redis may take."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port + 10000 > 65535:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


class RedisServer:
    """A private ``redis-server`` on a free loopback port, in its own temp dir."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.port = free_port() if port is None else port
        self.dir = tempfile.mkdtemp(prefix="massive-redis-")
        self.args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.dir, "redis.log"),
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ready_timeout_s: float = 10.0) -> RedisServer:
        """Start and wait for PONG; a restart from a large AOF answers LOADING for a while,
        so callers that restart one pass a longer ``ready_timeout_s``."""
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.dir}/redis.log")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING within {ready_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()  # reaped: no zombie, no "still running" at garbage collection
        shutil.rmtree(self.dir, ignore_errors=True)
