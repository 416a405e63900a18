"""Reading the CRIU images a lazy-pages daemon needs.

An image file starts with two little-endian u32 magics (IMG_COMMON, then
the image's own; a few old images carry only their own), followed by
records: a u32 length, then one protobuf message of that length.

* ``pstree.img``: one ``pstree_entry`` per process (pid = 1, ppid = 2,
  pgid = 3, sid = 4, threads = 5), zombies included.
* ``pagemap-PID.img``: a ``pagemap_head`` (pages_id = 1: the pages live in
  ``pages-<pages_id>.img``), then ``pagemap_entry`` records: vaddr = 1,
  nr_pages = 2, in_parent = 3 (legacy), flags = 4, and in CRIU 4.2 and later
  a 64-bit page count in field 5 (field 2 is then written as 0).
* ``mm-PID.img``: one ``mm_entry`` whose field 14 repeats ``vma_entry``
  (start = 1, end = 2, pgoff = 3, shmid = 4, prot = 5, flags = 6, status = 7).

``pages-N.img`` is the raw bytes of every PRESENT entry, in pagemap order,
so a page's offset there is the size of all earlier PRESENT entries plus
its distance from its own entry's start.

A lazy range is a LAZY entry clipped to one VMA of ``mm-PID.img``: a single
UFFDIO_COPY cannot span two mappings, so ranges never cross a VMA boundary.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .protobuf import DecodeError, fields, packed_varints, to_signed32

PAGE = 4096
IMG_COMMON = 0x54564319
MAGIC_PAGEMAP = 0x56084025
MAGIC_MM = 0x57492820
MAGIC_PSTREE = 0x50273030

#: Pagemap entry flags.
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4

#: Largest record accepted: an mm_entry with thousands of VMAs is well below this.
MAX_RECORD = 64 << 20
_U32 = struct.Struct("<I")


class ImageError(Exception):
    """A CRIU image is missing, truncated or not what its name says."""


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE


@dataclass(frozen=True, slots=True)
class Pagemap:
    pages_id: int
    entries: tuple[PagemapEntry, ...]
    #: "4.2" when the entries carry the 64-bit count of field 5, else "4.1".
    layout: str


@dataclass(frozen=True, slots=True)
class Vma:
    start: int
    end: int
    prot: int = 0
    flags: int = 0
    status: int = 0


@dataclass(frozen=True, slots=True)
class PstreeEntry:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class LazyRange:
    """Dump-time addresses [start, end) to serve lazily; ``offset`` is where
    their bytes start in ``pages-N.img``, or None when the dump left them
    with the page server (``dump --lazy-pages``)."""

    start: int
    end: int
    offset: int | None

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE


@dataclass(frozen=True, slots=True)
class TaskImage:
    pid: int
    pagemap: Pagemap
    vmas: tuple[Vma, ...]
    lazy: tuple[LazyRange, ...]
    pages_path: Path

    @property
    def lazy_pages(self) -> int:
        return sum(r.npages for r in self.lazy)

    @property
    def needs_pages_file(self) -> bool:
        return any(r.offset is not None for r in self.lazy)


# -- records ---------------------------------------------------------------------------


def read_records(path: Path, magic: int) -> list[memoryview]:
    """The protobuf records of image ``path``, after checking its magic."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image") from None
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    return parse_records(data, magic, str(path))


def parse_records(data: bytes, magic: int, name: str = "image") -> list[memoryview]:
    view = memoryview(data)
    if len(view) < 4:
        raise ImageError(f"{name}: too short for an image header")
    first = _U32.unpack_from(view, 0)[0]
    if first == IMG_COMMON:
        if len(view) < 8:
            raise ImageError(f"{name}: truncated image header")
        got = _U32.unpack_from(view, 4)[0]
        pos = 8
    else:
        got, pos = first, 4
    if got != magic:
        raise ImageError(f"{name}: magic {got:#x} is not {magic:#x}")
    out = []
    while pos < len(view):
        if pos + 4 > len(view):
            raise ImageError(f"{name}: truncated record length at byte {pos}")
        n = _U32.unpack_from(view, pos)[0]
        pos += 4
        if n > MAX_RECORD or pos + n > len(view):
            raise ImageError(f"{name}: record of {n} bytes at byte {pos - 4} runs past the end")
        out.append(view[pos : pos + n])
        pos += n
    return out


# -- messages ----------------------------------------------------------------------------


def parse_pagemap(records: list[memoryview], name: str = "pagemap") -> Pagemap:
    if not records:
        raise ImageError(f"{name}: no pagemap_head record")
    try:
        pages_id = 0
        for number, wire, value in fields(records[0]):
            if number == 1 and wire == 0:
                assert isinstance(value, int)
                pages_id = value
        entries: list[PagemapEntry] = []
        layout = "4.1"
        for rec in records[1:]:
            vaddr = nr32 = flags = 0
            nr64: int | None = None
            in_parent = has_flags = False
            for number, wire, value in fields(rec):
                if wire != 0:
                    continue
                assert isinstance(value, int)
                if number == 1:
                    vaddr = value
                elif number == 2:
                    nr32 = value & 0xFFFFFFFF
                elif number == 3:
                    in_parent = bool(value)
                elif number == 4:
                    flags, has_flags = value, True
                elif number == 5:
                    nr64 = value
            if nr64 is not None:
                layout = "4.2"
            nr = nr64 if nr64 is not None else nr32
            if not has_flags:
                flags = PE_PARENT if in_parent else PE_PRESENT
            if vaddr % PAGE:
                raise ImageError(f"{name}: entry at {vaddr:#x} is not page-aligned")
            entries.append(PagemapEntry(vaddr, nr, flags))
    except DecodeError as e:
        raise ImageError(f"{name}: {e}") from None
    return Pagemap(pages_id, tuple(entries), layout)


def parse_mm(records: list[memoryview], name: str = "mm") -> tuple[Vma, ...]:
    if len(records) != 1:
        raise ImageError(f"{name}: expected one mm_entry, found {len(records)} records")
    vmas: list[Vma] = []
    try:
        for number, wire, value in fields(records[0]):
            if number != 14 or wire != 2:
                continue
            assert isinstance(value, memoryview)
            v = {1: 0, 2: 0, 5: 0, 6: 0, 7: 0}
            for n2, w2, x in fields(value):
                if w2 == 0 and n2 in v:
                    assert isinstance(x, int)
                    v[n2] = x
            if v[2] <= v[1] or v[1] % PAGE or v[2] % PAGE:
                raise ImageError(f"{name}: bad vma {v[1]:#x}-{v[2]:#x}")
            vmas.append(Vma(v[1], v[2], v[5], v[6], v[7]))
    except DecodeError as e:
        raise ImageError(f"{name}: {e}") from None
    vmas.sort(key=lambda x: x.start)
    return tuple(vmas)


def parse_pstree(records: list[memoryview], name: str = "pstree") -> list[PstreeEntry]:
    out = []
    try:
        for rec in records:
            v = {1: 0, 2: 0, 3: 0, 4: 0}
            threads: list[int] = []
            for number, wire, value in fields(rec):
                if number in v and wire == 0:
                    assert isinstance(value, int)
                    v[number] = to_signed32(value)
                elif number == 5:
                    if wire == 0:
                        assert isinstance(value, int)
                        threads.append(to_signed32(value))
                    elif wire == 2:
                        assert isinstance(value, memoryview)
                        threads += [to_signed32(t) for t in packed_varints(value)]
            out.append(PstreeEntry(v[1], v[2], v[3], v[4], tuple(threads)))
    except DecodeError as e:
        raise ImageError(f"{name}: {e}") from None
    return out


# -- lazy ranges -------------------------------------------------------------------------


def lazy_ranges(pagemap: Pagemap, vmas: tuple[Vma, ...], name: str = "pagemap") -> tuple[LazyRange, ...]:
    """Every LAZY entry, clipped at VMA boundaries, with its pages-file offset.

    Contiguous pieces inside one VMA whose bytes are contiguous too are
    merged, so a task's heap is one range however CRIU chunked its entries.
    """
    starts = [v.start for v in vmas]
    out: list[LazyRange] = []
    offset = 0
    for e in pagemap.entries:
        here = offset
        if e.flags & PE_PRESENT:
            offset += e.nr_pages * PAGE
        if not e.flags & PE_LAZY or e.nr_pages == 0:
            continue
        if e.flags & PE_PARENT:
            raise ImageError(f"{name}: lazy entry {e.vaddr:#x} has its pages in a parent image (not supported)")
        data = e.flags & PE_PRESENT
        pos = e.vaddr
        while pos < e.end:
            i = bisect.bisect_right(starts, pos) - 1
            if i < 0 or pos >= vmas[i].end:
                nxt = starts[i + 1] if i + 1 < len(starts) else e.end
                raise ImageError(
                    f"{name}: lazy pages {pos:#x}-{min(nxt, e.end):#x} lie outside every VMA of the mm image"
                )
            stop = min(e.end, vmas[i].end)
            off = here + (pos - e.vaddr) if data else None
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.end == pos
                and vmas[i].start < pos
                and (prev.offset is None) == (off is None)
                and (off is None or prev.offset == off - (prev.end - prev.start))
            ):
                out[-1] = LazyRange(prev.start, stop, prev.offset)
            else:
                out.append(LazyRange(pos, stop, off))
            pos = stop
    return tuple(out)


def load_pstree(images_dir: Path) -> list[PstreeEntry]:
    path = images_dir / "pstree.img"
    return parse_pstree(read_records(path, MAGIC_PSTREE), str(path))


def load_task(images_dir: Path, pid: int) -> TaskImage:
    """A task's pagemap, VMAs and lazy ranges, checked against its pages file."""
    pm_path = images_dir / f"pagemap-{pid}.img"
    pagemap = parse_pagemap(read_records(pm_path, MAGIC_PAGEMAP), str(pm_path))
    mm_path = images_dir / f"mm-{pid}.img"
    vmas = parse_mm(read_records(mm_path, MAGIC_MM), str(mm_path))
    lazy = lazy_ranges(pagemap, vmas, str(pm_path))
    pages = images_dir / f"pages-{pagemap.pages_id}.img"
    task = TaskImage(pid, pagemap, vmas, lazy, pages)
    if task.needs_pages_file:
        want = sum(e.nr_pages for e in pagemap.entries if e.flags & PE_PRESENT) * PAGE
        try:
            have = os.stat(pages).st_size
        except OSError as e:
            raise ImageError(f"{pages}: {e.strerror}") from None
        if have < want:
            raise ImageError(f"{pages}: {have} bytes, but {pm_path.name} lists {want} bytes of pages")
    return task


def layout_of(images_dir: Path) -> str | None:
    """The pagemap layout ("4.1" or "4.2") of the first task with entries, if any."""
    for entry in load_pstree(images_dir):
        if entry.pid <= 0:
            continue
        path = images_dir / f"pagemap-{entry.pid}.img"
        if not path.exists():
            continue
        pm = parse_pagemap(read_records(path, MAGIC_PAGEMAP), str(path))
        if pm.entries:
            return pm.layout
    return None
