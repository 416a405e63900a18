"""A restore target for an exporter that is lost for good (failure policy ``sigbus``).

It hands its memory over, reads the first ``--first`` bytes (so some pages
are surely installed before the loss) and prints ``{"ready": true}``. Then
it waits for a line on stdin holding the ``time.monotonic()`` at which the
test killed the exporter (the clock is system-wide, so it compares with
ours), and reads every page through the kernel: ``pwrite(2)`` from the
restored memory into a memfd blocks on a missing page like a user touch
and fails with EFAULT on a poisoned page where a user touch would raise
SIGBUS. Each poisoned touch is timed against ``kill + --deadline``: a touch
that began before the deadline should end soon after it, a touch that began
later should end soon after it began.

Prints one result line (wrong pages, poisoned pages, the worst lateness),
then waits for the session's final frame and prints it, and last touches a
poisoned page directly: the process should then die of a real SIGBUS.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import signal
import sys
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
    ap.add_argument("--first", type=int, default=1 << 20, help="bytes read before reporting ready")
    ap.add_argument("--deadline", type=float, required=True, help="[remote] reconnect_deadline of the daemon")
    ap.add_argument("--timeout", type=float, default=120.0, help="for the final frame")
    args = ap.parse_args()
    size = args.size
    mem, addr = map_anonymous(size)
    opts = SessionOptions(working_set=False, failure_policy="sigbus")
    try:
        h = restore(args.socket, [RangeSpec(addr, size, args.name, 0)], options=opts)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)

    view = memoryview(mem)
    scratch = os.memfd_create("lazypaged-loss")
    os.ftruncate(scratch, PAGE)
    wrong: list[int] = []
    poisoned: list[int] = []
    installed = 0
    worst = (0.0, -1)  # (seconds late, page)
    first_sigbus = -1.0
    with open(args.image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as img:

        def touch(p: int) -> bool:
            """True if the page held the image's bytes (or was wrong: counted), False if poisoned."""
            nonlocal installed
            off = p * PAGE
            try:
                n = os.pwrite(scratch, view[off : off + PAGE], 0)
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                return False
            installed += 1
            if n != PAGE or os.pread(scratch, PAGE, 0) != img[off : off + PAGE]:
                wrong.append(p)
            return True

        first = args.first // PAGE
        early_poisoned = [p for p in range(first) if not touch(p)]
        print(json.dumps({"ready": True, "early_poisoned": len(early_poisoned)}), flush=True)
        killed_at = float(sys.stdin.readline())
        due = killed_at + args.deadline
        for p in range(first, size // PAGE):
            start = time.monotonic()
            if touch(p):
                continue
            end = time.monotonic()
            poisoned.append(p)
            if first_sigbus < 0:
                first_sigbus = end - killed_at
            late = end - max(start, due)
            if late > worst[0]:
                worst = (late, p)
    print(json.dumps({"wrong_pages": len(wrong), "first_wrong": wrong[:8], "installed_pages": installed,
                      "poisoned_pages": len(poisoned) + len(early_poisoned),
                      "first_sigbus_after_kill_s": round(first_sigbus, 3),
                      "worst_late_s": round(worst[0], 3), "worst_late_page": worst[1]}), flush=True)
    try:
        done = h.wait(timeout=args.timeout)
        print(json.dumps({"final": "complete", "pages": done.pages}), flush=True)
    except HandoffError as e:
        print(json.dumps({"final": "failed", "code": e.code, "message": e.message}), flush=True)
    except TimeoutError as e:
        print(json.dumps({"final": None, "error": str(e)}), flush=True)
        return 4
    if poisoned:
        print(json.dumps({"touching": poisoned[0]}), flush=True)
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        _ = view[poisoned[0] * PAGE]  # a real touch: SIGBUS ends the process here
        print(json.dumps({"touched_without_sigbus": poisoned[0]}), flush=True)
        return 5
    return 0 if not wrong else 3


if __name__ == "__main__":
    sys.exit(main())
