"""The control protocol behind ``lazypaged status``, sans-IO.

Rules of this file:

* A message is one JSON object on one line: UTF-8, terminated by ``\\n``,
  no newline inside (``json.dumps`` never emits one). Every object carries
  ``"v"`` (the integer ``VERSION``) and ``"type"``. JSON rather than the
  handoff socket's msgpack so that an operator can talk to the daemon with
  ``socat`` and read the answer.
* The client sends requests; the server answers each with exactly one reply,
  in order, on the same connection. A connection may carry many requests
  (``lazypaged status --watch`` keeps one open).
* Messages and the records inside them are frozen dataclasses that validate
  in their constructor; building an invalid one raises
  ``LocalProtocolError``. ``LineDecoder.feed`` turns bytes into messages and
  raises ``RemoteProtocolError`` for anything the peer got wrong (every
  later ``feed`` raises again). Nothing else escapes; anything else is a bug.
* Decoding ignores unknown keys (room for later versions) and refuses
  missing keys, wrong JSON types (``true`` for a count, a string for a
  number) and negative counts.

The document for client writers is ``docs/operations.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Final, TypeVar

VERSION: Final = 1
#: A request is a few dozen bytes; anything longer from a client is garbage.
MAX_REQUEST_LINE: Final = 4096
#: A status reply costs ~500 bytes a session: 16 MiB covers tens of
#: thousands of sessions and bounds what a broken daemon makes a client hold.
MAX_REPLY_LINE: Final = 16 << 20
#: Longest text field (names, paths, error messages), in characters.
MAX_TEXT: Final = 4096


class ProtocolError(Exception):
    """Base of every control protocol error; ``code`` goes in an error reply."""

    code = "malformed"


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid message."""


class LocalProtocolError(ProtocolError):
    """We were asked to build an invalid message."""


# -- field checks ------------------------------------------------------------


def _kind(v: object) -> str:
    """The JSON name of ``v``'s type, for messages people read."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return "a value of another type"



def _text(what: str, v: object, *, empty: bool = False) -> None:
    if not isinstance(v, str):
        raise LocalProtocolError(f"{what} must be a string, not {_kind(v)}")
    if len(v) > MAX_TEXT or (not empty and not v):
        raise LocalProtocolError(f"{what} must be {0 if empty else 1}..{MAX_TEXT} characters")


def _count(what: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise LocalProtocolError(f"{what} must be an integer, not {_kind(v)}")
    if v < 0:
        raise LocalProtocolError(f"{what} = {v} must not be negative")


def _number(obj: object, attr: str, *, optional: bool = False) -> None:
    """A finite non-negative float; an int is accepted and stored as float."""
    v = getattr(obj, attr)
    if v is None and optional:
        return
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise LocalProtocolError(f"{attr} must be a number, not {_kind(v)}")
    if not math.isfinite(v) or v < 0:
        raise LocalProtocolError(f"{attr} = {v} must be a finite non-negative number")
    object.__setattr__(obj, attr, float(v))


def _names(what: str, v: object) -> None:
    if not isinstance(v, tuple):
        raise LocalProtocolError(f"{what} must be a tuple, not {_kind(v)}")
    for x in v:
        _text(what, x)


# -- records -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """One restore session as ``lazypaged status`` shows it."""

    id: str
    kind: str
    pid: int | None
    state: str
    sources: tuple[str, ...]
    pages_total: int
    pages_installed: int
    faults: int
    bytes_copied: int
    bytes_zero: int
    bytes_fault: int
    bytes_fill: int
    #: Upper bounds of the power-of-two buckets holding the median and 99th
    #: percentile fault service time; None before the first fault.
    fault_p50_us: float | None
    fault_p99_us: float | None
    #: Bytes a second installed by the fill / by everything, over the last
    #: measuring interval (about a second).
    fill_rate: float
    install_rate: float
    seconds: float
    #: Times a source could not deliver pages (each a use of the failure
    #: policy), and bytes poisoned by the ``sigbus`` policy.
    source_errors: int = 0
    bytes_poisoned: int = 0

    def __post_init__(self) -> None:
        _text("id", self.id)
        _text("kind", self.kind)
        _text("state", self.state)
        if self.pid is not None:
            _count("pid", self.pid)
        _names("sources", self.sources)
        for name in ("pages_total", "pages_installed", "faults", "bytes_copied", "bytes_zero", "bytes_fault",
                     "bytes_fill", "source_errors", "bytes_poisoned"):
            _count(name, getattr(self, name))
        if self.pages_installed > self.pages_total:
            raise LocalProtocolError(f"pages_installed {self.pages_installed} exceeds pages_total {self.pages_total}")
        _number(self, "fault_p50_us", optional=True)
        _number(self, "fault_p99_us", optional=True)
        for name in ("fill_rate", "install_rate", "seconds"):
            _number(self, name)


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A page source in use: a snapshot file, or a remote peer's export."""

    name: str
    type: str
    size: int
    sessions: int
    #: For sources behind a link (a remote peer): bytes requested and not yet
    #: received, and reconnections so far. None where the source has no link.
    bytes_in_flight: int | None = None
    reconnects: int | None = None

    def __post_init__(self) -> None:
        _text("name", self.name)
        _text("type", self.type)
        _count("size", self.size)
        _count("sessions", self.sessions)
        for name in ("bytes_in_flight", "reconnects"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    version: str
    pid: int
    #: "running", or "stopping" once a shutdown signal arrived.
    state: str
    uptime_s: float
    sessions_finished: int
    #: Bytes a second installed over all sessions in the last interval.
    install_rate: float

    def __post_init__(self) -> None:
        _text("version", self.version)
        _count("pid", self.pid)
        _text("state", self.state)
        _number(self, "uptime_s")
        _count("sessions_finished", self.sessions_finished)
        _number(self, "install_rate")


# -- messages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusRequest:
    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class StatusReply:
    TYPE: ClassVar[str] = "status_reply"
    daemon: DaemonStatus
    sessions: tuple[SessionStatus, ...]
    sources: tuple[SourceStatus, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.daemon, DaemonStatus):
            raise LocalProtocolError("daemon must be a DaemonStatus")
        for name, kind in (("sessions", SessionStatus), ("sources", SourceStatus)):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(x, kind) for x in v):
                raise LocalProtocolError(f"{name} must be a tuple of {kind.__name__}")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str

    def __post_init__(self) -> None:
        _text("code", self.code)
        _text("message", self.message, empty=True)


Request = StatusRequest
Reply = StatusReply | ErrorReply
Message = StatusRequest | StatusReply | ErrorReply
_TYPES: Final[dict[str, type[Message]]] = {t.TYPE: t for t in (StatusRequest, StatusReply, ErrorReply)}


# -- encoding -------------------------------------------------------------------


def _record_map(rec: SessionStatus | SourceStatus | DaemonStatus) -> dict[str, Any]:
    out = {f.name: getattr(rec, f.name) for f in fields(rec)}
    if isinstance(rec, SessionStatus):
        out["sources"] = list(rec.sources)
    return out


def encode(msg: Message) -> bytes:
    """One line: the JSON object and its ``\\n``."""
    m: dict[str, Any] = {"v": VERSION, "type": msg.TYPE}
    if isinstance(msg, StatusReply):
        m["daemon"] = _record_map(msg.daemon)
        m["sessions"] = [_record_map(s) for s in msg.sessions]
        m["sources"] = [_record_map(s) for s in msg.sources]
    elif isinstance(msg, ErrorReply):
        m["code"], m["message"] = msg.code, msg.message
    return json.dumps(m, separators=(",", ":"), allow_nan=False).encode() + b"\n"


# -- decoding -------------------------------------------------------------------

_R = TypeVar("_R", SessionStatus, SourceStatus, DaemonStatus)


def _record(cls: type[_R], where: str, m: object) -> _R:
    if not isinstance(m, dict):
        raise RemoteProtocolError(f"{where} must be an object")
    args: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in m:
            if f.default is not MISSING:
                continue
            raise RemoteProtocolError(f"{where} lacks {f.name!r}")
        v = m[f.name]
        if f.name == "sources" and cls is SessionStatus:
            if not isinstance(v, list):
                raise RemoteProtocolError(f"{where}.sources must be a list")
            v = tuple(v)
        args[f.name] = v
    try:
        return cls(**args)
    except LocalProtocolError as e:
        raise RemoteProtocolError(f"{where}: {e}") from None


def _records(cls: type[_R], where: str, v: object) -> tuple[_R, ...]:
    if not isinstance(v, list):
        raise RemoteProtocolError(f"{where} must be a list")
    return tuple(_record(cls, f"{where}[{i}]", x) for i, x in enumerate(v))


def decode_line(line: bytes) -> Message:
    """One line (without its ``\\n``) to a message, or RemoteProtocolError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"not a JSON line: not valid UTF-8 (at byte {e.start})") from None
    try:
        m = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RemoteProtocolError(f"not a JSON line: {e.msg.lower()} at column {e.colno}") from None
    except RecursionError:
        raise RemoteProtocolError("not a JSON line this side reads: nested too deep") from None
    except ValueError as e:  # NaN, Infinity (see _no_constant)
        raise RemoteProtocolError(f"not a JSON line: {e}") from None
    if not isinstance(m, dict):
        raise RemoteProtocolError("a message must be a JSON object")
    v = m.get("v")
    if v is None:
        raise RemoteProtocolError(f"no protocol version (field 'v'; this side speaks {VERSION})")
    if not isinstance(v, int) or isinstance(v, bool):
        raise RemoteProtocolError(f"protocol version must be the integer {VERSION}, not {_kind(v)}")
    if v != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {v} (this side speaks {VERSION})")
    kind = m.get("type")
    if kind is None:
        raise RemoteProtocolError("no message type (field 'type')")
    if not isinstance(kind, str):
        raise RemoteProtocolError(f"message type must be a string, not {_kind(kind)}")
    if kind not in _TYPES:
        raise RemoteProtocolError(f"unknown message type {kind[:64]!r}")
    if kind == StatusRequest.TYPE:
        return StatusRequest()
    if kind == ErrorReply.TYPE:
        code, message = m.get("code"), m.get("message")
        try:
            return ErrorReply(code, message)  # type: ignore[arg-type]
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"error reply: {e}") from None
    return StatusReply(
        _record(DaemonStatus, "daemon", m.get("daemon")),
        _records(SessionStatus, "sessions", m.get("sessions")),
        _records(SourceStatus, "sources", m.get("sources")),
    )


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


class LineDecoder:
    """Buffers bytes from a stream; hands out whole messages."""

    def __init__(self, max_line: int) -> None:
        self._max = max_line
        self._buf = bytearray()
        self._broken: RemoteProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self._broken is not None:
            raise self._broken
        try:
            return self._feed(data)
        except RemoteProtocolError as e:
            self._broken = e
            raise

    def _feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        start = len(self._buf)
        self._buf += data
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                if len(self._buf) > self._max:
                    raise RemoteProtocolError(f"line longer than {self._max} bytes")
                return out
            if nl > self._max:
                raise RemoteProtocolError(f"line longer than {self._max} bytes")
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            start = 0
            if line.strip():
                out.append(decode_line(line))
