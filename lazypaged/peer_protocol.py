"""The peer protocol, sans-IO: one lazypaged exports snapshots, another reads pages.

Rules of this file:

* No sockets, no clocks, no asyncio. A connection object takes bytes in
  (``receive_data``, or the zero-copy pair ``get_buffer``/``buffer_updated``),
  hands out typed events (``next_event``) and queues bytes to send (drained
  by ``data_to_send``). The asyncio layers only move bytes.
* Each side first sends ``PREAMBLE``; then every unit is a frame: an 8-byte
  header (type, flags, reserved zero, body length) and a body whose layout
  the type fixes. The preamble and the HELLO, WELCOME and ERROR frames keep
  their version-1 layout in every later version, so a peer can always say
  "no common version" in words the other understands.
* Garbage from the peer raises :class:`RemoteProtocolError` (with the error
  code to send back before closing) from ``next_event``; after that the
  stream has no frame boundary left to trust and every later call raises
  again. A request the peer was allowed to make but that cannot be served
  (unknown export, out of bounds) is not garbage: the server core answers it
  with an ERROR frame by itself and the connection goes on.
* Asking a connection to do something the protocol forbids (data past the
  end of a request, a read before the handshake) raises
  :class:`LocalProtocolError`. Nothing else escapes; anything else is a bug
  (``tests/test_peer_protocol.py`` fuzzes both sides for exactly that).
* The client core never hands out bytes it has not verified: a read
  completes (:class:`ReadDone`) only when every DATA frame of it arrived in
  order, decompressed to exactly its length and matched its checksum
  (xxh3-128, the snapshot format's chunk checksum). A *streamed* read hands
  out each frame as :class:`ReadPiece` once that frame is verified, in one
  reused buffer, so its bytes can be used while still in the CPU's cache.

``docs/peer-protocol.md`` is the prose version; keep the two in step.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgpack
import zstandard

from .snapshot.format import checksum

PREAMBLE: Final = b"LZPGPEER"
#: Protocol versions this implementation speaks, oldest first.
VERSIONS: Final = (1,)
ROLES: Final = ("urgent", "bulk")
ENCODINGS: Final = ("zstd",)

_HEADER: Final = struct.Struct("<BBHI")  # type, flags, reserved (0), body length
HEADER_SIZE: Final = _HEADER.size
_ERROR: Final = struct.Struct("<IH")  # id, code; then UTF-8 text
_OPEN: Final = struct.Struct("<I")  # handle; then UTF-8 export name
_OPENED: Final = struct.Struct("<IIQ16s")  # handle, reserved, size, identity
_READ: Final = struct.Struct("<IIQII")  # request id, handle, offset, length, reserved
_DATA: Final = struct.Struct("<IIQ16s")  # request id, length, offset, checksum; then payload
_PING: Final = struct.Struct("<Q")

#: Control frames (handshake, errors, OPEN) are small; 64 KiB bounds what a
#: peer can make us buffer before a frame is complete.
MAX_CONTROL: Final = 64 << 10
#: Longest export name in UTF-8 bytes, and longest error text we send.
MAX_NAME: Final = 1024
MAX_TEXT: Final = 4096
#: Largest READ. A fill asks for 2 MiB at a time; 8 MiB leaves room for
#: bigger fill chunks while bounding the buffer one request pins.
MAX_READ: Final = 8 << 20
#: Largest DATA frame, uncompressed: a snapshot's biggest chunk (4 MiB), so
#: compressed chunks can travel whole.
MAX_DATA: Final = 4 << 20
#: Compressed payload bound: zstd never grows data by more than ~1/128 plus a header.
MAX_PAYLOAD: Final = MAX_DATA + (MAX_DATA >> 7) + 512
#: Raw data is cut into frames of this size by default, each with its own
#: checksum (urgent replies).
DATA_FRAME: Final = 256 << 10
#: Frame size for background (bulk) data: fewer frames, syscalls and
#: per-frame work on both sides. The exporter looks for urgent READs between
#: two bulk frames, so this bounds how long a bulk write holds one up there
#: (a few hundred microseconds); on the wire urgent replies have their own
#: connection.
BULK_FRAME: Final = 1 << 20
#: Reads one connection may have in flight; the server says its own in WELCOME.
DEFAULT_MAX_INFLIGHT: Final = 256
#: Open exports per connection.
MAX_HANDLES: Final = 1024
#: Receive scratch: room for a whole control frame plus many small frames.
_SCRATCH: Final = MAX_CONTROL + 2 * HEADER_SIZE
_U32: Final = (1 << 32) - 1


@functools.lru_cache(maxsize=32)
def zero_digest(length: int) -> bytes:
    """The checksum a ZERO frame carries: that of ``length`` zero bytes. It
    guards the one field of such a frame nothing else checks, its length: a
    damaged length would otherwise mark pages zero that are not."""
    return checksum(bytes(length))


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    OPEN = 4
    OPENED = 5
    READ = 6
    DATA = 7
    PING = 8
    PONG = 9


class ErrorCode(enum.IntEnum):
    """Why something was refused; the wire value of an ERROR frame."""

    PROTOCOL = 1  # malformed or out-of-order frame (connection-level)
    VERSION = 2  # no protocol version in common (connection-level)
    AUTH = 3  # authentication required or refused (connection-level)
    UNKNOWN_EXPORT = 4
    OUT_OF_BOUNDS = 5
    BAD_REQUEST = 6  # a well-formed request that makes no sense (unopened handle …)
    SOURCE_ERROR = 7  # the export cannot deliver those bytes (I/O, corruption)
    BUSY = 8
    SHUTTING_DOWN = 9
    INTERNAL = 10
    CORRUPT = 11  # client side only: a DATA frame failed its checksum or would not decode

    @classmethod
    def name_of(cls, code: int) -> str:
        try:
            return cls(code).name.lower()
        except ValueError:
            return f"error_{code}"


#: The codes an ERROR frame may carry (CORRUPT is the reader's own).
_SENT_CODES: Final = frozenset(int(c) for c in ErrorCode if c != ErrorCode.CORRUPT)

#: ERROR frame flag: the id names an export handle (a refused OPEN), not a read.
ERROR_FOR_HANDLE: Final = 1
#: DATA frame flags.
DATA_ZERO: Final = 1  # the range reads as zeros; no payload
DATA_ZSTD: Final = 2  # the payload is one zstd frame of exactly ``length`` bytes


# -- errors -----------------------------------------------------------------------------


class PeerProtocolError(Exception):
    """Base of every peer protocol error."""

    code = ErrorCode.PROTOCOL


class RemoteProtocolError(PeerProtocolError):
    """The peer sent bytes that break the protocol; ``code`` goes into our ERROR."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(PeerProtocolError):
    """We were asked to send something the protocol does not allow."""


# -- events -----------------------------------------------------------------------------


class _Sentinel(enum.Enum):
    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA: Final = _Sentinel.NEED_DATA
#: The peer closed the stream cleanly, at a frame boundary.
CLOSED: Final = _Sentinel.CLOSED


@dataclass(frozen=True, slots=True)
class Hello:
    """Client → server, once: what the client speaks and what this connection is for."""

    versions: tuple[int, ...]
    role: str
    encodings: tuple[str, ...] = ()
    agent: str = ""
    #: Names the reader across its connections, so the exporter can hold a
    #: reader's bulk replies back while its urgent ones are being served.
    client: str = ""

    def __post_init__(self) -> None:
        _check_text("hello client", self.client, 64)
        if not self.versions or not all(_is_u16(v) for v in self.versions):
            raise LocalProtocolError(f"hello: versions must be 1…65535, not {self.versions!r}")
        if self.role not in ROLES:
            raise LocalProtocolError(f"hello: role must be one of {ROLES}, not {self.role!r}")
        _check_text("hello agent", self.agent, MAX_NAME)
        for e in self.encodings:
            _check_text("hello encoding", e, 64)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server → client: the chosen version and the server's limits."""

    version: int
    encodings: tuple[str, ...] = ()
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_read: int = MAX_READ
    agent: str = ""

    def __post_init__(self) -> None:
        if not _is_u16(self.version):
            raise LocalProtocolError(f"welcome: bad version {self.version!r}")
        if not (_is_int(self.max_inflight) and 1 <= self.max_inflight <= 1 << 16):
            raise LocalProtocolError(f"welcome: max_inflight must be 1…65536, not {self.max_inflight!r}")
        if not (_is_int(self.max_read) and 4096 <= self.max_read <= MAX_READ):
            raise LocalProtocolError(f"welcome: max_read must be 4096…{MAX_READ}, not {self.max_read!r}")
        _check_text("welcome agent", self.agent, MAX_NAME)
        for e in self.encodings:
            _check_text("welcome encoding", e, 64)


@dataclass(frozen=True, slots=True)
class PeerError:
    """Server → client: a connection-level refusal; the server closes after it."""

    code: int
    message: str

    @property
    def reason(self) -> str:
        return ErrorCode.name_of(self.code)


@dataclass(frozen=True, slots=True)
class Open:
    """Client → server: bind ``handle`` to the export called ``name``."""

    handle: int
    name: str


@dataclass(frozen=True, slots=True)
class Opened:
    """Server → client: ``handle`` reads an image of ``size`` bytes.

    ``identity`` changes whenever the image does: a client that reconnects
    compares it, so it never mixes pages of two different images."""

    handle: int
    size: int
    identity: bytes


@dataclass(frozen=True, slots=True)
class OpenFailed:
    handle: int
    code: int
    message: str

    @property
    def reason(self) -> str:
        return ErrorCode.name_of(self.code)


@dataclass(frozen=True, slots=True)
class Read:
    """Client → server: the bytes [offset, offset+length) of the export behind ``handle``."""

    request_id: int
    handle: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadRefused:
    """Server side, informational: the core answered a read with an ERROR itself."""

    request_id: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Run:
    """Part of a completed read: zeros, or bytes at ``offset - read offset`` in its buffer."""

    offset: int
    length: int
    zero: bool


class Buffer(Protocol):
    """Where a read's bytes land: anything with a writable memoryview of its memory."""

    @property
    def view(self) -> memoryview: ...


class _PlainBuffer:
    __slots__ = ("view",)

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))


@dataclass(frozen=True, slots=True)
class ReadDone:
    """Client side: read ``request_id`` arrived whole and verified.

    ``buffer`` holds the data runs at their offset relative to the read
    (None when every run is zero); zero runs are not written there."""

    request_id: int
    offset: int
    length: int
    buffer: Buffer | None
    runs: tuple[Run, ...]


@dataclass(frozen=True, slots=True)
class ReadPiece:
    """Client side: one verified frame of a streamed read.

    ``length`` bytes at source ``offset``: zeros if ``buffer`` is None, else
    the first ``length`` bytes of ``buffer``. That buffer is reused for the
    next frame: it is valid only until the next call of ``next_event``. The
    read still ends with a :class:`ReadDone` (no buffer, no runs) or a
    :class:`ReadFailed`; pieces handed out before a failure were verified."""

    request_id: int
    offset: int
    length: int
    buffer: Buffer | None


@dataclass(frozen=True, slots=True)
class ReadFailed:
    """Client side: read ``request_id`` was refused, or its data failed verification."""

    request_id: int
    code: int
    message: str

    @property
    def reason(self) -> str:
        return ErrorCode.name_of(self.code)


@dataclass(frozen=True, slots=True)
class Pong:
    token: int


ServerEvent = Hello | Open | Read | ReadRefused
ClientEvent = Welcome | PeerError | Opened | OpenFailed | ReadDone | ReadPiece | ReadFailed | Pong


# -- helpers ----------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_u16(v: object) -> bool:
    return _is_int(v) and 1 <= v <= 0xFFFF  # type: ignore[operator]


def _check_text(what: str, v: object, limit: int) -> None:
    if not isinstance(v, str):
        raise LocalProtocolError(f"{what} must be a string")
    if len(v.encode("utf-8", "surrogatepass")) > limit:
        raise LocalProtocolError(f"{what} is longer than {limit} bytes")


def _clip(text: str, limit: int = MAX_TEXT) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[: limit - 3].decode("utf-8", "ignore").encode() + b"..."


def _frame(kind: FrameType, body: bytes | bytearray, flags: int = 0) -> bytes:
    return _HEADER.pack(kind, flags, 0, len(body)) + body


def _unpack_map(body: memoryview, what: str) -> dict[str, object]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=False)  # body ≤ MAX_CONTROL
    except Exception as e:  # msgpack raises a zoo of types for garbage
        raise RemoteProtocolError(f"{what}: body is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: body must be a msgpack map")
    return obj


def _get_int(m: dict[str, object], key: str, default: int, what: str) -> int:
    v = m.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise RemoteProtocolError(f"{what}: {key!r} must be an integer")
    return v


def _get_str(m: dict[str, object], key: str, default: str, what: str) -> str:
    v = m.get(key, default)
    if not isinstance(v, str):
        raise RemoteProtocolError(f"{what}: {key!r} must be a string")
    return v


def _strings(v: object, what: str) -> tuple[str, ...]:
    if not isinstance(v, tuple) or not all(isinstance(x, str) for x in v) or len(v) > 16:
        raise RemoteProtocolError(f"{what} must be a short list of strings")
    return v


def _text(body: memoryview, what: str) -> str:
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from None


def encode_hello(h: Hello) -> bytes:
    body = msgpack.packb(
        {
            "versions": list(h.versions),
            "role": h.role,
            "encodings": list(h.encodings),
            "agent": h.agent,
            "client": h.client,
        }
    )
    return _frame(FrameType.HELLO, body)


def encode_welcome(w: Welcome) -> bytes:
    body = msgpack.packb(
        {
            "version": w.version,
            "encodings": list(w.encodings),
            "max_inflight": w.max_inflight,
            "max_read": w.max_read,
            "agent": w.agent,
        }
    )
    return _frame(FrameType.WELCOME, body)


def encode_error(ident: int, code: int, message: str, *, for_handle: bool = False) -> bytes:
    return _frame(FrameType.ERROR, _ERROR.pack(ident, code) + _clip(message), ERROR_FOR_HANDLE if for_handle else 0)


def choose_version(offered: tuple[int, ...]) -> int | None:
    common = set(offered) & set(VERSIONS)
    return max(common) if common else None


# -- the receiving half both sides share ----------------------------------------------------


class _Connection:
    """Frame reassembly, shared by both sides.

    Incoming bytes land either in a scratch buffer (headers, control frames)
    or, once a DATA header has been parsed, straight in the payload's
    destination (``_target``): with ``get_buffer``/``buffer_updated`` a
    socket reads a read's bytes directly where they will be served from.
    """

    #: Frame types this side may receive.
    _accepts: frozenset[FrameType] = frozenset()

    def __init__(self) -> None:
        self._scratch = bytearray(_SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = 0  # first unparsed byte in scratch
        self._end = 0  # one past the last received byte in scratch
        self._target: memoryview | None = None
        self._target_pos = 0
        self._inbox: deque[bytes] = deque()
        self._eof = False
        self._broken: RemoteProtocolError | None = None
        self._got_preamble = False
        self._out: list[bytes | memoryview] = []
        self._events: deque[object] = deque()

    # -- receiving ---------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        else:
            self._inbox.append(bytes(data))

    def get_buffer(self) -> memoryview:
        """Writable memory for the next incoming bytes (never empty once
        :meth:`next_event` returned ``NEED_DATA``)."""
        if self._target is not None and self._start == self._end:
            return self._target[self._target_pos :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._scratch):
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, n: int) -> bool:
        """``n`` bytes were written into the last :meth:`get_buffer`.

        False while they only extend a payload that is still incomplete:
        then :meth:`next_event` would only say ``NEED_DATA``, and a caller
        receiving a megabyte in a few hundred kilobytes at a time may skip it.
        """
        if self._target is not None and self._start == self._end:
            self._target_pos += n
            return self._target_pos >= len(self._target) or bool(self._inbox)
        self._end += n
        return True

    def _pull_inbox(self) -> None:
        while self._inbox:
            if self._target is not None and self._start != self._end:
                return  # payload bytes in scratch go to their target first (``_step``)
            data = self._inbox[0]
            buf = self.get_buffer()
            if not len(buf):
                return  # a payload target is full: ``_step`` completes it first
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            self.buffer_updated(n)
            if n == len(data):
                self._inbox.popleft()
            else:
                self._inbox[0] = data[n:]
            if self._target is None and self._end - self._start >= len(self._scratch) - HEADER_SIZE:
                return  # scratch full of frames: parse before taking more

    def next_event(self) -> object:
        """The next event, ``NEED_DATA``, or ``CLOSED``; RemoteProtocolError on garbage."""
        if self._broken is not None:
            raise self._broken
        try:
            while True:
                if self._events:
                    return self._events.popleft()
                self._pull_inbox()
                progressed = self._step()
                if self._events:
                    return self._events.popleft()
                if not progressed:
                    if self._inbox:
                        continue
                    if self._eof:
                        if self._start == self._end and self._target is None and self._got_preamble:
                            return CLOSED
                        raise RemoteProtocolError("the connection closed in the middle of a frame")
                    return NEED_DATA
        except RemoteProtocolError as e:
            self._broken = e
            raise

    def _step(self) -> bool:
        """Parse what the buffers hold; False when more bytes are needed."""
        if self._target is not None:
            avail = self._end - self._start
            if avail:  # payload bytes that arrived with the header, in scratch
                n = min(avail, len(self._target) - self._target_pos)
                self._target[self._target_pos : self._target_pos + n] = self._view[self._start : self._start + n]
                self._target_pos += n
                self._start += n
            if self._target_pos < len(self._target):
                return False
            self._target = None
            self._payload_done()
            return True
        avail = self._end - self._start
        if not self._got_preamble:
            if avail < len(PREAMBLE):
                if self._view[self._start : self._end] != PREAMBLE[:avail]:
                    raise RemoteProtocolError(self._bad_preamble(bytes(self._view[self._start : self._end])))
                return False
            got = bytes(self._view[self._start : self._start + len(PREAMBLE)])
            if got != PREAMBLE:
                raise RemoteProtocolError(self._bad_preamble(got))
            self._start += len(PREAMBLE)
            self._got_preamble = True
            return True
        if avail < HEADER_SIZE:
            return False
        kind_, flags, reserved, length = _HEADER.unpack_from(self._scratch, self._start)
        try:
            kind = FrameType(kind_)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {kind_}") from None
        if kind not in self._accepts:
            raise RemoteProtocolError(f"unexpected {kind.name} frame")
        if reserved:
            raise RemoteProtocolError(f"{kind.name} frame with reserved bits set")
        if kind == FrameType.DATA:
            if length < _DATA.size or length > _DATA.size + MAX_PAYLOAD:
                raise RemoteProtocolError(f"DATA frame body of {length} bytes")
            if avail < HEADER_SIZE + _DATA.size:
                return False
            head = self._view[self._start + HEADER_SIZE : self._start + HEADER_SIZE + _DATA.size]
            self._start += HEADER_SIZE + _DATA.size
            self._data_header(flags, head, length - _DATA.size)
            return True
        if length > MAX_CONTROL:
            raise RemoteProtocolError(f"{kind.name} frame body of {length} bytes (limit {MAX_CONTROL})")
        if avail < HEADER_SIZE + length:
            return False
        body = self._view[self._start + HEADER_SIZE : self._start + HEADER_SIZE + length]
        self._start += HEADER_SIZE + length
        self._control(kind, flags, body)
        return True

    def _bad_preamble(self, got: bytes) -> str:
        if got[:1] in (b"\x15", b"\x16"):
            return "the peer speaks TLS but this side does not (configure TLS on both sides)"
        return f"the peer is not a lazypaged peer (it sent {got[:8]!r})"

    def _control(self, kind: FrameType, flags: int, body: memoryview) -> None:
        raise NotImplementedError

    def _data_header(self, flags: int, head: memoryview, payload: int) -> None:
        raise RemoteProtocolError("unexpected DATA frame")

    def _payload_done(self) -> None:
        raise NotImplementedError

    def _set_target(self, view: memoryview) -> None:
        if len(view):
            self._target, self._target_pos = view, 0
        else:
            self._payload_done()

    # -- sending -----------------------------------------------------------------------
    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the peer, in order; the caller writes it all."""
        out, self._out = self._out, []
        return out


# -- server side --------------------------------------------------------------------------


@dataclass(slots=True)
class _Serving:
    handle: int
    end: int
    cursor: int


class ServerConnection(_Connection):
    """The exporting side of one connection.

    Answer each :class:`Open` (``opened``/``refuse_open``) before asking for
    the next event: reads that follow it on the wire are checked against the
    size given there. :class:`Read` events are always in bounds of an open
    handle; answer each with ``send_zero``/``send_data``/``send_compressed``
    covering it in order, or with ``fail_read``.
    """

    _accepts = frozenset({FrameType.HELLO, FrameType.OPEN, FrameType.READ, FrameType.PING})

    def __init__(self, *, max_inflight: int = DEFAULT_MAX_INFLIGHT, encodings: tuple[str, ...] = ENCODINGS) -> None:
        super().__init__()
        self._out.append(PREAMBLE)
        self.max_inflight = max_inflight
        self._encodings = encodings
        self.hello: Hello | None = None
        self.version = 0
        self.encodings: tuple[str, ...] = ()
        self._pending_open: int | None = None
        self._handles: dict[int, int] = {}  # handle → export size
        self._reads: dict[int, _Serving] = {}

    @property
    def inflight(self) -> int:
        return len(self._reads)

    def _control(self, kind: FrameType, flags: int, body: memoryview) -> None:
        if flags:
            raise RemoteProtocolError(f"{kind.name} frame with unknown flags {flags:#x}")
        if kind == FrameType.HELLO:
            self._on_hello(body)
            return
        if self.hello is None:
            raise RemoteProtocolError(f"{kind.name} before HELLO")
        if self._pending_open is not None:
            raise LocalProtocolError("the previous Open was not answered before reading on")
        if kind == FrameType.OPEN:
            if len(body) < _OPEN.size or len(body) > _OPEN.size + MAX_NAME:
                raise RemoteProtocolError(f"OPEN body of {len(body)} bytes")
            (handle,) = _OPEN.unpack_from(body)
            name = _text(body[_OPEN.size :], "export name")
            if handle in self._handles:
                self._out.append(
                    encode_error(handle, ErrorCode.BAD_REQUEST, f"handle {handle} is already open", for_handle=True)
                )
            elif len(self._handles) >= MAX_HANDLES:
                self._out.append(
                    encode_error(handle, ErrorCode.BUSY, f"more than {MAX_HANDLES} open exports", for_handle=True)
                )
            else:
                self._pending_open = handle
                self._events.append(Open(handle, name))
        elif kind == FrameType.READ:
            if len(body) != _READ.size:
                raise RemoteProtocolError(f"READ body of {len(body)} bytes")
            rid, handle, offset, length, reserved = _READ.unpack(body)
            if reserved:
                raise RemoteProtocolError("READ with reserved field set")
            self._on_read(rid, handle, offset, length)
        elif kind == FrameType.PING:
            if len(body) != _PING.size:
                raise RemoteProtocolError(f"PING body of {len(body)} bytes")
            self._out.append(_frame(FrameType.PONG, bytes(body)))

    def _on_hello(self, body: memoryview) -> None:
        if self.hello is not None:
            raise RemoteProtocolError("second HELLO")
        m = _unpack_map(body, "HELLO")
        versions = m.get("versions")
        if (
            not isinstance(versions, tuple)
            or not versions
            or len(versions) > 64
            or not all(_is_u16(v) for v in versions)
        ):
            raise RemoteProtocolError("HELLO: 'versions' must be a list of protocol versions")
        role = _get_str(m, "role", "", "HELLO")
        if role not in ROLES:
            raise RemoteProtocolError(f"HELLO: unknown role {role!r}")
        enc = _strings(m.get("encodings", ()), "HELLO encodings")
        agent = _get_str(m, "agent", "", "HELLO")
        client = _get_str(m, "client", "", "HELLO")
        offered = tuple(int(v) for v in versions)
        version = choose_version(offered)
        if version is None:
            raise RemoteProtocolError(
                f"no common protocol version: this server speaks {list(VERSIONS)}, the client offered {list(versions)}",
                ErrorCode.VERSION,
            )
        try:
            self.hello = Hello(offered, role, enc, agent[:MAX_NAME], client)
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"HELLO: {e}") from None
        self.version = version
        self.encodings = tuple(e for e in enc if e in self._encodings)
        self._out.append(encode_welcome(Welcome(version, self.encodings, self.max_inflight, MAX_READ, "lazypaged")))
        self._events.append(self.hello)

    def _on_read(self, rid: int, handle: int, offset: int, length: int) -> None:
        if rid in self._reads:
            raise RemoteProtocolError(f"request id {rid} is already in flight")
        if len(self._reads) >= self.max_inflight:
            raise RemoteProtocolError(f"more than {self.max_inflight} reads in flight", ErrorCode.BUSY)
        size = self._handles.get(handle)
        if size is None:
            self._refuse(rid, ErrorCode.BAD_REQUEST, f"handle {handle} is not open")
        elif length == 0 or length > MAX_READ:
            self._refuse(rid, ErrorCode.BAD_REQUEST, f"read length {length} outside 1…{MAX_READ}")
        elif offset + length > size:
            self._refuse(
                rid,
                ErrorCode.OUT_OF_BOUNDS,
                f"read {offset:#x}+{length:#x} runs past the end of the export ({size:#x} bytes)",
            )
        else:
            self._reads[rid] = _Serving(handle, offset + length, offset)
            self._events.append(Read(rid, handle, offset, length))

    def _refuse(self, rid: int, code: ErrorCode, message: str) -> None:
        self._out.append(encode_error(rid, code, message))
        self._events.append(ReadRefused(rid, code, message))

    # -- answers ------------------------------------------------------------------------
    def opened(self, handle: int, size: int, identity: bytes) -> None:
        if self._pending_open != handle:
            raise LocalProtocolError(f"handle {handle} has no Open waiting for an answer")
        if not (0 <= size < 1 << 63) or len(identity) != 16:
            raise LocalProtocolError("opened: size out of range or identity not 16 bytes")
        self._pending_open = None
        self._handles[handle] = size
        self._out.append(_frame(FrameType.OPENED, _OPENED.pack(handle, 0, size, identity)))

    def refuse_open(self, handle: int, code: ErrorCode, message: str) -> None:
        if self._pending_open != handle:
            raise LocalProtocolError(f"handle {handle} has no Open waiting for an answer")
        self._pending_open = None
        self._out.append(encode_error(handle, code, message, for_handle=True))

    def _serving(self, rid: int, length: int) -> _Serving:
        r = self._reads.get(rid)
        if r is None:
            raise LocalProtocolError(f"request {rid} is not in flight")
        if not 0 < length <= min(r.end - r.cursor, MAX_DATA):
            raise LocalProtocolError(f"{length} bytes for request {rid}, which has {r.end - r.cursor} left")
        return r

    def _advance(self, rid: int, r: _Serving, length: int) -> None:
        r.cursor += length
        if r.cursor == r.end:
            del self._reads[rid]

    def remaining(self, rid: int) -> int:
        r = self._reads.get(rid)
        return 0 if r is None else r.end - r.cursor

    def send_zero(self, rid: int, length: int) -> None:
        """The next ``length`` bytes of read ``rid`` are zeros."""
        while length:
            n = min(length, MAX_DATA)
            r = self._serving(rid, n)
            self._out.append(_frame(FrameType.DATA, _DATA.pack(rid, n, r.cursor, zero_digest(n)), DATA_ZERO))
            self._advance(rid, r, n)
            length -= n

    def send_data(self, rid: int, data: bytes | bytearray | memoryview, *, frame: int = DATA_FRAME) -> None:
        """The next bytes of read ``rid``, sent as they are (``data`` is referenced,
        not copied: keep it unchanged until written), in frames of ``frame`` bytes."""
        if not 0 < frame <= MAX_DATA:
            raise LocalProtocolError(f"frame size {frame} outside 1…{MAX_DATA}")
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), frame):
            piece = view[pos : pos + frame]
            r = self._serving(rid, len(piece))
            head = _DATA.pack(rid, len(piece), r.cursor, checksum(piece))
            self._out.append(_HEADER.pack(FrameType.DATA, 0, 0, _DATA.size + len(piece)) + head)
            self._out.append(piece)
            self._advance(rid, r, len(piece))

    def send_compressed(self, rid: int, length: int, frame: bytes, digest: bytes) -> None:
        """The next ``length`` bytes of read ``rid`` as one zstd frame; ``digest``
        is the checksum of the uncompressed bytes. Only if the client accepted zstd."""
        if "zstd" not in self.encodings:
            raise LocalProtocolError("the client did not accept zstd")
        if not 0 < len(frame) <= MAX_PAYLOAD or len(digest) != 16:
            raise LocalProtocolError("compressed frame too large or bad digest")
        r = self._serving(rid, length)
        head = _DATA.pack(rid, length, r.cursor, digest)
        self._out.append(_HEADER.pack(FrameType.DATA, DATA_ZSTD, 0, _DATA.size + len(frame)) + head)
        self._out.append(frame)
        self._advance(rid, r, length)

    def fail_read(self, rid: int, code: ErrorCode, message: str) -> None:
        """Refuse read ``rid`` (even after part of it was sent)."""
        if self._reads.pop(rid, None) is None:
            raise LocalProtocolError(f"request {rid} is not in flight")
        self._out.append(encode_error(rid, code, message))

    def fatal(self, code: ErrorCode, message: str) -> None:
        """Queue a connection-level ERROR; close after sending it."""
        self._out.append(encode_error(0, code, message))


# -- client side ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Reading:
    offset: int
    length: int
    cursor: int
    buffer: Buffer | None = None
    runs: list[Run] = field(default_factory=list)
    failed: bool = False
    stream: bool = False


@dataclass(slots=True)
class _Incoming:
    rid: int
    offset: int
    length: int
    flags: int
    digest: bytes
    payload: int


class ClientConnection(_Connection):
    """The reading side of one connection.

    ``alloc(n)`` gives the buffer a read's bytes land in (default: a fresh
    bytearray); a source can pass a pool. Send nothing but the HELLO before
    :class:`Welcome` arrived: the version is not known until then.
    """

    _accepts = frozenset({FrameType.WELCOME, FrameType.ERROR, FrameType.OPENED, FrameType.DATA, FrameType.PONG})

    def __init__(
        self,
        role: str,
        *,
        encodings: tuple[str, ...] = ENCODINGS,
        versions: tuple[int, ...] = VERSIONS,
        alloc: Callable[[int], Buffer] = _PlainBuffer,
        agent: str = "lazypaged",
        client: str = "",
    ) -> None:
        super().__init__()
        self._alloc = alloc
        self.welcome: Welcome | None = None
        self.closed_by_peer: PeerError | None = None
        self._reads: dict[int, _Reading] = {}
        self._next_id = 1
        self._incoming: _Incoming | None = None
        self._dctx: zstandard.ZstdDecompressor | None = None
        self._zbuf = bytearray()
        self._piece: Buffer | None = None  # streamed reads' frames land here, one at a time
        self._opening: dict[int, int] = {}  # handle → OPENs not answered yet
        self._hello = Hello(versions, role, encodings, agent, client)
        self._out += [PREAMBLE, encode_hello(self._hello)]

    @property
    def inflight(self) -> int:
        return len(self._reads)

    @property
    def max_inflight(self) -> int:
        return self.welcome.max_inflight if self.welcome else 0

    # -- requests ----------------------------------------------------------------------
    def open(self, handle: int, name: str) -> None:
        self._ready()
        if not 0 <= handle <= _U32:
            raise LocalProtocolError(f"handle {handle} out of range")
        raw = name.encode("utf-8")
        if not raw or len(raw) > MAX_NAME:
            raise LocalProtocolError(f"export name must be 1…{MAX_NAME} bytes")
        self._out.append(_frame(FrameType.OPEN, _OPEN.pack(handle) + raw))
        self._opening[handle] = self._opening.get(handle, 0) + 1

    def _answered(self, handle: int, what: str) -> None:
        """An OPEN of ``handle`` was answered. An answer nobody asked for is
        not trusted: a damaged DATA frame can look like an ERROR for a
        handle, and taken as a refusal it would end every read of a healthy
        export."""
        n = self._opening.get(handle, 0)
        if not n:
            raise RemoteProtocolError(f"{what} for handle {handle}, which has no OPEN pending")
        if n == 1:
            del self._opening[handle]
        else:
            self._opening[handle] = n - 1

    def read(self, handle: int, offset: int, length: int, *, stream: bool = False) -> int:
        """Queue a READ; returns its request id. ``stream``: hand out each
        verified frame as a :class:`ReadPiece` (see there)."""
        w = self._ready()
        if not 0 < length <= w.max_read:
            raise LocalProtocolError(f"read length {length} outside 1…{w.max_read}")
        if not 0 <= offset < 1 << 63 or not 0 <= handle <= _U32:
            raise LocalProtocolError("read offset or handle out of range")
        if len(self._reads) >= w.max_inflight:
            raise LocalProtocolError(f"already {w.max_inflight} reads in flight")
        rid = self._next_id
        while rid in self._reads or rid == 0:
            rid = (rid + 1) & _U32
        self._next_id = (rid + 1) & _U32
        self._reads[rid] = _Reading(offset, length, offset, stream=stream)
        self._out.append(_frame(FrameType.READ, _READ.pack(rid, handle, offset, length, 0)))
        return rid

    def ping(self, token: int) -> None:
        self._ready()
        self._out.append(_frame(FrameType.PING, _PING.pack(token & ((1 << 64) - 1))))

    def _ready(self) -> Welcome:
        if self.welcome is None:
            raise LocalProtocolError("the handshake has not completed")
        return self.welcome

    def pending(self) -> list[int]:
        return list(self._reads)

    # -- receiving -----------------------------------------------------------------------
    def _control(self, kind: FrameType, flags: int, body: memoryview) -> None:
        if kind == FrameType.WELCOME:
            if self.welcome is not None:
                raise RemoteProtocolError("second WELCOME")
            self._on_welcome(body)
            return
        if kind == FrameType.ERROR:
            # Strict: a damaged DATA frame can parse as an ERROR, and a read
            # failed for a reason the exporter never gave is worse than a
            # dropped connection (which sends the read again).
            if len(body) < _ERROR.size or len(body) > _ERROR.size + MAX_TEXT:
                raise RemoteProtocolError(f"ERROR body of {len(body)} bytes")
            ident, code = _ERROR.unpack_from(body)
            if code not in _SENT_CODES:
                raise RemoteProtocolError(f"ERROR with code {code}, which no exporter sends")
            try:
                text = bytes(body[_ERROR.size :]).decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("ERROR text that is not UTF-8") from None
            if flags & ~ERROR_FOR_HANDLE:
                raise RemoteProtocolError(f"ERROR frame with unknown flags {flags:#x}")
            if flags & ERROR_FOR_HANDLE:
                self._answered(ident, "ERROR")
                self._events.append(OpenFailed(ident, code, text))
            elif ident == 0:
                self.closed_by_peer = PeerError(code, text)
                self._events.append(self.closed_by_peer)
            else:
                r = self._reads.pop(ident, None)
                if r is None:
                    raise RemoteProtocolError(f"ERROR for request {ident}, which is not in flight")
                if not r.failed:
                    self._events.append(ReadFailed(ident, code, text))
            return
        if self.welcome is None:
            raise RemoteProtocolError(f"{kind.name} before WELCOME")
        if flags:
            raise RemoteProtocolError(f"{kind.name} frame with unknown flags {flags:#x}")
        if kind == FrameType.OPENED:
            if len(body) != _OPENED.size:
                raise RemoteProtocolError(f"OPENED body of {len(body)} bytes")
            handle, _reserved, size, ident = _OPENED.unpack(body)
            if size >= 1 << 63:
                raise RemoteProtocolError("OPENED with an impossible size")
            self._answered(handle, "OPENED")
            self._events.append(Opened(handle, size, ident))
        elif kind == FrameType.PONG:
            if len(body) != _PING.size:
                raise RemoteProtocolError(f"PONG body of {len(body)} bytes")
            self._events.append(Pong(_PING.unpack(body)[0]))

    def _on_welcome(self, body: memoryview) -> None:
        m = _unpack_map(body, "WELCOME")
        version = _get_int(m, "version", 0, "WELCOME")
        enc = _strings(m.get("encodings", ()), "WELCOME encodings")
        inflight = _get_int(m, "max_inflight", DEFAULT_MAX_INFLIGHT, "WELCOME")
        max_read = _get_int(m, "max_read", MAX_READ, "WELCOME")
        agent = _get_str(m, "agent", "", "WELCOME")
        if version not in self._hello.versions:
            raise RemoteProtocolError(f"the server chose version {version}, which was not offered", ErrorCode.VERSION)
        bad = [e for e in enc if e not in self._hello.encodings]
        if bad:
            raise RemoteProtocolError(f"the server chose encodings that were not offered: {bad}")
        try:
            self.welcome = Welcome(version, enc, inflight, min(max_read, MAX_READ), agent[:MAX_NAME])
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"WELCOME: {e}") from None
        self._events.append(self.welcome)

    def _data_header(self, flags: int, head: memoryview, payload: int) -> None:
        if self.welcome is None:
            raise RemoteProtocolError("DATA before WELCOME")
        rid, length, offset, digest = _DATA.unpack(head)
        r = self._reads.get(rid)
        if r is None:
            raise RemoteProtocolError(f"DATA for request {rid}, which is not in flight")
        if flags not in (0, DATA_ZERO, DATA_ZSTD):
            raise RemoteProtocolError(f"DATA frame with flags {flags:#x}")
        if offset != r.cursor:
            raise RemoteProtocolError(f"DATA for request {rid} at {offset:#x}, expected {r.cursor:#x}")
        if not 0 < length <= min(MAX_DATA, r.offset + r.length - r.cursor):
            raise RemoteProtocolError(
                f"DATA of {length} bytes for request {rid} with {r.offset + r.length - r.cursor} left"
            )
        if flags == DATA_ZSTD and "zstd" not in self.welcome.encodings:
            raise RemoteProtocolError("compressed DATA although zstd was not agreed")
        if flags == DATA_ZERO and payload:
            raise RemoteProtocolError("zero DATA frame with a payload")
        if flags == 0 and payload != length:
            raise RemoteProtocolError(f"DATA frame of {length} bytes with a payload of {payload}")
        if flags == DATA_ZSTD and payload == 0:
            raise RemoteProtocolError("compressed DATA frame without a payload")
        self._incoming = _Incoming(rid, offset, length, flags, bytes(digest), payload)
        if flags == DATA_ZERO:
            self._payload_done()
        elif flags == DATA_ZSTD:
            if len(self._zbuf) < payload:
                self._zbuf = bytearray(payload)
            self._set_target(memoryview(self._zbuf)[:payload])
        else:
            self._set_target(self._slice(r, offset, length))

    def _slice(self, r: _Reading, offset: int, length: int) -> memoryview:
        if r.stream:
            if self._piece is None or len(self._piece.view) < length:
                self._piece = self._alloc(max(length, BULK_FRAME))
            return self._piece.view[:length]
        if r.buffer is None:
            r.buffer = self._alloc(r.length)
        start = offset - r.offset
        return r.buffer.view[start : start + length]

    def _payload_done(self) -> None:
        inc, self._incoming = self._incoming, None
        assert inc is not None
        r = self._reads[inc.rid]
        r.cursor += inc.length
        if not r.failed:
            problem = self._verify(r, inc)
            if problem:
                r.failed = True
                self._events.append(ReadFailed(inc.rid, ErrorCode.CORRUPT, problem))
            elif r.stream:
                piece = None if inc.flags == DATA_ZERO else self._piece
                self._events.append(ReadPiece(inc.rid, inc.offset, inc.length, piece))
            else:
                zero = inc.flags == DATA_ZERO
                rel = inc.offset - r.offset
                if r.runs and r.runs[-1].zero == zero and r.runs[-1].offset + r.runs[-1].length == rel:
                    r.runs[-1] = Run(r.runs[-1].offset, r.runs[-1].length + inc.length, zero)
                else:
                    r.runs.append(Run(rel, inc.length, zero))
        if r.cursor == r.offset + r.length:
            del self._reads[inc.rid]
            if not r.failed:
                self._events.append(ReadDone(inc.rid, r.offset, r.length, r.buffer, tuple(r.runs)))

    def _verify(self, r: _Reading, inc: _Incoming) -> str:
        if inc.flags == DATA_ZERO:
            if inc.digest != zero_digest(inc.length):
                return f"zero DATA for {inc.offset:#x}+{inc.length:#x}: checksum mismatch (the length was damaged)"
            return ""
        dst = self._slice(r, inc.offset, inc.length)
        where = f"DATA for {inc.offset:#x}+{inc.length:#x}"
        if inc.flags == DATA_ZSTD:
            problem = self._decompress(memoryview(self._zbuf)[: inc.payload], dst)
            if problem:
                return f"{where}: {problem}"
        got = checksum(dst)
        if got != inc.digest:
            return f"{where}: checksum mismatch (xxh3-128 {got.hex()}, sent {inc.digest.hex()})"
        return ""

    def _decompress(self, frame: memoryview, dst: memoryview) -> str:
        if self._dctx is None:
            self._dctx = zstandard.ZstdDecompressor()
        try:
            params = zstandard.get_frame_parameters(frame)
            if params.content_size != len(dst):
                return f"zstd frame declares {params.content_size} bytes"
            n = 0
            with self._dctx.stream_reader(frame) as rd:
                while n < len(dst):
                    k = rd.readinto(dst[n:])
                    if not k:
                        break
                    n += k
                extra = len(rd.read(1))
        except zstandard.ZstdError as e:
            return f"zstd: {e}"
        if n != len(dst) or extra:
            return f"zstd frame decoded to {n + extra} bytes"
        return ""
