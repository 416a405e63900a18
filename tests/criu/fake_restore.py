"""A stand-in for ``criu restore --lazy-pages``, for tests without CRIU.

It maps memory at the address the synthetic images name, creates a uffd,
sends its task record (its own pid as the image pid) and the end marker on
lazy-pages.socket, registers the memory, closes its own uffd copy (as CRIU
does) and then reads every page, reporting pages that differ from what the
images say (the address pattern in lazy ranges, zeros elsewhere).

    fake_restore.py SOCKET ADDR NPAGES MODE [LAZY]   (MODE: normal | slow | badpid | twofds)

``slow`` reads one page every 5 ms; LAZY is ``start:end,...`` of the lazy ranges.

It prints ``{"pid": N}`` and waits for a line on stdin before connecting.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import struct
import sys
import time

from lazypaged.uffd import Userfaultfd, abi, kernel_features
from tests.criu.synth import page_bytes

RSTF = 0x52535446
PAGE = 4096
MAP_FIXED_NOREPLACE = 0x100000


def main() -> int:
    sock_path, addr, npages, mode = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]), sys.argv[4]
    lazy = [tuple(int(x, 0) for x in r.split(":")) for r in sys.argv[5].split(",")] if len(sys.argv) > 5 else []
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
    want |= abi.UFFD_FEATURE_EVENT_UNMAP
    uffd.api(want & offered)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    pid = 0 if mode == "badpid" else os.getpid()
    s.sendall(struct.pack("=i", pid))
    fds = [uffd.fileno(), uffd.fileno()] if mode == "twofds" else [uffd.fileno()]
    socket.send_fds(s, [b"\0"], fds)
    uffd.register(addr, npages * PAGE)
    uffd.close()
    try:
        s.sendall(struct.pack("=I", RSTF))
    except OSError as e:
        print(json.dumps({"send_failed": str(e)}), flush=True)
        return 3
    s.close()
    print(json.dumps({"ready": True}), flush=True)
    if mode not in ("normal", "slow"):
        return 0
    bad = []
    for i in range(npages):
        a = addr + i * PAGE
        data = ctypes.string_at(a, PAGE)
        if mode == "slow":
            time.sleep(0.005)
        inside = any(lo <= a < hi for lo, hi in lazy)
        if data != (page_bytes(a) if inside else bytes(PAGE)):
            bad.append(hex(a))
    print(json.dumps({"ok": not bad, "bad_pages": bad[:10], "checked": npages}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
