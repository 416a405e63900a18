"""A Firecracker-style target that keeps its uffd and cannot re-hand it.

Maps guest memory, registers it with its own uffd, sends the JSON handshake
with the uffd attached (as Firecracker does), keeps the uffd, then touches
every page at a steady pace in a random order and checks every byte against
the memory file. Prints ``{"sent": true}`` after the handshake and a result
line at the end; exits 0 if every byte matched, 3 otherwise.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import random
import socket
import struct
import sys
import time

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
O_CLOEXEC, O_NONBLOCK = 0o2000000, 0o4000


def main() -> int:
    sock_path, mem_file, size, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    base = libc.mmap(None, size, 3, 0x22, -1, 0)
    uffd = libc.syscall(323, O_CLOEXEC | O_NONBLOCK)
    if uffd < 0 or base in (None, ctypes.c_void_p(-1).value):
        print(json.dumps({"ok": False, "error": "setup failed"}), flush=True)
        return 1
    fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("<QQQ", 0xAA, 0, 0)), True)
    fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", base, size, 1, 0)), True)
    regions = [{"base_host_virt_addr": base, "size": size, "offset": 0, "page_size": PAGE, "page_size_kib": 4}]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendmsg([json.dumps(regions).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", uffd))])
    print(json.dumps({"sent": True, "uffd": uffd}), flush=True)
    order = list(range(size // PAGE))
    random.Random(3).shuffle(order)
    pause = seconds / max(1, len(order) // 32)
    for n, p in enumerate(order):
        ctypes.c_char.from_address(base + p * PAGE + 9).value  # noqa: B018 (the touch is the point)
        if n % 32 == 31:
            time.sleep(pause)
    with open(mem_file, "rb") as f:
        want = f.read(size)
    got = ctypes.string_at(base, size)
    wrong = sum(1 for i in range(0, size, PAGE) if got[i : i + PAGE] != want[i : i + PAGE])
    print(json.dumps({"ok": wrong == 0, "wrong_pages": wrong}), flush=True)
    return 0 if wrong == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
