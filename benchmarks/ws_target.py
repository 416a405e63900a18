"""The restored program of the working-set benchmarks (one restore per run).

Maps anonymous memory, hands it to lazypaged with ``restore()``, then runs a
workload shaped like a function invocation (``c/touch.c``:
``bench_touch_compute``): a fixed tenth of the pages, in scattered clusters,
in a fixed order, with a little arithmetic between touches. Prints one JSON
line: ``done_ns`` (``restore()`` returned → last touch done), ``handoff_ns``
and the number of touches. Then compares a sample of the touched pages with
the image (exit status 3 on a mismatch) and exits, which ends the session.

The page order (``workload_pages``) is shared with ``workingset.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE = os.sysconf("SC_PAGE_SIZE")
#: Pages per cluster: one 64 KiB object (a heap arena, a run of code pages).
CLUSTER_PAGES = 16
#: Fraction of the image's pages the workload touches.
FRACTION = 0.10
CHECK_PAGES = 256


def workload_pages(npages: int, seed: int = 11) -> list[int]:
    """The pages the workload touches, in touch order (the same every time).

    ``npages * FRACTION`` pages in clusters of ``CLUSTER_PAGES`` consecutive
    pages, each starting at a random page (not aligned to anything: objects
    do not line up with the daemon's 64 KiB granule), no two adjacent; the
    clusters are visited in a random order, each one's pages in ascending
    order.
    """
    rng = random.Random(seed)
    want = max(1, int(npages * FRACTION) // CLUSTER_PAGES)
    used = bytearray(npages + 1)
    starts: list[int] = []
    tries = 0
    while len(starts) < want and tries < want * 100:
        tries += 1
        s = rng.randrange(0, npages - CLUSTER_PAGES)
        lo, hi = max(0, s - 1), s + CLUSTER_PAGES + 1
        if any(used[lo:hi]):
            continue
        used[s : s + CLUSTER_PAGES] = b"\x01" * CLUSTER_PAGES
        starts.append(s)
    rng.shuffle(starts)
    return [s + k for s in starts for k in range(CLUSTER_PAGES)]


def main() -> int:
    from lazypaged.client import map_anonymous, restore
    from lazypaged.handoff_protocol import SessionOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--image", required=True, help="the image, to check touched pages against")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--no-working-set", action="store_true")
    ap.add_argument("--spin", type=int, default=200, help="arithmetic rounds between touches (~0.8 µs)")
    args = ap.parse_args()

    lib = ctypes.CDLL(args.lib, use_errno=True)
    fn = lib.bench_touch_compute
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint,
                   ctypes.POINTER(ctypes.c_uint64)]  # fmt: skip
    fn.restype = ctypes.c_int64

    npages = args.size // PAGE
    pages = workload_pages(npages)
    idx = array("I", pages)
    idx_addr, _ = idx.buffer_info()
    mem, addr = map_anonymous(args.size)
    opts = SessionOptions(working_set=False if args.no_working_set else None)
    sink = ctypes.c_uint64()
    t0 = time.perf_counter_ns()
    h = restore(args.socket, [(addr, args.size, args.name, 0)], options=opts)
    t1 = time.perf_counter_ns()
    touch_ns = fn(addr, idx_addr, len(pages), PAGE, args.spin, ctypes.byref(sink))
    t2 = time.perf_counter_ns()
    if touch_ns < 0:
        print(json.dumps({"ok": False, "error": os.strerror(-touch_ns)}), flush=True)
        return 1
    res = {"ok": True, "done_ns": t2 - t1, "handoff_ns": t1 - t0, "touches": len(pages), "session": h.session}
    fd = os.open(args.image, os.O_RDONLY)
    try:
        rng = random.Random(5)
        for p in [pages[0], pages[-1], *rng.sample(pages, min(CHECK_PAGES, len(pages)))]:
            if ctypes.string_at(addr + p * PAGE, PAGE) != os.pread(fd, PAGE, p * PAGE):
                print(json.dumps({"ok": False, "error": f"page {p} differs from the image"}), flush=True)
                return 3
    finally:
        os.close(fd)
    print(json.dumps(res), flush=True)
    h.close()
    del mem  # exiting ends the session
    return 0


if __name__ == "__main__":
    sys.exit(main())
