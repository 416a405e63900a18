"""A forked child's session knows its target's pid (the fork event does not name it)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import HERE, DaemonHandle, MiB, _needs_root, finish, kill, start_daemon, stop_daemon
from .test_signals import wait_log

SIZE = 4 * MiB
#: Seconds a process may take to exit once it should; it needs well under one.
BOUND = 30


def _target(d: DaemonHandle, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """A forking target, started; its child's pid once the fork is done."""
    image = d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fork_pid_target.py"), "--socket", str(d.socket), "--image", str(image),
         "--name", "img", "--size", str(SIZE), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "accepted" in json.loads(proc.stdout.readline())
    return proc, int(json.loads(proc.stdout.readline())["child"])


def _exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` exits within BOUND seconds."""
    return bool(select.select([pidfd], [], [], BOUND)[0])


def _reap(pidfd: int) -> None:
    """Kill the child if it still runs (it holds the target's pipes), close its pidfd."""
    if not select.select([pidfd], [], [], 0)[0]:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)


def test_a_forked_childs_session_names_and_watches_its_pid(daemon: DaemonHandle) -> None:
    """The child's session logs the child's pid, serves it every right byte,
    and ends when the child exits (its pidfd, as for a parent)."""
    proc, child = _target(daemon)
    pidfd = os.pidfd_open(child)
    try:
        found = wait_log(daemon, "target_pid_found")
        assert found["pid"] == child, found
        assert found["session"] == str(found["parent"]) + ".1", found
        signal.pidfd_send_signal(pidfd, signal.SIGUSR1)
        rc, lines, err = finish(proc, timeout=BOUND)
    finally:
        _reap(pidfd)
        kill(proc)
    assert rc == 0, (lines, err[-3000:])
    assert [x["ok"] for x in lines if "child_done" in x or "parent_done" in x] == [True, True], lines
    ended = wait_log(daemon, "session_ended", session=found["session"])
    assert ended["outcome"] in ("complete", "target_exited"), ended


def test_a_forced_exit_kills_a_forked_child_whose_parent_exited(tmp_path: Path) -> None:
    """Reparented, the child is no longer among the first target's
    descendants: its session's own pid is how it is found and killed."""
    _needs_root()
    d = start_daemon(tmp_path, session_config="fill = false")
    proc, child = _target(d, "--parent-exits")
    pidfd = os.pidfd_open(child)
    try:
        assert wait_log(d, "target_pid_found")["pid"] == child
        assert proc.stdin is not None
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=BOUND) == 0
        d.proc.send_signal(signal.SIGTERM)
        wait_log(d, "stopping")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=60) == 0
        assert _exited(pidfd), "the forked child was not killed"
    finally:
        _reap(pidfd)
        kill(proc)
        stop_daemon(d)
    killed = [x for x in d.log_lines() if x.get("event") == "killing_target"]
    assert child in [x["pid"] for x in killed], killed
