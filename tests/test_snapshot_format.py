"""Snapshot files: round trips, zstd compatibility, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from lazypaged.snapshot import ChunkError, FormatError, SnapshotReader, SnapshotWriter, create_from_raw
from lazypaged.snapshot import format as fmt
from lazypaged.snapshot import zstdframes as zf
from lazypaged.snapshot.reader import Damage
from lazypaged.snapshot.writer import _Encoded

from .snapshot_images import PAGE, flip_bit, write_image

SIZE = 4 << 20


@pytest.fixture(params=["zstd", "raw"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "mem.raw"
    return path, write_image(path, SIZE)


def _snap(tmp_path: Path, image: tuple[Path, bytes], layout: str, **kw: int) -> Path:
    out = tmp_path / f"mem.{layout}.lzs"
    create_from_raw(image[0], out, raw=layout == "raw", **kw)
    return out


def _all_bytes(rd: SnapshotReader) -> bytes:
    return b"".join(rd.chunk(i) for i in range(len(rd.index.chunks)))


def test_round_trip(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> None:
    out = _snap(tmp_path, image, layout)
    with SnapshotReader(out) as rd:
        assert rd.size == SIZE
        assert rd.header.raw == (layout == "raw")
        assert _all_bytes(rd) == image[1]
        assert [d for d in rd.verify() if isinstance(d, Damage)] == []
        # The zero bitmap marks exactly the zero pages.
        zero = bytes(PAGE)
        want = bytes(image[1][p : p + PAGE] == zero for p in range(0, SIZE, PAGE))
        assert rd.index.zero_pages[0] == want
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_compressed_is_smaller_and_raw_is_sparse(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    z = _snap(tmp_path, image, "zstd")
    r = _snap(tmp_path, image, "raw")
    assert z.stat().st_size < SIZE * 0.5
    # Zero pages of the raw layout are holes: fewer blocks than the image's data.
    assert r.stat().st_blocks * 512 < SIZE * 0.8


def test_raw_layout_data_is_page_aligned(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    with SnapshotReader(_snap(tmp_path, image, "raw")) as rd:
        raw = [c for c in rd.index.chunks if c.kind == fmt.ChunkKind.RAW]
        assert raw
        assert all((c.frame_offset + c.data_offset) % PAGE == 0 for c in raw)


@pytest.mark.parametrize("chunk", [4096, 12288, 64 << 10])
def test_chunk_sizes_and_short_last_chunk(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "odd.raw"
    data = write_image(path, 37 * PAGE, seed=3)
    out = tmp_path / "odd.lzs"
    st = create_from_raw(path, out, chunk_size=chunk)
    assert st.chunks == -(-len(data) // chunk)
    with SnapshotReader(out) as rd:
        assert rd.header.chunk_size == chunk
        assert _all_bytes(rd) == data


def test_several_regions(tmp_path: Path) -> None:
    out = tmp_path / "multi.lzs"
    parts = {"[heap]": os.urandom(3 * PAGE), "[stack]": bytes(5 * PAGE), "table": b"t" * (70 * PAGE)}
    with SnapshotWriter(out, chunk_size=16 * PAGE) as w:
        for i, (name, data) in enumerate(parts.items()):
            chunks = [data[p : p + w.chunk_size] for p in range(0, len(data), w.chunk_size)]
            w.add_region(name, len(data), chunks, start=0x10000000 * (i + 1))
        st = w.finish()
    assert st.regions == 3
    with SnapshotReader(out) as rd:
        assert [r.name for r in rd.regions] == list(parts)
        assert [r.start for r in rd.regions] == [0x10000000, 0x20000000, 0x30000000]
        assert [r.offset for r in rd.regions] == [0, 3 * PAGE, 8 * PAGE]
        assert _all_bytes(rd) == b"".join(parts.values())
        assert all(c.kind == fmt.ChunkKind.ZERO for c in rd.index.chunks[1:2])


def test_writer_refuses_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk size"):
        SnapshotWriter(tmp_path / "x", chunk_size=1000)
    with pytest.raises(ValueError, match="one zstd block"):
        SnapshotWriter(tmp_path / "x", chunk_size=256 << 10, raw=True)
    with pytest.raises(ValueError, match="level"):
        SnapshotWriter(tmp_path / "x", level=99)
    with SnapshotWriter(tmp_path / "x") as w:
        w.add_region("a", PAGE, [None])
        with pytest.raises(ValueError, match="twice"):
            w.add_region("a", PAGE, [None])
        with pytest.raises(ValueError, match="expected"):
            w.add_region("b", 2 * PAGE, [b"x"])
    assert list(tmp_path.iterdir()) == []  # aborted: nothing left behind


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command is not installed (apt-get install zstd)")
def test_zstd_cli_decompresses_to_the_image(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> None:
    out = _snap(tmp_path, image, layout)
    res = subprocess.run(["zstd", "-d", "-c", "-q", str(out)], capture_output=True, check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == image[1]


def test_seek_table_matches_frames(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """Each seek table entry's compressed bytes decode to its decompressed size."""
    out = _snap(tmp_path, image, "zstd")
    blob = out.read_bytes()
    frames = zf.parse_seek_footer(blob[-zf.SEEK_FOOTER_SIZE :])
    entries = zf.parse_seek_table(blob[-zf.seek_table_size(frames) :], frames)
    pos = 0
    dctx = zstandard.ZstdDecompressor()
    for csize, dsize in entries[:5]:
        piece = blob[pos : pos + csize]
        if pos == 0:
            piece = piece[fmt.HEADER_FRAME :]  # the header frame counts toward the first entry
        assert len(dctx.decompress(piece)) == dsize
        pos += csize


# -- bad input ----------------------------------------------------------------------------


def _open_fails(path: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        SnapshotReader(path)


def test_truncated_file(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> None:
    out = _snap(tmp_path, image, layout)
    full = out.stat().st_size
    for cut in (full - 1, full // 2, fmt.HEADER_FRAME + 1):
        os.truncate(out, cut)
        _open_fails(out, "truncated")
    os.truncate(out, 10)
    _open_fails(out, "truncated|magic")


def test_trailing_bytes(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    with open(out, "ab") as f:
        f.write(b"junk")
    _open_fails(out, "trailing bytes")


def test_wrong_magic(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    flip_bit(out, 9)
    _open_fails(out, "magic")


def test_wrong_version(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    with open(out, "r+b") as f:
        f.seek(zf.SKIPPABLE_HEADER + 8)
        f.write((fmt.VERSION + 1).to_bytes(2, "little"))
    _open_fails(out, "version 2")


def test_flipped_bit_in_header(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    flip_bit(out, zf.SKIPPABLE_HEADER + 26)  # inside chunk_count
    _open_fails(out, "header checksum")


def test_flipped_bit_in_index(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> None:
    out = _snap(tmp_path, image, layout)
    with SnapshotReader(out) as rd:
        h = rd.header
    for where in (h.index_offset + h.index_size // 2, h.index_offset + h.index_size - 1):
        flip_bit(out, where, 3)
        _open_fails(out, "index checksum")
        flip_bit(out, where, 3)
    SnapshotReader(out).close()  # restored: opens again


def _rewrite_index(path: Path, change: dict[int, dict[str, object]]) -> None:
    """Re-encode the index with some chunk fields changed and every checksum valid,
    as a careless or malicious writer would: only validation can catch it."""
    with SnapshotReader(path) as rd:
        h, idx = rd.header, rd.index
    chunks = [c._replace(**change.get(i, {})) for i, c in enumerate(idx.chunks)]
    index = fmt.encode_index(idx.regions, chunks, idx.zero_pages)
    assert len(index) == h.index_size
    with open(path, "r+b") as f:
        f.seek(h.index_offset)
        f.write(index)


def test_index_pointing_past_the_end(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> None:
    out = _snap(tmp_path, image, layout)
    size = out.stat().st_size
    _rewrite_index(out, {3: {"frame_offset": size + 4096}})
    _open_fails(out, "chunk 3 .*outside the data")


def test_index_with_overlapping_frames(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    with SnapshotReader(out) as rd:
        c2 = rd.index.chunks[2]
    _rewrite_index(out, {3: {"frame_offset": c2.frame_offset + 1}})
    _open_fails(out, "chunk 3 .*overlaps")


def test_index_with_wrong_chunk_length(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    _rewrite_index(out, {5: {"length": 4096}})
    _open_fails(out, "chunk 5 .*length 4096")


def test_index_marks_data_chunk_as_zero(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    with SnapshotReader(out) as rd:
        data_chunk = next(i for i, c in enumerate(rd.index.chunks) if c.kind == fmt.ChunkKind.ZSTD)
    _rewrite_index(out, {data_chunk: {"kind": fmt.ChunkKind.ZERO}})
    _open_fails(out, f"chunk {data_chunk}: marked zero")


def _data_chunk(rd: SnapshotReader, n: int = 0) -> int:
    return [i for i, c in enumerate(rd.index.chunks) if c.kind != fmt.ChunkKind.ZERO][n]


def test_flipped_bit_in_data_chunk(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> None:
    out = _snap(tmp_path, image, layout)
    with SnapshotReader(out) as rd:
        bad = _data_chunk(rd, 2)
        c = rd.index.chunks[bad]
    flip_bit(out, c.frame_offset + c.frame_size - 100, 5)
    with SnapshotReader(out) as rd:  # the index is intact: opening works
        with pytest.raises(ChunkError, match=f"chunk {bad} of region 'mem.raw'") as ei:
            rd.chunk(bad)
        assert ei.value.chunk == bad
        assert ei.value.region == "mem.raw"
        assert "checksum mismatch" in ei.value.what or "zstd" in ei.value.what
        rd.chunk(_data_chunk(rd, 0))  # other chunks are fine
        damage = [d for d in rd.verify() if isinstance(d, Damage)]
    assert [d.chunk for d in damage] == [bad]


def test_zero_chunk_frame_damage_found_by_verify(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """A zero chunk's frame is never served, but `zstd -d` reads it: verify checks it."""
    path = tmp_path / "z.raw"
    path.write_bytes(bytes(64 << 10) + image[1][: 64 << 10])
    out = tmp_path / "z.lzs"
    create_from_raw(path, out)
    with SnapshotReader(out) as rd:
        c = rd.index.chunks[0]
        assert c.kind == fmt.ChunkKind.ZERO
    flip_bit(out, c.frame_offset + c.frame_size - 1)  # the RLE byte
    with SnapshotReader(out) as rd:
        assert rd.chunk(0) == bytes(64 << 10)
        assert [d.chunk for d in rd.verify() if isinstance(d, Damage)] == [0]


def _patched_writer(monkeypatch: pytest.MonkeyPatch, frame_for: object) -> None:
    orig = SnapshotWriter._encode

    def encode(self: SnapshotWriter, data: bytes | memoryview | None, length: int, page_size: int) -> _Encoded:
        e = orig(self, data, length, page_size)
        if e.kind == fmt.ChunkKind.ZSTD and data is not None and bytes(data[:8]) == b"BADCHUNK":
            return dataclasses.replace(e, frame=frame_for(bytes(data)))  # type: ignore[operator]
        return e

    monkeypatch.setattr(SnapshotWriter, "_encode", encode)


@pytest.mark.parametrize(
    "frame_for",
    [
        pytest.param(lambda d: zstandard.ZstdCompressor().compress(d[:-PAGE]), id="declares-less"),
        pytest.param(lambda d: zstandard.ZstdCompressor().compress(d + bytes(PAGE)), id="declares-more"),
        pytest.param(lambda d: zstandard.ZstdCompressor(write_content_size=False).compress(d), id="undeclared"),
        # An honest-looking header whose block holds a page less than it declares.
        pytest.param(
            lambda d: zf.raw_frame_prefix(len(d))[:-3] + zf.raw_frame_prefix(len(d) - PAGE)[-3:] + d[:-PAGE],
            id="short-block",
        ),
    ],
)
def test_chunk_that_decompresses_to_the_wrong_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frame_for: object
) -> None:
    path = tmp_path / "w.raw"
    data = bytearray(os.urandom(4 * 16 * PAGE))
    data[16 * PAGE : 16 * PAGE + 8] = b"BADCHUNK"
    path.write_bytes(data)
    _patched_writer(monkeypatch, frame_for)
    out = tmp_path / "w.lzs"
    create_from_raw(path, out, chunk_size=16 * PAGE)
    with SnapshotReader(out) as rd:
        with pytest.raises(ChunkError, match="chunk 1 of region") as ei:
            rd.chunk(1)
        assert any(w in ei.value.what for w in ("declares", "zstd", "decompressed to"))
        assert rd.chunk(2) == data[32 * PAGE : 48 * PAGE]


def test_not_a_snapshot_at_all(tmp_path: Path) -> None:
    p = tmp_path / "plain"
    p.write_bytes(bytes(8192))
    _open_fails(p, "magic")


def test_seek_table_disagreeing_with_the_index(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    out = _snap(tmp_path, image, "zstd")
    with SnapshotReader(out) as rd:
        chunks = rd.header.chunk_count
    blob = bytearray(out.read_bytes())
    first_entry = len(blob) - zf.seek_table_size(chunks)
    at = first_entry + zf.SKIPPABLE_HEADER + 2 * zf.SEEK_ENTRY_SIZE  # entry 2's compressed size
    blob[at] ^= 1
    out.write_bytes(bytes(blob))
    _open_fails(out, "seek table entry 2 disagrees")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command is not installed (apt-get install zstd)")
def test_zstd_cli_with_big_zero_chunks(tmp_path: Path) -> None:
    """Zero chunks larger than a zstd block are several RLE blocks: still valid zstd."""
    raw = tmp_path / "z.raw"
    data = bytes(2 << 20) + os.urandom(1 << 20) + bytes(1 << 20)
    raw.write_bytes(data)
    out = tmp_path / "z.lzs"
    create_from_raw(raw, out, chunk_size=1 << 20)
    with SnapshotReader(out) as rd:
        assert [c.kind for c in rd.index.chunks] == [0, 0, 2, 0]
    res = subprocess.run(["zstd", "-d", "-c", "-q", str(out)], capture_output=True, check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data


def test_every_flip_of_the_index_counts_is_caught(tmp_path: Path) -> None:
    """The index checksum covers the records, not the two counts before them:
    the chunk count must equal the header's (which its checksum covers) and
    the region count is fixed by the records (regions must tile the chunks
    exactly). So every single-bit flip of either count is refused."""
    out = tmp_path / "multi.lzs"
    with SnapshotWriter(out, chunk_size=4 * PAGE) as w:
        for i, pages in enumerate((3, 9, 4)):
            w.add_region(f"r{i}", pages * PAGE, [os.urandom(PAGE) * min(4, pages - k) for k in range(0, pages, 4)])
        w.finish()
    with SnapshotReader(out) as rd:
        counts_at = rd.header.index_offset + zf.SKIPPABLE_HEADER + 24
    for byte in range(counts_at, counts_at + 8):
        for bit in range(8):
            flip_bit(out, byte, bit)
            with pytest.raises(FormatError):
                SnapshotReader(out)
            flip_bit(out, byte, bit)
    SnapshotReader(out).close()


def test_snapshot_errors_always_say_something() -> None:
    assert str(FormatError("")) == str(FormatError("  ")) == "damaged snapshot (no detail recorded)"
    assert str(FormatError("index checksum mismatch")) == "index checksum mismatch"
