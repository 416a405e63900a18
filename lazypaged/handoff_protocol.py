"""The handoff wire protocol, sans-IO: bytes in, typed messages out, and back.

Rules of this file:

* A frame is a 4-byte big-endian length N (1 ≤ N ≤ ``MAX_FRAME``) followed
  by N bytes of one msgpack map. Every map carries ``"v"`` (protocol
  version) and ``"type"``.
* The uffd travels as SCM_RIGHTS ancillary data on the same ``sendmsg`` as
  the first byte of the ``restore`` frame; this module never sees it.
* ``FrameDecoder.feed`` takes whatever the socket gave and returns whole
  messages; garbage from the peer raises ``RemoteProtocolError``. Building
  an invalid message locally raises ``LocalProtocolError``. Nothing else
  escapes; anything else is a bug.

The document for client writers is ``docs/handoff.md``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

VERSION: Final = 1
#: A restore request for 4096 ranges with long source names fits in ~600 KiB;
#: 1 MiB leaves room and bounds what one client can make us buffer.
MAX_FRAME: Final = 1 << 20
#: Enough for a CRIU-sized process (thousands of VMAs) without letting one
#: request make the daemon track millions of regions.
MAX_RANGES: Final = 4096
MAX_NAME: Final = 4096
_HEADER: Final = struct.Struct(">I")
_U64: Final = (1 << 64) - 1


class ProtocolError(Exception):
    """Base of every handoff protocol error; ``code`` is the wire error code."""

    code = "malformed"


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid message."""

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to build an invalid message."""


# -- messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """Target memory [start, start+length) backed by ``source`` at ``offset``."""

    start: int
    length: int
    source: str
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "length", "offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U64:
                raise LocalProtocolError(f"range {name} must be an unsigned 64-bit integer")
        if self.length == 0:
            raise LocalProtocolError("range length must not be zero")
        if self.start + self.length > _U64:
            raise LocalProtocolError("range wraps around the address space")
        if not isinstance(self.source, str) or not self.source or len(self.source) > MAX_NAME:
            raise LocalProtocolError("range source must be a non-empty name")
        if "\0" in self.source:
            raise LocalProtocolError("range source must not contain NUL")

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """Per-restore tuning a client may ask for (None: the daemon's default)."""

    fault_around: bool | None = None
    fill: bool | None = None


@dataclass(frozen=True, slots=True)
class RestoreRequest:
    ranges: tuple[RangeSpec, ...]
    registered: bool = False
    features: int = 0
    pid: int | None = None
    keeps_uffd: bool = False
    options: SessionOptions = field(default_factory=SessionOptions)

    def __post_init__(self) -> None:
        if not self.ranges:
            raise LocalProtocolError("a restore needs at least one range")
        if len(self.ranges) > MAX_RANGES:
            raise LocalProtocolError(f"too many ranges ({len(self.ranges)} > {MAX_RANGES})")


@dataclass(frozen=True, slots=True)
class Accepted:
    session: str


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Complete:
    session: str
    pages: int
    bytes_copied: int
    bytes_zero: int
    faults: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Failed:
    session: str
    code: str
    message: str


Message = RestoreRequest | Accepted | Error | Complete | Failed


# -- encoding ----------------------------------------------------------------


def _to_map(msg: Message) -> dict[str, Any]:
    if isinstance(msg, RestoreRequest):
        o = msg.options
        opts = {k: v for k, v in (("fault_around", o.fault_around), ("fill", o.fill)) if v is not None}
        body: dict[str, Any] = {
            "type": "restore",
            "registered": msg.registered,
            "features": msg.features,
            "keeps_uffd": msg.keeps_uffd,
            "ranges": [
                {"start": r.start, "length": r.length, "source": r.source, "offset": r.offset} for r in msg.ranges
            ],
        }
        if msg.pid is not None:
            body["pid"] = msg.pid
        if opts:
            body["options"] = opts
        return body
    if isinstance(msg, Accepted):
        return {"type": "accepted", "session": msg.session}
    if isinstance(msg, Error):
        return {"type": "error", "code": msg.code, "message": msg.message}
    if isinstance(msg, Complete):
        return {
            "type": "complete",
            "session": msg.session,
            "pages": msg.pages,
            "bytes_copied": msg.bytes_copied,
            "bytes_zero": msg.bytes_zero,
            "faults": msg.faults,
            "seconds": msg.seconds,
        }
    if isinstance(msg, Failed):
        return {"type": "failed", "session": msg.session, "code": msg.code, "message": msg.message}
    raise LocalProtocolError(f"not a handoff message: {msg!r}")


def encode(msg: Message) -> bytes:
    """One complete frame for ``msg``."""
    body = msgpack.packb({"v": VERSION, **_to_map(msg)}, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


# -- decoding ----------------------------------------------------------------


def _get(m: dict[str, Any], key: str, kind: type | tuple[type, ...], *, default: Any = ...) -> Any:
    if key not in m:
        if default is ...:
            raise RemoteProtocolError(f"missing field {key!r}")
        return default
    v = m[key]
    if isinstance(v, bool) and kind is int:
        raise RemoteProtocolError(f"field {key!r} must be an integer")
    if not isinstance(v, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RemoteProtocolError(f"field {key!r} must be {want}, not {type(v).__name__}")
    return v


def _opt_bool(m: dict[str, Any], key: str) -> bool | None:
    v = m.get(key)
    if v is not None and not isinstance(v, bool):
        raise RemoteProtocolError(f"option {key!r} must be a boolean")
    return v


def _from_map(m: dict[str, Any]) -> Message:
    kind = _get(m, "type", str)
    try:
        if kind == "restore":
            raw_ranges = _get(m, "ranges", list)
            if len(raw_ranges) > MAX_RANGES:
                raise RemoteProtocolError(f"too many ranges ({len(raw_ranges)} > {MAX_RANGES})", "too_many_ranges")
            ranges = []
            for i, r in enumerate(raw_ranges):
                if not isinstance(r, dict):
                    raise RemoteProtocolError(f"range {i} must be a map")
                ranges.append(
                    RangeSpec(
                        start=_get(r, "start", int),
                        length=_get(r, "length", int),
                        source=_get(r, "source", str),
                        offset=_get(r, "offset", int, default=0),
                    )
                )
            raw_opts = _get(m, "options", dict, default={})
            pid = _get(m, "pid", int, default=None)
            return RestoreRequest(
                ranges=tuple(ranges),
                registered=_get(m, "registered", bool, default=False),
                features=_get(m, "features", int, default=0),
                pid=pid,
                keeps_uffd=_get(m, "keeps_uffd", bool, default=False),
                options=SessionOptions(
                    fault_around=_opt_bool(raw_opts, "fault_around"),
                    fill=_opt_bool(raw_opts, "fill"),
                ),
            )
        if kind == "accepted":
            return Accepted(_get(m, "session", str))
        if kind == "error":
            return Error(_get(m, "code", str), _get(m, "message", str))
        if kind == "complete":
            return Complete(
                _get(m, "session", str),
                _get(m, "pages", int),
                _get(m, "bytes_copied", int),
                _get(m, "bytes_zero", int),
                _get(m, "faults", int),
                float(_get(m, "seconds", (int, float))),
            )
        if kind == "failed":
            return Failed(_get(m, "session", str), _get(m, "code", str), _get(m, "message", str))
    except LocalProtocolError as e:  # validation of a received value
        raise RemoteProtocolError(str(e)) from None
    raise RemoteProtocolError(f"unknown message type {kind!r}")


def decode_body(body: bytes) -> Message:
    """Decode one frame's payload (without its length header)."""
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises a zoo of types for garbage
        raise RemoteProtocolError(f"payload is not msgpack: {e}") from None
    if not isinstance(m, dict):
        raise RemoteProtocolError("payload must be a msgpack map")
    version = m.get("v")
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version!r} (this daemon speaks {VERSION})", "version")
    return _from_map(m)


class FrameDecoder:
    """Accumulates bytes and yields whole messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if n == 0:
                raise RemoteProtocolError("empty frame")
            if n > self._max:
                raise RemoteProtocolError(f"frame of {n} bytes exceeds the limit of {self._max}", "too_large")
            if len(self._buf) < _HEADER.size + n:
                break
            body = bytes(self._buf[_HEADER.size : _HEADER.size + n])
            del self._buf[: _HEADER.size + n]
            out.append(decode_body(body))
        return out
