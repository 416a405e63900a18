"""Serving lazypaged snapshots: compressed (thread pool) or raw layout (mmap).

Theory of operation. A fault asks for a range; the range is covered by one
or more chunks. Zero pages (from the index's bitmap) become zero extents and
need no chunk data at all. Every other page is served from its chunk's bytes,
and a chunk's bytes are only ever handed out after its checksum matched:

- compressed layout: the chunk is read and decompressed in a thread pool
  (zstd and ``pread`` release the GIL, so the event loop keeps serving other
  sessions), verified, and kept in a small LRU cache. The extents point into
  the ``bytes`` object, which rides along as ``Extent.owner``;
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
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ..snapshot.format import ChunkKind
from ..snapshot.reader import SnapshotReader
from .base import Extent, PageSource, SourceError
from .raw import _map, _munmap

#: Decompressed chunks kept: at the 64 KiB default, 16 MiB of recent data, which
#: covers a sequential reader's chunk plus readahead without holding much memory.
DEFAULT_CACHE_BYTES = 16 << 20
#: Decompression threads per source; the machine has few cores to share.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def buffer_address(buf: bytes) -> int:
    """Address of a bytes object's contents; valid while ``buf`` is alive."""
    addr = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    assert addr is not None
    return addr


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

    def _build(self, offset: int, length: int, addresses: dict[int, tuple[int, object]]) -> list[Extent]:
        """Extents for [offset, offset+length) given each data chunk's (address, owner)."""
        out: list[Extent] = []
        end = offset + length
        rd = self.reader
        for i in self._chunks_for(offset, length):
            c = rd.index.chunks[i]
            lo, hi = max(offset, c.offset), min(end, c.offset + c.length)
            if c.kind == ChunkKind.ZERO:
                _add(out, Extent(lo, hi - lo, 0))
                continue
            addr, owner = addresses[i]
            page = rd.regions[c.region].page_size
            flags = rd.zero_flags(i)
            p = (lo - c.offset) // page
            while True:
                run_start = max(lo, c.offset + p * page)
                if run_start >= hi:
                    break
                zero = flags[p]
                q = flags.find(0 if zero else 1, p)
                q = len(flags) if q < 0 else q
                run_end = min(hi, c.offset + q * page)
                if zero:
                    _add(out, Extent(run_start, run_end - run_start, 0))
                else:
                    out.append(Extent(run_start, run_end - run_start, addr + run_start - c.offset, owner))
                p = q
        return out

    def close(self) -> None:
        self.reader.close()


def _add(out: list[Extent], e: Extent) -> None:
    """Append, merging with a preceding zero extent so zeros go in one ioctl."""
    if out and e.address == 0 and out[-1].address == 0 and out[-1].offset + out[-1].length == e.offset:
        out[-1] = Extent(out[-1].offset, out[-1].length + e.length, 0)
    else:
        out.append(e)


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
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._inflight: dict[int, asyncio.Future[bytes]] = {}
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self.chunks_decoded = 0

    def _cached(self, i: int) -> bytes | None:
        buf = self._cache.get(i)
        if buf is not None:
            self._cache.move_to_end(i)
        return buf

    def _remember(self, i: int, buf: bytes) -> None:
        if i in self._cache:
            return
        self._cache[i] = buf
        self._cache_bytes += len(buf)
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)

    def _decode(self, i: int) -> bytes:
        buf = self.reader.chunk(i)  # raises ChunkError before anything is returned
        self.chunks_decoded += 1
        return buf

    def extents(self, offset: int, length: int) -> list[Extent]:
        bufs: dict[int, tuple[int, object]] = {}
        for i in self._chunks_for(offset, length):
            if self.reader.index.chunks[i].kind == ChunkKind.ZERO:
                continue
            buf = self._cached(i)
            if buf is None:
                buf = self._decode(i)
                self._remember(i, buf)
            bufs[i] = (buffer_address(buf), buf)
        return self._build(offset, length, bufs)

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        loop = asyncio.get_running_loop()
        wanted: dict[int, asyncio.Future[bytes] | bytes] = {}
        for i in self._chunks_for(offset, length):
            if self.reader.index.chunks[i].kind == ChunkKind.ZERO:
                continue
            buf = self._cached(i)
            if buf is not None:
                wanted[i] = buf
                continue
            fut = self._inflight.get(i)
            if fut is None:
                # Several faults on one chunk share one decompression.
                fut = self._inflight[i] = asyncio.ensure_future(loop.run_in_executor(self._executor(), self._decode, i))
                fut.add_done_callback(functools.partial(self._settle, i))
            wanted[i] = fut
        bufs: dict[int, tuple[int, object]] = {}
        pending = [f for f in wanted.values() if not isinstance(f, bytes)]
        if pending:
            # Wait for all, so no decode is left running unobserved, then fail on the first error.
            await asyncio.wait(pending)
        for i, f in wanted.items():
            buf = f if isinstance(f, bytes) else f.result()
            bufs[i] = (buffer_address(buf), buf)
        return self._build(offset, length, bufs)

    def _settle(self, i: int, fut: asyncio.Future[bytes]) -> None:
        self._inflight.pop(i, None)
        if not fut.cancelled() and fut.exception() is None:
            self._remember(i, fut.result())

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            if self.reader.fd < 0:
                raise SourceError(f"{self.name}: source is closed")
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="lzpg-dec")
        return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._cache.clear()
        self._cache_bytes = 0
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
        for i in self._chunks_for(offset, length):
            c = self.reader.index.chunks[i]
            if c.kind == ChunkKind.ZERO:
                continue
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
