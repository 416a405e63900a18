"""Reading snapshots: open and validate, then decode chunks on demand.

A :class:`SnapshotReader` trusts nothing until the header, index and seek
table have passed :mod:`.format`'s checks. :meth:`SnapshotReader.chunk`
returns a chunk's bytes only after its checksum matched, so a caller can
never hand out bytes that were not verified. It is safe to call from several
threads at once (``pread`` plus one zstd context per thread).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import os
import stat
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import zstandard

from . import format as fmt
from . import zstdframes as zf
from .format import Chunk, ChunkError, ChunkKind, FormatError, Header, Index, NotASnapshot, Region

#: Largest run of neighbouring frames read at once (32 compressed 64 KiB chunks
#: fit; a run of incompressible ones is slightly larger than its data).
_MAX_SPAN = 4 << 20


class _LibZstd:
    """libzstd's one-shot decoder, called through ctypes.

    python-zstandard can only decode into a buffer of ours through a
    streaming reader (several Python steps per chunk) or into a fresh bytes
    object that must then be copied. ``ZSTD_decompressDCtx`` writes the chunk
    straight into its slot, never past ``capacity``, with the GIL released for
    the whole call. One decoding context per thread; freed with the thread.

    Serving skips zstd's own 32-bit content checksum: every decoded chunk is
    compared with its XXH3-128 anyway, and XXH64 over the output would double
    the decode time. :meth:`SnapshotReader.verify` asks for it, so that it
    fails every frame `zstd -t` fails."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_createDCtx.argtypes = []
        lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_decompressDCtx.restype = ctypes.c_size_t
        lib.ZSTD_decompressDCtx.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._local = threading.local()

    def decompress_into(self, dst: memoryview, frame: memoryview, frame_checksum: bool = False) -> tuple[int, str]:
        """Decode ``frame`` (one zstd frame, nothing after it) into ``dst``:
        (bytes written, "") or (0, libzstd's reason)."""
        out = ctypes.addressof(ctypes.c_char.from_buffer(dst))
        src = ctypes.addressof(ctypes.c_char.from_buffer(frame))
        r = self.decode(out, len(dst), src, len(frame), frame_checksum)
        if self._lib.ZSTD_isError(r):
            return 0, self._lib.ZSTD_getErrorName(r).decode(errors="replace")
        return r, ""

    def decode(self, out: int, capacity: int, src: int, size: int, frame_checksum: bool = False) -> int:
        """The raw call: bytes written, or a libzstd error code (a number far
        above any chunk size). Addresses must stay valid during the call."""
        slot = "checking" if frame_checksum else "ctx"
        ctx: _DCtx | None = getattr(self._local, slot, None)
        if ctx is None:
            ctx = _DCtx(self._lib, skip_checksum=not frame_checksum)
            setattr(self._local, slot, ctx)
        return int(self._lib.ZSTD_decompressDCtx(ctx.ptr, out, capacity, src, size))


#: ZSTD_d_forceIgnoreChecksum (ZSTD_d_experimentalParam3) and its value ZSTD_d_ignoreChecksum.
_D_FORCE_IGNORE_CHECKSUM, _D_IGNORE_CHECKSUM = 1002, 1


class _DCtx:
    """A libzstd decoding context, freed when its thread's locals go."""

    def __init__(self, lib: ctypes.CDLL, skip_checksum: bool = False) -> None:
        self._lib = lib
        self.ptr = lib.ZSTD_createDCtx()
        if not self.ptr:
            raise MemoryError("ZSTD_createDCtx failed")
        if skip_checksum:
            # A libzstd without the parameter (before 1.4.7) refuses it and
            # goes on checking: slower, never less safe.
            lib.ZSTD_DCtx_setParameter(self.ptr, _D_FORCE_IGNORE_CHECKSUM, _D_IGNORE_CHECKSUM)

    def __del__(self) -> None:
        self._lib.ZSTD_freeDCtx(self.ptr)


@functools.cache
def _libzstd() -> _LibZstd | None:
    """The system's libzstd if it can be loaded (else decoding goes through
    python-zstandard's streaming reader, slower but the same bytes)."""
    name = ctypes.util.find_library("zstd")
    if name is None:
        return None
    try:
        return _LibZstd(ctypes.CDLL(name))
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True, slots=True)
class Damage:
    """What :meth:`SnapshotReader.verify` found wrong with one chunk."""

    chunk: int
    region: str
    offset: int
    what: str


class SnapshotReader:
    """An open, validated snapshot file."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name or self.path
        # Non-blocking: opening a FIFO must not wait for a writer (it is refused below).
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        self._local = threading.local()
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise NotASnapshot("not a regular file")
            self.header, self.index = self._load()
        except FormatError as e:
            self.close()
            raise type(e)(f"{self.name}: {e}") from None
        except (struct.error, ValueError, IndexError, OverflowError, UnicodeError):
            # Every field is checked before use, so this is a gap in the checks;
            # the operator still gets a plain refusal rather than Python's words.
            self.close()
            raise FormatError(f"{self.name}: damaged index (its records do not parse)") from None
        except BaseException:
            self.close()
            raise
        self._chunk_offsets = self.index.chunks.offset.tolist()

    def _load(self) -> tuple[Header, Index]:
        size = os.fstat(self._fd).st_size
        h = fmt.parse_header(self._pread(fmt.HEADER_FRAME, 0), size)
        idx = fmt.parse_index(self._pread(h.index_size, h.index_offset), h)
        table_at = h.index_offset + h.index_size
        table = self._pread(size - table_at, table_at)
        try:
            if zf.parse_seek_footer(table[-zf.SEEK_FOOTER_SIZE :]) != h.chunk_count:
                raise ValueError("seek table frame count differs from the header")
            entries = zf.parse_seek_table(table, h.chunk_count)
        except ValueError as e:
            raise FormatError(str(e)) from None
        fmt.check_seek_table(entries, h, idx)
        return h, idx

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise FormatError(f"truncated: wanted {n} bytes at {offset:#x}, got {len(data)}")
        return data

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def regions(self) -> tuple[Region, ...]:
        return self.index.regions

    def chunk_at(self, offset: int) -> int:
        """Index of the chunk holding source byte ``offset``."""
        return bisect.bisect_right(self._chunk_offsets, offset) - 1

    def zero_flags(self, chunk: int) -> bytes:
        """One byte per page of the chunk, 1 for a zero page."""
        c = self.index.chunks[chunk]
        r = self.index.regions[c.region]
        first = (c.offset - r.offset) // r.page_size
        return self.index.zero_pages[c.region][first : first + c.length // r.page_size]

    def error(self, chunk: int, what: str) -> ChunkError:
        c = self.index.chunks[chunk]
        return ChunkError(self.name, chunk, self.index.regions[c.region].name, c.offset, what)

    def chunk(self, i: int) -> bytes:
        """Chunk ``i``'s bytes, decompressed and checksum-verified; ChunkError otherwise."""
        buf = bytearray(self.index.chunks[i].length)
        self.chunk_into(i, buf)
        return bytes(buf)

    def chunks_into(self, items: Sequence[tuple[int, memoryview]]) -> list[ChunkError | None]:
        """Decode several chunks, each into its buffer; per chunk, None or its error.

        The frames of the chunks lie next to each other in the file, so they
        are read with one ``preadv`` (one syscall instead of one per chunk).
        This runs in worker threads that share the GIL with the event loop,
        so the common case (a zstd chunk that decodes and matches) takes few
        Python steps; anything else goes through :meth:`chunk_into`, which
        checks step by step and says what failed."""
        t = self.index.chunks
        foffs, fsizes = t.frame_offset, t.frame_size
        lo = min(foffs[i] for i, _ in items)
        hi = max(foffs[i] + fsizes[i] for i, _ in items)
        span = self._read(lo, hi - lo, "span") if hi - lo <= _MAX_SPAN else None
        direct = _libzstd()
        out: list[ChunkError | None] = []
        if span is None or direct is None:
            for i, dst in items:
                a = foffs[i] - lo
                out.append(self._chunk_or_error(i, dst, span[a : a + fsizes[i]] if span is not None else None))
            return out
        base = ctypes.addressof(ctypes.c_char.from_buffer(span))
        kinds, lengths, sums = t.kind, t.length, t.checksums
        frame_size, digest, zstd = zstandard.get_frame_parameters, fmt.checksum, ChunkKind.ZSTD
        for i, dst in items:
            a, size, n = foffs[i] - lo, fsizes[i], lengths[i]
            frame = span[a : a + size]
            try:
                fast = (
                    kinds[i] == zstd
                    and not dst.readonly
                    and len(dst) >= n
                    and frame_size(frame).content_size == n
                    and direct.decode(ctypes.addressof(ctypes.c_char.from_buffer(dst)), n, base + a, size) == n
                    and digest(dst[:n]) == sums[16 * i : 16 * i + 16]
                )
            except zstandard.ZstdError:
                fast = False
            # Another kind, or a failure: the careful path says what failed.
            out.append(None if fast else self._chunk_or_error(i, dst, frame))
        return out

    def _chunk_or_error(self, i: int, dst: memoryview, frame: memoryview | None) -> ChunkError | None:
        try:
            self.chunk_into(i, dst, frame)
        except ChunkError as e:
            return e
        return None

    def _read(self, offset: int, n: int, slot: str) -> memoryview | None:
        """``n`` bytes at ``offset`` into this thread's buffer ``slot``; None if that fails
        (callers then read frame by frame, which names the chunk that cannot be read)."""
        if self._fd < 0:
            return None
        buf: bytearray | None = getattr(self._local, slot, None)
        if buf is None or len(buf) < n:
            buf = bytearray(n)
            setattr(self._local, slot, buf)
        view = memoryview(buf)[:n]
        try:
            return view if os.preadv(self._fd, [view], offset) == n else None
        except OSError:
            return None

    def chunk_into(
        self, i: int, out: bytearray | memoryview, frame: memoryview | None = None, *, frame_checksum: bool = False
    ) -> None:
        """Decode chunk ``i`` into the start of ``out`` and verify it; ChunkError otherwise.

        Decoding into a caller's buffer lets sources recycle buffers: a fresh
        allocation per chunk costs more (page faults) than zstd itself.
        ``frame``, if given, is the chunk's frame already read from the file.
        ``frame_checksum`` also checks zstd's own checksum, which the XXH3-128
        makes redundant for the bytes (see :class:`_LibZstd`)."""
        c = self.index.chunks[i]
        dst = memoryview(out)[: c.length]
        if len(dst) != c.length:
            raise ValueError(f"buffer of {len(out)} bytes is too small for chunk {i}")
        if c.kind == ChunkKind.ZERO:
            dst[:] = bytes(c.length)
            return
        if frame is None:
            frame = self._read_frame(i, c)
        if c.kind == ChunkKind.RAW:
            if frame[: c.data_offset] != zf.raw_frame_prefix(c.length):
                raise self.error(i, "raw frame header damaged")
            dst[:] = frame[c.data_offset :]
        else:
            self._decompress_into(i, c, frame, dst, frame_checksum)
        self.check(i, dst)

    def _read_frame(self, i: int, c: Chunk) -> memoryview:
        """The chunk's frame, read into this thread's reusable frame buffer."""
        if self._fd < 0:
            raise self.error(i, "snapshot is closed")
        buf: bytearray | None = getattr(self._local, "frame", None)
        if buf is None or len(buf) < c.frame_size:
            buf = self._local.frame = bytearray(c.frame_size)
        view = memoryview(buf)[: c.frame_size]
        try:
            n = os.preadv(self._fd, [view], c.frame_offset)
        except OSError as e:
            raise self.error(i, f"read failed: {e.strerror}") from None
        if n != c.frame_size:
            raise self.error(i, f"short read ({n} of {c.frame_size} bytes): file truncated while open?")
        return view

    def _decompress_into(
        self, i: int, c: Chunk, frame: memoryview, dst: memoryview, frame_checksum: bool = False
    ) -> None:
        """Decode the frame into ``dst``, which must come out exactly full.

        The frame must declare the chunk's size. With libzstd at hand the
        frame is decoded straight into ``dst`` by one call that releases the
        GIL (no intermediate buffer, no Python step per block); otherwise a
        streaming reader fills ``dst``."""
        try:
            declared = zstandard.get_frame_parameters(frame).content_size
        except zstandard.ZstdError as e:
            raise self.error(i, f"zstd: {e}") from None
        if declared != c.length:
            raise self.error(i, f"frame declares {declared} bytes, the index says {c.length}")
        direct = _libzstd()
        if direct is not None and not frame.readonly and not dst.readonly:
            n, failure = direct.decompress_into(dst, frame, frame_checksum)
            if failure:
                raise self.error(i, f"zstd: {failure}")
        else:
            n = self._stream_into(i, frame, dst)
        if n != c.length:
            raise self.error(i, f"decompressed to {n} bytes, the index says {c.length}")

    def _stream_into(self, i: int, frame: memoryview, dst: memoryview) -> int:
        """Decode with python-zstandard's streaming reader; bytes produced (one
        past ``dst`` if the frame holds more)."""
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        n = 0
        try:
            with dctx.stream_reader(frame) as r:
                while n < len(dst):
                    k = r.readinto(dst[n:])
                    if not k:
                        break
                    n += k
                n += len(r.read(1))  # also makes zstd finish (and check) the frame
        except zstandard.ZstdError as e:
            raise self.error(i, f"zstd: {e}") from None
        return n

    def check(self, i: int, data: bytes | bytearray | memoryview) -> None:
        """Raise ChunkError unless ``data`` matches chunk ``i``'s checksum."""
        c = self.index.chunks[i]
        if len(data) != c.length:
            raise self.error(i, f"{len(data)} bytes, the index says {c.length}")
        got = fmt.checksum(data)
        if got != c.checksum:
            raise self.error(i, f"checksum mismatch (xxh3-128 {got.hex()}, index has {c.checksum.hex()})")

    def verify(self) -> Iterator[Damage | int]:
        """Check every chunk fully; yields each chunk's length as progress, or a Damage."""
        zero_cache: dict[int, bytes] = {}
        for i, c in enumerate(self.index.chunks):
            region = self.index.regions[c.region]
            try:
                if c.kind == ChunkKind.ZERO:
                    # Never served from the frame, but `zstd -d` reads it: it must be zeros too.
                    frame = self._read_frame(i, c)
                    zeros = zero_cache.setdefault(c.length, bytes(c.length))
                    out = bytearray(c.length)
                    self._decompress_into(i, c, frame, memoryview(out), frame_checksum=True)
                    if out != zeros:
                        raise self.error(i, "zero chunk's frame does not decode to zeros")
                    yield c.length
                    continue
                data = bytearray(c.length)
                self.chunk_into(i, data, frame_checksum=True)
                page = region.page_size
                zero_page = bytes(page)
                for p, flag in enumerate(self.zero_flags(i)):
                    if flag and data[p * page : (p + 1) * page] != zero_page:
                        raise self.error(i, f"page {p} is marked zero but holds data")
                yield c.length
            except ChunkError as e:
                yield Damage(i, region.name, c.offset, e.what)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
