"""The kernel version each userfaultfd feature needs, for ``lazypaged features``.

The kernel only answers "offered" or not; an operator on an older kernel
needs to know which version would offer what is missing, and what lazypaged
loses without it.
"""

from __future__ import annotations

from typing import Final

from .uffd import abi

#: Feature name -> (first Linux version offering it, what lazypaged does with it).
SINCE: Final[dict[str, tuple[tuple[int, int], str]]] = {
    "pagefault_flag_wp": ((5, 7), "not used"),
    "event_fork": ((4, 11), "follow a target's forks (needs CAP_SYS_PTRACE)"),
    "event_remap": ((4, 11), "follow mremap"),
    "event_remove": ((4, 11), "dropped pages (madvise) come back as zeros"),
    "missing_hugetlbfs": ((4, 11), "hugetlb memory"),
    "missing_shmem": ((4, 11), "shared memory (memfd, tmpfs)"),
    "event_unmap": ((4, 11), "follow munmap"),
    "sigbus": ((4, 14), "a uffd negotiated with it is refused: it cannot be served"),
    "thread_id": ((4, 14), "name the faulting thread"),
    "minor_hugetlbfs": ((5, 13), "not used"),
    "minor_shmem": ((5, 14), "not used"),
    "exact_address": ((5, 18), "not used"),
    "wp_hugetlbfs_shmem": ((5, 19), "not used"),
    "wp_unpopulated": ((6, 4), "not used"),
    "poison": ((6, 6), "failure_policy sigbus (without it: kill)"),
    "wp_async": ((6, 7), "not used"),
    "move": ((6, 8), "not used"),
}


def describe(offered: int) -> list[str]:
    """One line per known feature: offered or not, the kernel that has it, its use."""
    have = set(abi.feature_names(offered))
    lines = []
    for name in abi.FEATURE_NAMES.values():
        (major, minor), use = SINCE[name]
        mark = "yes" if name in have else "no "
        lines.append(f"{mark} {name:<20} Linux >= {major}.{minor:<3} {use}")
    return lines
