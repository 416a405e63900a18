"""Read leases: a mapped image file that nobody can change while we read it.

The raw sources serve pages straight from an mmap of their file. A file cut
short under that mapping is dangerous two ways: the daemon's own reads of
it (the zero check, checksums, working-set copies) past the new end raise
SIGBUS and would end the daemon, and the kernel's UFFDIO_COPY from it
zero-fills the tail of the page holding the new end, so a half-zero page
would be installed without any error.

Checking the size before a copy does not close that: the cut can land
between the check and the copy. So a mapped file is only read under a read
lease (``fcntl(F_SETLEASE, F_RDLCK)``; root has CAP_LEASE). While one is
held, nobody can open the file for writing or truncate it: the kernel holds
the writer (``open``, ``truncate``) and signals us (SIGIO), and the writer
goes on only once we let the lease go, or after ``fs.lease-break-time``
(45 s by default) if we never do. The size read once the lease is taken
therefore holds for every read made under it.

On SIGIO the lease is marked broken and let go from the event loop —
between two callbacks, so never in the middle of a check-then-copy of the
session — or, if a thread is reading under a pin (:meth:`FileLease.pinned`),
when the last pin ends; meanwhile no new read uses the mapping. The
writer is delayed by that long: one turn of the loop, typically well under a
millisecond. The next read takes a new lease (possible again once no writer
has the file open) and reads the size afresh.

Where no lease can be had (a writer has the file open, the filesystem has no
leases, no event loop runs on the main thread to hear SIGIO), the sources do
not read the mapping at all: they ``pread`` the bytes into a buffer of their
own, then check the file still reaches past them (``fstat``). A read from a
file being cut returns short, never SIGBUS; the only way a cut can put
zeros into what ``pread`` returned is for the new end to fall inside it,
and then the size checked afterwards shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import threading
import weakref
from collections.abc import Iterator

F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)

_leases: weakref.WeakSet[FileLease] = weakref.WeakSet()
_handler_loop: asyncio.AbstractEventLoop | None = None
_installed = False
_lock = threading.Lock()


def _on_sigio() -> None:
    """Let go of every lease a writer waits on."""
    for lease in list(_leases):
        lease.check_broken()


def _sigio(signum: int, frame: object) -> None:
    """SIGIO: a writer waits on one of our leases. Handled as a callback of
    the loop, never in the middle of one; with no loop running any more,
    nothing reads the mappings but pinned threads, so at once."""
    loop = _handler_loop
    if loop is not None and loop.is_running():
        loop.call_soon_threadsafe(_on_sigio)
    else:
        _on_sigio()


def _ensure_handler() -> bool:
    """Whether SIGIO is handled and a loop runs on the main thread.

    The default action of SIGIO ends the process, so no lease is taken
    without the handler. A plain ``signal.signal`` handler rather than the
    loop's own: it outlives the loop (asyncio puts back SIG_DFL when a loop
    closes), and a signal interrupts the loop's wait either way."""
    global _handler_loop, _installed
    if threading.current_thread() is not threading.main_thread():
        return _installed and _handler_loop is not None and _handler_loop.is_running()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    if not _installed:
        try:
            signal.signal(signal.SIGIO, _sigio)
        except (OSError, ValueError):
            return False
        _installed = True
    _handler_loop = loop
    return True


class FileLease:
    """A read lease on one open file, taken and given back as writers come and go."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._held = False
        self._broken = False
        self._pins = 0
        self._unsupported = False
        #: The file's size when the lease was taken (valid while it is held).
        self.size = -1
        #: Leases taken so far: a new one means the file may have changed.
        self.generation = 0

    def valid(self) -> bool:
        """Whether reads may use the mapping now (taking the lease if needed)."""
        if self._broken:
            return False
        if self._held:
            return True
        if self._unsupported or self._fd < 0 or not _ensure_handler():
            return False
        with _lock:
            if self._held or self._broken:
                return self._held and not self._broken
            try:
                fcntl.fcntl(self._fd, F_SETLEASE, fcntl.F_RDLCK)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EBUSY):  # not a writer: no leases here
                    self._unsupported = True
                return False
            self._held = True
            self.generation += 1
            _leases.add(self)
        try:
            self.size = os.fstat(self._fd).st_size
        except OSError:
            self.release()
            return False
        return True

    def check_broken(self) -> None:
        """After SIGIO: if a writer waits on this lease, let it go (now or at the last unpin)."""
        if not self._held or self._broken:
            return
        try:
            kind = fcntl.fcntl(self._fd, F_GETLEASE)
        except OSError:
            kind = fcntl.F_UNLCK
        if kind == fcntl.F_RDLCK:
            return  # intact: the signal was for another lease
        with _lock:
            self._broken = True
            if self._pins:
                return
        self.release()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[bool]:
        """Keep the lease (if valid now) until the block ends: for a thread
        reading the mapping outside the loop. Yields whether it is valid."""
        ok = self.valid()
        with _lock:
            ok = ok and self._held and not self._broken
            if ok:
                self._pins += 1
        try:
            yield ok
        finally:
            if ok:
                with _lock:
                    self._pins -= 1
                    last = self._pins == 0 and self._broken
                if last:
                    self.release()

    def release(self) -> None:
        with _lock:
            held, self._held, self._broken = self._held, False, False
            _leases.discard(self)
        if held and self._fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._fd, F_SETLEASE, fcntl.F_UNLCK)

    def close(self) -> None:
        """Let the lease go before the file is closed (closing would too)."""
        self.release()
        self._fd = -1
