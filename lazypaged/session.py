"""One restore session: a uffd, the regions it serves, and how it serves them.

A session owns a received userfaultfd. Faults are read in batches on the
event loop and served synchronously from the source (for local sources an
mmap address goes straight into UFFDIO_COPY); a fill task streams every
remaining page in chunks, reading the uffd before each chunk so faults
always go first. When nothing is missing the ranges are unregistered, the
uffd closed and the restorer told.

Page states live in one ``bytearray`` per region: 0 = missing (to be served
from the source), 1 = settled (installed, removed by the target, or gone).
Pages the target dropped with MADV_DONTNEED are settled but remembered in
``Region.removed``: touching them again must give zeros, never snapshot data.

Fault-around: a fault installs a window starting at the faulting page. The
window starts at ``fault_around_min`` and doubles (up to ``fault_around_max``)
while each fault lands right after the previous window, and the fill
continues from where the last fault's window ended, so a sequential reader
finds the pages ahead of it already in.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from . import uffd as _uffd
from .config import SessionConfig
from .sources import PageSource, SourceError
from .uffd import abi

PAGE = mmap.PAGESIZE
SHIFT = PAGE.bit_length() - 1
_MSG = abi.UFFD_MSG_STRUCT
_FAULT = abi.UFFD_EVENT_PAGEFAULT
_READ_BYTES = 64 * abi.UFFD_MSG_SIZE
_ONES = b"\x01" * (64 << 20 >> SHIFT)  # enough to mark 64 MiB in one slice


class Region:
    """Target [start, start+length) backed by ``source`` at ``offset``."""

    __slots__ = ("bitmap", "end", "length", "npages", "offset", "removed", "source", "start")

    def __init__(self, start: int, length: int, source: PageSource, offset: int) -> None:
        self.start = start
        self.length = length
        self.end = start + length
        self.source = source
        self.offset = offset
        self.npages = length >> SHIFT
        self.bitmap = bytearray(self.npages)
        #: Page-index runs [a, b) the target dropped and must read as zeros.
        self.removed: list[tuple[int, int]] = []


@dataclass
class SessionStats:
    faults: int = 0
    pages_total: int = 0
    pages_missing: int = 0
    bytes_copied: int = 0
    bytes_zero: int = 0
    bytes_fault: int = 0
    bytes_fill: int = 0
    fault_ns: int = 0
    #: Fault service time histogram: bucket k counts faults of < 2**k µs.
    latency_us_log2: list[int] = field(default_factory=lambda: [0] * 32)
    started: float = field(default_factory=time.monotonic)
    first_fault_at: float | None = None
    ended: float | None = None

    def percentile_us(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile fault latency."""
        total = sum(self.latency_us_log2)
        if not total:
            return None
        want, seen = q * total, 0
        for k, n in enumerate(self.latency_us_log2):
            seen += n
            if seen >= want:
                return float(1 << k)
        return float(1 << 31)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass(frozen=True)
class Outcome:
    """How a session ended: ``complete``, ``target_exited`` or ``failed``."""

    state: str
    code: str = ""
    message: str = ""


class SessionFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RestoreSession:
    def __init__(
        self,
        sid: str,
        uffd: _uffd.Userfaultfd,
        regions: list[Region],
        cfg: SessionConfig,
        *,
        kind: str = "native",
        pid: int | None = None,
        pidfd: int | None = None,
        fault_around: bool | None = None,
        fill: bool | None = None,
        log: Any = None,
    ) -> None:
        self.id = sid
        self.kind = kind
        self.pid = pid
        self.uffd = uffd
        self.regions = sorted(regions, key=lambda r: r.start)
        self._starts = [r.start for r in self.regions]
        self.cfg = cfg
        self.log = log or structlog.get_logger().bind(session=sid, kind=kind, pid=pid)
        self.stats = SessionStats()
        self.stats.pages_total = self.stats.pages_missing = sum(r.npages for r in self.regions)
        self.state = "running"
        self.outcome: Outcome | None = None
        self._pidfd = pidfd
        self._fault_around = cfg.fault_around if fault_around is None else fault_around
        self._fill_enabled = cfg.fill if fill is None else fill
        self._wmin = cfg.fault_around_min >> SHIFT
        self._wmax = cfg.fault_around_max >> SHIFT
        self._window = self._wmin
        self._seq_next = -1
        self._fill_region = 0
        self._fill_page = 0
        self._done: asyncio.Future[Outcome] | None = None
        self._fill_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[int] = []
        #: Called once when the session ends (any outcome).
        self.on_end: Callable[[RestoreSession], None] | None = None
        #: Called when the uffd is finally closed (for a failed session: when
        #: its target exits or the daemon abandons it).
        self.on_released: Callable[[RestoreSession], None] | None = None
        #: The restorer keeps its own copy of the uffd, so closing ours cannot
        #: make the kernel zero-fill the target (see uffd/fd.py).
        self.keeps_uffd = False

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> Outcome:
        """Serve until the image is in, the target exits, or the session fails."""
        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        fd = self.uffd.fileno()
        loop.add_reader(fd, self._on_readable)
        self._readers.append(fd)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._on_target_exit)
            self._readers.append(self._pidfd)
        self._check_complete()
        if self._fill_enabled and not self._done.done():
            self._fill_task = loop.create_task(self._fill(), name=f"fill-{self.id}")
        try:
            return await asyncio.shield(self._done)
        finally:
            if self._fill_task is not None and not self._fill_task.done():
                self._fill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._fill_task

    def _finish(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.state = outcome.state
        self.stats.ended = time.monotonic()
        loop = self._loop
        if outcome.state == "failed":
            # Keep the uffd open: closing it would let the kernel zero-fill
            # the target's missing pages. Only the pidfd watch stays, so the
            # fd is released once the target is gone.
            if loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(self.uffd.fileno())
        else:
            self._release()
        if self._done is not None and not self._done.done():
            self._done.set_result(outcome)
        if self.on_end is not None:
            self.on_end(self)

    def _release(self) -> None:
        loop = self._loop
        for fd in self._readers:
            if loop is not None:
                loop.remove_reader(fd)
        self._readers.clear()
        if self.outcome is not None and self.outcome.state == "complete":
            for r in self.regions:
                try:
                    self.uffd.unregister(r.start, r.length)
                except _uffd.UffdError as e:
                    self.log.debug("unregister_failed", start=hex(r.start), error=str(e))
        self.uffd.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.on_released is not None:
            self.on_released(self)

    def _on_target_exit(self) -> None:
        if self.outcome is None:
            self._finish(Outcome("target_exited", "target_exited", "the target process exited"))
        elif self.outcome.state == "failed" and not self.uffd.closed:
            self._release()

    def abandon(self) -> None:
        """Stop serving and close the uffd (shutdown: only when that is safe)."""
        if self.outcome is None:
            self._finish(Outcome("failed", "shutdown", "the daemon shut down before the restore completed"))
        if not self.uffd.closed:
            self._release()

    def _fail(self, code: str, message: str) -> None:
        self.log.error("session_failed", code=code, error=message)
        self._finish(Outcome("failed", code, message))

    def _check_complete(self) -> None:
        if self.stats.pages_missing == 0 and self.outcome is None:
            self._finish(Outcome("complete"))

    # -- faults -----------------------------------------------------------------
    def _on_readable(self) -> None:
        if self.outcome is not None:
            return
        try:
            data = os.read(self.uffd.fileno(), _READ_BYTES)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail("uffd_read", f"reading the userfaultfd failed: {e}")
            return
        self._handle(data)

    def _handle(self, data: bytes) -> None:
        try:
            if len(data) % abi.UFFD_MSG_SIZE:
                raise SessionFailed("uffd_read", f"short uffd read of {len(data)} bytes")
            for code, _a, _b, _c, flags, address, _tid in _MSG.iter_unpack(data):
                if code == _FAULT:
                    self._fault(address)
                else:
                    self._event(_uffd.decode(_MSG.pack(code, _a, _b, _c, flags, address, _tid))[0])
                if self.outcome is not None:
                    return
            self._check_complete()
        except _uffd.TargetGone:
            self._finish(Outcome("target_exited", "target_exited", "the target's address space is gone"))
        except SourceError as e:
            self._fail("source_error", str(e))
        except SessionFailed as e:
            self._fail(e.code, str(e))
        except Exception as e:  # a bug: fail this session, keep the daemon serving
            self.log.exception("session_bug")
            self._fail("internal_error", f"{type(e).__name__}: {e}")

    def _region_index(self, addr: int) -> int:
        starts = self._starts
        lo, hi = 0, len(starts)
        while lo < hi:  # bisect_right, inlined for the common 1-region case
            mid = (lo + hi) >> 1
            if starts[mid] <= addr:
                lo = mid + 1
            else:
                hi = mid
        i = lo - 1
        if i >= 0 and addr < self.regions[i].end:
            return i
        return -1

    def _fault(self, address: int) -> None:
        t0 = time.perf_counter_ns()
        st = self.stats
        st.faults += 1
        if st.first_fault_at is None:
            st.first_fault_at = time.monotonic()
        page = address & ~(PAGE - 1)
        ri = self._region_index(page)
        if ri < 0:
            self._stray_fault(page)
            return
        r = self.regions[ri]
        i = (page - r.start) >> SHIFT
        if r.bitmap[i]:
            if not self._zero_removed(r, i):
                self.uffd.wake(page, PAGE)  # already served: a late duplicate
        else:
            if self._fault_around:
                if page == self._seq_next:
                    self._window = min(self._window << 1, self._wmax)
                else:
                    self._window = self._wmin
                j = min(i + self._window, r.npages)
            else:
                j = i + 1
            k = r.bitmap.find(1, i, j)
            if k != -1:
                j = k
            before = st.bytes_copied + st.bytes_zero
            self._install(r, i, j)
            st.bytes_fault += st.bytes_copied + st.bytes_zero - before
            self._seq_next = r.start + (j << SHIFT)
            self._fill_region, self._fill_page = ri, j
        ns = time.perf_counter_ns() - t0
        st.fault_ns += ns
        st.latency_us_log2[min((ns // 1000).bit_length(), 31)] += 1

    def _stray_fault(self, page: int) -> None:
        """A fault outside every region: memory the restorer registered itself
        without naming a source. It holds no snapshot data, so it is new
        memory and reads as zeros, as a fresh anonymous page would."""
        self.log.warning("fault_outside_regions", address=hex(page))
        self._put_zero(page, PAGE)

    def _zero_removed(self, r: Region, i: int) -> bool:
        for n, (a, b) in enumerate(r.removed):
            if a <= i < b:
                del r.removed[n]
                self._put_zero(r.start + (a << SHIFT), (b - a) << SHIFT)
                return True
        return False

    def _put_zero(self, addr: int, length: int) -> None:
        end = addr + length
        while addr < end:
            try:
                done = self.uffd.zeropage(addr, end - addr)
            except _uffd.AlreadyPresent:
                done = PAGE
            except _uffd.RangeGone:
                return
            except _uffd.Busy:
                self._pump_events()
                continue
            self.stats.bytes_zero += done
            addr += done

    # -- installing ------------------------------------------------------------------
    def _install(self, r: Region, i: int, j: int) -> None:
        """Install pages [i, j) of ``r`` (all missing) from its source."""
        src_off = r.offset + (i << SHIFT)
        for e in r.source.extents(src_off, (j - i) << SHIFT):
            a = (e.offset - r.offset) >> SHIFT
            self._put(r, a, a + (e.length >> SHIFT), e.address)

    def _put(self, r: Region, a: int, b: int, src: int) -> None:
        """Copy source bytes at ``src`` (or zeros if 0) into pages [a, b)."""
        bm, st, uffd = r.bitmap, self.stats, self.uffd
        base = a
        pos = a
        while pos < b:
            if bm[pos]:  # settled meanwhile (an event applied during a retry)
                pos = bm.find(0, pos, b)
                if pos == -1:
                    return
                continue
            end = bm.find(1, pos, b)
            if end == -1:
                end = b
            dst = r.start + (pos << SHIFT)
            n = (end - pos) << SHIFT
            try:
                if src:
                    done = uffd.copy(dst, src + ((pos - base) << SHIFT), n)
                    st.bytes_copied += done
                else:
                    done = uffd.zeropage(dst, n)
                    st.bytes_zero += done
            except _uffd.AlreadyPresent:
                done = PAGE  # installed by someone else: it is there, move on
            except _uffd.Busy:
                self._pump_events()
                continue
            except _uffd.RangeGone:
                done = n  # no longer mapped: nothing to serve there
            cnt = done >> SHIFT
            bm[pos : pos + cnt] = _ONES[:cnt] if cnt <= len(_ONES) else b"\x01" * cnt
            st.pages_missing -= cnt
            pos += cnt

    # -- events -----------------------------------------------------------------
    def _pump_events(self) -> None:
        """Read what the kernel queued (needed before a Busy ioctl can succeed).

        Non-fault events change the regions and are applied now, in order;
        faults read here are served afterwards, from the updated state.
        """
        data = self.uffd.read_raw()
        if not data:
            return
        faults = []
        for ev in _uffd.decode(data):
            if isinstance(ev, _uffd.PageFault):
                faults.append(ev.address)
            else:
                self._event(ev)
        for address in faults:
            self._fault(address)

    def _event(self, ev: _uffd.Event) -> None:
        if isinstance(ev, _uffd.Remove | _uffd.Unmap):
            self._settle_range(ev.start, ev.end, removed=isinstance(ev, _uffd.Remove))
        else:
            raise SessionFailed("unsupported_event", f"unsupported userfaultfd event {ev!r}")

    def _settle_range(self, start: int, end: int, *, removed: bool) -> None:
        for r in self.regions:
            lo, hi = max(start, r.start), min(end, r.end)
            if lo >= hi:
                continue
            a, b = (lo - r.start) >> SHIFT, (hi - r.start + PAGE - 1) >> SHIFT
            self.stats.pages_missing -= r.bitmap.count(0, a, b)
            r.bitmap[a:b] = b"\x01" * (b - a)
            r.removed = [(x, y) for x, y in _subtract(r.removed, a, b)]
            if removed:
                r.removed.append((a, b))
        self.log.debug("range_settled", start=hex(start), end=hex(end), removed=removed)

    # -- fill ---------------------------------------------------------------------
    def _next_fill(self) -> tuple[int, int]:
        """(region index, page) of the next missing page, from the fill cursor."""
        n = len(self.regions)
        ri, page = self._fill_region, self._fill_page
        for step in range(n + 1):
            r = self.regions[(ri + step) % n]
            i = r.bitmap.find(0, page if step == 0 else 0)
            if i != -1:
                return (ri + step) % n, i
        return -1, -1

    async def _fill(self) -> None:
        chunk = max(1, self.cfg.fill_chunk >> SHIFT)
        st = self.stats
        while self.outcome is None:
            self._on_readable()  # faults first
            if self.outcome is not None:
                return
            ri, i = self._next_fill()
            if ri < 0:
                self._check_complete()
                return
            r = self.regions[ri]
            j = min(i + chunk, r.npages)
            k = r.bitmap.find(1, i, j)
            if k != -1:
                j = k
            before = st.bytes_copied + st.bytes_zero
            try:
                self._install(r, i, j)
            except _uffd.TargetGone:
                self._finish(Outcome("target_exited", "target_exited", "the target's address space is gone"))
                return
            except SourceError as e:
                self._fail("source_error", str(e))
                return
            except SessionFailed as e:
                self._fail(e.code, str(e))
                return
            except Exception as e:
                self.log.exception("session_bug")
                self._fail("internal_error", f"{type(e).__name__}: {e}")
                return
            st.bytes_fill += st.bytes_copied + st.bytes_zero - before
            self._fill_region, self._fill_page = ri, j
            self._check_complete()
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
        }


def _subtract(runs: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    out = []
    for x, y in runs:
        if y <= a or x >= b:
            out.append((x, y))
            continue
        if x < a:
            out.append((x, a))
        if y > b:
            out.append((b, y))
    return out
