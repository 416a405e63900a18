"""Hand-built zstd frames and the seek table, so the file stays a zstd stream.

Rules of this file: only byte layouts, no I/O. Every snapshot byte that is not
chunk data sits in a *skippable* frame, which zstd decoders step over, so
``zstd -d image.lzs`` prints the raw image. Two frame shapes are written by
hand because the library cannot make them:

- a *raw* frame: one uncompressed block whose payload lands on a page
  boundary in the file, so the page cache can be handed to UFFDIO_COPY as is;
- an *RLE* frame of zeros: a few bytes that decode to a whole zero chunk,
  with zstd's content checksum so that ``zstd -t`` notices a damaged one.

Layouts follow RFC 8878 (frame header, block header) and zstd's seekable
format (seek table in a skippable frame at the very end of the file).
"""

from __future__ import annotations

import struct

import xxhash

ZSTD_MAGIC = 0xFD2FB528
#: Skippable frames use magics 0x184D2A50..0x184D2A5F; lazypaged takes the first.
SKIPPABLE_MAGIC = 0x184D2A50
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_FOOTER_MAGIC = 0x8F92EAB1
SKIPPABLE_HEADER = 8
SEEK_FOOTER_SIZE = 9
SEEK_ENTRY_SIZE = 8
#: A zstd block holds at most 128 KiB, so a raw chunk is one block at most that.
MAX_BLOCK = 128 << 10

# Frame header descriptor: single segment (bit 5), 4-byte content size (flag 2).
_FHD = (2 << 6) | (1 << 5)
#: Descriptor bit 2: a 4-byte content checksum follows the last block.
FHD_CHECKSUM = 1 << 2
_FRAME_HEADER = struct.Struct("<IBI")  # magic, descriptor, content size
_SKIP_HEADER = struct.Struct("<II")
_FOOTER = struct.Struct("<IBI")
BLOCK_HEADER = 3
#: Bytes from the start of a raw frame to its payload.
RAW_FRAME_PREFIX = _FRAME_HEADER.size + BLOCK_HEADER

_BLOCK_RAW, _BLOCK_RLE = 0, 1


def _block_header(last: bool, kind: int, size: int) -> bytes:
    return ((size << 3) | (kind << 1) | int(last)).to_bytes(3, "little")


def raw_frame_prefix(length: int) -> bytes:
    """Frame and block header of a raw frame whose ``length`` payload bytes follow."""
    if not 0 < length <= MAX_BLOCK:
        raise ValueError(f"raw frame payload {length} not in 1..{MAX_BLOCK}")
    return _FRAME_HEADER.pack(ZSTD_MAGIC, _FHD, length) + _block_header(True, _BLOCK_RAW, length)


def content_checksum(data: bytes | bytearray | memoryview) -> bytes:
    """zstd's frame content checksum: the low 32 bits of XXH64 (seed 0), little-endian."""
    return (xxhash.xxh64_intdigest(data) & 0xFFFFFFFF).to_bytes(4, "little")


def zero_frame(length: int, checksum: bool = True) -> bytes:
    """A frame that decodes to ``length`` zero bytes (RLE blocks, 4 bytes each),
    ending in the content checksum unless ``checksum`` is false (older files)."""
    if length <= 0:
        raise ValueError("zero frame needs a positive length")
    out = bytearray(_FRAME_HEADER.pack(ZSTD_MAGIC, _FHD | (FHD_CHECKSUM if checksum else 0), length))
    left = length
    while left:
        n = min(left, MAX_BLOCK)
        left -= n
        out += _block_header(left == 0, _BLOCK_RLE, n) + b"\0"
    if checksum:
        out += content_checksum(bytes(length))
    return bytes(out)


def skippable_frame(payload: bytes) -> bytes:
    return _SKIP_HEADER.pack(SKIPPABLE_MAGIC, len(payload)) + payload


def padding_frame(total: int) -> bytes:
    """A skippable frame of exactly ``total`` bytes (at least the 8-byte header)."""
    if total < SKIPPABLE_HEADER:
        raise ValueError(f"padding frame needs at least {SKIPPABLE_HEADER} bytes")
    return _SKIP_HEADER.pack(SKIPPABLE_MAGIC, total - SKIPPABLE_HEADER) + bytes(total - SKIPPABLE_HEADER)


def parse_skippable_header(data: bytes) -> tuple[int, int]:
    """(magic, payload size) of a skippable frame header; raise ValueError if it is none."""
    magic, size = _SKIP_HEADER.unpack_from(data)
    if magic & 0xFFFFFFF0 != SKIPPABLE_MAGIC:
        raise ValueError(f"not a skippable frame (magic {magic:#010x})")
    return magic, size


def seek_table(entries: list[tuple[int, int]]) -> bytes:
    """The seekable format's seek table frame for (compressed, decompressed) sizes."""
    body = b"".join(struct.pack("<II", c, d) for c, d in entries)
    body += _FOOTER.pack(len(entries), 0, SEEKABLE_FOOTER_MAGIC)
    return _SKIP_HEADER.pack(SEEK_TABLE_MAGIC, len(body)) + body


def seek_table_size(frames: int) -> int:
    return SKIPPABLE_HEADER + frames * SEEK_ENTRY_SIZE + SEEK_FOOTER_SIZE


def parse_seek_footer(footer: bytes) -> int:
    """Frame count from the last 9 bytes of a file; ValueError if they are no footer."""
    frames, descriptor, magic = _FOOTER.unpack(footer)
    if magic != SEEKABLE_FOOTER_MAGIC:
        raise ValueError("no zstd seek table footer at the end of the file")
    if descriptor & 0x7C:
        raise ValueError(f"seek table descriptor {descriptor:#04x} sets reserved bits")
    return int(frames)


def parse_seek_table(frame: bytes, frames: int) -> list[tuple[int, int]]:
    """Entries of a whole seek table frame whose footer said ``frames``."""
    magic, size = _SKIP_HEADER.unpack_from(frame)
    if magic != SEEK_TABLE_MAGIC or size != len(frame) - SKIPPABLE_HEADER:
        raise ValueError("seek table frame header does not match its footer")
    if frame[-SEEK_FOOTER_SIZE + 4] & 0x80:
        raise ValueError("seek table with per-frame checksums is not what lazypaged writes")
    table = frame[SKIPPABLE_HEADER : SKIPPABLE_HEADER + frames * SEEK_ENTRY_SIZE]
    return list(struct.iter_unpack("<II", table))
