"""The handoff wire format, byte by byte, plus property tests.

Everything here is pure: no socket, no daemon, no kernel. The invariant the
fuzz tests hold the decoder to: whatever bytes arrive, ``FrameDecoder.feed``
either returns messages or raises a ``ProtocolError`` subclass.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazypaged import handoff_protocol as hp

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "handoff.md"
U64 = (1 << 64) - 1


def frame_of(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def restore_map(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "v": 1,
        "type": "restore",
        "ranges": [{"start": 0x10000, "length": 0x2000, "source": "a.img", "offset": 0}],
    }
    m.update(over)
    return m


def range_map(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"start": 0x10000, "length": 0x2000, "source": "a.img", "offset": 0}
    r.update(over)
    return r


def decode_one(data: bytes) -> hp.Message:
    msgs = hp.FrameDecoder().feed(data)
    assert len(msgs) == 1
    return msgs[0]


def refused(data: bytes) -> hp.RemoteProtocolError:
    with pytest.raises(hp.RemoteProtocolError) as ei:
        hp.FrameDecoder().feed(data)
    return ei.value


# -- exact bytes ---------------------------------------------------------------

EXAMPLE_REQUEST = hp.RestoreRequest((hp.RangeSpec(0x7F1234560000, 0x200000, "app.img", 0),), keeps_uffd=True)
EXAMPLE_ACCEPTED = hp.Accepted("3f2a9c1be804")
EXAMPLE_COMPLETE = hp.Complete("3f2a9c1be804", 512, 1835008, 262144, 3, 0.25)
EXAMPLE_ERROR = hp.Error("unknown_source", "no snapshot named 'x'")


def test_example_request_bytes() -> None:
    expected = bytes.fromhex(
        "0000006e 86 a176 01 a474797065 a772657374 6f7265"
        " aa72656769737465726564 c2 a8666561747572657300 aa6b656570735f75666664 c3"
        " a672616e676573 91 84"
        " a57374617274 cf00007f1234560000"
        " a66c656e677468 ce00200000"
        " a6736f75726365 a76170702e696d67"
        " a66f6666736574 00"
    )
    assert hp.encode(EXAMPLE_REQUEST) == expected
    assert decode_one(expected) == EXAMPLE_REQUEST


@pytest.mark.parametrize(
    ("msg", "hexbody"),
    [
        (EXAMPLE_ACCEPTED, "83 a176 01 a474797065 a8 6163636570746564 a773657373696f6e ac336632613963316265383034"),
        (hp.Error("busy", "x"), "84 a176 01 a474797065 a56572726f72 a4636f6465 a462757379 a76d657373616765 a178"),
        (
            hp.Failed("s", "shutdown", ""),
            "85 a176 01 a474797065 a66661696c6564 a773657373696f6e a173 a4636f6465 a873687574646f776e"
            " a76d657373616765 a0",
        ),
        (
            hp.Complete("s", 1, 2, 3, 4, 1.5),
            "89 a176 01 a474797065 a8636f6d706c657465 a773657373696f6e a173 a57061676573 01"
            " ac62797465735f636f70696564 02 aa62797465735f7a65726f 03 a66661756c7473 04"
            " a77365636f6e6473 cb3ff8000000000000 ae70616765735f706f69736f6e6564 00",
        ),
    ],
)
def test_reply_bytes(msg: hp.Message, hexbody: str) -> None:
    body = bytes.fromhex(hexbody)
    assert hp.encode(msg) == raw_frame(body)
    assert hp.decode_body(body) == msg


def test_request_with_everything_bytes() -> None:
    req = hp.RestoreRequest(
        (hp.RangeSpec(0, 4096, "s", 8192),),
        registered=True,
        features=(1 << 3) | (1 << 6),
        pid=300,
        options=hp.SessionOptions(fault_around=False, fill=True),
    )
    body = hp.encode(req)[4:]
    assert body == msgpack.packb(
        {
            "v": 1,
            "type": "restore",
            "registered": True,
            "features": 0x48,
            "keeps_uffd": False,
            "ranges": [{"start": 0, "length": 4096, "source": "s", "offset": 8192}],
            "pid": 300,
            "options": {"fault_around": False, "fill": True},
        }
    )
    assert b"\xa3pid\xcd\x01\x2c" in body
    assert hp.decode_body(body) == req


def test_other_msgpack_encodings_are_accepted() -> None:
    # Long forms everywhere: map16, str8 keys, uint64 ints, int8 for a small
    # positive value, array16, str32 for a string, float32 seconds.
    def s8(t: str) -> bytes:
        return b"\xd9" + bytes([len(t)]) + t.encode()

    start = s8("start") + b"\xcf" + (0x10000).to_bytes(8, "big")
    length = s8("length") + b"\xd2" + (0x2000).to_bytes(4, "big", signed=True)
    source = s8("source") + b"\xdb" + (5).to_bytes(4, "big") + b"a.img"
    rng = b"\xde\x00\x03" + start + length + source
    body = (
        b"\xde\x00\x05"
        + s8("v") + b"\xd0\x01"
        + s8("type") + s8("restore")
        + s8("ranges") + b"\xdc\x00\x01" + rng
        + s8("features") + b"\xcf" + bytes(8)
        + s8("keeps_uffd") + b"\xc3"
    )  # fmt: skip
    msg = hp.decode_body(body)
    assert msg == hp.RestoreRequest((hp.RangeSpec(0x10000, 0x2000, "a.img", 0),), keeps_uffd=True)

    fields = {"v": 1, "type": "complete", "session": "s", "pages": 1, "bytes_copied": 0, "bytes_zero": 0, "faults": 0}
    body = b"\x88" + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
    done = hp.decode_body(body + b"\xa7seconds\xca\x3f\xc0\x00\x00")  # float32 1.5
    assert isinstance(done, hp.Complete)
    assert done.seconds == 1.5


def test_unknown_keys_are_ignored_and_nil_means_default() -> None:
    msg = decode_one(
        frame_of(
            restore_map(
                future=[1, 2, {"x": None}],
                pid=None,
                registered=None,
                features=None,
                options={"fill": None, "fault_around": False, "turbo": True},
                ranges=[range_map(offset=None, extra="y")],
            )
        )
    )
    assert msg == hp.RestoreRequest(
        (hp.RangeSpec(0x10000, 0x2000, "a.img", 0),),
        options=hp.SessionOptions(fault_around=False),
    )


def test_defaults_when_optional_fields_absent() -> None:
    m = restore_map()
    m["ranges"] = [{"start": 0, "length": 4096, "source": "x"}]
    msg = decode_one(frame_of(m))
    assert msg == hp.RestoreRequest((hp.RangeSpec(0, 4096, "x"),))
    assert isinstance(msg, hp.RestoreRequest)
    assert (msg.registered, msg.features, msg.pid, msg.keeps_uffd) == (False, 0, None, False)
    assert msg.options == hp.SessionOptions(None, None)


def test_seconds_may_be_an_integer() -> None:
    m = {"v": 1, "type": "complete", "session": "s", "pages": 0, "bytes_copied": 0, "bytes_zero": 0, "faults": 0}
    msg = decode_one(frame_of({**m, "seconds": 2}))
    assert isinstance(msg, hp.Complete)
    assert msg.seconds == 2.0
    assert isinstance(msg.seconds, float)


def test_range_end() -> None:
    assert hp.RangeSpec(4096, 8192, "x").end == 12288
    assert hp.RangeSpec(U64 - 4096, 4096, "x").end == U64


# -- framing -------------------------------------------------------------------


def test_split_at_every_boundary() -> None:
    data = hp.encode(EXAMPLE_REQUEST) + hp.encode(EXAMPLE_ACCEPTED) + hp.encode(EXAMPLE_COMPLETE)
    want = [EXAMPLE_REQUEST, EXAMPLE_ACCEPTED, EXAMPLE_COMPLETE]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1, 13):
            dec = hp.FrameDecoder()
            got = dec.feed(data[:i]) + dec.feed(data[i:j]) + dec.feed(data[j:])
            assert got == want, (i, j)
            assert dec.pending == 0


def test_byte_at_a_time_and_pending() -> None:
    data = hp.encode(EXAMPLE_ERROR)
    dec = hp.FrameDecoder()
    for k, b in enumerate(data[:-1]):
        assert dec.feed(bytes([b])) == []
        assert dec.pending == k + 1
    assert dec.feed(data[-1:]) == [EXAMPLE_ERROR]
    assert dec.pending == 0


def test_empty_feed_and_trailing_partial_frame() -> None:
    dec = hp.FrameDecoder()
    assert dec.feed(b"") == []
    data = hp.encode(EXAMPLE_ACCEPTED)
    assert dec.feed(data + data[:3]) == [EXAMPLE_ACCEPTED]
    assert dec.pending == 3
    assert dec.feed(data[3:]) == [EXAMPLE_ACCEPTED]


# -- limits --------------------------------------------------------------------


def test_empty_frame() -> None:
    e = refused(b"\x00\x00\x00\x00")
    assert e.code == "malformed"


def test_oversize_frame_is_refused_from_its_header() -> None:
    dec = hp.FrameDecoder()
    with pytest.raises(hp.RemoteProtocolError) as ei:
        dec.feed(struct.pack(">I", hp.MAX_FRAME + 1))
    assert ei.value.code == "too_large"
    huge = hp.FrameDecoder()
    with pytest.raises(hp.RemoteProtocolError):
        huge.feed(b"\xff\xff\xff\xff")


def test_frame_at_the_limit_is_read() -> None:
    pad = "x" * (hp.MAX_FRAME - 100)
    body = msgpack.packb({"v": 1, "type": "error", "code": "c", "message": pad})
    body = msgpack.packb({"v": 1, "type": "error", "code": "c", "message": "x" * (len(pad) + hp.MAX_FRAME - len(body))})
    assert len(body) == hp.MAX_FRAME
    msg = decode_one(raw_frame(body))
    assert isinstance(msg, hp.Error)
    with pytest.raises(hp.LocalProtocolError):
        hp.encode(hp.Error("c", msg.message + "x"))


def test_custom_limit() -> None:
    data = hp.encode(EXAMPLE_REQUEST)
    with pytest.raises(hp.RemoteProtocolError) as ei:
        hp.FrameDecoder(max_frame=len(data) - 5).feed(data)
    assert ei.value.code == "too_large"
    assert hp.FrameDecoder(max_frame=len(data) - 4).feed(data) == [EXAMPLE_REQUEST]


def test_too_many_ranges() -> None:
    ranges = [range_map(start=i * 4096, length=4096) for i in range(hp.MAX_RANGES + 1)]
    assert refused(frame_of(restore_map(ranges=ranges))).code == "too_many_ranges"
    ok = decode_one(frame_of(restore_map(ranges=ranges[:-1])))
    assert isinstance(ok, hp.RestoreRequest)
    assert len(ok.ranges) == hp.MAX_RANGES
    specs = tuple(hp.RangeSpec(i * 4096, 4096, "a.img") for i in range(hp.MAX_RANGES + 1))
    with pytest.raises(hp.LocalProtocolError):
        hp.RestoreRequest(specs)
    assert len(hp.encode(hp.RestoreRequest(specs[:-1], features=U64, pid=2**31 - 1))) < hp.MAX_FRAME


def test_largest_plausible_request_fits_in_a_frame() -> None:
    # MAX_RANGES ranges, 64-bit values everywhere and 120-byte names.
    specs = tuple(hp.RangeSpec(U64 - 4096 * (i + 1), 4096, f"{i:0120d}", U64) for i in range(hp.MAX_RANGES))
    assert len(hp.encode(hp.RestoreRequest(specs, features=U64, pid=2**31 - 1))) < hp.MAX_FRAME


@pytest.mark.parametrize("v", [None, 0, 2, -1, True, 1.0, "1", b"\x01", [1]])
def test_wrong_version(v: Any) -> None:
    m = restore_map()
    if v is None:
        del m["v"]
    else:
        m["v"] = v
    assert refused(frame_of(m)).code == "version"


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, "restore"]),
        msgpack.packb(1),
        msgpack.packb("restore"),
        msgpack.packb(None),
        msgpack.packb(b"\x81\xa1v\x01"),
        b"\xc1",  # never used
        b"\x81",  # map header without its pair
        b"\x81\xa1v",  # key without value
        msgpack.packb({"v": 1, "type": "accepted", "session": "s"}) + b"\x00",  # trailing byte
        msgpack.packb({1: 1}),  # integer key
        msgpack.packb({"v": 1, "type": "accepted", "session": "s"}).replace(b"\xa1s", b"\xa2\xff\xfe"),  # bad UTF-8
        b"\x82\xa1v\x01\xa1v\x01",  # duplicate key
        msgpack.packb({"v": 1, "type": "accepted", "session": msgpack.ExtType(1, b"x")}),
        b"\x91" * 2000 + b"\xc0",  # deep nesting
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 G elements
    ],
)
def test_not_a_map_or_not_msgpack(body: bytes) -> None:
    e = refused(raw_frame(body))
    assert e.code == "malformed"


@pytest.mark.parametrize(
    "m",
    [
        {"v": 1},
        {"v": 1, "type": 7},
        {"v": 1, "type": b"restore"},
        {"v": 1, "type": "hello"},
        {"v": 1, "type": "accepted"},
        {"v": 1, "type": "accepted", "session": ""},
        {"v": 1, "type": "accepted", "session": b"s"},
        {"v": 1, "type": "error", "code": "x"},
        {"v": 1, "type": "error", "code": "x", "message": None},
        {"v": 1, "type": "failed", "session": "s", "code": 3, "message": ""},
        {"v": 1, "type": "complete", "session": "s", "pages": 1, "bytes_copied": 0, "bytes_zero": 0, "faults": 0},
        *(
            {
                "v": 1,
                "type": "complete",
                "session": "s",
                "pages": 1,
                "bytes_copied": 0,
                "bytes_zero": 0,
                "faults": 0,
                "seconds": 0.0,
                **bad,
            }
            for bad in (
                {"pages": -1},
                {"faults": True},
                {"bytes_zero": 1.0},
                {"seconds": True},
                {"seconds": "1"},
                {"seconds": -0.5},
                {"seconds": float("nan")},
                {"seconds": float("inf")},
            )
        ),
    ],
)
def test_bad_replies(m: dict[str, Any]) -> None:
    assert refused(frame_of(m)).code == "malformed"


@pytest.mark.parametrize(
    "over",
    [
        {"type": "restore", "ranges": None},
        {"ranges": []},
        {"ranges": {}},
        {"ranges": "a"},
        {"ranges": [1]},
        {"ranges": [[0, 4096, "a", 0]]},
        {"registered": 1},
        {"registered": "true"},
        {"keeps_uffd": 0},
        {"features": True},
        {"features": False},
        {"features": -1},
        {"features": 1.0},
        {"pid": 0},
        {"pid": -1},
        {"pid": 2**31},
        {"pid": U64},
        {"pid": True},
        {"pid": "1"},
        {"options": [True]},
        {"options": {"fill": 1}},
        {"options": {"fault_around": "no"}},
    ],
)
def test_bad_request_fields(over: dict[str, Any]) -> None:
    assert refused(frame_of(restore_map(**over))).code == "malformed"


@pytest.mark.parametrize(
    "over",
    [
        {"start": None},
        {"start": True},
        {"start": -4096},
        {"start": 4096.0},
        {"start": "4096"},
        {"length": 0},
        {"length": False},
        {"length": -1},
        {"offset": -1},
        {"offset": True},
        {"start": U64 - 4095, "length": 8192},  # wraps
        {"start": U64, "length": 1},  # ends past 2**64 - 1
        {"source": ""},
        {"source": None},
        {"source": b"a.img"},
        {"source": 1},
        {"source": "a\0b"},
        {"source": "x" * (hp.MAX_NAME + 1)},
        {"source": "é" * (hp.MAX_NAME // 2 + 1)},  # under the limit in characters, over it in bytes
    ],
)
def test_bad_range_fields(over: dict[str, Any]) -> None:
    r = range_map(**over)
    if over.get("start", 0) is None:
        del r["start"]
    if "source" in over and over["source"] is None:
        del r["source"]
    assert refused(frame_of(restore_map(ranges=[range_map(), r]))).code == "malformed"


def test_biggest_values_accepted() -> None:
    m = restore_map(features=U64, pid=2**31 - 1, ranges=[range_map(start=U64 - 4096, length=4096, offset=U64)])
    msg = decode_one(frame_of(m))
    assert isinstance(msg, hp.RestoreRequest)
    assert msg.features == U64
    assert msg.ranges[0].offset == U64
    done = {"v": 1, "type": "complete", "session": "s", "pages": U64, "bytes_copied": U64, "bytes_zero": U64}
    c = decode_one(frame_of({**done, "faults": U64, "seconds": 1e300}))
    assert isinstance(c, hp.Complete)
    assert c.pages == U64


def test_nothing_but_a_restore_has_ranges() -> None:
    # A reply type carrying request fields is just that reply.
    msg = decode_one(frame_of({"v": 1, "type": "accepted", "session": "s", "ranges": "junk"}))
    assert msg == hp.Accepted("s")


def test_decoder_stays_failed() -> None:
    dec = hp.FrameDecoder()
    good = hp.encode(EXAMPLE_ACCEPTED)
    with pytest.raises(hp.RemoteProtocolError):
        dec.feed(raw_frame(b"\xc1") + good)
    with pytest.raises(hp.RemoteProtocolError):
        dec.feed(good)
    big = hp.FrameDecoder()
    with pytest.raises(hp.RemoteProtocolError) as ei:
        big.feed(b"\x7f\x00\x00\x00")
    with pytest.raises(hp.RemoteProtocolError) as again:
        big.feed(good)
    assert ei.value.code == again.value.code == "too_large"


# -- building messages locally ---------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: hp.RangeSpec(-1, 4096, "a"),
        lambda: hp.RangeSpec(0, 0, "a"),
        lambda: hp.RangeSpec(True, 4096, "a"),
        lambda: hp.RangeSpec(2**64, 4096, "a"),
        lambda: hp.RangeSpec(0, 4096, "a", 2**64),
        lambda: hp.RangeSpec(U64, 4096, "a"),
        lambda: hp.RangeSpec(0, 4096, ""),
        lambda: hp.RangeSpec(0, 4096, "\ud800"),
        lambda: hp.RangeSpec(0, 4096, b"a"),  # type: ignore[arg-type]
        lambda: hp.RestoreRequest(()),
        lambda: hp.RestoreRequest([hp.RangeSpec(0, 4096, "a")]),  # type: ignore[arg-type]
        lambda: hp.RestoreRequest(((0, 4096, "a", 0),)),  # type: ignore[arg-type]
        lambda: hp.RestoreRequest((hp.RangeSpec(0, 4096, "a"),), features=2**64),
        lambda: hp.RestoreRequest((hp.RangeSpec(0, 4096, "a"),), features=-1),
        lambda: hp.RestoreRequest((hp.RangeSpec(0, 4096, "a"),), pid=0),
        lambda: hp.RestoreRequest((hp.RangeSpec(0, 4096, "a"),), pid=2**31),
        lambda: hp.RestoreRequest((hp.RangeSpec(0, 4096, "a"),), registered=1),  # type: ignore[arg-type]
        lambda: hp.RestoreRequest((hp.RangeSpec(0, 4096, "a"),), options=None),  # type: ignore[arg-type]
        lambda: hp.SessionOptions(fill=0),  # type: ignore[arg-type]
        lambda: hp.Accepted(""),
        lambda: hp.Error("", "m"),
        lambda: hp.Error("c", 5),  # type: ignore[arg-type]
        lambda: hp.Complete("s", -1, 0, 0, 0, 0.0),
        lambda: hp.Complete("s", 2**64, 0, 0, 0, 0.0),
        lambda: hp.Complete("s", 0, 0, 0, 0, float("nan")),
        lambda: hp.Complete("s", 0, 0, 0, 0, True),
        lambda: hp.Failed("s", "", "m"),
    ],
)
def test_invalid_local_messages(make: Any) -> None:
    with pytest.raises(hp.LocalProtocolError):
        make()


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(hp.LocalProtocolError):
        hp.encode("hello")  # type: ignore[arg-type]


def test_unencodable_text_is_replaced_not_refused() -> None:
    e = hp.Error("source_error", "cannot open 'a\udcff?b'")
    assert e.message == "cannot open 'a\ufffd?b'"
    assert decode_one(hp.encode(e)) == e
    f = hp.Failed("s", "x", "\ud800")
    assert decode_one(hp.encode(f)) == hp.Failed("s", "x", "\ufffd")


def test_error_classes() -> None:
    assert issubclass(hp.RemoteProtocolError, hp.ProtocolError)
    assert issubclass(hp.LocalProtocolError, hp.ProtocolError)
    assert hp.RemoteProtocolError("x").code == "malformed"
    assert hp.RemoteProtocolError("x", "version").code == "version"
    assert hp.LocalProtocolError("x").code == "malformed"


# -- the document matches the code -------------------------------------------------


def _hex_blocks(text: str) -> list[bytes]:
    """The hex dumps in fenced blocks: optional offset column, bytes, optional ASCII column."""
    out = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        data = b""
        for ln in block.strip().splitlines():
            m = re.fullmatch(r"([0-9a-f]{4}  )?((?:[0-9a-f]{2} ?)+?)(?:  +\S.*)?", ln)
            if m is None:
                data = b""
                break
            data += bytes.fromhex(m.group(2))
        if data:
            out.append(data)
    return out


def test_doc_worked_example_is_what_encode_produces() -> None:
    text = DOC.read_text()
    example = text[text.index("## Worked example") :]
    blocks = _hex_blocks(example)
    assert blocks[:4] == [
        hp.encode(EXAMPLE_REQUEST),
        hp.encode(EXAMPLE_ACCEPTED),
        hp.encode(EXAMPLE_COMPLETE),
        hp.encode(EXAMPLE_ERROR),
    ]


def test_doc_lists_every_code_the_daemon_sends() -> None:
    text = DOC.read_text()
    codes = set()
    server = (ROOT / "lazypaged" / "handoff_server.py").read_text()
    codes |= set(re.findall(r'Refused\(\s*"(\w+)"', server))
    codes |= set(re.findall(r'hp\.Error\(\s*"(\w+)"', server))
    codes |= set(re.findall(r'\bcode, text = "(\w+)"', server))
    proto = (ROOT / "lazypaged" / "handoff_protocol.py").read_text()
    codes |= set(re.findall(r'RemoteProtocolError\(.*, "(\w+)"\)$', proto, re.M))
    session = (ROOT / "lazypaged" / "session.py").read_text()
    codes |= set(re.findall(r'(?:SessionFailed|_fail)\(\s*"(\w+)"', session))
    codes |= set(re.findall(r'Outcome\(\s*"\w+",\s*"(\w+)"', session))
    assert {"busy", "too_large", "version", "too_many_ranges", "shutdown", "target_exited"} <= codes
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert codes - documented == set()


def test_doc_limits_match_the_code() -> None:
    text = DOC.read_text()
    assert f"{hp.MAX_RANGES} ranges" in text
    assert hp.MAX_FRAME == 1_048_576
    assert "1 048 576" in text
    assert f"1 to {hp.MAX_NAME} bytes of UTF-8" in text
    assert f"Protocol version: **{hp.VERSION}**" in text


# -- properties ----------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
u64 = st.integers(0, U64)
opt_bool = st.none() | st.booleans()


@st.composite
def range_specs(draw: st.DrawFn) -> hp.RangeSpec:
    start = draw(u64)
    length = draw(st.integers(1, U64 - start)) if start < U64 else 0
    if length == 0:
        start, length = 0, 4096
    return hp.RangeSpec(start, length, draw(names), draw(u64))


requests = st.builds(
    hp.RestoreRequest,
    ranges=st.lists(range_specs(), min_size=1, max_size=5).map(tuple),
    registered=st.booleans(),
    features=u64,
    pid=st.none() | st.integers(1, 2**31 - 1),
    keeps_uffd=st.booleans(),
    options=st.builds(hp.SessionOptions, fault_around=opt_bool, fill=opt_bool),
)
texts = st.text(max_size=40)
messages: st.SearchStrategy[hp.Message] = st.one_of(
    requests,
    st.builds(hp.Accepted, names),
    st.builds(hp.Error, names, texts),
    st.builds(hp.Complete, names, u64, u64, u64, u64, st.floats(0, 1e12)),
    st.builds(hp.Failed, names, names, texts),
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(msgs=st.lists(messages, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_roundtrip(msgs: list[hp.Message], cuts: list[int]) -> None:
    data = b"".join(hp.encode(m) for m in msgs)
    for m in msgs:
        assert hp.decode_body(hp.encode(m)[4:]) == m
    dec = hp.FrameDecoder()
    got: list[hp.Message] = []
    prev = 0
    for c in sorted(min(c, len(data)) for c in cuts):
        got += dec.feed(data[prev:c])
        prev = c
    got += dec.feed(data[prev:])
    assert got == msgs
    assert dec.pending == 0


def _feed_all(chunks: list[bytes]) -> None:
    dec = hp.FrameDecoder(max_frame=4096)
    try:
        for c in chunks:
            for m in dec.feed(c):
                hp.encode(m)  # whatever decodes is a valid message and encodes again
    except hp.ProtocolError:
        pass


@FAST
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_arbitrary_bytes(chunks: list[bytes]) -> None:
    _feed_all(chunks)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_body(body: bytes) -> None:
    _feed_all([raw_frame(body)])


@FAST
@given(
    msg=messages,
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("xid")), min_size=1, max_size=4
    ),
    cut=st.integers(0, 10_000),
)
def test_mutated_frames(msg: hp.Message, edits: list[tuple[int, int, str]], cut: int) -> None:
    data = bytearray(hp.encode(msg))
    for pos, val, op in edits:
        pos %= len(data) + (op == "i")
        if op == "x" and data:
            data[pos % len(data)] ^= val or 1
        elif op == "i":
            data.insert(pos, val)
        elif data:
            del data[pos % len(data)]
    # Mutations inside the body only, keeping the header's length honest, too.
    body = bytes(data[4:])
    cut %= len(data) + 1
    _feed_all([bytes(data[:cut]), bytes(data[cut:])])
    _feed_all([raw_frame(body)] if body else [])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["restore", "accepted", "error", "complete", "failed", "a.img"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "v", "type", "ranges", "start", "length", "source", "offset", "registered", "features", "pid",
        "keeps_uffd", "options", "fill", "fault_around", "session", "code", "message", "pages",
        "bytes_copied", "bytes_zero", "faults", "seconds",
    ]
)  # fmt: skip


@st.composite
def plausible_maps(draw: st.DrawFn) -> dict[str, Any]:
    m: dict[str, Any] = {"v": draw(st.sampled_from([1, 1, 1, 2, True])), "type": draw(st.sampled_from(
        ["restore", "accepted", "error", "complete", "failed", "x"]))}  # fmt: skip
    for k in draw(st.lists(field_names, max_size=8)):
        if k == "ranges":
            m[k] = draw(st.lists(st.dictionaries(field_names, msgpack_values, max_size=5), max_size=3))
        else:
            m[k] = draw(msgpack_values)
    return m


@settings(FAST, max_examples=80)
@given(plausible_maps())
def test_structured_garbage(m: dict[str, Any]) -> None:
    _feed_all([frame_of(m)])


any_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(0, 2**65)
    | st.floats()
    | st.text(st.characters(), max_size=6)  # may hold lone surrogates
    | st.binary(max_size=4)
)
MESSAGE_CLASSES: list[tuple[Any, int]] = [
    (hp.RangeSpec, 4),
    (hp.SessionOptions, 2),
    (hp.Accepted, 1),
    (hp.Error, 2),
    (hp.Complete, 6),
    (hp.Failed, 3),
]


@FAST
@given(data=st.data(), which=st.integers(0, len(MESSAGE_CLASSES)))
def test_building_from_arbitrary_values(data: st.DataObject, which: int) -> None:
    """Constructors refuse with LocalProtocolError; whatever they accept encodes and decodes back."""
    try:
        if which == len(MESSAGE_CLASSES):
            ranges: Any = data.draw(
                st.lists(st.builds(hp.RangeSpec, u64, u64, any_values, u64) | any_values, max_size=3)
            )
            flags: Any = data.draw(st.tuples(any_values, any_values, any_values, any_values))
            msg: Any = hp.RestoreRequest(tuple(ranges), *flags)
        else:
            cls, n = MESSAGE_CLASSES[which]
            msg = cls(*data.draw(st.tuples(*[any_values] * n)))
            if cls in (hp.RangeSpec, hp.SessionOptions):
                return
    except hp.LocalProtocolError:
        return
    assert hp.decode_body(hp.encode(msg)[4:]) == msg


# -- poisoned pages in complete ---------------------------------------------------


def test_complete_carries_pages_poisoned() -> None:
    msg = hp.Complete("s", 8, 4096, 0, 1, 0.5, pages_poisoned=7)
    body = hp.encode(msg)[4:]
    assert msgpack.unpackb(body)["pages_poisoned"] == 7
    assert hp.decode_body(body) == msg


def test_complete_without_pages_poisoned_means_none() -> None:
    """A daemon of the previous revision does not send the field: zero."""
    m = {"v": 1, "type": "complete", "session": "s", "pages": 1, "bytes_copied": 0, "bytes_zero": 4096,
         "faults": 0, "seconds": 0.0}
    msg = hp.decode_body(msgpack.packb(m))
    assert isinstance(msg, hp.Complete)
    assert msg.pages_poisoned == 0


def test_old_decoder_policy_reads_the_new_complete() -> None:
    """What an older client does with the new field: it ignores unknown keys,
    so the rest of the frame reads as before."""
    body = msgpack.unpackb(hp.encode(hp.Complete("s", 2, 4096, 4096, 1, 1.0, pages_poisoned=1))[4:])
    known = {"v", "type", "session", "pages", "bytes_copied", "bytes_zero", "faults", "seconds"}
    assert set(body) - known == {"pages_poisoned"}


@pytest.mark.parametrize("v", [-1, True, 1.5, "1"])
def test_bad_pages_poisoned(v: Any) -> None:
    m = {"v": 1, "type": "complete", "session": "s", "pages": 1, "bytes_copied": 0, "bytes_zero": 0,
         "faults": 0, "seconds": 0.0, "pages_poisoned": v}
    assert refused(frame_of(m)).code == "malformed"


# -- refusals read as one plain line -------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "text"),
    [
        (msgpack.packb({"type": "restore"}), "version", "no protocol version"),
        (msgpack.packb({"v": "1", "type": "restore"}), "version", "protocol version must be the integer 1"),
        (msgpack.packb({"v": 2, "type": "restore"}), "version", "protocol version 2"),
        (b"\xc1\xc1", "malformed", "not valid msgpack"),
        (b"\x91" * 2000 + b"\xc0", "malformed", "nested too deep"),
        (b"\xdd\xff\xff\xff\xff", "malformed", "array of 4294967295 items"),
        (msgpack.packb({"v": 1}) + b"\x00", "malformed", "bytes after"),
        (b"\x81\xa1v\xa2\xff\xfe", "malformed", "not valid UTF-8"),
        (msgpack.packb({1: 1}), "malformed", "keys must be strings"),
        (b"\x81\xa1v", "malformed", "ends early"),
        (msgpack.packb({"v": 1, "type": "restore", "ranges": [range_map(source=b"x")]}, use_bin_type=True),
         "malformed", "must be a string, not binary"),
        (msgpack.packb({"v": 1, "type": "restore", "ranges": [range_map(start=None)]}), "malformed",
         "missing field 'start'"),
        (msgpack.packb({"v": 1, "type": "restore", "ranges": [range_map(start=1.0)]}), "malformed",
         "must be an integer, not a float"),
    ],
)
def test_refusal_text_is_plain(body: bytes, code: str, text: str) -> None:
    e = refused(raw_frame(body))
    assert e.code == code
    msg = str(e)
    assert text in msg, msg
    assert "\n" not in msg
    for internal in ("None", "Error:", "bytes,", "NoneType", "b'", "FormatError", "UnicodeDecodeError",
                     "ExtraData", "StackError", "ValueError", "strict_map_key", "max_array_len"):
        assert internal not in msg, msg
    assert not msg.endswith(": "), msg
