"""A lean restore target for load tests: its only big allocation is the restored memory.

Hands ``--size`` bytes over as snapshot ``--name``, touches them from
``--threads`` threads in random orders, waits for the completion message,
then compares every byte with ``--image`` slice by slice through a shared
read-only mapping (no copy of the image per target). Each touch is timed
(log2 µs buckets), so the latency a fault costs the target is reported
whatever the source (the daemon's own figure stops at dispatch for remote
sources). Prints one JSON line;
exits 0 if every byte matched, 3 otherwise, 2 if the handoff failed.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import threading
import time

from lazypaged.client import HandoffError, map_anonymous, restore
from lazypaged.handoff_protocol import RangeSpec, SessionOptions

PAGE = os.sysconf("SC_PAGE_SIZE")
SLICE = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    size = args.size
    mem, addr = map_anonymous(size)
    t0 = time.monotonic()
    try:
        h = restore(args.socket, [RangeSpec(addr, size, args.name, 0)], options=SessionOptions(working_set=False))
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)

    # Every touch timed as the target sees it (a fault's whole wait, network
    # included), in log2 µs buckets: bucket b counts touches of < 2**b µs.
    hists = [[0] * 32 for _ in range(args.threads)]

    def toucher(k: int) -> None:
        order = list(range(k, size // PAGE, args.threads))
        random.Random(args.seed * 100 + k).shuffle(order)
        hist, clock = hists[k], time.perf_counter_ns
        for p in order:
            t = clock()
            _ = mem[p * PAGE + k]
            hist[min(((clock() - t) // 1000).bit_length(), 31)] += 1

    ts = [threading.Thread(target=toucher, args=(k,)) for k in range(args.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    touched = time.monotonic() - t0
    done = h.wait(timeout=900)
    completed = time.monotonic() - t0
    wrong = 0
    with open(args.image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as img:
        for off in range(0, size, SLICE):
            if mem[off : off + SLICE] != img[off : off + SLICE]:
                wrong += sum(1 for p in range(off, off + SLICE, PAGE) if mem[p : p + PAGE] != img[p : p + PAGE])
    hist = [sum(h[b] for h in hists) for b in range(32)]
    print(json.dumps({"ok": wrong == 0, "wrong_pages": wrong, "touch_s": round(touched, 3),
                      "complete_s": round(completed, 3), "faults": done.faults,
                      "touch_p99_us": _quantile(hist, 0.99), "touch_p999_us": _quantile(hist, 0.999),
                      "touch_max_us": _quantile(hist, 1.0), "touches_over_1ms": sum(hist[11:])}), flush=True)
    return 0 if wrong == 0 else 3


def _quantile(hist: list[int], q: float) -> int:
    """Upper bound (µs) of the bucket holding the q-quantile."""
    want, seen = q * sum(hist), 0
    for b, n in enumerate(hist):
        seen += n
        if n and seen >= want:
            return 1 << b
    return 0


if __name__ == "__main__":
    sys.exit(main())
