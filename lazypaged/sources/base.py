"""The page-source interface a restore session needs.

A source is a read-only byte space of ``size`` bytes. The session asks it for
``extents``: runs that are either zero (install with UFFDIO_ZEROPAGE) or data
at an address in the daemon's memory (the ``src`` of UFFDIO_COPY). Local
sources answer synchronously; sources that must wait (network, decompression
in a pool) set ``synchronous = False`` and implement :meth:`fetch`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass


class SourceError(Exception):
    """The source cannot deliver the bytes asked for (I/O, corruption, bounds)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes at source ``offset``: zeros if ``address`` is 0.

    ``owner`` keeps the memory behind ``address`` alive while the extent is in
    use (a decompressed buffer, a received frame); an mmap-backed source
    leaves it None.
    """

    offset: int
    length: int
    address: int
    owner: object = None


class PageSource(ABC):
    """A snapshot's bytes, addressed by offset."""

    #: Human name for logs and status (e.g. the snapshot's relative path).
    name: str
    #: The file behind the source, when it is one (working-set records live beside it).
    path: str | None = None
    size: int
    synchronous: bool = True

    @abstractmethod
    def extents(self, offset: int, length: int) -> list[Extent]:
        """Cover [offset, offset+length) with extents, in order, synchronously."""

    async def fetch(self, offset: int, length: int) -> list[Extent]:
        """Like :meth:`extents`, for sources that must wait (background fill)."""
        return self.extents(offset, length)

    async def fetch_into(
        self, offset: int, length: int, sink: Callable[[list[Extent]], None], owner: object = None
    ) -> bool:
        """A background read handed to ``sink`` piece by piece as it arrives
        (the extents' memory is only valid during the call). True when every
        piece was handed over; False tells the caller to read what is still
        missing with :meth:`fetch`. ``owner``: see :meth:`fetch_urgent`."""
        sink(await self.fetch(offset, length))
        return True

    async def fetch_urgent(self, offset: int, length: int, owner: object = None) -> list[Extent]:
        """:meth:`fetch` for a faulting thread: a source with queues (a remote
        peer) must put this ahead of every background fetch. ``owner`` (the
        session asking) lets a shared source tell one restore's background
        reads, which help its own faulting threads, from another's."""
        return await self.fetch(offset, length)

    def data_address(self, offset: int, length: int) -> int:
        """Address of [offset, offset+length) in our memory if it is plain data
        there (no hole, nothing to decode), else 0: lets the fault path copy
        straight from it. Zero bytes in it are then copied as data."""
        return 0

    def address_of(self, offset: int, length: int) -> int:
        """Address where [offset, offset+length) lies contiguously in our memory
        (zeros included), or 0 if the source cannot say. Huge pages need one
        contiguous buffer per page; a mapped file can give it directly."""
        return 0

    def pinned(self) -> contextlib.AbstractContextManager[bool]:
        """Keep addresses from :meth:`extents` readable until the block ends,
        for a reader outside the event loop (a thread) or across awaits. A
        mapped file otherwise only promises them until the loop runs its next
        callback (sources/lease.py); memory a source owns needs nothing."""
        return contextlib.nullcontext(True)

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(f"{self.name}: range {offset:#x}+{length:#x} outside source of {self.size:#x} bytes")

    @abstractmethod
    def close(self) -> None:
        """Release the source (mappings, files, connections)."""
