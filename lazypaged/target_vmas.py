"""What a target's address space holds over a restore's ranges, from /proc.

``UFFDIO_REGISTER`` succeeds over a range with holes in it, and a request
may claim registrations it does not have: both would leave pages the
daemon never hears about, which the target then reads as zeros. The
kernel's own view of the mappings (``/proc/PID/maps``, and the ``VmFlags``
of ``/proc/PID/smaps``) is what the handoff checks a range against.

Both files need ptrace read access to the target: a daemon without
CAP_SYS_PTRACE (the shipped unit) gets EACCES for a target of another uid,
or for a root one holding capabilities it lacks. The handoff then checks
what the uffd alone can prove (``_read_target`` in handoff_server.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: VmFlags mnemonic of VM_UFFD_MISSING: some uffd is registered there in missing mode.
UFFD_MISSING_FLAG = "um"


@dataclass(frozen=True, slots=True)
class Vma:
    start: int
    end: int
    #: VmFlags mnemonics (only read from smaps; empty from maps).
    flags: frozenset[str] = frozenset()
    #: The page size the kernel maps it with (smaps' KernelPageSize; 0 from maps).
    page: int = 0


def read_vmas(pid: int, *, flags: bool = False) -> list[Vma]:
    """The mappings of ``pid`` in address order; with ``flags``, their VmFlags too.

    ``flags`` reads smaps, which walks the page tables: only ask when needed.
    Raises OSError when the process cannot be read (gone, not ours to see).
    """
    path = f"/proc/{pid}/smaps" if flags else f"/proc/{pid}/maps"
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    out: list[Vma] = []
    cur: tuple[int, int] | None = None
    page = 0
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            if cur is not None:
                out.append(Vma(*cur, page=page))
            lo, _, hi = head.partition("-")
            cur, page = (int(lo, 16), int(hi, 16)), 0
        elif head == "KernelPageSize:":
            page = int(line.split()[1]) * 1024  # always in kB
        elif head == "VmFlags:" and cur is not None:
            out.append(Vma(cur[0], cur[1], frozenset(line.split()[1:]), page))
            cur = None
    if cur is not None:
        out.append(Vma(*cur, page=page))
    return out


def first_gap(vmas: list[Vma], start: int, end: int, flag: str | None = None) -> tuple[int, int] | None:
    """The first part of [start, end) no mapping covers (or none with ``flag``); None if all is."""
    at = start
    for v in vmas:
        if v.end <= at:
            continue
        if v.start >= end:
            break
        if v.start > at:
            return at, v.start
        if flag is not None and flag not in v.flags:
            return at, min(v.end, end)
        at = v.end
        if at >= end:
            return None
    return (at, end) if at < end else None


def page_mismatch(vmas: list[Vma], start: int, end: int, page: int) -> Vma | None:
    """The first mapping over [start, end) whose kernel page size is not ``page``."""
    for v in vmas:
        if v.end > start and v.start < end and v.page != page:
            return v
    return None


def registered_at(pid: int, addr: int) -> bool:
    """Whether ``pid``'s mapping at ``addr`` is registered with a uffd in
    missing mode; False when it cannot be read (gone, not ours to see)."""
    try:
        vmas = read_vmas(pid, flags=True)
    except (OSError, ValueError):
        return False
    return any(v.start <= addr < v.end and UFFD_MISSING_FLAG in v.flags for v in vmas)


def children_of(pid: int) -> frozenset[int] | None:
    """The children of every thread of ``pid``; None once it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    kids: set[int] = set()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.update(int(k) for k in f.read().split())
        except (OSError, ValueError):
            continue
    return frozenset(kids)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of any of its threads, and theirs)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for k in sorted(children_of(todo.pop()) or ()):
            if k not in out:
                out.append(k)
                todo.append(k)
    return out
