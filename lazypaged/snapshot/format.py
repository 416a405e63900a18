"""The lazypaged snapshot layout: header, index, validation. No I/O here.

Rules of this file: everything read from a file is untrusted until
:func:`parse_header` and :func:`parse_index` have checked it, and they check
everything a reader later relies on (bounds, sizes, order, overlaps), so the
reader never does arithmetic on a field that was not validated. All integers
are little-endian; checksums are xxHash's canonical (big-endian) digests, and
the index checksum covers what follows the two counts (the counts are tied
to the header and the records instead). ``docs/snapshot-format.md`` is the
prose version.

File layout::

    header frame   skippable, 64 bytes, at offset 0
    data frames    one zstd frame per chunk, in source order
    index frame    skippable: regions, chunks, zero-page bitmaps
    seek table     skippable, zstd seekable format, last in the file
"""

from __future__ import annotations

import enum
import itertools
import operator
import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn, overload

import xxhash

from ..sources.base import SourceError
from . import zstdframes as zf

MAGIC = b"LZPGSNAP"
INDEX_MAGIC = b"LZPGINDX"
VERSION = 1
FLAG_RAW = 1  # uncompressed layout: raw chunks page-aligned, servable from an mmap
_KNOWN_FLAGS = FLAG_RAW
CHECKSUM_XXH3_128 = 1
CHECKSUM_NAMES = {CHECKSUM_XXH3_128: "xxh3-128"}

_HEADER = struct.Struct("<8sHHB3xIIQQQ")  # then xxh3-64 of these 48 bytes
HEADER_PAYLOAD = _HEADER.size + 8
HEADER_FRAME = zf.SKIPPABLE_HEADER + HEADER_PAYLOAD
_INDEX_HEAD = struct.Struct("<8s16sII")
_REGION = struct.Struct("<HHIQQII")
_CHUNK = struct.Struct("<QIIB3xI16s")
REGION_FLAG_ADDRESS = 1

#: Chunks are at least a page; 4 MiB caps what one fault may have to decompress.
MIN_CHUNK = 4096
MAX_CHUNK = 4 << 20
DEFAULT_CHUNK = 64 << 10
#: The raw layout keeps a chunk in one zstd block, and a block holds 128 KiB.
DEFAULT_RAW_CHUNK = zf.MAX_BLOCK
#: Bounds a malicious index cannot push the reader past (names, counts).
MAX_NAME = 4096
MAX_REGIONS = 1 << 16
MAX_CHUNKS = 1 << 26
PAGE_SIZES = frozenset(1 << n for n in range(12, 31))


class ChunkKind(enum.IntEnum):
    ZERO = 0  # every page zero; the frame is a tiny RLE frame, never read
    RAW = 1  # one raw zstd block; payload at frame_offset + data_offset
    ZSTD = 2  # a compressed zstd frame


_KINDS = tuple(ChunkKind)
_KIND_VALUES = frozenset(int(k) for k in ChunkKind)
_KIND_BYTES = bytes(sorted(_KIND_VALUES))


class SnapshotError(SourceError):
    """The snapshot cannot be trusted or read.

    Its text is what an operator reads (a refusal, a log line, the CLI's one
    line), so it is never empty."""

    def __init__(self, message: str) -> None:
        super().__init__(message.strip() or "damaged snapshot (no detail recorded)")


class FormatError(SnapshotError):
    """The header, index or seek table is damaged, truncated or not ours."""


class NotASnapshot(FormatError):
    """The file is no lazypaged snapshot at all (no magic), nor a damaged one."""


class ChunkError(SnapshotError):
    """One chunk failed its checks; none of its bytes may be served."""

    def __init__(self, image: str, chunk: int, region: str, offset: int, what: str) -> None:
        super().__init__(f"{image}: chunk {chunk} of region {region!r} (source offset {offset:#x}): {what}")
        self.chunk = chunk
        self.region = region
        self.what = what


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    flags: int
    checksum_kind: int
    chunk_size: int
    chunk_count: int
    index_offset: int
    index_size: int
    file_size: int

    @property
    def raw(self) -> bool:
        return bool(self.flags & FLAG_RAW)


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    start: int | None  # original virtual address, if known
    length: int
    page_size: int
    offset: int  # where the region begins in the source's byte space
    first_chunk: int
    chunk_count: int


class Chunk(NamedTuple):
    """A chunk record (a tuple: an index holds tens of thousands, built at open)."""

    region: int
    offset: int  # in the source's byte space
    length: int
    kind: ChunkKind
    frame_offset: int
    frame_size: int
    data_offset: int
    checksum: bytes


class ChunkTable(Sequence[Chunk]):
    """The chunk records, kept as columns and made into :class:`Chunk` tuples
    only when asked for (then remembered).

    An index of a few GiB has tens of thousands of records; a tuple for each
    at open time is most of what opening costs, and a restore waits for it.
    Hot paths read the columns directly."""

    __slots__ = (
        "_memo",
        "checksums",
        "data_offset",
        "frame_offset",
        "frame_size",
        "kind",
        "length",
        "offset",
        "region",
    )

    def __init__(
        self,
        region: array[int],
        offset: array[int],
        length: array[int],
        kind: bytes,
        frame_offset: array[int],
        frame_size: array[int],
        data_offset: array[int],
        checksums: bytes,
    ) -> None:
        self.region = region
        self.offset = offset
        self.length = length
        self.kind = kind  # one byte per chunk, a ChunkKind value
        self.frame_offset = frame_offset
        self.frame_size = frame_size
        self.data_offset = data_offset
        self.checksums = checksums  # 16 bytes per chunk
        self._memo: list[Chunk | None] = [None] * len(kind)

    def __len__(self) -> int:
        return len(self.kind)

    def _make(self, i: int) -> Chunk:
        c = self._memo[i]
        if c is None:
            c = self._memo[i] = Chunk(
                self.region[i],
                self.offset[i],
                self.length[i],
                _KINDS[self.kind[i]],
                self.frame_offset[i],
                self.frame_size[i],
                self.data_offset[i],
                self.checksums[16 * i : 16 * i + 16],
            )
        return c

    @overload
    def __getitem__(self, i: int) -> Chunk: ...
    @overload
    def __getitem__(self, i: slice) -> list[Chunk]: ...
    def __getitem__(self, i: int | slice) -> Chunk | list[Chunk]:
        if isinstance(i, slice):
            return [self._make(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("chunk index out of range")
        return self._make(i % n)

    def __iter__(self) -> Iterator[Chunk]:
        return map(self._make, range(len(self)))


@dataclass(frozen=True, slots=True)
class Index:
    regions: tuple[Region, ...]
    chunks: ChunkTable
    #: One byte per page of each region, in region order: 1 = the page is zero.
    zero_pages: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(r.length for r in self.regions)


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


# -- header -----------------------------------------------------------------------------


def encode_header(h: Header) -> bytes:
    body = _HEADER.pack(
        MAGIC,
        h.version,
        h.flags,
        h.checksum_kind,
        h.chunk_size,
        h.chunk_count,
        h.index_offset,
        h.index_size,
        h.file_size,
    )
    return zf.skippable_frame(body + xxhash.xxh3_64_digest(body))


#: The bytes that say "lazypaged snapshot": the skippable frame's magic at 0, LZPGSNAP at 8.
_FRAME_MAGIC = zf.SKIPPABLE_MAGIC.to_bytes(4, "little")
_IDENTITY = _FRAME_MAGIC + MAGIC
#: A file whose identifying bytes are this close to a snapshot's is a damaged
#: snapshot, not a raw image: at most this many of their 96 bits differ, or at
#: least this many of their 12 bytes are exact. Random bytes come this close
#: about once in 10**11 files; all-zero or all-one pages are 36 and 60 bits off.
NEAR_MISS_BITS = 16
NEAR_MISS_BYTES = 6


def looks_like_snapshot(first_bytes: bytes) -> bool:
    """True if a file starts like a lazypaged snapshot (whatever its state)."""
    return len(first_bytes) >= 16 and first_bytes[8:16] == MAGIC and first_bytes[:4] == _FRAME_MAGIC


def magic_distance(first_bytes: bytes) -> int | None:
    """Bits by which a file's identifying bytes differ from a snapshot's; None
    for a file too short to have them."""
    if len(first_bytes) < 16:
        return None
    got = first_bytes[:4] + first_bytes[8:16]
    return (int.from_bytes(got, "little") ^ int.from_bytes(_IDENTITY, "little")).bit_count()


def near_miss(first_bytes: bytes) -> bool:
    """True if a file starts almost, but not exactly, like a snapshot: a
    snapshot whose magic was damaged, which must never pass for a raw image."""
    bits = magic_distance(first_bytes)
    if bits is None or bits == 0:
        return False
    same = sum(a == b for a, b in zip(first_bytes[:4] + first_bytes[8:16], _IDENTITY, strict=True))
    return bits <= NEAR_MISS_BITS or same >= NEAR_MISS_BYTES


def parse_header(data: bytes, actual_size: int) -> Header:
    """The header from the file's first bytes, checked against the file's real size."""
    if len(data) < HEADER_FRAME:
        raise FormatError(f"truncated: {len(data)} bytes is shorter than the {HEADER_FRAME}-byte header")
    if near_miss(data):
        bits = magic_distance(data)
        raise FormatError(f"damaged snapshot header: its magic is {bits} bit{'s' * (bits != 1)} off")
    if not looks_like_snapshot(data):
        raise NotASnapshot("not a lazypaged snapshot (wrong magic)")
    _, size = zf.parse_skippable_header(data)
    if size != HEADER_PAYLOAD:
        raise FormatError(f"header frame of {size} bytes, expected {HEADER_PAYLOAD}")
    body = data[zf.SKIPPABLE_HEADER : zf.SKIPPABLE_HEADER + _HEADER.size]
    _, version, flags, kind, chunk_size, chunks, ioff, isize, fsize = _HEADER.unpack(body)
    if version != VERSION:
        raise FormatError(f"snapshot format version {version}; this lazypaged reads version {VERSION}")
    if xxhash.xxh3_64_digest(body) != data[zf.SKIPPABLE_HEADER + _HEADER.size : HEADER_FRAME]:
        raise FormatError("header checksum mismatch")
    if flags & ~_KNOWN_FLAGS:
        raise FormatError(f"unknown header flags {flags:#x}")
    if kind not in CHECKSUM_NAMES:
        raise FormatError(f"unknown checksum kind {kind}")
    if not MIN_CHUNK <= chunk_size <= (zf.MAX_BLOCK if flags & FLAG_RAW else MAX_CHUNK) or chunk_size % MIN_CHUNK:
        raise FormatError(f"chunk size {chunk_size} is not a page multiple in the allowed range")
    if chunks > MAX_CHUNKS:
        raise FormatError(f"{chunks} chunks is more than the limit of {MAX_CHUNKS}")
    if fsize != actual_size:
        what = "truncated" if actual_size < fsize else "has trailing bytes"
        raise FormatError(f"{what}: header says {fsize} bytes, file has {actual_size}")
    trailer = zf.seek_table_size(chunks)
    if ioff < HEADER_FRAME or isize < zf.SKIPPABLE_HEADER + _INDEX_HEAD.size or ioff + isize + trailer != fsize:
        raise FormatError(f"index at {ioff:#x}+{isize:#x} does not fit between the data and the seek table")
    return Header(version, flags, kind, chunk_size, chunks, ioff, isize, fsize)


# -- index ------------------------------------------------------------------------------


def _pack_bits(flags: bytes) -> bytes:
    """One byte per page (0/1) to a bitmap, page 0 in the lowest bit of byte 0."""
    if not flags:
        return b""
    digits = flags.translate(bytes.maketrans(b"\0\1", b"01"))[::-1]
    return int(digits, 2).to_bytes((len(flags) + 7) // 8, "little")


def _unpack_bits(bitmap: bytes, count: int) -> bytes:
    if not count:
        return b""
    digits = format(int.from_bytes(bitmap, "little"), f"0{len(bitmap) * 8}b").encode()[::-1]
    return digits[:count].translate(bytes.maketrans(b"01", b"\0\1"))


def encode_index(regions: Sequence[Region], chunks: Sequence[Chunk], zero_pages: Sequence[bytes]) -> bytes:
    """The index frame (skippable) for these regions and chunks."""
    body = bytearray()
    for r in regions:
        name = r.name.encode()
        flags = REGION_FLAG_ADDRESS if r.start is not None else 0
        body += _REGION.pack(len(name), flags, r.page_size, r.start or 0, r.length, r.first_chunk, r.chunk_count)
        body += name
    for c in chunks:
        body += _CHUNK.pack(c.frame_offset, c.frame_size, c.data_offset, c.kind, c.length, c.checksum)
    for z in zero_pages:
        body += _pack_bits(z)
    head = _INDEX_HEAD.pack(INDEX_MAGIC, checksum(body), len(regions), len(chunks))
    return zf.skippable_frame(head + bytes(body))


def parse_index(frame: bytes, h: Header) -> Index:
    """Decode and fully validate the index frame read at ``h.index_offset``."""
    if len(frame) != h.index_size:
        raise FormatError("truncated index")
    try:
        _, size = zf.parse_skippable_header(frame)
    except ValueError as e:
        raise FormatError(f"index: {e}") from None
    if size != h.index_size - zf.SKIPPABLE_HEADER:
        raise FormatError("index frame size does not match the header")
    magic, digest, nregions, nchunks = _INDEX_HEAD.unpack_from(frame, zf.SKIPPABLE_HEADER)
    if magic != INDEX_MAGIC:
        raise FormatError("index magic missing: the header points at something else")
    body = memoryview(frame)[zf.SKIPPABLE_HEADER + _INDEX_HEAD.size :]
    if checksum(body) != digest:
        raise FormatError("index checksum mismatch")
    # The checksum only proves the index is as written; below, that it is sane.
    if nchunks != h.chunk_count:
        raise FormatError(f"index lists {nchunks} chunks, header says {h.chunk_count}")
    if not 1 <= nregions <= MAX_REGIONS:
        raise FormatError(f"{nregions} regions (allowed 1..{MAX_REGIONS})")
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(body):
            raise FormatError("index ends early")
        out = body[pos : pos + n]
        pos += n
        return out

    regions: list[Region] = []
    names: set[str] = set()
    offset = next_chunk = 0
    for i in range(nregions):
        nlen, rflags, psize, start, length, first, count = _REGION.unpack(take(_REGION.size))
        try:
            name = bytes(take(nlen)).decode()
        except UnicodeDecodeError:
            raise FormatError(f"region {i}: name is not UTF-8") from None
        where = f"region {i} ({name!r})"
        if not name or nlen > MAX_NAME or name in names:
            raise FormatError(f"{where}: name empty, too long or repeated")
        if rflags & ~REGION_FLAG_ADDRESS:
            raise FormatError(f"{where}: unknown flags {rflags:#x}")
        if psize not in PAGE_SIZES or h.chunk_size % psize:
            raise FormatError(f"{where}: page size {psize} is not a power of two dividing the chunk size")
        if length <= 0 or length % psize:
            raise FormatError(f"{where}: length {length} is not a positive multiple of its page size")
        if first != next_chunk or count != -(-length // h.chunk_size):
            raise FormatError(f"{where}: chunks {first}+{count} do not tile its {length} bytes")
        if rflags & REGION_FLAG_ADDRESS and (start % psize or start + length > 1 << 64):
            raise FormatError(f"{where}: start address {start:#x} is unaligned or wraps")
        names.add(name)
        regions.append(
            Region(name, start if rflags & REGION_FLAG_ADDRESS else None, length, psize, offset, first, count)
        )
        offset += length
        next_chunk += count
    if next_chunk != nchunks:
        raise FormatError(f"regions cover {next_chunk} chunks, index lists {nchunks}")

    chunks = _parse_chunks(take(nchunks * _CHUNK.size), regions, h)

    zero_pages: list[bytes] = []
    for r in regions:
        pages = r.length // r.page_size
        bits = bytes(take((pages + 7) // 8))
        if pages % 8 and bits[-1] >> (pages % 8):
            raise FormatError(f"region {r.name!r}: zero bitmap has bits past its last page")
        zero_pages.append(_unpack_bits(bits, pages))
    if pos != len(body):
        raise FormatError(f"index has {len(body) - pos} unexpected trailing bytes")
    ci = chunks.kind.find(ChunkKind.ZERO)
    while ci >= 0:
        r = regions[chunks.region[ci]]
        first = (chunks.offset[ci] - r.offset) // r.page_size
        pages = chunks.length[ci] // r.page_size
        if zero_pages[chunks.region[ci]].count(1, first, first + pages) != pages:
            raise FormatError(f"chunk {ci}: marked zero but its pages are not")
        ci = chunks.kind.find(ChunkKind.ZERO, ci + 1)
    return Index(tuple(regions), chunks, tuple(zero_pages))


def _column(table: bytes, n: int, at: int, size: int) -> bytes:
    """Bytes ``at``..``at+size`` of each of ``n`` records, back to back: one
    strided slice per byte, so no Python object per record."""
    col = bytearray(n * size)
    step = _CHUNK.size
    for b in range(size):
        col[b::size] = table[at + b : n * step : step]
    return bytes(col)


def _ints(data: bytes, code: str) -> array[int]:
    """Little-endian integers of one column as an array."""
    out = array(code)
    out.frombytes(data)
    if sys.byteorder != "little":
        out.byteswap()
    return out


def _parse_chunks(records: memoryview, regions: list[Region], h: Header) -> ChunkTable:
    """Chunk records, cut into columns and checked column by column with
    C-speed builtins (an index of a few GiB has tens of thousands of records,
    and opening must be quick)."""
    csize, raw_prefix = h.chunk_size, zf.RAW_FRAME_PREFIX
    n = len(records) // _CHUNK.size
    table = records.tobytes()
    foffs = _ints(_column(table, n, 0, 8), "Q")
    fsizes = _ints(_column(table, n, 8, 4), "I")
    doffs = _ints(_column(table, n, 12, 4), "I")
    kinds = _column(table, n, 16, 1)
    lengths = _ints(_column(table, n, 20, 4), "I")
    digests = _column(table, n, 24, 16)
    region_of = array("I")
    offsets = array("Q")
    want = array("I")
    for r_i, r in enumerate(regions):
        k = r.chunk_count
        region_of += array("I", [r_i]) * k
        offsets += array("Q", range(r.offset, r.offset + k * csize, csize))
        want += array("I", [csize]) * (k - 1)
        want.append(r.length - (k - 1) * csize)
    ends = list(map(operator.add, foffs, fsizes))
    raw = [i for i, k in enumerate(kinds) if k == ChunkKind.RAW] if ChunkKind.RAW in kinds else []
    pages = [regions[region_of[i]].page_size for i in raw] if h.raw else []
    sound = (
        lengths == want
        and not kinds.translate(None, _KIND_BYTES)
        and min(fsizes) > 0
        and foffs[0] >= HEADER_FRAME
        and all(map(operator.le, ends, foffs[1:]))
        and ends[-1] <= h.index_offset
        and all(doffs[i] == raw_prefix and fsizes[i] == raw_prefix + lengths[i] for i in raw)
        and all((foffs[i] + raw_prefix) % p == 0 for i, p in zip(raw, pages, strict=False))
        and sum(doffs) == raw_prefix * len(raw)  # and 0 on every other chunk
    )
    if not sound:
        _find_chunk_problem(regions, h, foffs, fsizes, doffs, kinds, lengths)
    return ChunkTable(region_of, offsets, lengths, kinds, foffs, fsizes, doffs, digests)


def _find_chunk_problem(
    regions: list[Region],
    h: Header,
    foffs: Sequence[int],
    fsizes: Sequence[int],
    doffs: Sequence[int],
    kinds: bytes,
    lengths: Sequence[int],
) -> NoReturn:
    """Walk the records one by one to say which is wrong, and how."""
    frame_end = HEADER_FRAME
    for r in regions:
        for k in range(r.chunk_count):
            ci = r.first_chunk + k
            _check_chunk(ci, r, k, h, frame_end, foffs[ci], fsizes[ci], doffs[ci], kinds[ci], lengths[ci])
            frame_end = foffs[ci] + fsizes[ci]
    # Not reached while the two checks agree; if they ever do not, still a plain refusal.
    raise FormatError("chunk records are inconsistent")


def _check_chunk(
    ci: int, r: Region, k: int, h: Header, frame_end: int, foff: int, fsize: int, doff: int, kind: int, length: int
) -> None:
    """Raise the FormatError that says what is wrong with one chunk record, if anything."""
    where = f"chunk {ci} (region {r.name!r})"
    want = min(h.chunk_size, r.length - k * h.chunk_size)
    if length != want:
        raise FormatError(f"{where}: length {length}, expected {want}")
    if kind not in _KIND_VALUES:
        raise FormatError(f"{where}: unknown kind {kind}")
    if foff < frame_end or fsize <= 0 or foff + fsize > h.index_offset:
        raise FormatError(f"{where}: frame {foff:#x}+{fsize:#x} overlaps another or lies outside the data")
    if kind == ChunkKind.RAW:
        if doff != zf.RAW_FRAME_PREFIX or fsize != doff + length:
            raise FormatError(f"{where}: raw frame layout is inconsistent")
        if h.raw and (foff + doff) % r.page_size:
            raise FormatError(f"{where}: raw data is not page-aligned")
    elif doff:
        raise FormatError(f"{where}: data offset set on a non-raw chunk")


def check_seek_table(entries: list[tuple[int, int]], h: Header, idx: Index) -> None:
    """The seek table must describe the same frames as the index."""
    if len(entries) != len(idx.chunks):
        raise FormatError(f"seek table has {len(entries)} frames, index has {len(idx.chunks)}")
    if not entries:
        return
    csizes, dsizes = zip(*entries, strict=True)
    t = idx.chunks
    ends = list(map(operator.add, t.frame_offset, t.frame_size))
    if list(itertools.accumulate(csizes)) != ends or array("I", dsizes) != t.length:
        end = 0
        for i, ((csize, dsize), length, e) in enumerate(zip(entries, t.length, ends, strict=True)):
            end += csize
            if dsize != length or end != e:
                raise FormatError(f"seek table entry {i} disagrees with the index")
