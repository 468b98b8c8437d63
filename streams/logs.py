"""Logging setup of every entry point, and the one redaction of secrets from log output.

Secrets never reach a log, at any level, from any library: a record factory scrubs every
log record when it is created (its message with the arguments filled in, its exception
traceback and stack), so every handler sees the redacted text (ours, uvicorn's own, a test's
capture). What is scrubbed:

* every configured secret value: environment variables named ``*API_KEY``, ``*_TOKEN``,
  ``*_TOKENS`` (comma separated), ``*_PASSWORD``, ``*_SECRET``, the password of any
  ``MASSIVE_*`` URL (``MASSIVE_REDIS_URL``), and values registered with :func:`add_secret`
  (the ingest settings register their keys, whichever way they were built);
* patterns, whatever the value: ``apiKey=...`` (a URL's query; the key in error bodies that
  echo the URL), ``Bearer ...``, the ``params`` of a WebSocket ``auth`` frame (websockets
  logs sent frames at DEBUG) and the password of ``scheme://user:password@host``.

:func:`redact` is the same scrubbing for text that is printed, not logged (CLI errors).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

MASK = "***"
# A shorter value would mask common words in every line; no real key or password is this short.
MIN_SECRET_CHARS = 3

_SECRET_NAME = re.compile(r"(?:^|_)(?:API_?KEY|PASSWORD|PASSWD|SECRET|TOKENS?)$", re.IGNORECASE)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(api_?key=)[^&\s\"']+", re.IGNORECASE), r"\1" + MASK),
    (re.compile(r"(\bbearer\s+)[^\s\"']+", re.IGNORECASE), r"\1" + MASK),
    # {"action":"auth","params":"<key>"} (either order); also a frame cut short in a log
    (
        re.compile(r'("action"\s*:\s*"auth"\s*,\s*"params"\s*:\s*")[^"]*'),
        r"\1" + MASK,
    ),
    (
        re.compile(r'("params"\s*:\s*")[^"]*("\s*,\s*"action"\s*:\s*"auth")'),
        r"\1" + MASK + r"\2",
    ),
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@"), r"\1" + MASK + "@"),
)

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None
_installed = False


def secrets_from_env(environ: Mapping[str, str]) -> set[str]:
    """The secret values configured in ``environ`` (see the module docstring)."""
    out: set[str] = set()
    for name, value in environ.items():
        if not value:
            continue
        if _SECRET_NAME.search(name):
            parts = value.split(",") if name.upper().endswith("TOKENS") else [value]
            out.update(p.strip() for p in parts if p.strip())
        elif name.startswith("MASSIVE_") and "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                continue
            if password:
                out.add(password)
    return {s for s in out if len(s) >= MIN_SECRET_CHARS}


def add_secret(*values: str) -> None:
    """Redact these values from every log record from now on (installs the scrubbing)."""
    global _secret_re
    new = {v for v in values if v and len(v) >= MIN_SECRET_CHARS}
    with _lock:
        if not new - _secrets:
            if new:
                _install()
            return
        _secrets.update(new)
        # longest first: a secret containing another is masked whole
        alts = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in alts))
        _install()


def redact(text: str) -> str:
    """``text`` without any configured secret or secret-looking value."""
    pattern = _secret_re
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for rx, repl in _PATTERNS:
        text = rx.sub(repl, text)
    return text


def scrub(record: logging.LogRecord) -> None:
    """Replace the record's message, traceback and stack by their redacted text."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: keep what logging would print, redacted
        message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = message, None
    clean = redact(message)
    if clean != message:
        # uvicorn re-renders this with the original arguments when it colours output
        record.__dict__.pop("color_message", None)
        if not _redact_args(record):  # keep the arguments when that suffices (formatters
            record.msg, record.args = clean, None  # such as uvicorn's access log use them)
    if record.exc_info and record.exc_info[0] is not None:
        text = record.exc_text or logging.Formatter().formatException(record.exc_info)
        clean = redact(text)
        record.exc_text = clean
        if clean != text:
            record.exc_info = None  # no formatter may render the original again
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _redact_args(record: logging.LogRecord) -> bool:
    """Redact the format string and the string arguments in place; True when the message
    they make is then clean (else the caller replaces it by its redacted text)."""
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
        return False
    msg, args = record.msg, record.args
    record.msg = redact(msg)
    record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
    try:
        again = record.getMessage()
    except Exception:
        again = None
    if again is not None and redact(again) == again:
        return True
    record.msg, record.args = msg, args
    return False


def _install() -> None:
    """Wrap the record factory once (called with ``_lock`` held)."""
    global _installed
    if _installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        scrub(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def install(environ: Mapping[str, str] | None = None) -> None:
    """Scrub every log record of secrets configured in ``environ`` (default: the process
    environment) and the secret patterns."""
    add_secret(*secrets_from_env(os.environ if environ is None else environ))
    with _lock:
        _install()


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("massive").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def setup_logging(level: str, *, stream: Any = None) -> None:
    """Configure the root logger of a process (one format for every entry point), with
    redaction; an uncaught exception is logged (so redacted) instead of printed raw."""
    install()
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr if stream is None else stream,
    )
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("massive").critical(
        "uncaught exception in thread %s",
        getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, redacted: for a CLI error line."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return redact(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
