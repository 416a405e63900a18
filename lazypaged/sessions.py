"""The daemon's table of sessions: what status, metrics and shutdown look at."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from .session import RestoreSession


class SessionTable:
    """Live sessions, plus failed ones that still hold a uffd (see session.py)."""

    def __init__(self) -> None:
        self._live: dict[str, RestoreSession] = {}
        self.finished = 0
        self._changed = asyncio.Event()

    def add(self, s: RestoreSession) -> None:
        self._live[s.id] = s
        s.on_released = self._released

    def _released(self, s: RestoreSession) -> None:
        if self._live.pop(s.id, None) is not None:
            self.finished += 1
        self._changed.set()

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[RestoreSession]:
        return iter(list(self._live.values()))

    def running(self) -> list[RestoreSession]:
        return [s for s in self._live.values() if s.outcome is None]

    async def wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()
