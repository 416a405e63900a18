"""A reader of lazypaged snapshots written from docs/snapshot-format.md alone.

It uses nothing of lazypaged: only the document's tables (offsets, sizes,
byte order, what each checksum covers), ``struct``, ``xxhash`` and a zstd
decoder. If the document and the files disagree, this reader refuses the
files, which is what the test using it checks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash
import zstandard


class DocReaderError(Exception):
    """The file does not follow the document."""


@dataclass
class DocRegion:
    name: str
    flags: int
    page_size: int
    start: int
    length: int
    first_chunk: int
    chunk_count: int
    zero_bitmap: bytes = b""


@dataclass
class DocChunk:
    frame_offset: int
    frame_size: int
    data_offset: int
    kind: int
    length: int
    digest: bytes


@dataclass
class DocSnapshot:
    version: int
    flags: int
    chunk_size: int
    regions: list[DocRegion]
    chunks: list[DocChunk]
    #: Every region's bytes, decoded and checked, back to back.
    data: bytes


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise DocReaderError(what)


def read(blob: bytes) -> DocSnapshot:
    # -- header frame: 64 bytes at offset 0 ---------------------------------------------
    _need(len(blob) >= 64, "shorter than the header")
    _need(blob[0:4] == bytes([0x50, 0x2A, 0x4D, 0x18]), "header frame magic")
    _need(struct.unpack_from("<I", blob, 4)[0] == 56, "header frame size")
    _need(blob[8:16] == b"LZPGSNAP", "magic")
    version, flags, ck_kind = struct.unpack_from("<HHB", blob, 16)
    _need(blob[21:24] == bytes(3), "reserved header bytes")
    chunk_size, chunk_count = struct.unpack_from("<II", blob, 24)
    index_offset, index_size, file_size = struct.unpack_from("<QQQ", blob, 32)
    # "XXH3-64 of bytes 8..55", stored in xxHash's canonical (big-endian) form.
    _need(blob[56:64] == struct.pack(">Q", xxhash.xxh3_64_intdigest(blob[8:56])), "header checksum")
    _need(version == 1, "version")
    _need(flags & ~1 == 0, "unknown flags")
    _need(ck_kind == 1, "checksum kind")
    raw_layout = bool(flags & 1)
    _need(chunk_size % 4096 == 0 and 4096 <= chunk_size <= (128 << 10 if raw_layout else 4 << 20), "chunk size")
    _need(file_size == len(blob), "file size")
    seek_table_size = 8 + 8 * chunk_count + 9
    _need(index_offset + index_size + seek_table_size == file_size, "index placement")

    # -- index frame --------------------------------------------------------------------
    frame = blob[index_offset : index_offset + index_size]
    magic, size = struct.unpack_from("<II", frame, 0)
    _need(magic == 0x184D2A50 and size == index_size - 8, "index frame header")
    payload = frame[8:]
    _need(payload[0:8] == b"LZPGINDX", "index magic")
    digest = payload[8:24]
    nregions, nchunks = struct.unpack_from("<II", payload, 24)
    # The checksum covers everything after the two counts.
    _need(xxhash.xxh3_128_digest(payload[32:]) == digest, "index checksum")
    _need(1 <= nregions <= 65536 and nchunks == chunk_count, "index counts")
    pos = 32
    regions: list[DocRegion] = []
    for _ in range(nregions):
        nlen, rflags, psize, start, length, first, count = struct.unpack_from("<HHIQQII", payload, pos)
        pos += 32
        name = payload[pos : pos + nlen].decode("utf-8")
        pos += nlen
        _need(psize >= 4096 and psize & (psize - 1) == 0 and chunk_size % psize == 0, "page size")
        _need(length > 0 and length % psize == 0, "region length")
        _need(count == -(-length // chunk_size), "region chunk count")
        regions.append(DocRegion(name, rflags, psize, start, length, first, count))
    chunks: list[DocChunk] = []
    for _ in range(nchunks):
        foff, fsize, doff, kind, length, cdigest = struct.unpack_from("<QIIB3xI16s", payload, pos)
        _need(payload[pos + 17 : pos + 20] == bytes(3), "reserved chunk bytes")
        pos += 40
        chunks.append(DocChunk(foff, fsize, doff, kind, length, cdigest))
    for r in regions:
        pages = r.length // r.page_size
        r.zero_bitmap = payload[pos : pos + (pages + 7) // 8]
        pos += (pages + 7) // 8
        _need(pages % 8 == 0 or r.zero_bitmap[-1] >> (pages % 8) == 0, "bits past the last page")
    _need(pos == len(payload), "trailing index bytes")

    # -- seek table: last frame ---------------------------------------------------------
    table = blob[index_offset + index_size :]
    magic, size = struct.unpack_from("<II", table, 0)
    _need(magic == 0x184D2A5E and size == len(table) - 8, "seek table frame header")
    count, descriptor, footer_magic = struct.unpack_from("<IBI", table, len(table) - 9)
    _need(count == nchunks and descriptor == 0 and footer_magic == 0x8F92EAB1, "seek table footer")
    end = 0
    for i, c in enumerate(chunks):
        csize, dsize = struct.unpack_from("<II", table, 8 + 8 * i)
        end += csize
        _need(end == c.frame_offset + c.frame_size and dsize == c.length, f"seek table entry {i}")

    # -- chunks, region by region -------------------------------------------------------
    dctx = zstandard.ZstdDecompressor()
    out = bytearray()
    prev_end = 64
    expected = 0
    for r in regions:
        _need(r.first_chunk == expected, "regions do not tile the chunks")
        expected += r.chunk_count
        for k in range(r.chunk_count):
            c = chunks[r.first_chunk + k]
            _need(c.length == min(chunk_size, r.length - k * chunk_size), "chunk length")
            _need(c.frame_offset >= prev_end and c.frame_offset + c.frame_size <= index_offset, "frame bounds")
            prev_end = c.frame_offset + c.frame_size
            fr = blob[c.frame_offset : c.frame_offset + c.frame_size]
            if c.kind == 1:
                # 9-byte frame header: magic 28 B5 2F FD, descriptor 0xA0, content size;
                # then one raw block's 3-byte header (last block, type raw, size).
                _need(c.data_offset == 12 and c.frame_size == 12 + c.length, "raw chunk layout")
                _need(fr[0:4] == bytes([0x28, 0xB5, 0x2F, 0xFD]) and fr[4] == 0xA0, "raw frame header")
                _need(struct.unpack_from("<I", fr, 5)[0] == c.length, "raw frame content size")
                _need(int.from_bytes(fr[9:12], "little") == (c.length << 3) | 1, "raw block header")
                if raw_layout:
                    _need((c.frame_offset + 12) % r.page_size == 0, "raw data alignment")
                data = fr[12:]
            elif c.kind in (0, 2):
                _need(c.data_offset == 0, "data offset of a non-raw chunk")
                _need(zstandard.get_frame_parameters(fr).content_size == c.length, "declared size")
                data = dctx.decompress(fr)
            else:
                raise DocReaderError(f"unknown chunk kind {c.kind}")
            _need(len(data) == c.length, "decoded length")
            _need(xxhash.xxh3_128_digest(data) == c.digest, f"chunk checksum of chunk {r.first_chunk + k}")
            base = k * chunk_size // r.page_size
            for p in range(c.length // r.page_size):
                bit = r.zero_bitmap[(base + p) // 8] >> ((base + p) % 8) & 1
                page = data[p * r.page_size : (p + 1) * r.page_size]
                _need(not bit or page == bytes(r.page_size), "page marked zero holds data")
                _need(c.kind != 0 or bit, "zero chunk with a page not marked zero")
            out += data
    _need(expected == nchunks, "regions do not cover every chunk")
    return DocSnapshot(version, flags, chunk_size, regions, chunks, bytes(out))
