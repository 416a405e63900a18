"""``lazypaged serve``: the daemon's lifetime, from listening to shutdown.

Shutdown order (SIGTERM or SIGINT):

1. stop accepting handoffs (the socket file is removed);
2. let running sessions finish for ``shutdown_grace`` seconds — the fill keeps
   streaming, so most restores complete;
3. after the grace period, sessions whose restorer kept its own uffd copy
   (``keeps_uffd``, the default of the bundled client) are let go: the target
   keeps blocking on missing pages until a new daemon serves it, it never
   reads zeros. Sessions whose uffd only the daemon holds keep being served
   until they complete, because closing that fd would make the kernel fill
   the target's missing pages with zeros;
4. a second signal forces exit: targets of sessions that are still not
   complete and whose uffd only the daemon holds are killed with SIGKILL
   (through a pidfd) *before* the fd is closed. A killed target is a clear
   failure; silently wrong memory is not an option.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Protocol

import structlog

from . import log as logsetup
from .access import SocketOwner
from .adopt import Custody
from .config import Config
from .firecracker_server import FirecrackerServer
from .handoff_server import HandoffServer
from .notify import notify
from .operations import control_socket_path
from .operations import listeners as operator_listeners
from .sessions import SessionTable
from .sources.registry import SourceRegistry


class Listener(Protocol):
    """Anything the daemon starts and stops with itself: the handoff socket,
    other handoff dialects, control and metrics endpoints, peer exports."""

    async def start(self) -> None: ...

    def stop_accepting(self) -> None: ...

    async def close_connections(self) -> None: ...


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.registry = SourceRegistry(cfg.snapshot_dirs, cfg.remote, linger=cfg.source_linger)
        self.sessions = SessionTable(self.registry)
        self.handoff = HandoffServer(cfg, self.registry, self.sessions)
        #: Started in this order after the handoff socket; stopped with it.
        #: Each optional listener is appended here when its config enables it.
        self.listeners: list[Listener] = []
        #: First: it re-adopts sessions of a killed predecessor and saves new ones.
        self.listeners.append(Custody(cfg, self.registry, self.sessions))
        if cfg.firecracker.socket:
            self.listeners.append(FirecrackerServer(cfg, self.sessions))
        if cfg.criu.enabled:
            from .criu.server import CriuListener

            self.listeners.append(CriuListener(cfg.criu, cfg.session, self.sessions))
        if cfg.export.listen:
            from .peer_server import ExportServer

            self.listeners.append(ExportServer(cfg.export, self.registry, cfg.access.peer_identities))
        #: Monitor (STATUS=, watchdog), control socket, metrics, timelines.
        self.listeners += operator_listeners(self)
        if cfg.access.socket_group:  # after the control listener has made its socket
            self.listeners.append(SocketOwner(control_socket_path(cfg), cfg.access.socket_group))
        self.log = structlog.get_logger()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.ready = asyncio.Event()

    def request_stop(self) -> None:
        if self._stop.is_set():
            self.log.warning("second_signal", action="forcing exit")
            self._force.set()
        else:
            self.log.info("stopping", grace_s=self.cfg.shutdown_grace)
            self._stop.set()

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.handoff.start(_inherited_socket())
            for listener in self.listeners:
                await listener.start()
            notify("READY=1\nSTATUS=listening")
            self.ready.set()
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            notify("STOPPING=1")
            await self.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self.registry.close()
        return 0

    async def shutdown(self) -> None:
        self.handoff.stop_accepting()
        for listener in self.listeners:
            listener.stop_accepting()
        deadline = asyncio.get_running_loop().time() + self.cfg.shutdown_grace
        while self.sessions.running():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await self._wait_change(remaining)
            if self._force.is_set():
                break
        # Grace is over: let go of what is safe to let go of.
        for s in self.sessions:
            if s.keeps_uffd:
                s.abandon()
        while (held := [s.id for s in self.sessions]) and not self._force.is_set():
            self.log.warning(
                "waiting_for_sessions",
                sessions=held,
                reason="closing their uffd would zero-fill the targets; send the signal again to kill them",
            )
            await self._wait_change(5.0)
        for s in self.sessions:
            if s.pid:
                self.log.error("killing_target", session=s.id, pid=s.pid, reason="forced exit before restore completed")
                _kill(s.pid)
            s.abandon()
        await self.handoff.close_connections()
        for listener in self.listeners:
            await listener.close_connections()
        self.log.info("stopped", finished_sessions=self.sessions.finished)

    async def _wait_change(self, seconds: float) -> None:
        waits = [asyncio.ensure_future(self.sessions.wait_changed()), asyncio.ensure_future(self._force.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def _inherited_socket() -> socket.socket | None:
    """The handoff socket passed by systemd socket activation, if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for i in range(n):
        fd = 3 + i
        if i < len(names) and names[i] not in ("", "handoff", "lazypaged.socket"):
            continue
        return socket.socket(fileno=fd)
    return None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (it is a dependency); asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _raise_fd_limit() -> None:
    """Each session holds a uffd, a pidfd and a connection: lift the soft
    RLIMIT_NOFILE to the hard limit so max_sessions fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(cfg: Config) -> int:
    logsetup.setup(cfg.log_format, cfg.log_level)
    _raise_fd_limit()
    loop = new_event_loop()
    try:
        return loop.run_until_complete(Daemon(cfg).run())
    except OSError as e:  # a socket in use, a missing file: nothing was served yet
        structlog.get_logger().error("cannot_start", error=str(e))
        print(f"lazypaged: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
