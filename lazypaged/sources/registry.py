"""Resolving snapshot names from handoff requests to open sources.

Clients name snapshots relative to the configured snapshot directories. A
name is resolved with every symlink followed and must land inside one of
those directories: absolute paths, ``..`` and links that point outside are
refused, so a client can only ever read what the operator put there.
Opened sources are shared between sessions; after their last user they stay
open for ``LINGER_S`` seconds, so restoring the same image again does not
pay for opening it again (mapping it, finding its holes, checking its index).
A file changed in the meantime (size or ctime) is opened anew.
Names of the form ``peer://HOST:PORT/NAME`` are exports of another lazypaged,
read over the network (sources/remote.py); they bypass the directory rules.

A snapshot is a regular file: a lazypaged snapshot or a raw memory image,
the kind decided by sources/open.py from the name (``*.lzs`` must be a
snapshot) and the exact magic; a near miss of the magic is refused, never
served raw. Anything else is refused without being opened (a FIFO in a
snapshot directory would otherwise block the daemon in open()).

:meth:`SourceRegistry.reload` takes new snapshot directories (SIGHUP): they
govern every lookup after it, while sources already open stay open for the
sessions using them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

from ..config import Config, RemoteConfig
from .base import PageSource, SourceError
from .open import open_source
from .remote import PeerPool, RemoteSource

#: Lookup errors that mean "no such snapshot here" rather than "broken".
_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


class UnknownSource(SourceError):
    """No snapshot of that name in any snapshot directory."""


class ForbiddenSource(SourceError):
    """The name points outside the snapshot directories."""


#: Seconds an unused source stays open for the next restore of the same image.
LINGER_S = 30.0

_Key = tuple[int, int, int, int]


class SourceRegistry:
    def __init__(
        self, snapshot_dirs: tuple[Path, ...], remote: RemoteConfig | None = None, linger: float = LINGER_S
    ) -> None:
        self._linger_s = linger
        self._dirs = [Path(os.path.realpath(d)) for d in snapshot_dirs]
        self._open: dict[_Key, tuple[PageSource, int]] = {}
        self._paths: dict[_Key, Path] = {}
        self._idle: dict[_Key, asyncio.TimerHandle] = {}
        #: ``peer://HOST:PORT/NAME`` sources, shared per peer (sources/remote.py).
        self.peers = PeerPool(remote)

    @property
    def snapshot_dirs(self) -> tuple[Path, ...]:
        return tuple(self._dirs)

    def reload(self, cfg: Config) -> None:
        """Adopt ``cfg``'s snapshot directories and linger time for lookups from now on.

        Sources in use stay open until their sessions release them (a running
        restore must not lose its pages to a configuration change); idle ones
        that no longer lie inside a configured directory are closed now, so a
        directory taken out of the configuration stops being served at once."""
        self._dirs = [Path(os.path.realpath(d)) for d in cfg.snapshot_dirs]
        self._linger_s = cfg.source_linger
        for key, path in list(self._paths.items()):
            entry = self._open.get(key)
            if entry is not None and entry[1] <= 0 and not self._inside(path):
                idle = self._idle.pop(key, None)
                if idle is not None:
                    idle.cancel()
                self._close_idle(key)

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(d) for d in self._dirs)

    def resolve(self, name: str) -> Path:
        """The real path of snapshot ``name``, or raise."""
        if not name or "\0" in name:
            raise ForbiddenSource(f"invalid snapshot name {name!r}")
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ForbiddenSource(f"snapshot name {name!r} must be relative to a snapshot directory, without '..'")
        # A file name, never a directory spelling: "img/" or "img/." would
        # otherwise resolve to "img" and serve it under another name.
        if name.endswith(("/", "/.")) or name == ".":
            raise UnknownSource(f"snapshot name {name!r} names a directory, not a snapshot file")
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
            raise SourceError(f"cannot open snapshot {name!r}: {e.strerror or e}") from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
        if key in self._open:
            src, refs = self._open[key]
            self._open[key] = (src, refs + 1)
            idle = self._idle.pop(key, None)
            if idle is not None:
                idle.cancel()
            return src
        try:
            src = open_source(path, name=name)
        except OSError as e:
            raise SourceError(f"cannot open snapshot {name!r}: {e.strerror or e}") from None
        self._open[key] = (src, 1)
        self._paths[key] = path
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
                self._open[key] = (s, refs - 1)
                if refs <= 1:
                    self._linger(key)
                return

    @property
    def open_sources(self) -> list[PageSource]:
        return [s for s, _ in self._open.values()] + list(self.peers.open_sources)

    def _linger(self, key: _Key) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._linger_s <= 0:
            self._close_idle(key)
            return
        self._idle[key] = loop.call_later(self._linger_s, self._close_idle, key)

    def _close_idle(self, key: _Key) -> None:
        self._idle.pop(key, None)
        entry = self._open.get(key)
        if entry is not None and entry[1] <= 0:
            del self._open[key]
            self._paths.pop(key, None)
            entry[0].close()

    def close(self) -> None:
        for handle in self._idle.values():
            handle.cancel()
        self._idle.clear()
        self.peers.close()
        for s, _ in self._open.values():
            s.close()
        self._open.clear()
        self._paths.clear()
