"""Serving lazypaged snapshots: compressed (thread pool) or raw layout (mmap).

Theory of operation. A fault asks for a range; the range is covered by one
or more chunks. Zero pages (from the index's bitmap) become zero extents and
need no chunk data at all. Every other page is served from its chunk's bytes,
and a chunk's bytes are only ever handed out after its checksum matched:

- compressed layout: the missing chunks of a request are decompressed, side
  by side, into one *slab* (a recycled buffer), split among the workers of a
  thread pool (zstd and ``pread`` release the GIL, so the event loop keeps
  serving other sessions). Neighbouring chunks thus sit next to each other in
  memory and a 2 MiB fill becomes one UFFDIO_COPY, not 32. Extents hold their
  slab as ``Extent.owner``; a small LRU cache holds recently decoded chunks
  (and so their slabs); a slab's memory is reused only once nothing refers
  to it;
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
import ctypes
import functools
import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..snapshot.format import ChunkKind, Region
from ..snapshot.reader import SnapshotReader
from .base import Extent, PageSource, SourceError
from .raw import _map, _munmap

#: Decoded data the cache may keep alive: 16 MiB covers the fills in flight of
#: a few sessions plus what their faults touch again, without holding much.
DEFAULT_CACHE_BYTES = 16 << 20
#: Zero runs at least this long inside a data chunk are served as zero pages;
#: shorter ones are copied along with the data around them (fewer ioctls).
ZERO_RUN_MIN_PAGES = 8
#: Most chunks decoded into one slab: 32 × 64 KiB is the session's 2 MiB fill.
SLAB_CHUNKS = 32
#: Idle slabs kept per size for reuse (sizes are powers of two chunks).
_SPARE_SLABS = 8
#: Decompression threads per source; the machine has few cores to share.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

_ZERO_RUN = b"\1" * ZERO_RUN_MIN_PAGES


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


def _add(out: list[Extent], e: Extent) -> None:
    """Append, merging with the previous extent when both are zeros or both are
    data that continue each other in memory (one ioctl instead of two)."""
    if out:
        last = out[-1]
        if last.offset + last.length == e.offset and (
            (e.address == 0 and last.address == 0)
            or (e.address and last.address and e.owner is last.owner and last.address + last.length == e.address)
        ):
            out[-1] = Extent(last.offset, last.length + e.length, last.address, last.owner)
            return
    out.append(e)


#: A piece of a request: [start, end) in the source, and the chunk serving it
#: (-1: served as zeros).
_Piece = tuple[int, int, int]


class _SnapshotSourceBase(PageSource):
    def __init__(self, reader: SnapshotReader) -> None:
        self.reader = reader
        self.name = reader.name
        self.path = reader.path
        self.size = reader.size
        self._region_offsets = [r.offset for r in reader.regions]

    @property
    def regions(self) -> tuple[Region, ...]:
        """The snapshot's regions (name, original address, offset in this source)."""
        return self.reader.regions

    def _pieces(self, offset: int, length: int) -> list[_Piece]:
        """Split a request into zero pieces and pieces of single data chunks.

        Zero runs of ZERO_RUN_MIN_PAGES or more become zero pieces; shorter
        ones are copied with the data around them (splitting them out would
        cost two more ioctls than copying those few pages), unless a piece
        holds no data page at all. Works on whole runs of the zero bitmap with
        bytes.find, so scattered zero pages cost no Python per page."""
        self.check_range(offset, length)
        out: list[_Piece] = []
        end = offset + length
        rd = self.reader
        ri = bisect.bisect_right(self._region_offsets, offset) - 1
        while offset < end:
            r = rd.regions[ri]
            stop = min(end, r.offset + r.length)
            page = r.page_size
            flags = rd.index.zero_pages[ri]
            pa, pb = (offset - r.offset) // page, -(-(stop - r.offset) // page)
            pos = pa
            for zs, ze in _long_zero_runs(flags, pa, pb):
                if zs > pos:
                    self._data_pieces(r, flags, pos, zs, offset, stop, out)
                out.append((max(offset, r.offset + zs * page), min(stop, r.offset + ze * page), -1))
                pos = ze
            if pos < pb:
                self._data_pieces(r, flags, pos, pb, offset, stop, out)
            offset = stop
            ri += 1
        return out

    def _data_pieces(self, r: Region, flags: bytes, pa: int, pb: int, lo: int, hi: int, out: list[_Piece]) -> None:
        """Pages [pa, pb) of region ``r`` (clipped to source [lo, hi)), cut at chunk edges."""
        page = r.page_size
        per_chunk = self.reader.header.chunk_size // page
        chunks = self.reader.index.chunks
        p = pa
        while p < pb:
            k = p // per_chunk
            q = min(pb, (k + 1) * per_chunk)
            ci = r.first_chunk + k
            data = chunks[ci].kind != ChunkKind.ZERO and flags.find(0, p, q) >= 0
            out.append((max(lo, r.offset + p * page), min(hi, r.offset + q * page), ci if data else -1))
            p = q

    def _build(self, pieces: list[_Piece], addresses: dict[int, tuple[int, object]]) -> list[Extent]:
        """Extents for the pieces, given each data chunk's (address, owner)."""
        out: list[Extent] = []
        chunks = self.reader.index.chunks
        for start, stop, ci in pieces:
            if ci < 0:
                _add(out, Extent(start, stop - start, 0))
            else:
                addr, owner = addresses[ci]
                _add(out, Extent(start, stop - start, addr + start - chunks[ci].offset, owner))
        return out

    def close(self) -> None:
        self.reader.close()


def _chunks_of(pieces: list[_Piece]) -> list[int]:
    """The data chunks the pieces need, in order, each once."""
    out: list[int] = []
    for _, _, ci in pieces:
        if ci >= 0 and (not out or out[-1] != ci):
            out.append(ci)
    return out


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


_Job = asyncio.Future[dict[int, SourceError | None]]


class CompressedSnapshotSource(_SnapshotSourceBase):
    """A zstd-compressed snapshot, decompressed chunk by chunk off the event loop."""

    synchronous = False

    def __init__(
        self,
        reader: SnapshotReader,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        workers: int = DEFAULT_WORKERS,
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
        self._inflight: dict[int, tuple[_Job, _Slab, int]] = {}
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.chunks_decoded = 0

    # -- cache ----------------------------------------------------------------------
    def _cached(self, i: int) -> tuple[_Slab, int] | None:
        hit = self._where.get(i)
        if hit is not None:
            self._lru.move_to_end(id(hit[0]))
        return hit

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
        """Slabs for chunks to decode: consecutive chunks share one, in order."""
        plans: list[tuple[_Slab, list[tuple[int, int]]]] = []
        run: list[int] = []
        for i in chunks:
            if run and (i != run[-1] + 1 or len(run) == SLAB_CHUNKS):
                plans.append(self._slab_for(run))
                run = []
            run.append(i)
        if run:
            plans.append(self._slab_for(run))
        return plans

    def _slab_for(self, run: list[int]) -> tuple[_Slab, list[tuple[int, int]]]:
        slab = self._slabs.take(len(run))
        return slab, [(i, k * self._chunk_size) for k, i in enumerate(run)]

    def _decode_into(self, slab: _Slab, items: list[tuple[int, int]]) -> dict[int, SourceError | None]:
        """Decode chunks into their slots (runs in a worker thread); per-chunk errors."""
        view = memoryview(slab.data)
        size = self._chunk_size
        errors = self.reader.chunks_into([(i, view[off : off + size]) for i, off in items])
        return {i: err for (i, _), err in zip(items, errors, strict=True)}

    def extents(self, offset: int, length: int) -> list[Extent]:
        pieces = self._pieces(offset, length)
        have: dict[int, tuple[int, object]] = {}
        missing = []
        for i in _chunks_of(pieces):
            hit = self._cached(i)
            if hit is None:
                missing.append(i)
            else:
                have[i] = (hit[0].address + hit[1], hit[0])
        if missing:
            self._check_open()
        for slab, items in self._plan(missing):
            errors = self._decode_into(slab, items)
            good = [(i, off) for i, off in items if errors[i] is None]
            self.chunks_decoded += len(good)
            self._remember(slab, good)
            bad = [err for err in errors.values() if err is not None]
            if bad:
                raise bad[0]
            for i, off in items:
                have[i] = (slab.address + off, slab)
        return self._build(pieces, have)

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        loop = asyncio.get_running_loop()
        pieces = self._pieces(offset, length)
        have: dict[int, tuple[int, object]] = {}
        waits: dict[int, tuple[_Job, _Slab, int]] = {}
        missing = []
        for i in _chunks_of(pieces):
            hit = self._cached(i)
            if hit is not None:
                have[i] = (hit[0].address + hit[1], hit[0])
            elif i in self._inflight:  # several faults on one chunk share its decode
                waits[i] = self._inflight[i]
            else:
                missing.append(i)
        if missing:
            pool = self._executor()
            for slab, items in self._plan(missing):
                per = -(-len(items) // self._workers)
                for k in range(0, len(items), per):
                    part = items[k : k + per]
                    job: _Job = asyncio.ensure_future(loop.run_in_executor(pool, self._decode_into, slab, part))
                    job.add_done_callback(functools.partial(self._settle, slab, part))
                    for i, off in part:
                        waits[i] = self._inflight[i] = (job, slab, off)
        if waits:
            await asyncio.wait({job for job, _, _ in waits.values()})
        first_error: BaseException | None = None
        for i, (job, slab, off) in waits.items():
            if job.cancelled():
                err: BaseException | None = SourceError(f"{self.name}: source closed while decoding")
            else:
                err = job.exception() or job.result()[i]
            if err is not None:
                first_error = first_error or err
            else:
                have[i] = (slab.address + off, slab)
        if first_error is not None:
            raise first_error
        return self._build(pieces, have)

    def _settle(self, slab: _Slab, part: list[tuple[int, int]], job: _Job) -> None:
        """On the loop, when a decode job ends: cache what decoded, forget the job."""
        ok = not job.cancelled() and job.exception() is None
        results = job.result() if ok else {}
        for i, _ in part:
            if self._inflight.get(i, (None,))[0] is job:
                del self._inflight[i]
        good = [(i, off) for i, off in part if ok and results[i] is None]
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
    """A raw-layout snapshot served zero-copy from a read-only mapping."""

    synchronous = True

    def __init__(self, reader: SnapshotReader) -> None:
        super().__init__(reader)
        if not reader.header.raw:
            raise SourceError(f"{self.name}: compressed snapshots cannot be mapped")
        self._length = reader.header.file_size
        self._base = _map(reader.fd, self._length, mmap.PROT_READ, mmap.MAP_SHARED)
        self._verified = bytearray(len(reader.index.chunks))

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._base:
            raise SourceError(f"{self.name}: source is closed")
        pieces = self._pieces(offset, length)
        needed = _chunks_of(pieces)
        if needed:
            # Reading a mapping past the end of its file raises SIGBUS in the
            # daemon: check the file still holds these chunks before hashing.
            last = self.reader.index.chunks[needed[-1]]
            size = os.fstat(self.reader.fd).st_size
            if size < last.frame_offset + last.frame_size:
                raise SourceError(f"{self.name}: file shrank to {size} bytes while being served")
        addrs: dict[int, tuple[int, object]] = {}
        for i in needed:
            c = self.reader.index.chunks[i]
            addr = self._base + c.frame_offset + c.data_offset
            if not self._verified[i]:
                self.reader.check(i, memoryview((ctypes.c_char * c.length).from_address(addr)).cast("B"))
                self._verified[i] = 1
            addrs[i] = (addr, None)
        return self._build(pieces, addrs)

    def close(self) -> None:
        base, self._base = self._base, 0
        if base:
            _munmap(base, self._length)
        super().close()
