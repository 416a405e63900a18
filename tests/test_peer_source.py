"""Exporter and remote source in one process over loopback: reads, TLS,
refusals, urgent reads overtaking bulk ones, reconnect and resume."""

from __future__ import annotations

import asyncio
import ctypes
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
import trustme

from lazypaged import peer_protocol as pp
from lazypaged.config import ExportConfig, RemoteConfig
from lazypaged.peer_server import ExportServer
from lazypaged.snapshot import create_from_raw
from lazypaged.sources.base import Extent, SourceError
from lazypaged.sources.registry import SourceRegistry
from lazypaged.sources.remote import PeerPool, RemoteSource

MiB = 1 << 20
PAGE = 4096


def _image(path: Path, size: int, seed: int = 3) -> bytes:
    """Pseudo-random pages; every 5th page a hole of the sparse file (a zero extent)."""
    base = bytes((seed * 2654435761 + i * 40503) & 0xFF for i in range(64))
    out = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for p in range(size // PAGE):
            if p % 5 != 4:
                page = bytes((b + p) & 0xFF for b in base) * (PAGE // 64)
                out[p * PAGE : (p + 1) * PAGE] = page
                f.seek(p * PAGE)
                f.write(page)
    return bytes(out)


def _read(extents: list[Extent], offset: int, length: int) -> bytes:
    out = bytearray()
    pos = offset
    for e in extents:
        assert e.offset == pos
        out += bytes(e.length) if e.address == 0 else ctypes.string_at(e.address, e.length)
        pos += e.length
    assert pos == offset + length
    return bytes(out)


@dataclass
class Setup:
    snaps: Path
    image: bytes
    server: ExportServer
    registry: SourceRegistry
    url: str


async def _serve(snaps: Path, cfg: ExportConfig) -> tuple[ExportServer, SourceRegistry]:
    reg = SourceRegistry((snaps,))
    server = ExportServer(cfg, reg)
    await server.start()
    return server, reg


async def _stop(server: ExportServer, reg: SourceRegistry) -> None:
    server.stop_accepting()
    await server.close_connections()
    reg.close()


@pytest_asyncio.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    image = _image(snaps / "img", 4 * MiB)
    create_from_raw(snaps / "img", snaps / "img.snap", level=3)
    server, reg = await _serve(snaps, ExportConfig(listen="127.0.0.1:0", snapshots=(Path("img"), Path("img.snap"))))
    host, port = server.address
    try:
        yield Setup(snaps, image, server, reg, f"peer://{host}:{port}/img")
    finally:
        await _stop(server, reg)


@pytest.mark.asyncio
@pytest.mark.parametrize("export", ["img", "img.snap"])
async def test_remote_reads_match_the_image(setup: Setup, export: str) -> None:
    pool = PeerPool(RemoteConfig())
    try:
        src = await pool.acquire_async(setup.url.replace("/img", f"/{export}"))
        assert src.size == len(setup.image)
        assert not src.synchronous
        for off, n in [(0, PAGE), (4 * PAGE, PAGE), (MiB - PAGE, 3 * PAGE), (0, 4 * MiB), (123 * PAGE, 77 * PAGE)]:
            got = _read(await src.fetch(off, n), off, n)
            assert got == setup.image[off : off + n]
            got = _read(await src.fetch_urgent(off, n), off, n)
            assert got == setup.image[off : off + n]
        if export == "img":
            zeros = [e for e in await src.fetch(0, 10 * PAGE) if e.address == 0]
            assert zeros, "holes should travel as zero extents"
        with pytest.raises(SourceError, match="outside source"):
            await src.fetch(len(setup.image) - PAGE, 2 * PAGE)
        # Many reads in flight at once on both links.
        offs = list(range(0, 4 * MiB, 64 << 10))
        res = await asyncio.gather(*(src.fetch(o, 64 << 10) for o in offs), *(src.fetch_urgent(o, PAGE) for o in offs))
        for o, ext in zip(offs + offs, res, strict=True):
            n = ext[-1].offset + ext[-1].length - o
            assert _read(ext, o, n) == setup.image[o : o + n]
        # One connection pair, shared.
        assert src.peer.urgent.connects == 1
        assert src.peer.bulk.connects == 1
    finally:
        pool.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("export", ["img", "img.snap", "img zstd"])
async def test_streamed_reads_hand_over_every_piece(setup: Setup, export: str) -> None:
    """fetch_into: each verified frame to the sink as it arrives, in order,
    whole pages, from one reused buffer; together exactly the image."""
    url, server, reg = setup.url.replace("/img", f"/{export.split()[0]}"), None, None
    if export.endswith("zstd"):
        server, reg = await _serve(
            setup.snaps, ExportConfig(listen="127.0.0.1:0", snapshots=(Path("img"),), compress_level=1)
        )
        host, port = server.address
        url = f"peer://{host}:{port}/img"
    pool = PeerPool(RemoteConfig())
    try:
        src = await pool.acquire_async(url)
        for off, n in [(0, 4 * MiB), (5 * PAGE, MiB + 3 * PAGE)]:
            pieces: list[Extent] = []
            got = bytearray()

            def sink(extents: list[Extent], pieces: list[Extent] = pieces, got: bytearray = got) -> None:
                for e in extents:
                    assert e.offset % PAGE == 0
                    assert e.length % PAGE == 0
                    pieces.append(e)
                    got.extend(_read([e], e.offset, e.length))  # copied now: the buffer is reused

            assert await src.fetch_into(off, n, sink)
            assert [p.offset for p in pieces] == sorted(p.offset for p in pieces)
            assert pieces[0].offset == off
            assert sum(p.length for p in pieces) == n
            assert bytes(got) == setup.image[off : off + n]
            assert len(pieces) > 1
            assert len({p.address for p in pieces if p.address}) == 1
    finally:
        pool.close()
        if server is not None and reg is not None:
            await _stop(server, reg)


async def _odd_exporter(image: bytes) -> asyncio.Server:
    """The real protocol core serving ``image``, but framing every read at an
    odd boundary (1000 bytes, then the rest): the protocol allows any frame
    length, and such pieces cannot be installed as they arrive."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = pp.ServerConnection()
        try:
            while data := await r.read(1 << 16):
                conn.receive_data(data)
                while (ev := conn.next_event()) is not pp.NEED_DATA and ev is not pp.CLOSED:
                    if isinstance(ev, pp.Open):
                        conn.opened(ev.handle, len(image), b"odd framing 0001")
                    elif isinstance(ev, pp.Read):
                        chunk = image[ev.offset : ev.offset + ev.length]
                        conn.send_data(ev.request_id, chunk[:1000])
                        conn.send_data(ev.request_id, chunk[1000:])
                w.writelines(conn.data_to_send())
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.asyncio
async def test_stream_of_odd_frames_falls_back_to_plain_reads(setup: Setup) -> None:
    server = await _odd_exporter(setup.image)
    pool = PeerPool(RemoteConfig())
    try:
        port = server.sockets[0].getsockname()[1]
        src = await pool.acquire_async(f"peer://127.0.0.1:{port}/odd")
        handed: list[int] = []
        off, n = 3 * PAGE, 5 * PAGE
        assert not await src.fetch_into(off, n, lambda extents: handed.extend(e.offset for e in extents))
        assert handed == []  # neither piece covers whole pages
        assert _read(await src.fetch(off, n), off, n) == setup.image[off : off + n]
    finally:
        pool.close()
        server.close()


@pytest.mark.asyncio
async def test_bulk_waits_while_urgent_reads_are_on_the_wire(setup: Setup) -> None:
    pool = PeerPool(RemoteConfig(stall_timeout=0.4))
    try:
        src = await pool.acquire_async(setup.url)
        await asyncio.gather(src.fetch_urgent(0, PAGE), src.fetch(0, PAGE))
        bulk = src.peer.bulk
        assert not bulk.held
        urgent = asyncio.ensure_future(src.fetch_urgent(MiB, PAGE))
        filling = asyncio.ensure_future(src.fetch(2 * MiB, MiB))
        await asyncio.sleep(0)  # both sent, no reply read yet
        assert bulk.held
        assert _read(await urgent, MiB, PAGE) == setup.image[MiB : MiB + PAGE]
        assert not bulk.held
        assert _read(await filling, 2 * MiB, MiB) == setup.image[2 * MiB : 3 * MiB]
        # Held on purpose for longer than the stall timeout: not a dead link.
        bulk.hold(True)
        late = asyncio.ensure_future(src.fetch(3 * MiB, MiB))
        await asyncio.sleep(1.0)
        assert not late.done()
        bulk.hold(False)
        assert _read(await asyncio.wait_for(late, 5), 3 * MiB, MiB) == setup.image[3 * MiB :]
        assert bulk.connects == 1
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_unknown_export_is_refused_clearly(setup: Setup) -> None:
    pool = PeerPool(RemoteConfig())
    try:
        with pytest.raises(SourceError, match="unknown_export: no export named 'other'"):
            await pool.acquire_async(setup.url.replace("/img", "/other"))
        with pytest.raises(SourceError, match="not HOST:PORT"):
            pool.acquire("peer://nowhere/img")
        with pytest.raises(SourceError, match="not a loopback address"):
            pool.acquire("peer://192.0.2.1:7070/img")
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_registry_resolves_peer_names_and_shares_them(setup: Setup) -> None:
    reg = SourceRegistry((setup.snaps,))
    try:
        a = await reg.acquire_async(setup.url)
        b = reg.acquire(setup.url)
        assert a is b
        assert isinstance(a, RemoteSource)
        assert a in reg.open_sources
        reg.release(a)
        assert a in reg.open_sources
        reg.release(b)
        assert a not in reg.open_sources
    finally:
        reg.close()


@pytest.mark.asyncio
async def test_exporter_restart_mid_reads_resumes(setup: Setup) -> None:
    cfg = RemoteConfig(stall_timeout=1.0, reconnect_deadline=20.0, backoff_max=0.2)
    pool = PeerPool(cfg)
    port = setup.server.address[1]
    try:
        src = await pool.acquire_async(setup.url)
        # Both links up first: the urgent one is connected by a read of its
        # own (warming it up may still be under way when the exporter stops,
        # and then its first connection is the one to the second exporter).
        await asyncio.gather(src.fetch(0, PAGE), src.fetch_urgent(0, PAGE))
        assert src.peer.urgent.connects == 1
        # Exporter goes away; reads issued now wait, then complete once it is back.
        setup.server.stop_accepting()
        await setup.server.close_connections()
        waiting = [asyncio.ensure_future(src.fetch_urgent(o, 16 * PAGE)) for o in range(0, MiB, 16 * PAGE)]
        # Waiting for real: the urgent link lost and a reconnect refused.
        await _until(lambda: src.peer.urgent.proto is None and bool(src.peer.urgent.last_error))
        assert not any(w.done() for w in waiting)
        cfg2 = ExportConfig(listen=f"127.0.0.1:{port}", snapshots=(Path("img"),))
        server2 = ExportServer(cfg2, setup.registry)
        await server2.start()
        try:
            done = await asyncio.wait_for(asyncio.gather(*waiting), 15)
            for k, ext in enumerate(done):
                o = k * 16 * PAGE
                assert _read(ext, o, 16 * PAGE) == setup.image[o : o + 16 * PAGE]
            assert src.peer.urgent.connects >= 2
        finally:
            server2.stop_accepting()
            await server2.close_connections()
    finally:
        pool.close()


async def _until(pred: Callable[[], bool]) -> None:
    """Wait (up to 20 s) for a state change of the links: they change in
    loop callbacks, with no event of their own to await."""
    for _ in range(2000):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the links never reached the state waited for")


@pytest.mark.asyncio
async def test_deadline_runs_from_the_loss_then_reads_fail_at_once(setup: Setup) -> None:
    """The exporter goes away for good: a read waiting fails once the link
    has been down for the deadline, counted from the loss, and a read asked
    later fails at once instead of waiting a deadline of its own; when the
    exporter is back, the link finds it again and reads work."""
    deadline = 1.0
    pool = PeerPool(RemoteConfig(reconnect_deadline=deadline, backoff_max=0.1))
    port = setup.server.address[1]
    loop = asyncio.get_running_loop()
    try:
        src = await pool.acquire_async(setup.url)
        await asyncio.gather(src.fetch(0, PAGE), src.fetch_urgent(0, PAGE))
        setup.server.stop_accepting()
        await setup.server.close_connections()
        lost = loop.time()
        await _until(lambda: src.peer.urgent.proto is None)
        with pytest.raises(SourceError, match="no connection for"):
            await src.fetch_urgent(PAGE, PAGE)
        assert loop.time() - lost < deadline + 1.0
        for link in (src.peer.urgent, src.peer.bulk):
            t0 = loop.time()
            with pytest.raises(SourceError, match=f"deadline {deadline} s"):
                await link.read(src.export, 2 * PAGE, PAGE)
            assert loop.time() - t0 < 0.05, "a read past the deadline must fail at once"
        server2 = ExportServer(ExportConfig(listen=f"127.0.0.1:{port}", snapshots=(Path("img"),)), setup.registry)
        await server2.start()
        try:
            await _until(lambda: src.peer.urgent.proto is not None and src.peer.bulk.proto is not None)
            assert _read(await src.fetch_urgent(MiB, PAGE), MiB, PAGE) == setup.image[MiB : MiB + PAGE]
            assert _read(await src.fetch(2 * MiB, MiB), 2 * MiB, MiB) == setup.image[2 * MiB : 3 * MiB]
        finally:
            server2.stop_accepting()
            await server2.close_connections()
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_unreachable_peer_fails_after_the_deadline(setup: Setup) -> None:
    pool = PeerPool(RemoteConfig(reconnect_deadline=0.8, backoff_max=0.1))
    try:
        src = await pool.acquire_async(setup.url)
        setup.server.stop_accepting()
        await setup.server.close_connections()
        with pytest.raises(SourceError, match="no connection for"):
            await asyncio.wait_for(src.fetch_urgent(0, PAGE), 10)
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_changed_image_is_never_mixed(setup: Setup) -> None:
    pool = PeerPool(RemoteConfig(backoff_max=0.1))
    port = setup.server.address[1]
    try:
        src = await pool.acquire_async(setup.url)
        await src.fetch(0, PAGE)
        setup.server.stop_accepting()
        await setup.server.close_connections()
        setup.registry.close()
        (setup.snaps / "img").write_bytes(bytes(4 * MiB))  # same size, other content
        reg2 = SourceRegistry((setup.snaps,))
        server2 = ExportServer(ExportConfig(listen=f"127.0.0.1:{port}", snapshots=(Path("img"),)), reg2)
        await server2.start()
        try:
            with pytest.raises(SourceError, match="different image"):
                await asyncio.wait_for(src.fetch_urgent(0, PAGE), 10)
        finally:
            await _stop(server2, reg2)
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_compressed_wire(setup: Setup) -> None:
    server, reg = await _serve(
        setup.snaps, ExportConfig(listen="127.0.0.1:0", snapshots=(Path("img"),), compress_level=1)
    )
    pool = PeerPool(RemoteConfig())
    try:
        host, port = server.address
        src = await pool.acquire_async(f"peer://{host}:{port}/img")
        got = _read(await src.fetch(0, 4 * MiB), 0, 4 * MiB)
        assert got == setup.image
        (conn,) = [c for c in server._conns if not c.urgent]
        assert "zstd" in conn.conn.encodings
    finally:
        pool.close()
        await _stop(server, reg)


# -- TLS ------------------------------------------------------------------------------------------


@dataclass
class Pki:
    server: tuple[str, str]
    client: tuple[str, str]
    ca: str
    other_client: tuple[str, str]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, rogue = trustme.CA(), trustme.CA()
    d = tmp_path / "pki"
    d.mkdir()

    def dump(cert: trustme.LeafCert, name: str) -> tuple[str, str]:
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        return str(d / f"{name}.crt"), str(d / f"{name}.key")

    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    return Pki(
        server=dump(ca.issue_cert("127.0.0.1", "exporter"), "server"),
        client=dump(ca.issue_cert("reader-b"), "client"),
        ca=str(d / "ca.crt"),
        other_client=dump(rogue.issue_cert("intruder"), "rogue"),
    )


@pytest.mark.asyncio
async def test_tls_mutual_auth(setup: Setup, pki: Pki) -> None:
    cfg = ExportConfig(
        listen="127.0.0.1:0",
        snapshots=(Path("img"),),
        tls_cert=pki.server[0],
        tls_key=pki.server[1],
        tls_ca=pki.ca,
    )
    server, reg = await _serve(setup.snaps, cfg)
    host, port = server.address
    url = f"peer://{host}:{port}/img"
    good = RemoteConfig(tls_cert=pki.client[0], tls_key=pki.client[1], tls_ca=pki.ca)
    pools = [PeerPool(good), PeerPool(replace(good, tls_cert=pki.other_client[0], tls_key=pki.other_client[1]))]
    pools += [PeerPool(RemoteConfig(tls_ca=pki.ca)), PeerPool(RemoteConfig())]
    try:
        src = await pools[0].acquire_async(url)
        assert _read(await src.fetch_urgent(0, MiB), 0, MiB) == setup.image[:MiB]
        with pytest.raises(SourceError, match="TLS"):
            await pools[1].acquire_async(url)  # certificate from another CA
        with pytest.raises(SourceError, match="TLS"):
            await pools[2].acquire_async(url)  # no client certificate
        with pytest.raises(SourceError, match="auth: this exporter requires TLS"):
            await pools[3].acquire_async(url)  # plaintext
        # The good client still reads.
        assert _read(await src.fetch(MiB, MiB), MiB, MiB) == setup.image[MiB : 2 * MiB]
    finally:
        for p in pools:
            p.close()
        await _stop(server, reg)


def test_non_loopback_listener_needs_tls_or_insecure(pki: Pki) -> None:
    from lazypaged.config import ConfigError

    with pytest.raises(ConfigError, match="not a loopback address"):
        ExportConfig(listen="10.77.0.1:7070").check()
    ExportConfig(listen="10.77.0.1:7070", insecure=True).check()
    ExportConfig(listen="127.0.0.1:7070").check()
    ExportConfig(listen="10.77.0.1:7070", tls_cert=pki.server[0], tls_key=pki.server[1], tls_ca=pki.ca).check()
    with pytest.raises(ConfigError, match="tls_ca"):
        ExportConfig(listen="10.77.0.1:7070", tls_cert=pki.server[0], tls_key=pki.server[1]).check()


# -- misbehaving clients ------------------------------------------------------------------------


async def _raw_client(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, pp.ClientConnection]:
    r, w = await asyncio.open_connection(host, port)
    c = pp.ClientConnection("bulk", encodings=())
    for x in c.data_to_send():
        w.write(x)
    return r, w, c


async def _next(r: asyncio.StreamReader, c: pp.ClientConnection) -> object:
    while True:
        ev = c.next_event()
        if ev is not pp.NEED_DATA:
            return ev
        c.receive_data(await asyncio.wait_for(r.read(65536), 5))


@pytest.mark.asyncio
async def test_garbage_gets_an_error_and_others_keep_being_served(setup: Setup) -> None:
    host, port = setup.server.address
    pool = PeerPool(RemoteConfig())
    try:
        src = await pool.acquire_async(setup.url)
        # Not our protocol at all.
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET / HTTP/1.1\r\n\r\n")
        reply = await asyncio.wait_for(r.read(), 5)
        assert reply.startswith(pp.PREAMBLE)
        assert b"not a lazypaged peer" in reply
        w.close()
        # A valid handshake, then a frame of an unknown type.
        r, w, c = await _raw_client(host, port)
        assert isinstance(await _next(r, c), pp.Welcome)
        w.write(b"\x63\x00\x00\x00\x00\x00\x00\x00")
        err = await _next(r, c)
        assert isinstance(err, pp.PeerError)
        assert "unknown frame type 99" in err.message
        w.close()
        # Out of bounds: an error for that read, the connection goes on.
        r, w, c = await _raw_client(host, port)
        assert isinstance(await _next(r, c), pp.Welcome)
        c.open(1, "img")
        bad = c.read(1, len(setup.image) - PAGE, 2 * PAGE)
        ok = c.read(1, 0, PAGE)
        for x in c.data_to_send():
            w.write(x)
        assert isinstance(await _next(r, c), pp.Opened)
        ev1, ev2 = await _next(r, c), await _next(r, c)
        assert isinstance(ev1, pp.ReadFailed)
        assert ev1.request_id == bad
        assert ev1.reason == "out_of_bounds"
        assert isinstance(ev2, pp.ReadDone)
        assert ev2.request_id == ok
        w.close()
        # Meanwhile and after, a well-behaved reader is served.
        assert _read(await src.fetch(0, MiB), 0, MiB) == setup.image[:MiB]
    finally:
        pool.close()


def test_pool_without_loop_and_tls_context_types(pki: Pki) -> None:
    pool = PeerPool(RemoteConfig(tls_ca=pki.ca))
    assert isinstance(pool.ssl, ssl.SSLContext)
    pool.close()
