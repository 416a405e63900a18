"""A misbehaving peer client, run inside a namespace by the peer tests.

Connects to an exporter and does one bad thing per connection, printing one
JSON line per step with what came back:

  garbage     bytes that are not the protocol at all
  bad-frame   a valid handshake, then a frame of an unknown type
  oversize    a valid handshake, then a frame claiming a huge body
  bounds      a read past the end of the export, then a valid read on the
              same connection (which must still be answered)
  no-export   an export that does not exist
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import struct
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazypaged import peer_protocol as pp


def connect(args: argparse.Namespace) -> socket.socket:
    raw = socket.create_connection((args.host, args.port), timeout=10)
    if not args.ca:
        return raw
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    return ctx.wrap_socket(raw, server_hostname=args.host)


def events(sock: socket.socket, c: pp.ClientConnection, n: int) -> list[object]:
    out: list[object] = []
    for x in c.data_to_send():
        sock.sendall(x)
    while len(out) < n:
        try:
            ev = c.next_event()
        except pp.RemoteProtocolError as e:
            out.append(f"protocol error: {e}")
            return out
        if ev is pp.NEED_DATA:
            data = sock.recv(1 << 20)
            c.receive_data(data)
            continue
        out.append(ev)
        if ev is pp.CLOSED:
            return out
    return out


def describe(ev: object) -> object:
    if isinstance(ev, pp.PeerError | pp.ReadFailed | pp.OpenFailed):
        return {"type": type(ev).__name__, "reason": ev.reason, "message": ev.message}
    if isinstance(ev, pp.ReadDone):
        return {"type": "ReadDone", "length": ev.length}
    if ev is pp.CLOSED:
        return "closed"
    return type(ev).__name__ if not isinstance(ev, str) else ev


def raw_reply(sock: socket.socket) -> str:
    data = b""
    while True:
        try:
            got = sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            break
        if not got:
            break
        data += got
    return data.decode("latin-1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--ca", default="")
    ap.add_argument("--cert", default="")
    ap.add_argument("--key", default="")
    args = ap.parse_args()
    results: dict[str, object] = {}

    with connect(args) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        results["garbage"] = raw_reply(s)

    for name, frame in (
        ("bad-frame", struct.pack("<BBHI", 99, 0, 0, 0)),
        ("oversize", struct.pack("<BBHI", pp.FrameType.OPEN, 0, 0, 1 << 30)),
    ):
        with connect(args) as s:
            c = pp.ClientConnection("bulk", encodings=())
            welcome = events(s, c, 1)
            s.sendall(frame)
            results[name] = [describe(e) for e in welcome + events(s, c, 2)]

    with connect(args) as s:
        c = pp.ClientConnection("urgent", encodings=())
        evs = events(s, c, 1)
        c.open(1, args.export)
        c.read(1, args.size - 4096, 8192)
        c.read(1, 0, 4096)
        c.read(1, 1 << 62, 4096)
        evs += events(s, c, 4)
        results["bounds"] = [describe(e) for e in evs]

    with connect(args) as s:
        c = pp.ClientConnection("bulk", encodings=())
        evs = events(s, c, 1)
        c.open(5, "no-such-export")
        evs += events(s, c, 1)
        results["no-export"] = [describe(e) for e in evs]

    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
