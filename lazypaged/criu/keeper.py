"""The uffd keeper: makes a daemon crash kill CRIU targets, never zero-fill them.

``criu restore`` closes its own copy of each task's userfaultfd once the
lazy-pages daemon has it, so the daemon holds the last reference. If the
daemon dies (SIGKILL, OOM, a bug) the kernel drops the registrations and the
target's next touch of a missing page silently reads *zeros*.

The keeper is a tiny separate process started by the daemon. It holds:

* a duplicate of every uffd the daemon serves, with a pidfd of the task
  when the daemon found one (message ``H``);
* a duplicate of every ``criu restore`` connection still sending task
  records, with a pidfd of the restorer (message ``C``): a record the
  daemon has not read yet carries a uffd that would otherwise die, unread,
  with the daemon's socket;
* a duplicate of the listening lazy-pages socket (message ``L``): a restore
  that connected but was not accepted yet has queued uffds too.

The daemon releases an entry (``R``) once its pages are all in, its task is
gone, or the restore connection is finished. When the keeper sees the
daemon's end of its socket close, it reads what is left on every restore
connection it holds (taking those uffds too), SIGKILLs every task it still
guards — through pidfds, so no pid can be reused under it — waits for them
to die, and only then closes the uffds. A killed restore is a clear failure;
corrupted memory is not. A guarded uffd whose task cannot be found is held
for as long as the keeper lives: that target blocks instead of reading
zeros.

Wire format on a SOCK_SEQPACKET socketpair, one datagram per message:
``b"H" + key`` with SCM_RIGHTS [uffd] or [uffd, pidfd]; ``b"C" + key`` with
[connection] or [connection, restorer pidfd]; ``b"L" + key`` with
[listening socket]; ``b"R" + key``. The keeper
never answers. It imports only the standard library and two small modules.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

_MAX_FDS = 2
#: Seconds the keeper keeps reading a restore connection after the daemon died.
DRAIN_SECONDS = 2.0
#: The last page below x86_64's 47-bit user address limit (see _mm_alive).
_TOP_PAGE = (1 << 47) - 2 * 4096
#: Seconds it waits for killed tasks to be gone before closing their uffds.
KILL_WAIT_SECONDS = 2.0


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

    def _send(self, kind: bytes, key: str, fds: list[int]) -> None:
        if self._sock is None:
            return
        try:
            if fds:
                socket.send_fds(self._sock, [kind + key.encode()], fds)
            else:
                self._sock.send(kind + key.encode())
        except OSError as e:
            if self.log is not None:
                self.log.error("keeper_lost", error=str(e), consequence="a daemon crash would zero-fill targets")

    def hold(self, key: str, uffd: int, pidfd: int | None) -> None:
        """Guard a session's uffd (and its task, to kill if the daemon dies)."""
        self._send(b"H", key, [uffd] if pidfd is None else [uffd, pidfd])

    def watch_connection(self, key: str, conn: int, restorer_pidfd: int | None) -> None:
        """Guard the uffds still queued on a restore connection."""
        self._send(b"C", key, [conn] if restorer_pidfd is None else [conn, restorer_pidfd])

    def watch_listener(self, key: str, listener: int) -> None:
        """Guard restores that connected but were not accepted yet."""
        self._send(b"L", key, [listener])

    def release(self, key: str) -> None:
        self._send(b"R", key, [])

    def close(self, *, wait: bool = True) -> None:
        """Close our end: the keeper kills what it still guards, then exits.

        It reads every message sent before the close, so a caller about to
        exit need not ``wait`` for it.
        """
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            if not wait:
                return
            try:
                self.proc.wait(timeout=DRAIN_SECONDS + KILL_WAIT_SECONDS + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the keeper process ------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"lazypaged keeper: {msg}", file=sys.stderr, flush=True)


def _kill(pidfd: int, what: str) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        return False
    _say(f"daemon gone, killed unfinished target ({what})")
    return True


def _drain(conn: int, restorer_pidfd: int | None, key: str) -> list[list[int]]:
    """Read the records left on a restore connection; (uffd, task pidfd) of each."""
    from .procs import find_task, pid_of_pidfd
    from .records import RecordError, RecordReader, TaskRecord

    restorer = pid_of_pidfd(restorer_pidfd) if restorer_pidfd is not None else None
    sock = socket.socket(fileno=conn)
    out: list[list[int]] = []
    reader = RecordReader()
    deadline = time.monotonic() + DRAIN_SECONDS
    claimed: set[int] = set()
    try:
        while not reader.finished and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, fds, _f, _a = socket.recv_fds(sock, reader.need(), _MAX_FDS)
            except (TimeoutError, OSError):
                break
            if not data:
                for f in fds:
                    os.close(f)
                break
            try:
                ev = reader.feed(data, list(fds))
            except RecordError:
                out += [[f] for f in fds]
                break
            if isinstance(ev, TaskRecord) and ev.fd is not None:
                entry = [ev.fd]
                if restorer:
                    _pid, pidfd = find_task(restorer, ev.pid, claimed)
                    if pidfd is not None:
                        entry.append(pidfd)
                out.append(entry)
                _say(f"took an unread uffd of image pid {ev.pid} from restore {key}")
    finally:
        sock.close()  # a restore still sending now fails, and cleans up its own tasks
    return out


def _mm_alive(uffd: int) -> bool:
    """Whether the address space behind a uffd still exists.

    UFFDIO_UNREGISTER takes a reference on the mm first and fails with
    ENOMEM once it is gone. It is asked about the topmost user page, which
    no restored task has registered (its stack lies well below).
    """
    import fcntl

    from ..uffd import abi

    buf = bytearray(abi.UFFDIO_RANGE_STRUCT.pack(_TOP_PAGE, 4096))
    try:
        fcntl.ioctl(uffd, abi.UFFDIO_UNREGISTER, buf, True)
    except OSError as e:
        return e.errno != errno.ENOMEM
    return True


def _drain_listener(listener: int, key: str) -> list[tuple[str, list[int]]]:
    """Accept the restores still waiting in the backlog and drain each."""
    lsock = socket.socket(fileno=listener)
    lsock.setblocking(False)
    out: list[tuple[str, list[int]]] = []
    try:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                break
            ucred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer = int.from_bytes(ucred[:4], sys.byteorder, signed=True)
            try:
                pidfd: int | None = os.pidfd_open(peer) if peer > 0 else None
            except OSError:
                pidfd = None
            what = f"unaccepted restore on {key}"
            out += [(what, e) for e in _drain(conn.detach(), pidfd, what)]
            if pidfd is not None:
                os.close(pidfd)
    finally:
        lsock.close()
    return out


def _serve(fd: int) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    held: dict[bytes, tuple[bytes, list[int]]] = {}
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
        for old in held.pop(key, (b"", []))[1]:
            os.close(old)
        if kind in (b"H", b"C", b"L") and fds:
            held[key] = (kind, list(fds))
        else:
            for f in fds:
                os.close(f)
    # The daemon is gone. Take what restores still had queued for it, then
    # kill first and close after: closing a uffd whose target still runs is
    # exactly what this process exists to prevent.
    guarded: list[tuple[str, list[int]]] = []
    for key, (kind, fds) in held.items():
        if kind == b"L":
            guarded += _drain_listener(fds[0], key.decode())
        elif kind == b"C":
            for f in fds[1:]:
                guarded.append((f"restorer of {key.decode()}", [-1, f]))  # closed below, never killed
            guarded += [(key.decode(), e) for e in _drain(fds[0], fds[1] if len(fds) > 1 else None, key.decode())]
        else:
            guarded.append((key.decode(), fds))
    poller = select.poll()
    waiting = set()
    for what, fds in guarded:
        if len(fds) > 1 and fds[0] >= 0 and _kill(fds[1], what):
            poller.register(fds[1], select.POLLIN)
            waiting.add(fds[1])
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while waiting and time.monotonic() < deadline:
        for f, _ev in poller.poll(100):
            waiting.discard(f)
            poller.unregister(f)
    blocked = [(what, fds[0]) for what, fds in guarded if len(fds) == 1]
    if blocked:
        # No way to kill these: hold their uffds until their targets are
        # gone, so they block (visible, killable) instead of reading zeros.
        _say(f"daemon gone; cannot find the tasks of {', '.join(w for w, _ in blocked)}: holding them blocked")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while any(_mm_alive(fd) for _, fd in blocked):
            time.sleep(1.0)
    for _what, fds in guarded:
        for f in fds:
            if f >= 0:
                with contextlib.suppress(OSError):
                    os.close(f)
    return 0


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1])))
