"""structlog setup: JSON lines for machines and journald, console for people.

The level is one process-wide threshold read at each call, not baked into
loggers when they are bound: sessions and listeners bind theirs once, and a
reload (SIGHUP) must still change what all of them write.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = logging.getLevelNamesMapping()
_threshold = logging.INFO


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


def setup(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
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
        ],
        wrapper_class=_Logger,
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
