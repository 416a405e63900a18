"""Shared (memfd) and huge-page memory restored through the daemon."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DaemonHandle, MiB, finish

SIZE = 32 * MiB
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@pytest.mark.parametrize("touch", ["seq", "random", "threads", "write"])
def test_shmem(daemon: DaemonHandle, touch: str) -> None:
    daemon.image("img", SIZE)
    rc, lines, err = finish(daemon.target("img", SIZE, "--memory", "shmem", "--touch", touch))
    assert rc == 0, (lines, err)
    assert lines[-1]["second_mapping_ok"] is True


@contextlib.contextmanager
def huge_pages(count: int) -> Iterator[None]:
    """Reserve ``count`` 2 MiB pages for the test, then put the old value back."""
    old = NR_HUGEPAGES.read_text().strip()
    try:
        NR_HUGEPAGES.write_text(str(int(old) + count))
        got = int(NR_HUGEPAGES.read_text())
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages: {e}")
    try:
        if got < int(old) + count:
            pytest.skip(f"asked for {int(old) + count} huge pages, the kernel reserved {got}")
        yield
    finally:
        NR_HUGEPAGES.write_text(old)


@pytest.mark.parametrize("touch", ["seq", "random", "none"])
def test_hugetlb(daemon: DaemonHandle, touch: str) -> None:
    daemon.image("img", SIZE)
    with huge_pages(SIZE // (2 * MiB) + 2):
        rc, lines, err = finish(daemon.target("img", SIZE, "--memory", "hugetlb", "--touch", touch))
    assert rc == 0, (lines, err)
    done = lines[-1]["complete"]
    assert done["pages"] == SIZE // (2 * MiB)  # type: ignore[index]


def test_hugetlb_declared_as_small_pages_is_refused(daemon: DaemonHandle) -> None:
    """Huge-page memory handed over without its page size gets a clear error."""
    daemon.image("img", SIZE)
    with huge_pages(SIZE // (2 * MiB) + 2):
        proc = daemon.target("img", SIZE, "--memory", "hugetlb", "--touch", "none", "--declare-small-pages")
        rc, lines, err = finish(proc)
    assert rc == 2, (lines, err)
    assert lines[-1]["handoff_error"] == "bad_range"
    assert "page_size" in str(lines[-1]["message"])
