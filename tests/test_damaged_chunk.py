"""One damaged chunk of a snapshot costs that chunk's pages and no others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest

from lazypaged.snapshot import SnapshotReader, create_from_raw
from lazypaged.snapshot.format import Chunk

from .conftest import HERE, DaemonHandle, MiB, start_daemon, stop_daemon
from .snapshot_images import flip_bit, page_mix

CHECK_TARGET = HERE / "poison_check_target.py"
PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 8 * MiB


def _damaged(d: DaemonHandle, layout: str) -> tuple[Path, int, int]:
    """A snapshot of the demo image with one data chunk damaged; that
    chunk's first page and page count."""
    image = d.snapshots / "img.raw"
    image.write_bytes(page_mix(SIZE, seed=3, zero=0.05))
    snap = d.snapshots / "img.lzs"
    create_from_raw(image, snap, raw=layout == "raw")
    data = image.read_bytes()
    zero = bytes(PAGE)

    def whole(c: Chunk) -> bool:  # no zero page in it: each of its pages needs its bytes
        return all(data[p : p + PAGE] != zero for p in range(c.offset, c.offset + c.length, PAGE))

    with SnapshotReader(snap) as rd:
        c = [c for c in rd.index.chunks if c.kind != 0 and whole(c)][10]
    flip_bit(snap, c.frame_offset + c.frame_size // 2)
    return image, c.offset // PAGE, c.length // PAGE


def _target(d: DaemonHandle, image: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHECK_TARGET), "--socket", str(d.socket), "--image", str(image), "--name", "img.lzs",
         "--size", str(SIZE), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

def _read_lines(stdout: IO[str], n: int, out: list[dict[str, object]]) -> None:
    """Up to ``n`` JSON lines into ``out`` (in a thread: the caller bounds the wait)."""
    for _ in range(n):
        line = stdout.readline()
        if not line:
            return
        out.append(json.loads(line))



@pytest.mark.parametrize("layout", ["raw", "zstd"])
def test_sigbus_poisons_only_the_damaged_chunk(tmp_path: Path, layout: str) -> None:
    d = start_daemon(tmp_path)
    try:
        image, first, count = _damaged(d, layout)
        proc = _target(d, image, "--policy", "sigbus", "--timeout", "30")
        out, err = proc.communicate(timeout=60)
        assert out.strip(), err
        res = json.loads(out.splitlines()[-1])
        assert res["wrong_pages"] == 0, res
        # Pages of the chunk that are zeros in the index need no chunk data.
        assert res["poisoned_pages"] > 0, res
        assert all(first <= a and a + n <= first + count for a, n in res["poisoned"]), (first, count, res)
        assert res["complete"], res
    finally:
        assert stop_daemon(d) == 0


@pytest.mark.parametrize("layout", ["raw", "zstd"])
def test_wait_serves_good_pages_next_to_a_damaged_chunk(tmp_path: Path, layout: str) -> None:
    """Fill off, fault-around on: reading every page but the damaged chunk's
    never waits on the retries of that chunk."""
    d = start_daemon(tmp_path)
    proc: subprocess.Popen[str] | None = None
    try:
        image, first, count = _damaged(d, layout)
        proc = _target(d, image, "--policy", "wait", "--no-fill", "--skip", f"{first}:{count}")
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: list[dict[str, object]] = []
        reader = threading.Thread(target=_read_lines, args=(stdout, 2, lines))
        reader.start()
        reader.join(timeout=60)  # accepted, then read_s: every page read (or a good page left blocked)
        assert len(lines) == 2, ("a good page stayed blocked", lines)
        assert "read_s" in lines[1], lines
        assert any(x.get("event") == "source_failed" for x in d.log_lines())
    finally:
        if proc is not None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0


@pytest.mark.parametrize("layout", ["raw", "zstd"])
def test_sigbus_fill_off_completes_when_the_last_page_is_poisoned(tmp_path: Path, layout: str) -> None:
    """Fill and fault-around off, the damaged chunk's pages read last: the
    last page to settle is a poisoned one, and ``complete`` follows it
    without waiting for the target to exit."""
    d = start_daemon(tmp_path)
    try:
        image, first, count = _damaged(d, layout)
        proc = _target(d, image, "--policy", "sigbus", "--no-fill", "--no-fault-around", "--timeout", "20",
                       "--order", "bad-last", "--skip", f"{first}:{count}")
        out, err = proc.communicate(timeout=60)
        assert out.strip(), err
        res = json.loads(out.splitlines()[-1])
        assert res["wrong_pages"] == 0, res
        assert res["poisoned_pages"] > 0, res
        assert res["complete"], res
    finally:
        assert stop_daemon(d) == 0
