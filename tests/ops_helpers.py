"""Shared by the operations tests: a daemon with metrics and timelines on,
and a target that touches a known set of pages (tests/ops_target.py)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .conftest import DaemonHandle, start_daemon, stop_daemon

HERE = Path(__file__).parent
OPS_TARGET = HERE / "ops_target.py"


@dataclass
class OpsDaemon:
    d: DaemonHandle
    control: Path
    timelines: Path

    def metrics_port(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.d.log_lines():
                if line.get("listener") == "metrics" and line.get("event") == "listening":
                    port = line["port"]
                    assert isinstance(port, int)
                    return port
            time.sleep(0.02)
        raise TimeoutError("the metrics listener never logged its port")

    def target(self, name: str, size: int, pages: int, *, stride: int = 3, fill: bool = False) -> Target:
        args = [sys.executable, str(OPS_TARGET), "--socket", str(self.d.socket), "--image",
                str(self.d.snapshots / name), "--name", name, "--size", str(size), "--pages", str(pages),
                "--stride", str(stride)]
        if fill:
            args.append("--fill")
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Target(proc)

    def status(self) -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-m", "lazypaged", "status", "--json", "--socket", str(self.control)],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        doc: dict[str, object] = json.loads(out.stdout)
        return doc


class Target:
    """A running ops_target.py; its stdout lines are read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self._lines.put(text)
        self._lines.put("")

    def line(self, timeout: float = 30.0) -> dict[str, object]:
        """The target's next JSON line."""
        try:
            text = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the target said nothing") from None
        if not text:
            self.proc.wait(timeout=10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"the target exited with {self.proc.returncode}: {err}")
        doc: dict[str, object] = json.loads(text)
        return doc

    def release(self, timeout: float = 30.0) -> int:
        """Close stdin so the target exits; its exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return self.proc.returncode


def start_ops_daemon(tmp: Path, extra: str = "") -> OpsDaemon:
    timelines = tmp / "timelines"
    cfg = (
        f'[metrics]\nenabled = true\naddress = "127.0.0.1:0"\n'
        f'[timeline]\nenabled = true\ndirectory = "{timelines}"\ninterval = 0.02\n{extra}'
    )
    d = start_daemon(tmp, extra_config=f"\n{cfg}")
    return OpsDaemon(d, tmp / "control.sock", timelines)


def running_ops_daemon(tmp: Path) -> Iterator[OpsDaemon]:
    """For a fixture: a started daemon, checked for bugs and a clean exit after."""
    from .conftest import _needs_root

    _needs_root()
    od = start_ops_daemon(tmp)
    try:
        yield od
    finally:
        rc = stop_daemon(od.d)
        bugs = [ln for ln in od.d.log_lines() if str(ln.get("event", "")).endswith("_bug")]
        assert not bugs, f"daemon hit a bug: {bugs}"
        assert rc == 0, f"daemon exited with {rc}; log:\n{od.d.log.read_text()[-4000:]}"
