"""A private Redis Cluster and a private Sentinel setup, started from the ``redis-server``
binary on free loopback ports (each node a :class:`streams.local_redis.RedisServer` in its own
temp dir), for tests and benchmarks.

* :class:`LocalCluster`: ``masters`` masters with the 16384 slots split evenly, and
  ``replicas`` replicas per master. Built by hand (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE)
  rather than with ``redis-cli --cluster create``, which sleeps a second per step; ready when
  every node says ``cluster_state:ok`` and every replica's link to its master is up.
  A short ``cluster-node-timeout`` makes a killed master fail over within a few seconds.
  With ``tls`` (:class:`TlsFiles`) clients, replicas and the bus speak TLS on a second port
  per node (``tls_url``); the plain port stays for the tests' own calls (the failover
  helpers compare plain ports: use them on plain clusters).
* :class:`LocalSentinel`: one master, one replica, one sentinel (quorum 1) watching the
  master as ``mymaster``; a killed master is replaced within about a second.

Nothing here sleeps except polling loops with deadlines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis as redis_sync

from streams.local_redis import RedisServer, free_cluster_port

SLOTS = 16384
NODE_TIMEOUT_MS = 1000


def _wait(check: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis_sync.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout_s:.0f} s (last error: {last})")


def _client(port: int) -> redis_sync.Redis:
    return redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=2)


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 (and its key), made with ``openssl``."""

    cert: str
    key: str

    @classmethod
    def make(cls, directory: str) -> TlsFiles:
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        return cls(cert, key)

    def server_args(self, tls_port: int) -> tuple[str, ...]:
        return (
            "--tls-port", str(tls_port), "--tls-cert-file", self.cert,
            "--tls-key-file", self.key, "--tls-ca-cert-file", self.cert,
            "--tls-auth-clients", "no",
        )  # fmt: skip


@dataclass
class ClusterNode:
    server: RedisServer
    node_id: str = ""

    @property
    def port(self) -> int:
        return self.server.port

    def client(self) -> redis_sync.Redis:
        return _client(self.port)

    @property
    def alive(self) -> bool:
        p = self.server.proc
        return p is not None and p.poll() is None


class LocalCluster:
    """A Redis Cluster of private redis-servers (see the module doc)."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        tls: TlsFiles | None = None,
    ) -> None:
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.tls = tls
        self.nodes: list[ClusterNode] = []
        self.tls_ports: list[int] = []

    @property
    def url(self) -> str:
        """One seed node is enough: the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def all_url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def tls_url(self) -> str:
        """``rediss+cluster://`` to one node's TLS port (a ``tls`` cluster only); the
        clients trust the test's self-signed certificate."""
        assert self.tls is not None
        return f"rediss+cluster://127.0.0.1:{self.tls_ports[0]}?ssl_ca_certs={self.tls.cert}"

    def start(self, ready_timeout_s: float = 30.0) -> LocalCluster:
        try:
            self._start(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, ready_timeout_s: float) -> None:
        total = self.n_masters * (1 + self.n_replicas)
        used: set[int] = set()
        for _ in range(total):
            port = free_cluster_port()
            while port in used or port + 10000 in used:
                port = free_cluster_port()
            used |= {port, port + 10000}
            tls: tuple[str, ...] = ()
            if self.tls is not None:
                # plain port for the tests' own admin calls; TLS for clients, replicas and
                # the bus, which then listens on the TLS port + 10000
                tls_port = free_cluster_port()
                while tls_port in used or tls_port + 10000 in used:
                    tls_port = free_cluster_port()
                used |= {tls_port, tls_port + 10000}
                self.tls_ports.append(tls_port)
                tls = (
                    *self.tls.server_args(self.tls_ports[-1]),
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                )
            srv = RedisServer(
                *tls,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # a replica with a stale link may still be promoted (tests kill masters)
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-require-full-coverage",
                "yes",
                "--cluster-announce-ip",
                "127.0.0.1",
                "--repl-diskless-sync-delay",  # a replica syncs at once, not after 5 s
                "0",
                port=port,
            )
            self.nodes.append(ClusterNode(srv))
            srv.start()
        for n in self.nodes:
            with n.client() as c:
                n.node_id = str(c.execute_command("CLUSTER MYID").decode())
        masters = self.nodes[: self.n_masters]
        step = SLOTS // self.n_masters
        for i, n in enumerate(masters):
            lo, hi = i * step, (SLOTS - 1 if i == self.n_masters - 1 else (i + 1) * step - 1)
            with n.client() as c:
                c.execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
        first = self.nodes[0]
        with first.client() as c:
            for i, n in enumerate(self.nodes[1:], start=1):
                port = self.tls_ports[i] if self.tls is not None else n.port
                c.execute_command("CLUSTER MEET", "127.0.0.1", port)
        # every node must know every other before a replica can follow its master
        _wait(lambda: all(self._known(n) == total for n in self.nodes), "cluster meet", 20)
        for i, n in enumerate(self.nodes[self.n_masters :]):
            master = masters[i % self.n_masters]
            with n.client() as c:
                c.execute_command("CLUSTER REPLICATE", master.node_id)
        _wait(self.healthy, "cluster ready", ready_timeout_s)

    def _known(self, n: ClusterNode) -> int:
        with n.client() as c:
            return len(c.execute_command("CLUSTER NODES"))  # {"host:port": {...}}

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok, agrees on ``n_masters`` masters serving
        slots, and every live replica's link to its master is up."""
        for n in self.nodes:
            if not n.alive:
                continue
            with n.client() as c:
                info = c.execute_command("CLUSTER INFO")  # parsed into a dict
                if info["cluster_state"] != "ok" or int(info["cluster_size"]) != self.n_masters:
                    return False
                repl = c.info("replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
        return True

    def role(self, n: ClusterNode) -> str:
        with n.client() as c:
            return str(c.info("replication")["role"])

    def masters(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive and self.role(n) == "master"]

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for n in self.nodes:
            if n is master or not n.alive:
                continue
            with n.client() as c:
                repl = c.info("replication")
            if repl.get("role") == "slave" and int(repl.get("master_port", 0)) == master.port:
                return n
        raise LookupError(f"no live replica of 127.0.0.1:{master.port}")

    def master_of_key(self, key: str) -> ClusterNode:
        with next(n for n in self.nodes if n.alive).client() as c:
            slot = int(c.execute_command("CLUSTER KEYSLOT", key))
            for lo, hi, owner, *_ in c.execute_command("CLUSTER SLOTS"):
                if lo <= slot <= hi:
                    port = int(owner[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def failover(self, replica: ClusterNode, timeout_s: float = 20.0) -> None:
        """CLUSTER FAILOVER on ``replica`` (coordinated with its master: no write lost),
        and wait until it is a master and the cluster is healthy again."""
        with replica.client() as c:
            c.execute_command("CLUSTER FAILOVER")
        _wait(lambda: self.role(replica) == "master", "replica promoted", timeout_s)
        _wait(lambda: self._all_see_master(replica), "every node sees the new master", timeout_s)
        _wait(self.healthy, "cluster healthy after failover", timeout_s)

    def assign_slot(self, slot: int, to: ClusterNode, timeout_s: float = 10.0) -> None:
        """Give ``slot`` to master ``to`` (CLUSTER SETSLOT NODE on every master) and wait until
        every master's slot map says so. ``to`` first takes the greatest config epoch: else
        gossip the old owner sent before the change (its claim, at a higher epoch) can hand
        the slot back to it."""
        with to.client() as c:
            c.execute_command("CLUSTER BUMPEPOCH")
        for n in self.masters():
            with n.client() as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", to.node_id)
        _wait(
            lambda: all(self._slot_owner_port(n, slot) == to.port for n in self.masters()),
            f"every master sees slot {slot} on {to.port}",
            timeout_s,
        )

    @staticmethod
    def _slot_owner_port(node: ClusterNode, slot: int) -> int | None:
        with node.client() as c:
            for lo, hi, owner, *_ in c.execute_command("CLUSTER SLOTS"):
                if lo <= slot <= hi:
                    return int(owner[1])
        return None

    def _all_see_master(self, node: ClusterNode) -> bool:
        for n in self.nodes:
            if not n.alive:
                continue
            with n.client() as c:
                known = c.execute_command("CLUSTER NODES")  # {"host:port@bus": {...}}
            name = f"127.0.0.1:{node.port}"
            me: dict[str, Any] = next((v for k, v in known.items() if k.startswith(name)), {})
            if "master" not in str(me.get("flags", "")):
                return False
        return True

    def kill(self, n: ClusterNode) -> None:
        """SIGKILL one node (its temp dir stays until :meth:`stop`)."""
        if n.server.proc is not None and n.alive:
            os.kill(n.server.proc.pid, signal.SIGKILL)
            n.server.proc.wait()

    def flushall(self) -> None:
        for n in self.masters():
            with n.client() as c:
                c.flushall()
                c.script_flush()

    def stop(self) -> None:
        for n in self.nodes:
            n.server.stop()


class LocalSentinel:
    """One master, one replica and one sentinel (quorum 1) naming the master ``mymaster``."""

    MASTER_NAME = "mymaster"

    def __init__(self, down_after_ms: int = 500) -> None:
        self.down_after_ms = down_after_ms
        self.master = RedisServer("--repl-diskless-sync-delay", "0")
        self.replica: RedisServer | None = None
        # (a RedisServer for its port, temp dir, start and PING wait; run as a sentinel)
        self._sentinel_srv = RedisServer()
        self.sentinel_port = self._sentinel_srv.port

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.MASTER_NAME}"

    def start(self, ready_timeout_s: float = 20.0) -> LocalSentinel:
        try:
            self._start(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, ready_timeout_s: float) -> None:
        self.master.start()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.master.port)).start()
        # A sentinel rewrites its config file: it gets its own, in its temp dir.
        srv = self._sentinel_srv
        conf = os.path.join(srv.dir, "sentinel.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(
                f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {srv.dir}\n"
                f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {self.MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER_NAME} 2000\n"
            )
        srv.args = [srv.args[0], conf, "--sentinel", "--logfile", f"{srv.dir}/sentinel.log"]
        srv.start()
        _wait(self._replica_known, "sentinel sees the replica", ready_timeout_s)

    def _replica_known(self) -> bool:
        assert self.replica is not None
        with _client(self.replica.port) as c:
            if c.info("replication").get("master_link_status") != "up":
                return False
        with _client(self.sentinel_port) as s:
            replicas = s.execute_command("SENTINEL REPLICAS", self.MASTER_NAME)
        return bool(replicas)

    def master_port(self) -> int:
        with _client(self.sentinel_port) as s:
            _host, port = s.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
        return int(port)

    def kill_master(self, timeout_s: float = 20.0) -> int:
        """SIGKILL the current master; wait for the sentinel to promote the replica. Returns
        the new master's port."""
        old = self.master_port()
        victim = self.master if self.master.port == old else self.replica
        assert victim is not None and victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()

        def promoted() -> bool:
            port = self.master_port()
            if port == old:
                return False
            with _client(port) as c:
                return bool(c.info("replication")["role"] == "master")

        _wait(promoted, "sentinel promotion", timeout_s)
        return self.master_port()

    def stop(self) -> None:
        self._sentinel_srv.stop()
        if self.replica is not None:
            self.replica.stop()
        self.master.stop()
