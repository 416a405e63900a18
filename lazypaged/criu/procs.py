"""Finding restored tasks in /proc: image pids are namespace pids.

A task record names the pid *inside* the restored pid namespace; the host
pid (for a pidfd to watch and, if need be, to kill) is found among the
restorer's descendants by the last entry of their ``NSpid`` line.
"""

from __future__ import annotations

import contextlib
import os


def descendants(root: int) -> list[int]:
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 100_000:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _nspid(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def find_task(restorer: int, image_pid: int, claimed: set[int]) -> tuple[int | None, int | None]:
    """Host pid and pidfd of the restored task whose innermost pid is ``image_pid``."""
    if restorer <= 0:
        return None, None
    # The restorer itself last: a restorer that is its own task (a test's
    # stand-in) has no descendant with that pid.
    for p in [*descendants(restorer), restorer]:
        ns = _nspid(p)
        if ns and ns[-1] == image_pid and p not in claimed:
            fd = _open_pidfd(p)
            if fd is not None:
                claimed.add(p)
                return p, fd
    return None, None


def find_child(parent: int, claimed: set[int]) -> tuple[int | None, int | None]:
    """The newest not yet claimed child of ``parent`` (a fork just reported)."""
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{parent}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{parent}/task/{t}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        return None, None
    for p in sorted(set(kids) - claimed, reverse=True):
        fd = _open_pidfd(p)
        if fd is not None:
            claimed.add(p)
            return p, fd
    return None, None


def pid_of_pidfd(pidfd: int) -> int | None:
    """The pid a pidfd refers to (from its fdinfo), None once it has exited."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    return None
