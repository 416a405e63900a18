"""Opening a snapshot file as the right kind of source, chosen by its magic.

A lazypaged snapshot is recognised by its first bytes and then must be sound:
one that starts like a snapshot but is damaged is refused, never served as a
raw image. Anything else is a raw memory image.
"""

from __future__ import annotations

import os

from ..snapshot import format as fmt
from ..snapshot.reader import SnapshotReader
from .base import PageSource, SourceError
from .compressed import CompressedSnapshotSource, MappedSnapshotSource
from .raw import RawImageSource


def is_snapshot(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return fmt.looks_like_snapshot(f.read(16))


def open_source(path: str | os.PathLike[str], name: str | None = None) -> PageSource:
    """A PageSource for ``path``: raw-layout snapshots mapped, compressed ones decoded."""
    label = name or os.fspath(path)
    try:
        if not is_snapshot(path):
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
