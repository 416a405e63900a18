"""CRIU image directories as lazypaged snapshots, and serving restores from them.

``create_from_criu`` writes one snapshot region per lazy range of every task
(named ``PID:0xADDRESS``, with its dump-time address), read from the task's
``pages-N.img``: the CRIU images gain compression, zero-page elision and a
checksum per chunk. ``SnapshotTaskSource`` serves a ``criu restore
--lazy-pages`` from such a snapshot (``lazypaged criu-lazy-pages
--snapshot FILE``): each lazy range is looked up by name, so the snapshot
must come from the same dump as the images being restored.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..snapshot.writer import DEFAULT_LEVEL, Progress, SnapshotWriter, WriteStats, read_chunks
from ..sources.base import PageSource
from ..sources.raw import find_holes
from . import images as img


def region_name(pid: int, start: int) -> str:
    return f"{pid}:{start:#x}"


def create_from_criu(
    images_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    chunk_size: int | None = None,
    level: int = DEFAULT_LEVEL,
    raw: bool = False,
    progress: Progress | None = None,
) -> WriteStats:
    """Snapshot of every lazy range of every task in a CRIU images directory.

    Raises :class:`~lazypaged.criu.images.ImageError` for unreadable images
    and ValueError when there is nothing to convert (no lazy pages, or the
    pages stayed with a ``dump --lazy-pages`` page server).
    """
    d = Path(images_dir)
    tasks = [img.load_task(d, e.pid) for e in img.load_pstree(d) if e.pid > 0]
    if any(r.offset is None for t in tasks for r in t.lazy):
        raise ValueError(f"{d}: the lazy pages of this dump are on its page server, not in the images")
    if not any(t.lazy for t in tasks):
        raise ValueError(f"{d}: no lazy pages in these images (was it dumped with --lazy-pages elsewhere?)")
    with SnapshotWriter(out, chunk_size=chunk_size, level=level, raw=raw, progress=progress) as w:
        for t in tasks:
            if not t.lazy:
                continue
            fd = os.open(t.pages_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                holes = find_holes(fd, os.fstat(fd).st_size)
                for r in t.lazy:
                    assert r.offset is not None
                    length = r.end - r.start
                    chunks = read_chunks(fd, r.offset, length, w.chunk_size, holes, ring=w.in_flight + 2)
                    w.add_region(region_name(t.pid, r.start), length, chunks, start=r.start)
            finally:
                os.close(fd)
        return w.finish()


def snapshot_offsets(source: PageSource, task: img.TaskImage) -> list[int]:
    """Where each of ``task``'s lazy ranges begins in a snapshot source."""
    regions = {getattr(r, "name", None): r for r in getattr(source, "regions", ())}
    out = []
    for r in task.lazy:
        reg = regions.get(region_name(task.pid, r.start))
        if reg is None or getattr(reg, "length", 0) != r.end - r.start:
            raise img.ImageError(
                f"{source.name}: no region {region_name(task.pid, r.start)} of {r.end - r.start} bytes: "
                "the snapshot was not made from these images"
            )
        out.append(int(reg.offset))
    return out
