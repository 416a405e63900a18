"""A program with a large in-memory table, restored lazily from a snapshot.

Subcommands:

  build    build the table (private anonymous memory), print where it is,
           then answer "get KEY" lines on stdin until EOF
  lazy     map fresh memory, hand it to lazypaged (the table's region of a
           snapshot of a `build` process, found by `find_region` or
           `lazypaged snapshot inspect --json`) and answer at once
  eager    the same, but first read and decompress the whole region into memory
  demo     run all of it: build, capture with `lazypaged snapshot create
           --from-pid`, serve with `lazypaged serve`, compare lazy and eager

The table is 64-byte records; record i holds key i and a value derived from
it (see expected_value), so any instance can check an answer. Addresses inside the table are
offsets, so a restored copy works wherever it is mapped.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

RECORD = 64
_BLOCK_RECORDS = 16384  # 1 MiB of records built at a time
_KEY = struct.Struct("<Q")


def value_of(key: int) -> bytes:
    """The 56-byte value stored for ``key`` (text, so it compresses like real data)."""
    city = (b"lisbon", b"oslo", b"lima")[key % 3]
    return (b"customer %d balance %d city %s" % (key, key * 7 % 100003, city)).ljust(RECORD - 8, b".")


def build(mem: mmap.mmap) -> None:
    rows = len(mem) // RECORD
    keys = memoryview(mem).cast("Q")
    for first in range(0, rows, _BLOCK_RECORDS):
        n = min(_BLOCK_RECORDS, rows - first)
        block = bytearray(b"".join(b"\0" * 8 + value_of(first + k) for k in range(min(n, 64))) * (n // 64 + 1))[
            : n * RECORD
        ]
        mem[first * RECORD : (first + n) * RECORD] = block
        keys[first * 8 : (first + n) * 8 : 8] = array("Q", range(first, first + n))
    keys.release()


def lookup(mem: mmap.mmap, key: int) -> bytes:
    off = key * RECORD
    (stored,) = _KEY.unpack_from(mem, off)
    if stored != key:
        raise KeyError(f"record {key} holds key {stored}")
    return mem[off + 8 : off + RECORD]


def serve_queries(mem: mmap.mmap, started: float, extra: dict[str, object]) -> None:
    """Answer "get KEY" lines; the first answer's delay since start is reported."""
    first = True
    for line in sys.stdin:
        key = int(line.split()[1])
        val = lookup(mem, key)
        out: dict[str, object] = {"key": key, "value": val.rstrip(b".").decode(), "ok": val == expected_value(key)}
        if first:
            out |= {"first_answer_ms": round((time.monotonic() - started) * 1000, 2), **extra}
            first = False
        print(json.dumps(out), flush=True)


def expected_value(key: int) -> bytes:
    """What record ``key`` holds: each 1 MiB block repeats its first 64 values
    (cheap to build in Python, still text that compresses realistically)."""
    first = key - key % _BLOCK_RECORDS
    return value_of(first + (key - first) % 64)


def cmd_build(args: argparse.Namespace) -> int:
    size = args.size_mib << 20
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t0 = time.monotonic()
    build(mem)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    print(
        json.dumps({"pid": os.getpid(), "address": addr, "length": size, "build_s": time.monotonic() - t0}), flush=True
    )
    serve_queries(mem, time.monotonic(), {})
    return 0


def find_region(snapshot: Path, address: int) -> tuple[int, int]:
    """(offset in the snapshot, length) of the region captured at ``address``."""
    from lazypaged.snapshot import SnapshotReader

    with SnapshotReader(snapshot) as rd:
        for r in rd.regions:
            if r.start == address:
                return r.offset, r.length
    raise SystemExit(f"no region at {address:#x} in {snapshot}")


def cmd_lazy(args: argparse.Namespace) -> int:
    from lazypaged.client import map_anonymous, restore

    started = time.monotonic()
    mem, addr = map_anonymous(args.length)
    handoff = restore(args.socket, [(addr, args.length, args.snapshot.name, args.offset)])
    serve_queries(mem, started, {"mode": "lazy"})
    handoff.wait(timeout=600)
    handoff.close()
    return 0


def cmd_eager(args: argparse.Namespace) -> int:
    from lazypaged.snapshot import SnapshotReader

    started = time.monotonic()
    with SnapshotReader(args.snapshot) as rd:
        r = next(r for r in rd.regions if r.offset == args.offset)
        mem = mmap.mmap(-1, r.length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = memoryview(mem)
        size = rd.header.chunk_size
        for k in range(r.chunk_count):
            at = k * size
            rd.chunk_into(r.first_chunk + k, view[at : at + min(size, r.length - at)])
        view.release()
    serve_queries(mem, started, {"mode": "eager"})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    py = sys.executable
    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="lazypaged-table-") as tmp:
        work = Path(tmp)
        snaps = work / "snapshots"
        snaps.mkdir()
        snap = snaps / "table.lzs"
        orig = subprocess.Popen(
            [py, str(here), "build", "--size-mib", str(args.size_mib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert orig.stdin
        assert orig.stdout
        info = json.loads(orig.stdout.readline())
        print(f"built a {args.size_mib} MiB table in {info['build_s']:.1f} s (pid {info['pid']})")
        t0 = time.monotonic()
        subprocess.run(
            [py, "-m", "lazypaged", "snapshot", "create", "--from-pid", str(info["pid"]), "-o", str(snap)], check=True
        )
        print(f"captured in {time.monotonic() - t0:.1f} s")
        orig.stdin.close()
        orig.wait()
        sock = work / "lazypaged.sock"
        cfg = work / "lazypaged.toml"
        cfg.write_text(f'[daemon]\nhandoff_socket = "{sock}"\nsnapshot_dirs = ["{snaps}"]\nlog_format = "json"\n')
        with open(work / "daemon.log", "wb") as log:
            daemon = subprocess.Popen([py, "-m", "lazypaged", "serve", "--config", str(cfg)], stdout=log, stderr=log)
        try:
            while not sock.exists():
                time.sleep(0.05)
            offset, length = find_region(snap, info["address"])
            for mode in ("lazy", "eager"):
                extra = ["--socket", str(sock)] if mode == "lazy" else []
                where = ["--offset", str(offset), "--length", str(length)]
                p = subprocess.Popen(
                    [py, str(here), mode, "--snapshot", str(snap), *where, *extra],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                out, _ = p.communicate("get 123456\n", timeout=600)
                print(f"{mode}: {out.strip()}")
        finally:
            daemon.terminate()
            daemon.wait()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--size-mib", type=int, default=2048)
    for name in ("lazy", "eager"):
        s = sub.add_parser(name)
        s.add_argument("--snapshot", type=Path, required=True)
        s.add_argument("--offset", type=int, required=True, help="the table region's offset in the snapshot")
        s.add_argument("--length", type=int, required=True, help="the table region's length")
        if name == "lazy":
            s.add_argument("--socket", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--size-mib", type=int, default=2048)
    args = ap.parse_args()
    return {"build": cmd_build, "lazy": cmd_lazy, "eager": cmd_eager, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
