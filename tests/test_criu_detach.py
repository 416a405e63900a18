"""``lazypaged criu-lazy-pages -d`` and ``--pidfile``, as ``criu lazy-pages``
has them: scripts written for criu start the daemon with ``-d`` and run
``criu restore`` once the command returns, so it must return only when the
socket listens, and say so when the daemon could not start."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tests.criu import harness as h
from tests.test_criu_daemon import Fake, _images


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("serving another process's uffd faults taken in the kernel needs root")


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazypaged", "criu-lazy-pages", *args]


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Until ``pid`` (not our child) exits: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still runs after {timeout} s"
    finally:
        os.close(fd)


def _listening(path: Path) -> bool:
    """A listening Unix socket at ``path``, as /proc/net/unix shows it (no connection made)."""
    acc = 1 << 16  # __SO_ACCEPTCON
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7] == str(path) and int(f[3], 16) & acc:
            return True
    return False


def _setup(tmp: Path) -> tuple[Path, Fake]:
    images = tmp / "images"
    images.mkdir()
    fake = Fake(images, "normal", _images(tmp / "probe", 1))
    _images(images, fake.pid)
    return images, fake


def test_daemon_mode_returns_once_listening_and_serves_the_restore(tmp_path: Path) -> None:
    images, fake = _setup(tmp_path)
    pid = 0
    try:
        r = subprocess.run(
            _cmd("-D", str(images), "-d", "--pidfile", "lazy.pid", "-o", "lazypaged.log", "-v4"),
            capture_output=True, text=True, timeout=60, check=False, cwd=Path(__file__).parent.parent,
        )
        assert r.returncode == 0, (r.stderr, h.log_tail(images / "lazypaged.log"))
        pid = int((images / "lazy.pid").read_text())
        assert os.getsid(pid) == pid, "the daemon runs in a session of its own"
        # Listening already (no wait): a connection now would be taken for the restore.
        assert _listening(images / "lazy-pages.socket")
        fake.go()
        assert fake.line() == {"ready": True}
        result = fake.line()
        assert result["ok"], result
    finally:
        fake.kill()
        if pid:
            _wait_gone(pid)
    log = [json.loads(x) for x in (images / "lazypaged.log").read_text().splitlines() if x.startswith("{")]
    done = [x for x in log if x["event"] == "criu_restore_done"]
    assert done, h.log_tail(images / "lazypaged.log")
    assert not (images / "lazy.pid").exists(), "the pid file goes with the daemon"


def test_pidfile_names_the_serving_process_until_it_exits(tmp_path: Path) -> None:
    images, fake = _setup(tmp_path)
    pidfile = tmp_path / "run" / "lazy.pid"
    pidfile.parent.mkdir()
    daemon = h.start_lazy_daemon("lazypaged", Path("criu"), images, extra=["--pidfile", str(pidfile)])
    try:
        assert int(pidfile.read_text()) == daemon.proc.pid  # written before the status byte
        fake.go()
        assert fake.line() == {"ready": True}
        assert fake.line()["ok"]
        assert daemon.wait(30) == 0, h.log_tail(daemon.log)
    finally:
        fake.kill()
        daemon.stop()
    assert not pidfile.exists()


def test_daemon_mode_that_cannot_listen_says_why_and_fails(tmp_path: Path) -> None:
    """The caller learns it at once: criu restore must not be started then."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "lazy-pages.socket"))
        s.listen()
        r = subprocess.run(_cmd("-D", str(tmp_path), "-d", "--pidfile", "p.pid"), capture_output=True, text=True,
                           timeout=60, check=False)
    assert r.returncode == 1, r.stderr
    assert "in use" in r.stderr
    assert not (tmp_path / "p.pid").exists()


def test_daemon_mode_usage_errors_still_exit_2(tmp_path: Path) -> None:
    r = subprocess.run(_cmd("-D", str(tmp_path / "none"), "-d"), capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2
    assert "is not a directory" in r.stderr
