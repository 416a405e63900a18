"""A Firecracker-style client for refusal tests: registers guest memory with
its own uffd, sends one handshake (good or malformed) with the uffd
attached, then stays alive until a line arrives on stdin.

``--drop`` closes its own uffd copy after sending (the daemon then holds the
only one). ``--touch`` reads the first page after the stdin line and reports
whether it matches the memory file. Prints ``{"sent": true, ...}`` after the
handshake and a result line at the end. ctypes and fcntl only, as a VMM would.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import socket
import struct
import sys

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
O_CLOEXEC, O_NONBLOCK, UFFD_USER_MODE_ONLY = 0o2000000, 0o4000, 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--mem-file", required=True)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--malformed", action="store_true", help="send a handshake that is not valid JSON")
    ap.add_argument("--drop", action="store_true", help="close our uffd copy after sending it")
    ap.add_argument("--touch", action="store_true", help="after the stdin line, read the first page")
    args = ap.parse_args()
    base = libc.mmap(None, args.size, 3, 0x22, -1, 0)
    flags = O_CLOEXEC | O_NONBLOCK | (UFFD_USER_MODE_ONLY if os.geteuid() != 0 else 0)
    uffd = libc.syscall(323, flags)
    if uffd < 0 or base in (None, ctypes.c_void_p(-1).value):
        print(json.dumps({"ok": False, "error": f"setup failed: errno {ctypes.get_errno()}"}), flush=True)
        return 1
    fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("<QQQ", 0xAA, 0, 0)), True)
    fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", base, args.size, 1, 0)), True)
    regions = [{"base_host_virt_addr": base, "size": args.size, "offset": 0, "page_size": PAGE}]
    body = json.dumps(regions).encode()
    if args.malformed:  # cut short: refused only at our end of stream, so after any --drop
        body = body[: len(body) // 2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(args.socket)
        s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", uffd))])
        if args.drop:
            os.close(uffd)
        # Said before the end of stream: a refusal may kill us right after it.
        print(json.dumps({"sent": True, "pid": os.getpid()}), flush=True)
        s.shutdown(socket.SHUT_WR)
    except OSError as e:
        print(json.dumps({"sent": False, "error": str(e)}), flush=True)
        return 2
    sys.stdin.readline()
    if args.touch:
        with open(args.mem_file, "rb") as f:
            want = f.read(PAGE)
        got = ctypes.string_at(base, PAGE)
        print(json.dumps({"ok": got == want, "zeros": got == bytes(PAGE)}), flush=True)
        return 0 if got == want else 3
    print(json.dumps({"ok": True}), flush=True)
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
