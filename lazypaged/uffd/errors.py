"""Exception families for userfaultfd calls, decided from errno at the call site.

The session needs to tell apart four outcomes of an ioctl, because each one
asks for a different reaction:

* ``AlreadyPresent`` (EEXIST): someone installed the page first; skip it.
* ``Busy`` (EAGAIN with no progress): the target's address space is changing
  (fork, mremap, munmap in flight); read pending events, then retry.
* ``RangeGone`` (ENOENT): the destination is no longer a registered mapping
  (unmapped or moved); drop that range, not the session.
* ``TargetGone`` (ESRCH, and ENOSPC on older kernels): the target's mm is gone;
  end the session quietly. ``UFFDIO_REGISTER``/``UNREGISTER`` report a gone
  mm as ENOMEM instead (their reference on the mm fails), so those two map
  ENOMEM to ``TargetGone`` at their call site (see ``ops.py``).

Everything else is a ``UffdError`` carrying the original errno.
``UFFDIO_WAKE`` never reports a gone mm: it does not touch the address space.
"""

from __future__ import annotations

import errno
import os


class UffdError(OSError):
    """A userfaultfd call failed."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


class AlreadyPresent(UffdError):
    """EEXIST: the first page of the range is already mapped."""


class Busy(UffdError):
    """EAGAIN without progress: events are pending, read them and retry."""


class RangeGone(UffdError):
    """ENOENT: the destination range is no longer registered with this uffd."""


class TargetGone(UffdError):
    """ESRCH/ENOSPC: the target process's address space no longer exists."""


class NotSupported(UffdError):
    """The kernel lacks a requested feature, mode or ioctl."""


_BY_ERRNO: dict[int, type[UffdError]] = {
    errno.EEXIST: AlreadyPresent,
    errno.EAGAIN: Busy,
    errno.ENOENT: RangeGone,
    errno.ESRCH: TargetGone,
    errno.ENOSPC: TargetGone,
}


def from_errno(err: int, what: str) -> UffdError:
    """Build the exception family that ``err`` means for a range ioctl."""
    return _BY_ERRNO.get(err, UffdError)(err, what)


def from_errno_setup(err: int, what: str) -> UffdError:
    """Like :func:`from_errno`, for ``UFFDIO_REGISTER``/``UNREGISTER``.

    Both answer ENOMEM when the mm is gone. The only other ENOMEM they can
    return comes from splitting a vma while the machine is out of memory;
    the session cannot serve that target either way.
    """
    if err == errno.ENOMEM:
        return TargetGone(err, f"{what} (the target's address space is gone)")
    return from_errno(err, what)
