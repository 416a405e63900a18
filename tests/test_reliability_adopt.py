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
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazypaged.demo import make_image

from .conftest import HERE, DaemonHandle, MiB, _needs_root, start_daemon, stop_daemon, wait_for_socket
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


class FakeServiceManager:
    """The part of systemd the fd store needs: a notify socket that keeps descriptors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.store: dict[str, int] = {}
        self.messages: list[str] = []

    def pump(self, timeout: float) -> None:
        """Receive what arrives within ``timeout`` s, applying FDSTORE/FDSTOREREMOVE."""
        self.sock.settimeout(timeout)
        try:
            while True:
                msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
                text = msg.decode()
                self.messages.append(text)
                fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
                if fields.get("FDSTORE") == "1" and fds:
                    self.store[fields["FDNAME"]] = fds.pop()
                if fields.get("FDSTOREREMOVE") == "1" and fields.get("FDNAME") in self.store:
                    os.close(self.store.pop(fields["FDNAME"]))
                for fd in fds:
                    os.close(fd)
                self.sock.settimeout(0.05)
        except TimeoutError:
            pass

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()


def start_with_fds(d: DaemonHandle, notify: Path, store: dict[str, int]) -> None:
    """Start a daemon as systemd would: the stored fds at 3.. with their names."""
    names = list(store)
    fds = [store[n] for n in names]
    launcher = (
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
    with open(d.log, "ab") as lf:
        d.proc = subprocess.Popen(
            [sys.executable, "-c", launcher, ",".join(map(str, fds)), ":".join(names), str(d.config)],
            stdout=lf, stderr=lf, pass_fds=fds, env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        )
    wait_for_socket(d.socket, d.proc)


def test_fd_store_carries_a_uffd_only_the_daemon_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target closed its copy (keeps_uffd false): only the parked copy saves it."""
    _needs_root()
    notify = tmp_path / "notify.sock"
    sm = FakeServiceManager(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))  # inherited by the daemon start_daemon runs
    d = start_daemon(tmp_path, session_config="fill = false")
    d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reliability_target.py"), "--socket", str(d.socket), "--image",
         str(d.snapshots / "img"), "--name", "img", "--size", str(SIZE), "--no-keep"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert "accepted" in json.loads(proc.stdout.readline())
        sm.pump(2.0)
        assert any(m.startswith("READY=1") for m in sm.messages), sm.messages
        assert len(sm.store) == 1, sm.messages
        (name,) = sm.store
        assert name.startswith("uffd-")
        time.sleep(0.4)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        start_with_fds(d, notify, sm.store)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)
        assert json.loads(out.splitlines()[-1])["wrong_pages"] == 0
        adopted = wait_log(d, "session_adopted")
        assert adopted[0]["from_fdstore"] is True
        wait_log(d, "session_ended")
        sm.pump(1.0)
        assert name not in sm.store, "the old name is dropped once adopted"
        assert not sm.store, f"the finished session's uffd left the store: {sm.messages}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0
        sm.close()


def test_fd_store_carries_a_forked_childs_uffd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child's uffd exists only in the daemon (the fork event brought it):
    parked in the store, it comes back; the parent re-hands its own."""
    _needs_root()
    notify = tmp_path / "notify.sock"
    sm = FakeServiceManager(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    d = start_daemon(tmp_path, session_config="fill = false")
    d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reliability_fork_target.py"), "--socket", str(d.socket), "--image",
         str(d.snapshots / "img"), "--name", "img", "--size", str(SIZE), "--pause", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert "accepted" in json.loads(proc.stdout.readline())
        assert "child" in json.loads(proc.stdout.readline())
        wait_log(d, "target_forked")
        sm.pump(1.0)
        assert len(sm.store) == 1, f"only the child's uffd is parked (the parent keeps its own): {sm.messages}"
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        start_with_fds(d, notify, sm.store)
        out, err = proc.communicate(timeout=60)
        results = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        done = {k: r for r in results for k in ("child_done", "parent_done") if k in r}
        assert done["child_done"]["wrong_pages"] == 0, (out, err)
        assert done["parent_done"]["wrong_pages"] == 0, (out, err)
        assert proc.returncode == 0, (out, err)
        adopted = wait_log(d, "session_adopted")
        assert adopted[0]["from_fdstore"] is True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0
        sm.close()


def test_adoption_rides_out_a_peer_that_is_down_at_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session reads from peer://, and the exporter is down when the
    crashed daemon's successor adopts it: the first contact is retried (not
    given up after one probe, which left the target blocked for good) and
    the restore completes, every byte right, once the exporter is back."""
    _needs_root()
    from .peer_pair import free_port

    port = free_port()
    exp_dir = tmp_path / "exporter"
    (exp_dir / "snapshots").mkdir(parents=True)
    image = exp_dir / "snapshots" / "img"
    make_image(image, SIZE)
    exporter = start_daemon(exp_dir, extra_config=f'[export]\nlisten = "127.0.0.1:{port}"\nsnapshots = ["img"]\n')
    notify = tmp_path / "notify.sock"
    sm = FakeServiceManager(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    rd_dir = tmp_path / "reader"
    rd_dir.mkdir()
    reader = start_daemon(
        rd_dir, extra_config="[remote]\nreconnect_deadline = 60.0\nbackoff_max = 0.25\nconnect_timeout = 2.0\n",
        session_config="fill = false",
    )
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reliability_target.py"), "--socket", str(reader.socket), "--image", str(image),
         "--name", f"peer://127.0.0.1:{port}/img", "--size", str(SIZE), "--no-keep", "--seconds", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert "accepted" in json.loads(proc.stdout.readline())
        while not sm.store:
            sm.pump(1.0)  # until the session's uffd is parked
        reader.proc.send_signal(signal.SIGKILL)
        reader.proc.wait()
        assert stop_daemon(exporter) == 0
        mark = len(reader.log_lines())
        start_with_fds(reader, notify, sm.store)
        deadline = time.monotonic() + 30
        while True:
            events = [x.get("event") for x in reader.log_lines()[mark:]]
            assert "adoption_failed" not in events, reader.log.read_text()[-3000:]
            if "peer_first_contact_retrying" in events:
                break
            assert reader.proc.poll() is None, reader.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no retry of the peer's first contact"
            time.sleep(0.02)  # polling the log for the line
        restart(exporter)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, (out, err[-2000:])
        assert json.loads(out.splitlines()[-1])["wrong_pages"] == 0
        adopted = [x for x in reader.log_lines()[mark:] if x.get("event") == "session_adopted"]
        assert adopted, "the session was not adopted"
        assert adopted[0]["from_fdstore"] is True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(reader) == 0
        stop_daemon(exporter)
        sm.close()
