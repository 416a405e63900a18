"""docs/snapshot-format.md describes the files ``lazypaged snapshot create``
writes: a reader written from the document alone (tests/lzs_doc_reader.py)
parses them, checks every checksum and decodes every chunk to the input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from lazypaged.cli import main
from lazypaged.snapshot import SnapshotWriter

from . import lzs_doc_reader as doc
from .snapshot_images import PAGE, flip_bit, page_mix, write_image


@pytest.mark.parametrize(
    "extra",
    [[], ["--raw"], ["--chunk-size", "16K", "--level", "9"], ["--raw", "--chunk-size", "4K"]],
    ids=["zstd", "raw", "zstd-16k", "raw-4k"],
)
def test_doc_reader_reads_what_create_writes(tmp_path: Path, extra: list[str]) -> None:
    image = tmp_path / "mem.img"
    # Mixed pages, a run of zero chunks in the middle, and a short last chunk.
    data = page_mix(1 << 20, seed=21) + bytes(1 << 20) + page_mix((1 << 20) + 5 * PAGE, seed=22)
    image.write_bytes(data)
    out = tmp_path / "mem.lzs"
    assert main(["snapshot", "create", "--from-raw", str(image), "-o", str(out), "-q", *extra]) == 0
    snap = doc.read(out.read_bytes())
    assert snap.data == data
    assert [r.name for r in snap.regions] == ["mem.img"]
    assert {c.kind for c in snap.chunks} >= {0, 1 if "--raw" in extra else 2}


def test_doc_reader_reads_several_regions(tmp_path: Path) -> None:
    out = tmp_path / "multi.lzs"
    parts = [page_mix(n * PAGE, seed=n) for n in (3, 40, 17)]
    with SnapshotWriter(out, chunk_size=16 * PAGE) as w:
        for i, part in enumerate(parts):
            chunks = [part[o : o + 16 * PAGE] for o in range(0, len(part), 16 * PAGE)]
            w.add_region(f"region-{i}", len(part), chunks, start=0x7F0000000000 + i * (1 << 30) if i else None)
        w.finish()
    snap = doc.read(out.read_bytes())
    assert snap.data == b"".join(parts)
    assert [(r.name, r.flags) for r in snap.regions] == [("region-0", 0), ("region-1", 1), ("region-2", 1)]


def test_doc_reader_reads_a_captured_process(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        out = tmp_path / "proc.lzs"
        assert main(["snapshot", "create", "--from-pid", str(child.pid), "-o", str(out), "-q"]) == 0
    finally:
        child.kill()
        child.communicate()
    snap = doc.read(out.read_bytes())
    assert any(r.name == "[stack]" for r in snap.regions)
    assert len(snap.data) == sum(r.length for r in snap.regions)


def test_doc_reader_rejects_what_the_document_says_to_reject(tmp_path: Path) -> None:
    """The reader is not a rubber stamp: one flipped bit in each checksummed part fails it."""
    image = tmp_path / "mem.img"
    write_image(image, 1 << 20, seed=3)
    out = tmp_path / "mem.lzs"
    assert main(["snapshot", "create", "--from-raw", str(image), "-o", str(out), "-q"]) == 0
    good = out.read_bytes()
    snap = doc.read(good)
    data_chunk = next(c for c in snap.chunks if c.kind == 2)
    index_offset = int.from_bytes(good[32:40], "little")
    for where, what in (
        (30, "header checksum"),
        (index_offset + 40, "index checksum"),
        (data_chunk.frame_offset + data_chunk.frame_size // 2, "chunk checksum|zstd|decompress|length"),
    ):
        out.write_bytes(good)
        flip_bit(out, where)
        with pytest.raises((doc.DocReaderError, zstandard.ZstdError), match=what):
            doc.read(out.read_bytes())
