"""A restarted daemon re-adopts sessions it alone could resume.

* Firecracker-style targets keep their uffd but cannot re-hand it: the new
  daemon takes it from the target with pidfd_getfd(2).
* Under systemd the uffd is parked in the file-descriptor store: a real
  AF_UNIX datagram socket stands in for systemd here, receives FDSTORE=1
  messages with the uffds attached, and the next daemon is started with
  them as LISTEN_FDS/LISTEN_FDNAMES.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazypaged.demo import make_image

from .conftest import HERE, DaemonHandle, MiB, _needs_root, start_daemon, stop_daemon
from .test_reliability_restart import restart

FC_TARGET = HERE / "reliability_fc_target.py"
SIZE = 16 * MiB


def wait_log(d: DaemonHandle, event: str, n: int = 1, timeout: float = 20.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [x for x in d.log_lines() if x.get("event") == event]
        if len(hits) >= n:
            return hits
        time.sleep(0.05)
    raise AssertionError(f"no {event} in the log: {d.log.read_text()[-3000:]}")


def fc_daemon(tmp: Path) -> tuple[DaemonHandle, Path]:
    mem = tmp / "guest.mem"
    make_image(mem, SIZE)
    sock = tmp / "fc.sock"
    # No fill: the restore lasts as long as the target's touches, so the kill lands mid-restore.
    d = start_daemon(tmp, extra_config=f'[firecracker]\nsocket = "{sock}"\nmem_file = "{mem}"\n',
                     session_config="fill = false")
    return d, mem


@pytest.mark.parametrize("run", range(2))
def test_firecracker_target_is_adopted_with_pidfd_getfd(tmp_path: Path, run: int) -> None:
    _needs_root()
    d, mem = fc_daemon(tmp_path)
    proc = subprocess.Popen([sys.executable, str(FC_TARGET), str(tmp_path / "fc.sock"), str(mem), str(SIZE), "1.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["sent"]
        wait_log(d, "session_started")
        state = list((tmp_path / "state").glob("*.json"))
        assert len(state) == 1, "the session's description is saved"
        assert json.loads(state[0].read_text())["target_fd"] >= 0
        time.sleep(random.Random(run).uniform(0.1, 0.7))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        restart(d)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)
        assert json.loads(out.splitlines()[-1]) == {"ok": True, "wrong_pages": 0}
        adopted = wait_log(d, "session_adopted")
        assert adopted[0]["kind"] == "firecracker"
        wait_log(d, "session_ended")
        assert not list((tmp_path / "state").glob("*.json")), "descriptions go with their sessions"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0


def test_adoption_without_a_uffd_is_logged_not_zero_filled(tmp_path: Path) -> None:
    """A description whose target is gone is dropped with a clear log line."""
    _needs_root()
    state = tmp_path / "state"
    state.mkdir()
    desc = {"session": "gone", "kind": "native", "pid": 2**22 - 3, "start_time": 1, "target_fd": 5,
            "features": 0, "failure_policy": "wait",
            "ranges": [{"start": 4096, "length": 4096, "source": "x", "offset": 0, "page_size": 4096}]}
    (state / "gone.json").write_text(json.dumps(desc))
    d = start_daemon(tmp_path)
    try:
        failed = wait_log(d, "adoption_failed")
        assert failed[0]["session"] == "gone"
        assert not (state / "gone.json").exists()
    finally:
        assert stop_daemon(d) == 0
