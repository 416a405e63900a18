"""lazypaged's own snapshot files: chunked, checksummed, zstd-compatible."""

from .format import ChunkError, FormatError, NotASnapshot, SnapshotError
from .reader import SnapshotReader
from .writer import SnapshotWriter, WriteStats, create_from_raw

__all__ = [
    "ChunkError",
    "FormatError",
    "NotASnapshot",
    "SnapshotError",
    "SnapshotReader",
    "SnapshotWriter",
    "WriteStats",
    "create_from_raw",
]
