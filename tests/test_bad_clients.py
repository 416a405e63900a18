"""Misbehaving handoff clients against a real daemon.

Every bad client must get a precise error reply (or a clean close when it
can no longer read one), leave one ``handoff_refused`` line with the matching
code in the daemon's log, and leave the daemon serving: after each case a
real target process restores through the same daemon and checks every byte.
The daemon must not leak a file descriptor on any of these paths.

The bad clients run in the test process itself. Their ranges live in this
process's memory and are never touched here, so a daemon that wrongly
accepted one would only ever fill pages nobody reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from lazypaged import handoff_protocol as hp
from lazypaged.client import Handoff, map_anonymous
from lazypaged.handoff_server import MAX_PENDING_PER_UID, _open_target
from lazypaged.received_uffd import Refused
from lazypaged.uffd import Userfaultfd, abi
from lazypaged.unixsock import PeerCred

from .conftest import DaemonHandle, MiB, finish, kill, start_daemon, stop_daemon

PAGE = mmap.PAGESIZE
#: The image good restores use, and the one bad requests name.
SIZE = 4 * MiB
#: The shared daemon's request_timeout: short, so idle clients cost little.
REQUEST_TIMEOUT = 0.5
#: 1 MiB: above mmap_min_addr, far below where the executable, the heap and
#: the kernel's own mmap placements go, so nothing is ever mapped there.
NEVER_MAPPED = 0x100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


# -- the daemon ---------------------------------------------------------------


@contextlib.contextmanager
def running_daemon(tmp: Path, extra_config: str = "") -> Iterator[DaemonHandle]:
    """A daemon for the block; on exit it must stop cleanly with a clean log."""
    if os.geteuid() != 0:
        pytest.skip("these tests hand kernel-mode faults to a uffd: run as root")
    d = start_daemon(tmp, extra_config=extra_config)
    try:
        yield d
    finally:
        rc = stop_daemon(d)
        lines = d.log_lines()
        bugs = [ln for ln in lines if str(ln.get("event", "")).endswith("_bug")]
        unparsed = [ln for ln in lines if "unparsed" in ln]
        assert not bugs, f"daemon hit a bug: {bugs}"
        assert not unparsed, f"daemon wrote non-JSON lines (a traceback?): {unparsed[:20]}"
        assert rc == 0, f"daemon exited with {rc}; log:\n{d.log.read_text()[-4000:]}"


def _snapshot_fixtures(d: DaemonHandle) -> None:
    """Images and traps around the snapshot dir that the cases name."""
    d.image("img", SIZE)
    outside = d.snapshots.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.img").write_bytes(b"s" * (4 * PAGE))
    (d.snapshots / "escape.img").symlink_to(outside / "secret.img")
    (d.snapshots / "outdir").symlink_to(outside)
    (d.snapshots / "alias.img").symlink_to("img")
    (d.snapshots / "odd.img").write_bytes(b"o" * (PAGE + 7))
    (d.snapshots / "dir.img").mkdir()
    os.mkfifo(d.snapshots / "fifo.img")
    (d.snapshots / "empty.img").touch()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """One daemon for the whole file: it must outlive every bad client."""
    # source_linger = 0: every descriptor a case opened must be gone after it.
    extra = f"request_timeout = {REQUEST_TIMEOUT}\nsource_linger = 0"
    with running_daemon(tmp_path_factory.mktemp("bad"), extra) as d:
        _snapshot_fixtures(d)
        yield d
    assert not d.alive()


def good_restore(d: DaemonHandle) -> None:
    """A real target restores every byte through ``d`` (faults, no fill)."""
    rc, lines, err = finish(d.target("img", SIZE, "--touch", "random", "--no-fill"), timeout=60)
    assert rc == 0, (lines, err)
    assert lines[-1]["ok"] is True, lines


class LogMark:
    """Log lines written since construction."""

    def __init__(self, d: DaemonHandle) -> None:
        self.d = d
        self.start = len(d.log_lines())

    def lines(self) -> list[dict[str, Any]]:
        return self.d.log_lines()[self.start :]

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.lines() if pred(ln)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching log line; new lines: {self.lines()[-30:]}")
            time.sleep(0.02)

    def refusals(self) -> list[dict[str, Any]]:
        return [ln for ln in self.lines() if ln.get("event") == "handoff_refused"]


def fd_count(d: DaemonHandle) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def fd_table(d: DaemonHandle) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{d.proc.pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(f"{name} -> {os.readlink(f'/proc/{d.proc.pid}/fd/{name}')}")
    return sorted(out)


@pytest.fixture(scope="module")
def fd_baseline(shared: DaemonHandle) -> list[str]:
    """The idle daemon's open descriptors, after one restore opened anything lazy."""
    good_restore(shared)
    samples = [fd_count(shared)]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(samples) < 4 or len(set(samples[-4:])) > 1):
        time.sleep(0.05)  # until the count has stopped changing
        samples.append(fd_count(shared))
    return fd_table(shared)


def assert_fds_back_to(d: DaemonHandle, baseline: list[str]) -> None:
    """Every descriptor a client cost the daemon is closed again (soon)."""
    deadline = time.monotonic() + 5
    while fd_count(d) > len(baseline) and time.monotonic() < deadline:
        time.sleep(0.02)
    now = fd_table(d)
    assert len(now) <= len(baseline), f"daemon fds leaked: {sorted(set(now) - set(baseline))}"


# -- talking to the daemon by hand ----------------------------------------------------


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(m: object) -> bytes:
    return frame(msgpack.packb(m, use_bin_type=True))


def read_reply(s: socket.socket) -> hp.Message | None:
    """The daemon's first message, or None if it closed without one."""
    decoder = hp.FrameDecoder()
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return None
        if not data:
            return None
        msgs = decoder.feed(data)
        if msgs:
            return msgs[0]


def connect(d: DaemonHandle, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(str(d.socket))
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class Ctx:
    """What a case needs; everything it opens is closed with ``stack``."""

    d: DaemonHandle
    stack: contextlib.ExitStack

    def mapping(self, npages: int = 4) -> int:
        """Fresh private anonymous memory in this process; its address."""
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        addr = _libc.mmap(None, npages * PAGE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        self.stack.callback(_libc.munmap, addr, npages * PAGE)
        return int(addr)

    def uffd(self, features: int = 0, *, api: bool = True, nonblocking: bool = True) -> Userfaultfd:
        u = Userfaultfd.create(nonblocking=nonblocking)
        self.stack.callback(u.close)
        if api:
            u.api(features)
        return u

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.stack.callback(os.close, r)
        self.stack.callback(os.close, w)
        return r, w

    def image_fd(self) -> int:
        fd = os.open(self.d.images["img"], os.O_RDONLY | os.O_CLOEXEC)
        self.stack.callback(os.close, fd)
        return fd

    def ranges(self, npages: int = 4, source: str = "img", offset: int = 0) -> list[dict[str, Any]]:
        return [{"start": self.mapping(npages), "length": npages * PAGE, "source": source, "offset": offset}]

    def request(self, ranges: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
        m: dict[str, Any] = {"v": hp.VERSION, "type": "restore", "ranges": ranges or self.ranges()}
        m.update(fields)
        return m

    def send(
        self, payload: bytes, fds: list[int] | None = None, *, eof: bool = False, hang_up: bool = False
    ) -> hp.Message | None:
        """Send ``payload`` (fds on its first byte) and read the reply.

        ``eof`` half-closes after sending, ``hang_up`` closes without reading.
        """
        s = self.stack.enter_context(connect(self.d))
        if fds:
            socket.send_fds(s, [payload[:1]], fds)
            payload = payload[1:]
        if payload:
            # A daemon that refuses early may close before it has it all.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(payload)
        if hang_up:
            s.close()
            return None
        if eof:
            s.shutdown(socket.SHUT_WR)
        return read_reply(s)

    def send_request(self, m: dict[str, Any], features: int = 0) -> hp.Message | None:
        """A request with a real, negotiated uffd attached."""
        return self.send(packed(m), [self.uffd(features).fileno()])


# -- the cases -------------------------------------------------------------------------


CaseFn = Callable[["Ctx"], hp.Message | None]


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    run: CaseFn
    #: False when the client cannot read a reply (it hung up first).
    replies: bool = True
    #: Safe to run from many threads at once (no address-space tricks).
    concurrent: bool = True


CASES: list[Case] = []


def case(code: str, *, replies: bool = True, concurrent: bool = True) -> Callable[[CaseFn], CaseFn]:
    """Register a bad client that must be refused with ``code``."""

    def add(fn: CaseFn) -> CaseFn:
        CASES.append(Case(fn.__name__, code, fn, replies, concurrent))
        return fn

    return add


@case("too_large")
def garbage_text(c: Ctx) -> hp.Message | None:
    # What a curl or a JSON client would send: read as a length, it is huge.
    return c.send(b"GET /restore HTTP/1.1\r\nHost: lazypaged\r\n\r\n")


@case("malformed")
def garbage_zero_length(c: Ctx) -> hp.Message | None:
    return c.send(b"\0\0\0\0" + os.urandom(64))


@case("malformed")
def frame_of_non_msgpack(c: Ctx) -> hp.Message | None:
    return c.send(frame(b"\xc1\xc1 not msgpack at all"))


@case("malformed")
def msgpack_not_a_map(c: Ctx) -> hp.Message | None:
    return c.send(packed([1, "restore", {"v": 1}]))


@case("malformed")
def msgpack_with_trailing_bytes(c: Ctx) -> hp.Message | None:
    return c.send(frame(msgpack.packb(c.request()) + b"\x00"), [c.uffd().fileno()])


@case("malformed")
def msgpack_nested_too_deep(c: Ctx) -> hp.Message | None:
    return c.send(frame(b"\x91" * 200_000 + b"\xc0"))


@case("malformed")
def msgpack_array_claims_4g_items(c: Ctx) -> hp.Message | None:
    return c.send(frame(b"\xdd\xff\xff\xff\xff"))


@case("version")
def wrong_protocol_version(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(v=hp.VERSION + 1))


@case("version")
def missing_protocol_version(c: Ctx) -> hp.Message | None:
    m = c.request()
    del m["v"]
    return c.send_request(m)


@case("malformed")
def not_a_request(c: Ctx) -> hp.Message | None:
    return c.send(packed({"v": hp.VERSION, "type": "accepted", "session": "0"}), [c.uffd().fileno()])


@case("malformed")
def unknown_message_type(c: Ctx) -> hp.Message | None:
    return c.send(packed({"v": hp.VERSION, "type": "dance"}))


@case("malformed")
def ranges_not_a_list(c: Ctx) -> hp.Message | None:
    m = c.request()
    m["ranges"] = "all of them"
    return c.send_request(m)


@case("malformed")
def empty_source_name(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="")))


@case("too_many_ranges")
def too_many_ranges(c: Ctx) -> hp.Message | None:
    base = c.mapping(1)
    r = {"start": base, "length": PAGE, "source": "img", "offset": 0}
    return c.send_request(c.request([r] * (hp.MAX_RANGES + 1)))


@case("malformed")
def two_requests_at_once(c: Ctx) -> hp.Message | None:
    one = packed(c.request())
    return c.send(one + one, [c.uffd().fileno()])


@case("no_fd")
def no_fd_attached(c: Ctx) -> hp.Message | None:
    return c.send(packed(c.request()))


@case("too_many_fds")
def two_fds_attached(c: Ctx) -> hp.Message | None:
    return c.send(packed(c.request()), [c.uffd().fileno(), c.uffd().fileno()])


@case("malformed")
def six_fds_attached(c: Ctx) -> hp.Message | None:
    # More than the daemon's ancillary buffer holds: the kernel truncates.
    fds = [c.uffd().fileno(), *c.pipe(), *c.pipe(), c.pipe()[0]]
    return c.send(packed(c.request()), fds)


@case("bad_fd")
def pipe_instead_of_uffd(c: Ctx) -> hp.Message | None:
    return c.send(packed(c.request()), [c.pipe()[0]])


@case("bad_fd")
def snapshot_file_instead_of_uffd(c: Ctx) -> hp.Message | None:
    return c.send(packed(c.request()), [c.image_fd()])


@case("register_failed")
def uffd_without_api_handshake(c: Ctx) -> hp.Message | None:
    return c.send(packed(c.request()), [c.uffd(api=False).fileno()])


@case("unsupported_feature")
def sigbus_negotiated(c: Ctx) -> hp.Message | None:
    # Missing pages would raise SIGBUS in the target instead of reaching us.
    sigbus = abi.UFFD_FEATURE_SIGBUS
    return c.send_request(c.request(features=sigbus), sigbus)


@case("unsupported_feature")
def sigbus_negotiated_but_not_declared(c: Ctx) -> hp.Message | None:
    # The request claims no features; the uffd itself says otherwise.
    return c.send_request(c.request(features=0), abi.UFFD_FEATURE_SIGBUS)


@case("register_failed")
def range_not_mapped(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request([{"start": NEVER_MAPPED, "length": 4 * PAGE, "source": "img"}]))


@case("register_failed", concurrent=False)
def second_range_not_mapped(c: Ctx) -> hp.Message | None:
    # Two ranges; the lower one registers, the upper one is a hole.
    base = c.mapping(8)
    _libc.munmap(base + 4 * PAGE, 4 * PAGE)
    ranges = [
        {"start": base, "length": 4 * PAGE, "source": "img", "offset": 0},
        {"start": base + 4 * PAGE, "length": 4 * PAGE, "source": "img", "offset": 4 * PAGE},
    ]
    reply = c.send_request(c.request(ranges))
    # The daemon registered the lower range before failing on the upper one:
    # it must have undone that (another uffd gets EBUSY if it did not).
    c.uffd().register(base, 4 * PAGE)
    return reply


@case("register_failed")
def range_over_regular_file_mapping(c: Ctx) -> hp.Message | None:
    mem = mmap.mmap(c.image_fd(), 4 * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    c.stack.callback(mem.close)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    return c.send_request(c.request([{"start": addr, "length": 4 * PAGE, "source": "img"}]))


@case("register_failed")
def range_over_read_only_shared_memory(c: Ctx) -> hp.Message | None:
    # Shared memory opened read-only: a uffd may not install pages there.
    # (Read-only *private* memory registers fine; see the test below.)
    rw = os.memfd_create("lazypaged-test")
    c.stack.callback(os.close, rw)
    os.ftruncate(rw, 4 * PAGE)
    ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
    c.stack.callback(os.close, ro)
    addr = _libc.mmap(None, 4 * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, ro, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    c.stack.callback(_libc.munmap, addr, 4 * PAGE)
    return c.send_request(c.request([{"start": addr, "length": 4 * PAGE, "source": "img"}]))


@case("register_failed")
def range_registered_by_another_uffd(c: Ctx) -> hp.Message | None:
    ranges = c.ranges()
    c.uffd().register(ranges[0]["start"], ranges[0]["length"])
    return c.send_request(c.request(ranges))


@case("register_failed", concurrent=False)
def range_with_a_hole_in_the_middle(c: Ctx) -> hp.Message | None:
    # UFFDIO_REGISTER succeeds across a hole; pages mapped there later would
    # be ordinary zero memory. The request must be refused, not half served.
    base = c.mapping(12)
    _libc.munmap(base + 4 * PAGE, 4 * PAGE)
    reply = c.send_request(c.request([{"start": base, "length": 12 * PAGE, "source": "img"}]))
    c.uffd().register(base, 4 * PAGE)  # undone: another uffd may take it
    return reply


@case("not_registered")
def registered_claimed_but_not_registered(c: Ctx) -> hp.Message | None:
    # Believed, this served nothing: the pages were ordinary memory and read zeros.
    return c.send_request(c.request(registered=True))


@case("not_registered")
def registered_claimed_for_another_uffd(c: Ctx) -> hp.Message | None:
    ranges = c.ranges()
    c.uffd().register(ranges[0]["start"], ranges[0]["length"])
    return c.send_request(c.request(ranges, registered=True))


@case("not_registered")
def registered_claimed_but_only_half_is(c: Ctx) -> hp.Message | None:
    ranges = c.ranges(npages=8)
    u = c.uffd()
    u.register(ranges[0]["start"], 4 * PAGE)
    return c.send(packed(c.request(ranges, registered=True)), [u.fileno()])


@case("not_registered")
def registered_claimed_in_write_protect_mode_only(c: Ctx) -> hp.Message | None:
    # Registered with this uffd, but not for missing pages: no fault would reach the daemon.
    ranges = c.ranges()
    u = c.uffd(abi.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    u.register(ranges[0]["start"], ranges[0]["length"], abi.UFFDIO_REGISTER_MODE_WP)
    return c.send(packed(c.request(ranges, registered=True, features=abi.UFFD_FEATURE_PAGEFAULT_FLAG_WP)),
                  [u.fileno()])


@case("bad_range")
def huge_page_size_on_ordinary_memory(c: Ctx) -> hp.Message | None:
    # 2 MiB pages declared over 4 KiB anonymous memory: the daemon would copy
    # 2 MiB per fault into memory whose page tables are not huge.
    huge = 2 * MiB
    raw = c.mapping(2 * huge // PAGE)
    start = (raw + huge - 1) & ~(huge - 1)
    return c.send_request(c.request([{"start": start, "length": huge, "source": "img", "page_size": huge}]))


@case("unknown_source")
def snapshot_name_with_a_trailing_slash(c: Ctx) -> hp.Message | None:
    # "img/" names a directory; the file "img" is not one.
    return c.send_request(c.request(c.ranges(source="img/")))


@case("unknown_source")
def snapshot_name_ending_in_a_dot(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="img/.")))


@case("overlap")
def overlapping_ranges(c: Ctx) -> hp.Message | None:
    base = c.mapping(8)
    ranges = [
        {"start": base + 2 * PAGE, "length": 4 * PAGE, "source": "img"},
        {"start": base, "length": 4 * PAGE, "source": "img"},
    ]
    return c.send_request(c.request(ranges))


@case("bad_range")
def unaligned_start(c: Ctx) -> hp.Message | None:
    r = c.ranges()
    r[0]["start"] += 16
    r[0]["length"] -= PAGE
    return c.send_request(c.request(r))


@case("bad_range")
def unaligned_length(c: Ctx) -> hp.Message | None:
    r = c.ranges()
    r[0]["length"] -= 100
    return c.send_request(c.request(r))


@case("bad_range")
def unaligned_offset(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(offset=512)))


@case("bad_range")
def range_past_end_of_snapshot(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(offset=SIZE - 2 * PAGE)))


@case("bad_range")
def range_in_empty_snapshot(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="empty.img")))


@case("unknown_source")
def unknown_snapshot(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="no-such.img")))


@case("unknown_source")
def snapshot_is_a_directory(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="dir.img")))


@case("unknown_source")
def snapshot_is_a_fifo(c: Ctx) -> hp.Message | None:
    # Opening a FIFO would block the daemon until a writer shows up.
    return c.send_request(c.request(c.ranges(source="fifo.img")))


@case("unknown_source")
def snapshot_name_too_long(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="x" * 300)))


@case("unknown_source")
def snapshot_path_too_long(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="d/" * 2000 + "x")))


@case("source_error")
def snapshot_size_not_page_multiple(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(npages=1, source="odd.img")))


@case("forbidden_source")
def absolute_snapshot_path(c: Ctx) -> hp.Message | None:
    # Even an absolute path to a real snapshot inside the directory.
    return c.send_request(c.request(c.ranges(source=str(c.d.images["img"]))))


@case("forbidden_source")
def dotdot_snapshot_name(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="../outside/secret.img")))


@case("forbidden_source")
def dotdot_in_the_middle(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="outdir/../../outside/secret.img")))


@case("forbidden_source")
def symlink_pointing_outside(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="escape.img")))


@case("forbidden_source")
def symlinked_directory_pointing_outside(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(c.ranges(source="outdir/secret.img")))


@case("malformed")
def pid_too_large_for_pid_t(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(pid=1 << 62))


@case("malformed")
def negative_pid(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(pid=-1))


@case("bad_pid")
def pid_that_cannot_exist(c: Ctx) -> hp.Message | None:
    return c.send_request(c.request(pid=(1 << 22) + 1))  # above PID_MAX_LIMIT


@case("bad_pid")
def pid_of_an_exited_process(c: Ctx) -> hp.Message | None:
    # A zombie: the pid is still taken, the process is gone.
    p = subprocess.Popen(["true"])
    c.stack.callback(p.wait)
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    return c.send_request(c.request(pid=p.pid))


@case("too_large")
def oversize_frame_header(c: Ctx) -> hp.Message | None:
    # Only the header: a daemon that waited for 2 GiB of body would answer
    # "timeout" after request_timeout instead.
    return c.send(struct.pack(">I", 1 << 31))


@case("too_large")
def frame_one_byte_over_the_limit(c: Ctx) -> hp.Message | None:
    return c.send(struct.pack(">I", hp.MAX_FRAME + 1) + b"\x80")


@case("timeout")
def connects_and_sends_nothing(c: Ctx) -> hp.Message | None:
    s = c.stack.enter_context(connect(c.d))
    t0 = time.monotonic()
    reply = read_reply(s)
    waited = time.monotonic() - t0
    assert REQUEST_TIMEOUT * 0.8 < waited < REQUEST_TIMEOUT + 3, waited
    return reply


@case("timeout")
def stalls_after_half_a_frame(c: Ctx) -> hp.Message | None:
    whole = packed(c.request())
    return c.send(whole[: len(whole) // 2], [c.uffd().fileno()])


@case("malformed")
def half_a_frame_then_eof(c: Ctx) -> hp.Message | None:
    whole = packed(c.request())
    return c.send(whole[: len(whole) // 2], [c.uffd().fileno()], eof=True)


@case("malformed")
def half_a_header_then_eof(c: Ctx) -> hp.Message | None:
    return c.send(b"\0\0", eof=True)


@case("malformed", replies=False)
def half_a_frame_with_fd_then_hang_up(c: Ctx) -> hp.Message | None:
    whole = packed(c.request())
    return c.send(whole[: len(whole) // 2], [c.uffd().fileno()], hang_up=True)


CASE_IDS = [c.name for c in CASES]


def run_case(d: DaemonHandle, cs: Case) -> dict[str, Any]:
    """Run one bad client; check its reply; return its refusal log line."""
    mark = LogMark(d)
    with contextlib.ExitStack() as stack:
        reply = cs.run(Ctx(d, stack))
    if cs.replies:
        assert isinstance(reply, hp.Error), reply
        assert reply.code == cs.code, reply
        assert reply.message
    else:
        assert reply is None
    line = mark.wait_for(lambda ln: ln.get("event") == "handoff_refused")
    assert line["code"] == cs.code, line
    return line


# -- the tests ---------------------------------------------------------------------


@pytest.mark.parametrize("cs", CASES, ids=CASE_IDS)
def test_bad_client_is_refused_and_daemon_keeps_serving(shared: DaemonHandle, fd_baseline: list[str], cs: Case) -> None:
    mark = LogMark(shared)
    run_case(shared, cs)
    assert len(mark.refusals()) == 1, mark.refusals()
    good_restore(shared)
    assert len(mark.refusals()) == 1, mark.refusals()
    assert not [ln for ln in mark.lines() if "unparsed" in ln or str(ln.get("event")).endswith("_bug")]
    assert_fds_back_to(shared, fd_baseline)


def test_connect_and_close_is_a_probe_not_a_refusal(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """What readiness and health checks do: connect, close. No warning, no
    reply to send, nothing kept; the daemon goes on serving."""
    mark = LogMark(shared)
    for _ in range(3):
        with connect(shared):
            pass
    good_restore(shared)
    assert mark.refusals() == []
    assert_fds_back_to(shared, fd_baseline)


def test_symlink_inside_the_snapshot_dir_is_served(shared: DaemonHandle) -> None:
    """The name check refuses escapes, not every symlink."""
    rc, lines, err = finish(shared.target("alias.img", SIZE, "--touch", "seq", "--no-fill"))
    assert rc == 0, (lines, err)


def _restore_self(
    d: DaemonHandle, *, nonblocking: bool = True, read_only: bool = False, hang_up: str = "", fill: bool = False
) -> None:
    """This process as the target: hand 1 MiB over, read it all, check it.

    Without ``fill`` (and fault-around off) every page arrives through a
    fault served after the handoff; with it, the pages are read once the
    daemon has logged the session complete. ``hang_up`` closes the handoff
    connection ``"before_reply"`` or ``"after_accepted"``, before any touch.
    """
    size = 1 * MiB
    expected = d.images["img"].read_bytes()[:size]
    mark = LogMark(d)
    opts = hp.SessionOptions(fill=fill, fault_around=False)
    mem, addr = map_anonymous(size)
    try:
        if read_only:
            assert _libc.mprotect(addr, size, mmap.PROT_READ) == 0
        with Handoff.connect(d.socket) as h:
            with Userfaultfd.create(nonblocking=nonblocking) as uffd:
                uffd.api(0)
                req = hp.RestoreRequest((hp.RangeSpec(addr, size, "img", 0),), options=opts)
                if hang_up == "before_reply":
                    data = hp.encode(req)
                    socket.send_fds(h.sock, [data[:1]], [uffd.fileno()])
                    h.sock.sendall(data[1:])
                else:
                    h.send(uffd, req.ranges, options=opts, keep_uffd=False)
            if hang_up:
                h.close()
            started = mark.wait_for(lambda ln: ln.get("event") == "session_started" and ln.get("pid") == os.getpid())

            def ended(ln: dict[str, Any]) -> bool:
                return ln.get("event") == "session_ended" and ln["session"] == started["session"]

            if fill:
                mark.wait_for(ended)
            got = mem[:]  # without fill, every page faults now and the daemon serves it
            assert got == expected, "wrong bytes in the restored memory"
            if not hang_up and not fill:
                assert h.wait(timeout=10).pages == size // PAGE
        end = mark.wait_for(ended)
        assert end["outcome"] == "complete", end
        if not fill:
            assert end["faults"] >= size // PAGE
    finally:
        mem.close()


@pytest.mark.parametrize("when", ["before_reply", "after_accepted"])
def test_restorer_hanging_up_does_not_end_the_session(shared: DaemonHandle, fd_baseline: list[str], when: str) -> None:
    """The session belongs to the target, not to the handoff connection:
    every page the target touches after the hang-up is still served."""
    _restore_self(shared, hang_up=when)
    good_restore(shared)
    assert_fds_back_to(shared, fd_baseline)


def test_blocking_uffd_does_not_stall_the_daemon(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """A uffd created without O_NONBLOCK: reading it with nothing queued
    (the session does, before listening and before each fill chunk) must
    not block the whole daemon."""
    _restore_self(shared, nonblocking=False, fill=True)
    good_restore(shared)
    assert_fds_back_to(shared, fd_baseline)


def test_read_only_memory_is_served(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """Private read-only memory registers and takes UFFDIO_COPY: served, not refused."""
    _restore_self(shared, read_only=True)
    assert_fds_back_to(shared, fd_baseline)


def test_named_pid_must_be_the_peers_own() -> None:
    """A non-root restorer may not name another user's process as its target
    (the daemon kills the target on a forced shutdown)."""
    stranger = PeerCred(pid=os.getpid(), uid=65534, gid=65534)
    with pytest.raises(Refused) as e:
        _open_target(1, stranger)
    assert e.value.code == "bad_pid"
    me = PeerCred(pid=1, uid=os.getuid(), gid=os.getgid())
    pid, pidfd = _open_target(os.getpid(), me)
    assert pid == os.getpid()
    assert pidfd is not None
    os.close(pidfd)


def test_many_bad_clients_at_once_while_a_restore_runs(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    mark = LogMark(shared)
    quick = [cs for cs in CASES if cs.concurrent and cs.code != "timeout"]
    batch = [quick[i % len(quick)] for i in range(50)]
    target = shared.target("img", SIZE, "--touch", "threads", "--no-fill")
    try:
        barrier = threading.Barrier(len(batch))

        def one(cs: Case) -> hp.Message | None:
            with contextlib.ExitStack() as stack:
                barrier.wait(timeout=30)
                return cs.run(Ctx(shared, stack))

        with ThreadPoolExecutor(len(batch)) as pool:
            replies = list(pool.map(one, batch))
        rc, lines, err = finish(target)
    finally:
        kill(target)
    assert rc == 0, (lines, err)
    assert lines[-1]["ok"] is True, lines
    for cs, reply in zip(batch, replies, strict=True):
        if cs.replies:
            assert isinstance(reply, hp.Error), (cs.name, reply)
            assert reply.code == cs.code, (cs.name, reply)
    deadline = time.monotonic() + 10
    while len(mark.refusals()) < len(batch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(str(ln["code"]) for ln in mark.refusals()) == sorted(cs.code for cs in batch)
    good_restore(shared)
    assert_fds_back_to(shared, fd_baseline)


def test_idle_connection_flood_is_held_off(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """Three times as many idle clients as one user may keep pending: those
    within the limit get their timeout, the rest are turned away ``busy`` at
    once (not left in the backlog), and the daemon holds no more descriptors
    than the limit."""
    mark = LogMark(shared)
    n = MAX_PENDING_PER_UID * 3
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(shared)) for _ in range(n)]
        mark.wait_for(lambda ln: ln.get("event") == "pending_limit")
        # A few more for what earlier cases' sessions may still be closing.
        assert fd_count(shared) <= len(fd_baseline) + MAX_PENDING_PER_UID + 4, fd_table(shared)
        replies = [read_reply(s) for s in socks]
    # The same user again, once its idle connections are gone (another user's
    # restore during a flood: tests/test_flood.py).
    good_restore(shared)
    codes = [r.code if isinstance(r, hp.Error) else repr(r) for r in replies]
    assert set(codes) <= {"timeout", "busy"}, codes
    assert codes.count("timeout") >= MAX_PENDING_PER_UID, codes
    assert codes.count("busy") >= 1, codes
    # Refusals of connections that never owed a request are summed up, not logged one by one.
    assert len([ln for ln in mark.refusals() if ln["code"] == "timeout"]) == codes.count("timeout")
    assert [ln for ln in mark.lines() if ln.get("event") == "pending_limit"]
    mark.wait_for(lambda ln: ln.get("event") == "pending_limit_cleared")
    assert_fds_back_to(shared, fd_baseline)


def test_out_of_file_descriptors_backs_off_instead_of_spinning(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """accept() failing with EMFILE must not turn into a busy loop."""
    mark = LogMark(shared)
    pid = shared.proc.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    with contextlib.ExitStack() as stack:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(fd_baseline) + 4, old[1]))
        stack.callback(resource.prlimit, pid, resource.RLIMIT_NOFILE, old)
        cpu0 = _cpu_seconds(pid)
        socks = [stack.enter_context(connect(shared)) for _ in range(12)]
        replies = [read_reply(s) for s in socks]
        cpu = _cpu_seconds(pid) - cpu0
    assert all(isinstance(r, hp.Error) and r.code == "timeout" for r in replies), replies
    paused = [ln for ln in mark.lines() if ln.get("event") in ("accept_paused", "accept_failed")]
    assert paused, "the daemon never ran out of fds: the test is not testing anything"
    assert len(paused) < 100, f"{len(paused)} accept failures logged: the daemon spins"
    assert cpu < 0.5, f"daemon used {cpu:.2f} s of CPU waiting for fds"
    good_restore(shared)
    assert_fds_back_to(shared, fd_baseline)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_max_sessions_exceeded(tmp_path: Path) -> None:
    with running_daemon(tmp_path, "max_sessions = 1") as d:
        d.image("img", SIZE)
        holder = d.target("img", SIZE, "--touch", "hold", "--no-fill", wait=False)
        try:
            line = holder.stdout.readline()  # type: ignore[union-attr]
            assert "accepted" in line, line
            mark = LogMark(d)
            rc, lines, err = finish(d.target("img", SIZE))
            assert rc == 2, (lines, err)
            assert lines[-1]["handoff_error"] == "busy", lines
            assert mark.wait_for(lambda ln: ln.get("event") == "handoff_refused")["code"] == "busy"
        finally:
            kill(holder)
        mark.wait_for(lambda ln: ln.get("event") == "session_ended" and ln.get("pid") == holder.pid)
        good_restore(d)


def test_range_registered_by_the_restorer_is_served(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """The honest ``registered: true``: the ranges are this uffd's, in
    missing mode, every byte; the daemon verifies that and serves them."""
    size = 1 * MiB
    expected = shared.images["img"].read_bytes()[:size]
    opts = hp.SessionOptions(fill=False, fault_around=False)
    mem, addr = map_anonymous(size)
    try:
        with Handoff.connect(shared.socket) as h, Userfaultfd.create() as uffd:
            uffd.api(0)
            uffd.register(addr, size)
            h.send(uffd, [hp.RangeSpec(addr, size, "img", 0)], registered=True, options=opts, keep_uffd=False)
            assert mem[:] == expected, "wrong bytes in the restored memory"
            done = h.wait(timeout=30)
        assert done.pages == size // PAGE
        assert done.bytes_copied + done.bytes_zero == size
    finally:
        mem.close()
    assert_fds_back_to(shared, fd_baseline)


def test_descriptor_on_a_later_byte_of_the_frame_is_taken(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """The uffd may ride on any sendmsg that carries part of the request
    frame, not only the one with byte 0 (docs/handoff.md says so)."""
    size = 1 * MiB
    expected = shared.images["img"].read_bytes()[:size]
    mem, addr = map_anonymous(size)
    try:
        with connect(shared) as s, Userfaultfd.create() as uffd:
            uffd.api(0)
            req = hp.RestoreRequest((hp.RangeSpec(addr, size, "img", 0),),
                                    options=hp.SessionOptions(fill=False, fault_around=False))
            data = hp.encode(req)
            s.sendall(data[:-1])
            socket.send_fds(s, [data[-1:]], [uffd.fileno()])
            dec = hp.FrameDecoder()
            msgs: list[hp.Message] = []
            while not msgs:
                chunk = s.recv(65536)
                assert chunk, "closed without a reply"
                msgs = dec.feed(chunk)
            assert isinstance(msgs[0], hp.Accepted), msgs
            uffd.close()
            assert mem[:] == expected, "wrong bytes in the restored memory"
            while len(msgs) < 2:
                chunk = s.recv(65536)
                assert chunk, "closed without complete"
                msgs += dec.feed(chunk)
            assert isinstance(msgs[1], hp.Complete), msgs
    finally:
        mem.close()
    assert_fds_back_to(shared, fd_baseline)


def test_registered_range_with_an_unmapped_part_is_served(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """What a re-handed restore looks like after the target unmapped part of
    a range: the mapped parts are registered with this uffd, the hole is
    nothing. Accepted; every mapped byte is served, the hole counts as gone."""
    size = 12 * PAGE
    expected = shared.images["img"].read_bytes()[:size]
    mem, addr = map_anonymous(size)
    try:
        with Handoff.connect(shared.socket) as h, Userfaultfd.create() as uffd:
            uffd.api(0)
            uffd.register(addr, size)
            assert _libc.munmap(addr + 4 * PAGE, 4 * PAGE) == 0
            # With the fill, as a re-hand does: a hole never faults, the fill finds it gone.
            h.send(uffd, [hp.RangeSpec(addr, size, "img", 0)], registered=True,
                   options=hp.SessionOptions(fill=True, fault_around=False), keep_uffd=False)
            got = ctypes.string_at(addr, 4 * PAGE) + ctypes.string_at(addr + 8 * PAGE, 4 * PAGE)
            assert got == expected[: 4 * PAGE] + expected[8 * PAGE :], "wrong bytes in the restored memory"
            done = h.wait(timeout=30)
        assert done.bytes_copied + done.bytes_zero == 8 * PAGE, done
    finally:
        with contextlib.suppress(ValueError):
            mem.close()
    assert_fds_back_to(shared, fd_baseline)


def test_range_over_two_mappings_gets_every_byte(shared: DaemonHandle, fd_baseline: list[str]) -> None:
    """One range, two VMAs (its second half mprotect()ed read-only): one
    UFFDIO_COPY across the boundary fails with ENOENT as if nothing were
    mapped, and the whole run used to be taken for gone. The fill did
    nothing, ``complete`` came, and the target read zeros."""
    size = 8 * PAGE
    expected = shared.images["img"].read_bytes()[:size]
    mem, addr = map_anonymous(size)
    try:
        assert _libc.mprotect(addr + 4 * PAGE, 4 * PAGE, mmap.PROT_READ) == 0
        with Handoff.connect(shared.socket) as h, Userfaultfd.create() as uffd:
            uffd.api(0)
            h.send(uffd, [hp.RangeSpec(addr, size, "img", 0)], options=hp.SessionOptions(fill=True))
            done = h.wait(timeout=30)  # nothing touched: the fill alone brings every page
        assert ctypes.string_at(addr, size) == expected, "wrong bytes in the restored memory"
        assert done.bytes_copied + done.bytes_zero == size, done
    finally:
        mem.close()
    assert_fds_back_to(shared, fd_baseline)
