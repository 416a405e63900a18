"""A restore target whose registered range is split into VMAs after the handoff.

``mprotect`` of part of a range splits its VMA without any userfaultfd
event, so the daemon's idea of the layout (one mapping) no longer matches
the kernel's, and a UFFDIO_COPY reaching across the new boundary fails
ENOENT for the whole call. The target makes that split, then reads pages on
both sides of every boundary and checks every byte. Prints one JSON line;
exit 0 when all is right, 3 on wrong bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import sys

from lazypaged.client import map_anonymous, restore
from lazypaged.handoff_protocol import SessionOptions
from lazypaged.uffd import abi

PAGE = mmap.PAGESIZE
EVENTS = (
    abi.UFFD_FEATURE_EVENT_FORK
    | abi.UFFD_FEATURE_EVENT_REMAP
    | abi.UFFD_FEATURE_EVENT_REMOVE
    | abi.UFFD_FEATURE_EVENT_UNMAP
)
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def check(mem: mmap.mmap, expected: bytes) -> int:
    """Index of the first wrong page, or -1; reads every page in order."""
    for p in range(len(expected) // PAGE):
        if mem[p * PAGE : (p + 1) * PAGE] != expected[p * PAGE : (p + 1) * PAGE]:
            return p
    return -1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--pages", type=int, required=True)
    ap.add_argument("--protect", required=True, help="LO:HI, pages made read-only after the handoff")
    ap.add_argument("--no-events", action="store_true", help="negotiate no layout events")
    ap.add_argument("--fill", action="store_true", help="let the fill install the pages, then check them")
    args = ap.parse_args()
    size = args.pages * PAGE
    lo, hi = (int(x) for x in args.protect.split(":"))
    with open(args.image, "rb") as f:
        expected = f.read(size)
    mem, addr = map_anonymous(size)
    h = restore(
        args.socket,
        [(addr, size, args.name, 0)],
        features=0 if args.no_events else EVENTS,
        options=SessionOptions(fill=args.fill),
    )
    if libc.mprotect(addr + lo * PAGE, (hi - lo) * PAGE, mmap.PROT_READ) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    print(json.dumps({"protected": [lo, hi]}), flush=True)
    if args.fill:
        done = h.wait(timeout=60)  # the fill's copies meet the boundaries
        bad = check(mem, expected)
    else:
        # Page 0 first: its fault-around run reaches across the boundary at lo.
        bad = check(mem, expected)
        done = h.wait(timeout=60)
    print(json.dumps({"ok": bad < 0, "first_bad_page": bad, "faults": done.faults}), flush=True)
    return 0 if bad < 0 else 3


if __name__ == "__main__":
    sys.exit(main())
