"""Fixtures: a real daemon in a subprocess, demo images, restore targets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lazypaged.demo import make_image

HERE = Path(__file__).parent
TARGET = HERE / "target_prog.py"
MiB = 1 << 20


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("these tests hand kernel-mode faults to a uffd: run as root")


@dataclass
class DaemonHandle:
    proc: subprocess.Popen[bytes]
    socket: Path
    snapshots: Path
    log: Path
    config: Path
    images: dict[str, Path] = field(default_factory=dict)

    def image(self, name: str, size: int) -> Path:
        """A demo-pattern image of ``size`` bytes in the snapshot dir."""
        if name not in self.images:
            path = self.snapshots / name
            make_image(path, size)
            self.images[name] = path
        return self.images[name]

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"unparsed": line})
        return out

    def target(self, name: str, size: int, *extra: str, wait: bool = True) -> subprocess.Popen[str]:
        args = [
            sys.executable,
            str(TARGET),
            "--socket",
            str(self.socket),
            "--image",
            str(self.snapshots / name),
            "--name",
            name,
            "--size",
            str(size),
            *extra,
        ]
        if wait:
            args.append("--wait")
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before listening")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise TimeoutError(f"daemon did not listen on {path}")


def wait_for_ready(ready: socket.socket, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until the daemon sends READY=1 (sd_notify) to ``ready``: every
    listener is up then, the handoff socket being only the first of them."""
    deadline = time.monotonic() + timeout
    ready.settimeout(0.05)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before it was ready")
        try:
            msg = ready.recv(4096).decode(errors="replace")
        except TimeoutError:
            continue
        if "READY=1" in msg.split("\n"):
            return
    raise TimeoutError("daemon did not say READY=1")


def start_daemon(
    tmp: Path, extra_config: str = "", session_config: str = "", *, working_set: bool = False
) -> DaemonHandle:
    """A daemon on a private socket and snapshot dir. Working-set replay is off
    unless asked for, so fault counts in tests do not depend on test order."""
    snaps = tmp / "snapshots"
    snaps.mkdir(exist_ok=True)
    sock = tmp / "handoff.sock"
    cfg = tmp / "lazypaged.toml"
    cfg.write_text(
        f'[daemon]\nhandoff_socket = "{sock}"\nsnapshot_dirs = ["{snaps}"]\n'
        f'log_format = "json"\nlog_level = "debug"\nshutdown_grace = 5.0\n{extra_config}\n'
        f"[session]\n{session_config}\n"
        f"[working_set]\nenabled = {str(working_set).lower()}\n"
    )
    log = tmp / "daemon.log"
    # Readiness as systemd sees it, on a private abstract socket, unless the
    # test stands in for systemd itself (it set NOTIFY_SOCKET).
    ready: socket.socket | None = None
    env = None
    if "NOTIFY_SOCKET" not in os.environ:
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = f"lazypaged-test-{os.getpid()}-{time.monotonic_ns()}"
        ready.bind("\0" + name)
        env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
    try:
        with open(log, "wb") as lf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)], stdout=lf, stderr=lf, env=env
            )
        if ready is not None:
            wait_for_ready(ready, proc)
        else:
            wait_for_socket(sock, proc)
    finally:
        if ready is not None:
            ready.close()
    return DaemonHandle(proc, sock, snaps, log, cfg)


def stop_daemon(d: DaemonHandle) -> int:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
    return d.proc.returncode


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonHandle]:
    _needs_root()
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        rc = stop_daemon(d)
        bugs = [ln for ln in d.log_lines() if ln.get("event") == "session_bug"]
        assert not bugs, f"daemon hit a bug: {bugs}"
        assert rc == 0, f"daemon exited with {rc}; log:\n{d.log.read_text()[-4000:]}"


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, list[dict[str, object]], str]:
    """Wait for a target; return its exit code, JSON lines and stderr."""
    out, err = proc.communicate(timeout=timeout)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return proc.returncode, lines, err


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a target and reap it, closing its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
