"""How a source's kind is decided: never by falling back to raw.

A file named ``*.lzs``, or one whose first bytes are a lazypaged snapshot's
magic or a near miss of it, is a snapshot and must parse; only a file that
neither is named nor looks like a snapshot is served as a raw image. The
damaged files here used to be served raw, installing the snapshot file's own
bytes as memory.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lazypaged.snapshot import create_from_raw
from lazypaged.snapshot import format as fmt
from lazypaged.sources import RawImageSource, SourceError
from lazypaged.sources.open import open_source
from lazypaged.sources.registry import SourceRegistry

from .conftest import DaemonHandle, MiB, finish
from .snapshot_images import PAGE, flip_bit, write_image

#: Offsets of the bytes that identify a snapshot: the skippable frame magic and LZPGSNAP.
MAGIC_BYTES = [*range(0, 4), *range(8, 16)]


def _pad_to_pages(path: Path) -> None:
    """Grow the file to a whole number of pages, as a raw image must be."""
    size = path.stat().st_size
    os.truncate(path, -(-size // PAGE) * PAGE)


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    raw = tmp_path / "mem.raw"
    write_image(raw, 64 * PAGE, seed=5)
    out = tmp_path / "mem.lzs"
    create_from_raw(raw, out, chunk_size=16 * PAGE)
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("suffix", [".lzs", ".img"])
def test_every_single_bit_flip_in_the_magic_is_refused(tmp_path: Path, snapshot: Path, suffix: str) -> None:
    good = snapshot.read_bytes()
    target = tmp_path / f"damaged{suffix}"
    for byte in MAGIC_BYTES:
        for bit in range(8):
            target.write_bytes(good)
            flip_bit(target, byte, bit)
            _pad_to_pages(target)
            with pytest.raises(SourceError, match="damaged snapshot header") as ei:
                open_source(target, name=target.name).close()
            assert str(ei.value).startswith(f"{target.name}: "), str(ei.value)


@pytest.mark.parametrize("where", ["frame magic", "snapshot magic"])
def test_overwritten_magic_bytes_are_refused(tmp_path: Path, snapshot: Path, where: str) -> None:
    """A burst of damage (whole bytes replaced), not just single bits."""
    blob = bytearray(snapshot.read_bytes())
    if where == "frame magic":
        blob[0:4] = bytes(4)
    else:
        blob[8:12] = b"\xff\xff\xff\xff"
    target = tmp_path / "burst.img"
    target.write_bytes(blob)
    _pad_to_pages(target)
    with pytest.raises(SourceError, match="damaged snapshot header"):
        open_source(target).close()


def test_lzs_name_that_is_not_a_snapshot_is_refused(tmp_path: Path) -> None:
    for name, data in (("zeros.lzs", bytes(4 * PAGE)), ("random.lzs", random.Random(3).randbytes(4 * PAGE))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(SourceError, match="not a lazypaged snapshot"):
            open_source(p).close()
    upper = tmp_path / "UPPER.LZS"
    upper.write_bytes(bytes(PAGE))
    with pytest.raises(SourceError, match="not a lazypaged snapshot"):
        open_source(upper).close()


def test_exact_magic_with_a_damaged_body_is_refused_whatever_the_name(tmp_path: Path, snapshot: Path) -> None:
    target = _copy(snapshot, tmp_path / "mem.img")
    flip_bit(target, fmt.HEADER_FRAME - 1)  # the header checksum
    _pad_to_pages(target)
    with pytest.raises(SourceError, match="header checksum"):
        open_source(target).close()


def test_sound_snapshot_under_another_name_is_served_as_a_snapshot(tmp_path: Path, snapshot: Path) -> None:
    src = open_source(_copy(snapshot, tmp_path / "mem.snap"))
    try:
        assert not isinstance(src, RawImageSource)
        assert src.size == 64 * PAGE
    finally:
        src.close()


@pytest.mark.parametrize(
    "content",
    ["zeros", "random", "text", "far from the magic"],
)
def test_raw_images_stay_raw(tmp_path: Path, content: str) -> None:
    rnd = random.Random(9)
    data = {
        "zeros": bytes(8 * PAGE),
        "random": rnd.randbytes(8 * PAGE),
        "text": (b"LZPG is not the start of this line. " * 1000)[: 8 * PAGE],
        # 40 of the 96 magic bits flipped: nothing like a damaged header.
        "far from the magic": _far_from_magic(rnd) + bytes(8 * PAGE - 16),
    }[content]
    p = tmp_path / "mem.img"
    p.write_bytes(data)
    src = open_source(p)
    try:
        assert isinstance(src, RawImageSource)
    finally:
        src.close()


def _far_from_magic(rnd: random.Random) -> bytes:
    head = bytearray(fmt.encode_header(fmt.Header(1, 0, 1, 65536, 1, 64, 64, 1 << 20))[:16])
    bits = rnd.sample([b * 8 + k for b in MAGIC_BYTES for k in range(8)], 40)
    for b in bits:
        head[b // 8] ^= 1 << (b % 8)
    return bytes(head)


def test_the_damaged_snapshot_of_the_issue_is_refused_by_a_running_daemon(daemon: DaemonHandle) -> None:
    """One bit flipped in the magic of a snapshot whose size is a page
    multiple, and a restore asking for no more than that size: the restore is
    refused with a clear error, nothing is registered or installed, and the
    daemon goes on serving."""
    image = daemon.snapshots / "img.raw"
    write_image(image, 16 * MiB, seed=4)
    snap = daemon.snapshots / "img.lzs"
    create_from_raw(image, snap)
    good = snap.read_bytes()
    flip_bit(snap, 12, 2)  # inside LZPGSNAP
    _pad_to_pages(snap)
    size = snap.stat().st_size  # the most a raw reading of the file could serve
    rc, lines, err = finish(daemon.target("img.lzs", size, "--touch", "seq", "--wait", "--image", str(image)))
    assert rc == 2, (rc, lines, err)
    assert lines[-1]["handoff_error"] == "source_error", lines
    assert "damaged snapshot header" in str(lines[-1]["message"]), lines
    assert not [ln for ln in daemon.log_lines() if ln.get("event") == "session_started"]
    snap.write_bytes(good)
    rc, lines, err = finish(daemon.target("img.lzs", size, "--touch", "seq", "--wait", "--image", str(image)))
    assert rc == 0, (lines, err)
    assert lines[-1]["ok"] is True


def test_registry_judges_by_the_requested_name_and_the_real_path(tmp_path: Path) -> None:
    """A raw image reached through a ``*.lzs`` name, or a ``*.lzs`` file reached
    through another name, claims to be a snapshot either way."""
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    write_image(snaps / "plain.img", 4 * PAGE, seed=1)
    write_image(snaps / "mislabelled.lzs", 4 * PAGE, seed=2)
    (snaps / "alias.lzs").symlink_to("plain.img")
    (snaps / "alias.img").symlink_to("mislabelled.lzs")
    reg = SourceRegistry((snaps,), linger=0)
    try:
        src = reg.acquire("plain.img")
        assert isinstance(src, RawImageSource)
        reg.release(src)
        for name in ("alias.lzs", "alias.img", "mislabelled.lzs"):
            with pytest.raises(SourceError, match=r"named \*\.lzs but not a lazypaged snapshot"):
                reg.acquire(name)
        assert reg.open_sources == []
    finally:
        reg.close()
