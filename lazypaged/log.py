"""structlog setup: JSON lines for machines and journald, console for people.

On a stderr that systemd connected to the journal (``JOURNAL_STREAM``),
every line starts with its syslog priority (``<4>`` for a warning): journald
strips it and stores it as PRIORITY=, so ``journalctl -p warning`` finds the
daemon's warnings. Anywhere else (a terminal, a file, a pipe) lines stay
plain.

The level is one process-wide threshold read at each call, not baked into
loggers when they are bound: sessions and listeners bind theirs once, and a
reload (SIGHUP) must still change what all of them write.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_LEVELS = logging.getLevelNamesMapping()
_threshold = logging.INFO
#: The format chosen by the last setup(), "auto" resolved.
_format = "json"

#: Syslog priority of each method a line is written with.
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def level_number(level: str) -> int:
    """The numeric level of a name such as "info"; ValueError for an unknown one."""
    n = _LEVELS.get(level.upper())
    if n is None or level.upper() in ("NOTSET", "WARN", "FATAL"):
        raise ValueError(f"unknown log level {level!r}")
    return n


def set_level(level: str) -> None:
    """Change the threshold of every logger, already bound or not."""
    global _threshold
    _threshold = level_number(level)


def enabled(level: str) -> bool:
    return _LEVELS.get(level.upper(), logging.INFO) >= _threshold


class _Logger(structlog.BoundLoggerBase):
    """A bound logger that drops lines under the current threshold before any processor runs."""

    def _at(self, n: int, method: str, event: str | None, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if n < _threshold:
            return None
        if args:
            event = event % args if event is not None else event
        return self._proxy_to_logger(method, event, **kw)

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.DEBUG, "debug", event, args, kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.INFO, "info", event, args, kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.WARNING, "warning", event, args, kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.ERROR, "error", event, args, kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._at(logging.ERROR, "error", event, args, kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._at(logging.CRITICAL, "critical", event, args, kw)

    fatal = critical
    msg = info


def is_journal(stream: Any) -> bool:
    """Whether ``stream`` is the journal stream systemd gave this process.

    JOURNAL_STREAM is inherited by children whose stderr may go elsewhere,
    so the device and inode it names must be those of the stream itself."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no fd (a StringIO), a closed one, a malformed variable
        return False


def _priority_prefix(_logger: Any, method: str, line: Any) -> Any:
    """The rendered line with ``<N>`` before each of its lines (a console
    traceback spans several, and journald reads the prefix per line)."""
    if not isinstance(line, str):
        return line
    prefix = f"<{SYSLOG_PRIORITY.get(method, 6)}>"
    return "\n".join(prefix + part for part in line.split("\n"))


def current_format() -> str:
    """"json" or "console": what the daemon's log lines look like now."""
    return _format


def setup(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    global _format
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    _format = fmt
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    try:
        set_level(level)
    except ValueError:  # Config refuses unknown levels; callers without one get info
        set_level("info")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
            *([_priority_prefix] if is_journal(stream) else []),
        ],
        wrapper_class=_Logger,
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
