"""The ``Userfaultfd`` object: one open uffd and the calls made on it.

Theory of operation (facts the rest of lazypaged relies on):

* A uffd belongs to the address space (mm) of the process that created it.
  Every ioctl on it, from any process holding the fd, acts on *that* mm: the
  daemon registers, copies and wakes inside the target from its own process.
* ``UFFDIO_API`` is called once, by the creator. The daemon never calls it on
  a received fd (the kernel refuses a second call with EINVAL, the same errno
  as for a feature it lacks); it learns features from the handoff instead.
  A refused call leaves the uffd un-negotiated, so the creator may retry
  with fewer features.
* Reads return whole 32-byte ``uffd_msg`` records; one ``read`` of N*32 bytes
  drains up to N events. The fd is non-blocking: EAGAIN means "none now".
* ``UFFDIO_COPY``/``ZEROPAGE`` may stop part-way. The ``copy`` field says how
  many bytes went in; a zero-progress failure is EEXIST (page already
  there), EAGAIN (an mm change is in flight: non-cooperative events are
  queued and every range ioctl fails until they are read), ENOENT (range no
  longer registered), ESRCH (mm gone: the target exited). REGISTER and
  UNREGISTER say ENOMEM for a gone mm; WAKE still succeeds then.
* Non-cooperative events (EVENT_REMOVE/UNMAP/REMAP/FORK) hold the target's
  madvise/munmap/mremap/fork until the event is read. A moved range (mremap)
  arrives as REMAP and then, on current kernels, an UNMAP of the old range.
  A FORK's new uffd is installed into the table of the process that reads it.
* Copies without DONTWAKE wake every thread blocked on the copied range.
* Closing the last reference to a uffd while ranges are still registered
  makes the kernel drop the registration: later touches of missing anonymous
  pages are then filled with *zeros* by the kernel. A live session's uffd is
  therefore closed only after its ranges are fully installed and
  unregistered, or when its target is gone.
* A thread that touches one of *our own* registered, missing pages sleeps
  until someone serves it; if that thread holds the GIL (``ctypes.string_at``
  does), the whole process deadlocks. Closing the uffd wakes such sleepers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from . import abi, ops
from .errors import NotSupported, UffdError
from .events import Event, decode

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

#: Events drained per read: 64 * 32 bytes covers a burst from many threads.
READ_BATCH = 64


class Userfaultfd:
    """An owned userfaultfd file descriptor.

    The descriptor number becomes -1 the moment it is closed, so later use
    fails loudly with EBADF instead of touching a reused number.

    The ioctl argument buffers are preallocated per object: one thread at a
    time may call ``wake``/``copy``/``zeropage``/``poison`` on it.
    """

    __slots__ = ("_copy_buf", "_fd", "_poison_buf", "_wake_buf", "_zero_buf", "features")

    def __init__(self, fd: int, features: int = 0) -> None:
        self._fd = fd
        self.features = features
        self._copy_buf = bytearray(abi.UFFDIO_COPY_STRUCT.size)
        self._zero_buf = bytearray(abi.UFFDIO_ZEROPAGE_STRUCT.size)
        self._wake_buf = bytearray(abi.UFFDIO_RANGE_STRUCT.size)
        self._poison_buf = bytearray(abi.UFFDIO_POISON_STRUCT.size)

    # -- creation (restorer side) --------------------------------------------
    @classmethod
    def create(cls, *, user_mode_only: bool = False, nonblocking: bool = True) -> Userfaultfd:
        """Create a uffd for the calling process (syscall, then /dev/userfaultfd)."""
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        if user_mode_only:
            flags |= abi.UFFD_USER_MODE_ONLY
        fd = _syscall(abi.SYS_USERFAULTFD, flags)
        if fd >= 0:
            return cls(int(fd))
        err = ctypes.get_errno()
        if err not in (errno.EPERM, errno.ENOSYS):
            raise UffdError(err, "userfaultfd()")
        try:
            dev = os.open(abi.DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise UffdError(err, f"userfaultfd() and {abi.DEV_USERFAULTFD} ({e.strerror})") from None
        try:
            fd = fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags)
        except OSError as e:
            raise UffdError(e.errno or 0, "USERFAULTFD_IOC_NEW") from None
        finally:
            os.close(dev)
        return cls(int(fd))

    def api(self, features: int = 0) -> int:
        """Enable ``features``; returns every feature the kernel offers.

        The kernel answers with its full feature set, not with what was
        enabled: what is enabled is exactly what was asked, or the call fails
        (EINVAL) if the kernel lacks any of it.
        """
        try:
            offered, _ioctls = ops.api(self.fileno(), features)
        except UffdError as e:
            raise _api_refusal(e.errno or 0, features) from None
        missing = features & ~offered
        if missing:
            raise NotSupported(errno.EINVAL, f"features not offered: {abi.feature_names(missing)}")
        self.features = features
        return offered

    # -- plumbing ---------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership and return the raw fd (e.g. after sending it)."""
        fd, self._fd = self.fileno(), -1
        return fd

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd} features={abi.feature_names(self.features)}>"

    # -- ranges ------------------------------------------------------------------
    def register(self, start: int, length: int, mode: int = abi.UFFDIO_REGISTER_MODE_MISSING) -> int:
        """Register a range; returns the ioctl mask granted on it."""
        return ops.register(self.fileno(), start, length, mode)

    def unregister(self, start: int, length: int) -> None:
        ops.unregister(self.fileno(), start, length)

    def wake(self, start: int, length: int) -> None:
        ops.wake(self.fileno(), self._wake_buf, start, length)

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """Install ``length`` bytes from our address ``src``; returns bytes done.

        A result below ``length`` means the kernel stopped part-way; the call
        from ``dst + done`` raises the reason (e.g. ``AlreadyPresent``).
        """
        mode = 0 if wake else abi.UFFDIO_COPY_MODE_DONTWAKE
        return ops.copy(self.fileno(), self._copy_buf, dst, src, length, mode)

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        """Map the zero page over ``length`` bytes; returns bytes done, as ``copy``."""
        mode = 0 if wake else abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        return ops.zeropage(self.fileno(), self._zero_buf, start, length, mode)

    def poison(self, start: int, length: int, *, wake: bool = True) -> int:
        """Mark ``length`` bytes poisoned (touching them raises SIGBUS); as ``copy``."""
        mode = 0 if wake else abi.UFFDIO_POISON_MODE_DONTWAKE
        return ops.poison(self.fileno(), self._poison_buf, start, length, mode)

    # -- events ------------------------------------------------------------------
    def read_raw(self, batch: int = READ_BATCH) -> bytes:
        """One non-blocking read of up to ``batch`` messages (b"" if none)."""
        try:
            return os.read(self.fileno(), batch * abi.UFFD_MSG_SIZE)
        except BlockingIOError:
            return b""

    def read_events(self, batch: int = READ_BATCH) -> list[Event]:
        return decode(self.read_raw(batch))


def _api_refusal(err: int, features: int) -> UffdError:
    """Say why UFFDIO_API refused ``features``.

    EINVAL means either a feature the kernel lacks or a uffd that was already
    negotiated; a scratch uffd tells the two apart. EPERM is EVENT_FORK
    without CAP_SYS_PTRACE.
    """
    names = abi.feature_names(features)
    if err == errno.EPERM and features & abi.UFFD_FEATURE_EVENT_FORK:
        return NotSupported(err, f"UFFDIO_API refused {names}: event_fork needs CAP_SYS_PTRACE")
    if err != errno.EINVAL:
        return UffdError(err, f"UFFDIO_API features {names}")
    try:
        offered, _ioctls = kernel_features()
    except UffdError:
        return NotSupported(err, f"UFFDIO_API refused features {names}")
    missing = features & ~offered
    if missing:
        return NotSupported(err, f"features not offered by this kernel: {abi.feature_names(missing)}")
    return UffdError(err, f"UFFDIO_API refused features {names} that the kernel offers: already negotiated?")


def kernel_features() -> tuple[int, int]:
    """Features and ioctls the running kernel offers (probed on a scratch uffd)."""
    with Userfaultfd.create() as probe:
        return ops.api(probe.fileno(), 0)
