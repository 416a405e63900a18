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


def test_a_lease_back_between_two_looks_still_serves_bytes_below_the_cut(image: tuple[Path, bytes]) -> None:
    """A truncate ends between the refusal of a lease and the next look:
    the range below the new end is served, never taken for shrunk away
    (under sigbus such a read poisoned good pages below the cut)."""
    path, data = image
    cut = SIZE // 2 + 100

    async def main() -> None:
        src = RawImageSource(path)
        try:
            src.extents(0, PAGE)  # served under a lease
            # Opened from a thread: the open waits for the loop to let the lease go.
            writer = await asyncio.to_thread(os.open, path, os.O_WRONLY)  # no lease while it is open
            lease = src._lease
            real = lease.valid
            calls = 0

            def refused_then_writer_gone() -> bool:
                nonlocal calls
                calls += 1
                ok = real()
                if calls == 1:
                    assert not ok  # a writer has the file open: no lease
                    os.ftruncate(writer, cut)
                    os.close(writer)  # the truncate is over
                return ok

            assert not lease._held
            lease.valid = refused_then_writer_gone  # type: ignore[method-assign]
            ext = src.extents(0, SIZE // 2)
            assert calls >= 2
            assert gather(ext) == data[: SIZE // 2]
            with pytest.raises(SourceError, match="shrank"):
                src.extents(0, SIZE)
        finally:
            src.close()

    asyncio.run(main())
