"""Capturing a live process's private writable memory into a snapshot.

Theory of operation:

- Consistency: the whole thread group is stopped with SIGSTOP and we wait
  until every thread in /proc/PID/task reports state T. SIGSTOP (rather than
  ptrace) stops all threads at once, including ones created meanwhile. The
  process is always sent SIGCONT afterwards, on success, error, Ctrl-C or
  SIGTERM/SIGHUP to us, unless it was already stopped when we came.
- What is captured: mappings that are writable and private (heap, stacks,
  anonymous memory, the writable data of executables and libraries). Shared
  mappings belong to files or other processes; read-only ones can be mapped
  again from their files.
- Skipping untouched pages: /proc/PID/pagemap says per page whether it is
  present or swapped. An anonymous page that is neither was never written
  and reads as zeros, so it is not read. A file-backed page that was never
  touched holds the file's bytes, so those mappings are always read.
- Reading: /proc/PID/mem with pread, which needs ptrace-read rights (root).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType

from ..sources.raw import PAGE_SIZE
from .writer import DEFAULT_LEVEL, Progress, SnapshotWriter, WriteStats

PF_KTHREAD = 0x00200000
#: How long a process may take to stop (a thread in uninterruptible sleep delays it).
STOP_TIMEOUT = 5.0
_PRESENT, _SWAPPED = 1 << 63, 1 << 62
_SPECIAL = frozenset({"[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"})


class CaptureError(Exception):
    """The process cannot be captured."""


class NoSuchProcess(CaptureError):
    pass


class KernelThread(CaptureError):
    pass


class ProcessExited(CaptureError):
    pass


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    inode: int
    path: str

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.inode == 0

    @property
    def capturable(self) -> bool:
        return self.perms[1] == "w" and self.perms[3] == "p" and self.path not in _SPECIAL

    @property
    def label(self) -> str:
        return self.path or "[anon]"


def parse_maps(text: str) -> list[Mapping]:
    out = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        lo, hi = parts[0].split("-")
        out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], int(parts[4]), parts[5] if len(parts) > 5 else ""))
    return out


def _stat(pid: int | str, task: str = "") -> tuple[str, int]:
    """(state letter, flags) from /proc/PID[/task/TID]/stat."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return fields[0], int(fields[6])


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


class StoppedProcess:
    """Context manager: the process stays stopped inside, resumed on the way out."""

    def __init__(self, pid: int, timeout: float = STOP_TIMEOUT) -> None:
        self.pid = pid
        self.timeout = timeout
        self._resume = False
        self._old_handlers: dict[signal.Signals, signal._HANDLER] = {}

    def __enter__(self) -> StoppedProcess:
        pid = self.pid
        if pid == os.getpid():
            raise CaptureError("a process cannot capture itself")
        try:
            state, flags = _stat(pid)
        except (FileNotFoundError, ProcessLookupError):
            raise NoSuchProcess(f"no process with pid {pid}") from None
        if flags & PF_KTHREAD:
            raise KernelThread(f"pid {pid} is a kernel thread: it has no user memory to capture")
        if state in "ZX":
            raise ProcessExited(f"process {pid} has already exited (zombie)")
        self._trap_signals()
        try:
            if state not in "Tt":
                os.kill(pid, signal.SIGSTOP)
                self._resume = True
            self._wait_stopped()
        except BaseException:
            self._leave()
            raise
        return self

    def _wait_stopped(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                states = [_stat(self.pid, t)[0] for t in os.listdir(f"/proc/{self.pid}/task")]
            except (FileNotFoundError, ProcessLookupError):
                states = ["X"]
            if any(s in "ZX" for s in states) or not _alive(self.pid):
                raise ProcessExited(f"process {self.pid} exited while being stopped")
            if all(s in "Tt" for s in states):
                return
            if time.monotonic() > deadline:
                raise CaptureError(f"process {self.pid} did not stop within {self.timeout:g} s (states {states})")
            time.sleep(0.001)

    def _trap_signals(self) -> None:
        """Turn SIGTERM/SIGHUP into an exception while the target is stopped, so it is resumed."""

        def raise_exit(signum: int, _frame: FrameType | None) -> None:
            raise CaptureError(f"interrupted by signal {signal.Signals(signum).name}")

        try:
            for s in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[s] = signal.signal(s, raise_exit)
        except ValueError:  # not the main thread: nothing to trap
            pass

    def _leave(self) -> None:
        if self._resume:
            self._resume = False
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._leave()


def _region_names(maps: list[Mapping]) -> list[str]:
    """Regions are named after their mappings; repeated names get the address."""
    counts: dict[str, int] = {}
    for m in maps:
        counts[m.label] = counts.get(m.label, 0) + 1
    return [m.label if counts[m.label] == 1 else f"{m.label}@{m.start:#x}" for m in maps]


class _ProcessReader:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.mem)
            raise

    def close(self) -> None:
        os.close(self.mem)
        os.close(self.pagemap)

    def _gone_or(self, what: str) -> CaptureError:
        if not _alive(self.pid):
            return ProcessExited(f"process {self.pid} exited during capture")
        return CaptureError(what)

    def touched(self, addr: int, pages: int) -> bytes:
        """One byte per page: 1 if present or swapped (ever written)."""
        want = pages * 8
        try:
            raw = os.pread(self.pagemap, want, addr // PAGE_SIZE * 8)
        except OSError as e:
            raise self._gone_or(f"reading pagemap at {addr:#x}: {e.strerror}") from None
        if len(raw) != want:
            raise self._gone_or(f"short pagemap read at {addr:#x}")
        return bytes(bool(v & (_PRESENT | _SWAPPED)) for (v,) in struct.iter_unpack("<Q", raw))

    def read(self, addr: int, length: int) -> bytes:
        try:
            data = os.pread(self.mem, length, addr)
        except OSError as e:
            raise self._gone_or(f"reading memory at {addr:#x}+{length:#x}: {e.strerror}") from None
        if len(data) != length:
            raise self._gone_or(f"short read of memory at {addr:#x} ({len(data)} of {length} bytes)")
        return data

    def chunks(self, m: Mapping, chunk_size: int) -> Iterator[bytes | None]:
        for addr in range(m.start, m.end, chunk_size):
            n = min(chunk_size, m.end - addr)
            if not m.anonymous:
                yield self.read(addr, n)
                continue
            flags = self.touched(addr, n // PAGE_SIZE)
            if not any(flags):
                yield None
            elif all(flags):
                yield self.read(addr, n)
            else:
                buf = bytearray(n)
                p = flags.find(1)
                while p >= 0:
                    q = flags.find(0, p)
                    q = len(flags) if q < 0 else q
                    buf[p * PAGE_SIZE : q * PAGE_SIZE] = self.read(addr + p * PAGE_SIZE, (q - p) * PAGE_SIZE)
                    p = flags.find(1, q)
                yield bytes(buf)


def capture_pid(
    pid: int,
    out: str | os.PathLike[str],
    *,
    chunk_size: int | None = None,
    level: int = DEFAULT_LEVEL,
    raw: bool = False,
    progress: Progress | None = None,
    on_stopped: Callable[[list[Mapping]], None] | None = None,
) -> WriteStats:
    """Snapshot process ``pid``'s private writable mappings, one region each.

    ``on_stopped`` sees the mappings once the process is stopped (progress
    bars size themselves with it)."""
    with StoppedProcess(pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = [m for m in parse_maps(f.read()) if m.capturable]
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessExited(f"process {pid} exited during capture") from None
        if not maps:
            raise ProcessExited(f"process {pid} has no memory mappings (exited?)")
        if on_stopped:
            on_stopped(maps)
        rd = _ProcessReader(pid)
        try:
            with SnapshotWriter(out, chunk_size=chunk_size, level=level, raw=raw, progress=progress) as w:
                for m, name in zip(maps, _region_names(maps), strict=True):
                    w.add_region(name, m.length, rd.chunks(m, w.chunk_size), start=m.start)
                return w.finish()
        finally:
            rd.close()
