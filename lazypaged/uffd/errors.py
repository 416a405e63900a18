"""Exception families for userfaultfd calls, decided from errno at the call site.

The session needs to tell apart four outcomes of an ioctl, because each one
asks for a different reaction:

* ``AlreadyPresent`` (EEXIST): someone installed the page first; skip it.
* ``Busy`` (EAGAIN with no progress): the target's address space is changing
  (fork, mremap, munmap in flight); read pending events, then retry.
* ``RangeGone`` (ENOENT): the destination is no longer a registered mapping
  (unmapped or moved); drop that range, not the session.
* ``TargetGone`` (ESRCH, and ENOSPC on older kernels): the target's mm is gone;
  end the session quietly.

Everything else is a ``UffdError`` carrying the original errno.
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
