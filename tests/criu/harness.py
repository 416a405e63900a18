"""Driving the real CRIU: the test program, dumps, restores, lazy-pages daemons.

Facts this relies on (see docs/criu.md): a task dumped with ``--lazy-pages``
stays frozen until its pages are sent, so restoring on the same machine
would collide on its pid; the test program therefore runs as pid 1 of its
own pid namespace (``unshare -p -f setsid prog``). It inherits no descriptor
but stdin (/dev/null) and stdout/stderr (a file opened for appending), which
CRIU reopens by path on restore. Remote runs put the dump's page server in
one network namespace and the restore in another, joined by a veth pair.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROGRAM_SRC = HERE / "heapprog.c"
INSTALL = REPO / "scripts" / "install-criu.sh"
DEFAULT_CRIU = Path("/var/cache/lazypaged-criu/bin/criu")
#: CRIU's page server cannot grow its pipes without CAP_SYS_RESOURCE.
PIPE_MAX_NEEDED = 4 << 20
LINE = re.compile(r"pass=(\d+) sum=([0-9a-f]{16}) bad=(\d+)(.*)")


class CriuUnavailable(Exception):
    pass


def find_criu() -> Path:
    """The criu 4.1 wrapper (installing it into its private prefix if needed)."""
    env = os.environ.get("LAZYPAGED_CRIU")
    if env:
        return Path(env)
    if not DEFAULT_CRIU.exists():
        r = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=600, check=False)
        if r.returncode:
            raise CriuUnavailable(f"scripts/install-criu.sh failed (status {r.returncode}): {r.stderr[-800:]}")
    r = subprocess.run([str(DEFAULT_CRIU), "check"], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode:
        raise CriuUnavailable(f"`criu check` fails on this kernel: {(r.stdout + r.stderr)[-800:]}")
    return DEFAULT_CRIU


def build_program(out_dir: Path) -> Path:
    out = out_dir / "heapprog"
    cc = os.environ.get("CC", "gcc")
    r = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(out), str(PROGRAM_SRC)], capture_output=True, text=True, check=False
    )
    if r.returncode:
        raise RuntimeError(f"building heapprog failed:\n{r.stderr}")
    return out


@dataclass(frozen=True)
class Line:
    passno: int
    sum: str
    bad: int
    extra: dict[str, str]
    at: float  # when the reader saw it (monotonic)


def netns_prefix(netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


@dataclass
class Program:
    """The test program, as pid 1 of its own pid namespace."""

    out: Path
    unshare: subprocess.Popen[bytes]
    pid: int  # host pid of the namespace's init (the program)
    mode: str
    size_mib: int
    expected: str = ""
    _pos: int = 0
    lines: list[Line] = field(default_factory=list)

    def read_lines(self) -> list[Line]:
        """New complete lines appended to the output since the last call."""
        with open(self.out, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self._pos += cut
        now = time.monotonic()
        new = []
        for raw in data[:cut].decode(errors="replace").splitlines():
            m = LINE.match(raw)
            if m:
                extra = dict(kv.split("=", 1) for kv in m.group(4).split() if "=" in kv)
                new.append(Line(int(m.group(1)), m.group(2), int(m.group(3)), extra, now))
        self.lines += new
        return new

    def mark(self) -> None:
        """Forget output so far: later reads see only what comes after."""
        self.read_lines()

    def wait_lines(self, n: int, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> list[Line]:
        got: list[Line] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            got += self.read_lines()
            if len(got) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {n} checksum lines within {timeout} s; output tail:\n{self.tail()}")
            if alive is not None and alive.poll() is not None and not self.read_lines():
                raise RuntimeError(f"criu restore exited with {alive.returncode} before {n} lines:\n{self.tail()}")
            time.sleep(0.01)
        return got

    def tail(self) -> str:
        return self.out.read_bytes()[-2000:].decode(errors="replace")


def start_program(
    prog: Path, out: Path, size_mib: int, mode: str, interval_ms: int = 100, netns: str | None = None
) -> Program:
    outf = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        p = subprocess.Popen(
            [*netns_prefix(netns), "unshare", "-p", "-f", "setsid", str(prog), str(size_mib), mode, str(interval_ms)],
            stdin=subprocess.DEVNULL,
            stdout=outf,
            stderr=outf,
            close_fds=True,
        )
    finally:
        os.close(outf)
    deadline = time.monotonic() + 10
    init = 0
    while not init:
        with contextlib.suppress(OSError, ValueError):
            init = _ns_init(p.pid)
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError("the test program's pid namespace did not come up")
        time.sleep(0.01)
    program = Program(out, p, init, mode, size_mib)
    first = program.wait_lines(1, 60)[0]
    if first.bad:
        raise RuntimeError(f"the test program sees {first.bad} bad words before any dump")
    program.expected = first.sum
    return program


def _ns_init(pid: int) -> int:
    """The child of ``pid`` (unshare -f forks the namespace's init); through nsenter if need be."""
    for _ in range(3):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not kids:
            return 0
        pid = int(kids[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm == "heapprog":
            return pid
    return 0


def kill_pid(pid: int) -> None:
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def stop_program(p: Program) -> None:
    kill_pid(p.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.unshare.wait(timeout=10)
    if p.unshare.poll() is None:
        p.unshare.kill()
        p.unshare.wait()


def dump(
    criu: Path,
    pid: int,
    images: Path,
    *,
    lazy_address: str | None = None,
    lazy_port: int = 0,
    netns: str | None = None,
    verbosity: str = "-v4",
) -> subprocess.Popen[bytes]:
    """``criu dump``; with an address, a lazy dump that serves pages until CLOSE."""
    images.mkdir(parents=True, exist_ok=True)
    cmd = [*netns_prefix(netns), str(criu), "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", verbosity]
    if lazy_address:
        cmd += ["--lazy-pages", "--address", lazy_address, "--port", str(lazy_port)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_dump(proc: subprocess.Popen[bytes], images: Path, timeout: float = 60) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode:
        raise RuntimeError(
            f"criu dump exited with {proc.returncode}: {err.decode()[-500:]}\n{log_tail(images / 'dump.log')}"
        )


def wait_page_server(images: Path, dump_proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until the lazy dump's page server listens."""
    deadline = time.monotonic() + timeout
    log = images / "dump.log"
    while time.monotonic() < deadline:
        if dump_proc.poll() is not None:
            raise RuntimeError(f"criu dump exited with {dump_proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(OSError):
            if "Starting page server" in log.read_text(errors="replace"):
                time.sleep(0.1)  # it prints before listen(); give it a moment
                return
        time.sleep(0.02)
    raise TimeoutError(f"no page server within {timeout} s:\n{log_tail(log)}")


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError as e:
        return f"({path}: {e.strerror})"


@dataclass
class LazyDaemon:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"the lazy-pages daemon did not exit within {timeout} s:\n{log_tail(self.log)}"
            ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_lazy_daemon(
    kind: str,
    criu: Path,
    images: Path,
    *,
    address: str | None = None,
    port: int = 0,
    netns: str | None = None,
    extra: list[str] | None = None,
    verbosity: str = "-v4",
) -> LazyDaemon:
    """``lazypaged criu-lazy-pages`` or ``criu lazy-pages`` with the same arguments, until ready.

    Tests log everything (``-v4``); benchmarks pass CRIU's default level, as
    per-page debug lines would slow the daemon they measure.
    """
    if kind == "lazypaged":
        cmd = [sys.executable, "-m", "lazypaged", "criu-lazy-pages"]
        logname = "lazypaged.log"
    else:
        cmd = [str(criu), "lazy-pages"]
        logname = "criu-lazy.log"
    r, w = os.pipe()
    cmd += ["-D", str(images), "-o", logname, verbosity, "--status-fd", str(w)]
    if address:
        cmd += ["--page-server", "--address", address, "--port", str(port)]
    cmd += extra or []
    try:
        proc = subprocess.Popen(
            [*netns_prefix(netns), *cmd],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(w)
    try:
        ready = os.read(r, 1)
    finally:
        os.close(r)
    if ready != b"\0":
        proc.wait()
        raise RuntimeError(f"{kind} lazy-pages daemon exited with {proc.returncode}:\n{log_tail(images / logname)}")
    return LazyDaemon(proc, images / logname, time.monotonic())


@dataclass
class Restore:
    proc: subprocess.Popen[bytes]
    pidfile: Path
    started: float

    def pid(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(self.pidfile.read_text())
            time.sleep(0.01)
        raise TimeoutError("criu restore wrote no pidfile")

    def kill(self) -> None:
        with contextlib.suppress(TimeoutError):
            kill_pid(self.pid(timeout=0.5))
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def restore(
    criu: Path, images: Path, *, lazy: bool = True, netns: str | None = None, verbosity: str = "-v4"
) -> Restore:
    pidfile = images / "restored.pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    cmd = [
        *netns_prefix(netns),
        str(criu),
        "restore",
        "-D",
        str(images),
        "-o",
        "restore.log",
        verbosity,
        "--pidfile",
        str(pidfile),
    ]
    if lazy:
        cmd.append("--lazy-pages")
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Restore(proc, pidfile, t)


def copy_images(src: Path, dst: Path) -> Path:
    """What a migration ships to the destination: the images, without logs."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.log", "lazy-pages.socket"))
    return dst


# -- namespaces and sysctls -------------------------------------------------------------------


@dataclass(frozen=True)
class NetnsPair:
    source: str
    dest: str
    source_addr: str
    dest_addr: str


@contextlib.contextmanager
def netns_pair(tag: str) -> Iterator[NetnsPair]:
    """Two network namespaces joined by a veth pair, removed on exit."""
    a, b = f"lpc{tag}s", f"lpc{tag}d"
    pair = NetnsPair(a, b, "10.213.7.1", "10.213.7.2")
    created: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    try:
        for ns in (a, b):
            ip("netns", "add", ns)
            created.append(ns)
        ip("link", "add", f"{a}v", "netns", a, "type", "veth", "peer", "name", f"{b}v", "netns", b)
        ip("-n", a, "addr", "add", f"{pair.source_addr}/24", "dev", f"{a}v")
        ip("-n", b, "addr", "add", f"{pair.dest_addr}/24", "dev", f"{b}v")
        for ns in (a, b):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", a, "link", "set", f"{a}v", "up")
        ip("-n", b, "link", "set", f"{b}v", "up")
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


_PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")
#: Holds the value to put back; every user of :func:`pipe_max_size` keeps a
#: shared lock on it while inside. Updates happen under an exclusive lock on
#: the ".update" file, so they never wait for another user's whole run.
_PIPE_MAX_LOCK = Path("/tmp/lazypaged-criu-pipe-max-size.lock")


@contextlib.contextmanager
def pipe_max_size(at_least: int = PIPE_MAX_NEEDED) -> Iterator[None]:
    """Raise fs.pipe-max-size while inside; the last user to leave puts the
    original value back, so concurrent runs on one machine do not lower it
    under each other's dumps."""
    import fcntl

    upd = os.open(f"{_PIPE_MAX_LOCK}.update", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fd = os.open(_PIPE_MAX_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(upd, fcntl.LOCK_EX)
        try:
            if not os.pread(fd, 64, 0).strip():
                os.pwrite(fd, f"{int(_PIPE_MAX.read_text())}\n".encode(), 0)
            if int(_PIPE_MAX.read_text()) < at_least:
                _PIPE_MAX.write_text(str(at_least))
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            fcntl.flock(upd, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(upd, fcntl.LOCK_EX)
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # others still need it raised; the last one puts it back
                else:
                    original = os.pread(fd, 64, 0).strip()
                    if original:
                        _PIPE_MAX.write_text(original.decode())
                    os.ftruncate(fd, 0)
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                fcntl.flock(upd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        os.close(upd)
