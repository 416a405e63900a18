"""Serving snapshots: extents match the image, checksums gate every byte,
decompression stays off the event loop, and open_source picks by magic."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazypaged.snapshot import ChunkError, FormatError, SnapshotReader, SnapshotWriter, create_from_raw
from lazypaged.snapshot import format as fmt
from lazypaged.snapshot import reader as snapshot_reader
from lazypaged.snapshot.format import ChunkKind
from lazypaged.sources import Extent, PageSource, RawImageSource, SourceError
from lazypaged.sources.compressed import ZERO_RUN_MIN_PAGES, CompressedSnapshotSource, MappedSnapshotSource
from lazypaged.sources.open import open_source

from .snapshot_images import PAGE, flip_bit, gather, write_image

SIZE = 4 << 20
CHUNK = 64 << 10


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "mem.raw"
    return path, write_image(path, SIZE, seed=11)


def _make(tmp_path: Path, image: tuple[Path, bytes], layout: str) -> Path:
    out = tmp_path / f"{layout}.lzs"
    create_from_raw(image[0], out, raw=layout == "raw")
    return out


@pytest.fixture(params=["zstd", "raw"])
def served(request: pytest.FixtureRequest, tmp_path: Path, image: tuple[Path, bytes]) -> tuple[str, Path]:
    return str(request.param), _make(tmp_path, image, str(request.param))


def _ranges(n: int, seed: int = 5) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        off = rnd.randrange(SIZE // PAGE) * PAGE
        out.append((off, min(SIZE - off, rnd.randrange(1, 80) * PAGE)))
    return [*out, (0, SIZE), (SIZE - PAGE, PAGE)]


def test_open_source_picks_the_layout(tmp_path: Path, image: tuple[Path, bytes], served: tuple[str, Path]) -> None:
    layout, path = served
    src = open_source(path, "snap")
    try:
        want = MappedSnapshotSource if layout == "raw" else CompressedSnapshotSource
        assert type(src) is want
        assert src.synchronous == (layout == "raw")
        assert (src.name, src.size) == ("snap", SIZE)
    finally:
        src.close()
    raw = open_source(image[0])
    assert type(raw) is RawImageSource
    raw.close()


def test_extents_match_the_image(image: tuple[Path, bytes], served: tuple[str, Path]) -> None:
    src = open_source(served[1])
    try:
        for off, ln in _ranges(150):
            ext = src.extents(off, ln)
            assert ext[0].offset == off
            assert sum(e.length for e in ext) == ln
            assert gather(ext) == image[1][off : off + ln]
    finally:
        src.close()


def test_fetch_matches_the_image(image: tuple[Path, bytes], served: tuple[str, Path]) -> None:
    async def main() -> None:
        src = open_source(served[1])
        try:
            results = await asyncio.gather(*(src.fetch(off, ln) for off, ln in _ranges(60)))
            for (off, ln), ext in zip(_ranges(60), results, strict=True):
                assert gather(ext) == image[1][off : off + ln]
        finally:
            src.close()

    asyncio.run(main())


def test_zero_pages_are_zero_extents(image: tuple[Path, bytes], served: tuple[str, Path]) -> None:
    data = image[1]
    zero = bytes(PAGE)
    src = open_source(served[1])
    try:
        ext = src.extents(0, SIZE)
        # Adjacent zero runs are merged, so zeros and data alternate.
        assert all(not (a.address == 0 and b.address == 0) for a, b in itertools.pairwise(ext))
        for e in ext:
            if e.address == 0:
                assert all(data[p : p + PAGE] == zero for p in range(e.offset, e.offset + e.length, PAGE))
    finally:
        src.close()


@pytest.mark.parametrize("layout", ["zstd", "raw"])
def test_long_zero_runs_split_out_short_ones_copied(tmp_path: Path, layout: str) -> None:
    """Inside a data chunk a long zero run is a zero extent; a lone zero page
    travels with its neighbours; asking only for zero pages reads nothing."""
    pages = [os.urandom(PAGE) for _ in range(16)]
    pages[3] = bytes(PAGE)
    for k in range(6, 6 + ZERO_RUN_MIN_PAGES):
        pages[k] = bytes(PAGE)
    raw = tmp_path / "z.raw"
    raw.write_bytes(b"".join(pages))
    out = tmp_path / "z.lzs"
    create_from_raw(raw, out, chunk_size=16 * PAGE, raw=layout == "raw")
    src = open_source(out)
    try:
        ext = src.extents(0, 16 * PAGE)
        spans = [(e.offset // PAGE, e.length // PAGE, e.address != 0) for e in ext]
        assert spans == [(0, 6, True), (6, ZERO_RUN_MIN_PAGES, False), (6 + ZERO_RUN_MIN_PAGES, 2, True)]
        assert gather(ext) == raw.read_bytes()
        src2 = open_source(out)
        try:
            assert [e.address for e in src2.extents(3 * PAGE, PAGE)] == [0]
            assert [e.address for e in src2.extents(7 * PAGE, 2 * PAGE)] == [0]
            assert getattr(src2, "chunks_decoded", 0) == 0
        finally:
            src2.close()
    finally:
        src.close()


def test_raw_layout_is_zero_copy(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path = _make(tmp_path, image, "raw")

    async def main() -> None:  # the mapping is read under a lease, which needs the loop
        src = open_source(path)
        try:
            assert isinstance(src, MappedSnapshotSource)
            with SnapshotReader(path) as rd:
                c = rd.index.chunks[rd.chunk_at(CHUNK * 3)]
            data = [e for e in src.extents(c.offset, c.length) if e.address]
            assert data
            assert all(e.owner is None for e in data)
            # Addresses point into the file mapping, at the chunk's payload.
            first = data[0]
            base = first.address - (first.offset - c.offset) - c.frame_offset - c.data_offset
            assert base % PAGE == 0
        finally:
            src.close()

    asyncio.run(main())


def _bytes(extents: list[Extent], offset: int, length: int) -> bytes:
    out = bytearray(length)
    for e in extents:
        if e.address:
            out[e.offset - offset : e.offset - offset + e.length] = ctypes.string_at(e.address, e.length)
    return bytes(out)


@pytest.mark.parametrize("leased", [True, False], ids=["leased", "pread"])
def test_raw_layout_cut_short_is_a_source_error(tmp_path: Path, image: tuple[Path, bytes], leased: bool) -> None:
    """A mapped snapshot truncated while open: chunks still whole in the file
    are served right, the others are source errors; the daemon's own reads
    (checksums) never touch the mapping past the end (no SIGBUS)."""
    path = _make(tmp_path, image, "raw")
    _, want = image
    with SnapshotReader(path) as rd:
        chunks = list(rd.index.chunks)
    c = chunks[len(chunks) // 2]
    cut = c.frame_offset + c.data_offset + 1000  # inside the chunk's payload

    def check(src: PageSource) -> None:
        for k in chunks:
            if k.kind == ChunkKind.ZERO:
                continue
            if k.frame_offset + k.frame_size <= cut:
                got = _bytes(src.extents(k.offset, k.length), k.offset, k.length)
                assert got == want[k.offset : k.offset + k.length]
            else:
                with pytest.raises(SourceError):
                    src.extents(k.offset, k.length)

    if not leased:
        src = open_source(path)
        try:
            os.truncate(path, cut)
            check(src)
        finally:
            src.close()
        return

    async def main() -> None:
        src = open_source(path)
        try:
            src.extents(0, PAGE)
            # From a thread: the truncate waits for the loop to let the lease go.
            await asyncio.to_thread(os.truncate, path, cut)
            check(src)
        finally:
            src.close()

    asyncio.run(main())


def test_corrupt_chunk_is_never_served(tmp_path: Path, image: tuple[Path, bytes], served: tuple[str, Path]) -> None:
    _, path = served
    with SnapshotReader(path) as rd:
        bad = next(i for i, c in enumerate(rd.index.chunks) if c.kind != 0 and i > 4)
        c = rd.index.chunks[bad]
    # Inside the payload: a frame's last four bytes are zstd's own checksum,
    # which serving leaves to the chunk's XXH3-128.
    flip_bit(path, c.frame_offset + c.frame_size // 2, 1)

    async def main() -> None:
        src = open_source(path, "snap")
        try:
            for _ in range(2):  # and not cached as good the second time
                with pytest.raises(ChunkError, match=f"snap: chunk {bad} of region 'mem.raw'"):
                    await src.fetch(c.offset, c.length)
                with pytest.raises(ChunkError, match=f"chunk {bad}"):
                    src.extents(c.offset - PAGE, c.length + PAGE)
            # The rest keeps being served.
            assert gather(await src.fetch(0, CHUNK)) == image[1][:CHUNK]
            assert gather(src.extents(c.offset + c.length, PAGE)) == image[1][c.offset + c.length :][:PAGE]
        finally:
            src.close()

    asyncio.run(main())


def test_cache_is_bounded_and_owners_keep_buffers(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path = _make(tmp_path, image, "zstd")
    with SnapshotReader(path) as rd:
        src = CompressedSnapshotSource(SnapshotReader(path), cache_bytes=3 * CHUNK)
        data_chunks = [c for c in rd.index.chunks if c.kind != 0]
    try:
        first = src.extents(data_chunks[0].offset, data_chunks[0].length)
        for c in data_chunks[1:20]:
            src.extents(c.offset, c.length)
        assert src._cache_bytes <= 3 * CHUNK
        assert src.chunks_decoded == 20
        # Evicted from the cache, but the extents still hold their buffer.
        off = data_chunks[0].offset
        assert gather(first) == image[1][off : off + data_chunks[0].length]
        src.extents(data_chunks[19].offset, PAGE)  # cached: no new decode
        assert src.chunks_decoded == 20
        src.extents(data_chunks[0].offset, PAGE)  # evicted: decoded again
        assert src.chunks_decoded == 21
    finally:
        src.close()


def test_concurrent_faults_share_one_decode(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path = _make(tmp_path, image, "zstd")

    async def main() -> None:
        # No read-ahead: the faults run in sequence, and only sharing is counted here.
        src = CompressedSnapshotSource(SnapshotReader(path), read_ahead=0)
        try:
            c = next(c for c in src.reader.index.chunks if c.kind != 0)
            res = await asyncio.gather(*(src.fetch(c.offset + k * PAGE, PAGE) for k in range(8)))
            assert src.chunks_decoded == 1
            assert b"".join(gather(r) for r in res) == image[1][c.offset : c.offset + 8 * PAGE]
        finally:
            src.close()

    asyncio.run(main())


def test_decompression_does_not_block_the_loop(
    tmp_path: Path, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _make(tmp_path, image, "zstd")
    orig = SnapshotReader.chunks_into

    def slow_chunks(self: SnapshotReader, items: Sequence[tuple[int, memoryview]]) -> list[ChunkError | None]:
        time.sleep(0.2 * len(items))
        return orig(self, items)

    monkeypatch.setattr(SnapshotReader, "chunks_into", slow_chunks)

    async def main() -> None:
        src = CompressedSnapshotSource(SnapshotReader(path), workers=2)
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        hb = asyncio.create_task(heartbeat())
        try:
            t0 = time.monotonic()
            # Two chunks decode in parallel in the pool.
            await asyncio.gather(src.fetch(0, CHUNK), src.fetch(CHUNK, CHUNK))
            assert time.monotonic() - t0 < 0.38
            assert ticks >= 8
        finally:
            hb.cancel()
            src.close()

    asyncio.run(main())


def test_deleted_or_replaced_while_served(tmp_path: Path, image: tuple[Path, bytes], served: tuple[str, Path]) -> None:
    _, path = served
    src = open_source(path)
    try:
        head = gather(src.extents(0, CHUNK))
        path.unlink()
        assert gather(src.extents(SIZE - CHUNK, CHUNK)) == image[1][SIZE - CHUNK :]
        other = tmp_path / "other.raw"
        write_image(other, SIZE, seed=99)
        tmp = tmp_path / "other.lzs"
        create_from_raw(other, tmp)
        os.replace(tmp, path)  # the usual way a snapshot gets replaced
        assert gather(src.extents(0, CHUNK)) == head == image[1][:CHUNK]
        assert gather(src.extents(CHUNK * 5, CHUNK)) == image[1][CHUNK * 5 : CHUNK * 6]
    finally:
        src.close()


def test_closed_source_refuses(served: tuple[str, Path]) -> None:
    src = open_source(served[1])
    src.close()
    with pytest.raises(SourceError):
        src.extents(0, CHUNK)
    with pytest.raises(SourceError):
        src.extents(SIZE, PAGE)


def test_damaged_snapshot_is_not_served_as_raw(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path = _make(tmp_path, image, "zstd")
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(FormatError, match="truncated"):
        open_source(path)
    with pytest.raises(SourceError, match="cannot open"):
        open_source(tmp_path / "missing")


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(["zstd", "raw"]),
    regions=st.lists(st.lists(st.sampled_from([0, 0, 1]), min_size=1, max_size=40), min_size=1, max_size=3),
    chunk_pages=st.sampled_from([1, 4, 8, 16]),
    ranges=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 60)), min_size=1, max_size=8),
)
def test_any_page_pattern_is_served_exactly(
    layout: str, regions: list[list[int]], chunk_pages: int, ranges: list[tuple[int, int]]
) -> None:
    """Whatever the zero pattern, regions and chunk size: the bytes are right and
    zero extents cover zero pages only."""
    rnd = random.Random(len(regions))
    datas = [b"".join(rnd.randbytes(PAGE) if p else bytes(PAGE) for p in pattern) for pattern in regions]
    total = sum(len(d) for d in datas)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "h.lzs"
        with SnapshotWriter(out, chunk_size=chunk_pages * PAGE, raw=layout == "raw") as w:
            for n, d in enumerate(datas):
                w.add_region(f"r{n}", len(d), [d[k : k + w.chunk_size] for k in range(0, len(d), w.chunk_size)])
            w.finish()
        image = b"".join(datas)
        src = open_source(out)
        try:
            for first, count in ranges:
                off = min(first, total // PAGE - 1) * PAGE
                ln = min(count * PAGE, total - off)
                ext = src.extents(off, ln)
                assert gather(ext) == image[off : off + ln]
                for e in ext:
                    if e.address == 0:
                        assert image[e.offset : e.offset + e.length] == bytes(e.length)
        finally:
            src.close()


def test_bad_chunk_in_a_batch_spoils_only_itself(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path = _make(tmp_path, image, "zstd")
    with SnapshotReader(path) as rd:
        data = [i for i, c in enumerate(rd.index.chunks) if c.kind != 0]
        bad = data[5]
        c = rd.index.chunks[bad]
    flip_bit(path, c.frame_offset + c.frame_size // 2)

    async def main() -> None:
        src = CompressedSnapshotSource(SnapshotReader(path), workers=2)
        try:
            with pytest.raises(ChunkError, match=f"chunk {bad} "):
                await src.fetch(0, 16 * CHUNK)
            decoded = src.chunks_decoded
            assert decoded >= 14  # the batch's good chunks were decoded and cached
            ok = src.reader.index.chunks[bad].offset
            assert gather(await src.fetch(0, ok)) == image[1][:ok]
            assert src.chunks_decoded == decoded  # all from the cache
        finally:
            src.close()

    asyncio.run(main())


def test_cache_keeps_recent_slabs_within_its_limit(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    path = _make(tmp_path, image, "zstd")

    async def main() -> None:
        src = CompressedSnapshotSource(SnapshotReader(path), cache_bytes=2 << 20, workers=2)
        fill = 2 << 20
        try:
            held = await src.fetch(0, fill)
            for off in range(fill, SIZE, fill):
                await src.fetch(off, fill)
            assert src._cache_bytes <= 2 << 20
            n = src.chunks_decoded
            await src.fetch(SIZE - fill, fill)  # the most recent: cached
            assert src.chunks_decoded == n
            await src.fetch(0, fill)  # the oldest: evicted, decoded again
            assert src.chunks_decoded > n
            assert gather(held) == image[1][:fill]  # held extents kept their slab
        finally:
            src.close()

    asyncio.run(main())


def test_truncated_while_served(served: tuple[str, Path], image: tuple[Path, bytes]) -> None:
    """Truncating the file in place gives an error (never SIGBUS in the daemon, never bytes)."""
    _, path = served
    src = open_source(path)
    try:
        assert gather(src.extents(0, CHUNK)) == image[1][:CHUNK]
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(SourceError, match=r"shrank|short read"):
            src.extents(SIZE - 2 * CHUNK, 2 * CHUNK)
    finally:
        src.close()


def test_chunk_table_columns_hold_the_records(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """The index read as columns gives back exactly the records written: the
    index re-encoded from them is byte for byte the one in the file."""
    path = _make(tmp_path, image, "zstd")
    with SnapshotReader(path) as rd:
        idx, h = rd.index, rd.header
        chunks = idx.chunks
        assert list(chunks[-3:]) == [chunks[len(chunks) - 3], chunks[len(chunks) - 2], chunks[-1]]
        with pytest.raises(IndexError):
            chunks[len(chunks)]
        frame = fmt.encode_index(idx.regions, list(chunks), idx.zero_pages)
    with open(path, "rb") as f:
        f.seek(h.index_offset)
        assert f.read(h.index_size) == frame


def test_a_fill_of_data_is_one_extent(tmp_path: Path) -> None:
    """Chunks decoded side by side into one slab become one extent (one
    UFFDIO_COPY for a 2 MiB fill, not one per chunk), however the request
    is aligned; short zero runs travel with the data."""
    rnd = random.Random(3)
    pages = [bytes(PAGE) if rnd.random() < 0.3 else rnd.randbytes(PAGE) for _ in range(1024)]
    pages[0] = pages[-1] = rnd.randbytes(PAGE)
    for k in range(1, len(pages) - 1):  # no zero run long enough to be split out
        if pages[k - 1] == pages[k] == bytes(PAGE):
            pages[k] = rnd.randbytes(PAGE)
    data = b"".join(pages)
    raw = tmp_path / "d.raw"
    raw.write_bytes(data)
    out = tmp_path / "d.lzs"
    create_from_raw(raw, out)

    async def main() -> None:
        src = CompressedSnapshotSource(SnapshotReader(out), workers=2)
        try:
            for off, ln in [(0, 2 << 20), (2 << 20, 2 << 20), (3 * PAGE, 1 << 20)]:
                ext = await src.fetch(off, ln)
                assert len(ext) == 1, ext
                assert gather(ext) == data[off : off + ln]
        finally:
            src.close()

    asyncio.run(main())


@pytest.mark.parametrize("layout", ["zstd", "raw"])
def test_zero_chunk_inside_data_is_never_read(tmp_path: Path, layout: str) -> None:
    """With one-page chunks a lone zero page is a zero chunk between data
    chunks: it is served as zeros without touching its frame (here damaged)."""
    pages = [os.urandom(PAGE), bytes(PAGE), os.urandom(PAGE)]
    raw = tmp_path / "z.raw"
    raw.write_bytes(b"".join(pages))
    out = tmp_path / "z.lzs"
    create_from_raw(raw, out, chunk_size=PAGE, raw=layout == "raw")
    with SnapshotReader(out) as rd:
        zero = rd.index.chunks[1]
        assert zero.kind == fmt.ChunkKind.ZERO
    flip_bit(out, zero.frame_offset + zero.frame_size - 1)
    src = open_source(out)
    try:
        ext = src.extents(0, 3 * PAGE)
        assert [(e.offset // PAGE, e.length // PAGE, e.address != 0) for e in ext] == [
            (0, 1, True),
            (1, 1, False),
            (2, 1, True),
        ]
        assert gather(ext) == raw.read_bytes()
    finally:
        src.close()


@pytest.mark.parametrize("decoder", ["libzstd", "streaming"])
def test_both_decoders_serve_and_refuse_alike(
    tmp_path: Path, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, decoder: str
) -> None:
    """Chunks decode straight into their slot through libzstd when it loads,
    else through python-zstandard's reader: the same bytes, the same refusals."""
    if decoder == "streaming":
        monkeypatch.setattr(snapshot_reader, "_libzstd", lambda: None)
    elif snapshot_reader._libzstd() is None:
        pytest.skip("libzstd cannot be loaded here")
    path = _make(tmp_path, image, "zstd")
    with SnapshotReader(path) as rd:
        bad = [i for i, c in enumerate(rd.index.chunks) if c.kind != 0][7]
        c = rd.index.chunks[bad]
    src = open_source(path)
    try:
        assert gather(src.extents(0, SIZE)) == image[1]
    finally:
        src.close()
    flip_bit(path, c.frame_offset + c.frame_size // 2)
    src = open_source(path, "snap")
    try:
        with pytest.raises(ChunkError, match=f"snap: chunk {bad} "):
            src.extents(c.offset, PAGE)
        assert gather(src.extents(0, c.offset)) == image[1][: c.offset]
    finally:
        src.close()


async def _decoders_idle(src: CompressedSnapshotSource) -> None:
    """Wait until every decode job (read-ahead included) has settled."""
    for _ in range(500):
        if not src._jobs:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("decode jobs never settled")


def test_sequential_reads_are_decoded_ahead(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """A reader going forward (the fill) finds its next chunks already decoded;
    a reader jumping about starts no read-ahead."""
    path = _make(tmp_path, image, "zstd")
    step = 8 * CHUNK

    async def main() -> None:
        src = CompressedSnapshotSource(SnapshotReader(path), workers=2, read_ahead=2 * step)
        try:
            await src.fetch(0, step)
            await src.fetch(step, step)  # sequential: decoding of the next 2 steps starts
            await _decoders_idle(src)
            ahead = [i for i in range(16, 32) if src.reader.index.chunks[i].kind != 0]
            assert all(i in src._where for i in ahead)
            n = src.chunks_decoded
            assert gather(await src.fetch(2 * step, step)) == image[1][2 * step : 3 * step]
            assert src.chunks_decoded == n  # from the cache, and no decode waited for
            cold = CompressedSnapshotSource(SnapshotReader(path), workers=2, read_ahead=2 * step)
            try:
                await cold.fetch(5 * step, step)
                await cold.fetch(step, step)  # not where the last one ended
                await _decoders_idle(cold)
                assert cold.chunks_decoded == 16
            finally:
                cold.close()
        finally:
            src.close()

    asyncio.run(main())


def test_read_ahead_never_caches_a_bad_chunk(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    """A damaged chunk met while reading ahead is not cached (nor served):
    the request that needs it gets its error, its neighbours are served."""
    path = _make(tmp_path, image, "zstd")
    step = 8 * CHUNK
    with SnapshotReader(path) as rd:
        bad = next(i for i, c in enumerate(rd.index.chunks) if c.kind != 0 and c.offset >= 2 * step + CHUNK)
        c = rd.index.chunks[bad]
    flip_bit(path, c.frame_offset + c.frame_size // 2)

    async def main() -> None:
        src = CompressedSnapshotSource(SnapshotReader(path), workers=2, read_ahead=2 * step)
        try:
            await src.fetch(0, step)
            await src.fetch(step, step)  # reads ahead over the damaged chunk
            await _decoders_idle(src)
            assert bad not in src._where
            assert bad - 1 in src._where  # its neighbours were good
            assert bad + 1 in src._where
            n = src.chunks_decoded
            with pytest.raises(ChunkError, match=f"chunk {bad} "):
                await src.fetch(c.offset, PAGE)
            assert gather(await src.fetch(2 * step, c.offset - 2 * step)) == image[1][2 * step : c.offset]
            end = c.offset + c.length
            assert gather(await src.fetch(end, CHUNK)) == image[1][end : end + CHUNK]
            assert src.chunks_decoded == n  # the neighbours came from the cache
        finally:
            src.close()

    asyncio.run(main())
