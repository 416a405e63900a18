"""End-to-end restores: real daemon, real target processes, every byte checked."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

import pytest

from lazypaged import handoff_protocol as hp
from lazypaged.client import Handoff, map_anonymous
from lazypaged.uffd import Userfaultfd

from .conftest import DaemonHandle, MiB, finish, kill

SIZE = 32 * MiB


@pytest.mark.parametrize("touch", ["seq", "random", "threads", "write", "syscall"])
def test_touch_patterns_get_image_bytes(daemon: DaemonHandle, touch: str) -> None:
    daemon.image("img", SIZE)
    rc, lines, err = finish(daemon.target("img", SIZE, "--touch", touch))
    assert rc == 0, (lines, err)
    result = lines[-1]
    assert result["ok"] is True
    assert result["complete"]["pages"] == SIZE // os.sysconf("SC_PAGE_SIZE")  # type: ignore[index]


def test_faults_without_fill_or_fault_around(daemon: DaemonHandle) -> None:
    """Every page served by its own fault: the pure fault path."""
    daemon.image("img", 8 * MiB)
    rc, lines, err = finish(daemon.target("img", 8 * MiB, "--touch", "random", "--no-fill", "--no-fault-around"))
    assert rc == 0, (lines, err)
    assert lines[-1]["complete"]["faults"] >= 8 * MiB // os.sysconf("SC_PAGE_SIZE")  # type: ignore[index]


def test_several_ranges_backed_out_of_order(daemon: DaemonHandle) -> None:
    daemon.image("img", SIZE)
    rc, lines, err = finish(daemon.target("img", SIZE, "--split", "4", "--touch", "random"))
    assert rc == 0, (lines, err)


def test_range_at_offset(daemon: DaemonHandle) -> None:
    daemon.image("img", SIZE)
    rc, lines, err = finish(daemon.target("img", 8 * MiB, "--offset", str(12 * MiB), "--touch", "seq"))
    assert rc == 0, (lines, err)


def test_zero_pages_served_as_zero(daemon: DaemonHandle) -> None:
    daemon.image("img", SIZE)
    rc, lines, err = finish(daemon.target("img", SIZE, "--touch", "none"))
    assert rc == 0, (lines, err)
    # Every 8th page of the demo pattern is a hole: 1/8 of the image.
    assert lines[-1]["complete"]["zero"] == SIZE // 8  # type: ignore[index]


def test_fill_completes_without_any_touch(daemon: DaemonHandle) -> None:
    daemon.image("img", SIZE)
    proc = daemon.target("img", SIZE, "--touch", "hold", wait=False)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = [x for x in daemon.log_lines() if x.get("event") == "session_ended"]
            if done:
                break
            time.sleep(0.05)
        assert done, "no session ended"
        assert done[0]["outcome"] == "complete", done
        assert done[0]["faults"] == 0
    finally:
        kill(proc)


def test_target_killed_mid_restore_ends_only_its_session(daemon: DaemonHandle) -> None:
    daemon.image("big", 256 * MiB)
    daemon.image("img", SIZE)
    victim = daemon.target("big", 256 * MiB, "--touch", "hold", "--no-fill", wait=False)
    line = victim.stdout.readline()  # type: ignore[union-attr]
    assert "accepted" in line, line
    os.kill(victim.pid, signal.SIGKILL)
    kill(victim)
    others = [daemon.target("img", SIZE, "--touch", "random") for _ in range(3)]
    for p in others:
        rc, lines, err = finish(p)
        assert rc == 0, (lines, err)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ended = {x["pid"]: x["outcome"] for x in daemon.log_lines() if x.get("event") == "session_ended"}
        if ended.get(victim.pid):
            break
        time.sleep(0.05)
    assert ended.get(victim.pid) == "target_exited", ended
    assert daemon.alive()


def test_many_targets_at_once(daemon: DaemonHandle) -> None:
    daemon.image("img", 16 * MiB)
    procs = [daemon.target("img", 16 * MiB, "--touch", t) for t in ["seq", "random", "threads", "write"] * 3]
    for p in procs:
        rc, lines, err = finish(p, timeout=120)
        assert rc == 0, (lines, err)


def _wait_log(d: DaemonHandle, event: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(ln.get("event") == event for ln in d.log_lines()):
        assert time.monotonic() < deadline, f"no {event} line in the log"
        time.sleep(0.02)


def test_complete_frame_survives_shutdown(daemon: DaemonHandle) -> None:
    """SIGTERM while a session whose uffd only the daemon holds runs: the
    daemon serves it to the end, and its restorer still hears ``complete``
    before the connection closes (it used to be cut off without a frame)."""
    size = 1 * MiB
    expected = daemon.image("img", size).read_bytes()
    opts = hp.SessionOptions(fill=False, fault_around=False)
    mem, addr = map_anonymous(size)
    try:
        with Handoff.connect(daemon.socket) as h:
            with Userfaultfd.create() as uffd:
                uffd.api(0)
                h.send(uffd, [hp.RangeSpec(addr, size, "img", 0)], options=opts, keep_uffd=False)
            daemon.proc.send_signal(signal.SIGTERM)
            _wait_log(daemon, "stopping")
            assert mem[:] == expected, "wrong bytes in the restored memory"
            done = h.wait(timeout=30)
        assert done.pages == size // mmap.PAGESIZE
        assert done.bytes_copied + done.bytes_zero == size
        assert done.pages_poisoned == 0
    finally:
        mem.close()
    assert daemon.proc.wait(timeout=30) == 0


def test_complete_counts_poisoned_pages(daemon: DaemonHandle) -> None:
    """Under failure_policy "sigbus", pages of a damaged chunk are poisoned,
    and ``complete`` says how many (it used to carry no such count)."""
    from lazypaged.snapshot.reader import SnapshotReader

    from .snapshot_images import flip_bit

    size = 4 * MiB
    raw = daemon.image("raw.img", size)
    snap = daemon.snapshots / "damaged.lzs"
    subprocess.run([sys.executable, "-m", "lazypaged", "snapshot", "create", "--from-raw", str(raw), "-o", str(snap)],
                   check=True, capture_output=True)
    with SnapshotReader(snap) as rd:
        chunk = next(c for c in rd.index.chunks if c.kind != 0)
    flip_bit(snap, chunk.frame_offset + chunk.frame_size // 2)
    opts = hp.SessionOptions(failure_policy="sigbus", fill=True)
    mem, addr = map_anonymous(size)
    try:
        with Handoff.connect(daemon.socket) as h:
            with Userfaultfd.create() as uffd:
                uffd.api(0)
                h.send(uffd, [hp.RangeSpec(addr, size, "damaged.lzs", 0)], options=opts, keep_uffd=False)
            done = h.wait(timeout=60)
        # Not one page is touched here: a poisoned one would raise SIGBUS in this process.
    finally:
        mem.close()
    page = mmap.PAGESIZE
    assert 0 < done.pages_poisoned <= chunk.length // page, done
    assert done.bytes_copied + done.bytes_zero + done.pages_poisoned * page == size, done
