"""lazypaged.uffd against the real kernel: no mocks.

Two kinds of target:

* in-process: a mapping of this process registered with a uffd of its own.
  Faults are taken by helper threads (``Toucher``) that sleep in the kernel
  until the test serves them. Rule of this file: the main thread never reads
  registered memory that might be missing; it would sleep forever, and with
  the GIL held if it used ``ctypes.string_at``. Closing the uffd wakes every
  sleeper, so each region is torn down uffd first.
* a child process (``Target``) that creates, negotiates and registers its own
  uffd and hands it over with SCM_RIGHTS, as a restorer does, then obeys
  commands (read a page, madvise, munmap, mremap, fork, exit) sent over a
  SOCK_SEQPACKET pair. Commands that raise uffd events block in the child
  until the test reads the event.

Every wait has a timeout; a test fails rather than hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lazypaged.uffd import (
    AlreadyPresent,
    Busy,
    Fork,
    IncompleteMessage,
    NotSupported,
    PageFault,
    RangeGone,
    Remap,
    Remove,
    TargetGone,
    UffdError,
    UnknownEvent,
    Unmap,
    Userfaultfd,
    abi,
    decode,
    kernel_features,
)

try:
    OFFERED, _API_IOCTLS = kernel_features()
except UffdError as exc:
    pytest.skip(f"cannot create a userfaultfd here: {exc}", allow_module_level=True)

pytestmark = pytest.mark.timeout(60)

PAGE = mmap.PAGESIZE
WAIT = 10.0  # seconds: the longest any single wait may take before the test fails
ROOT = Path(__file__).resolve().parent.parent
NON_COOPERATIVE = (
    abi.UFFD_FEATURE_EVENT_FORK
    | abi.UFFD_FEATURE_EVENT_REMAP
    | abi.UFFD_FEATURE_EVENT_REMOVE
    | abi.UFFD_FEATURE_EVENT_UNMAP
)

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
MAP_FAILED = ctypes.c_void_p(-1).value


def _map_anon(size: int) -> int:
    addr = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(addr)


class Buffer:
    """Bytes at a stable address of ours: the ``src`` of UFFDIO_COPY."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._buf = ctypes.create_string_buffer(data, len(data))
        self.addr = ctypes.addressof(self._buf)


def _wait_until(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _wait_readable(u: Userfaultfd, timeout: float = WAIT) -> None:
    p = select.poll()
    p.register(u.fileno(), select.POLLIN)
    assert p.poll(timeout * 1000), f"no uffd message within {timeout} s"


def _next_events(u: Userfaultfd) -> list[Any]:
    _wait_readable(u)
    return list(u.read_events())


# -- in-process regions --------------------------------------------------------------------


class Toucher(threading.Thread):
    """Touches one byte; sleeps in the kernel while the page is missing."""

    def __init__(self, addr: int, *, write: bool, value: int) -> None:
        super().__init__(daemon=True, name=f"toucher-{addr:#x}")
        self.addr, self.write, self.value = addr, write, value
        self.got: bytes | None = None

    def run(self) -> None:
        if self.write:
            ctypes.memset(self.addr, self.value, 1)  # releases the GIL while it faults
        else:
            buf = ctypes.create_string_buffer(1)
            ctypes.memmove(buf, self.addr, 1)
            self.got = buf.raw

    def in_fault(self) -> bool:
        """Asleep in the userfaultfd fault handler (kernel wait channel)."""
        try:
            with open(f"/proc/self/task/{self.native_id}/wchan") as f:
                return f.read().strip() == "handle_userfault"
        except FileNotFoundError:
            return False


@dataclass
class Region:
    uffd: Userfaultfd
    addr: int
    size: int
    threads: list[threading.Thread] = field(default_factory=list)

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def touch(self, offset: int, *, write: bool = False, value: int = 0) -> Toucher:
        t = Toucher(self.addr + offset, write=write, value=value)
        self.threads.append(t)
        t.start()
        return t

    def read(self, offset: int, length: int) -> bytes:
        """Read registered memory on a helper thread: a missing page fails, not hangs."""
        out = ctypes.create_string_buffer(length)
        t = threading.Thread(target=ctypes.memmove, args=(out, self.addr + offset, length), daemon=True)
        self.threads.append(t)
        t.start()
        t.join(WAIT)
        assert not t.is_alive(), f"reading {offset:#x}+{length:#x} faulted on a missing page"
        return out.raw


@contextlib.contextmanager
def registered(npages: int, features: int = 0) -> Iterator[Region]:
    size = npages * PAGE
    addr = _map_anon(size)
    u = Userfaultfd.create()
    r = Region(u, addr, size)
    try:
        assert u.api(features) == OFFERED
        u.register(addr, size)
        yield r
    finally:
        u.close()  # wakes every thread still asleep on one of its faults
        for t in r.threads:
            t.join(WAIT)
        if not any(t.is_alive() for t in r.threads):
            _munmap(addr, size)  # never under a thread that could still touch it


# -- child-process targets ---------------------------------------------------------------

CHILD = r"""
import ctypes, hashlib, json, os, resource, socket, sys
from lazypaged.uffd import Userfaultfd

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the poison test ends in SIGBUS
PAGE = os.sysconf("SC_PAGE_SIZE")
FAILED = ctypes.c_void_p(-1).value
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)

def check(ok, what):
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))

sock = socket.socket(fileno=int(sys.argv[1]))
features, npages = int(sys.argv[2]), int(sys.argv[3])
addr = libc.mmap(None, npages * PAGE, 3, 0x22, -1, 0)  # RW, MAP_PRIVATE|MAP_ANONYMOUS
check(addr not in (None, FAILED), "mmap")
uffd = Userfaultfd.create()
uffd.api(features)
uffd.register(addr, npages * PAGE)
socket.send_fds(sock, [json.dumps({"addr": addr}).encode()], [uffd.fileno()])
uffd.close()  # the test's copy keeps the uffd alive, as after a real handoff

while True:
    msg = sock.recv(4096)
    if not msg:
        break
    cmd = json.loads(msg)
    op = cmd["op"]
    start, length = addr + cmd.get("page", 0) * PAGE, cmd.get("n", 1) * PAGE
    if op == "exit":
        break
    if op == "read":  # sleeps in a fault until the test serves the page
        reply = {"sha": hashlib.sha256(ctypes.string_at(start, length)).hexdigest()}
    elif op == "madvise":
        check(libc.madvise(start, length, 4) == 0, "madvise(MADV_DONTNEED)")
        reply = {}
    elif op == "munmap":
        check(libc.munmap(start, length) == 0, "munmap")
        reply = {}
    elif op == "mremap":
        dest = libc.mmap(None, length, 0, 0x22, -1, 0)  # a PROT_NONE hole to move into
        check(dest not in (None, FAILED), "mmap")
        new = libc.mremap(start, length, length, 3, dest)  # MREMAP_MAYMOVE | MREMAP_FIXED
        check(new == dest, "mremap")
        reply = {"to": new}
    elif op == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        reply = {"pid": pid}
    else:
        raise ValueError(op)
    sock.send(json.dumps(reply).encode())
"""


class Target:
    """A child process whose registered mapping the test serves through its uffd."""

    def __init__(self, cwd: Path, features: int, npages: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        ours.settimeout(WAIT)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(theirs.fileno()), str(features), str(npages)],
                pass_fds=[theirs.fileno()],
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
            )
        self.uffd: Userfaultfd | None = None
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ours, 4096, 1)
            if not fds:
                self._died("before handing over its uffd")
            self.uffd = Userfaultfd(fds[0], features)
            self.addr: int = json.loads(msg)["addr"]
        except BaseException:
            self.close()
            raise

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def send(self, op: str, **args: int) -> None:
        self.sock.send(json.dumps({"op": op, **args}).encode())

    def reply(self) -> dict[str, Any]:
        msg = self.sock.recv(4096)
        if not msg:
            self._died("instead of replying")
        out: dict[str, Any] = json.loads(msg)
        return out

    def call(self, op: str, **args: int) -> dict[str, Any]:
        self.send(op, **args)
        return self.reply()

    def call_collecting(self, op: str, **args: int) -> tuple[list[Any], dict[str, Any]]:
        """Run a command that raises uffd events: read them until the child replies."""
        assert self.uffd is not None
        self.send(op, **args)
        p = select.poll()
        p.register(self.uffd.fileno(), select.POLLIN)
        p.register(self.sock.fileno(), select.POLLIN)
        events: list[Any] = []
        deadline = time.monotonic() + WAIT
        while True:
            ready = dict(p.poll(max(0.0, deadline - time.monotonic()) * 1000))
            assert ready, f"{op}: no reply and no event within {WAIT} s (events so far: {events})"
            if self.uffd.fileno() in ready:
                events += self.uffd.read_events()
            if self.sock.fileno() in ready:
                reply = self.reply()
                return events + self.uffd.read_events(), reply

    def exit(self) -> int:
        self.send("exit")
        return self.proc.wait(WAIT)

    def _died(self, when: str) -> None:
        rc = self.proc.wait(WAIT)
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        pytest.fail(f"target exited ({rc}) {when}:\n{err}")

    def close(self) -> None:
        if self.uffd is not None:
            self.uffd.close()  # also completes any event the child still waits on
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[int, int], Target]]:
    targets: list[Target] = []

    def make(features: int, npages: int) -> Target:
        t = Target(tmp_path, features, npages)
        targets.append(t)
        return t

    yield make
    for t in targets:
        t.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- creation and feature negotiation ------------------------------------------------------------


def test_create_gives_a_nonblocking_cloexec_fd() -> None:
    with Userfaultfd.create() as u:
        fd = u.fileno()
        assert fd >= 0
        assert not u.closed
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    assert u.closed
    with Userfaultfd.create(nonblocking=False) as blocking:
        assert not fcntl.fcntl(blocking.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    with Userfaultfd.create(user_mode_only=True) as user_only:
        user_only.api()


def test_api_enables_exactly_what_was_asked() -> None:
    asked = abi.UFFD_FEATURE_THREAD_ID | abi.UFFD_FEATURE_EVENT_REMOVE
    with Userfaultfd.create() as u:
        assert u.features == 0
        assert u.api(asked) == OFFERED  # the kernel answers with everything it offers
        assert u.features == asked


def test_api_with_a_bit_the_kernel_lacks_is_not_supported_and_can_be_retried() -> None:
    lacking = ~OFFERED & (OFFERED + 1)  # lowest bit the kernel does not offer
    with Userfaultfd.create() as u:
        with pytest.raises(NotSupported) as ei:
            u.api(lacking | abi.UFFD_FEATURE_THREAD_ID)
        assert ei.value.errno == errno.EINVAL
        assert hex(lacking) in str(ei.value)
        assert "thread_id" not in str(ei.value)  # names only what is missing
        assert u.features == 0
        u.api(abi.UFFD_FEATURE_THREAD_ID)  # a refused call left the uffd un-negotiated
        assert u.features == abi.UFFD_FEATURE_THREAD_ID


def test_second_api_call_is_refused_but_not_as_unsupported() -> None:
    with Userfaultfd.create() as u:
        u.api(abi.UFFD_FEATURE_THREAD_ID)
        with pytest.raises(UffdError) as ei:
            u.api(abi.UFFD_FEATURE_THREAD_ID)
        assert not isinstance(ei.value, NotSupported)
        assert ei.value.errno == errno.EINVAL
        assert u.features == abi.UFFD_FEATURE_THREAD_ID


NO_PTRACE_CHILD = """
from lazypaged.uffd import NotSupported, Userfaultfd, abi
with Userfaultfd.create() as u:
    try:
        u.api(abi.UFFD_FEATURE_EVENT_FORK)
    except NotSupported as e:
        print(e.errno)
    u.api(abi.UFFD_FEATURE_EVENT_REMOVE)  # refused, so still un-negotiated
    print(u.features)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv(1)")
def test_event_fork_without_cap_sys_ptrace_is_not_supported() -> None:
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", sys.executable, "-c", NO_PTRACE_CHILD],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert out.stdout.split() == [str(errno.EPERM), str(abi.UFFD_FEATURE_EVENT_REMOVE)]


def test_kernel_features_lists_the_api_ioctls() -> None:
    features, ioctls = kernel_features()
    assert features == OFFERED
    assert {"api", "register", "unregister"} <= set(abi.ioctl_names(ioctls))
    assert OFFERED & abi.UFFD_FEATURE_THREAD_ID  # every kernel this daemon runs on


# -- register / unregister ---------------------------------------------------------------


def test_register_grants_the_range_ioctls_and_unregister_releases() -> None:
    size = 4 * PAGE
    addr = _map_anon(size)
    try:
        with Userfaultfd.create() as u, Userfaultfd.create() as other:
            u.api()
            other.api()
            granted = abi.ioctl_names(u.register(addr, size))
            assert {"copy", "zeropage", "wake"} <= set(granted)
            with pytest.raises(UffdError) as busy:
                other.register(addr, size)  # a range belongs to one uffd at a time
            assert busy.value.errno == errno.EBUSY
            with pytest.raises(UffdError) as bad:
                u.register(addr + 1, PAGE)
            assert bad.value.errno == errno.EINVAL
            u.unregister(addr, size)
            other.register(addr, size)  # free again
            other.unregister(addr, size)
        assert ctypes.string_at(addr, size) == bytes(size)  # unregistered: plain zero pages now
    finally:
        _munmap(addr, size)


# -- copy, zeropage, partial progress ---------------------------------------------------------


def test_copy_installs_the_bytes() -> None:
    data = Buffer(os.urandom(4 * PAGE))
    with registered(4) as r:
        assert r.uffd.copy(r.addr, data.addr, 2 * PAGE) == 2 * PAGE
        assert r.uffd.copy(r.page(2), data.addr + 2 * PAGE, 2 * PAGE, wake=False) == 2 * PAGE
        assert r.read(0, r.size) == data.data


def test_zeropage_installs_zeros() -> None:
    data = Buffer(os.urandom(PAGE))
    with registered(3) as r:
        assert r.uffd.copy(r.page(2), data.addr, PAGE) == PAGE
        assert r.uffd.zeropage(r.addr, 2 * PAGE) == 2 * PAGE
        assert r.read(0, r.size) == bytes(2 * PAGE) + data.data


@pytest.mark.parametrize("op", ["copy", "zeropage"])
def test_partial_progress_then_already_present(op: str) -> None:
    """The middle page of three is present: one page goes in, then EEXIST."""
    first, middle = Buffer(os.urandom(3 * PAGE)), Buffer(os.urandom(PAGE))

    def fill(u: Userfaultfd, dst: int, length: int) -> int:
        if op == "copy":
            return u.copy(dst, first.addr + (dst - base), length)
        return u.zeropage(dst, length)

    with registered(3) as r:
        base = r.addr
        assert r.uffd.copy(r.page(1), middle.addr, PAGE) == PAGE
        done = fill(r.uffd, r.addr, 3 * PAGE)
        assert done == PAGE  # short count, no exception
        with pytest.raises(AlreadyPresent) as ei:
            fill(r.uffd, r.addr + done, 3 * PAGE - done)
        assert ei.value.errno == errno.EEXIST
        assert fill(r.uffd, r.page(2), PAGE) == PAGE
        expect = first.data if op == "copy" else bytes(3 * PAGE)
        assert r.read(0, r.size) == expect[:PAGE] + middle.data + expect[2 * PAGE :]


def test_range_gone_after_unregister_or_unmap() -> None:
    data = Buffer(os.urandom(PAGE))
    with registered(2) as r:
        r.uffd.unregister(r.addr, PAGE)
        with pytest.raises(RangeGone) as ei:
            r.uffd.copy(r.addr, data.addr, PAGE)
        assert ei.value.errno == errno.ENOENT
        with pytest.raises(RangeGone):
            r.uffd.zeropage(r.addr, PAGE)
        assert _munmap(r.page(1), PAGE) == 0
        with pytest.raises(RangeGone):
            r.uffd.copy(r.page(1), data.addr, PAGE)
        r.size = PAGE  # page 1 is gone already


# -- faults ------------------------------------------------------------------------------------


def test_faults_from_several_threads_decode_in_one_batch() -> None:
    n = 4
    data = Buffer(os.urandom(n * PAGE))
    with registered(n, abi.UFFD_FEATURE_THREAD_ID) as r:
        # even threads read, odd threads write; each at an odd offset in its page
        touchers = [r.touch(i * PAGE + 0x10 * i + 3, write=bool(i % 2), value=0xA0 + i) for i in range(n)]
        assert _wait_until(lambda: all(t.in_fault() for t in touchers)), "threads never reached the fault"
        raw = r.uffd.read_raw()
        assert len(raw) == n * abi.UFFD_MSG_SIZE  # one read drains the whole burst
        faults = decode(raw)
        assert all(isinstance(f, PageFault) for f in faults)
        seen = {f.address: f for f in faults if isinstance(f, PageFault)}
        for i, t in enumerate(touchers):
            f = seen[r.page(i)]  # page-aligned without UFFD_FEATURE_EXACT_ADDRESS
            assert f.thread_id == t.native_id  # the kernel's tid of the faulting thread
            assert f.write == bool(i % 2)
            assert bool(f.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE) == f.write
        for i in range(n):
            assert r.uffd.copy(r.page(i), data.addr + i * PAGE, PAGE) == PAGE
        for t in touchers:
            t.join(WAIT)
            assert not t.is_alive()
        for i, t in enumerate(touchers):
            at = i * PAGE + 0x10 * i + 3
            if t.write:
                assert r.read(at, 1) == bytes([0xA0 + i])
            else:
                assert t.got == data.data[at : at + 1]
        assert r.uffd.read_raw() == b""


def test_exact_address_and_no_thread_id_unless_asked() -> None:
    with registered(2, abi.UFFD_FEATURE_EXACT_ADDRESS) as r:
        t = r.touch(PAGE + 0x123)
        assert _next_events(r.uffd) == [PageFault(r.page(1) + 0x123, 0, 0)]
        assert r.uffd.zeropage(r.page(1), PAGE) == PAGE
        t.join(WAIT)
        assert t.got == b"\0"


def test_copy_without_wake_leaves_the_thread_asleep_until_wake() -> None:
    data = Buffer(os.urandom(PAGE))
    with registered(1) as r:
        t = r.touch(7)
        assert [type(e) for e in _next_events(r.uffd)] == [PageFault]
        assert r.uffd.copy(r.addr, data.addr, PAGE, wake=False) == PAGE
        t.join(0.3)
        assert t.is_alive()
        assert t.in_fault()
        r.uffd.wake(r.addr, PAGE)
        t.join(WAIT)
        assert not t.is_alive()
        assert t.got == data.data[7:8]


def test_read_with_nothing_pending_is_empty() -> None:
    with registered(1) as r:
        assert r.uffd.read_raw() == b""
        assert r.uffd.read_events() == []


# -- across processes -----------------------------------------------------------------------------


def test_serving_a_child_through_a_received_uffd(spawn: Callable[[int, int], Target]) -> None:
    t = spawn(0, 4)
    data = Buffer(os.urandom(PAGE))
    assert t.uffd is not None
    t.send("read", page=1)
    assert _next_events(t.uffd) == [PageFault(t.page(1), 0, 0)]
    assert t.uffd.copy(t.page(1), data.addr, PAGE) == PAGE  # src is ours, dst is theirs
    assert t.reply() == {"sha": _sha(data.data)}
    assert t.uffd.zeropage(t.page(2), 2 * PAGE) == 2 * PAGE
    assert t.call("read", page=2, n=2) == {"sha": _sha(bytes(2 * PAGE))}
    assert t.uffd.read_raw() == b""  # present pages raise no fault
    assert t.exit() == 0


def test_target_gone_after_the_child_exits(spawn: Callable[[int, int], Target]) -> None:
    t = spawn(0, 2)
    u = t.uffd
    assert u is not None
    assert t.exit() == 0
    data = Buffer(bytes(PAGE))
    calls: dict[str, Callable[[], object]] = {
        "copy": lambda: u.copy(t.addr, data.addr, PAGE),
        "zeropage": lambda: u.zeropage(t.addr, PAGE),
        "register": lambda: u.register(t.addr, PAGE),
        "unregister": lambda: u.unregister(t.addr, PAGE),
    }
    if OFFERED & abi.UFFD_FEATURE_POISON:
        calls["poison"] = lambda: u.poison(t.addr, PAGE)
    for name, call in calls.items():
        with pytest.raises(TargetGone, match=f"UFFDIO_{name.upper()} "):
            call()
    u.wake(t.addr, PAGE)  # WAKE does not look at the address space: no error
    assert u.read_raw() == b""


def test_range_gone_after_the_child_unmaps(spawn: Callable[[int, int], Target]) -> None:
    t = spawn(0, 4)
    assert t.uffd is not None
    assert t.call("munmap", page=0, n=4) == {}
    with pytest.raises(RangeGone):
        t.uffd.zeropage(t.addr, PAGE)
    with pytest.raises(RangeGone):
        t.uffd.copy(t.addr, Buffer(bytes(PAGE)).addr, PAGE)
    assert t.exit() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE")
def test_non_cooperative_events_from_a_child(spawn: Callable[[int, int], Target]) -> None:
    t = spawn(NON_COOPERATIVE, 8)
    u = t.uffd
    assert u is not None

    # madvise(MADV_DONTNEED): the child waits until the REMOVE is read, and
    # until then every range ioctl fails with EAGAIN.
    t.send("madvise", page=0, n=2)
    _wait_readable(u)
    with pytest.raises(Busy) as ei:
        u.zeropage(t.page(5), PAGE)
    assert ei.value.errno == errno.EAGAIN
    with pytest.raises(Busy):
        u.copy(t.page(5), Buffer(bytes(PAGE)).addr, PAGE)
    assert u.read_events() == [Remove(t.page(0), t.page(2))]
    assert t.reply() == {}
    assert u.zeropage(t.page(5), PAGE) == PAGE  # no longer busy

    events, _reply = t.call_collecting("munmap", page=2, n=1)
    assert events == [Unmap(t.page(2), t.page(3))]

    events, reply = t.call_collecting("mremap", page=4, n=4)
    old, new = t.page(4), reply["to"]
    assert events[0] == Remap(old, new, 4 * PAGE)
    # 6.18 follows a move with an UNMAP of the old range; allow kernels that do not
    assert events[1:] in ([], [Unmap(old, old + 4 * PAGE)])

    # fork(): the read itself installs a uffd for the child's copy in our table
    events, reply = t.call_collecting("fork")
    assert reply["pid"] > 0
    assert [type(e) for e in events] == [Fork]
    with Userfaultfd(events[0].uffd) as grandchild:
        assert grandchild.fileno() not in (u.fileno(), t.sock.fileno())
        assert os.readlink(f"/proc/self/fd/{grandchild.fileno()}") == "anon_inode:[userfaultfd]"

    assert u.read_raw() == b""
    assert t.exit() == 0


@pytest.mark.skipif(not OFFERED & abi.UFFD_FEATURE_POISON, reason="this kernel has no UFFDIO_POISON")
def test_poisoned_page_raises_sigbus_in_the_target(spawn: Callable[[int, int], Target]) -> None:
    t = spawn(abi.UFFD_FEATURE_POISON, 2)
    assert t.uffd is not None
    assert t.uffd.zeropage(t.page(0), PAGE) == PAGE
    assert t.uffd.poison(t.page(1), PAGE) == PAGE
    with pytest.raises(AlreadyPresent):
        t.uffd.zeropage(t.page(1), PAGE)  # a poison marker counts as present
    assert t.call("read", page=0) == {"sha": _sha(bytes(PAGE))}
    t.send("read", page=1)
    assert t.proc.wait(WAIT) == -signal.SIGBUS
    assert t.uffd.read_raw() == b""  # poison is answered by the kernel, not by a fault message


# -- decode() of crafted bytes, and a closed uffd --------------------------------------------------


@pytest.mark.parametrize("length", [1, 31, 33, 63])
def test_decode_rejects_a_partial_message(length: int) -> None:
    with pytest.raises(IncompleteMessage):
        decode(bytes(length))


@pytest.mark.parametrize("code", [0, 0x11, 0x17, 0xFF])
def test_decode_rejects_an_unknown_event(code: int) -> None:
    good = abi.UFFD_MSG_STRUCT.pack(abi.UFFD_EVENT_PAGEFAULT, 0, 0, 0, 0, 0x1000, 0)
    bad = abi.UFFD_MSG_STRUCT.pack(code, 0, 0, 0, 1, 2, 3)
    with pytest.raises(UnknownEvent, match=hex(code)):
        decode(good + bad)


def test_decode_of_nothing_is_no_events() -> None:
    assert decode(b"") == []


def test_closed_uffd_fails_with_ebadf() -> None:
    u = Userfaultfd.create()
    fd = u.fileno()
    u.close()
    assert u.closed
    u.close()  # idempotent
    data = Buffer(bytes(PAGE))
    calls: list[Callable[[], object]] = [
        u.fileno,
        u.read_raw,
        u.read_events,
        u.api,
        lambda: u.register(PAGE, PAGE),
        lambda: u.unregister(PAGE, PAGE),
        lambda: u.wake(PAGE, PAGE),
        lambda: u.copy(PAGE, data.addr, PAGE),
        lambda: u.zeropage(PAGE, PAGE),
        lambda: u.poison(PAGE, PAGE),
        u.detach,
    ]
    for call in calls:
        with pytest.raises(OSError, match="userfaultfd is closed") as ei:
            call()
        assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError, match="Bad file descriptor") as gone:
        os.fstat(fd)  # the number was really closed
    assert gone.value.errno == errno.EBADF
    assert "fd=-1" in repr(u)


def test_detach_hands_over_the_fd() -> None:
    u = Userfaultfd.create()
    fd = u.detach()
    assert u.closed
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        u.close()  # does not close what was detached
        os.fstat(fd)
    finally:
        os.close(fd)
