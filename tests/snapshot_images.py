"""Test images for the snapshot tests: a realistic page mix, made deterministically.

Each page is one of: zero (never written memory), text-like (words repeated
with small variations, compresses well) or random (does not compress).
"""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

from lazypaged.sources.base import Extent

PAGE = os.sysconf("SC_PAGE_SIZE")
_WORDS = b"alpha beta gamma delta page fault region chunk table index value key".split()


def page_mix(size: int, seed: int = 7, zero: float = 0.3, text: float = 0.4) -> bytes:
    rnd = random.Random(seed)
    out = bytearray(size)
    for p in range(0, size, PAGE):
        k = rnd.random()
        if k < zero:
            continue
        if k < zero + text:
            line = b" ".join(rnd.choice(_WORDS) for _ in range(12)) + b"\n"
            out[p : p + PAGE] = (line * (PAGE // len(line) + 1))[:PAGE]
        else:
            out[p : p + PAGE] = rnd.randbytes(PAGE)
    return bytes(out)


def write_image(path: Path, size: int, seed: int = 7) -> bytes:
    data = page_mix(size, seed)
    path.write_bytes(data)
    return data


def gather(extents: list[Extent]) -> bytes:
    """The bytes a list of extents stands for (zeros for zero extents)."""
    out = bytearray()
    for e in extents:
        out += bytes(e.length) if e.address == 0 else ctypes.string_at(e.address, e.length)
    return bytes(out)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))
