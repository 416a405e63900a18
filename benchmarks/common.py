"""Shared plumbing for benchmark groups: C build, images, daemons, results.

A group module (``benchmarks/<group>.py``) exposes ``NAME``, ``DESCRIPTION``
and ``run(opts: Options) -> GroupResult``; ``benchmarks/run.py`` finds it by
name, runs it and prints its table and ratios.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
C_DIR = HERE / "c"
BUILD = HERE / "build"
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
GiB = 1 << 30
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-std=gnu11"]


class BenchError(Exception):
    """A benchmark could not run or produced wrong bytes."""


# -- options and results -------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    size_mib: int = 1024
    runs: int = 5
    image: str = "random"  # random | demo
    verbose: bool = False
    workdir: Path | None = None  # scratch space (a temporary directory if None)

    @property
    def size(self) -> int:
        return self.size_mib * MiB


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float
    target: float
    #: "<=" when lower is better, ">=" when higher is better.
    op: str
    what: str
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.target if self.op == "<=" else self.value >= self.target


@dataclass(frozen=True)
class Row:
    """One absolute measurement: median and spread over the runs."""

    key: str
    label: str
    unit: str
    samples: tuple[float, ...]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class GroupResult:
    name: str
    setup: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def log(opts: Options, msg: str) -> None:
    if opts.verbose:
        print(f"  · {msg}", file=sys.stderr, flush=True)


# -- C helpers ---------------------------------------------------------------------------


def _build_one(src: Path, out: Path, extra: Sequence[str]) -> Path:
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise BenchError(f"{cc} not found: the benchmarks build their C baselines and need a C compiler")
    tmp = out.with_name(out.name + ".tmp")
    cmd = [cc, *CFLAGS, *extra, "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise BenchError(f"building {src.name} failed:\n{' '.join(cmd)}\n{r.stderr}")
    os.replace(tmp, out)
    return out


def build_c() -> dict[str, Path]:
    """Compile the C side (into benchmarks/build/, rebuilt when a source changes)."""
    BUILD.mkdir(exist_ok=True)
    return {
        "touch": _build_one(C_DIR / "touch.c", BUILD / "libtouch.so", ["-shared", "-fPIC"]),
        "handler": _build_one(C_DIR / "handler.c", BUILD / "chandler", []),
        "receiver": _build_one(C_DIR / "receiver.c", BUILD / "creceiver", ["-pthread"]),
    }


# -- images --------------------------------------------------------------------------------


def make_random_image(path: Path, size: int, lib: Path, seed: int = 1) -> None:
    """``size`` bytes of seeded pseudo-random data (generated in C): no zero pages."""
    import ctypes

    c = ctypes.CDLL(str(lib))
    c.bench_fill_random.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
    c.bench_fill_random.restype = None
    chunk = 16 * MiB
    buf = bytearray(chunk)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        done = 0
        while done < size:
            n = min(size - done, chunk)
            c.bench_fill_random(addr, n, seed * 1_000_003 + done // chunk)
            f.write(memoryview(buf)[:n])
            done += n
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_image(path: Path, size: int, kind: str, lib: Path) -> str:
    """Write the benchmark image (flushed to disk); returns a description of its contents."""
    if kind == "random":
        make_random_image(path, size, lib)
        return "pseudo-random bytes (incompressible, no zero pages)"
    if kind == "demo":
        from lazypaged.demo import make_image as demo_image

        demo_image(path, size)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return "lazypaged demo pattern (every 8th page a hole, served as a zero page)"
    raise BenchError(f"unknown image kind {kind!r}")


def warm_page_cache(path: Path) -> None:
    """Read the whole file once so it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


# -- processes -----------------------------------------------------------------------------


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening on {path}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise BenchError(f"{what} did not listen on {path} within {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path


@contextlib.contextmanager
def lazypaged_daemon(work: Path, snapshots: Path, session_toml: str, extra_toml: str = "") -> Iterator[Daemon]:
    """``lazypaged serve`` in a subprocess, with its own socket, config and log.

    ``session_toml`` is the body of the [session] table; ``extra_toml`` is
    appended as is (further tables).
    """
    sock = work / "lazypaged.sock"
    cfg = work / "lazypaged.toml"
    cfg.write_text(
        "[daemon]\n"
        f'handoff_socket = "{sock}"\n'
        f'snapshot_dirs = ["{snapshots}"]\n'
        'log_format = "json"\n'
        'log_level = "info"\n'
        "shutdown_grace = 5.0\n"
        # Each restore maps its image anew (as the C handler does), and a cold
        # run is cold: no mapping kept open between restores.
        "source_linger = 0\n"
        "\n[session]\n" + session_toml + "\n" + extra_toml
    )
    logf = work / "lazypaged.log"
    with open(logf, "wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)],
            stdout=lf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        wait_for_socket(sock, proc, "lazypaged serve")
        yield Daemon(proc, sock, logf)
    finally:
        rc = stop(proc)
        if rc not in (0, -signal.SIGTERM):
            tail = logf.read_text(errors="replace")[-3000:]
            print(f"warning: lazypaged exited with status {rc}; log tail:\n{tail}", file=sys.stderr)


@dataclass
class CHandler:
    pid: int
    socket: Path


@contextlib.contextmanager
def c_handler(binary: Path, work: Path, image: Path) -> Iterator[CHandler]:
    """The minimal C handler, listening on its own socket."""
    sock = work / "chandler.sock"
    proc = subprocess.Popen([str(binary), str(sock), str(image)])
    try:
        wait_for_socket(sock, proc, "the C handler")
        yield CHandler(proc.pid, sock)
    finally:
        stop(proc)


def cpu_ns(pid: int) -> int:
    """CPU time used so far by every thread of process ``pid`` (ns, from schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


# -- statistics --------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def collect(samples: dict[str, list[float]], key: str, value: float) -> None:
    samples.setdefault(key, []).append(value)
