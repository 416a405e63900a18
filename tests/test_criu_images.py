"""CRIU image parsing: protobuf walker, pagemap layouts, lazy ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazypaged.criu import images as img
from lazypaged.criu.protobuf import DecodeError, encode_field, encode_varint, fields, read_varint, to_signed32
from tests.criu.synth import make_images, pagemap_entry, write_image

PAGE = 4096
BASE = 0x7F0000000000
LAZY_PRESENT = img.PE_LAZY | img.PE_PRESENT


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(v: int) -> None:
    data = encode_varint(v)
    assert read_varint(data, 0) == (v, len(data))


@given(st.binary(max_size=64))
def test_walker_never_raises_anything_but_decode_error(data: bytes) -> None:
    try:
        for _ in fields(data):
            pass
    except DecodeError:
        pass


def test_walker_skips_unknown_fields_and_reads_nested() -> None:
    msg = encode_field(9, b"future field") + encode_field(1, 5) + encode_field(3, encode_field(1, 7))
    got = {n: v for n, _w, v in fields(msg)}
    assert got[1] == 5
    assert bytes(got[9]) == b"future field"
    assert [(n, v) for n, _w, v in fields(got[3])] == [(1, 7)]  # type: ignore[arg-type]


def test_truncated_varint_and_field() -> None:
    with pytest.raises(DecodeError):
        read_varint(b"\x80\x80", 0)
    with pytest.raises(DecodeError):
        list(fields(encode_field(2, b"abcdef")[:-2]))


def test_negative_int32_is_sign_extended_on_the_wire() -> None:
    (_n, _w, v), = fields(encode_field(1, -3))
    assert to_signed32(int(v)) == -3  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
def test_pagemap_layouts(tmp_path: Path, layout: str) -> None:
    entries = [(BASE, 3, img.PE_PRESENT), (BASE + 3 * PAGE, 70000, LAZY_PRESENT), (BASE + 0x20000000, 2, img.PE_LAZY)]
    make_images(tmp_path, 7, [(BASE, BASE + 0x30000000)], entries, layout=layout)
    task = img.load_task(tmp_path, 7)
    assert task.pagemap.layout == layout
    assert [(e.vaddr, e.nr_pages, e.flags) for e in task.pagemap.entries] == entries
    assert img.layout_of(tmp_path) == layout
    # In 4.2 field 2 says 0 and the count is in field 5: read either way.
    assert task.lazy == (
        img.LazyRange(BASE + 3 * PAGE, BASE + (3 + 70000) * PAGE, 3 * PAGE),
        img.LazyRange(BASE + 0x20000000, BASE + 0x20000000 + 2 * PAGE, None),
    )


def test_entries_without_flags_are_present_and_in_parent_is_parent(tmp_path: Path) -> None:
    recs = [encode_field(1, 1), pagemap_entry(BASE, 2, None), encode_field(1, BASE + 2 * PAGE) + encode_field(2, 1)
            + encode_field(3, 1)]
    write_image(tmp_path / "pm.img", img.MAGIC_PAGEMAP, recs)
    pm = img.parse_pagemap(img.read_records(tmp_path / "pm.img", img.MAGIC_PAGEMAP))
    assert [e.flags for e in pm.entries] == [img.PE_PRESENT, img.PE_PARENT]


def test_lazy_ranges_split_at_vma_boundaries_and_merge_within_one(tmp_path: Path) -> None:
    vmas = [(BASE, BASE + 4 * PAGE), (BASE + 4 * PAGE, BASE + 10 * PAGE)]
    entries = [
        (BASE, 1, img.PE_PRESENT),  # not lazy: restored by criu itself
        (BASE + PAGE, 5, LAZY_PRESENT),  # crosses the boundary at page 4
        (BASE + 6 * PAGE, 2, LAZY_PRESENT),  # continues the second piece: merged
    ]
    make_images(tmp_path, 1, vmas, entries)
    task = img.load_task(tmp_path, 1)
    assert task.lazy == (
        img.LazyRange(BASE + PAGE, BASE + 4 * PAGE, PAGE),
        img.LazyRange(BASE + 4 * PAGE, BASE + 8 * PAGE, 4 * PAGE),
    )
    assert task.lazy_pages == 7


def test_lazy_pages_outside_every_vma_are_refused(tmp_path: Path) -> None:
    make_images(tmp_path, 1, [(BASE, BASE + PAGE)], [(BASE, 2, LAZY_PRESENT)])
    with pytest.raises(img.ImageError, match="outside every VMA"):
        img.load_task(tmp_path, 1)


def test_lazy_pages_in_a_parent_image_are_refused(tmp_path: Path) -> None:
    make_images(tmp_path, 1, [(BASE, BASE + PAGE)], [(BASE, 1, img.PE_LAZY | img.PE_PARENT)])
    with pytest.raises(img.ImageError, match="parent"):
        img.load_task(tmp_path, 1)


def test_short_pages_file_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path, 1, [(BASE, BASE + 4 * PAGE)], [(BASE, 4, LAZY_PRESENT)])
    p = tmp_path / "pages-1.img"
    p.write_bytes(p.read_bytes()[: 2 * PAGE])
    with pytest.raises(img.ImageError, match="lists"):
        img.load_task(tmp_path, 1)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x19", "too short"),
        (b"\x19\x43\x56\x54\x00\x00\x00\x00", "magic"),
        (b"\x19\x43\x56\x54\x25\x40\x08\x56\x10\x00\x00\x00\x08", "runs past"),
        (b"\x19\x43\x56\x54\x25\x40\x08\x56\x10\x00", "truncated record length"),
    ],
)
def test_bad_image_bytes(data: bytes, words: str) -> None:
    with pytest.raises(img.ImageError, match=words):
        img.parse_records(data, img.MAGIC_PAGEMAP)


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(img.ImageError, match=r"pstree\.img: no such image"):
        img.load_pstree(tmp_path)


def test_pstree_with_zombie_and_threads(tmp_path: Path) -> None:
    recs = [
        encode_field(1, 1) + encode_field(2, 0) + encode_field(3, 1) + encode_field(4, 1)
        + encode_field(5, 1) + encode_field(5, 9),
        encode_field(1, 4) + encode_field(2, 1) + encode_field(3, 1) + encode_field(4, 1),
    ]
    write_image(tmp_path / "pstree.img", img.MAGIC_PSTREE, recs)
    tree = img.load_pstree(tmp_path)
    assert [(e.pid, e.ppid, e.threads) for e in tree] == [(1, 0, (1, 9)), (4, 1, ())]
