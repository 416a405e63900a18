"""Writing snapshots: chunking, zero detection, compression, index.

Chunks are encoded (zero check, checksum, compression) in a small thread
pool, because zstd and xxhash release the GIL, and written in order by the
calling thread. The file is built under a temporary name and renamed into
place by :meth:`SnapshotWriter.finish`, so a failed capture never leaves a
half-written snapshot behind under the real name.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ..sources.raw import PAGE_SIZE, find_holes
from . import format as fmt
from . import zstdframes as zf

DEFAULT_LEVEL = 3
#: Chunks in flight per worker: enough to keep the pool busy while one is written.
_WINDOW_PER_WORKER = 4

Progress = Callable[[int], None]
Chunk = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class WriteStats:
    path: Path
    regions: int
    chunks: int
    size: int  # bytes of memory described
    zero_bytes: int
    file_size: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.size / self.file_size if self.file_size else 0.0

    @property
    def zero_fraction(self) -> float:
        return self.zero_bytes / self.size if self.size else 0.0


@dataclass(frozen=True, slots=True)
class _Encoded:
    kind: fmt.ChunkKind
    data: Chunk | None  # the chunk (raw layout) or None
    frame: bytes  # the whole frame, except for raw chunks (written page by page)
    zero_flags: bytes
    digest: bytes


def default_chunk_size(raw: bool) -> int:
    return fmt.DEFAULT_RAW_CHUNK if raw else fmt.DEFAULT_CHUNK


class SnapshotWriter:
    """Builds one snapshot file; feed regions in order, then :meth:`finish`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        level: int = DEFAULT_LEVEL,
        raw: bool = False,
        workers: int | None = None,
        progress: Progress | None = None,
        frame_checksums: bool = True,
    ) -> None:
        """``frame_checksums=False`` writes frames as files made before they
        carried zstd's content checksum (kept to test that readers take both)."""
        self.chunk_size = chunk_size or default_chunk_size(raw)
        limit = zf.MAX_BLOCK if raw else fmt.MAX_CHUNK
        if not fmt.MIN_CHUNK <= self.chunk_size <= limit or self.chunk_size % fmt.MIN_CHUNK:
            raise ValueError(
                f"chunk size must be a multiple of {fmt.MIN_CHUNK} between {fmt.MIN_CHUNK} and {limit}"
                + (" (one zstd block) with --raw" if raw else "")
            )
        if not raw and not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level must be 1..{zstandard.MAX_COMPRESSION_LEVEL}")
        self.path = Path(path)
        self.raw = raw
        self.level = level
        self.frame_checksums = frame_checksums
        self._zero_frames: dict[int, bytes] = {}
        self._progress = progress
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="lzpg-enc")
        self._local = threading.local()
        self._zero_digests: dict[int, bytes] = {}
        self._zero_chunks: dict[int, bytes] = {}
        self._regions: list[fmt.Region] = []
        self._chunks: list[fmt.Chunk] = []
        self._zero_pages: list[bytes] = []
        self._entries: list[tuple[int, int]] = []
        self._frames_end = 0
        self._started = time.monotonic()
        self._done = False
        os.write(self._fd, bytes(fmt.HEADER_FRAME))  # the real header is written last
        self._pos = fmt.HEADER_FRAME

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    # -- regions ----------------------------------------------------------------------
    def add_region(
        self,
        name: str,
        length: int,
        chunks: Iterable[Chunk | None],
        *,
        start: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        """Append a region; ``chunks`` yields its bytes chunk by chunk (None: all zero).

        Every chunk has ``chunk_size`` bytes except a shorter last one. A chunk
        is used until at most :attr:`in_flight` later chunks have been taken,
        so an iterator may recycle its buffers after that many."""
        if self._done:
            raise ValueError("writer already finished")
        if any(r.name == name for r in self._regions):
            raise ValueError(f"region name {name!r} used twice")
        if page_size not in fmt.PAGE_SIZES or self.chunk_size % page_size or length <= 0 or length % page_size:
            raise ValueError(f"region {name!r}: length {length} / page size {page_size} unusable")
        offset = sum(r.length for r in self._regions)
        count = -(-length // self.chunk_size)
        region_i = len(self._regions)
        self._regions.append(fmt.Region(name, start, length, page_size, offset, len(self._chunks), count))
        flags = bytearray()
        window: deque[tuple[int, Future[_Encoded]]] = deque()
        limit = self.in_flight
        it: Iterator[Chunk | None] = iter(chunks)
        for k in range(count):
            want = min(self.chunk_size, length - k * self.chunk_size)
            data = next(it, b"")
            if data is not None and len(data) != want:
                raise ValueError(f"region {name!r}: chunk {k} has {len(data)} bytes, expected {want}")
            window.append((want, self._pool.submit(self._encode, data, want, page_size)))
            while len(window) >= limit or (window and k == count - 1):
                n, fut = window.popleft()
                self._emit(region_i, offset + (len(flags) * page_size), n, fut.result(), page_size)
                flags += fut.result().zero_flags
                if self._progress:
                    self._progress(n)
        self._zero_pages.append(bytes(flags))

    def _encode(self, data: Chunk | None, length: int, page_size: int) -> _Encoded:
        pages = length // page_size
        if data is not None and not isinstance(data, bytes):
            data = bytes(data)  # memoryview comparisons go byte by byte; bytes use memcmp
        if data is None or data == self._zeros(length):
            return _Encoded(
                fmt.ChunkKind.ZERO, None, self._zero_frame(length), b"\1" * pages, self._zero_digest(length)
            )
        zero_page = bytes(page_size)
        flags = bytes(data[p : p + page_size] == zero_page for p in range(0, length, page_size))
        digest = fmt.checksum(data)
        if self.raw:
            return _Encoded(fmt.ChunkKind.RAW, data, b"", flags, digest)
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            # zstd's own content checksum lets `zstd -t` / `zstd -d` see damage too.
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=self.frame_checksums
            )
        return _Encoded(fmt.ChunkKind.ZSTD, None, cctx.compress(data), flags, digest)

    def _zeros(self, length: int) -> bytes:
        z = self._zero_chunks.get(length)
        if z is None:
            z = self._zero_chunks[length] = bytes(length)
        return z

    def _zero_frame(self, length: int) -> bytes:
        f = self._zero_frames.get(length)
        if f is None:
            f = self._zero_frames[length] = zf.zero_frame(length, self.frame_checksums)
        return f

    def _zero_digest(self, length: int) -> bytes:
        d = self._zero_digests.get(length)
        if d is None:
            d = self._zero_digests[length] = fmt.checksum(bytes(length))
        return d

    def _emit(self, region: int, offset: int, length: int, e: _Encoded, page_size: int) -> None:
        if e.kind == fmt.ChunkKind.RAW:
            assert e.data is not None
            # Payload on a page boundary, preceded by a padding frame of >= 8 bytes.
            data_at = -(-(self._pos + zf.SKIPPABLE_HEADER + zf.RAW_FRAME_PREFIX) // page_size) * page_size
            frame_at = data_at - zf.RAW_FRAME_PREFIX
            self._write(zf.padding_frame(frame_at - self._pos) + zf.raw_frame_prefix(length))
            self._write_sparse(e.data, e.zero_flags, page_size)
            chunk = fmt.Chunk(
                region, offset, length, e.kind, frame_at, zf.RAW_FRAME_PREFIX + length, zf.RAW_FRAME_PREFIX, e.digest
            )
        else:
            chunk = fmt.Chunk(region, offset, length, e.kind, self._pos, len(e.frame), 0, e.digest)
            self._write(e.frame)
        self._chunks.append(chunk)
        self._entries.append((self._pos - self._frames_end, length))
        self._frames_end = self._pos

    @property
    def in_flight(self) -> int:
        """Chunks being encoded at once (see :meth:`add_region`)."""
        return self._workers * _WINDOW_PER_WORKER

    def _write(self, data: Chunk) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._pos += n

    def _write_sparse(self, data: Chunk, zero_flags: bytes, page_size: int) -> None:
        """Write non-zero pages; leave zero pages as holes (they read back as zeros)."""
        pages = len(zero_flags)
        p = 0
        while p < pages:
            if zero_flags[p]:
                q = zero_flags.find(0, p)
                q = pages if q < 0 else q
                self._pos = os.lseek(self._fd, (q - p) * page_size, os.SEEK_CUR)
            else:
                q = zero_flags.find(1, p)
                q = pages if q < 0 else q
                self._write(data[p * page_size : q * page_size])
            p = q

    # -- closing ----------------------------------------------------------------------
    def finish(self) -> WriteStats:
        """Write index, seek table and header, then move the file into place."""
        if not self._regions:
            raise ValueError("a snapshot needs at least one region")
        index_offset = self._pos
        index = fmt.encode_index(self._regions, self._chunks, self._zero_pages)
        self._write(index)
        self._write(zf.seek_table(self._entries))
        header = fmt.Header(
            fmt.VERSION,
            fmt.FLAG_RAW if self.raw else 0,
            fmt.CHECKSUM_XXH3_128,
            self.chunk_size,
            len(self._chunks),
            index_offset,
            len(index),
            self._pos,
        )
        os.pwrite(self._fd, fmt.encode_header(header), 0)
        os.fsync(self._fd)
        self._close()
        os.replace(self._tmp, self.path)
        self._done = True
        size = sum(r.length for r in self._regions)
        zero = sum(z.count(1) * r.page_size for z, r in zip(self._zero_pages, self._regions, strict=True))
        return WriteStats(
            self.path, len(self._regions), len(self._chunks), size, zero, self._pos, time.monotonic() - self._started
        )

    def _close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def abort(self) -> None:
        """Drop the partial file (no-op after :meth:`finish`)."""
        self._close()
        if not self._done:
            self._done = True
            self._tmp.unlink(missing_ok=True)


def read_chunks(
    fd: int, offset: int, length: int, chunk_size: int, holes: list[tuple[int, int]], ring: int
) -> Iterator[memoryview | None]:
    """Chunks of a file range, read into ``ring`` recycled buffers (a fresh
    buffer per chunk costs more in page faults than the read); None for
    chunks lying wholly in a hole, which are not read."""
    bufs = [bytearray(chunk_size) for _ in range(ring)]
    hi = 0
    for n_chunk, pos in enumerate(range(offset, offset + length, chunk_size)):
        n = min(chunk_size, offset + length - pos)
        while hi < len(holes) and holes[hi][1] <= pos:
            hi += 1
        if hi < len(holes) and holes[hi][0] <= pos and pos + n <= holes[hi][1]:
            yield None
            continue
        view = memoryview(bufs[n_chunk % ring])[:n]
        if os.preadv(fd, [view], pos) != n:
            raise OSError(f"short read at {pos:#x}: the file shrank while being read")
        yield view


def create_from_raw(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    chunk_size: int | None = None,
    level: int = DEFAULT_LEVEL,
    raw: bool = False,
    progress: Progress | None = None,
    region_name: str | None = None,
) -> WriteStats:
    """Snapshot of a flat memory file as one region (holes and zero pages found)."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size
        try:
            same = os.path.samestat(st, os.stat(out))
        except FileNotFoundError:
            same = False
        if same:  # the rename at the end would replace the image with its own snapshot
            raise ValueError(f"{out} is the input {src}: write the snapshot to another file")
        if size == 0 or size % PAGE_SIZE:
            raise ValueError(f"{src}: size {size} is not a positive multiple of the page size {PAGE_SIZE}")
        with SnapshotWriter(out, chunk_size=chunk_size, level=level, raw=raw, progress=progress) as w:
            chunks = read_chunks(fd, 0, size, w.chunk_size, find_holes(fd, size), ring=w.in_flight + 2)
            w.add_region(region_name or Path(src).name, size, chunks)
            return w.finish()
    finally:
        os.close(fd)
