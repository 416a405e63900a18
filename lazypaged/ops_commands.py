"""``lazypaged status`` and ``lazypaged report``: the command-line front.

Exit codes follow the rest of the CLI: 0 success, 1 failure (daemon not
reachable, matplotlib missing), 2 usage or configuration error or a file that
is not a timeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from . import control_protocol as cp

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: Columns of the table when printed to a pipe or file.
WIDE = 200


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("status", help="show the running daemon's sessions and sources")
    st.add_argument("--config", "-c", type=Path, help="TOML configuration naming the control socket")
    st.add_argument("--socket", type=Path, help="control socket path (overrides the configuration)")
    st.add_argument("--json", action="store_true", help="print the daemon's answer as JSON (a line per refresh)")
    st.add_argument("--watch", "-w", nargs="?", type=float, const=2.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until interrupted")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")

    rep = sub.add_parser("report", help="draw a session timeline (needs matplotlib: lazypaged[plot])")
    rep.add_argument("timeline", type=Path, help="a timeline JSON file written by the daemon ([timeline])")
    rep.add_argument("-o", "--output", type=Path, help="image to write (default: TIMELINE with .png)")
    rep.add_argument("--dpi", type=int, default=120)


def run(args: argparse.Namespace) -> int:
    if args.command == "report":
        return _report(args)
    return _status(args)


# -- status -------------------------------------------------------------------


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from .config import load
    from .operations import control_socket_path

    return control_socket_path(load(args.config))


def _status(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .control import ControlClient, ControlError

    if args.watch is not None and args.watch <= 0:
        print("lazypaged: --watch needs a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = _socket_path(args)
    except ConfigError as e:
        print(f"lazypaged: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, WIDE))  # a pipe or a file: never cut ids
    try:
        with ControlClient(path, timeout=args.timeout) as client:
            if args.watch is None:
                reply = client.status()
                if args.json:
                    print(json.dumps(as_json(reply), indent=2))
                else:
                    console.print(render(reply))
                return EXIT_OK
            return _watch(client, args, console)
    except ControlError as e:
        print(f"lazypaged: {e}", file=sys.stderr)
        return EXIT_FAIL


def _watch(client: Any, args: argparse.Namespace, console: Console) -> int:
    try:
        if args.json or not console.is_terminal:
            while True:
                reply = client.status()
                if args.json:
                    print(json.dumps(as_json(reply), separators=(",", ":")), flush=True)
                else:
                    console.print(render(reply))
                    console.print()
                time.sleep(args.watch)
        from rich.live import Live

        with Live(render(client.status()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(render(client.status()), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK


def as_json(reply: cp.StatusReply) -> dict[str, Any]:
    """The reply as scripts get it: the wire object (docs/operations.md)."""
    doc: dict[str, Any] = json.loads(cp.encode(reply))
    return doc


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"<{v / 1000:.0f} ms" if v >= 10_000 else f"<{v:.0f} µs"


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(reply: cp.StatusReply) -> Group:
    """The human view: a headline, a session table and a source table."""
    d = reply.daemon
    running = sum(1 for s in reply.sessions if s.state == "running")
    head = Text(
        f"lazypaged {d.version} (pid {d.pid}) {d.state}, up {_duration(d.uptime_s)}: "
        f"{running} running, {len(reply.sessions) - running} held, {d.sessions_finished} finished, "
        f"{_bytes(d.install_rate)}/s installed"
    )
    if not reply.sessions:
        return Group(head, Text("no sessions"))
    sessions = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in (("SESSION", "left"), ("KIND", "left"), ("PID", "right"), ("SOURCE", "left"),
                         ("PAGES", "right"), ("", "right"), ("FAULTS", "right"), ("P50", "right"),
                         ("P99", "right"), ("FILL", "right"), ("STATE", "left")):
        sessions.add_column(col, justify=justify, no_wrap=col in ("SESSION", "PID"))  # type: ignore[arg-type]
    for s in reply.sessions:
        pct = 100.0 * s.pages_installed / s.pages_total if s.pages_total else 100.0
        sessions.add_row(
            s.id, s.kind, str(s.pid) if s.pid is not None else "-", ", ".join(s.sources) or "-",
            f"{s.pages_installed}/{s.pages_total}", f"{pct:.0f}%", str(s.faults), _us(s.fault_p50_us),
            _us(s.fault_p99_us), f"{_bytes(s.fill_rate)}/s", s.state,
        )
    sources = Table(box=None, pad_edge=False, header_style="bold")
    linked = any(src.bytes_in_flight is not None for src in reply.sources)
    for col in ("SOURCE", "TYPE", "SIZE", "SESSIONS", *(("IN FLIGHT", "RECONNECTS") if linked else ())):
        sources.add_column(col, justify="left" if col in ("SOURCE", "TYPE") else "right")
    for src in reply.sources:
        link = (_bytes(src.bytes_in_flight) if src.bytes_in_flight is not None else "-",
                str(src.reconnects) if src.reconnects is not None else "-") if linked else ()
        sources.add_row(src.name, src.type, _bytes(src.size), str(src.sessions), *link)
    return Group(head, Text(""), sessions, Text(""), sources)


# -- report --------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    from .report import PlotUnavailable, ReportError, draw, load_timeline

    out = args.output or args.timeline.with_suffix(".png")
    try:
        doc = load_timeline(args.timeline)
        draw(doc, out, dpi=args.dpi)
    except PlotUnavailable as e:
        print(f"lazypaged: {e}", file=sys.stderr)
        return EXIT_FAIL
    except ReportError as e:
        print(f"lazypaged: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"lazypaged: cannot write {out}: {e.strerror}", file=sys.stderr)
        return EXIT_FAIL
    print(out)
    return EXIT_OK
