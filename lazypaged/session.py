"""One restore session: a uffd, the memory it serves, and how it serves it.

A session owns a received userfaultfd. Faults are read in batches on the
event loop and served from the source (for a local file an mmap address goes
straight into UFFDIO_COPY); a fill task streams every remaining page, reading
the uffd before each chunk so faults always go first. When nothing is
missing the ranges are unregistered, the uffd closed and the restorer told.

Two tables describe the memory:

* a ``Region`` is a stretch of the *image*: a source, an offset in it, a page
  size, and one state byte per page (``MISSING``, ``INFLIGHT`` while an
  asynchronous fetch is out, ``SETTLED`` once installed, dropped or gone);
* a ``Mapping`` places part of a region at an address of the target.

Faults are looked up by address in the mappings, installs compute the
destination from them on every step, and fill walks the regions. An
``mremap`` of the target therefore only moves mappings (the image address of
a page never changes, as in CRIU's handling), and anything that changes the
layout mid-install is picked up by the next step.

Theory of operation for address-space events (negotiated by the restorer):

* The kernel queues REMOVE/UNMAP/REMAP/FORK and holds the thread that caused
  them until the event is read. From queueing until the read, every range
  ioctl on the uffd fails with EAGAIN (``Busy``): a copy can never race an
  mm change. On ``Busy`` the session reads the queue, applies the events in
  the order read, and retries from the new state.
* One read returns pending faults before pending events; a fault read before
  a REMAP may carry an address from before the move. After applying a REMAP
  the session wakes both the old and the new range, so a thread still
  waiting re-faults with an address in the new layout.
* REMOVE (``madvise(MADV_DONTNEED/REMOVE)``) is sent before the pages are
  dropped. Those pages become settled and remembered as *removed*: a later
  touch gets a zero page, the fill never installs snapshot data there.
* FORK hands us a new uffd for the child, whose memory is the parent's at
  that instant: installed pages are there, missing ones must still be
  served. The child gets its own session over copies of the page states.
  The event does not name the child; its session finds the pid among the
  parent's children afterwards (``_find_pid``) and then watches its pidfd.
* No event at all announces an ``mprotect`` that splits a registered VMA,
  and one range ioctl must stay inside one VMA: a run refused with ENOENT
  is tried again in halves, so pages on both sides of a boundary the
  session never heard of are served (``_put``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import errno
import functools
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from . import uffd as _uffd
from . import workingset
from .config import SessionConfig, WorkingSetConfig
from .memory_map import INFLIGHT, INFLIGHT_TO_MISSING, MISSING, PAGE, SETTLED, Mapping, Region, runs_of, subtract
from .session_stats import Outcome, SessionStats
from .sources import Extent, PageSource, SourceError
from .sources.raw import ZERO_CHECK_MAX, zeros_address
from .target_vmas import children_of, registered_at
from .uffd import abi
from .uffd import ops as _ops

__all__ = ["PAGE", "Mapping", "Outcome", "Region", "RestoreSession", "SessionFailed", "SessionHost", "SessionStats"]

_MSG = abi.UFFD_MSG_STRUCT
_MSG_SIZE = abi.UFFD_MSG_SIZE
_FAULT = abi.UFFD_EVENT_PAGEFAULT
_READ_BYTES = 64 * _MSG_SIZE
#: Where a pagefault message keeps the faulting address (after the event
#: code, reserved fields and the flags).
_FAULT_ADDRESS = struct.Struct("<Q")
_FAULT_ADDRESS_AT = struct.calcsize("<BBHIQ")
_PAGE_SHIFT = PAGE.bit_length() - 1
_now_ns = time.perf_counter_ns
#: Longest stretch :meth:`RestoreSession._poll_for_faults` keeps the loop.
POLL_BUDGET_NS = 2_000_000
_bisect_right = bisect.bisect_right
_ONES = memoryview(b"\x01" * (64 << 20 >> 12))  # marks 64 MiB of 4 KiB pages, sliced without a copy
_OTHER_STATES = {MISSING: (SETTLED, INFLIGHT), INFLIGHT: (MISSING, SETTLED), SETTLED: (MISSING, INFLIGHT)}
#: Bytes of the fill's first chunk; each next one is twice as big, up to fill_chunk.
FILL_FIRST_CHUNK = 128 << 10
#: Asynchronous fetches the fill keeps in flight per session.
FILL_INFLIGHT = 4
#: Seconds of back-to-back fill copies between yields to the event loop: a
#: few 2 MiB copies, short enough that other sessions' faults barely wait.
FILL_SLICE = 0.002
#: Bytes of working set installed without waking, then one UFFDIO_WAKE.
REPLAY_BATCH = 4 << 20
#: With both negotiated, every move or unmap of a range is announced by an event.
_LAYOUT_EVENTS = abi.UFFD_FEATURE_EVENT_REMAP | abi.UFFD_FEATURE_EVENT_UNMAP
#: ``_put`` source address meaning "poison these pages" (failure policy sigbus).
POISON = -1
#: Retry delays while a source fails under the ``wait`` policy.
RETRY_FIRST, RETRY_MAX = 0.05, 5.0
#: A forked child's pid: its parent's children are read again after these
#: many seconds at most, doubling from the first (the child is linked into
#: its parent's children only after the fork event was read).
PID_SEARCH_FIRST, PID_SEARCH_MAX, PID_SEARCH_TRIES = 0.001, 0.1, 100
#: ``sigbus``: a failed read is read again in pieces this big before
#: anything is poisoned (see _narrow).
NARROW_PIECE = 64 << 10


class SessionFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SessionHost(Protocol):
    """What a session needs from whoever runs it (the daemon's session table)."""

    def adopt(self, child: RestoreSession) -> None:
        """Run a session created by a fork of this session's target."""


class RestoreSession:
    #: Sessions of this process between the start and end of :meth:`run`.
    serving = 0

    def __init__(
        self,
        sid: str,
        uffd: _uffd.Userfaultfd,
        mappings: list[Mapping],
        cfg: SessionConfig,
        *,
        kind: str = "native",
        pid: int | None = None,
        pidfd: int | None = None,
        fault_around: bool | None = None,
        fill: bool | None = None,
        log: Any = None,
        host: SessionHost | None = None,
        fill_paused: bool = False,
        working_set: WorkingSetConfig | None = None,
        failure_policy: str | None = None,
    ) -> None:
        self.id = sid
        self.kind = kind
        self.pid = pid
        self.uffd = uffd
        self._fd = uffd.fileno()
        self._copy_buf = bytearray(abi.UFFDIO_COPY_STRUCT.size)  # the fault path's own
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]
        self.regions: list[Region] = []
        for m in self.mappings:
            if all(m.region is not r for r in self.regions):
                self.regions.append(m.region)
        self._region_index = {id(r): k for k, r in enumerate(self.regions)}
        self._by_region: dict[int, list[Mapping]] = {}
        self._index_mappings()
        self.cfg = cfg
        self.log = log or structlog.get_logger().bind(session=sid, kind=kind, pid=pid)
        self.host = host
        self.stats = SessionStats()
        self.stats.pages_total = sum(r.npages for r in self.regions)
        self.stats.pages_missing = sum(r.bitmap.count(MISSING) + r.bitmap.count(INFLIGHT) for r in self.regions)
        self.state = "running"
        self.outcome: Outcome | None = None
        self.children = 0
        self._pidfd = pidfd
        self._fault_around = cfg.fault_around if fault_around is None else fault_around
        # Polling only pays where faults are served inline: a fetch from a
        # pool or a peer needs the event loop that the poll would hold.
        synchronous = all(r.source.synchronous for r in self.regions)
        self._poll_ns = cfg.fault_poll_us * 1000 if synchronous else 0
        self._counted = False  # in ``serving``
        #: Regions whose source has a lane for faults ahead of its fill (it
        #: overrides fetch_urgent): a fault on a page already being fetched
        #: asks for it again there (see _fault). Pages so asked for:
        self._urgent_lane = {id(r): type(r.source).fetch_urgent is not PageSource.fetch_urgent for r in self.regions}
        self._promoted: set[tuple[int, int]] = set()
        self._fill_enabled = cfg.fill if fill is None else fill
        #: Fill waits for :meth:`start_fill` (CRIU: only after end-of-restore).
        self._fill_paused = fill_paused
        self._fill_started = False
        self._ws_cfg = working_set
        self.failure_policy = cfg.failure_policy if failure_policy is None else failure_policy
        self._source_ok = asyncio.Event()
        self._source_ok.set()
        self._retry: list[tuple[Region, int, int]] = []
        self._retry_delay = RETRY_FIRST
        self._recorders: dict[int, workingset.Recorder] = {}
        self._record_until = 0.0
        self._replay_sets: list[workingset.WorkingSet] = []
        self._replaying = False
        self._holding_fill = False  # recording: the fill waits (see _record_gate)
        self._last_fault = 0.0
        self._events_applied = 0  # layout events applied so far (see _put)
        #: (id(source), chunk) -> its recorded copy, for faults that overtake the replay.
        self._ws_index: dict[tuple[int, int], tuple[workingset.WorkingSet, workingset.WsChunk]] = {}
        self._batch_lo = self._batch_hi = 0
        self._window = 0  # current fault-around window, bytes
        self._seq_next = -1
        self._fill_region = 0
        self._fill_page = 0
        self._fill_step = FILL_FIRST_CHUNK >> 1  # doubled before each fill chunk
        self._done: asyncio.Future[Outcome] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[int] = []
        #: Called once when the session ends (any outcome).
        self.on_end: Callable[[RestoreSession], None] | None = None
        #: Called when the uffd is finally closed (for a failed session: when
        #: its target exits or the daemon abandons it).
        self.on_released: Callable[[RestoreSession], None] | None = None
        #: Set by a handoff that answers its restorer: a complete session then
        #: keeps its ranges registered until :meth:`release` is called after
        #: the ``complete`` frame went out. A daemon killed between the two
        #: leaves the ranges registered, so a re-hand finds them as claimed
        #: and is served; unregistered first, the re-hand was refused
        #: ``not_registered`` and the restorer never learnt it had finished.
        self.release_after_reply = False
        #: The restorer keeps its own copy of the uffd, so closing ours cannot
        #: make the kernel zero-fill the target (see uffd/fd.py).
        self.keeps_uffd = False
        #: Pids of this target's forked children that their sessions claimed,
        #: kept after those end: a child outlives its session, and a
        #: forgotten pid would be taken for the next fork's child.
        self._child_pids: set[int] = set()
        #: The target's children before any of its fork events was read.
        self._known_children: frozenset[int] | None = None
        #: A fork's child was not told apart: from then on a new child of this
        #: target could be that one, so no later child's pid is claimed.
        self._pid_unsure = False
        #: Children sessions still looking for their pid (see _find_pid).
        self._pid_searches: set[str] = set()
        #: A forked child's: (parent session, parent pid, the parent's
        #: children when the fork event was read), until its pid is known.
        self._pid_search: tuple[RestoreSession, int, frozenset[int]] | None = None

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> Outcome:
        """Serve until the image is in, the target exits, or the session fails."""
        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self.outcome is None:
            RestoreSession.serving += 1
            self._counted = True
        if self.pid:
            # Before the first read: a fork the target is in waits for that
            # read, so its child is not among these.
            self._known_children = children_of(self.pid)
        fd = self.uffd.fileno()
        loop.add_reader(fd, self._on_readable)
        self._readers.append(fd)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_target_exit)
            self._readers.append(self._pidfd)
        if self._pid_search is not None and self.outcome is None:
            self._spawn(self._find_pid())
        self._on_readable()  # faults that arrived before we listened
        self._check_complete()
        plan = self._prepare_working_set()
        if plan and self.outcome is None:
            self._replaying = True
            self._spawn(self._replay(plan))
        elif self._recorders and self._fill_enabled and self.outcome is None:
            self._holding_fill = True
            self._spawn(self._record_gate())
        elif not self._fill_paused:
            self.start_fill()
        try:
            return await asyncio.shield(self._done)
        finally:
            try:
                for t in list(self._tasks):
                    t.cancel()
                for t in list(self._tasks):
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                # The record is written by a thread that reads the source's
                # memory: even when we are cancelled (shutdown) it must finish
                # before the sources may be released and unmapped.
                save = asyncio.ensure_future(self._save_working_set())
                try:
                    await asyncio.shield(save)
                except asyncio.CancelledError:
                    await save
                    raise
            finally:
                if self._counted:  # cancelled before an outcome
                    RestoreSession.serving -= 1
                    self._counted = False
                for ws in self._replay_sets:
                    ws.close()
                if self.on_end is not None:
                    self.on_end(self)

    def start_fill(self) -> None:
        """Begin streaming the remaining pages (once; faults are served anyway)."""
        self._fill_paused = False
        if self._replaying or self._holding_fill:
            return  # the replay or the recording gate starts it when done
        if self._fill_enabled and not self._fill_started and self.outcome is None and self._loop is not None:
            self._fill_started = True
            self._spawn(self._fill())

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._handle_error(exc)

    def _handle_error(self, exc: BaseException) -> None:
        if isinstance(exc, _uffd.TargetGone):
            self._finish(Outcome("target_exited", "target_exited", "the target's address space is gone"))
        elif isinstance(exc, SourceError):
            self._fail("source_error", str(exc))
        elif isinstance(exc, SessionFailed):
            self._fail(exc.code, str(exc))
        else:  # a bug: fail this session, keep the daemon serving
            self.log.error("session_bug", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            self._fail("internal_error", f"{type(exc).__name__}: {exc}")

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.state = outcome.state
        self.stats.ended = time.monotonic()
        if self._counted:
            RestoreSession.serving -= 1
            self._counted = False
        if outcome.state == "failed":
            # Keep the uffd open: closing it would let the kernel zero-fill
            # the target's missing pages. Only the pidfd watch stays, so the
            # fd is released once the target is gone.
            if self._loop is not None and not self.uffd.closed:
                fd = self.uffd.fileno()
                if fd in self._readers:
                    self._loop.remove_reader(fd)
                    self._readers.remove(fd)
        elif self.release_after_reply and outcome.state == "complete":
            self._stop_reading()
        else:
            self._release()
        if self._done is not None and not self._done.done():
            self._done.set_result(outcome)

    def _stop_reading(self) -> None:
        for fd in self._readers:
            if self._loop is not None:
                self._loop.remove_reader(fd)
        self._readers.clear()

    def release(self) -> None:
        """Unregister and close a complete session once the restorer was told
        (``release_after_reply``); anything else is left as it is (a failed
        session's uffd must stay open)."""
        if self.outcome is not None and self.outcome.state == "complete":
            self._release()

    def _release(self) -> None:
        if self.uffd.closed:
            return
        self._stop_reading()
        if self.outcome is not None and self.outcome.state == "complete":
            for m in self.mappings:
                try:
                    self.uffd.unregister(m.start, m.end - m.start)
                except _uffd.UffdError as e:
                    self.log.debug("unregister_failed", start=hex(m.start), error=str(e))
        self.uffd.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.on_released is not None:
            self.on_released(self)

    def _on_target_exit(self) -> None:
        if self.outcome is None:
            self._finish(Outcome("target_exited", "target_exited", "the target process exited"))
        else:
            self._release()

    def abandon(self) -> None:
        """Stop serving and close the uffd (shutdown: only when that is safe)."""
        if self.outcome is None:
            self._finish(Outcome("failed", "shutdown", "the daemon shut down before the restore completed"))
        self._release()

    def _fail(self, code: str, message: str) -> None:
        if self.outcome is None:
            self.log.error("session_failed", code=code, error=message)
        self._finish(Outcome("failed", code, message))

    def _check_complete(self) -> None:
        if self.stats.pages_missing == 0 and self.outcome is None:
            # Completion closes our uffd, and a page still missing then reads
            # as zeros: the count must agree with the page states first.
            left = sum(r.bitmap.count(MISSING) + r.bitmap.count(INFLIGHT) for r in self.regions)
            if left:
                self.log.error("page_count_mismatch", counted_missing=0, missing=left)
                self.stats.pages_missing = left
                return
            self._finish(Outcome("complete"))

    # -- reading the uffd -----------------------------------------------------------
    def _on_readable(self) -> None:
        if self.outcome is not None:
            return
        try:
            data = os.read(self._fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail("uffd_read", f"reading the userfaultfd failed: {e}")
            return
        try:
            self._dispatch(data)
            if self._poll_ns and RestoreSession.serving == 1 and self.outcome is None:
                self._poll_for_faults()
        except Exception as e:
            self._handle_error(e)

    def _dispatch(self, data: bytes) -> None:
        if len(data) == _MSG_SIZE and data[0] == _FAULT:
            # One fault per read is the common case when a thread waits on
            # each: skip the batch decoding.
            self._fault(_FAULT_ADDRESS.unpack_from(data, _FAULT_ADDRESS_AT)[0])
        else:
            self._handle(data)
        self._check_complete()

    def _poll_for_faults(self) -> None:
        """Keep reading the uffd for a short while before sleeping in the loop.

        A thread walking through lazy memory faults again a few microseconds
        after it is woken. Catching that fault here saves the sleep and
        wakeup (on a VM, an inter-processor interrupt) on both sides, which is
        a large part of a 4 KiB fault's latency. Only while this is the one
        session served, and at most ``POLL_BUDGET_NS`` at a time, so the fill,
        new handoffs and the control socket are never held up for long.
        """
        fd, poll_ns = self._fd, self._poll_ns
        now = _now_ns()
        deadline, budget_end = now + poll_ns, now + POLL_BUDGET_NS
        while now < deadline:
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                now = _now_ns()
                continue
            self._dispatch(data)
            if self.outcome is not None:
                return
            now = _now_ns()
            deadline = min(now + poll_ns, budget_end)

    def _handle(self, data: bytes) -> None:
        if len(data) % _MSG_SIZE:
            raise SessionFailed("uffd_read", f"short uffd read of {len(data)} bytes")
        faults: list[int] = []
        for k, (code, _a, _b, _c, _flags, address, _tid) in enumerate(_MSG.iter_unpack(data)):
            if code == _FAULT:
                faults.append(address)
            else:
                # Faults read before an event came first in the kernel's queue,
                # but the event is applied first so they are served against the
                # layout that now exists (see the module docstring).
                self._event(_uffd.decode(data[k * _MSG_SIZE : (k + 1) * _MSG_SIZE])[0])
        for address in faults:
            if self.outcome is not None:
                return
            self._fault(address)

    def _pump_events(self) -> None:
        """Read what the kernel queued; needed before a ``Busy`` ioctl can succeed."""
        data = self.uffd.read_raw()
        if data:
            self._handle(data)

    # -- faults -------------------------------------------------------------------
    def _mapping_at(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            m = self.mappings[i]
            if addr < m.end:
                return m
        return None

    def _fault(self, address: int) -> None:
        t0 = _now_ns()
        st = self.stats
        st.faults += 1
        if st.first_fault_at is None:
            st.first_fault_at = time.monotonic()
        k = _bisect_right(self._starts, address) - 1
        m = self.mappings[k] if k >= 0 else None
        if m is None or address >= m.end:
            self._stray_fault(address & ~(PAGE - 1))
            return
        r = m.region
        i = m.first + ((address - m.start) >> r.shift)
        state = r.bitmap[i]
        if state == SETTLED and not self._zero_removed(r, i):
            # A missing-page fault means the page is not there *now*. Mostly
            # this is a late duplicate of a fault already served; the install
            # below then finds the page present and just wakes the thread. If
            # it is truly missing, serving it again beats a wake that would
            # only make the thread fault forever.
            r.bitmap[i] = MISSING
            st.pages_missing += 1
            self._seq_next = -1
            state = MISSING
        if state == MISSING and self._recorders and self._recording():
            self._last_fault = time.monotonic()
            i, j = self._record_window(r, i, m)
            before = st.bytes_copied + st.bytes_zero
            if r.source.synchronous:
                self._install(r, i, j)
            else:
                for a, b in runs_of(r.bitmap, MISSING, i, j):
                    r.bitmap[a:b] = b"\x02" * (b - a)
                    self._spawn(self._fetch_install(r, a, b, fault=True))
            st.bytes_fault += st.bytes_copied + st.bytes_zero - before
        elif state == MISSING:
            page_addr = m.start + ((i - m.first) << r.shift)
            if self._fault_around:
                if page_addr == self._seq_next:
                    self._window = min(self._window << 1, self.cfg.fault_around_max)
                else:
                    self._window = self.cfg.fault_around_min
                j = min(i + max(1, self._window >> r.shift), m.last)
            else:
                j = i + 1
            k = r.bitmap.find(SETTLED, i, j)
            if k != -1:
                j = k
            self._seq_next = m.start + ((j - m.first) << r.shift)
            self._fill_region, self._fill_page = self._region_index[id(r)], j
            if r.source.synchronous:
                before = st.bytes_copied + st.bytes_zero
                # Fast path: bytes that lie contiguously in our memory with no
                # hole go straight into one copy (no extents, no zero scan).
                src = r.source.data_address(r.offset + (i << r.shift), (j - i) << r.shift)
                if self._ws_index and self._install_from_ws(r, i):
                    pass
                elif src and r.page == PAGE:
                    try:
                        self._copy_run(r, m, i, j, src)
                    except SourceError as e:
                        self._source_failed(r, i, j, e, MISSING)
                else:
                    self._install(r, i, j)
                st.bytes_fault += st.bytes_copied + st.bytes_zero - before
            else:
                r.bitmap[i:j] = b"\x02" * (j - i)
                self._spawn(self._fetch_install(r, i, j, fault=True))
        elif state == INFLIGHT and self._urgent_lane.get(id(r)) and (id(r), i) not in self._promoted:
            # The page is on its way, perhaps in a fill read queued behind
            # megabytes of other fill: ask for it on the urgent lane as well,
            # with the pages after it that are in flight too (up to a first
            # fault-around window), or a thread walking through them faults
            # on each. Whichever lands first installs a page; the other finds
            # it settled.
            j = min(i + max(1, self.cfg.fault_around_min >> r.shift), m.last) if self._fault_around else i + 1
            for other in (MISSING, SETTLED):
                k = r.bitmap.find(other, i, j)
                if k != -1:
                    j = k
            self._promoted.update((id(r), k) for k in range(i, j))
            self._spawn(self._promote(r, i, j))
        # Otherwise INFLIGHT: the fetch under way wakes this thread when it lands.
        ns = _now_ns() - t0
        st.fault_ns += ns
        st.latency_us_log2[min((ns // 1000).bit_length(), 31)] += 1

    async def _promote(self, r: Region, i: int, j: int) -> None:
        try:
            await self._fetch_install(r, i, j, fault=True)
        finally:
            self._promoted.difference_update((id(r), k) for k in range(i, j))

    def _stray_fault(self, page: int) -> None:
        """A fault outside every mapping: memory the restorer registered
        without naming a source (or the grown tail of an mremap). It holds no
        snapshot data, so it is new memory and reads as zeros, as a fresh
        anonymous page would."""
        self.log.debug("fault_outside_regions", address=hex(page))
        self._put_zero(page, PAGE, zeropage=True)

    def _zero_removed(self, r: Region, i: int) -> bool:
        """Serve a page the target dropped: zeros for its whole dropped run.

        The run stays remembered until every piece of it went in: a piece
        that found no mapping (moved by an mremap whose event is still
        pending) must still read as zeros when it is touched at its new place.
        """
        for a, b in r.removed:
            if a <= i < b:
                gen = self._events_applied
                # Every piece, even after one that found no mapping.
                pieces = [
                    self._put_zero(
                        m.start + ((lo - m.first) << r.shift), (hi - lo) << r.shift, zeropage=r.zeropage, page=r.page
                    )
                    for m in list(self._mappings_of(r))
                    for lo, hi in [(max(a, m.first), min(b, m.last))]
                    if lo < hi
                ]
                done = all(pieces)
                if done and gen == self._events_applied:
                    r.removed = subtract(r.removed, a, b)
                return True
        return False

    def _mappings_of(self, r: Region) -> list[Mapping]:
        return self._by_region.get(id(r), [])

    def _mapping_for_page(self, r: Region, i: int) -> Mapping | None:
        for m in self._by_region.get(id(r), ()):
            if m.first <= i < m.last:
                return m
        return None

    def _index_mappings(self) -> None:
        self._starts = [m.start for m in self.mappings]
        by: dict[int, list[Mapping]] = {}
        for m in self.mappings:
            by.setdefault(id(m.region), []).append(m)
        self._by_region = by

    # -- installing ------------------------------------------------------------------
    def _install(self, r: Region, i: int, j: int) -> None:
        """Install pages [i, j) of ``r`` from its (synchronous) source."""
        src_off = r.offset + (i << r.shift)
        try:
            self._install_extents(r, r.source.extents(src_off, (j - i) << r.shift), MISSING)
        except SourceError as e:
            self._source_failed(r, i, j, e, MISSING)

    # -- failure policy ------------------------------------------------------------
    def _source_failed(self, r: Region, i: int, j: int, exc: SourceError, state: int) -> None:
        """The source cannot give pages [i, j) of ``r`` (now in ``state``).

        Never zeros: ``wait`` keeps the pages missing (their threads blocked)
        and retries with backoff; ``sigbus`` poisons them so a touch raises
        SIGBUS and the rest of the image is still served; ``kill`` ends the
        target with SIGKILL. Under ``wait`` and ``sigbus`` a failed read of
        several pages is first read again in pieces (see :meth:`_narrow`):
        the policy is for the pages whose own bytes cannot be had, never for
        good pages that shared a read with them.
        """
        st = self.stats
        st.source_errors += 1
        policy = self.failure_policy
        self.log.error(
            "source_failed",
            source=r.source.name,
            region=r.name,
            offset=hex(r.offset + (i << r.shift)),
            length=(j - i) << r.shift,
            policy=policy,
            error=str(exc),
        )
        if j - i > 1 and policy != "kill":
            if r.source.synchronous:
                self._narrow_now(r, i, j, exc, state)
                return
            if state == INFLIGHT:
                self._spawn(self._narrow(r, i, j, exc))
                return
        self._apply_policy(r, i, j, exc, state)

    def _apply_policy(self, r: Region, i: int, j: int, exc: SourceError, state: int) -> None:
        """The failure policy for pages [i, j) (those still in ``state``)."""
        policy = self.failure_policy
        if policy == "sigbus":
            self._poison(r, i, j, state, exc)
            return
        if policy == "kill":
            self._kill_target(f"source failed: {exc}")
            return
        if state == INFLIGHT:
            r.bitmap[i:j] = r.bitmap[i:j].translate(INFLIGHT_TO_MISSING)
        self._retry.append((r, i, j))
        if self._source_ok.is_set():
            self._source_ok.clear()
            self._spawn(self._retry_source())

    def _narrow_now(self, r: Region, i: int, j: int, exc: SourceError, state: int) -> None:
        """:meth:`_narrow` for a synchronous (local) source: at once, inline."""
        bad: list[tuple[int, int]] = []
        step = max(1, NARROW_PIECE >> r.shift)
        for a in range(i, j, step):
            for lo, hi in runs_of(r.bitmap, state, a, min(j, a + step)):
                if self._read_now(r, lo, hi, state):
                    continue
                for k in range(lo, hi):
                    if r.bitmap[k] == state and (hi - lo == 1 or not self._read_now(r, k, k + 1, state)):
                        if bad and bad[-1][1] == k:
                            bad[-1] = (bad[-1][0], k + 1)
                        else:
                            bad.append((k, k + 1))
            if self.outcome is not None:
                return
        self._narrowed(r, i, j, sum(b - a for a, b in bad))
        for a, b in bad:
            if self.outcome is None:
                self._apply_policy(r, a, b, exc, state)

    def _read_now(self, r: Region, i: int, j: int, state: int) -> bool:
        """Install pages [i, j) (those in ``state``) from a synchronous source; False if the read failed."""
        try:
            self._install_extents(r, r.source.extents(r.offset + (i << r.shift), (j - i) << r.shift), state)
        except SourceError:
            return False
        return True

    def _narrowed(self, r: Region, i: int, j: int, failed: int) -> None:
        self.log.info(
            "failure_narrowed",
            offset=hex(r.offset + (i << r.shift)),
            length=(j - i) << r.shift,
            pages_failed=failed,
            policy=self.failure_policy,
        )

    def _poison(self, r: Region, i: int, j: int, state: int, exc: SourceError) -> None:
        """Touching pages [i, j) (those still in ``state``) raises SIGBUS from now on."""
        try:
            self._put(r, i, j, POISON, state)
        except _uffd.UffdError as e:
            self.log.error("poison_failed", error=str(e), fallback="kill")
            self._kill_target(f"source failed: {exc}")

    async def _narrow(self, r: Region, i: int, j: int, exc: SourceError) -> None:
        """Apply the policy only to the pages the source really cannot give.

        A failed read may hold one bad chunk or frame among megabytes that
        are fine. Its pages stay in flight (touching threads wait) while
        they are read again on the urgent lane, in pieces, and page by page
        where a piece fails; only a page whose own read fails gets the
        policy (``sigbus``: poisoned; ``wait``: retried).
        """
        bad: list[tuple[int, int]] = []
        step = max(1, NARROW_PIECE >> r.shift)
        for a in range(i, j, step):
            for lo, hi in runs_of(r.bitmap, INFLIGHT, a, min(j, a + step)):
                if not await self._read_again(r, lo, hi):
                    for k in range(lo, hi):
                        if self.outcome is not None:
                            return
                        if r.bitmap[k] == INFLIGHT and (hi - lo == 1 or not await self._read_again(r, k, k + 1)):
                            if self.failure_policy == "sigbus":
                                self._poison(r, k, k + 1, INFLIGHT, exc)  # at once: its thread may wait
                            bad.append((k, k + 1))
                if self.outcome is not None:
                    return
        self._narrowed(r, i, j, len(bad))
        if self.failure_policy != "sigbus":
            for a, b in bad:
                if self.outcome is None and r.bitmap[a] == INFLIGHT:
                    self._apply_policy(r, a, b, exc, INFLIGHT)
        self._check_complete()

    async def _read_again(self, r: Region, i: int, j: int) -> bool:
        """Read pages [i, j) again and install them; False if that failed."""
        try:
            extents = await r.source.fetch_urgent(r.offset + (i << r.shift), (j - i) << r.shift, owner=self)
            if self.outcome is None:
                self._install_extents(r, extents, INFLIGHT)
        except SourceError:
            return False
        return True

    async def _retry_source(self) -> None:
        """``wait`` policy: retry the failed ranges until the source answers."""
        while self._retry and self.outcome is None:
            await asyncio.sleep(self._retry_delay)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            pending, self._retry = self._retry, []
            for r, i, j in pending:
                # One missing run at a time, looked up afresh after each
                # await: faults go on installing pages of the range meanwhile,
                # and a page must never be fetched (and counted) twice.
                pos = i
                while pos < j and self.outcome is None:
                    a = r.bitmap.find(MISSING, pos, j)
                    if a == -1:
                        break
                    b = a + 1
                    while b < j and r.bitmap[b] == MISSING:
                        b += 1
                    if r.source.synchronous:
                        self._install(r, a, b)
                    else:
                        r.bitmap[a:b] = b"\x02" * (b - a)
                        await self._fetch_install(r, a, b, fault=True)
                    pos = b
        if self.outcome is None:
            self._retry_delay = RETRY_FIRST
            self.log.info("source_recovered")
            self._source_ok.set()
            self._check_complete()

    def _kill_target(self, why: str) -> None:
        pid = self.pid
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif pid:
                os.kill(pid, signal.SIGKILL)
            else:
                raise ProcessLookupError("no pid known for this target")
        except OSError as e:
            self.log.error("kill_failed", error=str(e))
            self._fail("source_error", f"{why}; the target could not be killed ({e}), it stays blocked")
            return
        self.log.error("target_killed", reason=why)
        self._finish(Outcome("failed", "target_killed", f"{why}; the target was killed (failure policy kill)"))

    @staticmethod
    def _whole_pages(r: Region, extents: list[Extent]) -> list[Extent]:
        """Regroup extents into whole pages of ``r``: a huge page is installed
        by one copy from one contiguous buffer."""
        pieces: list[Extent] = []
        for e in extents:  # cut at the region's page boundaries
            o, n, a = e.offset, e.length, e.address
            while n:
                cut = min(n, r.page - (o - r.offset) % r.page)
                pieces.append(Extent(o, cut, a, e.owner))
                o, n, a = o + cut, n - cut, a + cut if a else 0
        out: list[Extent] = []
        k = 0
        while k < len(pieces):
            start, group = pieces[k].offset, []
            while k < len(pieces) and pieces[k].offset < start + r.page:
                group.append(pieces[k])
                k += 1
            if sum(e.length for e in group) != r.page:
                raise SessionFailed("source_error", f"{r.name}: source extents do not cover a whole {r.page}-byte page")
            if all(e.address == 0 for e in group):
                out.append(Extent(start, r.page, 0))
            elif len(group) == 1:
                out.append(group[0])
            elif addr := r.source.address_of(start, r.page):
                out.append(Extent(start, r.page, addr))
            else:
                buf = bytearray(r.page)  # gather the pieces into one page
                base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
                for e in group:
                    if e.address:
                        ctypes.memmove(base + e.offset - start, e.address, e.length)
                out.append(Extent(start, r.page, base, buf))
        return out

    async def _fetch_install(self, r: Region, i: int, j: int, *, fault: bool) -> None:
        off, n = r.offset + (i << r.shift), (j - i) << r.shift
        try:
            if fault:
                extents = await r.source.fetch_urgent(off, n, owner=self)
            elif await r.source.fetch_into(off, n, functools.partial(self._fill_piece, r), owner=self):
                self._check_complete()
                return
            else:  # pieces the stream could not hand over: read what is still missing plainly
                extents = await r.source.fetch(off, n)
        except SourceError as e:
            if self.outcome is None:
                self._source_failed(r, i, j, e, INFLIGHT)
                # Poisoned pages are settled: they may have been the last.
                self._check_complete()
            return
        if self.outcome is not None:
            return
        done = self._install_inflight(r, extents, i, j)
        if fault:
            self.stats.bytes_fault += done
        else:
            self.stats.bytes_fill += done
        self._check_complete()

    def _fill_piece(self, r: Region, extents: list[Extent]) -> None:
        """Install a verified piece of a background read as it arrives.

        Called from the source's receive path, whose buffer is reused for the
        next piece: so the install happens now, and nothing may escape.
        """
        if self.outcome is not None:
            return
        a = (extents[0].offset - r.offset) >> r.shift
        b = (extents[-1].offset + extents[-1].length - r.offset) >> r.shift
        try:
            self.stats.bytes_fill += self._install_inflight(r, extents, a, b)
        except Exception as e:
            self._handle_error(e)

    def _install_inflight(self, r: Region, extents: list[Extent], i: int, j: int) -> int:
        """Install ``extents`` over pages [i, j) still in flight; the bytes
        installed. If our side of the copy fails (the source's memory is
        unreadable), those pages get the failure policy."""
        st = self.stats
        before = st.bytes_copied + st.bytes_zero
        try:
            self._install_extents(r, extents, INFLIGHT)
        except SourceError as e:
            self._source_failed(r, i, j, e, INFLIGHT)
        return st.bytes_copied + st.bytes_zero - before

    def _copy_run(self, r: Region, m: Mapping, i: int, j: int, src: int) -> None:
        """Install missing pages [i, j) of ``r``, all inside ``m``, from ``src``.

        The fault path's common case in one UFFDIO_COPY, without the general
        loop of :meth:`_put`; anything unusual (a page not missing, a short or
        failed copy) is handed to :meth:`_put`, which re-reads every state.
        """
        bm = r.bitmap
        if j - i > 1 and bm.find(INFLIGHT, i, j) != -1:
            self._put(r, i, j, src, MISSING, m=m)
            return
        try:
            done = _ops.copy(
                self._fd, self._copy_buf, m.start + ((i - m.first) << _PAGE_SHIFT), src, (j - i) << _PAGE_SHIFT, 0
            )
        except _uffd.UffdError:
            done = 0  # _put repeats the call and handles the error by kind
        cnt = done >> _PAGE_SHIFT
        if cnt:
            if cnt == 1:
                bm[i] = SETTLED
            else:
                bm[i : i + cnt] = _ONES[:cnt]
            st = self.stats
            st.pages_missing -= cnt
            st.bytes_copied += done
        if i + cnt < j:
            self._put(r, i + cnt, j, src + (cnt << _PAGE_SHIFT), MISSING, m=m)

    def _install_extents(self, r: Region, extents: list[Extent], want: int) -> None:
        if r.page != PAGE and any(e.length % r.page or e.offset % r.page for e in extents):
            extents = self._whole_pages(r, extents)
        for e in extents:
            a = (e.offset - r.offset) >> r.shift
            self._put(r, a, a + (e.length >> r.shift), e.address, want)

    def _put(
        self, r: Region, a: int, b: int, src: int, want: int, *, wake: bool = True, m: Mapping | None = None
    ) -> None:
        """Install pages [a, b) of ``r`` that are still in state ``want``.

        ``src`` is the daemon address of page ``a``'s bytes (0: zeros). Each
        step re-reads page states and mappings, so events applied during a
        retry (removal, unmap, mremap) are honoured.

        One ioctl must stay inside one VMA, and the target can split a VMA
        with no event at all (``mprotect`` of part of a range): the kernel
        then refuses a run across the new boundary with ENOENT as a whole.
        Such a run is tried again in halves until the pieces fit (a few
        calls per boundary); only a page whose own copy fails is gone.
        """
        bm, st, uffd, shift = r.bitmap, self.stats, self.uffd, r.shift
        pos = a
        cap = 0  # pages per call while narrowing an ENOENT (0: no limit)
        gone = False  # the last page tried alone was not there
        while pos < b:
            if bm[pos] != want:
                pos += 1
                while pos < b and bm[pos] != want:
                    pos += 1
                continue
            if m is None or not m.first <= pos < m.last:
                m = self._mapping_for_page(r, pos)
            if m is None:  # no longer mapped anywhere: nothing to serve
                bm[pos] = SETTLED
                st.pages_missing -= 1
                pos += 1
                continue
            end = min(b, m.last, pos + cap) if cap else min(b, m.last)
            if end - pos > 1:
                for other in _OTHER_STATES[want]:
                    k = bm.find(other, pos, end)
                    if k != -1:
                        end = k
            dst = m.start + ((pos - m.first) << shift)
            n = (end - pos) << shift
            lost = False
            try:
                if src == POISON:
                    done = uffd.poison(dst, n, wake=wake)
                    st.bytes_poisoned += done
                elif src:
                    done = uffd.copy(dst, src + ((pos - a) << shift), n, wake=wake)
                    st.bytes_copied += done
                elif r.zeropage:
                    done = uffd.zeropage(dst, n, wake=wake)
                    st.bytes_zero += done
                else:
                    done = self._copy_zeros(dst, n)
            except _uffd.AlreadyPresent:
                # Installed by someone else (a fork sibling, the restorer, or
                # us for an earlier duplicate fault): wake whoever waits on it.
                done = r.page
                uffd.wake(dst, done)
            except _uffd.Busy:
                self._pump_events()
                m = None  # events may have moved the mappings: look up afresh
                continue
            except _uffd.RangeGone:
                # ENOENT: no registered mapping at dst. The kernel looks the
                # mapping up before it checks for pending layout events, so
                # this also happens while an mremap moved the range and its
                # REMAP event is not read yet: those pages are still missing
                # at the new place and must not be counted as served.
                seen = self._events_applied
                self._pump_events()
                if self._events_applied != seen:
                    m = None  # the layout changed: look the pages up afresh
                    continue
                if end - pos > 1:
                    # Perhaps only past a VMA boundary made after the handoff:
                    # narrow down. After a page found gone, its neighbours are
                    # tried one by one (an unmapped stretch costs one call a
                    # page, never a search per page).
                    self._check_target_alive()
                    cap = 1 if gone else max(1, (end - pos) >> 1)
                    continue
                if self.uffd.features & _LAYOUT_EVENTS == _LAYOUT_EVENTS:
                    return  # the REMAP or UNMAP event will say; leave them missing
                # No events negotiated: this page is simply not there any
                # more. Settled without a byte counted; no thread can wait on it.
                done = n
                lost = True
            except _uffd.UffdError as e:
                if e.errno == errno.EFAULT and src > 0:
                    # Our side of the copy is unreadable: the source's memory
                    # went away (a mapped file truncated under us).
                    raise SourceError(f"{r.source.name}: source bytes unreadable at {dst:#x}: {e}") from None
                raise
            cnt = done >> shift
            if not 0 < cnt <= end - pos:
                raise SessionFailed(
                    "uffd_copy", f"the kernel reported {done} bytes installed at {dst:#x} for a request of {n}"
                )
            bm[pos : pos + cnt] = _ONES[:cnt] if cnt <= len(_ONES) else b"\x01" * cnt
            st.pages_missing -= cnt
            pos += cnt
            gone = lost
            if lost:
                cap = 1
                continue
            cap = 0  # that piece fit: the rest may well fit whole
            if not wake:  # the caller wakes the whole batch at once
                lo, hi = dst, dst + done
                self._batch_lo = min(self._batch_lo, lo) if self._batch_hi else lo
                self._batch_hi = max(self._batch_hi, hi)

    def _check_target_alive(self) -> None:
        """Raise ``TargetGone`` once the target has exited.

        An ENOENT is first narrowed page by page: for a target that is gone
        that would be a loop over every page it had, so its pidfd is asked
        first.
        """
        if self._target_exited():
            raise _uffd.TargetGone(errno.ESRCH, "UFFDIO_COPY (the target exited)")

    def _copy_zeros(self, dst: int, n: int) -> int:
        """Zeros for memory without UFFDIO_ZEROPAGE (hugetlb): copy a zero buffer."""
        step = min(n, ZERO_CHECK_MAX)
        done = self.uffd.copy(dst, zeros_address(), step)
        self.stats.bytes_zero += done
        return done

    def _put_zero(self, addr: int, length: int, *, zeropage: bool, page: int = PAGE) -> bool:
        """Zeros into [addr, addr+length); False if some of it was not there.

        Like :meth:`_put`, a range refused with ENOENT as a whole is tried
        again in halves (it may reach across a VMA boundary made after the
        handoff), and every page that is there gets its zeros.
        """
        end = addr + length
        cap = 0  # bytes per call while narrowing an ENOENT (0: no limit)
        whole = True
        while addr < end:
            n = min(end - addr, cap) if cap else end - addr
            try:
                if zeropage:
                    done = self.uffd.zeropage(addr, n)
                    self.stats.bytes_zero += done
                else:
                    done = self._copy_zeros(addr, n)
            except _uffd.AlreadyPresent:
                done = page
            except _uffd.RangeGone:
                if n > page:
                    self._check_target_alive()
                    cap = page if not whole else max(page, (n // page >> 1) * page)
                    continue
                whole = False  # this page is not there; go on page by page
                cap = page
                addr += page
                continue
            except _uffd.Busy:
                self._pump_events()
                continue
            addr += done
            cap = 0 if whole else cap
        return whole

    # -- address-space events ---------------------------------------------------
    def _event(self, ev: _uffd.Event) -> None:
        if isinstance(ev, _uffd.Remove):
            self._settle(ev.start, ev.end, removed=True)
        elif isinstance(ev, _uffd.Unmap):
            self._settle(ev.start, ev.end, removed=False)
            self._cut(ev.start, ev.end)
        elif isinstance(ev, _uffd.Remap):
            self._remap(ev.old, ev.new, ev.length)
        elif isinstance(ev, _uffd.Fork):
            self._fork(ev.uffd)
        else:  # PageFault never reaches here
            raise SessionFailed("unsupported_event", f"unexpected userfaultfd event {ev!r}")
        self._events_applied += 1

    def _settle(self, start: int, end: int, *, removed: bool) -> None:
        """Pages in [start, end) need nothing more from the source."""
        for m in self.mappings:
            lo, hi = max(start, m.start), min(end, m.end)
            if lo >= hi:
                continue
            r = m.region
            a = m.first + ((lo - m.start) >> r.shift)
            b = m.first + ((hi - m.start + r.page - 1) >> r.shift)
            self.stats.pages_missing -= r.bitmap.count(MISSING, a, b) + r.bitmap.count(INFLIGHT, a, b)
            r.bitmap[a:b] = b"\x01" * (b - a)
            r.removed = subtract(r.removed, a, b)
            if removed:
                r.removed.append((a, b))
        self.log.debug("range_settled", start=hex(start), end=hex(end), removed=removed)

    def _cut(self, start: int, end: int) -> None:
        """Remove [start, end) from the mappings (munmap)."""
        out: list[Mapping] = []
        for m in self.mappings:
            if m.end <= start or m.start >= end:
                out.append(m)
                continue
            sh = m.region.shift
            if m.start < start:
                out.append(Mapping(m.start, start, m.region, m.first))
            if m.end > end:
                out.append(Mapping(end, m.end, m.region, m.first + ((end - m.start) >> sh)))
        self._set_mappings(out)

    def _remap(self, old: int, new: int, length: int) -> None:
        """mremap moved [old, old+length) to ``new``: move those mappings."""
        end = old + length
        out: list[Mapping] = []
        for m in self.mappings:
            if m.end <= old or m.start >= end:
                out.append(m)
                continue
            sh = m.region.shift
            lo, hi = max(m.start, old), min(m.end, end)
            if m.start < lo:
                out.append(Mapping(m.start, lo, m.region, m.first))
            out.append(Mapping(lo - old + new, hi - old + new, m.region, m.first + ((lo - m.start) >> sh)))
            if m.end > hi:
                out.append(Mapping(hi, m.end, m.region, m.first + ((hi - m.start) >> sh)))
        self._set_mappings(out)
        self._seq_next = -1
        for a in (old, new):
            with contextlib.suppress(_uffd.UffdError):
                self.uffd.wake(a, length)
        self.log.debug("range_moved", old=hex(old), new=hex(new), length=length)

    def _set_mappings(self, mappings: list[Mapping]) -> None:
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self._index_mappings()

    def _fork(self, child_fd: int) -> None:
        os.set_blocking(child_fd, False)  # it inherits the restorer's flags
        child_uffd = _uffd.Userfaultfd(child_fd, self.uffd.features)
        if self.host is None:
            # Nobody can run the child's session; closing its uffd would zero
            # fill the child's missing pages, so refuse loudly instead.
            child_uffd.close()
            raise SessionFailed("unsupported_event", "the target forked but this session cannot adopt children")
        # The event does not name the child, which may not even be linked
        # into its parent's children yet: it is told apart later as the one
        # child that was not there before the first event was read.
        ppid, before = self.pid, self._known_children
        clones = {id(r): r.clone_for_fork() for r in self.regions}
        maps = [Mapping(m.start, m.end, clones[id(m.region)], m.first) for m in self.mappings]
        self.children += 1
        sid = f"{self.id}.{self.children}"
        child = RestoreSession(
            sid,
            child_uffd,
            maps,
            self.cfg,
            kind=self.kind,
            pid=None,
            fault_around=self._fault_around,
            fill=self._fill_enabled,
            log=structlog.get_logger().bind(session=sid, kind=self.kind, parent=self.id),
            host=self.host,
            # Every per-request option the child's memory is served under.
            # Not the working set: the child's faults are not the image's
            # first touches, so it neither records nor replays.
            failure_policy=self.failure_policy,
        )
        self.log.info("target_forked", child_session=sid)
        if ppid and before is not None:
            child._pid_search = (self, ppid, before)
            self._pid_searches.add(sid)
        else:
            child.log.warning("target_pid_unknown", reason="the parent's pid is not known")
        self.host.adopt(child)

    async def _find_pid(self) -> None:
        """A forked child's pid and pidfd, as its parent's one new child.

        The child is linked into its parent's children once the fork event
        is read, so this looks until one pid appears that was not there
        before the parent's first event was read, that no sibling claimed
        and whose memory is registered. Never a guess: when two forks of
        one parent are looked for at once, or a child was never told apart,
        or the parent exits first (the child is reparented), the pid stays
        unknown and a forced exit falls back to searching the first target's
        descendants. A wrong pid would be worse than none: that process's
        exit would end this session and close the uffd its child needs.
        """
        assert self._pid_search is not None
        parent, ppid, before = self._pid_search
        self._pid_search = None
        why, delay = "the child did not appear among its parent's children", 0.0
        try:
            for _ in range(PID_SEARCH_TRIES):
                if delay:
                    await asyncio.sleep(delay)
                delay = min(max(delay * 2, PID_SEARCH_FIRST), PID_SEARCH_MAX)
                kids = children_of(ppid)
                if kids is None or parent._target_exited():
                    why = "the parent exited first"
                    break
                if parent._pid_unsure:
                    why = "an earlier fork's child was not told apart"
                    break
                # Only a process whose memory at our first address is still
                # registered can be the child: not a helper the target
                # spawned (and exec'd) meanwhile, which no event announces.
                first = self.mappings[0].start if self.mappings else 0
                new = {k for k in kids - before - parent._child_pids if registered_at(k, first)}
                if not new:
                    continue
                if len(new) > 1 or len(parent._pid_searches) > 1:
                    why = f"forks at once, candidates {sorted(new)}"
                    parent._pid_unsure = True
                    break
                pid = next(iter(new))
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    why = "the child exited first"
                    break
                # A pidfd names one process for good; the pid is that child's
                # only if it still is the parent's child after the open.
                if pid not in (children_of(ppid) or ()):
                    os.close(pidfd)
                    why = "the child exited first"
                    break
                parent._child_pids.add(pid)
                self._set_target(pid, pidfd, ppid)
                return
            else:
                parent._pid_unsure = True  # the child may still turn up, unclaimed
        finally:
            parent._pid_searches.discard(self.id)
        self.log.warning("target_pid_unknown", reason=why, parent_pid=ppid)

    def _set_target(self, pid: int, pidfd: int, ppid: int) -> None:
        """Watch a forked child's pidfd from now on, as a parent session's."""
        if self.uffd.closed:
            os.close(pidfd)
            return
        self.pid, self._pidfd = pid, pidfd
        self.log = self.log.bind(pid=pid)
        # Read before any of this child's own fork events (they wait for
        # the read), so its children to come are not among them.
        self._known_children = children_of(pid)
        if self._loop is not None:
            self._loop.add_reader(pidfd, self._on_target_exit)
            self._readers.append(pidfd)
        self.log.info("target_pid_found", parent_pid=ppid)

    def _target_exited(self) -> bool:
        return self._pidfd is not None and bool(select.select([self._pidfd], [], [], 0)[0])

    # -- working set ----------------------------------------------------------
    def _prepare_working_set(self) -> list[tuple[Region, int, int, int, workingset.WorkingSet, workingset.WsChunk]]:
        """Load each source's record (replay plan) or start recording it.

        A session records only where no usable record exists: a replayed
        session sees few faults, and its record would be worse than the one
        it replayed (docs/working-set.md).
        """
        cfg = self._ws_cfg
        if cfg is None or not cfg.enabled:
            return []
        plan = []
        for src in {id(r.source): r.source for r in self.regions if r.page == PAGE}.values():
            ws, why = workingset.load(src, cfg.dir)
            if ws is not None and not self._fill_enabled:
                # fill: false installs what is faulted and nothing ahead of
                # it, a replay included (docs/working-set.md). The record
                # is kept for sessions that fill.
                self.log.info("working_set_not_replayed", source=src.name, reason="fill is off")
                ws.close()
                continue
            if ws is None:
                if why:
                    self.log.warning("working_set_unusable", source=src.name, reason=why)
                if workingset.ws_path(src, cfg.dir) is None:
                    continue  # nowhere to keep a record
                self._recorders[id(src)] = workingset.Recorder(src, cfg.granule, max(1, cfg.max_bytes // cfg.granule))
                continue
            self._replay_sets.append(ws)
            regions = [r for r in self.regions if r.source is src and r.page == PAGE]
            for c in ws.chunks:
                if ws.has_data:
                    self._ws_index[(id(src), c.index)] = (ws, c)
                c0 = c.index * ws.granule
                c1 = min(c0 + ws.granule, src.size)
                for r in regions:
                    lo, hi = max(c0, r.offset), min(c1, r.offset + (r.npages << r.shift))
                    if lo < hi:
                        plan.append((r, (lo - r.offset) >> r.shift, (hi - r.offset) >> r.shift, lo - c0, ws, c))
            self.log.info("working_set_replay", source=src.name, chunks=len(ws.chunks), recorded_faults=ws.faults)
        if self._recorders:
            self._record_until = time.monotonic() + cfg.record_seconds
        return plan

    def _recording(self) -> bool:
        return bool(self._recorders) and time.monotonic() <= self._record_until

    def _record_window(self, r: Region, i: int, m: Mapping) -> tuple[int, int]:
        """While recording, a fault installs exactly the granule-aligned chunk
        it falls in, and only that chunk is recorded: the record then holds
        what the target used, chunk for chunk. With fault-around off only
        the faulted page goes in (the option means exactly that, recording
        or not); its chunk is recorded all the same."""
        g = self._ws_cfg.granule if self._ws_cfg else PAGE
        chunk = (r.offset + (i << r.shift)) // g
        rec = self._recorders.get(id(r.source))
        if rec is not None:
            rec.note(chunk * g, chunk * g + 1)
        if not self._fault_around:
            return i, i + 1
        a = max(m.first, (chunk * g - r.offset) >> r.shift)
        b = min(m.last, ((chunk + 1) * g - r.offset) >> r.shift)
        return a, b

    async def _record_gate(self) -> None:
        """Hold the fill while the target is still faulting in its working set:
        pages the fill installs never fault, so they would be missing from the
        record. The fill starts once faults pause for ``record_quiet`` seconds
        or the recording window ends."""
        assert self._ws_cfg is not None
        quiet = self._ws_cfg.record_quiet
        try:
            while self.outcome is None:
                now = time.monotonic()
                idle = now - max(self._last_fault, self.stats.started)
                if idle >= quiet or now >= self._record_until:
                    return
                await asyncio.sleep(min(quiet - idle, self._record_until - now) + 0.001)
        finally:
            self._holding_fill = False
            if not self._fill_paused and self.outcome is None:
                self.start_fill()

    def _install_from_ws(self, r: Region, i: int) -> bool:
        """Serve a fault from the recorded copy of its chunk (read ahead,
        sequential) instead of the image, if the record has it."""
        ws_cfg = self._ws_cfg
        if ws_cfg is None:
            return False
        g = ws_cfg.granule
        off = r.offset + (i << r.shift)
        hit = self._ws_index.get((id(r.source), off // g))
        if hit is None:
            return False
        ws, c = hit
        c0 = c.index * ws.granule
        length = min(ws.granule, r.source.size - c0)
        if not ws.verify(c, length):
            return False
        lo, hi = max(c0, r.offset), min(c0 + length, r.offset + (r.npages << r.shift))
        a, b = (lo - r.offset) >> r.shift, (hi - r.offset) >> r.shift
        self._put(r, a, b, c.address + (lo - c0) if c.address else 0, MISSING)
        return True

    async def _replay(
        self, plan: list[tuple[Region, int, int, int, workingset.WorkingSet, workingset.WsChunk]]
    ) -> None:
        """Install the recorded working set in order, in batches, faults first."""
        t0 = time.monotonic()
        st = self.stats
        installed_before = st.bytes_copied + st.bytes_zero
        batch = 0
        fetches: list[asyncio.Task[None]] = []
        try:
            runs: list[tuple[Region, int, int]] = []  # order-only records: merged runs to fetch
            for r, i, j, skip, ws, c in plan:
                if self.outcome is not None:
                    return
                if not ws.has_data:
                    if runs and runs[-1][0] is r and runs[-1][2] == i:
                        runs[-1] = (r, runs[-1][1], j)
                    else:
                        runs.append((r, i, j))
                    continue
                self._on_readable()  # faults first
                if r.bitmap.find(MISSING, i, j) == -1:
                    continue
                length = min(ws.granule, r.source.size - c.index * ws.granule)
                if not ws.verify(c, length):
                    self.log.warning("working_set_chunk_corrupt", path=str(ws.path), chunk=c.index)
                    self._ws_index.pop((id(r.source), c.index), None)
                    continue  # faults and fill serve it from the source
                before = st.bytes_copied + st.bytes_zero
                self._put(r, i, j, c.address + skip if c.address else 0, MISSING, wake=False)
                batch += st.bytes_copied + st.bytes_zero - before
                if batch >= REPLAY_BATCH:
                    self._wake_batch()
                    batch = 0
                    self._check_complete()
                    await asyncio.sleep(0)
            self._wake_batch()
            # Order-only (remote) records: the whole set requested at once, so
            # the source pipelines it; the fill waits until it has landed.
            assert self._loop is not None
            for r, i, j in runs:
                for a, b in runs_of(r.bitmap, MISSING, i, j):
                    r.bitmap[a:b] = b"\x02" * (b - a)
                    fetches.append(self._loop.create_task(self._fetch_install(r, a, b, fault=False)))
            if fetches:
                await asyncio.gather(*fetches, return_exceptions=True)
            installed = st.bytes_copied + st.bytes_zero - installed_before
            if not fetches:
                st.bytes_fill += installed
            self.log.info("working_set_replayed", bytes=installed, seconds=round(time.monotonic() - t0, 4))
            self._check_complete()
        finally:
            for t in fetches:
                t.cancel()
            self._wake_batch()
            self._replaying = False
            if not self._fill_paused and self.outcome is None:
                self.start_fill()

    def _wake_batch(self) -> None:
        if self._batch_hi:
            lo, hi = self._batch_lo, self._batch_hi
            self._batch_lo = self._batch_hi = 0
            if self.uffd.closed:  # the session ended meanwhile: nobody left to wake
                return
            with contextlib.suppress(_uffd.UffdError):
                self.uffd.wake(lo, hi - lo)

    async def _save_working_set(self) -> None:
        cfg = self._ws_cfg
        if cfg is None or self.state not in ("complete", "target_exited"):
            return
        for rec in self._recorders.values():
            if not rec.order:
                continue
            path = workingset.ws_path(rec.src, cfg.dir)
            if path is None:
                continue
            elapsed = min(self.stats.seconds, cfg.record_seconds)
            try:
                copies = None if rec.src.synchronous else await _fetch_copies(rec)
                n = await asyncio.to_thread(workingset.save, rec, path, elapsed, copies)
            except (OSError, SourceError) as e:
                self.log.warning("working_set_not_saved", path=str(path), error=str(e))
                continue
            self.log.info("working_set_recorded", path=str(path), chunks=len(rec.order), faults=rec.faults, bytes=n)

    # -- fill ---------------------------------------------------------------------
    def _next_fill(self) -> tuple[int, int]:
        """(region index, page) of the next missing page, from the fill cursor."""
        n = len(self.regions)
        ri, page = self._fill_region, self._fill_page
        for step in range(n + 1):
            r = self.regions[(ri + step) % n]
            i = r.bitmap.find(MISSING, page if step == 0 else 0)
            if i != -1:
                return (ri + step) % n, i
        return -1, -1

    def _fill_run(self, ri: int, i: int) -> tuple[Region, int]:
        r = self.regions[ri]
        # The first chunks are small and double up to fill_chunk: the target's
        # first faults come right after the handoff, and a fault never waits
        # for more than the chunk being copied.
        chunk = self._fill_step = min(self._fill_step << 1, self.cfg.fill_chunk)
        j = min(i + max(1, chunk >> r.shift), r.npages)
        for other in (SETTLED, INFLIGHT):
            k = r.bitmap.find(other, i, j)
            if k != -1:
                j = k
        return r, j

    async def _fill(self) -> None:
        st = self.stats
        inflight: set[asyncio.Task[None]] = set()
        slice_end = time.monotonic() + FILL_SLICE
        while self.outcome is None:
            if not self._source_ok.is_set():
                await self._source_ok.wait()  # wait policy: the retry task leads
                continue
            self._on_readable()  # faults first
            if self.outcome is not None:
                return
            ri, i = self._next_fill()
            if ri < 0:
                if inflight:
                    await asyncio.wait(inflight)
                    continue
                self._check_complete()
                return
            r, j = self._fill_run(ri, i)
            self._fill_region, self._fill_page = ri, j
            if r.source.synchronous:
                before = st.bytes_copied + st.bytes_zero
                self._install(r, i, j)
                st.bytes_fill += st.bytes_copied + st.bytes_zero - before
                self._check_complete()
                # Chunks go back to back for a short slice (the uffd is read
                # before each, so faults still come first); then other
                # sessions and listeners get the loop.
                now = time.monotonic()
                if now >= slice_end:
                    await asyncio.sleep(0)
                    slice_end = time.monotonic() + FILL_SLICE
            else:
                r.bitmap[i:j] = b"\x02" * (j - i)
                assert self._loop is not None
                task = self._loop.create_task(self._fetch_install(r, i, j, fault=False))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                task.add_done_callback(self._task_done)
                if len(inflight) >= FILL_INFLIGHT:
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(0)

    # -- reporting ------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        st = self.stats
        return {
            "session": self.id,
            "kind": self.kind,
            "pid": self.pid,
            "state": self.state,
            "sources": sorted({r.source.name for r in self.regions}),
            "pages_total": st.pages_total,
            "pages_installed": st.pages_total - st.pages_missing,
            "faults": st.faults,
            "bytes_copied": st.bytes_copied,
            "bytes_zero": st.bytes_zero,
            "bytes_fault": st.bytes_fault,
            "bytes_fill": st.bytes_fill,
            "fault_p50_us": st.percentile_us(0.5),
            "fault_p99_us": st.percentile_us(0.99),
            "seconds": round(st.seconds, 6),
            "failure_policy": self.failure_policy,
            "source_errors": st.source_errors,
            "bytes_poisoned": st.bytes_poisoned,
        }


async def _fetch_copies(rec: workingset.Recorder) -> dict[int, bytes]:
    """The recorded chunks of an asynchronous (remote) source, fetched once
    more so the record can hold them: a later replay then never waits on the
    network for its working set."""
    g, src = rec.granule, rec.src
    out: dict[int, bytes] = {}

    async def one(idx: int) -> None:
        off = idx * g
        n = min(g, src.size - off)
        if n <= 0:
            return
        buf = bytearray(n)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        for e in await src.fetch(off, n):
            if e.address:
                ctypes.memmove(base + e.offset - off, e.address, e.length)
        out[idx] = bytes(buf)

    order = list(rec.order)
    for k in range(0, len(order), 16):  # a window of requests in flight
        await asyncio.gather(*(one(idx) for idx in order[k : k + 16]))
    return out
