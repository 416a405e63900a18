"""A restore target for the operations tests: touches a known set of pages,
checks their bytes, reports, then holds its memory until stdin closes.

Each fault installs exactly one page (no fault-around, no fill), so what
the daemon reports can be compared with what this process did. Lines on
stdout, one JSON object each: ``{"accepted": ID, "pid": PID}`` after the
handoff, then ``{"touched": N, "ok": BOOL}`` once the pages are in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lazypaged.client import map_anonymous, restore
from lazypaged.handoff_protocol import SessionOptions

PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--pages", type=int, required=True, help="touch this many pages, every --stride-th")
    ap.add_argument("--stride", type=int, default=3)
    ap.add_argument("--fill", action="store_true", help="let the daemon fill the rest, and wait for it")
    args = ap.parse_args()

    mem, addr = map_anonymous(args.size)
    opts = SessionOptions(fill=args.fill, fault_around=False)
    h = restore(args.socket, [(addr, args.size, args.name, 0)], options=opts)
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)
    ok = True
    with open(args.image, "rb") as f:
        for k in range(args.pages):
            off = k * args.stride * PAGE
            f.seek(off)
            ok &= mem[off : off + PAGE] == f.read(PAGE)
    print(json.dumps({"touched": args.pages, "ok": ok}), flush=True)
    if args.fill:
        done = h.wait(timeout=60)
        print(json.dumps({"complete": done.pages}), flush=True)
    sys.stdin.read()  # hold the memory (and the session) until told
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
