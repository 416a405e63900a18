"""A Firecracker-style restorer, written from the handshake's description only.

It does what Firecracker's UFFD backend does: maps guest memory (two regions
at non-contiguous addresses), creates a non-blocking uffd that also serves
kernel faults, negotiates UFFD_FEATURE_EVENT_REMOVE, registers the regions
itself in MISSING mode, connects to the handler's socket and sends one JSON
array of regions with the uffd attached. It expects no reply. Then it reads
every byte, drops some pages with MADV_DONTNEED (as the balloon does) and
checks they come back as zeros while the rest still match the memory file.

Deliberately independent of lazypaged's own code: ctypes and fcntl only.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import socket
import struct
import sys

PAGE = 4096
MiB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_RW, MAP_PRIVATE, MAP_ANON, MAP_FIXED, MADV_DONTNEED = 3, 0x02, 0x20, 0x10, 4
O_CLOEXEC, O_NONBLOCK = 0o2000000, 0o4000
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, 24 bytes)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, 32 bytes)
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
MODE_MISSING = 1


def die(msg: str) -> None:
    print(json.dumps({"ok": False, "error": msg}), flush=True)
    sys.exit(1)


def main() -> int:
    sock_path, mem_file = sys.argv[1], sys.argv[2]
    sizes = [8 * MiB, 4 * MiB]
    # Reserve 32 MiB, then place the regions at +0 and +20 MiB: a gap between.
    area = libc.mmap(None, 32 * MiB, 0, MAP_PRIVATE | MAP_ANON, -1, 0)
    bases = [area, area + 20 * MiB]
    for base, size in zip(bases, sizes, strict=True):
        if libc.mmap(base, size, PROT_RW, MAP_PRIVATE | MAP_ANON | MAP_FIXED, -1, 0) != base:
            die("mmap failed")
    offsets = [0, sizes[0]]  # regions are laid out one after another in the file

    uffd = libc.syscall(323, O_CLOEXEC | O_NONBLOCK)  # no UFFD_USER_MODE_ONLY
    if uffd < 0:
        die(f"userfaultfd: errno {ctypes.get_errno()}")
    api = bytearray(struct.pack("<QQQ", 0xAA, UFFD_FEATURE_EVENT_REMOVE, 0))
    fcntl.ioctl(uffd, UFFDIO_API, api, True)
    for base, size in zip(bases, sizes, strict=True):
        reg = bytearray(struct.pack("<QQQQ", base, size, MODE_MISSING, 0))
        fcntl.ioctl(uffd, UFFDIO_REGISTER, reg, True)

    regions = [
        {"base_host_virt_addr": b, "size": s, "offset": o, "page_size": PAGE, "page_size_kib": PAGE}
        for b, s, o in zip(bases, sizes, offsets, strict=True)
    ]
    body = json.dumps(regions).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", uffd))])
    # Like Firecracker, keep our uffd open and run.

    with open(mem_file, "rb") as f:
        data = f.read()
    views = [(ctypes.c_char * size).from_address(base) for base, size in zip(bases, sizes, strict=True)]
    for k, (v, off, size) in enumerate(zip(views, offsets, sizes, strict=True)):
        if v.raw != data[off : off + size]:
            die(f"region {k}: bytes differ from the memory file")
    # Balloon-style: drop pages in the middle of region 0 and the start of region 1.
    drops = [(0, 1 * MiB, 2 * MiB), (1, 0, 1 * MiB)]
    for k, start, length in drops:
        if libc.madvise(bases[k] + start, length, MADV_DONTNEED) != 0:
            die(f"madvise: errno {ctypes.get_errno()}")
    for k, (v, off, size) in enumerate(zip(views, offsets, sizes, strict=True)):
        want = bytearray(data[off : off + size])
        for kk, start, length in drops:
            if kk == k:
                want[start : start + length] = bytes(length)
        if v.raw != bytes(want):
            die(f"region {k}: wrong bytes after MADV_DONTNEED")
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
