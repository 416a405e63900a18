"""A TCP relay that corrupts what an exporter sends, for the reliability tests.

Sits on loopback between a restoring daemon (which dials the relay's port
as its ``peer://``) and an exporter, over plaintext: with TLS a flipped
byte would only break the record's MAC and the connection, never reach the
peer protocol's own checks. Bytes from the reader pass unchanged. The
exporter's stream is cut into frames (8-byte preamble, then 8-byte header
and body, see lazypaged/peer_protocol.py) and forwarded frame by frame, so
a :class:`Corruptor` can change one DATA frame and leave the rest alone. The
relay always splits on the *original* lengths: a flip in a length field
desynchronises the reader, not the relay. Each connection's role (urgent or
bulk) is read from the reader's HELLO, so corruption can be aimed at the
fill's reads only.

DATA body: request id (u32), length (u32), offset (u64), checksum (16
bytes), then the payload (raw bytes, or one zstd frame when the flags say
so; none for a zero range).
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import msgpack

HEADER = struct.Struct("<BBHI")
DATA_HEAD = struct.Struct("<IIQ16s")
PREAMBLE_LEN = 8
DATA = 7
DATA_ZERO = 1


@dataclass(frozen=True)
class Flip:
    """One change made to a DATA frame: where in the image it was bound, and
    which byte of the frame (header included) was changed."""

    offset: int
    length: int
    flags: int
    position: int
    mask: int


class Corruptor:
    """Decides, per DATA frame, whether and where to flip. Subclasses override
    :meth:`choose`; returning None leaves the frame alone."""

    #: Only frames on connections of this role ("urgent", "bulk"); "": all.
    role = ""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.flips: list[Flip] = []
        self.data_frames = 0
        self.active = True

    def choose(self, offset: int, length: int, flags: int, frame_len: int) -> tuple[int, int] | None:
        raise NotImplementedError

    def apply(self, frame: bytearray, role: str) -> None:
        _, flags, _, _ = HEADER.unpack_from(frame)
        _, length, offset, _ = DATA_HEAD.unpack_from(frame, HEADER.size)
        with self.lock:
            self.data_frames += 1
            wanted = self.active and (not self.role or role == self.role)
            pick = self.choose(offset, length, flags, len(frame)) if wanted else None
            if pick is None:
                return
            pos, mask = pick
            frame[pos] ^= mask
            self.flips.append(Flip(offset, length, flags, pos, mask))


PAYLOAD_AT = HEADER.size + DATA_HEAD.size
#: Byte ranges of a DATA frame, by field.
FIELDS = (("type", 0, 1), ("flags", 1, 2), ("reserved", 2, 4), ("body_length", 4, 8), ("request_id", 8, 12),
          ("length", 12, 16), ("offset", 16, 24), ("checksum", 24, 40))


def field_of(flip: Flip) -> str:
    """Which field of its DATA frame a flip changed ("payload" past the headers)."""
    for name, lo, hi in FIELDS:
        if lo <= flip.position < hi:
            return name
    return "payload"


class FlipOnce(Corruptor):
    """One bit of the payload of the ``nth`` DATA frame that has a payload."""

    def __init__(self, nth: int = 3) -> None:
        super().__init__()
        self.nth = nth
        self.seen = 0

    def choose(self, offset: int, length: int, flags: int, frame_len: int) -> tuple[int, int] | None:
        if flags & DATA_ZERO or frame_len <= PAYLOAD_AT:
            return None
        self.seen += 1
        if self.seen != self.nth:
            return None
        return PAYLOAD_AT + (frame_len - PAYLOAD_AT) // 2, 0x10


class FlipRange(Corruptor):
    """A bit in every payload that carries bytes of image range [lo, hi), for
    as long as :attr:`active` is set: re-reads of that range fail too. With
    ``role``, only on connections of that role (``bulk``: the fill's reads)."""

    def __init__(self, lo: int, hi: int, role: str = "") -> None:
        super().__init__()
        self.lo, self.hi, self.role = lo, hi, role

    def choose(self, offset: int, length: int, flags: int, frame_len: int) -> tuple[int, int] | None:
        if flags & DATA_ZERO or frame_len <= PAYLOAD_AT or offset >= self.hi or offset + length <= self.lo:
            return None
        if flags == 0:  # raw: hit a byte of the range itself
            return PAYLOAD_AT + max(self.lo - offset, 0), 0x01
        return PAYLOAD_AT + (frame_len - PAYLOAD_AT) // 2, 0x01


class StallBulk(Corruptor):
    """Changes nothing: holds the first ``frames`` DATA frames of the bulk
    connection for ``seconds`` each, as a link busy with megabytes of fill
    would. Pages of those reads stay in flight meanwhile."""

    role = "bulk"

    def __init__(self, seconds: float, frames: int = 1) -> None:
        super().__init__()
        self.seconds = seconds
        self.frames = frames
        self.stalled = 0

    def choose(self, offset: int, length: int, flags: int, frame_len: int) -> tuple[int, int] | None:
        return None

    def apply(self, frame: bytearray, role: str) -> None:
        with self.lock:
            self.data_frames += 1
            hold = role == self.role and self.stalled < self.frames
            if hold:
                self.stalled += 1
        if hold:
            time.sleep(self.seconds)


class FlipRandom(Corruptor):
    """With probability ``rate``, one random bit anywhere in a DATA frame
    (frame header, DATA header or payload), at most ``limit`` times. The
    checksum of a zero frame is left alone: it covers no bytes."""

    def __init__(self, rate: float, limit: int, seed: int) -> None:
        super().__init__()
        self.rate, self.limit = rate, limit
        self.rng = random.Random(seed)

    def choose(self, offset: int, length: int, flags: int, frame_len: int) -> tuple[int, int] | None:
        if len(self.flips) >= self.limit or self.rng.random() >= self.rate:
            return None
        span = 24 if flags & DATA_ZERO else frame_len
        return self.rng.randrange(span), 1 << self.rng.randrange(8)


def _read_exact(s: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if not k:
            return None
        got += k
    return buf


class _Conn:
    """What the reader said about one connection: its role, from its HELLO
    (preamble, frame header, msgpack map)."""

    def __init__(self) -> None:
        self.role = ""
        self.known = threading.Event()

    def learn(self, head: bytearray) -> None:
        start = PREAMBLE_LEN + HEADER.size
        if len(head) < start:
            return
        _, _, _, n = HEADER.unpack_from(head, PREAMBLE_LEN)
        if len(head) < start + n:
            return
        try:
            hello = msgpack.unpackb(bytes(head[start : start + n]))
            self.role = str(hello.get("role", "")) if isinstance(hello, dict) else ""
        except (ValueError, msgpack.UnpackException):
            self.role = ""
        self.known.set()


@dataclass
class Relay:
    """Listens on 127.0.0.1 (a free port), forwards to ``upstream``."""

    upstream: tuple[str, int]
    corruptor: Corruptor
    connections: int = 0
    _sock: socket.socket = field(init=False)
    _open: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _closed: bool = False

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._spawn(self._accept)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._open += [down, up]
            self.connections += 1
            conn = _Conn()
            self._spawn(self._pass, down, up, conn)
            self._spawn(self._frames, up, down, conn)

    def _pass(self, src: socket.socket, dst: socket.socket, conn: _Conn) -> None:
        with contextlib.suppress(OSError):
            head = bytearray()
            while not conn.known.is_set() and (data := src.recv(1 << 16)):
                dst.sendall(data)
                head += data
                conn.learn(head)
            conn.known.set()
            while data := src.recv(1 << 16):
                dst.sendall(data)
        conn.known.set()
        self._drop(src, dst)

    def _frames(self, src: socket.socket, dst: socket.socket, conn: _Conn) -> None:
        try:
            pre = _read_exact(src, PREAMBLE_LEN)
            if pre is None:
                return
            dst.sendall(pre)
            while (head := _read_exact(src, HEADER.size)) is not None:
                ftype, _, _, n = HEADER.unpack(head)
                body = _read_exact(src, n) if n else bytearray()
                if body is None:
                    return
                frame = head + body
                if ftype == DATA and n >= DATA_HEAD.size:
                    conn.known.wait(5)
                    self.corruptor.apply(frame, conn.role)
                dst.sendall(frame)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    @staticmethod
    def _drop(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._drop(*self._open)
        for t in self._threads:
            t.join(timeout=5)
        for s in self._open:
            s.close()
