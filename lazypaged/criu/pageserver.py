"""CRIU's page-server protocol, client side, without I/O.

A lazy-pages daemon asks the page server of ``criu dump --lazy-pages`` for
pages with GET requests and reads the replies; at the end it sends CLOSE and
waits for the server's acknowledgement. Everything is a fixed header in the
*native* byte order (the two hosts share an architecture), with no version
negotiation, in one of two layouts:

* CRIU 4.1 and earlier, 24 bytes: ``u32 cmd, u32 nr_pages, u64 vaddr, u64 dst_id``
* CRIU 4.2 and later, 32 bytes: ``u32 cmd, u32 pad, u64 nr_pages, u64 vaddr, u64 dst_id``

``cmd`` is a command code in its low 16 bits and flags above. A GET names
the image pid (``dst_id``), the dump-time address and a page count; the
reply is an ADD_F header with the PRESENT flag echoing address and pid,
possibly with *fewer* pages than asked (the server stops at the end of one
of its buffers), followed by that many pages of data. Replies come in
request order. CLOSE is answered with an int32 0.

Rules of this file: :class:`ReplyParser` only ever consumes bytes it was
given; anything the server sends that does not match what was asked is a
:class:`ServerProtocolError`; asking for something invalid is a
:class:`ClientProtocolError`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

PAGE = 4096

PS_IOV_ADD = 1
PS_IOV_HOLE = 2
PS_IOV_OPEN = 3
PS_IOV_OPEN2 = 4
PS_IOV_PARENT = 5
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_BITS = 16
PS_CMD_MASK = (1 << PS_CMD_BITS) - 1
PE_PRESENT = 4

#: Header layouts by CRIU version family.
LAYOUTS = {"4.1": struct.Struct("=IIQQ"), "4.2": struct.Struct("=IIQQQ")}
_CLOSE_ACK = struct.Struct("=i")
#: Largest reply accepted: CRIU sends at most one pipe buffer (a few MiB) per
#: reply, and never more than asked; this bounds a broken server's claim.
MAX_REPLY_PAGES = 1 << 20


class ProtocolError(Exception):
    """Base of page-server protocol errors."""


class ServerProtocolError(ProtocolError):
    """The page server sent something that is not a valid reply."""


class ClientProtocolError(ProtocolError):
    """We were asked to send something the protocol cannot express."""


def encode(layout: str, cmd: int, nr_pages: int, vaddr: int, dst_id: int, flags: int = 0) -> bytes:
    st = LAYOUTS[layout]
    word = (flags << PS_CMD_BITS) | cmd
    if layout == "4.1":
        if not 0 <= nr_pages < 1 << 32:
            raise ClientProtocolError(f"{nr_pages} pages do not fit the 4.1 header")
        return st.pack(word, nr_pages, vaddr, dst_id)
    return st.pack(word, 0, nr_pages, vaddr, dst_id)


def encode_get(layout: str, pid: int, vaddr: int, nr_pages: int) -> bytes:
    if nr_pages <= 0 or vaddr % PAGE or pid <= 0:
        raise ClientProtocolError(f"invalid GET: pid {pid}, {nr_pages} pages at {vaddr:#x}")
    return encode(layout, PS_IOV_GET, nr_pages, vaddr, pid)


def encode_close(layout: str) -> bytes:
    return encode(layout, PS_IOV_CLOSE, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Header:
    cmd: int
    flags: int
    nr_pages: int
    vaddr: int
    dst_id: int


def decode_header(layout: str, data: bytes | bytearray | memoryview) -> Header:
    st = LAYOUTS[layout]
    if layout == "4.1":
        word, nr, vaddr, dst = st.unpack(data)
    else:
        word, _pad, nr, vaddr, dst = st.unpack(data)
    return Header(word & PS_CMD_MASK, word >> PS_CMD_BITS, nr, vaddr, dst)


@dataclass(frozen=True, slots=True)
class Pending:
    """A GET sent and not yet answered."""

    pid: int
    vaddr: int
    nr_pages: int


class ReplyParser:
    """Follows the reply stream of one connection.

    The caller registers each request with :meth:`sent` in the order it was
    written, then alternately asks :meth:`need` how many bytes the parser
    wants next and what for, and hands them over: a reply's header goes
    through :meth:`header` (which says how many page bytes follow), the page
    bytes are the caller's to read straight into its own buffer, and
    :meth:`payload_done` closes the reply. This lets the I/O layer receive
    pages directly where UFFDIO_COPY will read them.
    """

    def __init__(self, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ClientProtocolError(f"unknown header layout {layout!r}")
        self.layout = layout
        self.header_size = LAYOUTS[layout].size
        self.pending: deque[Pending] = deque()
        self.closing = False
        self._current: tuple[Pending, Header] | None = None

    def sent(self, req: Pending) -> None:
        if self.closing:
            raise ClientProtocolError("request after CLOSE")
        self.pending.append(req)

    def sent_close(self) -> None:
        self.closing = True

    @property
    def in_payload(self) -> bool:
        return self._current is not None

    def need(self) -> int:
        """Bytes of the next header (or of the CLOSE acknowledgement)."""
        if self.pending:
            return self.header_size
        if self.closing:
            return _CLOSE_ACK.size
        return 0

    def header(self, data: bytes | bytearray | memoryview) -> tuple[Pending, Header]:
        """Check the header of the reply to the oldest pending request."""
        if self._current is not None:
            raise ClientProtocolError("header fed while a payload is outstanding")
        if not self.pending:
            raise ServerProtocolError("the page server sent a reply nobody asked for")
        h = decode_header(self.layout, data)
        req = self.pending[0]
        if h.cmd != PS_IOV_ADD_F or not h.flags & PE_PRESENT:
            raise ServerProtocolError(
                f"reply to GET {req.vaddr:#x}+{req.nr_pages} of pid {req.pid} has command {h.cmd:#x} "
                f"flags {h.flags:#x}, expected ADD_F with PRESENT"
            )
        if h.vaddr != req.vaddr or h.dst_id != req.pid:
            raise ServerProtocolError(
                f"reply for {h.vaddr:#x} of pid {h.dst_id} does not match the oldest request "
                f"({req.vaddr:#x} of pid {req.pid}): wrong header layout?"
            )
        if not 0 < h.nr_pages <= min(req.nr_pages, MAX_REPLY_PAGES):
            raise ServerProtocolError(
                f"reply for {h.vaddr:#x} carries {h.nr_pages} pages for a request of {req.nr_pages}"
            )
        self.pending.popleft()
        self._current = (req, h)
        return req, h

    def payload_done(self) -> None:
        if self._current is None:
            raise ClientProtocolError("payload_done without a header")
        self._current = None

    def close_ack(self, data: bytes | bytearray | memoryview) -> None:
        (v,) = _CLOSE_ACK.unpack(data)
        if v != 0:
            raise ServerProtocolError(f"the page server answered CLOSE with {v}")
        self.closing = False
