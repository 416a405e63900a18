"""Property tests for every parser: arbitrary and mutated input either parses
or raises the module's own error; nothing else escapes.

The checks live in fuzz/targets.py, shared with the atheris harnesses (long
coverage-guided runs: fuzz/README.md). Here Hypothesis drives them with
random bytes, and with mutations of valid inputs so the deep paths are
reached too (bit flips and cuts of a real snapshot, JSON documents shaped
like Firecracker's handshake, CRIU images built record by record).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazypaged import firecracker_protocol as fp
from lazypaged.criu import images as ci
from lazypaged.snapshot import format as sf

ROOT = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("lazypaged_fuzz_targets", ROOT / "fuzz" / "targets.py")
assert _spec is not None
assert _spec.loader is not None
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)
TARGETS: dict[str, Callable[[bytes], None]] = targets.TARGETS
SEEDS = ROOT / "fuzz" / "seeds"


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes(name: str, data: bytes) -> None:
    TARGETS[name](data)


def _seeds() -> list[tuple[str, bytes]]:
    return [(p.parent.name, p.read_bytes()) for p in sorted(SEEDS.glob("*/*"))]


@pytest.mark.parametrize(("name", "seed"), _seeds(), ids=[f"{n}-{len(s)}" for n, s in _seeds()])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), max_size=4),
       cut=st.integers(min_value=0))
def test_mutated_seeds(name: str, seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    TARGETS[name](bytes(data[: len(data) - cut % 64]))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=24), inner, max_size=6),
    max_leaves=20,
)
_region = st.fixed_dictionaries(
    {k: st.integers(min_value=-1, max_value=1 << 65) for k in ("base_host_virt_addr", "size", "offset", "page_size")},
    optional={"page_size_kib": st.integers(min_value=-1, max_value=1 << 22), "extra": _json},
)


@settings(max_examples=200, deadline=None)
@given(doc=st.lists(_region | _json, max_size=4) | _json)
def test_firecracker_json_documents(doc: object) -> None:
    body = json.dumps(doc, allow_nan=True).encode()
    try:
        regions = fp.HandshakeDecoder().feed(body)
    except fp.FirecrackerProtocolError:
        return
    for r in regions or []:  # what is accepted is servable
        assert r.size > 0
        assert r.base % r.page_size == 0
        assert r.size % r.page_size == 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


_field = st.tuples(st.integers(1, 12), st.sampled_from([0, 2]), st.integers(0, (1 << 64) - 1), st.binary(max_size=16))


def _record(fields: list[tuple[int, int, int, bytes]]) -> bytes:
    out = bytearray()
    for num, wire, value, blob in fields:
        out += _varint(num << 3 | wire)
        out += _varint(value) if wire == 0 else _varint(len(blob)) + blob
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(magic=st.sampled_from([ci.MAGIC_PAGEMAP, ci.MAGIC_MM, ci.MAGIC_PSTREE]),
       records=st.lists(st.lists(_field, max_size=6), max_size=6))
def test_criu_images_of_wellformed_records(magic: int, records: list[list[tuple[int, int, int, bytes]]]) -> None:
    data = struct.pack("<II", ci.IMG_COMMON, magic)
    for r in records:
        body = _record(r)
        data += struct.pack("<I", len(body)) + body
    selector = bytes([(ci.MAGIC_PAGEMAP, ci.MAGIC_MM, ci.MAGIC_PSTREE).index(magic)])
    TARGETS["criu_images"](selector + data)


@pytest.fixture(scope="module")
def snapshot_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("snap")
    raw = d / "raw"
    raw.write_bytes(bytes(range(256)) * 64 + bytes(16384) + b"lazypaged!" * 1638 + bytes(4))  # 48 KiB
    subprocess.run([sys.executable, "-m", "lazypaged", "snapshot", "create", "--from-raw", str(raw), "-o",
                    str(d / "s.lps"), "-q", "--chunk-size", "4096"], check=True, capture_output=True)
    return (d / "s.lps").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["header", "index", "anywhere"]), pos=st.integers(min_value=0),
       bit=st.integers(0, 7), cut=st.integers(0, 3))
def test_snapshot_header_and_index_mutations(snapshot_bytes: bytes, where: str, pos: int, bit: int, cut: int) -> None:
    data = bytearray(snapshot_bytes)
    h = sf.parse_header(bytes(data), len(data))
    lo, hi = {"header": (0, sf.HEADER_FRAME), "index": (h.index_offset, h.index_offset + h.index_size),
              "anywhere": (0, len(data))}[where]
    data[lo + pos % (hi - lo)] ^= 1 << bit
    if cut:
        del data[-cut * 7 :]
    TARGETS["snapshot"](bytes(data))
