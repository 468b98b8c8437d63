"""A Redis connection that checks every command against Redis Cluster's one-slot rule.

On a cluster, every key of one command, of one MULTI/EXEC (with the keys it WATCHes) and of
one script call (its KEYS) must hash to one slot, or the command fails with CROSSSLOT. This
connection computes the slot (``redis.crc.key_slot``, the cluster's CRC16 with hash tags) of
every key it sends and records each command, transaction or script whose keys span slots,
so a single-node run of the pipeline shows what a cluster would refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot

from streams.redis_client import HiredisPackingConnection

_NO_KEYS = frozenset(
    b"PING INFO SCRIPT MULTI EXEC DISCARD UNWATCH CLIENT HELLO SELECT COMMAND AUTH CONFIG "
    b"SCAN DBSIZE TIME FLUSHALL FLUSHDB READONLY ECHO CLUSTER SAVE BGSAVE DEBUG "
    b"FUNCTION SLOWLOG LATENCY ROLE WAIT".split()
)
_ALL_ARGS = frozenset(b"DEL UNLINK EXISTS MGET WATCH TOUCH SUNION SINTER SDIFF".split())
_SUBCOMMAND = frozenset(b"XINFO XGROUP MEMORY OBJECT".split())  # <cmd> <sub> <key> ...
_SCRIPTS = frozenset(b"EVAL EVALSHA EVAL_RO EVALSHA_RO FCALL FCALL_RO".split())


def _b(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, memoryview):
        return v.tobytes()
    return str(v).encode()


def command_keys(args: Sequence[Any]) -> list[bytes]:
    """The key arguments of one command (the commands the pipeline sends)."""
    name = _b(args[0]).upper()
    rest = [_b(a) for a in args[1:]]
    if name in _NO_KEYS:
        return []
    if name in _ALL_ARGS:
        return rest
    if name == b"MSET":
        return rest[0::2]
    if name in (b"RENAME", b"RENAMENX", b"SMOVE", b"LMOVE", b"COPY"):
        return rest[:2]
    if name in _SCRIPTS:
        n = int(rest[1])
        return rest[2 : 2 + n]
    if name in (b"XREAD", b"XREADGROUP"):
        up = [a.upper() for a in rest]
        i = up.index(b"STREAMS") + 1
        streams = rest[i:]
        return streams[: len(streams) // 2]
    if name in _SUBCOMMAND:
        return rest[1:2]
    return rest[:1]


@dataclass
class SlotLog:
    """What the checking connections saw (shared by every connection of a client)."""

    violations: list[str] = field(default_factory=list)
    transactions: int = 0  # EXECs checked
    scripts: int = 0  # script calls checked
    multi_key: int = 0  # single commands with several keys checked

    def check(self, what: str, keys: Sequence[bytes]) -> None:
        slots = {key_slot(k) for k in keys}
        if len(slots) > 1:
            names = sorted({k.decode(errors="replace") for k in keys})
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            self.violations.append(f"{what} spans {len(slots)} slots: {shown}")


class SlotCheckingConnection(HiredisPackingConnection):
    """``connection_class`` for a client under test; set ``log`` on the class first."""

    log = SlotLog()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watched: list[bytes] = []
        self._multi: list[bytes] | None = None

    def pack_command(self, *args: Any) -> list[bytes]:
        self._observe(args)
        return super().pack_command(*args)

    def _observe(self, args: Sequence[Any]) -> None:
        split = _b(args[0]).split()
        full = (*split, *args[1:])
        name = split[0].upper()
        log = self.log
        if name == b"MULTI":
            self._multi = []
            return
        if name in (b"EXEC", b"DISCARD"):
            if name == b"EXEC" and self._multi is not None:
                log.transactions += 1
                log.check("MULTI/EXEC (with its WATCH)", [*self._watched, *self._multi])
            self._multi, self._watched = None, []
            return
        if name == b"UNWATCH":
            self._watched = []
            return
        keys = command_keys(full)
        if name == b"WATCH":
            self._watched += keys
        if name in _SCRIPTS:
            log.scripts += 1
            log.check(f"{name.decode()} ({len(keys)} KEYS)", keys)
        elif len(keys) > 1:
            log.multi_key += 1
            log.check(name.decode(), keys)
        if self._multi is not None:
            self._multi += keys
