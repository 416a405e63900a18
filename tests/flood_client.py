"""An idle-connection flood on a Unix socket, as another user.

Usage: flood_client.py SOCKET COUNT UID

Drops to UID (keeping a file-system uid of root, so the test's private
directories stay reachable: the daemon sees UID, from SO_PEERCRED),
connects COUNT times without sending a byte, prints one JSON line with how
the attempts went, and holds every connection open until stdin closes.
Nothing here retries: the flood is exactly COUNT attempts and ends with its
stdin.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import sys


def main() -> int:
    path, count, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 64)), hard))
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setresgid(uid, uid, 0)
    os.setresuid(uid, uid, 0)
    libc.setfsuid(0)  # allowed: 0 is the saved uid
    libc.setfsgid(0)
    held: list[socket.socket] = []
    outcome = {"connected": 0, "backlog_full": 0, "other": 0}
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            s.connect(path)
        except BlockingIOError:
            outcome["backlog_full"] += 1
            s.close()
            continue
        except OSError:
            outcome["other"] += 1
            s.close()
            continue
        outcome["connected"] += 1
        held.append(s)
    print(json.dumps(outcome), flush=True)
    sys.stdin.read()
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
