"""Working-set record and replay: the second restore of an image starts warm.

Most restores of an image touch the same small part of it first. A session
records which chunks of each source its target faulted on first, in order
(faults only, not fill), for ``record_seconds`` after the handoff or until
``max_bytes`` are recorded. When the session ends the record is written
beside the image as ``IMAGE.ws``; the next session over that image installs
those chunks first, in recorded order and in large batches, while faults are
still served first, and only then fills the rest.

The file (documented in docs/working-set.md):

* ``MAGIC`` (8 bytes), a little-endian u32 header length, a msgpack header,
  zero padding to a 4096-byte boundary, then the data area;
* the header: ``v`` (format version), ``image`` (the identity of the image
  it was recorded on: size, and for files inode, device, mtime and ctime in
  ns — a record of another image, or of this one after it changed, is never
  used), ``granule`` (chunk size), ``faults``, ``recorded_s``, and
  ``chunks``: ``[index, data_offset, checksum]`` per chunk in first-fault
  order, ``data_offset`` -1 for an all-zero chunk;
* the data area: a copy of each non-zero chunk, page-aligned, in recorded
  order, so replay reads it sequentially (the REAP idea: one streaming read
  instead of scattered ones). Every chunk's xxh3-128 is checked before any
  of its pages is installed. Sources that are not local files (a remote
  peer) store the order only; replay then asks the source for the whole set
  at once.

Rule for later recordings: a new record replaces the old one (written to a
temporary file and renamed, so a reader sees one or the other, whole).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from .snapshot.format import checksum
from .sources import PageSource, SourceError
from .sources.lease import FileLease

MAGIC: Final = b"LZPGWS01"
VERSION: Final = 1
_LEN: Final = struct.Struct("<I")
ALIGN: Final = 4096
#: Header size limit: 1M chunks of 64 KiB = 64 GiB of working set.
MAX_HEADER: Final = 64 << 20
SUFFIX: Final = ".ws"


class WorkingSetError(Exception):
    """A working-set file that cannot be used (damaged, other image, version)."""


def image_identity(src: PageSource) -> dict[str, Any]:
    """What a record must match to be replayed on ``src``."""
    ident: dict[str, Any] = {"name": src.name, "size": src.size}
    if src.path:
        st = os.stat(src.path)
        ident.update(ino=st.st_ino, dev=st.st_dev, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
    return ident


def ws_path(src: PageSource, ws_dir: str = "") -> Path | None:
    """Where the record of ``src`` lives: beside the image, or in ``ws_dir``
    (the only choice for sources that are not files); None: nowhere."""
    if ws_dir:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", src.name).lstrip(".") or "image"
        return Path(ws_dir) / (safe + SUFFIX)
    return Path(src.path + SUFFIX) if src.path else None


class Recorder:
    """First-fault order of source chunks, for one source, during one session."""

    def __init__(self, src: PageSource, granule: int, max_chunks: int) -> None:
        self.src = src
        self.granule = granule
        self.max_chunks = max_chunks
        self.order: dict[int, None] = {}  # insertion-ordered set
        self.faults = 0

    def note(self, start: int, end: int) -> None:
        """A fault installed source bytes [start, end): the faulting page and
        the fault-around window, whose pages the target may touch later
        without faulting again."""
        self.faults += 1
        g = self.granule
        for idx in range(start // g, (end + g - 1) // g):
            if len(self.order) >= self.max_chunks:
                return
            self.order.setdefault(idx, None)


def save(rec: Recorder, path: Path, recorded_s: float, copies: dict[int, bytes] | None = None) -> int:
    """Write the record; returns bytes written. Chunk data comes from the
    source when it is local, else from ``copies`` (chunks fetched for it);
    without either only the order is kept."""
    src, g = rec.src, rec.granule
    chunks: list[list[Any]] = []
    data = bytearray()
    for idx in rec.order:
        off = idx * g
        n = min(g, src.size - off)
        if n <= 0:
            continue
        if not src.synchronous:
            if copies is None:
                chunks.append([idx, -1, b""])  # order only
                continue
            if idx not in copies:
                continue  # its fetch failed: leave it to faults and fill
            buf = bytearray(copies[idx])
            zero = buf.count(0) == len(buf)
        else:
            buf = bytearray(n)
            base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            zero = True
            # This runs in a thread: the pin keeps a mapped file's bytes
            # readable (no truncation) until they are copied.
            with src.pinned():
                for e in src.extents(off, n):
                    if e.address:
                        zero = False
                        ctypes.memmove(base + e.offset - off, e.address, e.length)
        if zero:
            chunks.append([idx, -1, checksum(buf)])
            continue
        chunks.append([idx, len(data), checksum(buf)])
        data += buf
        data += bytes(-len(data) % ALIGN)
    header = msgpack.packb(
        {
            "v": VERSION,
            "image": image_identity(src),
            "granule": g,
            "faults": rec.faults,
            "recorded_s": round(recorded_s, 3),
            "data": src.synchronous or copies is not None,
            "chunks": chunks,
            "created": time.time(),
        },
        use_bin_type=True,
    )
    head = MAGIC + _LEN.pack(len(header)) + header
    head += bytes(-len(head) % ALIGN)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(head) + len(data)


@dataclass(frozen=True)
class WsChunk:
    """Source chunk ``index``; its copy at ``address`` (0: zeros, or no data
    stored) with the checksum to verify before installing."""

    index: int
    address: int
    digest: bytes


class WorkingSet:
    """A loaded record: chunks in replay order, data mapped from the file.

    The mapping is read only under a read lease on the record (see
    sources/lease.py): a record cut short while mapped would otherwise raise
    SIGBUS in the daemon. Where the lease cannot be had, its chunks count as
    damaged and are served from the image instead."""

    def __init__(self, path: Path, src: PageSource) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, min(size, 4096), 0)
            if len(head) < 12 or head[:8] != MAGIC:
                raise WorkingSetError(f"{path}: not a working-set file")
            (hlen,) = _LEN.unpack_from(head, 8)
            if hlen > MAX_HEADER or 12 + hlen > size:
                raise WorkingSetError(f"{path}: header length {hlen} out of bounds")
            raw = os.pread(fd, hlen, 12)
            try:
                h = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            except Exception as e:
                raise WorkingSetError(f"{path}: damaged header ({e})") from None
            if not isinstance(h, dict) or h.get("v") != VERSION:
                raise WorkingSetError(f"{path}: unsupported version {h.get('v') if isinstance(h, dict) else None}")
            if h.get("image") != image_identity(src):
                raise WorkingSetError(f"{path}: recorded on another image (or the image changed since)")
            self.granule = int(h["granule"])
            self.faults = int(h["faults"])
            self.recorded_s = float(h["recorded_s"])
            data_start = (12 + hlen + ALIGN - 1) // ALIGN * ALIGN
            self._map: mmap.mmap | None = None
            base = 0
            if size > data_start:
                self._map = mmap.mmap(fd, size - data_start, mmap.MAP_PRIVATE, offset=data_start)
                self._map.madvise(mmap.MADV_WILLNEED)  # start streaming it in now
                base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            chunks = []
            for entry in h["chunks"]:
                idx, off, digest = int(entry[0]), int(entry[1]), bytes(entry[2])
                n = min(self.granule, src.size - idx * self.granule)
                if n <= 0 or off < -1 or (off >= 0 and off + n > size - data_start):
                    raise WorkingSetError(f"{path}: chunk {idx} out of bounds")
                chunks.append(WsChunk(idx, base + off if off >= 0 else 0, digest))
            self.chunks = chunks
            self.has_data = bool(h.get("data"))
        except (OSError, KeyError, TypeError, ValueError) as e:
            os.close(fd)
            raise WorkingSetError(f"{path}: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size
        self._lease = FileLease(fd)

    def verify(self, c: WsChunk, length: int) -> bool:
        """Whether the stored copy of ``c`` (``length`` bytes) is intact."""
        if not self.has_data:
            return True
        if c.address and not (self._lease.valid() and self._lease.size >= self._size):
            return False  # the record is being changed: not read from the mapping
        view = (ctypes.c_char * length).from_address(c.address) if c.address else bytes(length)
        return checksum(memoryview(view).cast("B")) == c.digest

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: the GC closes it
                self._map.close()
            self._map = None
        if self._fd >= 0:
            self._lease.close()
            os.close(self._fd)
            self._fd = -1


def load(src: PageSource, ws_dir: str = "") -> tuple[WorkingSet | None, str]:
    """The record for ``src`` and "", or None and why not ("" if there is none)."""
    path = ws_path(src, ws_dir)
    if path is None or not path.exists():
        return None, ""
    try:
        return WorkingSet(path, src), ""
    except (WorkingSetError, SourceError, OSError) as e:
        return None, str(e)
