"""A restarted daemon that adopted sessions and then fails to start a
listener must not exit on the spot: that would close uffds it alone holds.
It finishes them in an ordered shutdown first, then exits with 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HERE, MiB, _needs_root, start_daemon
from .test_reliability_adopt import FakeServiceManager
from .test_signals import wait_log

SIZE = 8 * MiB
LAUNCHER = (
    "import os, sys\n"
    "fds = [int(x) for x in sys.argv[1].split(',') if x]\n"
    "moved = [os.dup(fd) for fd in fds]\n"
    "for i, fd in enumerate(moved):\n"
    "    if fd != 3 + i:\n"
    "        os.dup2(fd, 3 + i)\n"
    "        os.close(fd)\n"
    "    os.set_inheritable(3 + i, True)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'lazypaged', 'serve', '--config', sys.argv[3]])\n"
)


def test_adopted_sessions_are_finished_when_a_listener_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_root()
    notify = tmp_path / "notify.sock"
    sm = FakeServiceManager(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    d = start_daemon(tmp_path, session_config="fill = false")
    d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reliability_target.py"), "--socket", str(d.socket), "--image",
         str(d.snapshots / "img"), "--name", "img", "--size", str(SIZE), "--no-keep", "--seconds", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    busy = socket.socket()
    try:
        assert proc.stdout is not None
        assert "accepted" in json.loads(proc.stdout.readline())
        while not sm.store:
            sm.pump(1.0)  # until the session's uffd is parked
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        # The next start: the metrics address is taken, so that listener fails.
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        d.config.write_text(d.config.read_text() + f'\n[metrics]\nenabled = true\naddress = "127.0.0.1:{port}"\n')
        names = list(sm.store)
        fds = [sm.store[n] for n in names]
        mark = len(d.log_lines())
        with open(d.log, "ab") as lf:
            d.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), ":".join(names), str(d.config)],
                stdout=lf, stderr=lf, pass_fds=fds, env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            )
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err[-2000:])
        assert json.loads(out.splitlines()[-1])["wrong_pages"] == 0
        assert d.proc.wait(timeout=60) == 1
        failed = wait_log(d, "start_failed", mark)
        assert len(failed["sessions"]) == 1  # type: ignore[arg-type]
        ended = wait_log(d, "session_ended", mark)
        assert ended["outcome"] == "complete", ended
    finally:
        busy.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        sm.close()
