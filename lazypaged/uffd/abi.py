"""userfaultfd ABI: constants, ioctl numbers and struct layouts.

Values mirror ``include/uapi/linux/userfaultfd.h`` for 64-bit little-endian
machines that use the generic ioctl encoding (x86_64, aarch64);
``tests/test_uffd_abi.py`` checks them against the installed kernel header.
Newer entries (POISON, MOVE) are kept here even when the build host's header
predates them: the running kernel decides what is granted, through
``UFFDIO_API``.
"""

from __future__ import annotations

import platform
import struct
from typing import Final

# --- syscall / device -------------------------------------------------------
_SYSCALL_NUMBERS: Final = {"x86_64": 323, "aarch64": 282}
#: -1 on an unlisted machine: syscall(-1) fails with ENOSYS, which sends
#: ``Userfaultfd.create`` to /dev/userfaultfd instead of a wrong syscall.
SYS_USERFAULTFD: Final = _SYSCALL_NUMBERS.get(platform.machine(), -1)
UFFD_USER_MODE_ONLY: Final = 1
DEV_USERFAULTFD: Final = "/dev/userfaultfd"


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_IOWR = _IOC_READ | _IOC_WRITE

UFFD_API: Final = 0xAA
UFFDIO: Final = 0xAA

# ioctl "numbers" (bit positions reported in the ``ioctls`` masks)
_UFFDIO_REGISTER: Final = 0x00
_UFFDIO_UNREGISTER: Final = 0x01
_UFFDIO_WAKE: Final = 0x02
_UFFDIO_COPY: Final = 0x03
_UFFDIO_ZEROPAGE: Final = 0x04
_UFFDIO_MOVE: Final = 0x05
_UFFDIO_WRITEPROTECT: Final = 0x06
_UFFDIO_CONTINUE: Final = 0x07
_UFFDIO_POISON: Final = 0x08
_UFFDIO_API: Final = 0x3F

# --- structs (all little-endian, naturally aligned u64 fields) -------------
UFFDIO_API_STRUCT: Final = struct.Struct("<QQQ")  # api, features, ioctls
UFFDIO_RANGE_STRUCT: Final = struct.Struct("<QQ")  # start, len
UFFDIO_REGISTER_STRUCT: Final = struct.Struct("<QQQQ")  # start, len, mode, ioctls
UFFDIO_COPY_STRUCT: Final = struct.Struct("<QQQQq")  # dst, src, len, mode, copy
UFFDIO_ZEROPAGE_STRUCT: Final = struct.Struct("<QQQq")  # start, len, mode, zeropage
UFFDIO_POISON_STRUCT: Final = struct.Struct("<QQQq")  # start, len, mode, updated
UFFDIO_CONTINUE_STRUCT: Final = struct.Struct("<QQQq")  # start, len, mode, mapped
UFFDIO_WRITEPROTECT_STRUCT: Final = struct.Struct("<QQQ")  # start, len, mode
UFFDIO_MOVE_STRUCT: Final = struct.Struct("<QQQQq")  # dst, src, len, mode, move

# struct uffd_msg: u8 event, u8, u16, u32, then a 24-byte union read as 3 u64.
UFFD_MSG_STRUCT: Final = struct.Struct("<BBHIQQQ")
UFFD_MSG_SIZE: Final = UFFD_MSG_STRUCT.size  # 32

UFFDIO_API_IOCTL: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_API, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_REGISTER, UFFDIO_REGISTER_STRUCT.size)
UFFDIO_UNREGISTER: Final = _ioc(_IOC_READ, UFFDIO, _UFFDIO_UNREGISTER, UFFDIO_RANGE_STRUCT.size)
UFFDIO_WAKE: Final = _ioc(_IOC_READ, UFFDIO, _UFFDIO_WAKE, UFFDIO_RANGE_STRUCT.size)
UFFDIO_COPY: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_COPY, UFFDIO_COPY_STRUCT.size)
UFFDIO_ZEROPAGE: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_ZEROPAGE, UFFDIO_ZEROPAGE_STRUCT.size)
UFFDIO_MOVE: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_MOVE, UFFDIO_MOVE_STRUCT.size)
UFFDIO_WRITEPROTECT: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_WRITEPROTECT, UFFDIO_WRITEPROTECT_STRUCT.size)
UFFDIO_CONTINUE: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_CONTINUE, UFFDIO_CONTINUE_STRUCT.size)
UFFDIO_POISON: Final = _ioc(_IOWR, UFFDIO, _UFFDIO_POISON, UFFDIO_POISON_STRUCT.size)
USERFAULTFD_IOC: Final = 0xAA
USERFAULTFD_IOC_NEW: Final = _ioc(_IOC_NONE, USERFAULTFD_IOC, 0x00, 0)

# --- events -----------------------------------------------------------------
UFFD_EVENT_PAGEFAULT: Final = 0x12
UFFD_EVENT_FORK: Final = 0x13
UFFD_EVENT_REMAP: Final = 0x14
UFFD_EVENT_REMOVE: Final = 0x15
UFFD_EVENT_UNMAP: Final = 0x16

UFFD_PAGEFAULT_FLAG_WRITE: Final = 1 << 0
UFFD_PAGEFAULT_FLAG_WP: Final = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR: Final = 1 << 2

# --- features ---------------------------------------------------------------
UFFD_FEATURE_PAGEFAULT_FLAG_WP: Final = 1 << 0
UFFD_FEATURE_EVENT_FORK: Final = 1 << 1
UFFD_FEATURE_EVENT_REMAP: Final = 1 << 2
UFFD_FEATURE_EVENT_REMOVE: Final = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS: Final = 1 << 4
UFFD_FEATURE_MISSING_SHMEM: Final = 1 << 5
UFFD_FEATURE_EVENT_UNMAP: Final = 1 << 6
UFFD_FEATURE_SIGBUS: Final = 1 << 7
UFFD_FEATURE_THREAD_ID: Final = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS: Final = 1 << 9
UFFD_FEATURE_MINOR_SHMEM: Final = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS: Final = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED: Final = 1 << 13
UFFD_FEATURE_POISON: Final = 1 << 14
UFFD_FEATURE_WP_ASYNC: Final = 1 << 15
UFFD_FEATURE_MOVE: Final = 1 << 16

FEATURE_NAMES: Final = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: "pagefault_flag_wp",
    UFFD_FEATURE_EVENT_FORK: "event_fork",
    UFFD_FEATURE_EVENT_REMAP: "event_remap",
    UFFD_FEATURE_EVENT_REMOVE: "event_remove",
    UFFD_FEATURE_MISSING_HUGETLBFS: "missing_hugetlbfs",
    UFFD_FEATURE_MISSING_SHMEM: "missing_shmem",
    UFFD_FEATURE_EVENT_UNMAP: "event_unmap",
    UFFD_FEATURE_SIGBUS: "sigbus",
    UFFD_FEATURE_THREAD_ID: "thread_id",
    UFFD_FEATURE_MINOR_HUGETLBFS: "minor_hugetlbfs",
    UFFD_FEATURE_MINOR_SHMEM: "minor_shmem",
    UFFD_FEATURE_EXACT_ADDRESS: "exact_address",
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "wp_hugetlbfs_shmem",
    UFFD_FEATURE_WP_UNPOPULATED: "wp_unpopulated",
    UFFD_FEATURE_POISON: "poison",
    UFFD_FEATURE_WP_ASYNC: "wp_async",
    UFFD_FEATURE_MOVE: "move",
}

# --- register modes and per-ioctl mode bits ----------------------------------
UFFDIO_REGISTER_MODE_MISSING: Final = 1 << 0
UFFDIO_REGISTER_MODE_WP: Final = 1 << 1
UFFDIO_REGISTER_MODE_MINOR: Final = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_COPY_MODE_WP: Final = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_POISON_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP: Final = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE: Final = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_CONTINUE_MODE_WP: Final = 1 << 1
UFFDIO_MOVE_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: Final = 1 << 1

IOCTL_NAMES: Final = {
    _UFFDIO_REGISTER: "register",
    _UFFDIO_UNREGISTER: "unregister",
    _UFFDIO_WAKE: "wake",
    _UFFDIO_COPY: "copy",
    _UFFDIO_ZEROPAGE: "zeropage",
    _UFFDIO_MOVE: "move",
    _UFFDIO_WRITEPROTECT: "writeprotect",
    _UFFDIO_CONTINUE: "continue",
    _UFFDIO_POISON: "poison",
    _UFFDIO_API: "api",
}


def feature_names(mask: int) -> list[str]:
    """Names of the feature bits set in ``mask`` (unknown bits as hex)."""
    names = [name for bit, name in FEATURE_NAMES.items() if mask & bit]
    unknown = mask & ~sum(FEATURE_NAMES)
    if unknown:
        names.append(hex(unknown))
    return names


def ioctl_names(mask: int) -> list[str]:
    """Names of the ioctls whose bits are set in an ``ioctls`` mask."""
    return [name for nr, name in IOCTL_NAMES.items() if mask & (1 << nr)]
