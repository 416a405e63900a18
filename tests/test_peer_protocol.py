"""The peer protocol core, byte by byte: handshake, reads, refusals, garbage."""

from __future__ import annotations

import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazypaged import peer_protocol as pp
from lazypaged.snapshot.format import checksum


def _wire(out: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(x) for x in out)


def _events(conn: pp.ServerConnection | pp.ClientConnection) -> list[object]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is pp.NEED_DATA:
            return out
        out.append(ev)
        if ev is pp.CLOSED:
            return out


def _pair(encodings: tuple[str, ...] = pp.ENCODINGS) -> tuple[pp.ServerConnection, pp.ClientConnection]:
    s = pp.ServerConnection(max_inflight=8)
    c = pp.ClientConnection("bulk", encodings=encodings)
    s.receive_data(_wire(c.data_to_send()))
    (hello,) = _events(s)
    assert isinstance(hello, pp.Hello)
    assert hello.role == "bulk"
    c.receive_data(_wire(s.data_to_send()))
    (welcome,) = _events(c)
    assert isinstance(welcome, pp.Welcome)
    assert welcome.version == 1
    assert welcome.max_inflight == 8
    return s, c


def _to_server(c: pp.ClientConnection, s: pp.ServerConnection) -> list[object]:
    s.receive_data(_wire(c.data_to_send()))
    return _events(s)


def _to_client(s: pp.ServerConnection, c: pp.ClientConnection) -> list[object]:
    c.receive_data(_wire(s.data_to_send()))
    return _events(c)


def _opened(s: pp.ServerConnection, c: pp.ClientConnection, size: int = 1 << 20) -> None:
    c.open(7, "img")
    (ev,) = _to_server(c, s)
    assert ev == pp.Open(7, "img")
    s.opened(7, size, b"I" * 16)
    assert _to_client(s, c) == [pp.Opened(7, size, b"I" * 16)]


def test_read_roundtrip_with_zero_and_compressed_frames() -> None:
    s, c = _pair()
    _opened(s, c, 8 << 20)
    rid = c.read(7, 8192, 3 * 4096 + (1 << 20))
    (read,) = _to_server(c, s)
    assert read == pp.Read(rid, 7, 8192, 3 * 4096 + (1 << 20))
    data = bytes(range(256)) * 16
    s.send_data(rid, data)  # one page
    s.send_zero(rid, 4096)
    raw = b"abc" * (1 << 18) + b"x" * ((1 << 20) + 4096 - 3 * (1 << 18))
    frame = zstandard.ZstdCompressor().compress(raw)
    s.send_compressed(rid, len(raw), frame, checksum(raw))
    assert s.remaining(rid) == 0
    (done,) = _to_client(s, c)
    assert isinstance(done, pp.ReadDone)
    assert done.runs == (pp.Run(0, 4096, False), pp.Run(4096, 4096, True), pp.Run(8192, len(raw), False))
    assert done.buffer is not None
    view = done.buffer.view
    assert bytes(view[:4096]) == data
    assert bytes(view[8192:]) == raw
    assert c.inflight == 0


def test_raw_data_split_in_frames_and_merged_back() -> None:
    s, c = _pair()
    _opened(s, c, 8 << 20)
    n = 3 * pp.DATA_FRAME + 4096
    rid = c.read(7, 0, n)
    _to_server(c, s)
    payload = bytes((i * 7) & 0xFF for i in range(n))
    s.send_data(rid, payload)
    wire = _wire(s.data_to_send())
    assert len(wire) == n + 4 * (8 + 32)  # four frames, each with its own checksum
    # Feed it in awkward pieces through the zero-copy interface.
    # Parsing only when buffer_updated says there is something to parse (as
    # the remote source does) must lose nothing.
    pos = skipped = 0
    events: list[object] = []
    while pos < len(wire):
        buf = c.get_buffer()
        k = min(len(buf), 1000 + pos % 777, len(wire) - pos)
        buf[:k] = wire[pos : pos + k]
        pos += k
        if c.buffer_updated(k):
            events += _events(c)
        else:
            skipped += 1
    assert skipped > 0
    (done,) = events
    assert isinstance(done, pp.ReadDone)
    assert done.runs == (pp.Run(0, n, False),)
    assert done.buffer is not None
    assert bytes(done.buffer.view) == payload


def test_bulk_frames_are_bigger_and_bounded() -> None:
    s, c = _pair()
    _opened(s, c, 8 << 20)
    n = 2 * pp.BULK_FRAME + 4096
    rid = c.read(7, 0, n)
    _to_server(c, s)
    payload = bytes((i * 13) & 0xFF for i in range(n))
    with pytest.raises(pp.LocalProtocolError, match="frame size"):
        s.send_data(rid, payload, frame=pp.MAX_DATA + 1)
    s.send_data(rid, payload, frame=pp.BULK_FRAME)
    wire = _wire(s.data_to_send())
    assert len(wire) == n + 3 * (8 + 32)  # three frames
    c.receive_data(wire)
    (done,) = _events(c)
    assert isinstance(done, pp.ReadDone)
    assert done.buffer is not None
    assert bytes(done.buffer.view) == payload


def test_streamed_read_hands_out_each_verified_frame_in_one_buffer() -> None:
    s, c = _pair()
    _opened(s, c, 8 << 20)
    n = 2 * pp.BULK_FRAME
    rid = c.read(7, 4096, n + 2 * 4096, stream=True)
    _to_server(c, s)
    payload = bytes((i * 13) & 0xFF for i in range(n))
    s.send_data(rid, payload[:4096])
    s.send_zero(rid, 4096)
    s.send_data(rid, payload[4096:], frame=pp.BULK_FRAME)
    s.send_data(rid, payload[:4096])
    c.receive_data(_wire(s.data_to_send()))
    got: list[tuple[int, int, bytes | None]] = []
    buffers = set()
    while True:
        ev = c.next_event()
        if isinstance(ev, pp.ReadPiece):
            # The buffer is only valid until the next call: copy it now.
            data = None if ev.buffer is None else bytes(ev.buffer.view[: ev.length])
            if ev.buffer is not None:
                buffers.add(id(ev.buffer))
            got.append((ev.offset, ev.length, data))
            continue
        break
    assert isinstance(ev, pp.ReadDone)
    assert ev.buffer is None
    assert ev.runs == ()
    assert [(o, k) for o, k, _ in got] == [
        (4096, 4096),
        (8192, 4096),
        (12288, pp.BULK_FRAME),
        (12288 + pp.BULK_FRAME, pp.BULK_FRAME - 4096),
        (8192 + n, 4096),
    ]
    assert got[1][2] is None  # the zero frame carries no bytes
    assert b"".join(d for _, _, d in got if d is not None) == payload + payload[:4096]
    assert len(buffers) == 1  # every frame landed in the same buffer


def test_streamed_read_stops_at_a_corrupt_frame() -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 3 * 4096, stream=True)
    _to_server(c, s)
    s.send_data(rid, b"\1" * 4096)
    s.send_data(rid, b"\2" * 4096)
    s.send_data(rid, b"\3" * 4096)
    wire = bytearray(_wire(s.data_to_send()))
    frame = 8 + 32 + 4096
    wire[2 * frame - 1] ^= 0x01  # the second frame's last byte
    c.receive_data(bytes(wire))
    first, failed = _events(c)
    assert isinstance(first, pp.ReadPiece)
    assert first.offset == 0
    assert first.length == 4096
    assert isinstance(failed, pp.ReadFailed)
    assert failed.code == pp.ErrorCode.CORRUPT
    assert c.inflight == 0


def test_checksum_mismatch_fails_the_read_not_the_connection() -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 8192)
    _to_server(c, s)
    s.send_data(rid, b"\1" * 8192)
    wire = bytearray(_wire(s.data_to_send()))
    wire[-1] ^= 0xFF  # flip a payload bit in transit
    c.receive_data(bytes(wire))
    (failed,) = _events(c)
    assert isinstance(failed, pp.ReadFailed)
    assert failed.code == pp.ErrorCode.CORRUPT
    assert "checksum mismatch" in failed.message
    # The connection goes on.
    rid2 = c.read(7, 0, 4096)
    _to_server(c, s)
    s.send_zero(rid2, 4096)
    (done,) = _to_client(s, c)
    assert isinstance(done, pp.ReadDone)
    assert done.buffer is None


def test_damaged_zero_frame_length_never_reads_as_zeros() -> None:
    """One bit flipped in a ZERO frame's length so that it covers exactly the
    rest of the read: without its checksum the read would complete with a
    data page read as zeros. It fails instead (and the stray data frame
    after it is a protocol error, which drops the connection)."""
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 3 * 4096)
    _to_server(c, s)
    s.send_zero(rid, 4096)
    s.send_data(rid, b"\7" * 8192)
    wire = bytearray(_wire(s.data_to_send()))
    (length,) = struct.unpack_from("<I", wire, 8 + 4)
    assert length == 4096
    struct.pack_into("<I", wire, 8 + 4, length ^ 0x2000)  # 12288: all that is left
    c.receive_data(bytes(wire))
    failed = c.next_event()
    assert isinstance(failed, pp.ReadFailed)
    assert failed.code == pp.ErrorCode.CORRUPT
    assert "length was damaged" in failed.message
    with pytest.raises(pp.RemoteProtocolError, match="not in flight"):
        c.next_event()


def test_answer_to_an_open_nobody_sent_is_a_protocol_error() -> None:
    """A ZERO DATA frame whose type bit 2 flipped reads as an ERROR for a
    handle (flags bit 0 set), naming the read id as the handle. Taken as a
    refusal it would end every read of a healthy export; it is garbage."""
    s, c = _pair()
    _opened(s, c)
    c.receive_data(pp.encode_error(7, 4096, "\x00" * 8, for_handle=True))
    with pytest.raises(pp.RemoteProtocolError, match="code 4096, which no exporter sends"):
        c.next_event()
    s, c = _pair()
    _opened(s, c)
    c.receive_data(pp.encode_error(7, pp.ErrorCode.UNKNOWN_EXPORT, "no such export", for_handle=True))
    with pytest.raises(pp.RemoteProtocolError, match="no OPEN pending"):
        c.next_event()
    # An OPENED that arrives twice: the second one answers nothing.
    s, c = _pair()
    c.open(7, "img")
    _to_server(c, s)
    s.opened(7, 4096, b"I" * 16)
    wire = _wire(s.data_to_send())
    c.receive_data(wire + wire)
    assert c.next_event() == pp.Opened(7, 4096, b"I" * 16)
    with pytest.raises(pp.RemoteProtocolError, match="no OPEN pending"):
        c.next_event()


def test_bad_compressed_frame_fails_the_read() -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 8192)
    _to_server(c, s)
    frame = zstandard.ZstdCompressor().compress(b"\0" * 4096)  # declares 4096, not 8192
    s.send_compressed(rid, 8192, frame, checksum(b"\0" * 8192))
    (failed,) = _to_client(s, c)
    assert isinstance(failed, pp.ReadFailed)
    assert "declares 4096" in failed.message


@pytest.mark.parametrize(
    ("offset", "length", "code"),
    [
        ((1 << 20) - 4096, 8192, pp.ErrorCode.OUT_OF_BOUNDS),
        (1 << 62, 4096, pp.ErrorCode.OUT_OF_BOUNDS),
    ],
)
def test_out_of_bounds_read_is_refused_and_the_connection_goes_on(offset: int, length: int, code: int) -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, offset, length)
    (refused,) = _to_server(c, s)
    assert isinstance(refused, pp.ReadRefused)
    assert refused.code == code
    (failed,) = _to_client(s, c)
    assert isinstance(failed, pp.ReadFailed)
    assert failed.request_id == rid
    assert failed.reason == "out_of_bounds"
    assert "runs past the end" in failed.message
    rid2 = c.read(7, 0, 4096)
    (read,) = _to_server(c, s)
    assert read == pp.Read(rid2, 7, 0, 4096)


def test_unknown_export_and_unopened_handle() -> None:
    s, c = _pair()
    c.open(3, "nope")
    assert _to_server(c, s) == [pp.Open(3, "nope")]
    s.refuse_open(3, pp.ErrorCode.UNKNOWN_EXPORT, "no export named 'nope'")
    (failed,) = _to_client(s, c)
    assert failed == pp.OpenFailed(3, pp.ErrorCode.UNKNOWN_EXPORT, "no export named 'nope'")
    assert failed.reason == "unknown_export"
    rid = c.read(3, 0, 4096)
    (refused,) = _to_server(c, s)
    assert isinstance(refused, pp.ReadRefused)
    assert refused.code == pp.ErrorCode.BAD_REQUEST
    (rf,) = _to_client(s, c)
    assert isinstance(rf, pp.ReadFailed)
    assert rf.request_id == rid
    assert "not open" in rf.message


def test_no_common_version_is_refused_in_words() -> None:
    s = pp.ServerConnection()
    c = pp.ClientConnection("urgent", versions=(7, 9))
    s.receive_data(_wire(c.data_to_send()))
    with pytest.raises(pp.RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == pp.ErrorCode.VERSION
    s.fatal(ei.value.code, str(ei.value))
    (err,) = _to_client(s, c)
    assert isinstance(err, pp.PeerError)
    assert err.reason == "version"
    assert "offered [7, 9]" in err.message
    with pytest.raises(pp.RemoteProtocolError):  # a broken stream stays broken
        s.next_event()


def test_plaintext_client_meets_tls_refusal_and_tls_bytes_are_named() -> None:
    c = pp.ClientConnection("bulk")
    c.receive_data(pp.PREAMBLE + pp.encode_error(0, pp.ErrorCode.AUTH, "this exporter requires TLS"))
    (err,) = _events(c)
    assert isinstance(err, pp.PeerError)
    assert err.reason == "auth"
    s = pp.ServerConnection()
    s.receive_data(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    with pytest.raises(pp.RemoteProtocolError, match="speaks TLS"):
        s.next_event()


def test_ping_is_answered_by_the_core() -> None:
    s, c = _pair()
    c.ping(42)
    assert _to_server(c, s) == []
    assert _to_client(s, c) == [pp.Pong(42)]


def test_clean_close_and_close_mid_frame() -> None:
    s, _ = _pair()
    s.receive_data(b"")
    assert s.next_event() is pp.CLOSED
    s2 = pp.ServerConnection()
    s2.receive_data(pp.PREAMBLE + b"\x01\x00")
    s2.receive_data(b"")
    with pytest.raises(pp.RemoteProtocolError, match="middle of a frame"):
        s2.next_event()


def test_server_refuses_data_it_was_not_asked_for() -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 4096)
    _to_server(c, s)
    with pytest.raises(pp.LocalProtocolError):
        s.send_data(rid, b"x" * 8192)
    with pytest.raises(pp.LocalProtocolError):
        s.send_zero(rid + 1, 4096)
    with pytest.raises(pp.LocalProtocolError):
        c.read(7, 0, pp.MAX_READ + 1)


def test_client_rejects_out_of_order_data() -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 8192)
    _to_server(c, s)
    head = struct.pack("<IIQ16s", rid, 4096, 4096, checksum(b"\0" * 4096))  # skips the first page
    frame = struct.pack("<BBHI", pp.FrameType.DATA, 0, 0, len(head) + 4096) + head + b"\0" * 4096
    c.receive_data(frame)
    with pytest.raises(pp.RemoteProtocolError, match="expected 0x0"):
        c.next_event()


def test_too_many_reads_in_flight_is_a_protocol_error() -> None:
    s, c = _pair()
    _opened(s, c)
    for _ in range(8):
        c.read(7, 0, 4096)
    with pytest.raises(pp.LocalProtocolError):
        c.read(7, 0, 4096)
    _to_server(c, s)
    extra = struct.pack("<BBHI", pp.FrameType.READ, 0, 0, 24) + struct.pack("<IIQII", 999, 7, 0, 4096, 0)
    s.receive_data(extra)
    with pytest.raises(pp.RemoteProtocolError) as ei:
        s.next_event()
    assert ei.value.code == pp.ErrorCode.BUSY


# -- fuzzing: only RemoteProtocolError may escape for any input ---------------------------------

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _drain_server(s: pp.ServerConnection) -> None:
    for _ in range(10_000):
        try:
            ev = s.next_event()
        except pp.RemoteProtocolError:
            return
        if ev is pp.NEED_DATA or ev is pp.CLOSED:
            return
        if isinstance(ev, pp.Open):
            if ev.name == "img":
                s.opened(ev.handle, 1 << 20, bytes(16))
            else:
                s.refuse_open(ev.handle, pp.ErrorCode.UNKNOWN_EXPORT, "no")
        elif isinstance(ev, pp.Read):
            s.send_zero(ev.request_id, ev.length)


def _frames() -> st.SearchStrategy[bytes]:
    """Frames with a plausible header and arbitrary body."""
    return st.builds(
        lambda kind, flags, body: struct.pack("<BBHI", kind, flags, 0, len(body)) + body,
        st.integers(0, 12),
        st.sampled_from([0, 0, 1, 2, 3, 255]),
        st.binary(max_size=64),
    )


@_FUZZ
@given(st.lists(st.one_of(st.binary(max_size=80), _frames()), max_size=8), st.booleans())
def test_fuzz_server_only_protocol_errors(chunks: list[bytes], eof: bool) -> None:
    s = pp.ServerConnection(max_inflight=4)
    c = pp.ClientConnection("bulk")
    s.receive_data(_wire(c.data_to_send()))
    for chunk in chunks:
        s.receive_data(chunk)
        _drain_server(s)
    if eof:
        s.receive_data(b"")
        _drain_server(s)
    s.data_to_send()


@_FUZZ
@given(st.lists(st.one_of(st.binary(max_size=80), _frames()), max_size=8), st.booleans())
def test_fuzz_client_only_protocol_errors(chunks: list[bytes], eof: bool) -> None:
    s, c = _pair()
    _opened(s, c)
    c.read(7, 0, 8192)
    c.read(7, 4096, 4096)
    _to_server(c, s)
    for chunk in chunks:
        c.receive_data(chunk)
        try:
            _events(c)
        except pp.RemoteProtocolError:
            return
    if eof:
        c.receive_data(b"")
        try:
            _events(c)
        except pp.RemoteProtocolError:
            return


@_FUZZ
@given(st.binary(min_size=1, max_size=600), st.integers(1, 64))
def test_fuzz_client_with_valid_prefix_and_bitflips(noise: bytes, cut: int) -> None:
    s, c = _pair()
    _opened(s, c)
    rid = c.read(7, 0, 8192)
    _to_server(c, s)
    s.send_data(rid, noise.ljust(4096, b"n")[:4096])
    s.send_zero(rid, 4096)
    wire = bytearray(_wire(s.data_to_send()))
    pos = cut % len(wire)
    wire[pos] ^= noise[0] | 1
    c.receive_data(bytes(wire))
    try:
        evs = _events(c)
    except pp.RemoteProtocolError:
        return
    for ev in evs:
        if isinstance(ev, pp.ReadDone):  # whatever arrived complete was verified
            assert ev.buffer is not None
            assert bytes(ev.buffer.view[:4096]) == noise.ljust(4096, b"n")[:4096]
