"""The control protocol on its own: bytes in, messages out, and back."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazypaged import control_protocol as cp


def _session(**kw: object) -> cp.SessionStatus:
    base: dict[str, object] = dict(
        id="abc", kind="native", pid=12, state="running", sources=("img",), pages_total=10, pages_installed=4,
        faults=3, bytes_copied=8192, bytes_zero=4096, bytes_fault=12288, bytes_fill=4096, fault_p50_us=64.0,
        fault_p99_us=256, fill_rate=1.5e9, install_rate=2e9, seconds=1.25,
    )
    base.update(kw)
    return cp.SessionStatus(**base)  # type: ignore[arg-type]


def _reply() -> cp.StatusReply:
    daemon = cp.DaemonStatus(version="0.1.0", pid=1, state="running", uptime_s=3, sessions_finished=2,
                             install_rate=0)
    return cp.StatusReply(daemon, (_session(), _session(id="def", pid=None, fault_p50_us=None, fault_p99_us=None)),
                          (cp.SourceStatus("img", "raw image", 1 << 20, 2),
                           cp.SourceStatus("peer:vm.img", "remote", 1 << 30, 1, bytes_in_flight=65536, reconnects=2)))


def test_request_bytes_are_exactly_documented() -> None:
    assert cp.encode(cp.StatusRequest()) == b'{"v":1,"type":"status"}\n'


def test_round_trip_and_numbers_become_floats() -> None:
    reply = _reply()
    wire = cp.encode(reply)
    assert wire.endswith(b"\n")
    assert wire.count(b"\n") == 1
    (back,) = cp.LineDecoder(cp.MAX_REPLY_LINE).feed(wire)
    assert back == reply
    assert isinstance(back, cp.StatusReply)
    assert back.sessions[0].fault_p99_us == 256.0
    assert isinstance(back.daemon.uptime_s, float)


def test_byte_by_byte_and_several_per_chunk() -> None:
    wire = cp.encode(cp.StatusRequest()) * 3 + b"\n" + cp.encode(cp.ErrorReply("busy", "later"))
    d = cp.LineDecoder(cp.MAX_REPLY_LINE)
    got: list[cp.Message] = []
    for i in range(len(wire)):
        got += d.feed(wire[i : i + 1])
    assert got == [cp.StatusRequest()] * 3 + [cp.ErrorReply("busy", "later")]
    assert d.pending == 0
    assert cp.LineDecoder(cp.MAX_REPLY_LINE).feed(wire) == got


def test_optional_link_fields_may_be_absent() -> None:
    doc = json.loads(cp.encode(_reply()))
    del doc["sources"][0]["bytes_in_flight"], doc["sources"][0]["reconnects"]
    (back,) = cp.LineDecoder(cp.MAX_REPLY_LINE).feed(json.dumps(doc).encode() + b"\n")
    assert isinstance(back, cp.StatusReply)
    assert back.sources[0].bytes_in_flight is None
    assert back.sources[1].reconnects == 2


def test_unknown_keys_are_ignored() -> None:
    line = b'{"v":1,"type":"status","later":[1,2]}\n'
    assert cp.LineDecoder(100).feed(line) == [cp.StatusRequest()]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"nope\n", "not a JSON line"),
        (b"[1]\n", "JSON object"),
        (b'{"type":"status"}\n', "version"),
        (b'{"v":true,"type":"status"}\n', "version"),
        (b'{"v":2,"type":"status"}\n', "version"),
        (b'{"v":1,"type":"launch"}\n', "unknown message type"),
        (b'{"v":1,"type":"error","code":"","message":"x"}\n', "code"),
        (b'{"v":1,"type":"status_reply","daemon":{},"sessions":[],"sources":[]}\n', "lacks"),
        (b"\xff\xfe\n", "not a JSON line"),
        (b'{"v":1,"type":"status","x":NaN}\n', "not a JSON"),
    ],
)
def test_garbage_is_a_remote_error(line: bytes, words: str) -> None:
    d = cp.LineDecoder(1000)
    with pytest.raises(cp.RemoteProtocolError, match=words):
        d.feed(line)
    with pytest.raises(cp.RemoteProtocolError):  # a broken stream stays broken
        d.feed(cp.encode(cp.StatusRequest()))


def _wire_with(path: tuple[str | int, ...], value: object) -> bytes:
    doc = json.loads(cp.encode(_reply()))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode() + b"\n"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("sessions", 0, "faults"), True),
        (("sessions", 0, "faults"), -1),
        (("sessions", 0, "faults"), 1.5),
        (("sessions", 0, "pages_installed"), 11),
        (("sessions", 0, "sources"), "img"),
        (("sessions", 0, "sources"), [1]),
        (("sessions", 0, "id"), ""),
        (("sessions", 0, "fill_rate"), "fast"),
        (("sessions", 0, "fill_rate"), -2.0),
        (("sessions",), {}),
        (("daemon", "pid"), None),
        (("sources", 0, "size"), "1M"),
        (("sources", 1, "reconnects"), -1),
    ],
)
def test_wrong_field_types_are_refused(path: tuple[str | int, ...], value: object) -> None:
    with pytest.raises(cp.RemoteProtocolError):
        cp.LineDecoder(cp.MAX_REPLY_LINE).feed(_wire_with(path, value))


def test_building_invalid_messages_is_a_local_error() -> None:
    with pytest.raises(cp.LocalProtocolError):
        _session(pages_installed=11)
    with pytest.raises(cp.LocalProtocolError):
        _session(fill_rate=float("inf"))
    with pytest.raises(cp.LocalProtocolError):
        cp.ErrorReply("x" * (cp.MAX_TEXT + 1), "")
    with pytest.raises(cp.LocalProtocolError):
        cp.StatusReply(_reply().daemon, [_session()], ())  # type: ignore[arg-type]


def test_long_lines_are_refused_before_the_newline_arrives() -> None:
    d = cp.LineDecoder(64)
    with pytest.raises(cp.RemoteProtocolError, match="longer than 64"):
        d.feed(b"x" * 65)
    d = cp.LineDecoder(64)
    d.feed(b" " * 64)  # at the limit: still waiting
    with pytest.raises(cp.RemoteProtocolError, match="longer than 64"):
        d.feed(b" \n")


@given(st.lists(st.binary(max_size=200), max_size=8))
def test_feeding_anything_raises_only_protocol_errors(chunks: list[bytes]) -> None:
    d = cp.LineDecoder(256)
    try:
        for c in chunks:
            for msg in d.feed(c):
                assert isinstance(msg, cp.StatusRequest | cp.StatusReply | cp.ErrorReply)
    except cp.RemoteProtocolError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20))
def test_any_json_inside_a_reply_raises_only_protocol_errors(value: object) -> None:
    for path in (("daemon",), ("sessions", 0), ("sessions", 0, "sources"), ("sources",), ("daemon", "uptime_s")):
        with contextlib.suppress(cp.RemoteProtocolError):
            cp.LineDecoder(cp.MAX_REPLY_LINE).feed(_wire_with(path, value))
