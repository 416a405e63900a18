"""A restorer for a daemon that may not read its target's /proc/PID/maps.

Runs as any user (setpriv) and hands memory over in one of the shapes the
handoff checks: ``--case`` picks it. Prints one JSON line: the handoff error,
or the sha256 of each mapped part of the memory once restored, with its
offset and length (the test compares them with the image, which this user
may not be able to read).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import sys

from lazypaged.client import Handoff, HandoffError, map_anonymous
from lazypaged.handoff_protocol import RangeSpec, SessionOptions
from lazypaged.uffd import Userfaultfd

PAGE = 4096
HUGE = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _uffd() -> Userfaultfd:
    # Unprivileged: user-mode faults only (this client touches from user space).
    u = Userfaultfd.create(user_mode_only=os.geteuid() != 0)
    u.api(0)
    return u


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--case", required=True, choices=(
        "plain", "registered", "other_uffd", "unregistered", "hole", "unmapped_range", "huge_declared", "split",
        "no_api",
    ))
    ap.add_argument("--hold", action="store_true",
                    help="no fill; once the pages are read, say so and keep the session until stdin closes")
    args = ap.parse_args()
    size = args.size
    _mem, addr = map_anonymous(size)  # kept: the mapping lives as long as the object
    uffd = Userfaultfd.create(user_mode_only=os.geteuid() != 0) if args.case == "no_api" else _uffd()
    ranges = [RangeSpec(addr, size, args.name, 0)]
    registered = args.case != "plain"
    mapped = [(0, size)]
    keep: list[Userfaultfd] = []
    keep_maps: list[mmap.mmap] = []
    if args.case == "registered":
        uffd.register(addr, size)
    elif args.case == "other_uffd":
        other = _uffd()
        keep.append(other)
        other.register(addr, size)
    elif args.case == "hole":
        # A re-hand after the target unmapped a middle part of a range.
        uffd.register(addr, size)
        third = size // 3 // PAGE * PAGE
        assert _libc.munmap(addr + third, third) == 0
        mapped = [(0, third), (2 * third, size - 2 * third)]
    elif args.case == "unmapped_range":
        # Two ranges; the upper one was unmapped as a whole.
        half = size // 2
        uffd.register(addr, size)
        assert _libc.munmap(addr + half, half) == 0
        ranges = [RangeSpec(addr, half, args.name, 0), RangeSpec(addr + half, half, args.name, half)]
        mapped = [(0, half)]
    elif args.case == "split":
        # One range over two mappings: the part above its first third
        # mprotect()ed read-only (off any chunk boundary of the fill).
        registered = False
        third = size // 3 // PAGE * PAGE
        assert _libc.mprotect(addr + third, size - third, mmap.PROT_READ) == 0
    elif args.case == "huge_declared":
        # 2 MiB pages declared over ordinary memory, at a 2 MiB-aligned address.
        registered = False
        big, base = map_anonymous(2 * HUGE)
        keep_maps.append(big)
        start = (base + HUGE - 1) // HUGE * HUGE
        ranges = [RangeSpec(start, HUGE, args.name, 0, page_size=HUGE)]
        mapped = []
    # Across mappings, only the fill's copies cross a boundary: read once it
    # is done, with the uffd closed here, so a page it left out reads zeros
    # (a wrong answer) rather than blocking forever.
    after = args.case in ("hole", "split")

    def digests() -> list[dict[str, object]]:
        return [
            {"offset": off, "length": n, "sha256": hashlib.sha256(ctypes.string_at(addr + off, n)).hexdigest()}
            for off, n in mapped
        ]

    try:
        with Handoff.connect(args.socket) as h:
            h.send(uffd, ranges, registered=registered, options=SessionOptions(fault_around=False, fill=not args.hold),
                   keep_uffd=not after)
            parts = [] if after else digests()
            if args.hold:
                print(json.dumps({"held": True, "parts": parts}), flush=True)
                sys.stdin.read()
                return 0
            h.wait(timeout=60)
        if after:
            parts = digests()
    except HandoffError as e:
        print(json.dumps({"ok": False, "code": e.code, "message": e.message}), flush=True)
        return 2
    except OSError as e:
        print(json.dumps({"ok": False, "code": "connect", "message": str(e)}), flush=True)
        return 2
    finally:
        for u in keep:
            u.close()
    print(json.dumps({"ok": True, "parts": parts, "uid": os.getuid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
