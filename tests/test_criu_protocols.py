"""The lazy-pages socket records and CRIU's page-server protocol, byte by byte,
and the pipelined page-server client against a scripted server on loopback."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from lazypaged.criu import pageserver as ps
from lazypaged.criu.records import RSTF, RecordError, RecordReader, RestoreFinished, TaskRecord
from lazypaged.criu.remote import PageServerClient, RemoteTaskSource
from lazypaged.sources import SourceError

PAGE = 4096


# -- records -------------------------------------------------------------------------


def _feed_all(reader: RecordReader, stream: list[tuple[bytes, list[int]]]) -> list[object]:
    out = []
    for data, fds in stream:
        ev = reader.feed(data, fds)
        if ev is not None:
            out.append(ev)
    return out


def test_records_pid_then_fd_then_zombie_then_end() -> None:
    r = RecordReader()
    pid = struct.pack("=i", 5)
    stream = [(pid[:1], []), (pid[1:3], []), (pid[3:], []), (b"\0", [42]), (struct.pack("=i", -6), []),
              (struct.pack("=I", RSTF), [])]
    assert [r.need() for _ in range(1)] == [4]
    assert _feed_all(r, stream) == [TaskRecord(5, 42), TaskRecord(-6, None), RestoreFinished()]
    assert r.finished
    assert r.need() == 0


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        ([(struct.pack("=i", 0), [])], "pid 0"),
        ([(struct.pack("=i", 3), []), (b"\0", [])], "0 descriptors"),
        ([(struct.pack("=i", 3), []), (b"\0", [7, 8])], "2 descriptors"),
        ([(b"\1\0", [9])], "with the pid bytes"),
        ([(b"\1\0\0\0\0", [])], "were asked for"),
    ],
)
def test_records_refuse_malformed_streams(stream: list[tuple[bytes, list[int]]], words: str) -> None:
    with pytest.raises(RecordError, match=words):
        _feed_all(RecordReader(), stream)


#: Real pids stay below the kernel's pid_max limit (4194304), far under the end marker.
_PIDS = st.integers(min_value=-(1 << 22), max_value=1 << 22).filter(lambda p: p != 0)


@given(st.lists(_PIDS, max_size=8))
def test_records_any_pids_any_split(pids: list[int]) -> None:
    r = RecordReader()
    got = []
    for p in pids:
        for b in struct.pack("=i", p):
            ev = r.feed(bytes([b]), [])
            if ev is not None:
                got.append(ev)
        if p > 0:
            got.append(r.feed(b"\0", [99]))
    assert got == [TaskRecord(p, 99 if p > 0 else None) for p in pids]


# -- page-server headers ---------------------------------------------------------------


def test_header_layouts() -> None:
    a = ps.encode_get("4.1", 7, 0x1000, 3)
    b = ps.encode_get("4.2", 7, 0x1000, 3)
    assert len(a) == 24
    assert len(b) == 32
    assert struct.unpack("=IIQQ", a) == (ps.PS_IOV_GET, 3, 0x1000, 7)
    assert struct.unpack("=IIQQQ", b) == (ps.PS_IOV_GET, 0, 3, 0x1000, 7)
    assert struct.unpack("=IIQQ", ps.encode_close("4.1"))[0] == ps.PS_IOV_CLOSE
    with pytest.raises(ps.ClientProtocolError):
        ps.encode_get("4.1", 7, 0x1001, 1)
    with pytest.raises(ps.ClientProtocolError):
        ps.encode("4.1", ps.PS_IOV_GET, 1 << 32, 0, 1)


def _reply(layout: str, vaddr: int, pid: int, n: int, cmd: int = ps.PS_IOV_ADD_F, flags: int = ps.PE_PRESENT) -> bytes:
    return ps.encode(layout, cmd, n, vaddr, pid, flags)


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
def test_reply_parser_in_order_and_partial(layout: str) -> None:
    p = ps.ReplyParser(layout)
    p.sent(ps.Pending(3, 0x10000, 4))
    p.sent(ps.Pending(3, 0x20000, 1))
    assert p.need() == p.header_size
    req, h = p.header(_reply(layout, 0x10000, 3, 2))
    assert (req.vaddr, h.nr_pages) == (0x10000, 2)
    p.payload_done()
    p.header(_reply(layout, 0x20000, 3, 1))
    p.payload_done()
    assert p.need() == 0
    p.sent_close()
    assert p.need() == 4
    p.close_ack(struct.pack("=i", 0))


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (_reply("4.1", 0x20000, 3, 1), "does not match"),
        (_reply("4.1", 0x10000, 4, 1), "does not match"),
        (_reply("4.1", 0x10000, 3, 5), "carries 5 pages"),
        (_reply("4.1", 0x10000, 3, 0), "carries 0 pages"),
        (_reply("4.1", 0x10000, 3, 1, cmd=ps.PS_IOV_ADD), "expected ADD_F"),
        (_reply("4.1", 0x10000, 3, 1, flags=0), "expected ADD_F"),
    ],
)
def test_reply_parser_refuses_mismatches(reply: bytes, words: str) -> None:
    p = ps.ReplyParser("4.1")
    p.sent(ps.Pending(3, 0x10000, 4))
    with pytest.raises(ps.ServerProtocolError, match=words):
        p.header(reply)


def test_reply_without_request_and_bad_close_ack() -> None:
    p = ps.ReplyParser("4.2")
    with pytest.raises(ps.ServerProtocolError, match="nobody asked"):
        p.header(_reply("4.2", 0, 1, 1))
    p.sent_close()
    with pytest.raises(ps.ServerProtocolError, match="answered CLOSE"):
        p.close_ack(struct.pack("=i", -1))
    with pytest.raises(ps.ClientProtocolError):
        p.sent(ps.Pending(1, 0, 1))


# -- the client against a scripted server ---------------------------------------------------


def page_of(pid: int, vaddr: int) -> bytes:
    return struct.pack("=QQ", pid, vaddr) * (PAGE // 16)


class FakePageServer:
    """Speaks the server side: answers GETs in order, at most ``chunk`` pages each."""

    def __init__(self, layout: str, chunk: int = 1 << 30, hook: Callable[[int, int, int], None] | None = None) -> None:
        self.layout = layout
        self.chunk = chunk
        self.hook = hook
        self.requests: list[tuple[int, int, int]] = []
        self.max_queued = 0
        self.closed_cleanly = False
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = ps.LAYOUTS[self.layout].size
        try:
            while True:
                hdr = await reader.readexactly(size)
                self.max_queued = max(self.max_queued, len(reader._buffer) // size + 1)  # type: ignore[attr-defined]
                h = ps.decode_header(self.layout, hdr)
                if h.cmd == ps.PS_IOV_CLOSE:
                    writer.write(struct.pack("=i", 0))
                    await writer.drain()
                    await reader.read()
                    self.closed_cleanly = True
                    return
                assert h.cmd == ps.PS_IOV_GET
                self.requests.append((h.dst_id, h.vaddr, h.nr_pages))
                if self.hook is not None:
                    self.hook(h.dst_id, h.vaddr, h.nr_pages)
                n = min(h.nr_pages, self.chunk)
                data = b"".join(page_of(h.dst_id, h.vaddr + i * PAGE) for i in range(n))
                writer.write(_reply(self.layout, h.vaddr, h.dst_id, n) + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest_asyncio.fixture
async def fake_server(request: pytest.FixtureRequest) -> AsyncIterator[FakePageServer]:
    layout, chunk = request.param
    srv = FakePageServer(layout, chunk)
    srv.server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    yield srv
    srv.server.close()
    await srv.server.wait_closed()


def _bytes(extents: list[object]) -> bytes:
    import ctypes

    out = b""
    for e in extents:
        assert hasattr(e, "address")
        assert hasattr(e, "length")
        out += ctypes.string_at(e.address, e.length) if e.address else bytes(e.length)
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize("fake_server", [("4.1", 1 << 30), ("4.2", 3)], indirect=True)
async def test_client_pipelines_and_completes_partial_replies(fake_server: FakePageServer) -> None:
    client = PageServerClient("127.0.0.1", fake_server.port, fake_server.layout, max_request=8 * PAGE)
    await client.connect()
    src = RemoteTaskSource(client, 9)
    base = 0x7F0000000000
    results = await asyncio.gather(
        src.fetch(base, 20 * PAGE), src.fetch_urgent(base + 0x100000, 2 * PAGE), src.fetch(base + 0x200000, 9 * PAGE)
    )
    want = [(base, 20), (base + 0x100000, 2), (base + 0x200000, 9)]
    for ext, (start, n) in zip(results, want, strict=True):
        assert _bytes(ext) == b"".join(page_of(9, start + i * PAGE) for i in range(n))
    assert client.stats.max_inflight > 1, "requests were not pipelined"
    if fake_server.chunk == 3:
        assert client.stats.partial_replies > 0
    assert await client.close()
    await asyncio.sleep(0.05)
    assert fake_server.closed_cleanly


@pytest.mark.asyncio
async def test_client_fails_fetches_when_the_server_vanishes() -> None:
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(24)
        writer.write(_reply("4.1", 0x1000, 1, 2) + b"x" * PAGE)  # half a reply, then gone
        await writer.drain()
        writer.close()
        conns.append(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        client = PageServerClient("127.0.0.1", server.sockets[0].getsockname()[1], "4.1")
        await client.connect()
        with pytest.raises(SourceError, match="closed the connection"):
            await RemoteTaskSource(client, 1).fetch(0x1000, 2 * PAGE)
        with pytest.raises(SourceError):
            await RemoteTaskSource(client, 1).fetch(0x5000, PAGE)
        assert not await client.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_client_refuses_a_reply_for_another_address() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(24)
        writer.write(_reply("4.1", 0x9000, 1, 1) + b"y" * PAGE)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        client = PageServerClient("127.0.0.1", server.sockets[0].getsockname()[1], "4.1")
        await client.connect()
        with pytest.raises(SourceError, match="does not match"):
            await RemoteTaskSource(client, 1).fetch(0x1000, PAGE)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_connect_refused_is_a_source_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(SourceError, match="cannot connect"):
        await PageServerClient("127.0.0.1", port, "4.1").connect()
