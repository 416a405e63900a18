"""A target that forks mid-restore, for the fd-store test of forked children.

Negotiates UFFD_FEATURE_EVENT_FORK, hands its memory over (keeping its uffd
and re-handing it if the daemon goes away), touches the first eighth of the
pages, forks. The child prints ``{"child": PID}``, sleeps ``--pause`` seconds
(the test kills and restarts the daemon then), reads every page and checks
it; the parent does the same after the child is done. Each prints a result
line; the exit code is 0 when both saw the right bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lazypaged.client import HandoffError, map_anonymous, restore
from lazypaged.handoff_protocol import RangeSpec, SessionOptions
from lazypaged.uffd import abi

PAGE = os.sysconf("SC_PAGE_SIZE")


def check(mem: bytes, image: str, who: str) -> bool:
    with open(image, "rb") as f:
        want = f.read(len(mem))
    wrong = sum(1 for i in range(0, len(mem), PAGE) if mem[i : i + PAGE] != want[i : i + PAGE])
    print(json.dumps({who: os.getpid(), "ok": wrong == 0, "wrong_pages": wrong}), flush=True)
    return wrong == 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--pause", type=float, default=2.0)
    args = ap.parse_args()
    mem, addr = map_anonymous(args.size)
    try:
        h = restore(args.socket, [RangeSpec(addr, args.size, args.name, 0)], features=abi.UFFD_FEATURE_EVENT_FORK,
                    options=SessionOptions(fill=False, working_set=False), reconnect=30)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session}), flush=True)
    for p in range(0, args.size // PAGE // 8):
        _ = mem[p * PAGE]
    pid = os.fork()
    if pid == 0:
        print(json.dumps({"child": os.getpid()}), flush=True)
        time.sleep(args.pause)
        os._exit(0 if check(mem[:], args.image, "child_done") else 3)
    _, status = os.waitpid(pid, 0)
    ok = check(mem[:], args.image, "parent_done")
    return 0 if ok and os.waitstatus_to_exitcode(status) == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
