"""Synthetic CRIU image directories, written with lazypaged's own encoder."""

from __future__ import annotations

import struct
from pathlib import Path

from lazypaged.criu import images as img
from lazypaged.criu.protobuf import encode_field

PAGE = 4096


def write_image(path: Path, magic: int, records: list[bytes]) -> None:
    out = bytearray(struct.pack("<II", img.IMG_COMMON, magic))
    for r in records:
        out += struct.pack("<I", len(r)) + r
    path.write_bytes(bytes(out))


def pagemap_entry(vaddr: int, nr_pages: int, flags: int | None, layout: str = "4.1") -> bytes:
    rec = encode_field(1, vaddr)
    if layout == "4.1":
        rec += encode_field(2, nr_pages)
    else:
        rec += encode_field(2, 0)
    if flags is not None:
        rec += encode_field(4, flags)
    if layout != "4.1":
        rec += encode_field(5, nr_pages)
    return rec


def vma(start: int, end: int) -> bytes:
    return b"".join(
        encode_field(n, v) for n, v in ((1, start), (2, end), (3, 0), (4, 0), (5, 3), (6, 0x22), (7, 0x201), (8, 0))
    )


def make_images(
    d: Path,
    pid: int,
    vmas: list[tuple[int, int]],
    entries: list[tuple[int, int, int]],
    *,
    layout: str = "4.1",
    pages_id: int = 1,
    pattern: int = 0,
) -> bytes:
    """pstree, pagemap, mm and pages images for one task; returns the pages bytes.

    ``entries`` are (vaddr, nr_pages, flags); PRESENT pages get a pattern
    naming their address, so misplaced bytes show.
    """
    d.mkdir(parents=True, exist_ok=True)
    write_image(
        d / "pstree.img",
        img.MAGIC_PSTREE,
        [
            encode_field(1, pid)
            + encode_field(2, 0)
            + encode_field(3, pid)
            + encode_field(4, pid)
            + encode_field(5, pid)
        ],
    )
    recs = [encode_field(1, pages_id)] + [pagemap_entry(v, n, f, layout) for v, n, f in entries]
    write_image(d / f"pagemap-{pid}.img", img.MAGIC_PAGEMAP, recs)
    mm = b"".join(encode_field(14, vma(a, b)) for a, b in vmas)
    write_image(d / f"mm-{pid}.img", img.MAGIC_MM, [encode_field(1, 0x1000) + mm])
    pages = bytearray()
    for v, n, f in entries:
        if f & img.PE_PRESENT:
            for k in range(n):
                pages += page_bytes(v + k * PAGE, pattern)
    (d / f"pages-{pages_id}.img").write_bytes(bytes(pages))
    return bytes(pages)


def page_bytes(addr: int, pattern: int = 0) -> bytes:
    word = struct.pack("<QQ", addr, pattern or 0x5EED)
    return word * (PAGE // len(word))
