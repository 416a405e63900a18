"""A lean restore target for load tests: its only big allocation is the restored memory.

Hands ``--size`` bytes over as snapshot ``--name``, touches them from
``--threads`` threads in random orders, waits for the completion message,
then compares every byte with ``--image`` slice by slice through a shared
read-only mapping (no copy of the image per target). Prints one JSON line;
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

    def toucher(k: int) -> None:
        order = list(range(k, size // PAGE, args.threads))
        random.Random(args.seed * 100 + k).shuffle(order)
        for p in order:
            _ = mem[p * PAGE + k]

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
    print(json.dumps({"ok": wrong == 0, "wrong_pages": wrong, "touch_s": round(touched, 3),
                      "complete_s": round(completed, 3), "faults": done.faults}), flush=True)
    return 0 if wrong == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
