"""A restore target that changes its address space mid-restore.

It negotiates the fork/remap/remove/unmap events, hands a range to the
daemon, touches part of it, then forks, moves, drops or unmaps memory and
checks every byte it can still see: image bytes where nothing happened,
zeros where it dropped pages. Exit 0 when all is right, 3 on wrong bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys

from lazypaged.client import restore
from lazypaged.handoff_protocol import SessionOptions
from lazypaged.uffd import abi

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MREMAP_MAYMOVE, MREMAP_FIXED, MADV_DONTNEED = 1, 2, 4
EVENTS = (
    abi.UFFD_FEATURE_EVENT_FORK
    | abi.UFFD_FEATURE_EVENT_REMAP
    | abi.UFFD_FEATURE_EVENT_REMOVE
    | abi.UFFD_FEATURE_EVENT_UNMAP
)


def anon(length: int, prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> int:
    addr = libc.mmap(None, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return int(addr)


def view(addr: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def check(addr: int, expected: bytes, zero_pages: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """Index of the first wrong page, or -1. Reads (touches) every page."""
    mem = view(addr, len(expected))
    for p in range(len(expected) // PAGE):
        got = bytes(mem[p * PAGE : (p + 1) * PAGE])
        want = bytes(PAGE) if p in zero_pages else expected[p * PAGE : (p + 1) * PAGE]
        if got != want:
            return p
    return -1


def touch(addr: int, pages: range) -> None:
    mem = view(addr, (pages.stop) * PAGE)
    for p in pages:
        _ = mem[p * PAGE]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--mode", required=True, choices=["fork", "forkchain", "mremap", "dontneed", "munmap"])
    ap.add_argument("--no-fill", action="store_true", help="faults only: most pages still missing at the change")
    args = ap.parse_args()
    size, npages = args.size, args.size // PAGE
    with open(args.image, "rb") as f:
        expected = f.read(size)
    addr = anon(size)
    opts = SessionOptions(fill=False) if args.no_fill else None
    h = restore(args.socket, [(addr, size, args.name, 0)], features=EVENTS, options=opts)
    touch(addr, range(0, npages // 4))  # part of it restored before the change
    result: dict[str, object] = {"mode": args.mode}
    bad = -1
    if args.mode in ("fork", "forkchain"):
        depth = 3 if args.mode == "forkchain" else 1
        bad = fork_and_check(addr, expected, depth)
    elif args.mode == "mremap":
        dest = anon(size, 0)  # PROT_NONE  # reserve a different address
        new = libc.mremap(addr, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, dest)
        if new in (None, ctypes.c_void_p(-1).value) or new != dest:
            raise OSError(ctypes.get_errno(), "mremap")
        result["moved"] = hex(new)
        bad = check(int(new), expected)
    elif args.mode == "dontneed":
        lo, hi = npages // 8, npages // 2  # installed and not yet installed pages
        if libc.madvise(addr + lo * PAGE, (hi - lo) * PAGE, MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise")
        bad = check(addr, expected, set(range(lo, hi)))
    elif args.mode == "munmap":
        lo, hi = npages // 2, 3 * npages // 4
        if libc.munmap(addr + lo * PAGE, (hi - lo) * PAGE) != 0:
            raise OSError(ctypes.get_errno(), "munmap")
        bad = max(check(addr, expected[: lo * PAGE]), -1)
        if bad < 0:
            tail = check(addr + hi * PAGE, expected[hi * PAGE :])
            bad = tail + hi if tail >= 0 else -1
    done = h.wait(timeout=60)
    result.update(ok=bad < 0, first_bad_page=bad, faults=done.faults)
    print(json.dumps(result), flush=True)
    return 0 if bad < 0 else 3


def fork_and_check(addr: int, expected: bytes, depth: int) -> int:
    """Fork ``depth`` generations; every process checks all bytes."""
    pid = os.fork()
    if pid == 0:
        code = 0
        if depth > 1:
            code = 0 if fork_and_check(addr, expected, depth - 1) < 0 else 3
        if code == 0 and check(addr, expected) >= 0:
            code = 3
        os._exit(code)
    mine = check(addr, expected)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return max(mine, 0) if mine >= 0 else 10**9  # the child saw wrong bytes
    return mine


if __name__ == "__main__":
    sys.exit(main())
