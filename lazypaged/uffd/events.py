"""Typed userfaultfd events, decoded from one read of many ``uffd_msg``."""

from __future__ import annotations

from dataclasses import dataclass

from . import abi


class IncompleteMessage(ValueError):
    """A read returned a length that is not a multiple of ``uffd_msg``."""


class UnknownEvent(ValueError):
    """The kernel sent an event code this binding does not know."""


@dataclass(frozen=True, slots=True)
class PageFault:
    address: int
    flags: int
    thread_id: int  # 0 unless UFFD_FEATURE_THREAD_ID was negotiated

    @property
    def write(self) -> bool:
        return bool(self.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE)


@dataclass(frozen=True, slots=True)
class Fork:
    """The target forked; ``uffd`` is a new fd in *our* table for the child."""

    uffd: int


@dataclass(frozen=True, slots=True)
class Remap:
    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """``madvise(MADV_DONTNEED/REMOVE)``: the pages must come back as zeros."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    start: int
    end: int


Event = PageFault | Fork | Remap | Remove | Unmap

_MSG = abi.UFFD_MSG_STRUCT


def decode(data: bytes) -> list[Event]:
    """Decode every message in ``data`` (the result of one ``read``)."""
    if len(data) % _MSG.size:
        raise IncompleteMessage(f"read {len(data)} bytes, not a multiple of {_MSG.size}")
    out: list[Event] = []
    for code, _r1, _r2, _r3, a, b, c in _MSG.iter_unpack(data):
        if code == abi.UFFD_EVENT_PAGEFAULT:
            out.append(PageFault(b, a, c & 0xFFFFFFFF))
        elif code == abi.UFFD_EVENT_FORK:
            out.append(Fork(a & 0xFFFFFFFF))
        elif code == abi.UFFD_EVENT_REMAP:
            out.append(Remap(a, b, c))
        elif code == abi.UFFD_EVENT_REMOVE:
            out.append(Remove(a, b))
        elif code == abi.UFFD_EVENT_UNMAP:
            out.append(Unmap(a, b))
        else:
            raise UnknownEvent(f"unknown uffd event code {code:#x}")
    return out
