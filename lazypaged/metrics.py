"""Prometheus metrics, read from the sessions at scrape time.

Nothing is counted on the fault path for this: every session already keeps
its counters and a log2 latency histogram (``SessionStats``). A scrape adds
up the live sessions' counters and the totals of finished sessions, which
``FinishedTotals`` takes over when a session leaves the session table, so
every ``_total`` only ever grows.

Labels: ``kind`` is the session kind (native, firecracker, criu); the
known kinds are exported from the start with zeros, so ``rate()`` works
from the first scrape. There is no per-session label: a session id would
make a new series for every restore. ``lazypaged status`` has the
per-session view.

The HTTP side is h11 (a sans-IO HTTP/1.1 state machine) under asyncio on
the daemon's own loop: the collector then runs between two fault batches,
never concurrently with a session, and needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import structlog
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .config import parse_host_port
from .session import RestoreSession
from .session_stats import SessionStats
from .sessions import SessionTable

#: Session kinds exported with zeros before any session of that kind ran.
KNOWN_KINDS = ("native", "firecracker", "criu")
#: Fault latency buckets exported: < 2**k µs for k up to this (2**24 µs is
#: ~17 s; slower faults land in +Inf). Bucket k of ``latency_us_log2`` counts
#: faults served in [2**(k-1), 2**k) µs, so the cumulative count up to k is
#: exactly the number served in under 2**k µs.
LATENCY_MAX_LOG2 = 24
#: Restore durations (seconds) of completed sessions.
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Largest request head accepted; a scraper sends a few hundred bytes.
MAX_REQUEST_HEAD = 16 << 10
#: Seconds a keep-alive connection may sit idle between scrapes.
IDLE_TIMEOUT = 120.0
#: Seconds a request head (and its body) may take to arrive, counted from the
#: connection (first request) or from its first byte (later ones): a scraper
#: sends it in one piece, a slow-loris one byte at a time. Past it: 408.
HEADER_TIMEOUT = 5.0
#: Connections kept at once. A newer one takes the place of the one that has
#: waited longest for its request, so stalled connections cannot lock a
#: scraper out; only when all of them are being answered is it refused (503).
MAX_CLIENTS = 16


@dataclass
class KindTotals:
    """Counters of the sessions of one kind that have left the table."""

    faults: int = 0
    bytes_copied: int = 0
    bytes_zero: int = 0
    bytes_fault: int = 0
    bytes_fill: int = 0
    fault_ns: int = 0
    source_errors: int = 0
    bytes_poisoned: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * 32)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    durations: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    completed: int = 0

    def add(self, st: SessionStats) -> None:
        """Add one session's counters (live or finished alike)."""
        self.faults += st.faults
        self.bytes_copied += st.bytes_copied
        self.bytes_zero += st.bytes_zero
        self.bytes_fault += st.bytes_fault
        self.bytes_fill += st.bytes_fill
        self.fault_ns += st.fault_ns
        self.source_errors += st.source_errors
        self.bytes_poisoned += st.bytes_poisoned
        for k, n in enumerate(st.latency_us_log2):
            self.latency[min(k, len(self.latency) - 1)] += n


class FinishedTotals:
    """What finished sessions leave behind; fed by the session table's hook."""

    def __init__(self) -> None:
        self.by_kind: dict[str, KindTotals] = {k: KindTotals() for k in KNOWN_KINDS}

    def record(self, s: RestoreSession) -> None:
        t = self.by_kind.setdefault(s.kind, KindTotals())
        st = s.stats
        t.add(st)
        outcome = s.outcome
        t.outcomes[outcome.state if outcome else "abandoned"] += 1
        if outcome is not None and outcome.state == "failed":
            t.errors[outcome.code or "unknown"] += 1
        if outcome is not None and outcome.state == "complete":
            t.completed += 1
            t.duration_sum += st.seconds
            for i, le in enumerate(DURATION_BUCKETS):
                if st.seconds <= le:
                    t.durations[i] += 1


def _latency_buckets(hist: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    seen = 0
    for k in range(LATENCY_MAX_LOG2 + 1):
        seen += hist[k] if k < len(hist) else 0
        out.append((repr((1 << k) / 1e6), float(seen)))
    out.append(("+Inf", float(sum(hist))))
    return out


class SessionCollector(Collector):
    def __init__(self, sessions: SessionTable, finished: FinishedTotals) -> None:
        self.sessions = sessions
        self.finished = finished

    def collect(self) -> Iterator[Metric]:
        live: dict[str, KindTotals] = {}
        states: Counter[tuple[str, str]] = Counter()
        remaining: Counter[str] = Counter()
        for s in self.sessions:
            st = s.stats
            live.setdefault(s.kind, KindTotals()).add(st)
            states[s.kind, s.state] += 1
            remaining[s.kind] += st.pages_missing
        kinds = sorted(set(self.finished.by_kind) | set(live))
        done = self.finished.by_kind
        zero = KindTotals()

        def total(kind: str, attr: str) -> float:
            return float(getattr(done.get(kind, zero), attr) + getattr(live.get(kind, zero), attr))

        info = GaugeMetricFamily("lazypaged_build_info", "lazypaged version running", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info

        faults = CounterMetricFamily("lazypaged_faults", "Page faults served", labels=["kind"])
        blocked = CounterMetricFamily(
            "lazypaged_target_blocked_seconds",
            "Time faulting threads waited on the daemon, from reading the fault to installing the page "
            "(a lower bound: the kernel's wake-ups are not included)",
            labels=["kind"],
        )
        installed = CounterMetricFamily(
            "lazypaged_installed_bytes",
            "Bytes installed, by method: copy (UFFDIO_COPY), zero (UFFDIO_ZEROPAGE) or poison (UFFDIO_POISON, "
            "failure policy sigbus)",
            labels=["kind", "method"],
        )
        source_failures = CounterMetricFamily(
            "lazypaged_source_failures",
            "Times a source could not deliver pages (file gone, checksum failure, peer past its deadline); "
            "each is a use of the session's failure policy",
            labels=["kind"],
        )
        fault_bytes = CounterMetricFamily(
            "lazypaged_fault_bytes", "Bytes installed in answer to faults, fault-around included", labels=["kind"]
        )
        fill_bytes = CounterMetricFamily(
            "lazypaged_fill_bytes", "Bytes installed by the background fill (rate() of it is the fill throughput)",
            labels=["kind"],
        )
        latency = HistogramMetricFamily(
            "lazypaged_fault_service_seconds", "Fault service time, power-of-two microsecond buckets",
            labels=["kind"],
        )
        for kind in kinds:
            faults.add_metric([kind], total(kind, "faults"))
            blocked.add_metric([kind], total(kind, "fault_ns") / 1e9)
            installed.add_metric([kind, "copy"], total(kind, "bytes_copied"))
            installed.add_metric([kind, "zero"], total(kind, "bytes_zero"))
            installed.add_metric([kind, "poison"], total(kind, "bytes_poisoned"))
            source_failures.add_metric([kind], total(kind, "source_errors"))
            fault_bytes.add_metric([kind], total(kind, "bytes_fault"))
            fill_bytes.add_metric([kind], total(kind, "bytes_fill"))
            hist = [a + b for a, b in zip(done.get(kind, zero).latency, live.get(kind, zero).latency, strict=True)]
            latency.add_metric([kind], _latency_buckets(hist), total(kind, "fault_ns") / 1e9)
        yield from (faults, blocked, installed, source_failures, fault_bytes, fill_bytes, latency)

        pages = GaugeMetricFamily(
            "lazypaged_pages_remaining", "Pages live sessions have still to install", labels=["kind"]
        )
        sessions = GaugeMetricFamily("lazypaged_sessions", "Sessions in the daemon's table, by state",
                                     labels=["kind", "state"])
        for kind in kinds:
            pages.add_metric([kind], float(remaining[kind]))
            sessions.add_metric([kind, "running"], float(states[kind, "running"]))
        for (kind, state), n in sorted(states.items()):
            if state != "running":
                sessions.add_metric([kind, state], float(n))
        yield from (pages, sessions)

        ended = CounterMetricFamily("lazypaged_sessions_ended", "Sessions ended, by outcome",
                                    labels=["kind", "outcome"])
        errors = CounterMetricFamily("lazypaged_session_errors", "Sessions failed, by error code",
                                     labels=["kind", "code"])
        durations = HistogramMetricFamily("lazypaged_restore_duration_seconds",
                                          "Handoff to last page installed, completed sessions", labels=["kind"])
        for kind, t in sorted(done.items()):
            for outcome in ("complete", "target_exited", "failed"):
                ended.add_metric([kind, outcome], float(t.outcomes[outcome]))
            for code, n in sorted(t.errors.items()):
                errors.add_metric([kind, code], float(n))
            buckets: list[tuple[str, float]] = []
            seen = 0
            for le, n in zip(DURATION_BUCKETS, t.durations, strict=True):
                seen += n
                buckets.append((repr(le), float(seen)))
            buckets.append(("+Inf", float(t.completed)))
            durations.add_metric([kind], buckets, t.duration_sum)
        yield from (ended, errors, durations)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def make_registry(sessions: SessionTable, finished: FinishedTotals) -> CollectorRegistry:
    """Session metrics plus the standard process ones (CPU, memory, fds)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SessionCollector(sessions, finished))
    ProcessCollector(registry=reg)
    return reg


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 (keep-alive), on the daemon's loop."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        self.host, self.port = parse_host_port(address)
        self.registry = registry
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        #: Clients waiting for (the rest of) a request, since when: those may be evicted.
        self._waiting: dict[asyncio.Task[None], float] = {}
        self.log = structlog.get_logger().bind(listener="metrics")

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accepted, self.host or None, self.port)
        except OSError as e:
            # Reported like a socket path in use: the daemon exits with a clear line.
            raise FileExistsError(
                f"cannot listen on {self.host or '*'}:{self.port} for metrics: {e.strerror or e}") from None
        bound = [s.getsockname() for s in self._server.sockets]
        if bound:
            self.port = bound[0][1]
        self.log.info("listening", address=[f"{a[0]}:{a[1]}" for a in bound], port=self.port)

    def stop_accepting(self) -> None:
        """Nothing: scrapes keep working while sessions drain."""

    async def close_connections(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for t in list(self._clients):
            t.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        peer = _peer_name(writer)
        try:
            if len(self._clients) > MAX_CLIENTS and not self._evict():
                self.log.warning("metrics_client_refused", peer=peer, reason="every connection is being answered")
                conn = h11.Connection(h11.SERVER)
                await self._send(conn, writer, 503, b"too many scrapes at once\n", "text/plain", head=False)
            else:
                await self._serve(reader, writer, peer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception as e:  # a bug: log it, keep serving
            self.log.error("metrics_bug", error=f"{type(e).__name__}: {e}", exc_info=e)
        finally:
            self._waiting.pop(task, None)
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _evict(self) -> bool:
        """Make room: drop the connection that has waited longest for its request."""
        if not self._waiting:
            return False
        oldest = min(self._waiting, key=self._waiting.__getitem__)
        del self._waiting[oldest]
        oldest.cancel()
        self.log.info("metrics_client_dropped", reason="evicted", clients=len(self._clients))
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        request: h11.Request | None = None
        #: When the request being read began: the connection for the first one,
        #: its first byte for later ones (None: idle between two scrapes).
        began: float | None = loop.time()
        self._waiting[task] = loop.time()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, writer, e.error_status_hint, b"bad request\n", "text/plain", head=False)
                return
            if event is h11.NEED_DATA:
                wait = IDLE_TIMEOUT if began is None else began + HEADER_TIMEOUT - loop.time()
                try:
                    data = await asyncio.wait_for(reader.read(65536), max(wait, 0.0))
                except TimeoutError:
                    if began is None:
                        self.log.debug("metrics_client_dropped", reason="idle", peer=peer)
                        return
                    self._waiting.pop(task, None)
                    self.log.info("metrics_client_dropped", reason="header_timeout", peer=peer,
                                  waited_s=HEADER_TIMEOUT)
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send(conn, writer, 408, b"request not received in time\n", "text/plain",
                                         head=False, extra=[(b"connection", b"close")])
                    return
                if data and began is None:
                    began = loop.time()
                    self._waiting[task] = began
                conn.receive_data(data)  # b"" tells h11 the peer closed
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                self._waiting.pop(task, None)  # being answered: not to be evicted
                await self._respond(conn, writer, request)
                request = None
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                began = None
                self._waiting[task] = loop.time()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request) -> None:
        method = req.method.decode("ascii", "replace")
        path = req.target.decode("ascii", "replace").partition("?")[0]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await self._send(conn, writer, 405, b"only GET and HEAD\n", "text/plain", head, [(b"allow", b"GET, HEAD")])
        elif path == "/metrics":
            # The scraper's Accept header picks the format (Prometheus text or OpenMetrics).
            accept = b",".join(v for k, v in req.headers if k == b"accept").decode("latin-1")
            encoder, ctype = choose_encoder(accept)
            await self._send(conn, writer, 200, encoder(self.registry), ctype, head)
        elif path == "/":
            await self._send(conn, writer, 200, b"lazypaged: metrics are at /metrics\n", "text/plain", head)
        else:
            await self._send(conn, writer, 404, b"not found: try /metrics\n", "text/plain", head)

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        head: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            *(extra or []),
        ]
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if not head:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()
