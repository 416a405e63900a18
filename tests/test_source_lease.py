"""Read leases on mapped image files (lazypaged/sources/lease.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from lazypaged.sources import SourceError
from lazypaged.sources.raw import RawImageSource

from .snapshot_images import PAGE, gather

SIZE = 64 * PAGE


def _leases_on(path: Path) -> list[str]:
    ino = os.stat(path).st_ino
    with open("/proc/locks") as f:
        return [line for line in f if "LEASE" in line and f":{ino} " in line]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "img"
    path.write_bytes(data)
    return path, data


def test_served_from_the_mapping_under_a_lease(image: tuple[Path, bytes]) -> None:
    path, data = image

    async def main() -> None:
        src = RawImageSource(path)
        try:
            ext = src.extents(0, SIZE)
            assert all(e.owner is None for e in ext)  # zero-copy
            assert gather(ext) == data
            assert src.data_address(0, PAGE) == src.base_address
            (lease,) = _leases_on(path)
            assert "READ" in lease
        finally:
            src.close()
        assert not _leases_on(path)

    asyncio.run(main())


def test_a_writer_breaks_the_lease_and_reads_fall_back_to_pread(image: tuple[Path, bytes]) -> None:
    """While a writer holds the file open nothing is read from the mapping;
    once it is gone a new lease is taken and the size read afresh."""
    path, data = image

    async def main() -> None:
        src = RawImageSource(path)
        try:
            src.extents(0, PAGE)
            # The open waits until the loop lets the lease go.
            fd = await asyncio.to_thread(os.open, path, os.O_WRONLY)
            try:
                assert src.data_address(0, PAGE) == 0
                ext = src.extents(0, SIZE)
                assert all(e.owner is not None for e in ext if e.address)
                assert gather(ext) == data
                os.ftruncate(fd, SIZE // 2 + 100)
                with pytest.raises(SourceError):
                    src.extents(SIZE // 2, PAGE)  # the page holding the cut: missing
                assert gather(src.extents(0, SIZE // 2)) == data[: SIZE // 2]
            finally:
                os.close(fd)
            assert gather(src.extents(0, SIZE // 2)) == data[: SIZE // 2]
            assert _leases_on(path), "no new lease once the writer was gone"
            assert src.data_address(0, PAGE) == src.base_address
            assert src.data_address(SIZE // 2, PAGE) == 0
            with pytest.raises(SourceError):
                src.extents(SIZE // 2, PAGE)
        finally:
            src.close()

    asyncio.run(main())


def test_without_a_loop_bytes_are_read_not_mapped(image: tuple[Path, bytes]) -> None:
    """No loop to hear SIGIO: no lease, and a file cut short is a source
    error for the pages it lost, never SIGBUS."""
    path, data = image
    src = RawImageSource(path)
    try:
        assert not _leases_on(path)
        assert src.data_address(0, PAGE) == 0
        assert gather(src.extents(0, SIZE)) == data
        os.truncate(path, SIZE // 2 + 100)
        assert gather(src.extents(0, SIZE // 2)) == data[: SIZE // 2]
        with pytest.raises(SourceError):
            src.extents(SIZE // 2, PAGE)
        with pytest.raises(SourceError):
            src.extents(SIZE - PAGE, PAGE)
    finally:
        src.close()
