"""sd_notify(3) in a few lines: one datagram to $NOTIFY_SOCKET.

No library is needed for this: the protocol is a single AF_UNIX datagram of
``KEY=VALUE`` lines, and an abstract socket name starts with ``@``.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False when not under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    # Never raises: a daemon out of file descriptors (EMFILE) must still
    # shut down cleanly, and systemd's view is not worth a crash.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError:
        return False
    return True
