"""Helpers the ``remote`` benchmarks run inside the network namespaces.

send   --listen HOST:PORT --file IMAGE     plain TCP sender: every connection
                                           gets the whole file (sendall from an mmap)
recv   --connect HOST:PORT --size N        plain TCP receiver: reads N bytes
                                           into a reused buffer, prints seconds
relay  --listen HOST:PORT --to HOST:PORT --delay-ms D   (repeatable pairs)
                                           forwards connections, holding every
                                           chunk D ms in each direction
load   --socket S --name NAME --size N     restores NAME (fill on, no touches)
                                           again and again until SIGTERM; prints
                                           the bytes/s of each restore
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import mmap
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 1 << 20


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def send(args: argparse.Namespace) -> int:
    ls = socket.create_server(_addr(args.listen), reuse_port=False)
    print(json.dumps({"listening": args.listen}), flush=True)
    with open(args.file, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(data)
    while True:
        conn, _ = ls.accept()
        with conn:
            try:
                for pos in range(0, len(view), CHUNK):
                    conn.sendall(view[pos : pos + CHUNK])
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
            except OSError:
                pass


def recv(args: argparse.Namespace) -> int:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    with socket.create_connection(_addr(args.connect)) as s:
        got = 0
        while got < args.size:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
    dt = time.perf_counter() - t0
    print(json.dumps({"bytes": got, "seconds": dt}), flush=True)
    return 0 if got == args.size else 1


async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    q: deque[tuple[float, bytes]] = deque()
    more = asyncio.Event()
    eof = False

    async def writer() -> None:
        while True:
            while not q:
                if eof:
                    w.close()
                    return
                more.clear()
                await more.wait()
            due, data = q.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            w.write(data)
            await w.drain()

    task = asyncio.create_task(writer())
    try:
        while True:
            data = await r.read(256 << 10)
            if not data:
                break
            q.append((loop.time() + delay, data))
            more.set()
    except OSError:
        pass
    eof = True
    more.set()
    with contextlib.suppress(OSError):
        await task


async def _relay(pairs: list[tuple[str, str]], delay: float) -> None:
    async def handle(target: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*_addr(target))
        except OSError:
            w.close()
            return
        for s in (w, uw):
            sock = s.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(r, uw, delay), _pump(ur, w, delay), return_exceptions=True)

    servers = []
    for listen, target in pairs:
        host, port = _addr(listen)
        servers.append(await asyncio.start_server(functools.partial(handle, target), host, port))
    print(json.dumps({"relaying": pairs}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def load(args: argparse.Namespace) -> int:
    from lazypaged.client import map_anonymous, restore
    from lazypaged.handoff_protocol import SessionOptions

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        mem, addr = map_anonymous(args.size)
        t0 = time.perf_counter()
        h = restore(args.socket, [(addr, args.size, args.name, 0)], options=SessionOptions(fill=True))
        print(json.dumps({"started": True}), flush=True)
        h.wait(timeout=600)
        dt = time.perf_counter() - t0
        print(json.dumps({"bytes_per_s": args.size / dt}), flush=True)
        h.close()
        mem.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("send")
    p.add_argument("--listen", required=True)
    p.add_argument("--file", required=True)
    p = sub.add_parser("recv")
    p.add_argument("--connect", required=True)
    p.add_argument("--size", type=int, required=True)
    p = sub.add_parser("relay")
    p.add_argument("--pair", nargs=2, action="append", metavar=("LISTEN", "TO"), required=True)
    p.add_argument("--delay-ms", type=float, default=2.5)
    p = sub.add_parser("load")
    p.add_argument("--socket", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--size", type=int, required=True)
    args = ap.parse_args()
    if args.mode == "send":
        return send(args)
    if args.mode == "recv":
        return recv(args)
    if args.mode == "relay":
        asyncio.run(_relay([(a, b) for a, b in args.pair], args.delay_ms / 1000))
        return 0
    return load(args)


if __name__ == "__main__":
    sys.exit(main())
