"""Raw memory image: a flat file whose byte N is the memory at offset N.

Served zero-copy: the file is mapped read-only with libc ``mmap`` (a Python
``mmap.mmap`` cannot give a raw address for a read-only mapping) and the
address of the wanted bytes goes straight into UFFDIO_COPY, so the kernel
copies from the page cache into the target with no read() and no copy in
Python.

Zero pages: holes of sparse files are found with SEEK_DATA/SEEK_HOLE; an
extent whose data is all zero (checked with one ``memcmp``, which returns at
the first non-zero byte of real data) is also served as zeros.

A file cut short while it is served (see :mod:`.lease`): the mapping is only
read under a read lease, and only below the size the file had when the
lease was taken, so a page whose bytes are not all in the file is never
looked at: it is a source error (the session's failure policy), never a
zero-filled tail and never SIGBUS in the daemon. Without a lease the bytes
are read with ``pread`` into a buffer and the size is checked after the
read. Each lease taken anew finds the holes again (the file may have
changed meanwhile).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import mmap
import os

from .base import Extent, PageSource, SourceError
from .lease import FileLease

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value

PAGE_SIZE = mmap.PAGESIZE
#: Largest extent compared against zeros in one memcmp (the zero buffer's size).
ZERO_CHECK_MAX = 4 << 20


def _map(fd: int, length: int, prot: int, flags: int) -> int:
    addr = _mmap(None, length, prot, flags, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(addr)


# A lazily-populated anonymous mapping of zeros to compare data against:
# reading it maps the shared zero page, so it costs no memory.
_zero_addr = 0


def zeros_address() -> int:
    global _zero_addr
    if not _zero_addr:
        _zero_addr = _map(-1, ZERO_CHECK_MAX, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return _zero_addr


def is_zero(address: int, length: int) -> bool:
    """True if ``length`` bytes at ``address`` are all zero (``length`` ≤ 4 MiB)."""
    return bool(_memcmp(address, zeros_address(), length) == 0)


def find_holes(fd: int, size: int) -> list[tuple[int, int]]:
    """Page-aligned [start, end) holes of a sparse file, via SEEK_DATA/SEEK_HOLE."""
    holes: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos: the rest is a hole
                data = size
            elif e.errno == errno.EINVAL:  # filesystem without SEEK_DATA
                return []
            else:
                raise
        start = -(-pos // PAGE_SIZE) * PAGE_SIZE
        end = min(data, size) // PAGE_SIZE * PAGE_SIZE
        if end > start:
            holes.append((start, end))
        if data >= size:
            break
        pos = os.lseek(fd, data, os.SEEK_HOLE)
    return holes


class RawImageSource(PageSource):
    """A flat memory file served from an mmap, zero pages from holes/zero data."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name or self.path
        # The fd stays open: the lease is held on it, and reads check its size.
        self._fd = fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            self.size = st.st_size
            if self.size % PAGE_SIZE:
                raise SourceError(f"{self.name}: size {self.size} is not a multiple of {PAGE_SIZE}")
            self._ino = (st.st_dev, st.st_ino)
            self._base = _map(fd, self.size, mmap.PROT_READ, mmap.MAP_SHARED) if self.size else 0
        except BaseException:
            os.close(fd)
            raise
        self._lease = FileLease(fd)
        self._holes_gen = -1  # the lease generation the hole table was found under
        self._hole_starts: list[int] = []
        self._hole_ends: list[int] = []
        self._lease.valid()
        self._load_holes()
        self._holes_gen = self._lease.generation

    @property
    def base_address(self) -> int:
        return self._base

    def _load_holes(self) -> None:
        holes = find_holes(self._fd, min(self.size, os.fstat(self._fd).st_size))
        self._hole_starts = [h[0] for h in holes]
        self._hole_ends = [h[1] for h in holes]

    def _mapped(self, end: int) -> bool:
        """Whether bytes up to ``end`` may be read from the mapping now:
        leased, and the file held them when the lease was taken."""
        lease = self._lease
        if not self._base or not lease.valid() or end > lease.size:
            return False
        if self._holes_gen != lease.generation:
            self._holes_gen = lease.generation
            self._load_holes()
        return True

    def pinned(self) -> contextlib.AbstractContextManager[bool]:
        return self._lease.pinned()

    def extents(self, offset: int, length: int) -> list[Extent]:
        self.check_range(offset, length)
        if self._base == 0:
            raise SourceError(f"{self.name}: source is closed")
        end = offset + length
        if not self._mapped(end):
            lease = self._lease
            # Asked again: a lease refused a moment ago (a truncate was under
            # way) may be had now, with the new size. Only bytes past that
            # size are missing; bytes below it are read as usual.
            if not lease.valid():
                return self._read(offset, length)
            if end > lease.size:
                raise SourceError(f"{self.name}: file shrank to {lease.size} bytes under the daemon "
                                  f"(needed {end})")
            if not self._mapped(end):  # pragma: no cover - the lease is held and covers end
                return self._read(offset, length)
        out: list[Extent] = []
        pos = offset
        while pos < end:
            # Is pos inside a hole? Holes are sorted and disjoint.
            i = bisect.bisect_right(self._hole_starts, pos) - 1
            if i >= 0 and pos < self._hole_ends[i]:
                stop = min(end, self._hole_ends[i])
                out.append(Extent(pos, stop - pos, 0))
            else:
                nxt = self._hole_starts[i + 1] if i + 1 < len(self._hole_starts) else end
                stop = min(end, nxt)
                self._data_extents(pos, stop, out)
            pos = stop
        return out

    def _read(self, offset: int, length: int) -> list[Extent]:
        """No lease: the bytes by ``pread``, trusted only if the file still
        holds all of them after the read."""
        buf = bytearray(length)
        try:
            n = os.preadv(self._fd, [buf], offset)
            size = os.fstat(self._fd).st_size
        except OSError as e:
            raise SourceError(f"{self.name}: read at {offset:#x} failed: {e.strerror}") from None
        if n != length or size < offset + length:
            raise SourceError(f"{self.name}: file shrank to {size} bytes under the daemon (needed {offset + length})")
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        out: list[Extent] = []
        for pos in range(0, length, ZERO_CHECK_MAX):
            stop = min(length, pos + ZERO_CHECK_MAX)
            zero = is_zero(base + pos, stop - pos)
            out.append(Extent(offset + pos, stop - pos, 0 if zero else base + pos, None if zero else buf))
        return out

    def data_address(self, offset: int, length: int) -> int:
        # Valid until the loop runs another callback: the lease is only let
        # go from there, so the caller's copy right after this is covered.
        if offset + length > self.size or not self._mapped(offset + length):
            return 0
        i = bisect.bisect_right(self._hole_starts, offset + length - 1) - 1
        if i >= 0 and offset < self._hole_ends[i]:
            return 0  # a hole overlaps: the extents path maps it as zeros
        return self._base + offset

    def address_of(self, offset: int, length: int) -> int:
        self.check_range(offset, length)
        return self._base + offset if self._mapped(offset + length) else 0

    def _data_extents(self, start: int, end: int, out: list[Extent]) -> None:
        pos = start
        while pos < end:
            stop = min(end, pos + ZERO_CHECK_MAX)
            addr = self._base + pos
            out.append(Extent(pos, stop - pos, 0 if is_zero(addr, stop - pos) else addr))
            pos = stop

    def close(self) -> None:
        base, self._base = self._base, 0
        self._lease.close()
        if base:
            _munmap(base, self.size)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
