"""A restore target that reads its memory only through the kernel, so that
poisoned pages (failure policy ``sigbus``) can be counted instead of ending it.

Each page is copied by ``pwrite(2)`` from the restored memory into a memfd:
a missing page blocks in the kernel until the daemon installs it, like a
user touch; a poisoned one makes the copy fail with EFAULT where a user
touch would raise SIGBUS. Every page that was copied is compared with
``--image``. Then the completion message is awaited.

Prints ``{"accepted", "pid"}``, then one result line: wrong pages, poisoned
pages (as [first page, count] runs), the completion. Exits 0 if no page was
wrong (poisoned pages are not wrong: they never held bytes), 3 otherwise,
2 if the handoff failed.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import random
import sys
import time

from lazypaged.client import HandoffError, map_anonymous, restore
from lazypaged.handoff_protocol import RangeSpec, SessionOptions

PAGE = os.sysconf("SC_PAGE_SIZE")


def runs(pages: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--order", choices=["seq", "random"], default="seq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", choices=["wait", "sigbus", "kill"], help="per-restore failure_policy")
    ap.add_argument("--timeout", type=float, default=120.0, help="for the completion message")
    args = ap.parse_args()
    size = args.size
    mem, addr = map_anonymous(size)
    opts = SessionOptions(working_set=False, failure_policy=args.policy)
    try:
        h = restore(args.socket, [RangeSpec(addr, size, args.name, 0)], options=opts)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)

    order = list(range(size // PAGE))
    if args.order == "random":
        random.Random(args.seed).shuffle(order)
    view = memoryview(mem)
    scratch = os.memfd_create("lazypaged-check")
    os.ftruncate(scratch, PAGE)
    wrong: list[int] = []
    poisoned: list[int] = []
    t0 = time.monotonic()
    with open(args.image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as img:
        for p in order:
            off = p * PAGE
            try:
                n = os.pwrite(scratch, view[off : off + PAGE], 0)
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                poisoned.append(p)
                continue
            if n != PAGE or os.pread(scratch, PAGE, 0) != img[off : off + PAGE]:
                wrong.append(p)
    # Every page read (and checked): how long the target itself took.
    print(json.dumps({"read_s": round(time.monotonic() - t0, 3)}), flush=True)
    done = h.wait(timeout=args.timeout)
    print(json.dumps({"ok": not wrong, "wrong_pages": len(wrong), "first_wrong": wrong[:8],
                      "poisoned_pages": len(poisoned), "poisoned": runs(poisoned),
                      "complete": {"pages": done.pages, "faults": done.faults}}), flush=True)
    return 0 if not wrong else 3


if __name__ == "__main__":
    sys.exit(main())
