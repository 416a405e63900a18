"""The lazy-pages socket protocol of ``criu restore --lazy-pages``, without I/O.

Restore connects once to ``lazy-pages.socket`` and sends, per restored
process (threads share one uffd):

* an int32 pid, the pid in the images (inside the restored pid namespace);
* for a live process (pid > 0), a separate 1-byte message carrying the
  process's userfaultfd by SCM_RIGHTS; a negative pid is a zombie, and
  nothing follows it.

After the last process it sends uint32 0x52535446 ("RSTF", larger than any
pid) and closes. A close before that means the restore failed.

The I/O layer asks :meth:`RecordReader.need` how many bytes to read next
and reads exactly that many, so a uffd can never be taken with the bytes of
another record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: The end-of-restore marker.
RSTF = 0x52535446
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")


class RecordError(Exception):
    """The restorer sent something that is not a task record."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One process: its image pid and (unless it is a zombie) its uffd."""

    pid: int
    fd: int | None

    @property
    def zombie(self) -> bool:
        return self.pid < 0


@dataclass(frozen=True, slots=True)
class RestoreFinished:
    pass


Event = TaskRecord | RestoreFinished


class RecordReader:
    """State: waiting for a pid, for the fd byte of a pid, or done."""

    def __init__(self) -> None:
        self._buf = b""
        self._pid: int | None = None
        self.finished = False

    def need(self) -> int:
        """Bytes to read next (0 once the end marker arrived)."""
        if self.finished:
            return 0
        if self._pid is not None:
            return 1
        return 4 - len(self._buf)

    @property
    def mid_record(self) -> bool:
        return bool(self._buf) or self._pid is not None

    def feed(self, data: bytes, fds: list[int]) -> Event | None:
        """Take the bytes (and fds) of one read of at most :meth:`need` bytes.

        Returns an event once one is complete. The fds stay the caller's:
        on a :class:`RecordError` it must close them.
        """
        if not data:
            raise RecordError("empty read")
        if len(data) > self.need():
            raise RecordError(f"read {len(data)} bytes, {self.need()} were asked for")
        if self._pid is not None:
            if len(fds) != 1:
                raise RecordError(f"the record of pid {self._pid} carries {len(fds)} descriptors, expected one uffd")
            pid, self._pid = self._pid, None
            return TaskRecord(pid, fds[0])
        if fds:
            raise RecordError(f"{len(fds)} descriptors arrived with the pid bytes")
        self._buf += data
        if len(self._buf) < 4:
            return None
        raw, self._buf = self._buf, b""
        if _U32.unpack(raw)[0] == RSTF:
            self.finished = True
            return RestoreFinished()
        (pid,) = _I32.unpack(raw)
        if pid == 0:
            raise RecordError("pid 0 in a task record")
        if pid < 0:
            return TaskRecord(pid, None)
        self._pid = pid
        return None
