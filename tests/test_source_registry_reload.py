"""SourceRegistry.reload: new snapshot directories govern lookups from then on,
while sources already open keep serving the sessions holding them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lazypaged.config import Config
from lazypaged.sources.registry import SourceRegistry, UnknownSource

from .snapshot_images import PAGE, gather, write_image


def _dirs(tmp_path: Path) -> tuple[Path, Path, bytes, bytes]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    return a, b, write_image(a / "one.img", 4 * PAGE, seed=1), write_image(b / "two.img", 4 * PAGE, seed=2)


def test_reload_switches_directories_and_keeps_open_sources(tmp_path: Path) -> None:
    a, b, one, two = _dirs(tmp_path)
    reg = SourceRegistry((a,), linger=0)
    try:
        held = reg.acquire("one.img")
        with pytest.raises(UnknownSource):
            reg.acquire("two.img")
        reg.reload(Config(snapshot_dirs=(b,), source_linger=0))
        assert reg.snapshot_dirs == (b.resolve(),)
        with pytest.raises(UnknownSource):
            reg.acquire("one.img")
        new = reg.acquire("two.img")
        assert gather(new.extents(0, 4 * PAGE)) == two
        # The session that held one.img before the reload still reads it.
        assert gather(held.extents(0, 4 * PAGE)) == one
        assert held in reg.open_sources
        reg.release(held)
        reg.release(new)
        assert reg.open_sources == []
    finally:
        reg.close()


def test_reload_closes_idle_sources_outside_the_new_directories(tmp_path: Path) -> None:
    a, b, _, _ = _dirs(tmp_path)

    async def main() -> None:
        reg = SourceRegistry((a, b), linger=60)
        try:
            one, two = reg.acquire("one.img"), reg.acquire("two.img")
            reg.release(one)
            reg.release(two)
            assert set(map(id, reg.open_sources)) == {id(one), id(two)}  # both linger
            reg.reload(Config(snapshot_dirs=(b,), source_linger=60))
            assert reg.open_sources == [two]  # one.img left the configuration: closed now
            assert reg.acquire("two.img") is two  # the lingering one is reused
            reg.release(two)
        finally:
            reg.close()

    asyncio.run(main())


@pytest.mark.parametrize("name", ["one.img/", "one.img/.", ".", "./"])
def test_directory_spellings_of_a_name_are_unknown(tmp_path: Path, name: str) -> None:
    """Every listener resolves names here, so each refuses "img/" alike."""
    a, _, _, _ = _dirs(tmp_path)
    reg = SourceRegistry((a,), linger=0)
    try:
        with pytest.raises(UnknownSource):
            reg.acquire(name)
        assert reg.acquire("one.img") in reg.open_sources
    finally:
        reg.close()
