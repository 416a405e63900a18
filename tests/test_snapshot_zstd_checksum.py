"""Standard zstd tools find damage in a snapshot's data frames.

`snapshot verify` compares every chunk with its XXH3-128, but `zstd -t` and
`zstd -d` only see the frames: without zstd's own content checksum a byte
flipped inside a frame's payload decodes to wrong bytes and they exit 0.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from lazypaged.cli import main
from lazypaged.snapshot import SnapshotReader, SnapshotWriter, create_from_raw
from lazypaged.snapshot import format as fmt
from lazypaged.snapshot.reader import Damage

from .snapshot_images import write_image

CHUNK = 64 << 10
needs_zstd = pytest.mark.skipif(
    shutil.which("zstd") is None, reason="the zstd command is not installed (apt-get install zstd)"
)


def _image(path: Path) -> bytes:
    """A zero chunk, a chunk of random bytes (stored, so any flipped payload
    byte still decodes), then a realistic page mix."""
    data = bytes(CHUNK) + random.Random(3).randbytes(CHUNK) + write_image(path, 2 << 20)
    path.write_bytes(data)
    return data


def _zstd(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["zstd", "-q", *map(str, args)], capture_output=True, check=False, timeout=60)


def _frames(path: Path) -> list[tuple[fmt.ChunkKind, bytes]]:
    with SnapshotReader(path) as rd:
        chunks = list(rd.index.chunks)
    data = path.read_bytes()
    return [(c.kind, data[c.frame_offset : c.frame_offset + c.frame_size]) for c in chunks]


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))


def _chunk_frame(path: Path, i: int) -> tuple[int, int]:
    with SnapshotReader(path) as rd:
        c = rd.index.chunks[i]
    return c.frame_offset, c.frame_size


def _verify_exit(path: Path) -> int:
    return main(["snapshot", "verify", str(path), "-q"])


def test_every_compressed_and_zero_frame_has_a_content_checksum(tmp_path: Path) -> None:
    _image(tmp_path / "m.raw")
    out = tmp_path / "m.lzs"
    create_from_raw(tmp_path / "m.raw", out, chunk_size=CHUNK)
    frames = _frames(out)
    assert {k for k, _ in frames} == {fmt.ChunkKind.ZERO, fmt.ChunkKind.ZSTD}
    assert all(zstandard.get_frame_parameters(f).has_checksum for _, f in frames)


@needs_zstd
@pytest.mark.parametrize("layout", ["zstd", "raw"])
def test_zstd_t_passes_a_sound_snapshot(tmp_path: Path, layout: str) -> None:
    data = _image(tmp_path / "m.raw")
    out = tmp_path / "m.lzs"
    create_from_raw(tmp_path / "m.raw", out, raw=layout == "raw")
    res = _zstd("-t", out)
    assert res.returncode == 0, res.stderr
    res = _zstd("-d", "-c", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    assert _verify_exit(out) == 0


@needs_zstd
def test_zstd_t_and_d_catch_a_flipped_byte_in_a_data_frame(tmp_path: Path) -> None:
    _image(tmp_path / "m.raw")
    out = tmp_path / "m.lzs"
    create_from_raw(tmp_path / "m.raw", out, chunk_size=CHUNK)
    at, size = _chunk_frame(out, 1)  # the random chunk: its payload is stored as is
    _flip(out, at + size // 2)
    res = _zstd("-t", out)
    assert res.returncode != 0, "zstd -t passed a snapshot with a flipped payload byte"
    assert b"checksum" in res.stderr.lower(), res.stderr
    res = _zstd("-d", "-c", out)
    assert res.returncode != 0
    assert _verify_exit(out) == 1


@needs_zstd
def test_zstd_t_catches_a_damaged_zero_frame(tmp_path: Path) -> None:
    _image(tmp_path / "m.raw")
    out = tmp_path / "m.lzs"
    create_from_raw(tmp_path / "m.raw", out, chunk_size=CHUNK)
    at, size = _chunk_frame(out, 0)
    assert size in (13, 17)  # one 64 KiB RLE block, with or without the checksum
    _flip(out, at + 12)  # the byte the block repeats
    assert _zstd("-t", out).returncode != 0
    assert _verify_exit(out) == 1


def test_snapshot_without_frame_checksums_still_reads(tmp_path: Path) -> None:
    """Files written before frames carried checksums are still served and verified."""
    data = _image(tmp_path / "m.raw")
    out = tmp_path / "old.lzs"
    with SnapshotWriter(out, chunk_size=CHUNK, frame_checksums=False) as w:
        w.add_region("m.raw", len(data), (data[o : o + CHUNK] for o in range(0, len(data), CHUNK)))
        w.finish()
    frames = _frames(out)
    assert not any(zstandard.get_frame_parameters(f).has_checksum for _, f in frames)
    with SnapshotReader(out) as rd:
        got = b"".join(rd.chunk(i) for i in range(len(rd.index.chunks)))
        assert got == data
        assert [d for d in rd.verify() if isinstance(d, Damage)] == []
        buf = bytearray(CHUNK)
        rd.chunk_into(1, buf)
        assert buf == data[CHUNK : 2 * CHUNK]
    assert _verify_exit(out) == 0
    if shutil.which("zstd"):
        assert _zstd("-t", out).returncode == 0


@needs_zstd
def test_damage_to_the_frame_checksum_itself_is_reported(tmp_path: Path) -> None:
    """Data intact but its zstd checksum damaged: `zstd -t` fails the file, so
    verify must too. Serving leaves zstd's checksum to the chunk's own
    XXH3-128, which the intact data still matches: the right bytes are served."""
    data = _image(tmp_path / "m.raw")
    out = tmp_path / "m.lzs"
    create_from_raw(tmp_path / "m.raw", out, chunk_size=CHUNK)
    at, size = _chunk_frame(out, 1)
    _flip(out, at + size - 1)  # the frame's content checksum, not its data
    assert _zstd("-t", out).returncode != 0
    with SnapshotReader(out) as rd:
        assert bytes(rd.chunk(1)) == data[CHUNK : 2 * CHUNK]
        damage = [d for d in rd.verify() if isinstance(d, Damage)]
    assert [d.chunk for d in damage] == [1]
    assert "checksum" in damage[0].what
    assert _verify_exit(out) == 1
