"""A restore target: maps memory, hands it to lazypaged, touches it, checks it.

Run as a separate process by the tests. Prints one JSON line and exits 0 if
every byte matched the image, 3 on wrong bytes, 2 if the handoff failed.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import tempfile
import threading
import time

from lazypaged.client import HandoffError, address_of, map_anonymous, restore
from lazypaged.handoff_protocol import RangeSpec, SessionOptions

PAGE = os.sysconf("SC_PAGE_SIZE")
HUGE = 2 << 20
MAP_HUGETLB = 0x40000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--image", required=True, help="path of the image, to check bytes against")
    ap.add_argument("--name", required=True, help="snapshot name as the daemon knows it")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--split", type=int, default=1, help="hand over as N ranges backed in reverse order")
    touches = ["seq", "random", "threads", "write", "syscall", "hold", "none", "subset", "halves"]
    ap.add_argument("--touch", default="seq", choices=touches)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--no-fill", action="store_true")
    ap.add_argument("--no-working-set", action="store_true")
    ap.add_argument("--policy", choices=["wait", "sigbus", "kill"], help="failure_policy option")
    ap.add_argument("--no-fault-around", action="store_true")
    ap.add_argument("--wait", action="store_true", help="wait for the completion message")
    ap.add_argument("--memory", default="anon", choices=["anon", "shmem", "hugetlb"])
    ap.add_argument("--declare-small-pages", action="store_true", help="omit page_size (a mistake)")
    args = ap.parse_args()

    size = args.size
    memfd = -1
    page_size = 0
    if args.memory == "shmem":
        memfd = os.memfd_create("lazypaged-target")
        os.ftruncate(memfd, size)
        mem = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        addr = address_of(mem)
    elif args.memory == "hugetlb":
        page_size = 0 if args.declare_small_pages else HUGE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB
        mem = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        addr = address_of(mem)
    else:
        mem, addr = map_anonymous(size)
    part = size // args.split
    # Range i of the target is backed by part (split-1-i) of the image slice.
    backing = [args.offset + (args.split - 1 - i) * part for i in range(args.split)]
    ranges = [RangeSpec(addr + i * part, part, args.name, backing[i], page_size) for i in range(args.split)]
    opts = SessionOptions(
        fill=False if args.no_fill else None,
        fault_around=False if args.no_fault_around else None,
        working_set=False if args.no_working_set else None,
        failure_policy=args.policy,
    )
    try:
        h = restore(args.socket, ranges, options=opts)
    except HandoffError as e:
        print(json.dumps({"ok": False, "handoff_error": e.code, "message": e.message}), flush=True)
        return 2
    print(json.dumps({"accepted": h.session, "pid": os.getpid()}), flush=True)

    with open(args.image, "rb") as f:
        image = bytearray()
        for off in backing:
            f.seek(off)
            image += f.read(part)
    expected = bytes(image)
    view = memoryview(mem)
    npages = size // PAGE
    t0 = time.perf_counter()
    written: dict[int, int] = {}
    if args.touch == "hold":
        time.sleep(3600)
    elif args.touch == "seq":
        for p in range(npages):
            _ = mem[p * PAGE]
    elif args.touch == "halves":
        # The first half, then wait for a line on stdin, then the rest.
        half = npages // 2
        for p in range(half):
            _ = mem[p * PAGE]
        print(json.dumps({"half": True}), flush=True)
        sys.stdin.readline()
        for p in range(half, npages):
            _ = mem[p * PAGE]
    elif args.touch == "subset":
        # A fixed, scattered tenth of the pages in a repeatable order, then
        # exit: only those pages are checked, the rest is never read.
        order = list(range(npages))
        random.Random(7).shuffle(order)
        subset = order[: npages // 10]
        for p in subset:
            _ = mem[p * PAGE]
        bad = [p for p in subset if mem[p * PAGE : (p + 1) * PAGE] != expected[p * PAGE : (p + 1) * PAGE]]
        print(json.dumps({"ok": not bad, "first_bad": bad[0] * PAGE if bad else -1}), flush=True)
        return 0 if not bad else 3
    elif args.touch == "random":
        order = list(range(npages))
        random.Random(1).shuffle(order)
        for p in order:
            _ = mem[p * PAGE + 123]
    elif args.touch == "threads":

        def reader(k: int) -> None:
            order = list(range(npages))
            random.Random(k).shuffle(order)
            for p in order:
                _ = mem[p * PAGE + k]

        ts = [threading.Thread(target=reader, args=(k,)) for k in range(args.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    elif args.touch == "write":
        # Writes first: every 3rd page gets a marker byte before anything reads it.
        for p in range(0, npages, 3):
            off = p * PAGE + 7
            mem[off] = (p * 31 + 1) & 0xFF
            written[off] = mem[off]
    elif args.touch == "syscall":
        # The kernel reads the lazy memory on our behalf (copy_from_user).
        with tempfile.TemporaryFile() as tf:
            chunk = 1 << 20
            for off in range(0, size, chunk):
                os.write(tf.fileno(), view[off : off + chunk])
            tf.seek(0)
            got = tf.read()
        if got != expected:
            print(json.dumps({"ok": False, "where": "syscall", "first_bad": _first_bad(got, expected)}))
            return 3
    touched = time.perf_counter() - t0

    want = bytearray(expected)
    for off, v in written.items():
        want[off] = v
    ok = mem[:] == bytes(want)
    result: dict[str, object] = {"ok": ok, "touch_s": round(touched, 4)}
    if not ok:
        result["first_bad"] = _first_bad(mem[:], bytes(want))
    if args.wait:
        done = h.wait(timeout=60)
        result["complete"] = {"pages": done.pages, "faults": done.faults, "zero": done.bytes_zero}
    if memfd >= 0:
        # A second mapping of the same memory sees what was restored.
        with mmap.mmap(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as again:
            result["second_mapping_ok"] = again[:] == bytes(want)
            ok = ok and bool(result["second_mapping_ok"])
            result["ok"] = ok
        os.close(memfd)
    print(json.dumps(result), flush=True)
    return 0 if ok else 3


def _first_bad(got: bytes, want: bytes) -> int:
    for i in range(0, len(want), PAGE):
        if got[i : i + PAGE] != want[i : i + PAGE]:
            return i
    return -1


if __name__ == "__main__":
    sys.exit(main())
