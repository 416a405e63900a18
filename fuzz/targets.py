"""One function per parser: feed it arbitrary bytes, let only its own error escape.

Shared by the atheris harnesses in this directory (coverage-guided, long
runs) and by tests/test_reliability_fuzz.py (Hypothesis, every CI run). Each
target checks the parser's contract: any input either parses or raises the
module's protocol/format error; anything else escaping is a bug and is
re-raised for the fuzzer to report. Where a parse succeeds, the target also
checks that what came out can go back in (round trip).
"""

from __future__ import annotations

from collections.abc import Callable

from lazypaged import firecracker_protocol as fp
from lazypaged import handoff_protocol as hp
from lazypaged import peer_protocol as pp
from lazypaged.criu import images as ci
from lazypaged.criu import records as cr
from lazypaged.snapshot import format as sf


def _split(data: bytes) -> tuple[bytes, bytes]:
    """Cut the input where its first byte says: parsers must not care where reads end."""
    if not data:
        return b"", b""
    cut = data[0] % (len(data) + 1)
    return data[1 : 1 + cut], data[1 + cut :]


def handoff(data: bytes) -> None:
    a, b = _split(data)
    dec = hp.FrameDecoder()
    try:
        msgs = dec.feed(a) + dec.feed(b)
    except hp.ProtocolError:
        return
    for m in msgs:  # what decodes re-encodes to something that decodes the same
        again = hp.FrameDecoder().feed(hp.encode(m))
        assert again == [m], (m, again)


def firecracker(data: bytes) -> None:
    a, b = _split(data)
    dec = fp.HandshakeDecoder()
    try:
        if dec.feed(a) is None:
            dec.feed(b)
    except fp.FirecrackerProtocolError:
        return


_MAGICS = (ci.MAGIC_PAGEMAP, ci.MAGIC_MM, ci.MAGIC_PSTREE)


def criu_images(data: bytes) -> None:
    if not data:
        return
    magic = _MAGICS[data[0] % 3]
    try:
        records = ci.parse_records(data[1:], magic)
        if magic == ci.MAGIC_PAGEMAP:
            pm = ci.parse_pagemap(records)
            ci.lazy_ranges(pm, ())
        elif magic == ci.MAGIC_MM:
            ci.parse_mm(records)
        else:
            ci.parse_pstree(records)
    except ci.ImageError:
        return


def criu_records(data: bytes) -> None:
    reader = cr.RecordReader()
    pos = 0
    try:
        while pos < len(data) and reader.need():
            n = reader.need()
            reader.feed(data[pos : pos + n], [])
            pos += n
    except cr.RecordError:
        return


def _peer(conn: pp.ServerConnection | pp.ClientConnection, data: bytes) -> None:
    a, b = _split(data)
    try:
        for chunk in (a, b, b""):
            conn.receive_data(chunk)
            for _ in range(10_000):  # a bounded number of events per input
                ev = conn.next_event()
                if ev is pp.NEED_DATA or ev is pp.CLOSED:
                    break
    except pp.PeerProtocolError:
        return


def peer_server(data: bytes) -> None:
    _peer(pp.ServerConnection(), data)


def peer_client(data: bytes) -> None:
    _peer(pp.ClientConnection("urgent"), data)


def snapshot(data: bytes) -> None:
    try:
        h = sf.parse_header(data, len(data))
        sf.parse_index(data[h.index_offset : h.index_offset + h.index_size], h)
    except sf.SnapshotError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "handoff": handoff,
    "firecracker": firecracker,
    "criu_images": criu_images,
    "criu_records": criu_records,
    "peer_server": peer_server,
    "peer_client": peer_client,
    "snapshot": snapshot,
}
