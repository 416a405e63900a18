"""Daemon configuration: a typed object built from TOML (or directly in tests).

The documented defaults live in ``config/lazypaged.toml``; the values below
must match it (``tests/test_config.py`` checks).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from .access import AccessConfig, AccessError


class ConfigError(Exception):
    """The configuration file is unreadable or holds an invalid value."""


@dataclass(frozen=True)
class SessionConfig:
    #: First fault-around window; doubles while faults are sequential.
    fault_around_min: int = 64 << 10
    #: Largest fault-around window (one UFFDIO_COPY per fault at most this big).
    fault_around_max: int = 2 << 20
    fault_around: bool = True
    #: Stream every remaining page in the background until the image is in.
    fill: bool = True
    #: Bytes per background UFFDIO_COPY; faults are served between chunks.
    #: (A peer's fill is installed frame by frame as it arrives instead.)
    fill_chunk: int = 2 << 20
    #: When a source cannot deliver pages (file gone, checksum failure, peer
    #: past its deadline): "wait" keeps them missing and retries, "sigbus"
    #: poisons them (touching raises SIGBUS), "kill" SIGKILLs the target.
    #: Never zeros.
    failure_policy: str = "wait"
    #: After a fault, keep reading the uffd this long (µs) before sleeping in
    #: the event loop, while this is the only session being served.
    fault_poll_us: int = 50


@dataclass(frozen=True)
class WorkingSetConfig:
    """Working-set record and replay (docs/working-set.md)."""

    #: Replay a recorded working set first; record one where none exists.
    enabled: bool = True
    #: Faults recorded during this many seconds after the handoff.
    record_seconds: float = 10.0
    #: While recording, the fill waits until faults pause this long (pages
    #: the fill installs never fault, so they would be missing from the record).
    record_quiet: float = 0.2
    #: At most this many bytes of working set per image.
    max_bytes: int = 256 << 20
    #: Recording granule: one chunk of the image per first fault.
    granule: int = 64 << 10
    #: Where records live; empty: beside each image as IMAGE.ws.
    dir: str = ""


@dataclass(frozen=True)
class FirecrackerConfig:
    """The Firecracker-compatible handoff listener (off while ``socket`` is empty)."""

    #: Unix socket Firecracker's UFFD backend connects to (``backend_path``).
    socket: str = ""
    #: The snapshot's guest memory file the regions are served from.
    mem_file: str = ""


@dataclass(frozen=True)
class CriuConfig:
    """[criu]: serve ``criu restore --lazy-pages`` (see docs/criu.md)."""

    #: Listen on lazy-pages.socket in work_dir while the daemon runs.
    enabled: bool = False
    #: The images directory of the dump being restored (criu -D).
    images_dir: str = ""
    #: Where lazy-pages.socket lives (criu -W); empty: images_dir.
    work_dir: str = ""
    #: Fetch pages from a running ``criu dump --lazy-pages`` page server at
    #: this address instead of pages-N.img; empty: local images.
    page_server_address: str = ""
    page_server_port: int = 0
    #: Page-server header layout: "auto" (from the pagemap images), "4.1" or "4.2".
    page_server_header: str = "auto"
    #: Background bytes kept outstanding on the page-server connection.
    page_server_window: int = 8 << 20
    #: Serve from this lazypaged snapshot of the images instead (docs/criu.md).
    snapshot: str = ""

    def check(self) -> None:
        if self.enabled and not self.images_dir:
            raise ConfigError("criu.enabled needs criu.images_dir")
        if bool(self.page_server_address) != bool(self.page_server_port):
            raise ConfigError("criu.page_server_address and criu.page_server_port go together")
        if not 0 <= self.page_server_port < 65536:
            raise ConfigError(f"criu.page_server_port = {self.page_server_port} is not a TCP port")
        if self.page_server_header not in ("auto", "4.1", "4.2"):
            raise ConfigError(f"criu.page_server_header must be auto, 4.1 or 4.2, not {self.page_server_header!r}")
        if self.page_server_window < 4096:
            raise ConfigError("criu.page_server_window must be at least one page")
        if self.snapshot and self.page_server_address:
            raise ConfigError("criu.snapshot and criu.page_server_address exclude each other")


@dataclass(frozen=True)
class ControlConfig:
    """[control]: the socket ``lazypaged status`` asks (docs/operations.md)."""

    #: Unix socket path; empty: control.sock in the handoff socket's directory.
    socket: str = ""
    #: Permissions of the control socket (octal string, like the handoff socket's).
    socket_mode: int = 0o660


def parse_host_port(text: str) -> tuple[str, int]:
    """ "127.0.0.1:9478", "[::1]:9478", ":9478" (every address) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{text!r} is not host:port (an IPv6 address in brackets: [::1]:9478)")
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1], int(port)
    if ":" in host:
        raise ConfigError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9478")
    return host, int(port)


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus endpoint at http://ADDRESS/metrics (off by default)."""

    enabled: bool = False
    #: host:port to listen on; IPv6 as "[::1]:9478"; port 0 picks a free one.
    address: str = "127.0.0.1:9478"

    def check(self) -> None:
        try:
            parse_host_port(self.address)
        except ConfigError as e:
            raise ConfigError(f"metrics.address: {e}") from None


@dataclass(frozen=True)
class TimelineConfig:
    """[timeline]: a JSON timeline per finished session (off by default)."""

    enabled: bool = False
    directory: Path = Path("/var/lib/lazypaged/timelines")
    #: Seconds between two samples of a session's counters.
    interval: float = 0.05
    #: Newest files kept in the directory; 0 keeps all.
    keep: int = 1000

    def check(self) -> None:
        if not 0.001 <= self.interval <= 60:
            raise ConfigError(f"timeline.interval = {self.interval} must be between 0.001 and 60 seconds")
        if self.keep < 0:
            raise ConfigError("timeline.keep must not be negative")


@dataclass(frozen=True)
class ExportConfig:
    """[export]: serve snapshots read-only to other lazypaged daemons (docs/peer-protocol.md)."""

    #: TCP address to listen on, "HOST:PORT" ("[::1]:7070" for IPv6); empty: no export.
    listen: str = ""
    #: Snapshot names (inside snapshot_dirs) that peers may read; nothing else is served.
    snapshots: tuple[Path, ...] = ()
    #: PEM files for TLS with mutual verification: this daemon's certificate and
    #: key, and the CA that client certificates must chain to.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    #: Allow plaintext on a non-loopback address (no authentication at all).
    insecure: bool = False
    #: zstd level for raw data on the wire (0: send it as it is). Compressed
    #: snapshot chunks always travel as they are when the client accepts zstd.
    compress_level: int = 0
    #: Reads one connection may have in flight.
    max_inflight: int = 256
    #: Connections served at once.
    max_connections: int = 64

    def check(self) -> None:
        from .peer_tls import check_export

        check_export(self)


@dataclass(frozen=True)
class RemoteConfig:
    """[remote]: reading pages from peers, named ``peer://HOST:PORT/NAME``."""

    #: PEM files: this daemon's client certificate and key, and the CA the
    #: peers' certificates must chain to. Empty tls_ca: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    #: Name checked in the peer's certificate instead of the HOST of the URL.
    server_name: str = ""
    #: Allow plaintext to a non-loopback peer.
    insecure: bool = False
    #: Offer zstd on the wire (the peer decides whether to use it).
    compression: bool = True
    #: Seconds for one connection attempt, TLS handshake included.
    connect_timeout: float = 5.0
    #: Reads outstanding and nothing received for this long: the link is
    #: taken for dead, dropped and re-established.
    stall_timeout: float = 5.0
    #: Seconds a lost link may stay down, counted from its loss (a stall:
    #: from the last byte received), never from a read. Past it the reads
    #: waiting on the link fail, and so does every later read at once until
    #: the peer answers again (it is still retried, backoff_max apart). What
    #: a failed read means is the session's failure_policy: wait retries the
    #: pages, sigbus poisons them, kill kills the target; never zeros. A
    #: handoff's (or an adoption's) first contact with an export is retried
    #: up to this long too, so restorers must wait longer for their answer.
    reconnect_deadline: float = 60.0
    #: Reconnect backoff doubles from 50 ms up to this many seconds.
    backoff_max: float = 1.0
    #: Receive buffer of bulk connections, in bytes (0: kernel autotuning).
    #: It caps bulk throughput at window ÷ round trip; urgent replies travel
    #: on their own connection, and the reader stops taking bulk bytes while
    #: one is awaited, so a bigger window costs faults little.
    bulk_window: int = 4 << 20

    def check(self) -> None:
        from .peer_tls import check_remote

        check_remote(self)


@dataclass(frozen=True)
class Config:
    handoff_socket: Path = Path("/run/lazypaged/handoff.sock")
    #: Permissions of the handoff socket (octal in TOML as a string, e.g. "0660").
    socket_mode: int = 0o660
    #: Snapshot names in handoff requests resolve inside these directories only.
    snapshot_dirs: tuple[Path, ...] = (Path("/var/lib/lazypaged/snapshots"),)
    #: Seconds sessions may keep running after SIGTERM before shutdown acts.
    shutdown_grace: float = 30.0
    max_sessions: int = 256
    max_message_bytes: int = 1 << 20
    #: Seconds a client has to send its request after connecting.
    request_timeout: float = 10.0
    #: Seconds an unused snapshot stays open for the next restore of it.
    source_linger: float = 30.0
    #: Session descriptions a restarted daemon resumes (docs/reliability.md);
    #: empty: ``state/`` in the handoff socket's directory.
    state_dir: str = ""
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    session: SessionConfig = field(default_factory=SessionConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    timeline: TimelineConfig = field(default_factory=TimelineConfig)
    criu: CriuConfig = field(default_factory=CriuConfig)
    firecracker: FirecrackerConfig = field(default_factory=FirecrackerConfig)
    working_set: WorkingSetConfig = field(default_factory=WorkingSetConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    access: AccessConfig = field(default_factory=AccessConfig)

    def validate(self) -> Config:
        page = os.sysconf("SC_PAGE_SIZE")
        s = self.session
        for name in ("fault_around_min", "fault_around_max", "fill_chunk"):
            v = getattr(s, name)
            if v < page or v % page:
                raise ConfigError(f"session.{name} = {v} must be a positive multiple of {page}")
        if s.failure_policy not in ("wait", "sigbus", "kill"):
            raise ConfigError(f"session.failure_policy must be wait, sigbus or kill, not {s.failure_policy!r}")
        if not 0 <= s.fault_poll_us <= 10_000:
            raise ConfigError(f"session.fault_poll_us = {s.fault_poll_us} must be between 0 and 10000")
        if s.fault_around_min > s.fault_around_max:
            raise ConfigError("session.fault_around_min must not exceed fault_around_max")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        for where, mode in (("socket_mode", self.socket_mode), ("control.socket_mode", self.control.socket_mode)):
            if not 0 <= mode <= 0o777:
                raise ConfigError(f"{where} = {mode:#o} is not a mode (at most 0o777)")
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError(f"log_format must be auto, json or console, not {self.log_format!r}")
        if bool(self.firecracker.socket) != bool(self.firecracker.mem_file):
            raise ConfigError("firecracker.socket and firecracker.mem_file go together: set both or neither")
        self.criu.check()
        self.metrics.check()
        self.timeline.check()
        self.export.check()
        self.remote.check()
        if not self.snapshot_dirs:
            raise ConfigError("snapshot_dirs must name at least one directory")
        if self.max_sessions < 1 or self.max_message_bytes < 1024:
            raise ConfigError("max_sessions must be ≥ 1 and max_message_bytes ≥ 1024")
        return self


#: Settings holding a file mode.
MODE_KEYS = frozenset({"socket_mode"})
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_OCTAL = re.compile(r"[0-7]{1,4}")


def _mode(where: str, value: Any) -> int:
    """A mode is a string of octal digits ("0660" or "660"), never a TOML
    integer: the parser hands back 660 and 0o1224 as the same number, so a
    mode written without quotes cannot be read the way its writer meant."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f'{where} = {value} is an integer; write the mode as an octal string, e.g. "0660"')
    if not isinstance(value, str) or not _OCTAL.fullmatch(value) or int(value, 8) > 0o777:
        raise ConfigError(f'{where} = {value!r} is not a mode: write octal digits, e.g. "0660" (at most "0777")')
    return int(value, 8)


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    where = f"{section}{key}" if section else key
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, Path):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string")
        return Path(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of paths")
        return tuple(Path(v) for v in value)
    if key in MODE_KEYS:
        return _mode(where, value)
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    if key == "log_level":  # logging's own names are upper case; both spellings are meant alike
        return value.lower()
    return value


def _apply(obj: Any, table: dict[str, Any], section: str) -> Any:
    if hasattr(type(obj), "from_table"):  # a section that parses itself (lists of ids, tables)
        try:
            return type(obj).from_table(table, section)
        except AccessError as e:
            raise ConfigError(str(e)) from None
    known = {f.name for f in fields(obj) if not is_dataclass(getattr(obj, f.name))}
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown setting {section}{key}")
        changes[key] = _coerce(section, key, getattr(obj, key), value)
    return replace(obj, **changes)


def _sections() -> set[str]:
    """TOML tables besides [daemon]: one per dataclass-valued field of Config."""
    base = Config()
    return {f.name for f in fields(base) if is_dataclass(getattr(base, f.name))}


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML: [daemon] sets the top-level fields,
    every other table sets the section dataclass of the same name."""
    sections = _sections()
    unknown = set(data) - sections - {"daemon"}
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
    cfg = _apply(Config(), data.get("daemon", {}), "daemon.")
    changes = {name: _apply(getattr(cfg, name), data[name], f"{name}.") for name in sections if name in data}
    cfg = replace(cfg, **changes)
    validated: Config = cfg.validate()
    return validated


def load(path: str | os.PathLike[str] | None) -> Config:
    """Read a TOML file; None gives the built-in defaults."""
    if path is None:
        return Config().validate()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return from_dict(data)
