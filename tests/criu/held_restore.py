"""A stand-in for ``criu restore --lazy-pages`` that pauses mid-restore.

Like fake_restore.py (same arguments, same images), but after the task
record is sent and the memory registered it reads the first lazy page,
prints ``{"first": true}`` and then waits for a second line on stdin before
reading the rest. A test can do things to the daemon (send it signals)
while the restore is known to be half done.

    held_restore.py SOCKET ADDR NPAGES LAZY
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import struct
import sys

from lazypaged.uffd import Userfaultfd, abi, kernel_features
from tests.criu.synth import page_bytes

RSTF = 0x52535446
PAGE = 4096
MAP_FIXED_NOREPLACE = 0x100000


def main() -> int:
    sock_path, addr, npages = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3])
    lazy = [tuple(int(x, 0) for x in r.split(":")) for r in sys.argv[4].split(",")]
    print(json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    got = libc.mmap(addr, npages * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if got != addr:
        print(json.dumps({"error": f"mmap at {addr:#x} gave {got}"}), flush=True)
        return 1
    uffd = Userfaultfd.create()
    offered, _ = kernel_features()
    want = abi.UFFD_FEATURE_EVENT_FORK | abi.UFFD_FEATURE_EVENT_REMAP | abi.UFFD_FEATURE_EVENT_REMOVE
    uffd.api((want | abi.UFFD_FEATURE_EVENT_UNMAP) & offered)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(struct.pack("=i", os.getpid()))
    socket.send_fds(s, [b"\0"], [uffd.fileno()])
    uffd.register(addr, npages * PAGE)
    uffd.close()
    s.sendall(struct.pack("=I", RSTF))
    s.close()

    def right(a: int) -> bool:
        data = ctypes.string_at(a, PAGE)
        inside = any(lo <= a < hi for lo, hi in lazy)
        return data == (page_bytes(a) if inside else bytes(PAGE))

    first = lazy[0][0]
    bad = [] if right(first) else [hex(first)]
    print(json.dumps({"first": True}), flush=True)
    sys.stdin.readline()
    bad += [hex(addr + i * PAGE) for i in range(npages) if addr + i * PAGE != first and not right(addr + i * PAGE)]
    print(json.dumps({"ok": not bad, "bad_pages": bad[:10], "checked": npages}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
