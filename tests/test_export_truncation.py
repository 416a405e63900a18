"""A raw image cut short while the exporter sends it to a reader.

The exporter is a real daemon process (a SIGBUS there ends it and every
restore it serves); the reader is a remote source in this process, over a
real connection. Each round starts a bulk read of the whole image and a few
urgent reads, cuts the file (by path, or through a descriptor held open
for writing, which keeps the exporter from taking a lease) once the bulk
read's first frame arrived, then puts the bytes back. The exporter must
survive every round, and every byte the reader was handed must be the
image's own: a read that cannot be served fails, it is never answered with
zeros or stale bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import structlog.testing
import trustme

from lazypaged import peer_protocol as pp
from lazypaged.config import RemoteConfig
from lazypaged.sources.base import Extent, SourceError
from lazypaged.sources.remote import PeerPool, RemoteSource

from .conftest import DaemonHandle, MiB, start_daemon, stop_daemon
from .peer_pair import free_port

PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 8 * MiB
ROUNDS = int(os.environ.get("EXPORT_TRUNCATE_ROUNDS", "24"))


@dataclass
class Exporter:
    daemon: DaemonHandle
    image: Path
    ref: bytes
    url: str
    remote: RemoteConfig


def _tls(d: Path) -> tuple[str, RemoteConfig]:
    """Mutual TLS on loopback: the exporter's [export] lines and the reader's settings."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    for name, ident in (("a", "127.0.0.1"), ("b", "reader")):
        leaf = ca.issue_cert(ident)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
    lines = f'tls_cert = "{d / "a.crt"}"\ntls_key = "{d / "a.key"}"\ntls_ca = "{d / "ca.crt"}"\n'
    return lines, RemoteConfig(tls_cert=str(d / "b.crt"), tls_key=str(d / "b.key"), tls_ca=str(d / "ca.crt"))


@pytest.fixture(params=["plain", "zstd", "tls"])
def exporter(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Exporter]:
    # The image must exist when the exporter opens its exports.
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    ref = os.urandom(SIZE)  # no zero page: zeros anywhere are wrong bytes
    (snaps / "img").write_bytes(ref)
    tls, remote = _tls(tmp_path) if request.param == "tls" else ("", RemoteConfig())
    compress = 1 if request.param == "zstd" else 0
    port = free_port()
    d = start_daemon(
        tmp_path,
        f'[export]\nlisten = "127.0.0.1:{port}"\nsnapshots = ["img"]\ncompress_level = {compress}\n{tls}',
    )
    remote = replace(remote, stall_timeout=2.0, reconnect_deadline=3.0, connect_timeout=1.0, backoff_max=0.1)
    try:
        yield Exporter(d, snaps / "img", ref, f"peer://127.0.0.1:{port}/img", remote)
    finally:
        if d.alive():
            stop_daemon(d)


def _bytes(extents: list[Extent]) -> tuple[int, bytes]:
    out = bytearray()
    for x in extents:
        out += bytes(x.length) if x.address == 0 else ctypes.string_at(x.address, x.length)
    return extents[0].offset, bytes(out)


def _check(ref: bytes, offset: int, data: bytes, what: str) -> None:
    if data != ref[offset : offset + len(data)]:
        bad = next(i for i in range(0, len(data), PAGE) if data[i : i + PAGE] != ref[offset + i : offset + i + PAGE])
        raise AssertionError(f"{what}: wrong bytes in the page at {offset + bad:#x}")


class _Cut:
    """Cuts the image from a thread (the open or truncate waits for the
    exporter to let its lease go), keeping the writer's descriptor if ``held``."""

    def __init__(self, image: Path, at: int, held: bool) -> None:
        self.image, self.at, self.held = image, at, held
        self.fd = -1
        self.done = threading.Event()

    def run(self) -> None:
        try:
            if self.held:
                self.fd = os.open(self.image, os.O_WRONLY)
                os.ftruncate(self.fd, self.at)
            else:
                os.truncate(self.image, self.at)
        finally:
            self.done.set()

    def restore(self, ref: bytes) -> None:
        """The whole image back, through the held descriptor if there is one."""
        fd = self.fd if self.fd >= 0 else os.open(self.image, os.O_WRONLY)
        try:
            os.pwrite(fd, ref, 0)
        finally:
            os.close(fd)
            self.fd = -1


async def _round(src: RemoteSource, e: Exporter, rng: random.Random, n: int) -> dict[str, int]:
    cut = _Cut(e.image, rng.randrange(PAGE, SIZE - PAGE), held=n % 2 == 1)
    thread = threading.Thread(target=cut.run)
    pieces: list[tuple[int, bytes]] = []
    loop = asyncio.get_running_loop()
    urgent: list[asyncio.Future[list[Extent]]] = []

    def sink(extents: list[Extent]) -> None:
        pieces.append(_bytes(extents))
        if len(pieces) == 1:  # the bulk read is under way: cut now, with faults in flight
            thread.start()
            for _ in range(8):
                urgent.append(asyncio.ensure_future(src.fetch_urgent(rng.randrange(SIZE // PAGE) * PAGE, 4 * PAGE)))

    for _ in range(4):
        urgent.append(asyncio.ensure_future(src.fetch_urgent(rng.randrange(SIZE // PAGE) * PAGE, PAGE)))
    with contextlib.suppress(SourceError):  # a cut the read met: its pieces are checked below
        await src.fetch_into(0, SIZE, sink)
    results = await asyncio.gather(*urgent, return_exceptions=True)
    if not thread.is_alive() and not pieces:
        thread.start()  # the bulk read failed before its first piece
    await loop.run_in_executor(None, cut.done.wait)
    thread.join()
    failed = 0
    for r in results:
        if isinstance(r, BaseException):
            assert isinstance(r, SourceError), r
            failed += 1
        else:
            off, data = _bytes(r)
            _check(e.ref, off, data, f"round {n}: urgent read")
    for off, data in pieces:
        _check(e.ref, off, data, f"round {n}: bulk piece")
    assert e.daemon.alive(), (f"round {n}: the exporter died (exit {e.daemon.proc.returncode})",
                              e.daemon.log.read_text()[-2000:])
    await loop.run_in_executor(None, cut.restore, e.ref)
    return {"cut": cut.at, "bulk_bytes": sum(len(d) for _, d in pieces), "urgent_failed": failed}


@pytest.mark.asyncio
async def test_exporter_survives_cuts_mid_send(exporter: Exporter) -> None:
    """Truncation rounds against a live export: no SIGBUS, no wrong byte, and
    the export serves the whole image again once its bytes are back."""
    rng = random.Random(int(os.environ.get("EXPORT_TRUNCATE_SEED", "7")))
    pool = PeerPool(exporter.remote)
    try:
        src = await pool.acquire_async(exporter.url)
        for n in range(ROUNDS):
            await _round(src, exporter, rng, n)
            off, data = _bytes(await src.fetch(0, SIZE))
            _check(exporter.ref, off, data, f"after round {n}")
        assert exporter.daemon.alive()
        failed = [x for x in exporter.daemon.log_lines() if x.get("event") == "peer_read_failed"]
        bugs = [x for x in exporter.daemon.log_lines() if x.get("event") == "export_bug"]
        assert not bugs, bugs
        assert failed, "no read met a cut file: the rounds tested nothing"
    finally:
        pool.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("held", [False, True], ids=["by_path", "held_open"])
async def test_cut_while_bulk_frames_wait(exporter: Exporter, held: bool) -> None:
    """The cut made while the exporter has frames of a bulk read still to
    send: this reader stops reading until the cut is done (the cut waits
    for the exporter to let its lease go), so the exporter's next frames
    come from a file that no longer holds them. They fail the read with an
    ERROR frame (before, they killed the exporter with SIGBUS or went out
    with bytes that no longer matched their checksum); the exporter lives
    and serves the whole image again once it is back."""
    at = 2 * MiB + 3 * PAGE + 1000
    pool = PeerPool(exporter.remote)
    cut = _Cut(exporter.image, at, held=held)
    pieces: list[tuple[int, bytes]] = []

    def sink(extents: list[Extent]) -> None:
        pieces.append(_bytes(extents))
        if len(pieces) == 1:
            cut.run()  # on this loop: nothing more is read from the exporter until it returns

    try:
        with structlog.testing.capture_logs() as logs:
            src = await pool.acquire_async(exporter.url)
            with pytest.raises(SourceError, match="shrank"):
                await src.fetch_into(0, SIZE, sink)
        corrupt = [x for x in logs if x.get("event") == "peer_data_corrupt_retrying"]
        assert not corrupt, corrupt
        assert cut.done.is_set()
        for off, data in pieces:
            _check(exporter.ref, off, data, "bulk piece")
        assert sum(len(d) for _, d in pieces) < SIZE
        assert exporter.daemon.alive(), (f"the exporter died (exit {exporter.daemon.proc.returncode})",
                                         exporter.daemon.log.read_text()[-2000:])
        await asyncio.get_running_loop().run_in_executor(None, cut.restore, exporter.ref)
        off, data = _bytes(await src.fetch(0, SIZE))
        _check(exporter.ref, off, data, "after the cut")
    finally:
        if cut.fd >= 0:
            os.close(cut.fd)
        pool.close()


def _connect(e: Exporter) -> socket.socket:
    """A bulk link whose receive window is a few pages: the exporter soon
    has frames it cannot send, and waits with the rest of the read to go."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", int(e.url.split(":")[2].split("/")[0])))
    if not e.remote.tls_ca:
        return raw
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=e.remote.tls_ca)
    ctx.load_cert_chain(e.remote.tls_cert, e.remote.tls_key)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _next(sock: socket.socket, c: pp.ClientConnection, nbytes: int = 1 << 16) -> object:
    """The next protocol event, receiving ``nbytes`` at a time as needed."""
    for x in c.data_to_send():
        sock.sendall(x)
    while True:
        ev = c.next_event()
        if ev is not pp.NEED_DATA:
            return ev
        c.receive_data(sock.recv(nbytes))


def _raw_cut(e: Exporter, held: bool) -> None:
    zstd = ("zstd",) if "compress_level = 1" in e.daemon.config.read_text() else ()
    at = SIZE - MiB + 3 * PAGE + 1000  # inside the read's last frame
    cut = _Cut(e.image, at, held=held)
    with _connect(e) as s:
        c = pp.ClientConnection("bulk", encodings=zstd)
        assert isinstance(_next(s, c), pp.Welcome)
        c.open(1, "img")
        assert isinstance(_next(s, c), pp.Opened)
        rid = c.read(1, 0, SIZE)
        for x in c.data_to_send():
            s.sendall(x)
        c.receive_data(s.recv(PAGE))  # the read is being answered; nothing more is read until the cut is done
        try:
            cut.run()
            ev = _next(s, c)
            assert isinstance(ev, pp.ReadFailed), ev
            assert ev.request_id == rid, ev
            assert ev.code == pp.ErrorCode.SOURCE_ERROR, ev
            assert "shrank" in ev.message, ev
            assert e.daemon.alive()
            cut.restore(e.ref)
            c.read(1, 0, SIZE)
            ev = _next(s, c)
            assert isinstance(ev, pp.ReadDone), ev
            assert ev.buffer is not None, ev
            assert bytes(ev.buffer.view) == e.ref
        finally:
            if cut.fd >= 0:
                os.close(cut.fd)
            if not e.daemon.alive():
                pytest.fail(f"the exporter died (exit {e.daemon.proc.returncode})")


@pytest.mark.parametrize("held", [False, True], ids=["by_path", "held_open"])
def test_cut_while_the_reader_is_slow(exporter: Exporter, held: bool) -> None:
    """A reader that takes its bulk read slowly holds the exporter mid-read
    while the file is cut below the read's last frame: that frame is an
    ERROR for the read (before: SIGBUS in the checksum, the compressor or
    TLS, or bytes sent from the cut mapping), and the same link then reads
    the whole image, put back, right."""
    _raw_cut(exporter, held)
