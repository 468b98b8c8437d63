"""Frozen settings read once from environment variables, failing fast with the key name.

A settings class is a frozen dataclass registered with its environment prefix::

    @env_settings("MASSIVE_POLLER_")
    @dataclass(frozen=True, slots=True)
    class PollerSettings: ...

``from_env(PollerSettings)`` reads field ``rest_url`` from ``MASSIVE_POLLER_REST_URL``.
msgspec converts the strings to the field types in its lax mode (``"5"`` -> 5,
``"true"``/``"1"`` -> True); sequence fields are comma separated. A field may declare one
shared variable it falls back to (``fallback_env``), e.g. the provider key both ingest
stages read from ``MASSIVE_API_KEY``.

Every ``MASSIVE_*`` name a registered class reads is a known setting; :func:`check_env`
refuses any other, naming the closest known one, so a typo fails at start instead of
silently doing nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from streams.redis_client import parse_url

T = TypeVar("T")

ENV_PREFIX = "MASSIVE_"
FALLBACK_ENV = "fallback_env"  # dataclass field metadata key: a shared variable to fall back to

_PREFIXES: dict[type[Any], str] = {}
_SEQUENCE_TYPES = (
    msgspec.inspect.VarTupleType,
    msgspec.inspect.TupleType,
    msgspec.inspect.ListType,
    msgspec.inspect.SetType,
    msgspec.inspect.FrozenSetType,
)


class SettingsError(ValueError):
    """A malformed or unknown environment variable (the message names it)."""


def env_settings(prefix: str) -> Callable[[type[T]], type[T]]:
    """Register a settings dataclass under ``prefix`` (``MASSIVE_`` or ``MASSIVE_<X>_``)."""
    if not (prefix.startswith(ENV_PREFIX) and prefix.endswith("_")):
        raise ValueError(f"settings prefix {prefix!r} must start with {ENV_PREFIX} and end in _")

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a dataclass")
        _PREFIXES[cls] = prefix
        return cls

    return register


def fallback_env(name: str, default: Any) -> Any:
    """A field read from its own variable, else from the shared variable ``name``."""
    return dataclasses.field(default=default, metadata={FALLBACK_ENV: name})


def env_prefix(cls: type[Any]) -> str:
    try:
        return _PREFIXES[cls]
    except KeyError:
        raise TypeError(f"{cls.__name__} is not registered with @env_settings") from None


def env_names(cls: type[Any]) -> dict[str, str]:
    """Variable name -> field name, for every variable ``cls`` reads (fallbacks last)."""
    prefix = env_prefix(cls)
    fields = dataclasses.fields(cls)
    out = {prefix + f.name.upper(): f.name for f in fields}
    for f in fields:
        if FALLBACK_ENV in f.metadata:
            out.setdefault(f.metadata[FALLBACK_ENV], f.name)
    return out


def registered() -> list[type[Any]]:
    """Every registered settings class (of the modules imported so far)."""
    return list(_PREFIXES)


def known_names(classes: Iterable[type[Any]] | None = None) -> set[str]:
    return {n for cls in (registered() if classes is None else classes) for n in env_names(cls)}


def check_env(
    environ: Mapping[str, str] | None = None, classes: Iterable[type[Any]] | None = None
) -> None:
    """Raise :class:`SettingsError` for the first ``MASSIVE_*`` variable that no settings
    class reads (default: every registered class), naming the closest known one."""
    env = os.environ if environ is None else environ
    known = known_names(classes)
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SettingsError(f"unknown setting {name}{hint}")


def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """An instance of the registered settings class ``cls`` from ``environ`` (default: the
    process environment); unset variables keep the field defaults."""
    if isinstance(environ, str):  # the old from_env(cls, prefix) call: the prefix is registered
        raise TypeError(f"from_env({cls.__name__}, {environ!r}): pass no prefix (@env_settings)")
    env = os.environ if environ is None else environ
    prefix = env_prefix(cls)
    by_field: dict[str, list[str]] = {}
    for name, field_name in env_names(cls).items():
        by_field.setdefault(field_name, []).append(name)
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.DataclassType)
    raw: dict[str, Any] = {}
    source: dict[str, str] = {}
    for f in info.fields:
        var = next((v for v in by_field[f.name] if v in env), None)
        if var is None:
            continue
        value = env[var]
        source[f.name] = var
        raw[f.name] = _split(value) if _is_sequence(f.type) else value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_describe(exc, cls.__name__, prefix, source, env)) from None


def _is_sequence(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.UnionType):
        return any(_is_sequence(u) for u in t.types)
    return isinstance(t, _SEQUENCE_TYPES)


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _describe(
    exc: msgspec.ValidationError,
    cls_name: str,
    prefix: str,
    source: Mapping[str, str],
    env: Mapping[str, str],
) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.count`" (a type error, located) or
    # the message of a ValueError from __post_init__ (a rule across fields, not located).
    msg, _, where = str(exc).partition(" - at `$.")
    field_name = where.split("`")[0].split("[")[0]
    if field_name in source:
        var = source[field_name]
        return f"{var}={env[var]!r}: {msg}"
    return f"{cls_name} ({prefix}*): {msg}"


def _default_consumer() -> str:
    # Stable per pod (k8s sets HOSTNAME to the pod name) so a restart drains its own PEL.
    return os.environ.get("HOSTNAME") or socket.gethostname()


@env_settings(ENV_PREFIX)
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
    # /healthz fails when a processor loop has not beaten for this long (streams/heartbeat.py)
    liveness_s: float = 60.0
    # Event loop of ``massive-pipeline run``: uvloop (libuv; measured less CPU per Redis
    # round trip and per SSE write than asyncio's selector loop) or asyncio.
    event_loop: str = "uvloop"
    # The underlyings every stage works on (chain-poller, ws-ingest, gex, monitor, dashboard).
    symbols: tuple[str, ...] = ("SPX", "NDX")
    # Per-symbol spec overrides, a JSON object (MASSIVE_SYMBOL_SPECS; schemas/symbols.py)
    symbol_specs: str = ""

    def __post_init__(self) -> None:
        if self.grace_s <= 0 or self.liveness_s <= 0:
            raise ValueError("grace_s and liveness_s must be > 0")
        if not self.consumer:
            raise ValueError("consumer name is empty")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError(f"event_loop must be uvloop or asyncio, not {self.event_loop!r}")
        if not self.symbols:
            raise ValueError("symbols is empty")
        try:
            parse_url(self.redis_url)
        except ValueError as exc:
            # (the reason names the bad part; the URL itself may hold a password)
            raise ValueError(f"MASSIVE_REDIS_URL: {exc}") from None


def stage_symbols(settings: RuntimeSettings, arg: str | None) -> tuple[str, ...]:
    """The symbols of a stage: ``MASSIVE_SYMBOLS``, or the ``SPX,NDX`` of
    ``run <stage>:SPX,NDX``."""
    if not arg:
        return settings.symbols
    return tuple(s.strip().upper() for s in arg.split(",") if s.strip())
