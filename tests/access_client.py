"""A restore client for access-control tests; runs as any user (setpriv).

Hands ``--size`` bytes of fresh memory over as snapshot ``--name``; prints one
JSON line: the handoff error, or the sha256 of the memory once restored
(the test compares it with the image, which this user may not be able to read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from lazypaged.client import Handoff, HandoffError, map_anonymous
from lazypaged.handoff_protocol import RangeSpec
from lazypaged.uffd import Userfaultfd


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--ranges", type=int, default=1)
    args = ap.parse_args()
    mem, addr = map_anonymous(args.size)
    # Unprivileged: only user-mode faults (this client touches from user space).
    uffd = Userfaultfd.create(user_mode_only=os.geteuid() != 0)
    uffd.api(0)
    part = args.size // args.ranges
    ranges = [RangeSpec(addr + i * part, part, args.name, i * part) for i in range(args.ranges)]
    try:
        with Handoff.connect(args.socket) as h:
            h.send(uffd, ranges)
            digest = hashlib.sha256(mem[:]).hexdigest()
            h.wait(timeout=30)
    except HandoffError as e:
        print(json.dumps({"ok": False, "code": e.code, "message": e.message}), flush=True)
        return 2
    except OSError as e:
        print(json.dumps({"ok": False, "code": "connect", "message": str(e)}), flush=True)
        return 2
    print(json.dumps({"ok": True, "sha256": digest, "uid": os.getuid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
