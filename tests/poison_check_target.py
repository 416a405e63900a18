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
    ap.add_argument("--order", choices=["seq", "random", "bad-last"], default="seq",
                    help="bad-last: in order, but the --skip pages read last instead of never")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", choices=["wait", "sigbus", "kill"], help="per-restore failure_policy")
    ap.add_argument("--timeout", type=float, default=120.0, help="for the completion message")
    ap.add_argument("--no-fill", action="store_true", help="option fill: false (only faults install pages)")
    ap.add_argument("--no-fault-around", action="store_true")
    ap.add_argument("--skip", default="", help="FIRST:COUNT: pages not read (e.g. ones known to be lost)")
    ap.add_argument("--go", action="store_true", help="read a line from stdin before the first page")
    ap.add_argument("--mark", type=int, default=-1, help='print {"mark": N} once N pages were read')
    args = ap.parse_args()
    size = args.size
    mem, addr = map_anonymous(size)
    opts = SessionOptions(working_set=False, failure_policy=args.policy, fill=False if args.no_fill else None,
                          fault_around=False if args.no_fault_around else None)
    try:
        h = restore(args.socket, [RangeSpec(addr, size, args.name, 0)], options=opts)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)
    if args.go:
        sys.stdin.readline()

    order = list(range(size // PAGE))
    if args.skip:
        first, count = (int(x) for x in args.skip.split(":"))
        order = [p for p in order if not first <= p < first + count]
        if args.order == "bad-last":
            order += range(first, first + count)
    if args.order == "random":
        random.Random(args.seed).shuffle(order)
    view = memoryview(mem)
    scratch = os.memfd_create("lazypaged-check")
    os.ftruncate(scratch, PAGE)
    wrong: list[int] = []
    poisoned: list[int] = []
    t0 = time.monotonic()
    with open(args.image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as img:
        for n_read, p in enumerate(order):
            if n_read == args.mark:
                print(json.dumps({"mark": n_read}), flush=True)
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
    complete: dict[str, object] | None = None
    complete_error = ""
    try:
        done = h.wait(timeout=args.timeout)
        complete = {"pages": done.pages, "faults": done.faults}
    except (HandoffError, TimeoutError) as e:  # reported: the test decides
        complete_error = f"{type(e).__name__}: {e}"
    print(json.dumps({"ok": not wrong, "wrong_pages": len(wrong), "first_wrong": wrong[:8],
                      "poisoned_pages": len(poisoned), "poisoned": runs(poisoned),
                      "complete": complete, "complete_error": complete_error}), flush=True)
    return 0 if not wrong else 3


if __name__ == "__main__":
    sys.exit(main())
