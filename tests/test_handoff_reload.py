"""HandoffServer.reload: new rules for new requests, running sessions untouched.

The server runs in this test's event loop on a private socket; the client
side runs in a worker thread with blocking sockets and a real uffd.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import socket
from pathlib import Path

import pytest

from lazypaged import handoff_protocol as hp
from lazypaged.config import Config, from_dict
from lazypaged.handoff_server import HandoffServer
from lazypaged.sessions import SessionTable
from lazypaged.sources.registry import SourceRegistry
from lazypaged.uffd import Userfaultfd

PAGE = mmap.PAGESIZE


def _config(tmp: Path, **access: object) -> Config:
    (tmp / "snaps").mkdir(exist_ok=True)
    return from_dict(
        {
            "daemon": {"handoff_socket": str(tmp / "h.sock"), "snapshot_dirs": [str(tmp / "snaps")],
                       "request_timeout": 5.0},
            "access": dict(access),
        }
    )


def _code(msg: hp.Message | None) -> str:
    """The refusal code of a reply, or what the reply was instead."""
    return msg.code if isinstance(msg, hp.Error) else repr(msg)


def _ask(path: Path, nranges: int) -> hp.Message:
    """A request of ``nranges`` one-page ranges naming a snapshot nobody has."""
    mem = mmap.mmap(-1, nranges * 2 * PAGE)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        ranges = tuple(hp.RangeSpec(base + 2 * i * PAGE, PAGE, "nothing.img") for i in range(nranges))
        with Userfaultfd.create() as u, socket.socket(socket.AF_UNIX) as s:
            u.api(0)
            s.settimeout(10)
            s.connect(str(path))
            data = hp.encode(hp.RestoreRequest(ranges))
            socket.send_fds(s, [data], [u.fileno()])
            dec = hp.FrameDecoder()
            while True:
                chunk = s.recv(65536)
                assert chunk, "closed without a reply"
                msgs = dec.feed(chunk)
                if msgs:
                    return msgs[0]
    finally:
        mem.close()


@pytest.mark.asyncio
async def test_reload_swaps_the_access_rules(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a real uffd")
    cfg = _config(tmp_path, max_regions_per_session=1)
    registry = SourceRegistry(cfg.snapshot_dirs)
    server = HandoffServer(cfg, registry, SessionTable(registry))
    await server.start()
    try:
        before = await asyncio.to_thread(_ask, cfg.handoff_socket, 2)
        assert _code(before) == "limit"
        server.reload(_config(tmp_path, max_regions_per_session=4))
        after = await asyncio.to_thread(_ask, cfg.handoff_socket, 2)
        # Past the limit now: refused further on, for the snapshot it names.
        assert _code(after) == "unknown_source"
        server.reload(_config(tmp_path, max_regions_per_session=1))
        again = await asyncio.to_thread(_ask, cfg.handoff_socket, 2)
        assert _code(again) == "limit"
    finally:
        server.stop_accepting()
        await server.close_connections()
    assert not cfg.handoff_socket.exists()


@pytest.mark.asyncio
async def test_reload_takes_request_limits_and_keeps_the_socket(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a real uffd")
    cfg = _config(tmp_path)
    registry = SourceRegistry(cfg.snapshot_dirs)
    server = HandoffServer(cfg, registry, SessionTable(registry))
    await server.start()
    try:
        other = tmp_path / "elsewhere.sock"
        new = from_dict({"daemon": {"handoff_socket": str(other), "snapshot_dirs": [str(tmp_path / "snaps")],
                                    "request_timeout": 0.25, "max_message_bytes": 4096}})
        server.reload(new)
        assert server.cfg.request_timeout == 0.25
        assert server.cfg.max_message_bytes == 4096
        # The listening socket is not moved by a reload: it stays where it was bound.
        assert server.cfg.handoff_socket == cfg.handoff_socket

        def idle() -> hp.Message | None:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(cfg.handoff_socket))
                data = s.recv(65536)
                return hp.FrameDecoder().feed(data)[0] if data else None

        reply = await asyncio.to_thread(idle)
        assert _code(reply) == "timeout"
    finally:
        server.stop_accepting()
        await server.close_connections()
    assert not cfg.handoff_socket.exists()
