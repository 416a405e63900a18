"""Serving lazypaged snapshots: compressed (thread pool) or raw layout (mmap).

Theory of operation. A fault asks for a range; the range is covered by one
or more chunks. Zero pages (from the index's bitmap) become zero extents and
need no chunk data at all. Every other page is served from its chunk's bytes,
and a chunk's bytes are only ever handed out after its checksum matched:

- compressed layout: the missing chunks of a request are decompressed, side
  by side, into one *slab* (a recycled buffer) by a thread pool: one job per
  slab while the pool is busy, a slab split among idle workers otherwise
  (zstd and ``pread`` release the GIL, so the event loop keeps serving
  other sessions). Neighbouring chunks thus sit next to each other in memory
  and a 2 MiB fill becomes one UFFDIO_COPY, not 32. Extents hold their slab
  as ``Extent.owner``; a small LRU cache holds recently decoded chunks (and
  so their slabs); a slab's memory is reused only once nothing refers to it.
  A request that starts where the previous one ended (the fill) also starts
  decoding the next READ_AHEAD bytes, so the next request finds its chunks
  decoded or under way; those enter the cache like any other, once verified;
- raw layout: the chunk is already page-aligned in the file, so extents point
  into a read-only mapping of it (zero-copy). Each chunk is hashed from the
  mapping the first time it is used and remembered as verified.

A chunk that fails its checks raises :class:`~lazypaged.snapshot.ChunkError`
(a SourceError naming the chunk, its region and what failed); nothing from
it is returned, and the same chunk fails the same way next time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import functools
import mmap
import operator
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..snapshot.format import ChunkKind, Region
from ..snapshot.reader import SnapshotReader
from .base import Extent, PageSource, SourceError
from .lease import FileLease
from .raw import _map, _munmap

#: Decoded data the cache may keep alive: 16 MiB covers the fills in flight of
#: a few sessions plus what their faults touch again, without holding much.
DEFAULT_CACHE_BYTES = 16 << 20
#: Zero runs at least this long inside a data chunk are served as zero pages;
#: shorter ones are copied along with the data around them (fewer ioctls).
ZERO_RUN_MIN_PAGES = 8
#: Most chunks decoded into one slab: 32 × 64 KiB is the session's 2 MiB fill.
SLAB_CHUNKS = 32
#: Bytes decoded ahead of a sequential reader (the fill), beyond what it asked
#: for: its next requests then find their chunks decoded or under way, and the
#: decoders keep busy while the loop installs. Two slabs; well within the cache.
READ_AHEAD = 4 << 20
#: Idle slabs kept per size for reuse (sizes are powers of two chunks).
_SPARE_SLABS = 8
#: Decompression threads per source; the machine has few cores to share.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

_ZERO_RUN = b"\1" * ZERO_RUN_MIN_PAGES
_ZERO = int(ChunkKind.ZERO)


def _long_zero_runs(flags: bytes, pa: int, pb: int) -> list[tuple[int, int]]:
    """Runs of at least ZERO_RUN_MIN_PAGES zero pages, clipped to pages [pa, pb).

    A run counts by its whole length, even where it reaches past the range."""
    out = []
    pos = pa
    if pa < pb and flags[pa]:
        end = flags.find(0, pa)
        end = len(flags) if end < 0 else end
        if end - (flags.rfind(0, 0, pa) + 1) >= ZERO_RUN_MIN_PAGES:
            out.append((pa, min(end, pb)))
        pos = end
    while pos < pb:
        start = flags.find(_ZERO_RUN, pos, pb + ZERO_RUN_MIN_PAGES - 1)
        if start < 0 or start >= pb:
            break
        end = flags.find(0, start)
        end = len(flags) if end < 0 else end
        out.append((start, min(end, pb)))
        pos = end
    return out


#: A span of a request: [start, stop) in the source, and whether it holds data
#: (False: served as zeros). Data spans run across chunk edges.
_Span = tuple[int, int, bool]


class _SnapshotSourceBase(PageSource):
    def __init__(self, reader: SnapshotReader) -> None:
        self.reader = reader
        self.name = reader.name
        self.path = reader.path
        self.size = reader.size
        self._region_offsets = [r.offset for r in reader.regions]
        table = reader.index.chunks
        self._chunk_offsets = table.offset.tolist()
        self._chunk_ends = list(map(operator.add, table.offset, table.length))
        self._kinds = table.kind

    @property
    def regions(self) -> tuple[Region, ...]:
        """The snapshot's regions (name, original address, offset in this source)."""
        return self.reader.regions

    def _spans(self, offset: int, length: int) -> list[_Span]:
        """Split a request into zero spans and data spans.

        Zero runs of ZERO_RUN_MIN_PAGES or more become zero spans; shorter
        ones are copied with the data around them (splitting them out would
        cost two more ioctls than copying those few pages), unless a span
        holds no data page at all. Works on whole runs of the zero bitmap with
        bytes.find, so scattered zero pages cost no Python per page, and data
        spans are not cut per chunk: a 2 MiB fill is a handful of spans."""
        self.check_range(offset, length)
        out: list[_Span] = []
        end = offset + length
        rd = self.reader
        ri = bisect.bisect_right(self._region_offsets, offset) - 1
        while offset < end:
            r = rd.regions[ri]
            base, page = r.offset, r.page_size
            stop = min(end, base + r.length)
            flags = rd.index.zero_pages[ri]
            pa, pb = (offset - base) // page, -(-(stop - base) // page)
            pos = pa
            for zs, ze in _long_zero_runs(flags, pa, pb):
                if zs > pos:
                    out.append((max(offset, base + pos * page), base + zs * page, flags.find(0, pos, zs) >= 0))
                out.append((max(offset, base + zs * page), min(stop, base + ze * page), False))
                pos = ze
            if pos < pb:
                out.append((max(offset, base + pos * page), stop, flags.find(0, pos, pb) >= 0))
            offset = stop
            ri += 1
        return out

    def _chunks_of(self, spans: list[_Span]) -> list[int]:
        """The data chunks the data spans need, in order, each once (zero
        chunks inside a data span are served as zeros, never read)."""
        out: list[int] = []
        offsets, ends, kinds = self._chunk_offsets, self._chunk_ends, self._kinds
        for start, stop, data in spans:
            if not data:
                continue
            i = bisect.bisect_right(offsets, start) - 1
            if out and out[-1] >= i:
                i = out[-1] + 1
            while i < len(ends) and offsets[i] < stop:
                if kinds[i] != _ZERO:
                    out.append(i)
                i += 1
        return out

    def _build(self, spans: list[_Span], addresses: dict[int, tuple[int, object]]) -> list[Extent]:
        """Extents for the spans, given each data chunk's (address, owner).

        Neighbouring pieces whose bytes continue each other in memory (chunks
        decoded side by side), or that are both zeros, become one extent: one
        ioctl instead of many."""
        out: list[Extent] = []
        offsets, ends = self._chunk_offsets, self._chunk_ends
        # The extent being grown: [run_start, run_stop) at run_addr (0: zeros).
        run_start = run_stop = run_addr = 0
        run_owner: object = None
        for start, stop, data in spans:
            i = bisect.bisect_right(offsets, start) - 1 if data else -1
            pos = start
            while pos < stop:
                if i < 0:
                    cut, addr, owner = stop, 0, None
                else:
                    cut = min(stop, ends[i])
                    hit = addresses.get(i)  # none for a zero chunk
                    addr, owner = (hit[0] + pos - offsets[i], hit[1]) if hit else (0, None)
                    i += 1
                if run_stop == pos and (
                    (addr == run_addr == 0)
                    or (addr and run_addr and owner is run_owner and run_addr + pos - run_start == addr)
                ):
                    run_stop = cut
                else:
                    if run_stop > run_start:
                        out.append(Extent(run_start, run_stop - run_start, run_addr, run_owner))
                    run_start, run_stop, run_addr, run_owner = pos, cut, addr, owner
                pos = cut
        if run_stop > run_start:
            out.append(Extent(run_start, run_stop - run_start, run_addr, run_owner))
        return out

    def close(self) -> None:
        self.reader.close()


class _Slab:
    """Decoded chunks side by side. Extents and cache entries hold it; when the
    last lets go, its memory goes back to the pool for the next decode."""

    __slots__ = ("address", "data", "members", "pool")

    def __init__(self, data: bytearray, pool: _SlabPool) -> None:
        self.data = data
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        self.pool = pool
        self.members: list[int] = []  # chunks the cache may find in it

    def __del__(self) -> None:
        self.pool.give_back(self.data)


class _SlabPool:
    """Recycled slabs: a fresh allocation page-faults its way in and costs more
    CPU than decompressing into it. Sizes are powers of two chunks."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._free: dict[int, list[bytearray]] = {}
        self.closed = False

    def take(self, chunks: int) -> _Slab:
        size = self.chunk_size << max(0, chunks - 1).bit_length()
        free = self._free.get(size)
        return _Slab(free.pop() if free else bytearray(size), self)

    def give_back(self, data: bytearray) -> None:
        free = self._free.setdefault(len(data), [])
        if not self.closed and len(free) < _SPARE_SLABS:
            free.append(data)

    def clear(self) -> None:
        self.closed = True
        self._free.clear()


#: A decode job: per chunk of its part, None or the chunk's error.
_Job = asyncio.Future[list[SourceError | None]]
#: Where a chunk is being decoded: the job, its slab, the chunk's offset in the
#: slab and its position in the job's results.
_Pending = tuple[_Job, _Slab, int, int]


class CompressedSnapshotSource(_SnapshotSourceBase):
    """A zstd-compressed snapshot, decompressed chunk by chunk off the event loop."""

    synchronous = False

    def __init__(
        self,
        reader: SnapshotReader,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        workers: int = DEFAULT_WORKERS,
        read_ahead: int = READ_AHEAD,
    ) -> None:
        super().__init__(reader)
        self._chunk_size = reader.header.chunk_size
        self._slabs = _SlabPool(self._chunk_size)
        # The cache: where each recently decoded chunk is, and its slabs in
        # LRU order (evicted whole: one slab's chunks were decoded together).
        self._where: dict[int, tuple[_Slab, int]] = {}
        self._lru: OrderedDict[int, _Slab] = OrderedDict()
        self._cache_limit = cache_bytes
        self._cache_bytes = 0  # bytes of the slabs the cache keeps alive
        self._inflight: dict[int, _Pending] = {}
        self._jobs = 0  # decode jobs submitted and not settled
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.chunks_decoded = 0
        # Read-ahead: where the last fetch ended, and how far decoding was
        # started ahead of it.
        self._read_ahead = min(read_ahead, cache_bytes // 4)
        self._next = -1
        self._ahead = 0

    # -- cache ----------------------------------------------------------------------
    def _lookup(self, need: list[int], have: dict[int, tuple[int, object]]) -> list[int]:
        """Fill ``have`` from the cache; the chunks it does not hold, in order."""
        where, lru = self._where, self._lru
        missing = []
        last: _Slab | None = None
        for i in need:
            hit = where.get(i)
            if hit is None:
                missing.append(i)
                continue
            slab = hit[0]
            have[i] = (slab.address + hit[1], slab)
            if slab is not last:  # a fill's chunks mostly share one slab
                lru.move_to_end(id(slab))
                last = slab
        return missing

    def _remember(self, slab: _Slab, items: list[tuple[int, int]]) -> None:
        """Cache decoded chunks of ``slab``; evict least recently used slabs over the limit."""
        if not items:
            return
        for i, off in items:
            self._where[i] = (slab, off)
            slab.members.append(i)
        key = id(slab)  # unique while the slab is in the LRU (it is alive)
        if key in self._lru:
            self._lru.move_to_end(key)
        else:
            self._lru[key] = slab
            self._cache_bytes += len(slab.data)
        while self._cache_bytes > self._cache_limit and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._cache_bytes -= len(old.data)
            for i in old.members:
                if self._where.get(i, (None, 0))[0] is old:
                    del self._where[i]

    # -- decoding -------------------------------------------------------------------
    def _plan(self, chunks: Sequence[int]) -> list[tuple[_Slab, list[tuple[int, int]]]]:
        """Slabs for chunks to decode: consecutive chunks share one, in order.

        A slab ends after a region's short last chunk, so the bytes in a slab
        always continue each other as they do in the source."""
        plans: list[tuple[_Slab, list[tuple[int, int]]]] = []
        run: list[int] = []
        full = self._chunk_size
        offsets, ends = self._chunk_offsets, self._chunk_ends
        for i in chunks:
            if run and (i != run[-1] + 1 or len(run) == SLAB_CHUNKS or ends[run[-1]] - offsets[run[-1]] != full):
                plans.append(self._slab_for(run))
                run = []
            run.append(i)
        if run:
            plans.append(self._slab_for(run))
        return plans

    def _slab_for(self, run: list[int]) -> tuple[_Slab, list[tuple[int, int]]]:
        slab = self._slabs.take(len(run))
        return slab, [(i, k * self._chunk_size) for k, i in enumerate(run)]

    def _decode_into(self, slab: _Slab, items: list[tuple[int, int]]) -> list[SourceError | None]:
        """Decode chunks into their slots (runs in a worker thread); per-chunk errors."""
        view = memoryview(slab.data)
        size = self._chunk_size
        return list(self.reader.chunks_into([(i, view[off : off + size]) for i, off in items]))

    def extents(self, offset: int, length: int) -> list[Extent]:
        spans = self._spans(offset, length)
        have: dict[int, tuple[int, object]] = {}
        missing = self._lookup(self._chunks_of(spans), have)
        if missing:
            self._check_open()
        for slab, items in self._plan(missing):
            errors = self._decode_into(slab, items)
            good = [item for item, err in zip(items, errors, strict=True) if err is None]
            self.chunks_decoded += len(good)
            self._remember(slab, good)
            bad = [err for err in errors if err is not None]
            if bad:
                raise bad[0]
            for i, off in items:
                have[i] = (slab.address + off, slab)
        return self._build(spans, have)

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        spans = self._spans(offset, length)
        have: dict[int, tuple[int, object]] = {}
        missing = self._lookup(self._chunks_of(spans), have)
        waits: dict[int, _Pending] = {}
        if missing:
            inflight = self._inflight
            todo = []
            for i in missing:
                pending = inflight.get(i)
                if pending is None:
                    todo.append(i)
                else:  # several faults on one chunk share its decode
                    waits[i] = pending
            if todo:
                self._submit(todo, waits)
        end = offset + length
        if self._read_ahead:
            if offset == self._next:
                self._decode_ahead(end)
            else:
                self._ahead = end
            self._next = end
        if waits:
            await asyncio.wait({pending[0] for pending in waits.values()})
            first_error: BaseException | None = None
            for i, (job, slab, off, k) in waits.items():
                if job.cancelled():
                    err: BaseException | None = SourceError(f"{self.name}: source closed while decoding")
                else:
                    err = job.exception() or job.result()[k]
                if err is not None:
                    first_error = first_error or err
                else:
                    have[i] = (slab.address + off, slab)
            if first_error is not None:
                raise first_error
        return self._build(spans, have)

    def _decode_ahead(self, end: int) -> None:
        """Start decoding the data chunks in the next ``read_ahead`` bytes after
        a sequential request that ended at ``end``. They enter the cache like
        any decode: only once their checksum matched (a bad one is left out,
        and whoever asks for it gets the error then)."""
        start, stop = max(end, self._ahead), min(self.size, end + self._read_ahead)
        if start >= stop:
            return
        self._ahead = stop
        where, inflight = self._where, self._inflight
        todo = [i for i in self._chunks_of(self._spans(start, stop - start)) if i not in where and i not in inflight]
        if todo:
            self._submit(todo, {})

    def _submit(self, chunks: list[int], waits: dict[int, _Pending]) -> None:
        """Start decode jobs for ``chunks``; one per slab while the pool is busy,
        a slab split among the idle workers otherwise (a lone fault waits less)."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        for slab, items in self._plan(chunks):
            parts = max(1, min(len(items), self._workers - self._jobs))
            per = -(-len(items) // parts)
            for k in range(0, len(items), per):
                part = items[k : k + per]
                job: _Job = asyncio.ensure_future(loop.run_in_executor(pool, self._decode_into, slab, part))
                self._jobs += 1
                job.add_done_callback(functools.partial(self._settle, slab, part))
                for n, (i, off) in enumerate(part):
                    waits[i] = self._inflight[i] = (job, slab, off, n)

    def _settle(self, slab: _Slab, part: list[tuple[int, int]], job: _Job) -> None:
        """On the loop, when a decode job ends: cache what decoded, forget the job."""
        self._jobs -= 1
        inflight = self._inflight
        for i, _ in part:
            if inflight.get(i, (None,))[0] is job:
                del inflight[i]
        if job.cancelled() or job.exception() is not None:
            return
        results = job.result()
        good = [item for item, err in zip(part, results, strict=True) if err is None]
        self.chunks_decoded += len(good)
        self._remember(slab, good)

    def _check_open(self) -> None:
        if self.reader.fd < 0:
            raise SourceError(f"{self.name}: source is closed")

    def _executor(self) -> ThreadPoolExecutor:
        self._check_open()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="lzpg-dec")
        return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._where.clear()
        self._lru.clear()
        self._cache_bytes = 0
        self._slabs.clear()
        super().close()


class MappedSnapshotSource(_SnapshotSourceBase):
    """A raw-layout snapshot served zero-copy from a read-only mapping.

    The mapping is read only under a read lease (sources/lease.py) and only
    for chunks the file held when it was taken; each new lease verifies
    every chunk again before use. Without a lease a chunk is read with
    ``pread`` into a buffer and verified there (a cut file reads short).
    """

    synchronous = True

    def __init__(self, reader: SnapshotReader) -> None:
        super().__init__(reader)
        if not reader.header.raw:
            raise SourceError(f"{self.name}: compressed snapshots cannot be mapped")
        self._length = reader.header.file_size
        self._base = _map(reader.fd, self._length, mmap.PROT_READ, mmap.MAP_SHARED)
        self._verified = bytearray(len(reader.index.chunks))
        self._lease = FileLease(reader.fd)
        self._verified_gen = self._lease.generation
        self._lease.valid()

    def pinned(self) -> contextlib.AbstractContextManager[bool]:
        return self._lease.pinned()

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._base:
            raise SourceError(f"{self.name}: source is closed")
        spans = self._spans(offset, length)
        needed = self._chunks_of(spans)
        addrs: dict[int, tuple[int, object]] = {}
        if not needed:
            return self._build(spans, addrs)
        lease = self._lease
        chunks = self.reader.index.chunks
        if not lease.valid():
            for i in needed:  # no lease: read and verify each chunk in a buffer of our own
                buf = bytearray(chunks[i].length)
                self.reader.chunk_into(i, buf)
                addrs[i] = (ctypes.addressof(ctypes.c_char.from_buffer(buf)), buf)
            return self._build(spans, addrs)
        if lease.generation != self._verified_gen:  # the file may have changed between leases
            self._verified = bytearray(len(chunks))
            self._verified_gen = lease.generation
        last = chunks[needed[-1]]
        if lease.size < last.frame_offset + last.frame_size:
            raise SourceError(f"{self.name}: file shrank to {lease.size} bytes while being served")
        for i in needed:
            c = chunks[i]
            addr = self._base + c.frame_offset + c.data_offset
            if not self._verified[i]:
                self.reader.check(i, memoryview((ctypes.c_char * c.length).from_address(addr)).cast("B"))
                self._verified[i] = 1
            addrs[i] = (addr, None)
        return self._build(spans, addrs)

    def close(self) -> None:
        base, self._base = self._base, 0
        self._lease.close()
        if base:
            _munmap(base, self._length)
        super().close()
