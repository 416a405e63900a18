"""Opening a memory file as the right kind of source, never by guessing.

The kind is decided before anything is served, and a file that claims to be
a lazypaged snapshot is never served as a raw image:

- named ``*.lzs`` (the request's name or the file's real path, any case):
  a snapshot, which must parse;
- first bytes exactly a snapshot's magic (under any name): a snapshot,
  which must parse;
- first bytes a near miss of the magic (a few bits or bytes off,
  :func:`lazypaged.snapshot.format.near_miss`): refused as a damaged
  snapshot header;
- anything else: a raw memory image.

Serving a damaged snapshot as raw would hand a target the snapshot file's
own bytes as its memory, the worst outcome there is; refusing it costs one
clear error. ``docs/snapshot-format.md`` states the same rule.
"""

from __future__ import annotations

import enum
import os
import stat

from ..snapshot import format as fmt
from ..snapshot.reader import SnapshotReader
from .base import PageSource, SourceError
from .compressed import CompressedSnapshotSource, MappedSnapshotSource
from .raw import RawImageSource

#: Files named with this suffix are snapshots and nothing else.
SNAPSHOT_SUFFIX = ".lzs"
#: Bytes read to decide a file's kind (the magic sits in the first 16).
_PROBE = 16


class SourceKind(enum.Enum):
    RAW = "raw"
    SNAPSHOT = "snapshot"


def named_snapshot(*names: str | os.PathLike[str]) -> bool:
    """True if any of the names says "snapshot" (ends in ``.lzs``, any case)."""
    return any(os.fspath(n).lower().endswith(SNAPSHOT_SUFFIX) for n in names)


def is_snapshot(path: str | os.PathLike[str]) -> bool:
    """True if the file starts exactly like a lazypaged snapshot."""
    with open(path, "rb") as f:
        return fmt.looks_like_snapshot(f.read(_PROBE))


def source_kind(path: str | os.PathLike[str], name: str | None = None) -> SourceKind:
    """The kind ``path`` must be served as; FormatError for a damaged snapshot
    header, OSError if the file cannot be read, SourceError if it is not a
    regular file."""
    label = name or os.fspath(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{label}: not a regular file")
        head = os.pread(fd, _PROBE, 0)
    finally:
        os.close(fd)
    if fmt.near_miss(head):
        bits = fmt.magic_distance(head)
        raise fmt.FormatError(
            f"{label}: damaged snapshot header: its first bytes are {bits} bit{'s' * (bits != 1)} from a "
            "lazypaged snapshot's magic; refusing to serve it as a raw image"
        )
    if fmt.looks_like_snapshot(head):
        return SourceKind.SNAPSHOT
    if named_snapshot(label, path, os.path.realpath(path)):
        raise fmt.FormatError(f"{label}: named *{SNAPSHOT_SUFFIX} but not a lazypaged snapshot (wrong magic)")
    return SourceKind.RAW


def open_source(path: str | os.PathLike[str], name: str | None = None) -> PageSource:
    """A PageSource for ``path``: raw-layout snapshots mapped, compressed ones
    decoded, raw images mapped; the kind decided by :func:`source_kind`."""
    label = name or os.fspath(path)
    try:
        if source_kind(path, label) is SourceKind.RAW:
            return RawImageSource(path, name=label)
        reader = SnapshotReader(path, name=label)
    except OSError as e:
        raise SourceError(f"cannot open snapshot {label!r}: {e.strerror or e}") from None
    try:
        if reader.header.raw:
            return MappedSnapshotSource(reader)
        return CompressedSnapshotSource(reader)
    except BaseException:
        reader.close()
        raise
