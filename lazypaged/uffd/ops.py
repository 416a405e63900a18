"""One thin function per userfaultfd ioctl.

Each takes the uffd number and a caller-owned, preallocated ``bytearray`` of
the struct's size, packs it in place and calls ``fcntl.ioctl(..., True)`` so
that the kernel's write-back (``copy``, ``zeropage``, ``ioctls``) lands in the
same buffer. Preallocation keeps the fault path free of per-call allocation;
``fcntl.ioctl`` writes the buffer back even when it raises, so a partial
count is still readable after an error.
"""

from __future__ import annotations

import fcntl
import struct

from . import abi
from .errors import UffdError, from_errno, from_errno_setup

_api = abi.UFFDIO_API_STRUCT
_range = abi.UFFDIO_RANGE_STRUCT
_register = abi.UFFDIO_REGISTER_STRUCT
_copy = abi.UFFDIO_COPY_STRUCT
_zero = abi.UFFDIO_ZEROPAGE_STRUCT
_poison = abi.UFFDIO_POISON_STRUCT


def api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API: returns (features granted, ioctls mask)."""
    buf = bytearray(_api.size)
    _api.pack_into(buf, 0, abi.UFFD_API, features, 0)
    try:
        fcntl.ioctl(fd, abi.UFFDIO_API_IOCTL, buf, True)
    except OSError as e:
        raise UffdError(e.errno or 0, f"UFFDIO_API features={features:#x}") from None
    _, granted, ioctls = _api.unpack(buf)
    return granted, ioctls


def register(fd: int, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER: returns the mask of ioctls allowed on the range."""
    buf = bytearray(_register.size)
    _register.pack_into(buf, 0, start, length, mode, 0)
    try:
        fcntl.ioctl(fd, abi.UFFDIO_REGISTER, buf, True)
    except OSError as e:
        raise from_errno_setup(e.errno or 0, f"UFFDIO_REGISTER {start:#x}+{length:#x}") from None
    return int(_register.unpack(buf)[3])


def unregister(fd: int, start: int, length: int) -> None:
    """UFFDIO_UNREGISTER."""
    buf = bytearray(_range.size)
    _range.pack_into(buf, 0, start, length)
    try:
        fcntl.ioctl(fd, abi.UFFDIO_UNREGISTER, buf, True)
    except OSError as e:
        raise from_errno_setup(e.errno or 0, f"UFFDIO_UNREGISTER {start:#x}+{length:#x}") from None


def wake(fd: int, buf: bytearray, start: int, length: int) -> None:
    """UFFDIO_WAKE: wake threads blocked on faults in the range."""
    _range.pack_into(buf, 0, start, length)
    try:
        fcntl.ioctl(fd, abi.UFFDIO_WAKE, buf, True)
    except OSError as e:
        raise from_errno(e.errno or 0, f"UFFDIO_WAKE {start:#x}+{length:#x}") from None


def copy(fd: int, buf: bytearray, dst: int, src: int, length: int, mode: int) -> int:
    """UFFDIO_COPY: returns bytes installed, which may be less than ``length``.

    A short count means the kernel stopped early (EAGAIN after progress); the
    next call from ``dst + count`` reveals why. Zero progress raises.
    """
    _copy.pack_into(buf, 0, dst, src, length, mode, 0)
    try:
        fcntl.ioctl(fd, abi.UFFDIO_COPY, buf, True)
    except OSError as e:
        done = _copy.unpack_from(buf)[4]
        if done > 0:
            return int(done)
        raise from_errno(e.errno or 0, f"UFFDIO_COPY {dst:#x}+{length:#x}") from None
    return length


def zeropage(fd: int, buf: bytearray, start: int, length: int, mode: int) -> int:
    """UFFDIO_ZEROPAGE: like :func:`copy`, mapping the zero page instead."""
    return _range_op(fd, buf, _zero, abi.UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE", start, length, mode)


def poison(fd: int, buf: bytearray, start: int, length: int, mode: int) -> int:
    """UFFDIO_POISON (kernel >= 6.6): touching the range raises SIGBUS; like :func:`copy`."""
    return _range_op(fd, buf, _poison, abi.UFFDIO_POISON, "UFFDIO_POISON", start, length, mode)


def _range_op(
    fd: int, buf: bytearray, st: struct.Struct, req: int, what: str, start: int, length: int, mode: int
) -> int:
    """The ``{range, mode, count}`` ioctls: bytes done, or raise on no progress."""
    st.pack_into(buf, 0, start, length, mode, 0)
    try:
        fcntl.ioctl(fd, req, buf, True)
    except OSError as e:
        done = st.unpack_from(buf)[3]
        if done > 0:
            return int(done)
        raise from_errno(e.errno or 0, f"{what} {start:#x}+{length:#x}") from None
    return length
