"""Serving lazypaged snapshots: compressed (thread pool) or raw layout (mmap).

Theory of operation. A fault asks for a range; the range is covered by one
or more chunks. Zero pages (from the index's bitmap) become zero extents and
need no chunk data at all. Every other page is served from its chunk's bytes,
and a chunk's bytes are only ever handed out after its checksum matched:

- compressed layout: the chunks of a request are read and decompressed in a
  thread pool, one batch per worker (zstd and ``pread`` release the GIL, so
  the event loop keeps serving other sessions), verified, and kept in a
  small LRU cache. Chunks are decoded into recycled buffers; the extents
  point into them and hold them as ``Extent.owner``, so a buffer is reused
  only once no extent and no cache entry refers to it;
- raw layout: the chunk is already page-aligned in the file, so extents point
  into a read-only mapping of it (zero-copy). Each chunk is hashed from the
  mapping the first time it is used and remembered as verified.

A chunk that fails its checks raises :class:`~lazypaged.snapshot.ChunkError`
(a SourceError naming the chunk, its region and what failed); nothing from
it is returned, and the same chunk fails the same way next time.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import mmap
import os
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from ..snapshot.format import ChunkKind
from ..snapshot.reader import SnapshotReader
from .base import Extent, PageSource, SourceError
from .raw import _map, _munmap

#: Decompressed chunks kept: at the 64 KiB default, 16 MiB of recent data, which
#: covers a sequential reader's chunk plus readahead without holding much memory.
DEFAULT_CACHE_BYTES = 16 << 20
#: Zero runs at least this long inside a data chunk are served as zero pages;
#: shorter ones are copied along with the data around them (fewer ioctls).
ZERO_RUN_MIN_PAGES = 8
#: Free buffers kept beyond the cache: enough for the decodes of a few fills in flight.
_SPARE_BUFFERS = 64
#: Decompression threads per source; the machine has few cores to share.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


class _SnapshotSourceBase(PageSource):
    def __init__(self, reader: SnapshotReader) -> None:
        self.reader = reader
        self.name = reader.name
        self.size = reader.size

    @property
    def regions(self) -> tuple[object, ...]:
        """The snapshot's regions (name, original address, offset in this source)."""
        return self.reader.regions

    def _chunks_for(self, offset: int, length: int) -> range:
        self.check_range(offset, length)
        if length == 0:
            return range(0)
        return range(self.reader.chunk_at(offset), self.reader.chunk_at(offset + length - 1) + 1)

    def _data_chunks(self, offset: int, length: int) -> list[int]:
        """Chunks whose part of the range holds a non-zero page: only those are read."""
        out = []
        end = offset + length
        rd = self.reader
        for i in self._chunks_for(offset, length):
            c = rd.index.chunks[i]
            if c.kind == ChunkKind.ZERO:
                continue
            page = rd.regions[c.region].page_size
            a = (max(offset, c.offset) - c.offset) // page
            b = -(-(min(end, c.offset + c.length) - c.offset) // page)
            if rd.zero_flags(i).find(0, a, b) >= 0:
                out.append(i)
        return out

    def _build(self, offset: int, length: int, addresses: dict[int, tuple[int, object]]) -> list[Extent]:
        """Extents for [offset, offset+length) given each data chunk's (address, owner).

        Zero runs shorter than ZERO_RUN_MIN_PAGES inside a data chunk are
        copied from the chunk with their neighbours: splitting them out would
        cost two more ioctls than the copy of those few pages."""
        out: list[Extent] = []
        end = offset + length
        rd = self.reader
        for i in self._chunks_for(offset, length):
            c = rd.index.chunks[i]
            lo, hi = max(offset, c.offset), min(end, c.offset + c.length)
            if i not in addresses:  # a zero chunk, or only zero pages of it asked for
                _add(out, Extent(lo, hi - lo, 0))
                continue
            addr, owner = addresses[i]
            page = rd.regions[c.region].page_size
            flags = rd.zero_flags(i)
            p = (lo - c.offset) // page
            data_from = -1
            pos = lo
            while pos < hi:
                zero = flags[p]
                q = flags.find(0 if zero else 1, p)
                q = len(flags) if q < 0 else q
                run_end = min(hi, c.offset + q * page)
                if zero and q - (flags.rfind(0, 0, p) + 1) >= ZERO_RUN_MIN_PAGES:
                    if data_from >= 0:
                        out.append(Extent(data_from, pos - data_from, addr + data_from - c.offset, owner))
                        data_from = -1
                    _add(out, Extent(pos, run_end - pos, 0))
                elif data_from < 0:
                    data_from = pos
                pos, p = run_end, q
            if data_from >= 0:
                out.append(Extent(data_from, hi - data_from, addr + data_from - c.offset, owner))
        return out

    def close(self) -> None:
        self.reader.close()


def _add(out: list[Extent], e: Extent) -> None:
    """Append, merging with a preceding zero extent so zeros go in one ioctl."""
    if out and e.address == 0 and out[-1].address == 0 and out[-1].offset + out[-1].length == e.offset:
        out[-1] = Extent(out[-1].offset, out[-1].length + e.length, 0)
    else:
        out.append(e)


class _ChunkBuffer:
    """One decoded chunk. Extents hold it as their owner; when the last one
    lets go, its memory goes back to the pool for the next decode."""

    __slots__ = ("address", "data", "pool")

    def __init__(self, data: bytearray, pool: _BufferPool) -> None:
        self.data = data
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        self.pool = pool

    def __del__(self) -> None:
        self.pool.give_back(self.data)


class _BufferPool:
    """Recycled chunk-sized buffers: a fresh 64 KiB allocation page-faults its
    way in and costs more CPU than decompressing into it."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: deque[bytearray] = deque()

    def take(self) -> _ChunkBuffer:
        try:
            data = self._free.pop()
        except IndexError:
            data = bytearray(self.size)
        return _ChunkBuffer(data, self)

    def give_back(self, data: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(data)

    def clear(self) -> None:
        self.keep = 0
        self._free.clear()


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
        chunk = reader.header.chunk_size
        self._cache: OrderedDict[int, _ChunkBuffer] = OrderedDict()
        self._cache_chunks = max(1, cache_bytes // chunk)
        self._buffers = _BufferPool(chunk, self._cache_chunks + _SPARE_BUFFERS)
        self._inflight: dict[int, asyncio.Future[_ChunkBuffer]] = {}
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.chunks_decoded = 0

    @property
    def _cache_bytes(self) -> int:
        return len(self._cache) * self._buffers.size

    def _cached(self, i: int) -> _ChunkBuffer | None:
        buf = self._cache.get(i)
        if buf is not None:
            self._cache.move_to_end(i)
        return buf

    def _remember(self, i: int, buf: _ChunkBuffer) -> None:
        self._cache[i] = buf
        self._cache.move_to_end(i)
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)

    def _decode(self, i: int, buf: _ChunkBuffer) -> None:
        self.reader.chunk_into(i, buf.data)  # raises ChunkError before anything is returned
        self.chunks_decoded += 1

    def extents(self, offset: int, length: int) -> list[Extent]:
        bufs: dict[int, tuple[int, object]] = {}
        for i in self._data_chunks(offset, length):
            buf = self._cached(i)
            if buf is None:
                self._check_open()
                buf = self._buffers.take()
                self._decode(i, buf)
                self._remember(i, buf)
            bufs[i] = (buf.address, buf)
        return self._build(offset, length, bufs)

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        loop = asyncio.get_running_loop()
        wanted: dict[int, _ChunkBuffer | asyncio.Future[_ChunkBuffer]] = {}
        new: list[tuple[int, asyncio.Future[_ChunkBuffer]]] = []
        for i in self._data_chunks(offset, length):
            buf = self._cached(i)
            if buf is not None:
                wanted[i] = buf
                continue
            fut = self._inflight.get(i)
            if fut is None:
                # Several faults on one chunk share one decompression.
                fut = self._inflight[i] = loop.create_future()
                new.append((i, fut))
            wanted[i] = fut
        if new:
            self._dispatch(loop, new)
        pending = [f for f in wanted.values() if isinstance(f, asyncio.Future)]
        if pending:
            await asyncio.wait(pending)
        bufs: dict[int, tuple[int, object]] = {}
        for i, f in wanted.items():
            buf = f.result() if isinstance(f, asyncio.Future) else f
            bufs[i] = (buf.address, buf)
        return self._build(offset, length, bufs)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, new: list[tuple[int, asyncio.Future[_ChunkBuffer]]]) -> None:
        """Hand the chunks to the pool in one batch per worker: per-chunk jobs
        would cost the event loop more in handoffs than the decoding saves."""
        pool = self._executor()
        per = -(-len(new) // min(self._workers, len(new)))
        for k in range(0, len(new), per):
            batch = new[k : k + per]
            bufs = [self._buffers.take() for _ in batch]
            job = loop.run_in_executor(pool, self._decode_batch, [i for i, _ in batch], bufs)
            job.add_done_callback(functools.partial(self._settle, batch, bufs))

    def _decode_batch(self, chunks: list[int], bufs: list[_ChunkBuffer]) -> list[SourceError | None]:
        errors: list[SourceError | None] = []
        for i, buf in zip(chunks, bufs, strict=True):
            try:
                self._decode(i, buf)
                errors.append(None)
            except SourceError as e:
                errors.append(e)
        return errors

    def _settle(
        self,
        batch: list[tuple[int, asyncio.Future[_ChunkBuffer]]],
        bufs: list[_ChunkBuffer],
        job: asyncio.Future[list[SourceError | None]],
    ) -> None:
        if job.cancelled():
            outcome: list[BaseException | None] = [SourceError(f"{self.name}: source closed while decoding")] * len(
                batch
            )
        elif (exc := job.exception()) is not None:
            outcome = [exc] * len(batch)
        else:
            outcome = list(job.result())
        for (i, fut), buf, err in zip(batch, bufs, outcome, strict=True):
            if self._inflight.get(i) is fut:
                del self._inflight[i]
            if fut.done():
                continue
            if err is None:
                self._remember(i, buf)
                fut.set_result(buf)
            else:
                fut.set_exception(err)
                fut.exception()  # every waiter sees it; none left unretrieved if nobody waits

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
        self._cache.clear()
        self._buffers.clear()
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
        addrs: dict[int, tuple[int, object]] = {}
        for i in self._data_chunks(offset, length):
            c = self.reader.index.chunks[i]
            addr = self._base + c.frame_offset + c.data_offset
            if not self._verified[i]:
                self.reader.check(i, memoryview((ctypes.c_char * c.length).from_address(addr)).cast("B"))
                self._verified[i] = 1
            addrs[i] = (addr, None)
        return self._build(offset, length, addrs)

    def close(self) -> None:
        base, self._base = self._base, 0
        if base:
            _munmap(base, self._length)
        super().close()
