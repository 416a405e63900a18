"""A restore target that survives its daemon: touches pages at a steady pace
from several threads, re-hands its uffd to a restarted daemon, checks every byte.

Run as a separate process by tests/test_reliability_restart.py. Prints JSON
lines: ``{"accepted": ...}`` once handed over, then the result; exits 0 if
every byte matched the image, 3 on wrong bytes, 2 if the handoff failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

from lazypaged.client import HandoffError, map_anonymous, restore
from lazypaged.handoff_protocol import RangeSpec, SessionOptions

PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=1.0, help="spread the touches over about this long")
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--fill", action="store_true", help="let the first daemon fill too")
    ap.add_argument("--reconnect", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-keep", action="store_true", help="hand the uffd over and close our copy")
    args = ap.parse_args()

    size, npages = args.size, args.size // PAGE
    mem, addr = map_anonymous(size)
    opts = SessionOptions(fill=None if args.fill else False, working_set=False)
    try:
        h = restore(args.socket, [RangeSpec(addr, size, args.name, 0)], options=opts,
                    keep_uffd=not args.no_keep, reconnect=0 if args.no_keep else args.reconnect)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)

    # Each thread touches its share of the pages in a random order, pausing
    # between small batches so the restore lasts about --seconds.
    order = list(range(npages))
    random.Random(args.seed).shuffle(order)
    shares = [order[k :: args.threads] for k in range(args.threads)]
    batch = 16
    pause = args.seconds / max(1, len(shares[0]) // batch)

    def toucher(pages: list[int]) -> None:
        for n, p in enumerate(pages):
            _ = mem[p * PAGE + 5]
            if n % batch == batch - 1:
                time.sleep(pause)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=toucher, args=(s,)) for s in shares]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    touched = time.perf_counter() - t0
    complete: object = None
    if not args.no_keep:  # without a kept uffd the daemon that finishes is not the one we talked to
        try:
            done = h.wait(timeout=120)
            complete = {"pages": done.pages}
        except (HandoffError, TimeoutError) as e:
            complete = {"error": str(e)}
    with open(args.image, "rb") as f:
        expected = f.read(size)
    got = mem[:]
    wrong = sum(1 for i in range(0, size, PAGE) if got[i : i + PAGE] != expected[i : i + PAGE])
    ok = wrong == 0
    result = {
        "ok": ok,
        "wrong_pages": wrong,
        "touch_s": round(touched, 3),
        "rehandoffs": h.rehandoffs,
        "complete": complete,
    }
    print(json.dumps(result), flush=True)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
