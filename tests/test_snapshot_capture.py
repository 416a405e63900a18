"""Capturing live processes: content, untouched pages, always resuming, bad pids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.snapshot import SnapshotReader
from lazypaged.snapshot.capture import (
    PF_KTHREAD,
    CaptureError,
    KernelThread,
    NoSuchProcess,
    ProcessExited,
    _ProcessReader,
    capture_pid,
    parse_maps,
)

from .snapshot_images import PAGE

# The child maps 16 MiB private anonymous memory, writes a pattern into every
# other page of the first 8 MiB, reports the address, then answers "ping".
CHILD = r"""
import mmap, ctypes, sys
m = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for p in range(0, 8 << 20, 2 * 4096):
    m[p : p + 16] = b"page%012d" % p
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    if os.geteuid() != 0:
        pytest.skip("reading another process's memory needs root (ptrace-read rights)")
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    addr = int(p.stdout.readline(), 16)
    yield p, addr
    p.kill()
    p.wait()
    for f in (p.stdin, p.stdout):
        if f:
            f.close()


def _ping(p: subprocess.Popen[str]) -> bool:
    assert p.stdin
    assert p.stdout
    p.stdin.write("ping\n")
    p.stdin.flush()
    return p.stdout.readline() == "pong\n"


def test_capture_gets_the_memory_and_resumes(tmp_path: Path, child: tuple[subprocess.Popen[str], int]) -> None:
    p, addr = child
    out = tmp_path / "proc.lzs"
    seen: list[int] = []
    st = capture_pid(p.pid, out, on_stopped=lambda maps: seen.append(len(maps)))
    assert seen
    assert st.regions == seen[0]
    assert _state(p.pid) != "T"
    assert _ping(p)
    with SnapshotReader(out) as rd:
        names = [r.name for r in rd.regions]
        assert "[heap]" in names
        assert "[stack]" in names
        r = next(r for r in rd.regions if r.start == addr)
        assert r.length == 16 << 20
        assert r.name == f"[anon]@{addr:#x}" or r.name == "[anon]"
        data = b"".join(rd.chunk(i) for i in range(r.first_chunk, r.first_chunk + r.chunk_count))
        for off in (0, 2 * PAGE, (8 << 20) - 2 * PAGE):
            assert data[off : off + 16] == b"page%012d" % off
        assert data[PAGE : 2 * PAGE] == bytes(PAGE)
        zeros = rd.index.zero_pages[rd.regions.index(r)]
        # Odd pages and the untouched upper half are zero pages.
        assert zeros[1] == 1
        assert zeros[0] == 0
        assert zeros[(8 << 20) // PAGE :] == b"\1" * ((8 << 20) // PAGE)
        assert r.start is not None
        assert r.start % PAGE == 0


def test_already_stopped_process_stays_stopped(tmp_path: Path, child: tuple[subprocess.Popen[str], int]) -> None:
    p, _ = child
    os.kill(p.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while _state(p.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.005)
    capture_pid(p.pid, tmp_path / "s.lzs")
    assert _state(p.pid) == "T"
    os.kill(p.pid, signal.SIGCONT)
    assert _ping(p)


def test_error_during_capture_still_resumes(tmp_path: Path, child: tuple[subprocess.Popen[str], int]) -> None:
    p, _ = child
    states: list[str] = []

    def boom(n: int) -> None:
        states.append(_state(p.pid))
        raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        capture_pid(p.pid, tmp_path / "e.lzs", progress=boom)
    assert states == ["T"]  # it was stopped while being read
    assert _ping(p)
    assert list(tmp_path.iterdir()) == []


def test_process_exiting_during_capture(tmp_path: Path, child: tuple[subprocess.Popen[str], int]) -> None:
    p, _ = child

    def kill_it(n: int) -> None:
        os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.05)

    with pytest.raises(ProcessExited, match=f"process {p.pid} exited during capture"):
        capture_pid(p.pid, tmp_path / "x.lzs", progress=kill_it)
    assert list(tmp_path.iterdir()) == []


def test_no_such_process(tmp_path: Path) -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) + 1
    with pytest.raises(NoSuchProcess, match=f"no process with pid {pid}"):
        capture_pid(pid, tmp_path / "n.lzs")


def test_zombie(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while _state(p.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with pytest.raises(ProcessExited, match="already exited"):
            capture_pid(p.pid, tmp_path / "z.lzs")
    finally:
        p.wait()


def _kernel_thread() -> int | None:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[6]) & PF_KTHREAD:
                        return int(name)
            except OSError:
                continue
    return None


def test_kernel_thread(tmp_path: Path) -> None:
    pid = _kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread visible in this pid namespace")
    with pytest.raises(KernelThread, match="kernel thread"):
        capture_pid(pid, tmp_path / "k.lzs")


def test_self_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="itself"):
        capture_pid(os.getpid(), tmp_path / "me.lzs")


def test_parse_maps() -> None:
    text = (
        "55d0a000-55d0b000 rw-p 00003000 08:01 1234  /usr/bin/prog\n"
        "55d0c000-55d2d000 rw-p 00000000 00:00 0     [heap]\n"
        "7f000000-7f100000 rw-s 00000000 00:01 99    /dev/zero (deleted)\n"
        "7f200000-7f300000 r--p 00000000 08:01 1235  /usr/lib/libc.so.6\n"
        "7f400000-7f500000 rw-p 00000000 00:00 0\n"
        "7ffd0000-7ffd2000 r--p 00000000 00:00 0     [vvar]\n"
    )
    maps = parse_maps(text)
    assert [m.label for m in maps if m.capturable] == ["/usr/bin/prog", "[heap]", "[anon]"]
    assert [m.anonymous for m in maps if m.capturable] == [False, True, True]
    assert maps[0].length == 0x1000


def test_untouched_pages_are_not_read(
    tmp_path: Path, child: tuple[subprocess.Popen[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, addr = child
    read_in_region = 0
    orig = _ProcessReader.read

    def counting(self: _ProcessReader, at: int, length: int) -> bytes:
        nonlocal read_in_region
        if addr <= at < addr + (16 << 20):
            read_in_region += length
        return orig(self, at, length)

    monkeypatch.setattr(_ProcessReader, "read", counting)
    capture_pid(p.pid, tmp_path / "t.lzs")
    assert read_in_region == (4 << 20)  # the written half of the first 8 MiB, nothing else
