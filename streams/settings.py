"""Frozen settings read once from environment variables, failing fast with the key name.

``from_env(MySettings, "MASSIVE_")`` reads field ``redis_url`` from ``MASSIVE_REDIS_URL``.
Supported field types: str, int, float, bool, and tuple[str, ...] / tuple[int, ...] /
tuple[float, ...] (comma separated).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    """A malformed environment variable (the message names it)."""


def _coerce(name: str, raw: str, typ: Any) -> Any:
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
        origin = typing.get_origin(typ)
        if origin is tuple:
            inner = typing.get_args(typ)[0]
            return tuple(inner(p.strip()) for p in raw.split(",") if p.strip())
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            args = [a for a in typing.get_args(typ) if a is not type(None)]
            if raw == "":
                return None
            return _coerce(name, raw, args[0])
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected {getattr(typ, '__name__', typ)}") from None
    raise SettingsError(f"{name}: unsupported settings type {typ!r}")


def from_env(cls: type[T], prefix: str = "MASSIVE_", environ: Mapping[str, str] | None = None) -> T:
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = prefix + f.name.upper()
        if key in env:
            values[f.name] = _coerce(key, env[key], hints[f.name])
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{cls.__name__}: {exc}") from None


def _default_consumer() -> str:
    # Stable per pod (k8s sets HOSTNAME to the pod name) so a restart drains its own PEL.
    return os.environ.get("HOSTNAME") or socket.gethostname()


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """What every processor process shares. Env prefix ``MASSIVE_``."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    consumer: str = dataclasses.field(default_factory=_default_consumer)
    metrics_port: int = 0  # 0: no HTTP endpoint for /metrics, /healthz, /readyz
    log_level: str = "INFO"
    count: int = 500
    block_ms: int = 1000
    min_idle_ms: int = 30_000
    reclaim_interval_s: float = 5.0
    max_deliveries: int = 5
    stream_maxlen: int = 500_000
    grace_s: float = 20.0  # SIGTERM: time to finish the batch before cancelling
    # Event loop of ``massive-pipeline run``: uvloop (libuv; measured less CPU per Redis
    # round trip and per SSE write than asyncio's selector loop) or asyncio.
    event_loop: str = "uvloop"

    def __post_init__(self) -> None:
        if self.grace_s <= 0:
            raise ValueError("grace_s must be > 0")
        if not self.consumer:
            raise ValueError("consumer name is empty")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError(f"event_loop must be uvloop or asyncio, not {self.event_loop!r}")
