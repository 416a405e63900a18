"""The process being restored in the core benchmarks (one measurement per run).

Run by ``benchmarks/core.py``; prints one JSON line. Every touch and every
timed copy happens in ``libtouch.so`` (C, called through ctypes), so lazypaged,
the C handler and the kernel baselines are touched by the same code.

Modes:

  pread           eager: map anonymous memory, pread the image into it
  kernel-lazy     mmap(MAP_PRIVATE) the image, write-touch every page
  lp-seq          lazypaged (daemon defaults): restore(), write-touch every page
  lp-random       lazypaged, fault-around and fill off: time N random touches
  lp-fill         lazypaged, no touches: from accepted to complete
  lp-first        lazypaged (daemon defaults): time the first touch after restore()
  lp-first-nofill the same with the fill off (the fault path alone)
  c-random        minimal C handler: time N random touches (4 KiB per fault)
  c-precopy       minimal C handler: 2 MiB UFFDIO_COPY loop, accepted to done

After timing, a sample of the pages that should be in is compared with the
image; a mismatch exits with status 3.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import socket
import struct
import sys
import time
from array import array
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazypaged.client import Handoff, restore
from lazypaged.handoff_protocol import SessionOptions

PAGE = os.sysconf("SC_PAGE_SIZE")
REQUEST = struct.Struct("<QQQQII")  # addr, len, offset, chunk, mode, pad
REPLY = struct.Struct("<IiQQQ")  # kind, err, faults, bytes, ns
CHECK_PAGES = 256


class Lib:
    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path, use_errno=True)
        vp, sz, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
        lib.bench_touch_seq.argtypes = [vp, sz, sz]
        lib.bench_touch_seq.restype = i64
        lib.bench_touch_pages.argtypes = [vp, vp, sz, sz, vp]
        lib.bench_touch_pages.restype = i64
        lib.bench_touch_one.argtypes = [vp]
        lib.bench_touch_one.restype = i64
        lib.bench_map_anon.argtypes = [sz]
        lib.bench_map_anon.restype = vp
        lib.bench_unmap.argtypes = [vp, sz]
        lib.bench_unmap.restype = ctypes.c_int
        lib.bench_eager_pread.argtypes = [ctypes.c_int, sz, sz, ctypes.POINTER(vp)]
        lib.bench_eager_pread.restype = i64
        lib.bench_kernel_lazy.argtypes = [ctypes.c_int, sz, sz, ctypes.POINTER(vp)]
        lib.bench_kernel_lazy.restype = i64
        lib.bench_uffd_register.argtypes = [vp, sz]
        lib.bench_uffd_register.restype = ctypes.c_int
        self.c = lib


def _check(r: int, what: str) -> int:
    if r < 0:
        raise OSError(-r, f"{what}: {os.strerror(-r)}")
    return r


class Checker:
    """Compares pages of the restored memory with the image."""

    def __init__(self, image: str) -> None:
        self.fd = os.open(image, os.O_RDONLY)

    def pages(self, addr: int, pages: list[int]) -> None:
        for p in pages:
            got = ctypes.string_at(addr + p * PAGE, PAGE)
            want = os.pread(self.fd, PAGE, p * PAGE)
            if got != want:
                print(json.dumps({"ok": False, "error": f"page {p} differs from the image"}), flush=True)
                sys.exit(3)

    def sample(self, addr: int, npages: int) -> None:
        rng = random.Random(7)
        picks = [0, npages - 1, *(rng.randrange(npages) for _ in range(CHECK_PAGES))]
        self.pages(addr, picks)


def random_pages(npages: int, count: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(npages), min(count, npages))


def touch_pages(lib: Lib, addr: int, pages: list[int]) -> dict[str, float]:
    idx = array("I", pages)
    out = array("Q", bytes(8 * len(pages)))
    idx_addr, _ = idx.buffer_info()
    out_addr, _ = out.buffer_info()
    total = _check(lib.c.bench_touch_pages(addr, idx_addr, len(pages), PAGE, out_addr), "touch")
    lat = sorted(out)
    n = len(lat)
    return {
        "touches": n,
        "total_ns": total,
        "mean_us": total / n / 1e3,
        "p50_us": lat[n // 2] / 1e3,
        "p90_us": lat[min(n - 1, n * 9 // 10)] / 1e3,
        "p99_us": lat[min(n - 1, n * 99 // 100)] / 1e3,
    }


def lp_restore(args: argparse.Namespace, addr: int, fault_around: bool | None, fill: bool | None) -> Handoff:
    opts = SessionOptions(fault_around=fault_around, fill=fill)
    return restore(args.socket, [(addr, args.size, args.name, 0)], options=opts)


def c_connect(args: argparse.Namespace, lib: Lib, addr: int, mode: int) -> tuple[socket.socket, int]:
    """Register the range here, hand the uffd to the C handler; returns (conn, uffd)."""
    uffd = _check(lib.c.bench_uffd_register(addr, args.size), "userfaultfd register")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(args.socket)
    socket.send_fds(s, [REQUEST.pack(addr, args.size, 0, args.chunk, mode, 0)], [uffd])
    return s, uffd


def c_reply(s: socket.socket) -> tuple[int, int, int, int, int]:
    data = b""
    while len(data) < REPLY.size:
        got = s.recv(REPLY.size - len(data))
        if not got:
            raise ConnectionError("the C handler hung up")
        data += got
    kind, err, faults, nbytes, ns = REPLY.unpack(data)
    if err:
        raise OSError(err, f"C handler reply {chr(kind)}: {os.strerror(err)}")
    return kind, err, faults, nbytes, ns


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--lib", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--socket", default="")
    ap.add_argument("--name", default="")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=2 << 20)
    args = ap.parse_args()
    lib = Lib(args.lib)
    c = lib.c
    size = args.size
    npages = size // PAGE
    check = Checker(args.image)
    res: dict[str, object] = {"ok": True, "mode": args.mode}
    out = ctypes.c_void_p()

    if args.mode in ("pread", "kernel-lazy"):
        fd = os.open(args.image, os.O_RDONLY)
        if args.mode == "pread":
            ns = _check(c.bench_eager_pread(fd, size, args.chunk, ctypes.byref(out)), "pread")
        else:
            ns = _check(c.bench_kernel_lazy(fd, size, PAGE, ctypes.byref(out)), "mmap/touch")
        res["ns"] = ns
        assert out.value is not None
        check.sample(out.value, npages)
        c.bench_unmap(out.value, size)
        os.close(fd)
        print(json.dumps(res), flush=True)
        return 0

    addr = c.bench_map_anon(size)
    if not addr:
        raise OSError(ctypes.get_errno(), "mmap")

    if args.mode == "lp-seq":
        t0 = time.perf_counter_ns()
        h = lp_restore(args, addr, None, None)
        t1 = time.perf_counter_ns()
        touch_ns = _check(c.bench_touch_seq(addr, size, PAGE), "touch")
        t2 = time.perf_counter_ns()
        done = h.wait(timeout=300)
        t3 = time.perf_counter_ns()
        res.update(ns=t2 - t0, handoff_ns=t1 - t0, touch_ns=touch_ns, complete_ns=t3 - t1, faults=done.faults)
        check.sample(addr, npages)
    elif args.mode == "lp-fill":
        h = lp_restore(args, addr, None, True)
        t1 = time.perf_counter_ns()
        done = h.wait(timeout=300)
        t2 = time.perf_counter_ns()
        res.update(ns=t2 - t1, daemon_s=done.seconds, faults=done.faults)
        check.sample(addr, npages)
    elif args.mode in ("lp-first", "lp-first-nofill"):
        fill = args.mode == "lp-first"
        page = npages // 2 + 3
        t0 = time.perf_counter_ns()
        h = lp_restore(args, addr, None, None if fill else False)
        t1 = time.perf_counter_ns()
        ns = _check(c.bench_touch_one(addr + page * PAGE), "touch")
        res.update(ns=ns, handoff_ns=t1 - t0, page=page)
        check.pages(addr, [page])
        if fill:
            h.wait(timeout=300)
            res["complete_ns"] = time.perf_counter_ns() - t1
        h.close()
    elif args.mode == "lp-random":
        pages = random_pages(npages, args.count, args.seed)
        h = lp_restore(args, addr, False, False)
        res.update(touch_pages(lib, addr, pages))
        check.pages(addr, pages[:CHECK_PAGES])
        h.close()
    elif args.mode == "c-random":
        pages = random_pages(npages, args.count, args.seed)
        s, uffd = c_connect(args, lib, addr, 0)
        c_reply(s)
        res.update(touch_pages(lib, addr, pages))
        s.sendall(b"q")
        _, _, faults, _, busy = c_reply(s)
        res.update(faults=faults, handler_busy_ns=busy)
        check.pages(addr, pages[:CHECK_PAGES])
        s.close()
        os.close(uffd)
    elif args.mode == "c-precopy":
        s, uffd = c_connect(args, lib, addr, 1)
        c_reply(s)
        t1 = time.perf_counter_ns()
        _, _, ioctls, nbytes, loop_ns = c_reply(s)
        t2 = time.perf_counter_ns()
        res.update(ns=t2 - t1, loop_ns=loop_ns, ioctls=ioctls, bytes=nbytes)
        check.sample(addr, npages)
        s.close()
        os.close(uffd)
    else:
        print(f"unknown mode {args.mode!r}", file=sys.stderr)
        return 2
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
