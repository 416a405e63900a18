"""A target that forks mid-restore, for the child session's pid.

Negotiates UFFD_FEATURE_EVENT_FORK, hands its memory over with fill off,
touches the first eighth of its pages and forks. The child prints
``{"child": PID}`` and waits for SIGUSR1 (or to be killed), then reads every
page and checks it. The parent waits for the child and checks too, or with
``--parent-exits`` exits as soon as a line arrives on stdin, leaving the
child to be reparented.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from lazypaged.client import map_anonymous, restore
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
    ap.add_argument("--parent-exits", action="store_true")
    args = ap.parse_args()
    mem, addr = map_anonymous(args.size)
    h = restore(
        args.socket,
        [RangeSpec(addr, args.size, args.name, 0)],
        features=abi.UFFD_FEATURE_EVENT_FORK,
        options=SessionOptions(fill=False, working_set=False),
    )
    print(json.dumps({"accepted": h.session}), flush=True)
    for p in range(0, args.size // PAGE // 8):
        _ = mem[p * PAGE]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    pid = os.fork()
    if pid == 0:
        print(json.dumps({"child": os.getpid()}), flush=True)
        signal.sigwait({signal.SIGUSR1})
        os._exit(0 if check(mem[:], args.image, "child_done") else 3)
    if args.parent_exits:
        sys.stdin.readline()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    ok = check(mem[:], args.image, "parent_done")
    return 0 if ok and os.waitstatus_to_exitcode(status) == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
