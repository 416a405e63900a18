"""Session timelines: bytes installed and fault latency over time, to JSON.

A sampler task reads every running session's counters each ``interval``
(50 ms by default): no work per fault. When a session leaves the session
table its timeline gets a last sample and is written, off the event loop,
to ``<directory>/<UTC start>-<session id>.json``; the newest ``keep``
files are kept. ``lazypaged report FILE -o restore.png`` draws one.

File format (version 1), columns of equal length, one entry a sample::

    {"version": 1, "session": "…", "kind": "native", "pid": 1234,
     "sources": ["app.img"], "outcome": "complete", "code": "",
     "started_unix": 1700000000.123, "seconds": 2.5, "pages_total": 65536,
     "bytes_total": 268435456, "interval_s": 0.05,
     "samples": {"t": [...], "bytes_fault": [...], "bytes_fill": [...],
                 "bytes_installed": [...], "faults": [...],
                 "fault_p50_us": [...], "fault_p99_us": [...]}}

``t`` is seconds since the handoff; the byte and fault columns are running
totals; the latency columns describe the faults served since the previous
sample (upper bounds of power-of-two buckets; null when none were). A long
session is thinned as it goes: past ``MAX_SAMPLES`` every other sample is
dropped and the stride doubles, so a file stays small whatever the length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .session import PAGE, RestoreSession
from .sessions import SessionTable

VERSION = 1
#: Samples kept per session before thinning (about 3 minutes at 50 ms).
MAX_SAMPLES = 4096
_COLUMNS = ("t", "bytes_fault", "bytes_fill", "bytes_installed", "faults", "fault_p50_us", "fault_p99_us")


def interval_percentile_us(now: list[int], before: list[int], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile of the faults between two histograms."""
    diff = [a - b for a, b in zip(now, before, strict=False)]
    total = sum(diff)
    if total <= 0:
        return None
    want, seen = q * total, 0
    for k, n in enumerate(diff):
        seen += n
        if seen >= want:
            return float(1 << k)
    return float(1 << (len(diff) - 1))


@dataclass
class _Track:
    started_unix: float
    columns: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in _COLUMNS})
    last_hist: list[int] = field(default_factory=lambda: [0] * 32)
    stride: int = 1
    skipped: int = 0

    @classmethod
    def begin(cls, s: RestoreSession) -> _Track:
        """A track whose first sample is the handoff: nothing installed yet."""
        track = cls(time.time() - (time.monotonic() - s.stats.started))
        for name, col in track.columns.items():
            col.append(None if name.startswith("fault_p") else 0)
        track.columns["t"][0] = 0.0
        return track

    def sample(self, s: RestoreSession, now: float, *, force: bool = False) -> None:
        if not force and self.skipped + 1 < self.stride:
            self.skipped += 1
            return
        self.skipped = 0
        st = s.stats
        hist = list(st.latency_us_log2)
        c = self.columns
        c["t"].append(round(max(0.0, now - st.started), 6))
        c["bytes_fault"].append(st.bytes_fault)
        c["bytes_fill"].append(st.bytes_fill)
        c["bytes_installed"].append(st.bytes_copied + st.bytes_zero)
        c["faults"].append(st.faults)
        c["fault_p50_us"].append(interval_percentile_us(hist, self.last_hist, 0.5))
        c["fault_p99_us"].append(interval_percentile_us(hist, self.last_hist, 0.99))
        self.last_hist = hist
        if len(c["t"]) > MAX_SAMPLES:
            self._thin()

    def _thin(self) -> None:
        """Keep every other sample (always the first and the newest)."""
        for name, col in self.columns.items():
            kept = col[::2]
            if len(col) % 2 == 0:
                kept.append(col[-1])
            self.columns[name] = kept
        self.stride *= 2


def timeline_document(s: RestoreSession, track: _Track, interval: float) -> dict[str, Any]:
    st = s.stats
    outcome = s.outcome
    return {
        "version": VERSION,
        "session": s.id,
        "kind": s.kind,
        "pid": s.pid,
        "sources": sorted({r.source.name for r in s.regions}),
        "outcome": outcome.state if outcome else s.state,
        "code": outcome.code if outcome else "",
        "started_unix": round(track.started_unix, 6),
        "seconds": round(st.seconds, 6),
        "pages_total": st.pages_total,
        "bytes_total": sum(r.npages * r.page for r in s.regions) if s.regions else st.pages_total * PAGE,
        "interval_s": interval * track.stride,
        "samples": track.columns,
    }


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest timeline files (0: keep all)."""
    if keep <= 0:
        return
    files = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
    for old in files[: max(0, len(files) - keep)]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


class TimelineRecorder:
    """A daemon listener in form; ``session_removed`` is the table's hook."""

    def __init__(self, sessions: SessionTable, directory: Path, interval: float, keep: int) -> None:
        self.sessions = sessions
        self.directory = directory
        self.interval = interval
        self.keep = keep
        self._tracks: dict[str, _Track] = {}
        self._sampler: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Future[None]] = set()
        self.log = structlog.get_logger().bind(listener="timeline")

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sampler = asyncio.get_running_loop().create_task(self._run(), name="timeline-sampler")

    def stop_accepting(self) -> None:
        """Nothing: sessions that drain on shutdown still get their timeline."""

    async def close_connections(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def sample(self) -> None:
        now = time.monotonic()
        for s in self.sessions:
            if s.outcome is not None:
                continue
            track = self._tracks.get(s.id)
            if track is None:
                track = self._tracks[s.id] = _Track.begin(s)
            track.sample(s, now)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def session_removed(self, s: RestoreSession) -> None:
        track = self._tracks.pop(s.id, None)
        st = s.stats
        if track is None:  # ended before the sampler saw it
            track = _Track.begin(s)
        track.sample(s, st.ended if st.ended is not None else time.monotonic(), force=True)
        doc = timeline_document(s, track, self.interval)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(track.started_unix))
        path = self.directory / f"{stamp}-{s.id}.json"
        fut = asyncio.get_running_loop().run_in_executor(None, self._write, path, doc)
        self._writes.add(fut)

        def written(fut: asyncio.Future[None]) -> None:
            self._writes.discard(fut)
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                s.log.warning("timeline_write_failed", path=str(path), error=str(exc))
            else:
                s.log.info("timeline_written", path=str(path))

        fut.add_done_callback(written)

    def _write(self, path: Path, doc: dict[str, Any]) -> None:
        write_atomically(path, doc)
        prune(self.directory, self.keep)
