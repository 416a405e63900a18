"""Signals sent to ``lazypaged criu-lazy-pages`` mid-restore.

The command holds the only uffd of a CRIU target that is half restored: a
signal that ended it by default would leave that target to the keeper's
kill at best. SIGHUP and the other default-fatal signals are logged and
ignored; SIGTERM, SIGINT and SIGQUIT stop it in order (unfinished targets
are killed, never left to read zeros).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.criu import harness as h
from tests.test_criu_daemon import ADDR, NPAGES, _images

#: A sample of the signals logged and ignored (HUP: nothing to reload here).
IGNORED = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGRTMIN + 3]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("serving another process's uffd faults taken in the kernel needs root")


class Held:
    """The pausing stand-in restorer (tests/criu/held_restore.py)."""

    def __init__(self, images: Path, lazy: list[tuple[int, int]]) -> None:
        spec = ",".join(f"{a:#x}:{b:#x}" for a, b in lazy)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.criu.held_restore", str(images / "lazy-pages.socket"), hex(ADDR),
             str(NPAGES), spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).parent.parent,
        )
        self.pid = json.loads(self.line())["pid"]

    def line(self) -> str:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        assert raw, f"the stand-in restorer said nothing; status {self.proc.poll()}"
        return raw

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def _start(tmp: Path) -> tuple[Held, h.LazyDaemon]:
    images = tmp / "images"
    images.mkdir()
    lazy = _images(tmp / "probe", 1)
    held = Held(images, lazy)
    _images(images, held.pid)
    cfg = tmp / "nofill.toml"
    # Pages go in only when touched: the restore stays half done while the target waits.
    cfg.write_text("[session]\nfault_around = false\nfill = false\n")
    daemon = h.start_lazy_daemon("lazypaged", Path("criu"), images, extra=["--config", str(cfg)])
    held.go()
    assert json.loads(held.line()) == {"first": True}
    return held, daemon


def _log(daemon: h.LazyDaemon) -> list[dict[str, object]]:
    return [json.loads(x) for x in daemon.log.read_text().splitlines() if x.startswith("{")]


def _wait_log(daemon: h.LazyDaemon, event: str, **match: object) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        exited = daemon.proc.poll() is not None  # before reading: the last line comes before the exit
        for x in _log(daemon):
            if x.get("event") == event and all(x.get(k) == v for k, v in match.items()):
                return x
        if exited:
            pytest.fail(f"criu-lazy-pages exited ({daemon.proc.returncode}) without logging {event} {match}:\n"
                        f"{h.log_tail(daemon.log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {event} {match} in the log:\n{h.log_tail(daemon.log)}")
        time.sleep(0.02)  # polling the log file for the line


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def test_hup_and_other_stray_signals_do_not_end_a_restore(tmp_path: Path) -> None:
    held, daemon = _start(tmp_path)
    try:
        for sig in IGNORED:
            daemon.proc.send_signal(sig)
            _wait_log(daemon, "signal_ignored", signal=_name(sig))
        assert daemon.proc.poll() is None
        held.go()
        result = json.loads(held.line())
        assert result["ok"], result
        assert daemon.wait(30) == 0, h.log_tail(daemon.log)
    finally:
        held.kill()
        daemon.stop()
    hup = next(x for x in _log(daemon) if x.get("event") == "signal_ignored" and x.get("signal") == "SIGHUP")
    assert "reload" in str(hup["reason"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
def test_stop_signals_end_in_order_and_kill_the_unfinished_target(tmp_path: Path, sig: signal.Signals) -> None:
    held, daemon = _start(tmp_path)
    try:
        daemon.proc.send_signal(sig)
        assert daemon.wait(30) == 1, h.log_tail(daemon.log)
        held.proc.communicate(timeout=30)
    finally:
        held.kill()
        daemon.stop()
    assert held.proc.returncode == -signal.SIGKILL, "the half-restored target was not killed"
    assert any(x.get("event") == "criu_lazy_pages_interrupted" for x in _log(daemon))
