"""Refusals on the control socket read as one plain line each: what was
wrong with the input, never a Python exception's name or repr."""

from __future__ import annotations

import json

import pytest

from lazypaged import control_protocol as cp


def _refusal(line: bytes) -> str:
    with pytest.raises(cp.RemoteProtocolError) as e:
        cp.decode_line(line)
    return str(e.value)


@pytest.mark.parametrize(
    ("line", "text"),
    [
        (b'{"type": "status"}', "no protocol version"),
        (b'{"v": null, "type": "status"}', "no protocol version"),
        (b'{"v": "1", "type": "status"}', "protocol version must be the integer 1, not a string"),
        (b'{"v": 7, "type": "status"}', "unsupported protocol version 7"),
        (b'{"v": 1}', "no message type"),
        (b'{"v": 1, "type": 3}', "message type must be a string, not a number"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "not a JSON line"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
        (json.dumps({"v": 1, "type": "error", "code": 5, "message": "x"}).encode(), "must be a string, not a number"),
        (json.dumps({"v": 1, "type": "status_reply", "daemon": []}).encode(), "daemon must be an object"),
    ],
)
def test_control_refusals_are_plain(line: bytes, text: str) -> None:
    msg = _refusal(line)
    assert text in msg, msg
    assert "\n" not in msg
    for internal in ("None", "NoneType", "UnicodeDecodeError", "codec", "JSONDecodeError", "'str'", "int,",
                     "RecursionError", "(char "):
        assert internal not in msg, msg
