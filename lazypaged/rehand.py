"""The re-handoff helper: follows one native restore from outside the target.

Started by :meth:`lazypaged.client.Handoff.watch` as
``python -m lazypaged.rehand --uffd N --conn M --socket PATH --reconnect S
--target PID`` with the restore request frame on stdin. It holds a copy of
the target's uffd and the handoff connection, and:

* when the daemon reports the restore complete (or failed for a reason that
  a new daemon cannot fix), writes the re-handoff count (4 bytes, big
  endian) and that frame to stdout and exits;
* when the connection drops, or the daemon says it shut down, connects
  again (for up to ``--reconnect`` seconds per outage), hands the uffd over
  as already registered, and wakes every thread of the target that was
  blocked on a fault the lost daemon had read but not served;
* when the target exits, exits too.

A separate process because a target thread blocked on a missing page holds
the interpreter lock of the target while no daemon serves it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys

from . import handoff_protocol as hp
from .client import _COUNT, Handoff, HandoffError, _retry_handshake
from .uffd import Userfaultfd


def _read_request() -> hp.RestoreRequest:
    msgs = hp.FrameDecoder().feed(sys.stdin.buffer.read())
    if len(msgs) != 1 or not isinstance(msgs[0], hp.RestoreRequest):
        raise SystemExit("lazypaged.rehand: expected one restore request on stdin")
    return msgs[0]


def _rehand_request(req: hp.RestoreRequest, target: int) -> hp.RestoreRequest:
    """The same restore, for a daemon that finds the ranges registered and partly in."""
    o = req.options
    return hp.RestoreRequest(
        ranges=req.ranges,
        registered=True,
        features=req.features,
        pid=target,  # we are not the target: name it
        keeps_uffd=True,
        # Fill is what finds the pages already present (they answer EEXIST).
        options=hp.SessionOptions(fault_around=o.fault_around, fill=True, working_set=False,
                                  failure_policy=o.failure_policy),
    )


def follow(
    h: Handoff, uffd: Userfaultfd, path: str, req: hp.RestoreRequest, reconnect: float, target: int, pidfd: int
) -> tuple[int, hp.Message | None]:
    """Serve as the target's agent until the restore ends; (re-handoffs, final message or None)."""
    again = _rehand_request(req, target)
    rehandoffs = 0
    while True:
        lost = False
        if not h._queue:
            ready, _, _ = select.select([h.sock.fileno(), pidfd], [], [])
            if pidfd in ready:
                return rehandoffs, None  # the target is gone: nothing left to serve
        try:
            reply = h._recv()
        except (HandoffError, OSError):
            lost = True
        else:
            if isinstance(reply, hp.Failed) and reply.code == "shutdown":
                lost = True  # the daemon stopped gracefully: on to the next one
            else:
                return rehandoffs, reply
        if lost:
            try:
                _retry_handshake(h, path, again, uffd, reconnect)
            except HandoffError as e:
                return rehandoffs, hp.Failed(h.session or "-", e.code, e.message)
            rehandoffs += 1
            for r in again.ranges:
                uffd.wake(r.start, r.length)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazypaged.rehand", description=__doc__)
    ap.add_argument("--uffd", type=int, required=True)
    ap.add_argument("--conn", type=int, required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--reconnect", type=float, required=True)
    ap.add_argument("--target", type=int, required=True)
    args = ap.parse_args(argv)
    req = _read_request()
    uffd = Userfaultfd(args.uffd, req.features)
    h = Handoff(socket.socket(fileno=args.conn))
    h.sock.setblocking(True)
    try:
        pidfd = os.pidfd_open(args.target)
    except OSError:
        return 0  # the target is already gone
    rehandoffs, final = follow(h, uffd, args.socket, req, args.reconnect, args.target, pidfd)
    out = _COUNT.pack(rehandoffs) + (hp.encode(final) if final is not None else b"")
    with contextlib.suppress(OSError):  # the target may be gone
        os.write(1, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
