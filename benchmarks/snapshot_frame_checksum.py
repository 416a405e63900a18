"""What zstd's frame content checksum costs a snapshot: create, size, decode.

Run as ``python -m benchmarks.snapshot_frame_checksum [MiB] [runs]``. The
image is the snapshot group's page mix (30 % zero, 40 % text, 30 % random).
Creation goes through the same writer as ``lazypaged snapshot create`` (it
includes the fsync); runs alternate between the two settings so that load
from other processes falls on both alike, and medians are printed. Decoding
is timed twice per file: libzstd alone on every data frame (the part the
checksum adds to), and the reader's full path (decode plus XXH3-128).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from lazypaged.snapshot import SnapshotReader, SnapshotWriter
from lazypaged.snapshot import format as fmt
from lazypaged.snapshot.writer import read_chunks
from lazypaged.sources.raw import find_holes

from .snapshot import make_mixed_image


def _create(src: Path, out: Path, checksums: bool) -> float:
    t = time.perf_counter()
    fd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with SnapshotWriter(out, frame_checksums=checksums) as w:
            w.add_region(src.name, size, read_chunks(fd, 0, size, w.chunk_size, find_holes(fd, size), w.in_flight + 2))
            w.finish()
    finally:
        os.close(fd)
    return time.perf_counter() - t


def _decode_frames(path: Path) -> float:
    with SnapshotReader(path) as rd:
        chunks = [c for c in rd.index.chunks if c.kind == fmt.ChunkKind.ZSTD]
    data = path.read_bytes()
    frames = [memoryview(data)[c.frame_offset : c.frame_offset + c.frame_size] for c in chunks]
    dctx = zstandard.ZstdDecompressor()
    t = time.perf_counter()
    for f in frames:
        dctx.decompress(f)
    return time.perf_counter() - t


def _read_all(path: Path) -> float:
    with SnapshotReader(path) as rd:
        buf = bytearray(rd.header.chunk_size)
        t = time.perf_counter()
        for i, c in enumerate(rd.index.chunks):
            rd.chunk_into(i, memoryview(buf)[: c.length])
        return time.perf_counter() - t


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        src = Path(d) / "mem.raw"
        make_mixed_image(src, mib << 20)
        res: dict[bool, dict[str, list[float]]] = {k: {"create": [], "frames": [], "read": []} for k in (False, True)}
        sizes: dict[bool, int] = {}
        for _ in range(runs):
            for k in (False, True):
                out = Path(d) / f"mem-{int(k)}.lzs"
                res[k]["create"].append(_create(src, out, k))
                sizes[k] = out.stat().st_size
                res[k]["frames"].append(_decode_frames(out))
                res[k]["read"].append(_read_all(out))
        for k in (False, True):
            med = {n: statistics.median(v) for n, v in res[k].items()}
            print(
                f"checksum={'on ' if k else 'off'} size={sizes[k]} "
                + " ".join(f"{n}={v * 1000:.0f}ms" for n, v in med.items())
                + " all: "
                + " ".join(f"{n}=" + ",".join(f"{x * 1000:.0f}" for x in v) for n, v in res[k].items())
            )


if __name__ == "__main__":
    main()
