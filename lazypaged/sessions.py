"""The daemon's table of sessions: what status, metrics and shutdown look at."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import structlog

from .session import Outcome, RestoreSession
from .sources import PageSource, SourceError
from .sources.registry import SourceRegistry


class SessionTable:
    """Live sessions, plus failed ones that still hold a uffd (see session.py).

    It is also the ``SessionHost`` of every session: a target's fork arrives
    here as a child session, which it runs with its own references to the
    parent's sources.
    """

    def __init__(self, registry: SourceRegistry | None = None) -> None:
        self._live: dict[str, RestoreSession] = {}
        self.finished = 0
        self._changed = asyncio.Event()
        self._registry = registry
        self._children: set[asyncio.Task[Outcome]] = set()
        self.log = structlog.get_logger()
        #: Called with each session as it leaves the table, its stats final
        #: (metrics totals, timelines). A hook must not raise.
        self.on_removed: list[Callable[[RestoreSession], None]] = []
        #: Called with each session as it enters the table (custody: its
        #: description is saved for a restarted daemon). A hook must not raise.
        self.on_added: list[Callable[[RestoreSession], None]] = []

    def add(self, s: RestoreSession) -> None:
        self._live[s.id] = s
        s.on_released = self._released
        for hook in self.on_added:
            hook(s)

    def _released(self, s: RestoreSession) -> None:
        if self._live.pop(s.id, None) is not None:
            self.finished += 1
            for hook in self.on_removed:
                hook(s)
        self._changed.set()

    def adopt(self, child: RestoreSession) -> None:
        """Serve a forked child's session, holding its sources while it runs."""
        held: list[PageSource] = []
        if self._registry is not None:
            for r in child.regions:
                try:
                    held.append(self._registry.acquire(r.source.name))
                except SourceError as e:  # the snapshot vanished: keep using the open one
                    self.log.warning("fork_source_reacquire_failed", source=r.source.name, error=str(e))
        self.add(child)

        def ended(s: RestoreSession) -> None:
            if self._registry is not None:
                for src in held:
                    self._registry.release(src)
            s.log.info("session_ended", outcome=s.state, code=s.outcome.code if s.outcome else "", **{
                k: v for k, v in s.summary().items() if k not in ("session", "kind", "pid", "state")
            })

        child.on_end = ended
        task = asyncio.get_running_loop().create_task(child.run(), name=f"session-{child.id}")
        self._children.add(task)
        task.add_done_callback(self._children.discard)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[RestoreSession]:
        return iter(list(self._live.values()))

    def running(self) -> list[RestoreSession]:
        return [s for s in self._live.values() if s.outcome is None]

    async def wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()
