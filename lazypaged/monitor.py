"""Once a second: install rates per session, systemd STATUS=, watchdog pings.

Nothing here touches the fault path: the monitor reads the counters every
session keeps anyway (``SessionStats``) on a timer, so its cost is one
pass over the session table a second whatever the fault rate.

systemd (``Type=notify``): the daemon sends ``READY=1`` itself once it
listens; the monitor adds a ``STATUS=`` line whenever the text changes
(``systemctl status`` shows it) and, when the service manager asked for a
watchdog (``WATCHDOG_USEC``, and ``WATCHDOG_PID`` naming this process if
set), ``WATCHDOG=1`` at half the interval. The pings come from the event
loop, so a loop that stops turning stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .notify import notify
from .sessions import SessionTable

#: Seconds between two rate measurements (and STATUS= updates).
TICK = 1.0


@dataclass(frozen=True, slots=True)
class Rates:
    """Bytes a second over the last measured interval."""

    fill: float = 0.0
    install: float = 0.0


def watchdog_interval(env: dict[str, str] | os._Environ[str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings systemd asks for, or None."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


def human_rate(bps: float) -> str:
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s"):
        if bps < 1024 or unit == "GiB/s":
            return f"{bps:.0f} {unit}" if unit == "B/s" else f"{bps:.1f} {unit}"
        bps /= 1024
    raise AssertionError("unreachable")


class Monitor:
    """A daemon listener in form: started and stopped with the others."""

    def __init__(self, sessions: SessionTable, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.started = clock()
        self.stopping = False
        self._clock = clock
        #: session id → (time, bytes_fill, bytes installed) at the last tick.
        self._last: dict[str, tuple[float, int, int]] = {}
        self._rates: dict[str, Rates] = {}
        self._status = ""
        self._tasks: list[asyncio.Task[None]] = []

    # -- Listener -------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._ticker(), name="monitor"))
        interval = watchdog_interval()
        if interval is not None:
            self._tasks.append(loop.create_task(self._watchdog(interval), name="watchdog"))

    def stop_accepting(self) -> None:
        self.stopping = True
        self.tick()

    async def close_connections(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    # -- measuring -----------------------------------------------------------------
    def rates(self, sid: str) -> Rates:
        return self._rates.get(sid, Rates())

    def total_install_rate(self) -> float:
        return sum(r.install for r in self._rates.values())

    def tick(self) -> None:
        now = self._clock()
        seen: dict[str, tuple[float, int, int]] = {}
        rates: dict[str, Rates] = {}
        for s in self.sessions:
            st = s.stats
            sample = (now, st.bytes_fill, st.bytes_copied + st.bytes_zero)
            seen[s.id] = sample
            if s.outcome is not None:
                continue  # finished (a failed one waits for its target): no rate
            # A session younger than one tick is measured from its start.
            t0, fill0, inst0 = self._last.get(s.id, (st.started, 0, 0))
            dt = now - t0
            if dt > 0:
                rates[s.id] = Rates((sample[1] - fill0) / dt, (sample[2] - inst0) / dt)
        self._last, self._rates = seen, rates
        self._set_status(self.status_text())

    def status_text(self) -> str:
        live = sum(1 for s in self.sessions if s.outcome is None)
        finished = self.sessions.finished
        text = f"{live} session{'s' if live != 1 else ''}, {human_rate(self.total_install_rate())} installed, " \
               f"{finished} finished"
        return f"stopping: {text}" if self.stopping else text

    def _set_status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            notify(f"STATUS={text}")

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.tick()

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)
