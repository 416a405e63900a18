"""A target that forks before touching its memory, to see which options the
child's session runs under.

Hands its memory over with ``--policy`` (fill and fault-around off, fork
events on), prints ``{"accepted"}``, waits for a line on stdin, forks. The
child reads every page through the kernel (``pwrite`` into a memfd, so a
poisoned page fails with EFAULT instead of raising SIGBUS), compares what it
read with ``--image`` and prints one result line; the parent waits for it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from lazypaged.client import HandoffError, map_anonymous, restore
from lazypaged.handoff_protocol import RangeSpec, SessionOptions
from lazypaged.uffd import abi

PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True, help="bytes to check against")
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--policy", choices=["wait", "sigbus", "kill"], required=True)
    args = ap.parse_args()
    mem, addr = map_anonymous(args.size)
    opts = SessionOptions(fill=False, fault_around=False, working_set=False, failure_policy=args.policy)
    try:
        h = restore(args.socket, [RangeSpec(addr, args.size, args.name, 0)], features=abi.UFFD_FEATURE_EVENT_FORK,
                    options=opts)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session}), flush=True)
    sys.stdin.readline()
    pid = os.fork()
    if pid == 0:
        view = memoryview(mem)
        scratch = os.memfd_create("lazypaged-check")
        with open(args.image, "rb") as f:
            want = f.read(args.size)
        wrong, poisoned = 0, 0
        for off in range(0, args.size, PAGE):
            try:
                os.pwrite(scratch, view[off : off + PAGE], 0)
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                poisoned += 1
                continue
            wrong += os.pread(scratch, PAGE, 0) != want[off : off + PAGE]
        print(json.dumps({"child": os.getpid(), "wrong_pages": wrong, "poisoned_pages": poisoned}), flush=True)
        os._exit(0 if wrong == 0 else 3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
