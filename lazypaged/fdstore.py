"""systemd's file-descriptor store: park a descriptor with the service manager.

``FDSTORE=1`` with ``FDNAME=`` and the descriptor attached (SCM_RIGHTS) asks
systemd to hold a copy across a restart of the service; the next start finds
it among ``LISTEN_FDS`` under its name in ``LISTEN_FDNAMES``.
``FDSTOREREMOVE=1`` drops it. Needs ``FileDescriptorStoreMax=`` in the unit
(systemd refuses the store otherwise, silently).

A userfaultfd parked there survives the daemon: systemd's copy keeps the
target's registrations alive (missing pages block, never read zeros) until a
restarted daemon adopts it (lazypaged/adopt.py).
"""

from __future__ import annotations

import array
import os
import re
import socket

#: systemd's rule for FDNAME: up to 255 printable ASCII characters, no colon.
_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    return "\0" + addr[1:] if addr.startswith("@") else addr


def available() -> bool:
    """True under a service manager (``NOTIFY_SOCKET`` set)."""
    return _address() is not None


def _send(text: str, fds: list[int]) -> bool:
    addr = _address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            if fds:
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                s.sendmsg([text.encode()], [rights], 0, addr)
            else:
                s.sendto(text.encode(), addr)
        except OSError:
            return False
    return True


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid FDNAME (1-255 printable ASCII characters, no ':')")
    return name


def store(fd: int, name: str) -> bool:
    """Park ``fd`` under ``name``; False when no service manager listens."""
    return _send(f"FDSTORE=1\nFDNAME={check_name(name)}", [fd])


def remove(name: str) -> bool:
    """Drop every descriptor parked under ``name``."""
    return _send(f"FDSTOREREMOVE=1\nFDNAME={check_name(name)}", [])


def inherited() -> dict[str, list[int]]:
    """Descriptors passed at start (``LISTEN_FDS``), by name; empty if not for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, list[int]] = {}
    for i in range(n):
        out.setdefault(names[i] if i < len(names) else "unknown", []).append(3 + i)
    return out
