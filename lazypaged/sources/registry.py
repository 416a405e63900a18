"""Resolving snapshot names from handoff requests to open sources.

Clients name snapshots relative to the configured snapshot directories. A
name is resolved with every symlink followed and must land inside one of
those directories: absolute paths, ``..`` and links that point outside are
refused, so a client can only ever read what the operator put there.
Opened sources are shared between sessions and closed with their last user.
Names of the form ``peer://HOST:PORT/NAME`` are exports of another lazypaged,
read over the network (sources/remote.py); they bypass the directory rules.

A snapshot is a regular file: a lazypaged snapshot (recognised by its magic)
or a raw memory image. Anything else is refused without being opened (a
FIFO in a snapshot directory would otherwise block the daemon in open()).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..config import RemoteConfig
from .base import PageSource, SourceError
from .open import open_source
from .remote import PeerPool, RemoteSource

#: Lookup errors that mean "no such snapshot here" rather than "broken".
_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


class UnknownSource(SourceError):
    """No snapshot of that name in any snapshot directory."""


class ForbiddenSource(SourceError):
    """The name points outside the snapshot directories."""


class SourceRegistry:
    def __init__(self, snapshot_dirs: tuple[Path, ...], remote: RemoteConfig | None = None) -> None:
        self._dirs = [Path(os.path.realpath(d)) for d in snapshot_dirs]
        self._open: dict[tuple[int, int], tuple[PageSource, int]] = {}
        #: ``peer://HOST:PORT/NAME`` sources, shared per peer (sources/remote.py).
        self.peers = PeerPool(remote)

    def resolve(self, name: str) -> Path:
        """The real path of snapshot ``name``, or raise."""
        if not name or "\0" in name:
            raise ForbiddenSource(f"invalid snapshot name {name!r}")
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ForbiddenSource(f"snapshot name {name!r} must be relative to a snapshot directory, without '..'")
        for d in self._dirs:
            real = Path(os.path.realpath(d / name))
            if not real.is_relative_to(d):
                raise ForbiddenSource(f"snapshot {name!r} resolves outside the snapshot directory {d}")
            try:
                st = real.stat()
            except OSError as e:
                if e.errno in _NOT_THERE:
                    continue
                raise SourceError(f"cannot look up snapshot {name!r}: {e.strerror}") from None
            if stat.S_ISREG(st.st_mode):
                return real
        raise UnknownSource(f"no snapshot named {name!r} in {', '.join(map(str, self._dirs))}")

    def acquire(self, name: str) -> PageSource:
        if PeerPool.handles(name):
            return self.peers.acquire(name)
        path = self.resolve(name)
        try:
            st = path.stat()
        except OSError as e:
            raise SourceError(f"cannot open snapshot {name!r}: {e.strerror}") from None
        key = (st.st_dev, st.st_ino)
        if key in self._open:
            src, refs = self._open[key]
            self._open[key] = (src, refs + 1)
            return src
        try:
            src = open_source(path, name=name)
        except OSError as e:
            raise SourceError(f"cannot open snapshot {name!r}: {e.strerror}") from None
        self._open[key] = (src, 1)
        return src

    async def acquire_async(self, name: str) -> PageSource:
        """:meth:`acquire` without blocking the event loop on a peer's first contact."""
        if PeerPool.handles(name):
            return await self.peers.acquire_async(name)
        return self.acquire(name)

    def release(self, src: PageSource) -> None:
        if isinstance(src, RemoteSource) and self.peers.release(src):
            return
        for key, (s, refs) in list(self._open.items()):
            if s is src:
                if refs <= 1:
                    del self._open[key]
                    s.close()
                else:
                    self._open[key] = (s, refs - 1)
                return

    @property
    def open_sources(self) -> list[PageSource]:
        return [s for s, _ in self._open.values()] + list(self.peers.open_sources)

    def close(self) -> None:
        self.peers.close()
        for s, _ in self._open.values():
            s.close()
        self._open.clear()
