"""The uffd keeper: makes a daemon crash kill CRIU targets, never zero-fill them.

``criu restore`` closes its own copy of each task's userfaultfd once the
lazy-pages daemon has it, so the daemon holds the last reference. If the
daemon dies (SIGKILL, OOM, a bug) the kernel drops the registrations and the
target's next touch of a missing page silently reads *zeros*.

The keeper is a tiny separate process started by the daemon. The daemon
hands it a duplicate of every uffd, with a pidfd of the task when it has
one, and tells it when a session no longer needs protecting (its pages are
all in, or its task is gone). While the keeper holds a copy, a daemon crash
does not close the last reference: the target blocks on its missing page.
When the keeper sees the daemon's end of the socket close without a
release, it SIGKILLs every task it still guards (through the pidfd, so no
pid can be reused under it) and only then closes the uffds. A killed
restore is a clear failure; corrupted memory is not.

Wire format on a SOCK_SEQPACKET socketpair, one datagram per message:
``b"H" + key`` with SCM_RIGHTS [uffd] or [uffd, pidfd] (hold), ``b"R" + key``
(release). The keeper never answers.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

_MAX_FDS = 2
_CMSG_SPACE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


class Keeper:
    """The daemon's side: start the keeper, hand it fds, release them."""

    def __init__(self, log: Any = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock: socket.socket | None = ours
        self.log = log
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lazypaged.criu.keeper", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's ^C reaches the daemon, not the keeper
            )
        finally:
            theirs.close()
        ours.set_inheritable(False)

    def hold(self, key: str, uffd: int, pidfd: int | None) -> None:
        if self._sock is None:
            return
        fds = [uffd] if pidfd is None else [uffd, pidfd]
        try:
            socket.send_fds(self._sock, [b"H" + key.encode()], fds)
        except OSError as e:
            if self.log is not None:
                self.log.error("keeper_lost", error=str(e), consequence="a daemon crash would zero-fill targets")

    def release(self, key: str) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.send(b"R" + key.encode())

    def close(self) -> None:
        """Close our end: the keeper kills what it still guards, then exits."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _serve(fd: int) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    held: dict[bytes, list[int]] = {}
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 4096, _MAX_FDS)
        except InterruptedError:
            continue
        except OSError:
            data, fds = b"", []
        if not data:
            break
        kind, key = data[:1], data[1:]
        if kind == b"H" and fds:
            for old in held.pop(key, []):
                os.close(old)
            held[key] = list(fds)
        else:
            for f in fds:
                os.close(f)
            for old in held.pop(key, []):
                os.close(old)
    # The daemon is gone. Kill first, close after: closing a uffd whose
    # target still runs is exactly what this process exists to prevent.
    poller = select.poll()
    for key, fds in held.items():
        if len(fds) > 1:
            try:
                signal.pidfd_send_signal(fds[1], signal.SIGKILL)
                print(f"lazypaged keeper: daemon gone, killed unfinished target ({key.decode()})", file=sys.stderr)
                poller.register(fds[1], select.POLLIN)
            except OSError:
                pass
    # Wait (briefly) until the killed tasks are really gone.
    deadline = time.monotonic() + 2.0
    waiting = {fds[1] for fds in held.values() if len(fds) > 1}
    while waiting and time.monotonic() < deadline:
        for f, _ev in poller.poll(100):
            waiting.discard(f)
            poller.unregister(f)
        else:
            # No pidfd: hold the uffd for as long as we live, so the target
            # blocks (visible, killable) instead of reading zeros.
            print(f"lazypaged keeper: daemon gone; target of {key.decode()} unknown, blocking it", file=sys.stderr)
    if any(len(fds) == 1 for fds in held.values()):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            signal.pause()
    for fds in held.values():
        for f in fds:
            os.close(f)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
