"""Two network namespaces joined by a veth pair: two "hosts" on one machine.

Used by the peer tests and the ``remote`` benchmarks. Everything lives
inside namespaces this module creates (the veth ends are created directly
in them and never appear in the caller's namespace), under names unique to
the run; :meth:`Hosts.destroy` removes them, and the context manager calls it
whatever happens. Processes started with :meth:`Hosts.popen` are killed
first, since a process inside a namespace keeps it alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADDR_A = "10.77.0.1"
ADDR_B = "10.77.0.2"
PREFIX = 24


def available() -> str:
    """Why namespaces cannot be used here, or "" if they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return ""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


@dataclass
class Hosts:
    """Namespace ``a`` (10.77.0.1) and ``b`` (10.77.0.2), one veth pair between them."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.a = f"lzpa-{self.tag}"
        self.b = f"lzpb-{self.tag}"
        self.dev_a = f"lva{self.tag}"
        self.dev_b = f"lvb{self.tag}"

    def create(self) -> None:
        _run("ip", "netns", "add", self.a)
        _run("ip", "netns", "add", self.b)
        _run("ip", "-n", self.a, "link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b, "netns", self.b)
        for ns, dev, addr in ((self.a, self.dev_a, ADDR_A), (self.b, self.dev_b, ADDR_B)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def ns(self, side: str) -> str:
        return {"a": self.a, "b": self.b}[side]

    def prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(side)]

    def popen(self, side: str, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen([*self.prefix(side), *args], **kw)
        self.procs.append(p)
        return p

    def run(self, side: str, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(side), *args], capture_output=True, text=True, timeout=timeout, check=False)

    def link(self, up: bool) -> None:
        """Take B's end of the link down or up (A sees carrier loss too)."""
        _run("ip", "-n", self.b, "link", "set", self.dev_b, "up" if up else "down")

    def shape(self, rate: str, burst: str = "256kb", latency: str = "20ms") -> None:
        """Rate-limit both directions with tbf (this kernel has no netem)."""
        for ns, dev in ((self.a, self.dev_a), (self.b, self.dev_b)):
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                 "burst", burst, "latency", latency)  # fmt: skip

    def unshape(self) -> None:
        for ns, dev in ((self.a, self.dev_a), (self.b, self.dev_b)):
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    def destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for ns in (self.a, self.b):
            _run("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def hosts() -> Iterator[Hosts]:
    h = Hosts()
    try:
        h.create()
        yield h
    finally:
        h.destroy()


# -- daemons inside a namespace ------------------------------------------------------------------


@dataclass
class NsDaemon:
    hosts: Hosts
    side: str
    config: Path
    socket: Path
    log: Path
    #: Wait for the export listener too, not only the handoff socket.
    exports: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> NsDaemon:
        with open(self.log, "ab") as lf:
            args = [sys.executable, "-m", "lazypaged", "serve", "--config", str(self.config)]
            self.proc = self.hosts.popen(self.side, args, stdout=lf, stderr=lf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon in {self.side} exited ({self.proc.returncode}):\n{self.tail()}")
            if self.socket.exists() and self._ready():
                return self
            time.sleep(0.02)
        raise TimeoutError(f"daemon in {self.side} did not come up:\n{self.tail()}")

    def _ready(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return not self.exports or any(e.get("event") == "export_listening" for e in self.events())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


def daemon_config(
    work: Path, name: str, snapshots: Path, extra: str = "", session: str = "", log_level: str = "debug"
) -> tuple[Path, Path, Path]:
    """Write a daemon config into ``work``; returns (config, handoff socket, log)."""
    run = work / f"{name}-run"  # own directory: the control socket goes beside the handoff socket
    run.mkdir(exist_ok=True)
    sock = run / "handoff.sock"
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f'[daemon]\nhandoff_socket = "{sock}"\nsnapshot_dirs = ["{snapshots}"]\n'
        f'log_format = "json"\nlog_level = "{log_level}"\nshutdown_grace = 5.0\n'
        f"[session]\n{session}\n{extra}\n"
    )
    return cfg, sock, work / f"{name}.log"
