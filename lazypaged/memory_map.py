"""The memory a session serves: image regions, where the target maps them,
and the per-page states the session keeps.

A ``Region`` is a stretch of the *image*: a source, an offset in it, a page
size, and one state byte per page (``MISSING``, ``INFLIGHT`` while an
asynchronous fetch is out, ``SETTLED`` once installed, dropped or gone). A
``Mapping`` places part of a region at an address of the target; an
``mremap`` of the target moves mappings, never regions.
"""

from __future__ import annotations

import mmap

from .sources import PageSource

PAGE = mmap.PAGESIZE
MISSING, SETTLED, INFLIGHT = 0, 1, 2
INFLIGHT_TO_MISSING = bytes.maketrans(b"\x02", b"\x00")


class Region:
    """A stretch of the image: ``npages`` pages of ``source`` from ``offset``."""

    __slots__ = ("bitmap", "name", "npages", "offset", "page", "removed", "shift", "source", "zeropage")

    def __init__(self, source: PageSource, offset: int, npages: int, page: int = PAGE, name: str = "") -> None:
        self.source = source
        self.offset = offset
        self.page = page
        self.shift = page.bit_length() - 1
        self.npages = npages
        self.bitmap = bytearray(npages)
        self.name = name or source.name
        #: UFFDIO_ZEROPAGE works here (not on hugetlb: zeros are copied there).
        self.zeropage = page == PAGE
        #: Page-index runs [a, b) the target dropped and must read as zeros.
        self.removed: list[tuple[int, int]] = []

    def clone_for_fork(self) -> Region:
        r = Region(self.source, self.offset, self.npages, self.page, self.name)
        r.zeropage = self.zeropage
        r.bitmap = bytearray(self.bitmap.translate(INFLIGHT_TO_MISSING))
        r.removed = list(self.removed)
        return r


class Mapping:
    """Pages [first, first + (end-start)/page) of ``region`` at [start, end)."""

    __slots__ = ("end", "first", "last", "region", "start")

    def __init__(self, start: int, end: int, region: Region, first: int) -> None:
        self.start, self.end, self.region, self.first = start, end, region, first
        #: One past the last page index of the region this mapping shows.
        self.last = first + ((end - start) >> region.shift)



def runs_of(bm: bytearray, state: int, i: int, j: int) -> list[tuple[int, int]]:
    """Maximal runs [a, b) within [i, j) whose pages are all in ``state``."""
    out = []
    a = bm.find(state, i, j)
    while a != -1:
        b = a + 1
        while b < j and bm[b] == state:
            b += 1
        out.append((a, b))
        a = bm.find(state, b, j)
    return out


def subtract(runs: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    out = []
    for x, y in runs:
        if y <= a or x >= b:
            out.append((x, y))
            continue
        if x < a:
            out.append((x, a))
        if y > b:
            out.append((b, y))
    return out
