"""The handoff wire protocol, sans-IO: bytes in, typed messages out, and back.

Rules of this file:

* A frame is a 4-byte big-endian length N (1 ≤ N ≤ ``MAX_FRAME``) followed
  by N bytes holding exactly one msgpack map. Every map carries ``"v"``
  (protocol version, the integer ``VERSION``) and ``"type"``.
* The uffd travels as SCM_RIGHTS ancillary data on the same ``sendmsg`` as
  the first byte of the ``restore`` frame; this module never sees it.
* Messages are frozen dataclasses that validate in their constructor, so a
  message object is always one that can be encoded. Building an invalid one
  raises ``LocalProtocolError``.
* ``FrameDecoder.feed`` takes whatever the socket gave and returns whole
  messages; garbage from the peer raises ``RemoteProtocolError`` (and every
  later ``feed`` raises again: a stream that went wrong once has no frame
  boundary left to trust). Nothing else escapes; anything else is a bug.
* Decoding is lenient where that costs nothing and strict where a wrong
  guess would hurt: unknown keys are ignored (room for later versions), an
  optional field sent as nil takes its default, but a field of the wrong
  msgpack type (a boolean where an integer belongs, a float for an address,
  a binary where a string belongs), a duplicate key or a value out of range
  is refused.

The document for client writers is ``docs/handoff.md``; keep the two in step.
"""

from __future__ import annotations

import math
import re
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
FAILURE_POLICIES: Final = ("wait", "sigbus", "kill")
#: Range page sizes accepted: base pages up to 1 GiB huge pages.
MIN_PAGE_SIZE: Final = 4096
MAX_PAGE_SIZE: Final = 1 << 30
#: Longest snapshot name, session id or error code, in UTF-8 bytes: PATH_MAX.
MAX_NAME: Final = 4096
_HEADER: Final = struct.Struct(">I")
_U64: Final = (1 << 64) - 1
#: pid_t is a signed 32-bit integer; 0 and negative values name groups, not a process.
_PID_MAX: Final = (1 << 31) - 1


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


# -- field checks (raise LocalProtocolError; decoding turns that into Remote) ----


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: How a decoded value's type is named in a refusal: the msgpack type, not Python's.
_KIND_NAMES: Final = {
    str: "a string",
    bytes: "binary data",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    tuple: "an array",
    dict: "a map",
    type(None): "nil",
    msgpack.ExtType: "an extension type",
}


def _kind(v: object) -> str:
    """The msgpack name of ``v``'s type, for messages a client reads."""
    for t, name in _KIND_NAMES.items():
        if type(v) is t:
            return name
    return "a value of another type"


def _check_uint(what: str, v: object, hi: int = _U64) -> None:
    if not _is_int(v):
        raise LocalProtocolError(f"{what} must be an integer, not {_kind(v)}")
    assert isinstance(v, int)
    if not 0 <= v <= hi:
        raise LocalProtocolError(f"{what} = {v} is out of range 0..{hi}")


def _check_bool(what: str, v: object) -> None:
    if not isinstance(v, bool):
        raise LocalProtocolError(f"{what} must be a boolean, not {_kind(v)}")


def _check_name(what: str, v: object) -> None:
    """A short identifier: non-empty valid UTF-8 without NUL, at most MAX_NAME bytes."""
    if not isinstance(v, str):
        raise LocalProtocolError(f"{what} must be a string, not {_kind(v)}")
    try:
        n = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} is not valid Unicode text") from None
    if not 0 < n <= MAX_NAME:
        raise LocalProtocolError(f"{what} must be 1..{MAX_NAME} bytes of UTF-8, not {n}")
    if "\0" in v:
        raise LocalProtocolError(f"{what} must not contain NUL")


def _clean_text(obj: object, attr: str) -> None:
    """Free text (error messages) is never refused: unencodable characters become U+FFFD."""
    v = getattr(obj, attr)
    if not isinstance(v, str):
        raise LocalProtocolError(f"{attr} must be a string, not {_kind(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # only lone surrogates cannot be encoded
        object.__setattr__(obj, attr, "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in v))


# -- messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """Target memory [start, start+length) backed by ``source`` at ``offset``."""

    start: int
    length: int
    source: str
    offset: int = 0
    #: Page size of the target memory (hugetlb: 2 MiB); 0 means the base page.
    page_size: int = 0

    def __post_init__(self) -> None:
        for name in ("start", "length", "offset", "page_size"):
            _check_uint(f"range {name}", getattr(self, name))
        p = self.page_size
        if p and (p & (p - 1) or not MIN_PAGE_SIZE <= p <= MAX_PAGE_SIZE):
            raise LocalProtocolError(
                f"range page_size {p} must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
            )
        if self.length == 0:
            raise LocalProtocolError("range length must not be zero")
        if self.start + self.length > _U64:
            raise LocalProtocolError("range wraps around the address space")
        _check_name("range source", self.source)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """Per-restore tuning a client may ask for (None: the daemon's default)."""

    fault_around: bool | None = None
    fill: bool | None = None
    #: Replay the image's recorded working set first, or record one.
    working_set: bool | None = None
    #: What to do when the source fails: "wait", "sigbus" or "kill".
    failure_policy: str | None = None

    def __post_init__(self) -> None:
        for name in ("fault_around", "fill", "working_set"):
            v = getattr(self, name)
            if v is not None:
                _check_bool(f"option {name}", v)
        if self.failure_policy is not None and self.failure_policy not in FAILURE_POLICIES:
            raise LocalProtocolError(f"option failure_policy must be one of {', '.join(FAILURE_POLICIES)}")


@dataclass(frozen=True, slots=True)
class RestoreRequest:
    ranges: tuple[RangeSpec, ...]
    registered: bool = False
    features: int = 0
    pid: int | None = None
    keeps_uffd: bool = False
    options: SessionOptions = field(default_factory=SessionOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.ranges, tuple) or not all(isinstance(r, RangeSpec) for r in self.ranges):
            raise LocalProtocolError("ranges must be a tuple of RangeSpec")
        if not self.ranges:
            raise LocalProtocolError("a restore needs at least one range")
        if len(self.ranges) > MAX_RANGES:
            raise LocalProtocolError(f"too many ranges ({len(self.ranges)} > {MAX_RANGES})")
        _check_bool("registered", self.registered)
        _check_bool("keeps_uffd", self.keeps_uffd)
        _check_uint("features", self.features)
        if self.pid is not None:
            _check_uint("pid", self.pid, _PID_MAX)
            if self.pid == 0:
                raise LocalProtocolError("pid must be positive")
        if not isinstance(self.options, SessionOptions):
            raise LocalProtocolError("options must be SessionOptions")


@dataclass(frozen=True, slots=True)
class Accepted:
    session: str

    def __post_init__(self) -> None:
        _check_name("session", self.session)


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    message: str

    def __post_init__(self) -> None:
        _check_name("code", self.code)
        _clean_text(self, "message")


@dataclass(frozen=True, slots=True)
class Complete:
    session: str
    pages: int
    bytes_copied: int
    bytes_zero: int
    faults: int
    seconds: float
    #: Pages the source could not deliver that were poisoned (failure_policy
    #: "sigbus"): touching one raises SIGBUS. Absent in older daemons' frames.
    pages_poisoned: int = 0

    def __post_init__(self) -> None:
        _check_name("session", self.session)
        for name in ("pages", "bytes_copied", "bytes_zero", "faults", "pages_poisoned"):
            _check_uint(name, getattr(self, name))
        s = self.seconds
        if not isinstance(s, int | float) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
            raise LocalProtocolError(f"seconds must be a finite non-negative number, not {s!r}")
        object.__setattr__(self, "seconds", float(s))


@dataclass(frozen=True, slots=True)
class Failed:
    session: str
    code: str
    message: str

    def __post_init__(self) -> None:
        _check_name("session", self.session)
        _check_name("code", self.code)
        _clean_text(self, "message")


Message = RestoreRequest | Accepted | Error | Complete | Failed


# -- encoding ----------------------------------------------------------------


def _range_map(r: RangeSpec) -> dict[str, Any]:
    m: dict[str, Any] = {"start": r.start, "length": r.length, "source": r.source, "offset": r.offset}
    if r.page_size:
        m["page_size"] = r.page_size
    return m


def _to_map(msg: Message) -> dict[str, Any]:
    if isinstance(msg, RestoreRequest):
        o = msg.options
        pairs = (
            ("fault_around", o.fault_around),
            ("fill", o.fill),
            ("working_set", o.working_set),
            ("failure_policy", o.failure_policy),
        )
        opts = {k: v for k, v in pairs if v is not None}
        body: dict[str, Any] = {
            "type": "restore",
            "registered": msg.registered,
            "features": msg.features,
            "keeps_uffd": msg.keeps_uffd,
            "ranges": [_range_map(r) for r in msg.ranges],
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
            "pages_poisoned": msg.pages_poisoned,
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

_MISSING: Final[Any] = object()


def _get(m: dict[str, Any], key: str, kind: type | tuple[type, ...], *, default: Any = _MISSING) -> Any:
    """``m[key]`` if it has msgpack type ``kind``; an optional key may be absent or nil."""
    v = m.get(key)
    if v is None:
        if default is _MISSING:
            raise RemoteProtocolError(f"missing field {key!r}" + (" (it is nil)" if key in m else ""))
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass in Python, a type of its own in msgpack.
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise RemoteProtocolError(f"field {key!r} must be {want}, not {_kind(v)}")
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
                    raise RemoteProtocolError(f"range {i} must be a map, not {_kind(r)}")
                ranges.append(
                    RangeSpec(
                        start=_get(r, "start", int),
                        length=_get(r, "length", int),
                        source=_get(r, "source", str),
                        offset=_get(r, "offset", int, default=0),
                        page_size=_get(r, "page_size", int, default=0),
                    )
                )
            raw_opts = _get(m, "options", dict, default={})
            return RestoreRequest(
                ranges=tuple(ranges),
                registered=_get(m, "registered", bool, default=False),
                features=_get(m, "features", int, default=0),
                pid=_get(m, "pid", int, default=None),
                keeps_uffd=_get(m, "keeps_uffd", bool, default=False),
                options=SessionOptions(
                    fault_around=_get(raw_opts, "fault_around", bool, default=None),
                    fill=_get(raw_opts, "fill", bool, default=None),
                    working_set=_get(raw_opts, "working_set", bool, default=None),
                    failure_policy=_get(raw_opts, "failure_policy", str, default=None),
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
                _get(m, "seconds", (int, float)),
                _get(m, "pages_poisoned", int, default=0),
            )
        if kind == "failed":
            return Failed(_get(m, "session", str), _get(m, "code", str), _get(m, "message", str))
    except LocalProtocolError as e:  # validation of a received value
        raise RemoteProtocolError(str(e)) from None
    raise RemoteProtocolError(f"unknown message type {_quote(kind)}")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    m = dict(pairs)
    if len(m) != len(pairs):
        raise RemoteProtocolError("duplicate key in a map")
    return m


def _quote(text: str) -> str:
    """A client-supplied string in a refusal, shortened and on one line."""
    short = text if len(text) <= 64 else text[:64] + "…"
    return repr(short)


def _unpack_refusal(e: Exception) -> str:
    """What was wrong with a body msgpack could not decode, in one plain line.

    msgpack raises a type per problem, often with an empty or internal
    message; the client gets the problem, not the exception.
    """
    if isinstance(e, msgpack.ExtraData):
        return "bytes after the msgpack object: a frame holds exactly one"
    if isinstance(e, msgpack.StackError):
        return "the msgpack object is nested too deep"
    if isinstance(e, UnicodeDecodeError):
        return "a string is not valid UTF-8 (send binary data as a str only if it is text)"
    if isinstance(e, msgpack.OutOfData | EOFError) or "incomplete input" in str(e):
        return "the msgpack object ends early: the frame is shorter than its content"
    text = str(e)
    if "strict_map_key" in text:
        return "map keys must be strings"
    found = re.match(r"(\d+) exceeds max_(\w+)_len", text)
    if found:
        what = {"array": "an array of", "map": "a map of", "str": "a string of", "bin": "binary data of"}
        items = "bytes" if found.group(2) in ("str", "bin") else "items"
        return (
            f"{what.get(found.group(2), 'an object of')} {found.group(1)} {items} "
            "cannot fit in the frame: the msgpack body is damaged"
        )
    return "the payload is not valid msgpack"


def decode_body(body: bytes) -> Message:
    """Decode one frame's payload (without its length header)."""
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=True, object_pairs_hook=_unique_map)
    except RemoteProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo of types for garbage
        raise RemoteProtocolError(_unpack_refusal(e)) from None
    if not isinstance(m, dict):
        raise RemoteProtocolError(f"payload must be a msgpack map, not {_kind(m)}")
    # Checked before any other field: a later version may change them all.
    if "v" not in m or m["v"] is None:
        raise RemoteProtocolError(f"no protocol version (field 'v'; this side speaks {VERSION})", "version")
    version = m["v"]
    if not _is_int(version):
        raise RemoteProtocolError(
            f"protocol version must be the integer {VERSION}, not {_kind(version)}", "version"
        )
    if version != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})", "version")
    return _from_map(m)


class FrameDecoder:
    """Accumulates bytes and yields whole messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._error: RemoteProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """Append ``data``; return every message completed by it (possibly none)."""
        if self._error is not None:
            raise RemoteProtocolError(f"stream already failed: {self._error}", self._error.code)
        self._buf += data
        out: list[Message] = []
        try:
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
        except RemoteProtocolError as e:
            self._error = e
            self._buf.clear()
            raise
        return out
