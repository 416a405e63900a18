"""Unix-socket plumbing shared by the listeners: fds in ancillary data, peer
credentials, and awaiting readability on a raw non-blocking socket."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")


class AncillaryTruncated(ConnectionError):
    """The kernel could not hand over every descriptor the peer attached.

    Either more were sent than the receive buffer had room for, or this
    process ran out of descriptors (EMFILE) while receiving them; the kernel
    closes the ones it could not deliver. ``received`` says how many did
    arrive (already closed by :func:`recv_fds`).
    """

    def __init__(self, received: int, maxfds: int) -> None:
        super().__init__(f"file descriptors truncated: {received} of at most {maxfds} received")
        self.received = received


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(pid, uid, gid)


async def wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """recvmsg with SCM_RIGHTS on a non-blocking socket; b"" means EOF.

    Received fds belong to the caller, even when it then refuses the message.
    """
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, bufsize, maxfds, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await wait_readable(sock)
            continue
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise AncillaryTruncated(len(fds), maxfds)
        return data, list(fds)


def listen_unix(path: Path, mode: int, backlog: int = 128) -> socket.socket:
    """Bind a listening stream socket at ``path``, replacing a stale socket file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            path.unlink()  # stale: nobody listens
        else:
            raise FileExistsError(f"{path} is in use by a running daemon")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
