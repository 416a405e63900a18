"""The daemon's operator-facing listeners, built from the config in one place.

``listeners(daemon)`` returns, in start order: the monitor (rates, systemd
STATUS= and watchdog), the control socket (``lazypaged status``), and when
enabled the metrics endpoint and the timeline recorder. It also hooks the
session table so finished sessions are handed to the metrics totals and
the timeline writer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from .config import Config
from .control import ControlServer, build_status
from .metrics import FinishedTotals, MetricsServer, make_registry
from .monitor import Monitor
from .session import RestoreSession
from .timeline import TimelineRecorder

if TYPE_CHECKING:
    from .daemon import Daemon, Listener


def control_socket_path(cfg: Config) -> Path:
    """``[control] socket``, or ``control.sock`` beside the handoff socket."""
    return Path(cfg.control.socket) if cfg.control.socket else cfg.handoff_socket.parent / "control.sock"


def _guarded(hook: Callable[[RestoreSession], None], what: str) -> Callable[[RestoreSession], None]:
    """A session-table hook that can never break the session's release."""

    def call(s: RestoreSession) -> None:
        try:
            hook(s)
        except Exception as e:
            structlog.get_logger().error(f"{what}_bug", session=s.id, error=f"{type(e).__name__}: {e}", exc_info=e)

    return call


def listeners(daemon: Daemon) -> list[Listener]:
    cfg, sessions = daemon.cfg, daemon.sessions
    monitor = Monitor(sessions)
    totals = FinishedTotals()
    sessions.on_removed.append(_guarded(totals.record, "metrics"))
    out: list[Listener] = [
        monitor,
        ControlServer(control_socket_path(cfg), cfg.control.socket_mode, lambda: build_status(sessions, monitor)),
    ]
    if cfg.metrics.enabled:
        out.append(MetricsServer(cfg.metrics.address, make_registry(sessions, totals)))
    if cfg.timeline.enabled:
        recorder = TimelineRecorder(sessions, cfg.timeline.directory, cfg.timeline.interval, cfg.timeline.keep)
        sessions.on_removed.append(_guarded(recorder.session_removed, "timeline"))
        out.append(recorder)
    return out
