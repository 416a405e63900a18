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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazypaged.config import RemoteConfig
from lazypaged.sources.base import Extent, SourceError
from lazypaged.sources.remote import PeerPool, RemoteSource

from .conftest import DaemonHandle, MiB, start_daemon, stop_daemon
from .peer_pair import free_port

PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 8 * MiB
ROUNDS = int(os.environ.get("EXPORT_TRUNCATE_ROUNDS", "16"))


@dataclass
class Exporter:
    daemon: DaemonHandle
    image: Path
    ref: bytes
    url: str


def _exporter(tmp: Path, compress: int) -> Exporter:
    port = free_port()
    d = start_daemon(
        tmp,
        f'[export]\nlisten = "127.0.0.1:{port}"\nsnapshots = ["img"]\ncompress_level = {compress}\n',
    )
    return Exporter(d, d.snapshots / "img", b"", f"peer://127.0.0.1:{port}/img")


@pytest.fixture(params=[0, 1], ids=["plain", "zstd"])
def exporter(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Exporter]:
    # The image must exist when the exporter opens its exports.
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    ref = os.urandom(SIZE)  # no zero page: zeros anywhere are wrong bytes
    (snaps / "img").write_bytes(ref)
    e = _exporter(tmp_path, int(request.param))
    e.ref = ref
    try:
        yield e
    finally:
        if e.daemon.alive():
            stop_daemon(e.daemon)


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
    pool = PeerPool(RemoteConfig(stall_timeout=2.0, reconnect_deadline=3.0, connect_timeout=1.0, backoff_max=0.1))
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
