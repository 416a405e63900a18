"""Just enough protobuf to read CRIU's images: a wire-format field walker.

CRIU's images are proto2 messages; lazypaged needs a handful of scalar
fields from three of them (pagemap, mm, pstree), so instead of generated
code this walks the wire format and lets each caller pick the fields it
knows. Unknown fields are skipped, as protobuf itself does, so images from
newer CRIU versions with extra fields still parse.

Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32 (3 and 4,
the deprecated groups, never occur in CRIU's images and are rejected).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

#: A varint carries at most 64 bits: 10 bytes of 7 bits.
_MAX_VARINT_BYTES = 10
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class DecodeError(ValueError):
    """The bytes are not a valid protobuf message."""


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos``: (value, position after it)."""
    result = shift = 0
    end = min(len(buf), pos + _MAX_VARINT_BYTES)
    while pos < end:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    raise DecodeError("truncated or over-long varint")


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for every field of one message.

    Varints and fixed-width values come as ints, length-delimited ones as a
    memoryview of their bytes (a nested message, a string or a packed array).
    """
    view = memoryview(buf)
    pos, n = 0, len(view)
    while pos < n:
        key, pos = read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        value: int | memoryview
        if wire == 0:
            value, pos = read_varint(view, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise DecodeError("truncated fixed64")
            value = _U64.unpack_from(view, pos)[0]
            pos += 8
        elif wire == 2:
            length, pos = read_varint(view, pos)
            if pos + length > n:
                raise DecodeError(f"length-delimited field {number} runs past the message end")
            value = view[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > n:
                raise DecodeError("truncated fixed32")
            value = _U32.unpack_from(view, pos)[0]
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire} for field {number}")
        yield number, wire, value


def packed_varints(buf: memoryview) -> list[int]:
    """The values of a packed repeated varint field."""
    out, pos = [], 0
    while pos < len(buf):
        v, pos = read_varint(buf, pos)
        out.append(v)
    return out


def to_signed32(v: int) -> int:
    """A proto ``int32`` (negative values are sign-extended to 64 bits on the wire)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


# -- encoding (tests and tools build images with these) ------------------------------


def encode_varint(v: int) -> bytes:
    if v < 0:
        v &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_field(number: int, value: int | bytes) -> bytes:
    """One varint field, or a length-delimited one for bytes."""
    if isinstance(value, bytes):
        return encode_varint(number << 3 | 2) + encode_varint(len(value)) + value
    return encode_varint(number << 3) + encode_varint(value)
