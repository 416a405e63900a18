"""Values in the shipped units that must follow the daemon's own."""

from __future__ import annotations

import re
from pathlib import Path

from lazypaged.config import RemoteConfig
from lazypaged.handoff_server import LISTEN_BACKLOG

UNITS = Path(__file__).parent.parent / "systemd"


def _value(unit: str, key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", (UNITS / unit).read_text(), re.M)
    assert m, f"{key}= missing from {unit}"
    return m.group(1).strip()


def test_socket_backlog_is_the_daemons() -> None:
    """Under socket activation systemd's listen() is the only one."""
    assert int(_value("lazypaged.socket", "Backlog")) == LISTEN_BACKLOG


def test_start_timeout_outlasts_an_adoption_waiting_for_its_peer() -> None:
    """READY=1 waits for adoptions, which ride out a peer link down up to
    reconnect_deadline: systemd must not kill the daemon first."""
    m = re.fullmatch(r"(\d+)s", _value("lazypaged.service", "TimeoutStartSec"))
    assert m
    assert int(m.group(1)) > 2 * RemoteConfig().reconnect_deadline
