"""The systemd side: unit files that verify, and the two protocols the daemon
speaks with systemd tested on real sockets: sd_notify datagrams (READY=1,
STATUS=, WATCHDOG=1, STOPPING=1) and socket activation (LISTEN_FDS), the
latter through systemd's own ``systemd-socket-activate``.

The daemon under a real systemd (PID 1 in a container) is
``tests/test_systemd_boot.py``, marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.config import Config
from lazypaged.control import ControlClient
from lazypaged.monitor import watchdog_interval

from .conftest import MiB
from .ops_helpers import OPS_TARGET

ROOT = Path(__file__).parent.parent
UNITS = ROOT / "systemd"


def _unit(name: str) -> dict[str, list[str]]:
    """Key → values of a unit file (sections flattened; enough for these checks)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # ExecStart names /usr/local/bin/lazypaged, where `pip install` as root
    # puts it; verify checks that it exists, so point it at this install.
    installed = Path(sys.executable).parent / "lazypaged"
    assert installed.exists()
    for name in ("lazypaged.service", "lazypaged.socket"):
        text = (UNITS / name).read_text()
        text = re.sub(r"^ExecStart=/usr/local/bin/lazypaged ", f"ExecStart={installed} ", text, flags=re.M)
        (tmp_path / name).write_text(text)
    r = subprocess.run([analyze, "verify", "lazypaged.socket", "lazypaged.service"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # unknown keys and bad values are only warnings


def test_units_agree_with_the_defaults() -> None:
    cfg = Config()
    sock, svc = _unit("lazypaged.socket"), _unit("lazypaged.service")
    assert sock["ListenStream"] == [str(cfg.handoff_socket)]
    assert sock["FileDescriptorName"] == ["handoff"]
    assert int(sock["SocketMode"][0], 8) == cfg.socket_mode
    assert svc["Type"] == ["notify"]
    assert svc["RuntimeDirectory"] == [cfg.handoff_socket.parent.name]
    assert all(d.is_relative_to(Path("/var/lib") / svc["StateDirectory"][0]) for d in cfg.snapshot_dirs)
    assert cfg.timeline.directory.is_relative_to(Path("/var/lib") / svc["StateDirectory"][0])
    # The handoff socket file belongs to the socket unit: /run/lazypaged must
    # survive the service's restarts.
    assert svc["RuntimeDirectoryPreserve"] == ["yes"]
    # systemd wants an absolute path (`systemd-analyze verify` refuses a bare name).
    assert svc["ExecStart"][0].startswith("/usr/local/bin/lazypaged serve --config ")
    # systemctl reload is SIGHUP, which the daemon takes as "read the configuration again".
    assert svc["ExecReload"] == ["/bin/sh -c 'kill -HUP \"$$MAINPID\"'"]


def _exec_stop() -> list[str]:
    """ExecStop as the shell receives it (systemd turns $$ into $)."""
    (line,) = _unit("lazypaged.service")["ExecStop"]
    m = re.fullmatch(r"/bin/sh -c '(.*)'", line)
    assert m, line
    return ["/bin/sh", "-c", m.group(1).replace("$$", "$")]


def test_exec_stop_without_a_main_process_succeeds() -> None:
    """An ExecStop after the daemon already exited used to fail with
    `kill: Illegal number` (an empty $MAINPID)."""
    r = subprocess.run(_exec_stop(), env={"PATH": os.environ["PATH"], "MAINPID": ""}, capture_output=True,
                       text=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, "")
    r = subprocess.run(_exec_stop(), env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, "")


def test_exec_reload_and_exec_stop_drive_a_real_daemon(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    log = tmp_path / "daemon.log"
    proc = _serve(_config(tmp_path, 'log_level = "info"'), {}, log)
    try:
        sock = tmp_path / "handoff.sock"
        from .conftest import wait_for_socket

        wait_for_socket(sock, proc)
        (reload_line,) = _unit("lazypaged.service")["ExecReload"]
        m = re.fullmatch(r"/bin/sh -c '(.*)'", reload_line)
        assert m, reload_line
        cmd = ["/bin/sh", "-c", m.group(1).replace("$$", "$")]
        env = {"PATH": os.environ["PATH"], "MAINPID": str(proc.pid)}
        assert subprocess.run(cmd, env=env, timeout=30).returncode == 0
        deadline = time.monotonic() + 30
        while '"reloaded"' not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # polling the log for the line
        stop = subprocess.Popen(_exec_stop(), env={"PATH": os.environ["PATH"], "MAINPID": str(proc.pid)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.wait(timeout=60) == 0  # reaped here, as systemd reaps its main process
        _, err = stop.communicate(timeout=60)  # ExecStop returns once the daemon is gone
        assert (stop.returncode, err) == (0, "")
        assert '"stopped"' in log.read_text()
    finally:
        _stop(proc)


def _config(tmp: Path, extra: str = "") -> Path:
    snaps = tmp / "snapshots"
    snaps.mkdir(exist_ok=True)
    cfg = tmp / "lazypaged.toml"
    cfg.write_text(
        f'[daemon]\nhandoff_socket = "{tmp / "handoff.sock"}"\nsnapshot_dirs = ["{snaps}"]\n'
        f'log_format = "json"\nshutdown_grace = 5.0\n{extra}\n'
        # Fault counts below assume plain fault-around (no working-set recording).
        "[working_set]\nenabled = false\n"
    )
    return cfg


class Notifications:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.address = address
        self.seen: list[str] = []

    def wait_for(self, pred: object, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.seen:
                if pred(msg):  # type: ignore[operator]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no such notification in {self.seen}")
            self.sock.settimeout(left)
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    n = Notifications(str(tmp_path / "notify.sock"))
    try:
        yield n
    finally:
        n.close()


def _serve(cfg: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as lf:
        return subprocess.Popen([sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)],
                                stdout=lf, stderr=lf, env={**os.environ, **env})


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_notify_ready_status_watchdog_stopping(tmp_path: Path, notifications: Notifications) -> None:
    if os.geteuid() != 0:
        pytest.skip("serves a real restore: run as root")
    from lazypaged.demo import make_image

    cfg = _config(tmp_path)
    make_image(tmp_path / "snapshots" / "img", 4 * MiB)
    env = {"NOTIFY_SOCKET": notifications.address, "WATCHDOG_USEC": "200000"}
    proc = _serve(cfg, env, tmp_path / "daemon.log")
    target = None
    try:
        notifications.wait_for(lambda m: "READY=1" in m.split("\n"))
        # READY means listening: the handoff and control sockets answer now.
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(tmp_path / "handoff.sock"))
        with ControlClient(tmp_path / "control.sock") as c:
            assert c.status().daemon.state == "running"
        # Pings every WATCHDOG_USEC / 2.
        t0 = time.monotonic()
        for _ in range(3):
            before = notifications.seen.count("WATCHDOG=1")
            notifications.wait_for(lambda m, b=before: notifications.seen.count("WATCHDOG=1") > b)
        assert time.monotonic() - t0 < 5
        target = subprocess.Popen(
            [sys.executable, str(OPS_TARGET), "--socket", str(tmp_path / "handoff.sock"), "--image",
             str(tmp_path / "snapshots" / "img"), "--name", "img", "--size", str(4 * MiB), "--pages", "3"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert target.stdout is not None
        target.stdout.readline()
        target.stdout.readline()
        status = notifications.wait_for(lambda m: m.startswith("STATUS=1 session,"))
        assert "installed" in status
        assert "0 finished" in status
        target.communicate(timeout=30)
        notifications.wait_for(lambda m: m.startswith("STATUS=0 sessions,") and "1 finished" in m)
        proc.send_signal(signal.SIGTERM)
        notifications.wait_for(lambda m: m == "STOPPING=1")
        assert proc.wait(timeout=15) == 0
    finally:
        if target is not None and target.poll() is None:
            target.kill()
            target.communicate()
        _stop(proc)


def test_notify_to_an_abstract_socket(tmp_path: Path) -> None:
    n = Notifications(f"@lazypaged-test-{os.getpid()}-{time.monotonic_ns()}")
    proc = _serve(_config(tmp_path), {"NOTIFY_SOCKET": n.address}, tmp_path / "daemon.log")
    try:
        n.wait_for(lambda m: "READY=1" in m.split("\n"))
        # No WATCHDOG_USEC: no pings.
        time.sleep(0.3)
        assert "WATCHDOG=1" not in n.seen
        proc.send_signal(signal.SIGTERM)
        n.wait_for(lambda m: m == "STOPPING=1")
        assert proc.wait(timeout=15) == 0
    finally:
        _stop(proc)
        n.close()


def test_watchdog_interval_from_the_environment() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


@pytest.fixture
def socket_activate() -> str:
    path = shutil.which("systemd-socket-activate")
    if path is None:
        pytest.skip("systemd-socket-activate is not installed")
    if os.geteuid() != 0:
        pytest.skip("serves a real restore: run as root")
    return path


def test_socket_activation_serves_a_restore(tmp_path: Path, socket_activate: str) -> None:
    """systemd-socket-activate listens like a .socket unit, starts the daemon
    at the first connection and hands it the socket (LISTEN_FDS,
    LISTEN_FDNAMES=handoff, LISTEN_PID); the restore is served through it."""
    from lazypaged.demo import make_image

    cfg = _config(tmp_path)
    image = tmp_path / "snapshots" / "img"
    make_image(image, 4 * MiB)
    handoff = tmp_path / "handoff.sock"
    log = tmp_path / "daemon.log"
    with open(log, "wb") as lf:
        activator = subprocess.Popen(
            [socket_activate, "-l", str(handoff), "--fdname=handoff",
             sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)],
            stdout=lf, stderr=lf,
        )
    target = None
    try:
        deadline = time.monotonic() + 10
        while not handoff.exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        assert not (tmp_path / "control.sock").exists()  # nothing runs before a client comes
        target = subprocess.Popen(
            [sys.executable, str(OPS_TARGET), "--socket", str(handoff), "--image", str(image), "--name", "img",
             "--size", str(4 * MiB), "--pages", "7"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert target.stdout is not None
        assert "accepted" in target.stdout.readline()
        assert '"ok": true' in target.stdout.readline()
        with ControlClient(tmp_path / "control.sock") as c:
            reply = c.status()
        assert reply.daemon.pid == activator.pid  # the activator exec'd the daemon in place
        assert [s.faults for s in reply.sessions] == [7]
        target.communicate(timeout=30)
        activator.send_signal(signal.SIGTERM)
        assert activator.wait(timeout=15) == 0
    finally:
        if target is not None and target.poll() is None:
            target.kill()
            target.communicate()
        if activator.poll() is None:
            activator.kill()
            activator.wait()
    text = log.read_text()
    assert "Execing" in text  # systemd-socket-activate's own line: it really activated


def test_activated_socket_path_survives_the_daemon(tmp_path: Path, socket_activate: str) -> None:
    cfg = _config(tmp_path)
    handoff = tmp_path / "handoff.sock"
    with open(tmp_path / "daemon.log", "wb") as lf:
        activator = subprocess.Popen(
            [socket_activate, "-l", str(handoff), "--fdname=handoff",
             sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)],
            stdout=lf, stderr=lf,
        )
    try:
        deadline = time.monotonic() + 10
        while not handoff.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(handoff))  # activates the daemon
        deadline = time.monotonic() + 10
        while not (tmp_path / "control.sock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        activator.send_signal(signal.SIGTERM)
        assert activator.wait(timeout=15) == 0
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
    # systemd still holds the listening socket; its path must still lead to it.
    assert handoff.exists()


def test_notify_out_of_file_descriptors_is_not_an_error(notifications: Notifications) -> None:
    """A daemon at its descriptor limit (EMFILE) still runs and stops: a
    status message it cannot send is dropped, never raised."""
    code = (
        "import os, resource, sys\n"
        "from lazypaged.notify import notify\n"
        "n = len(os.listdir('/proc/self/fd'))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (n - 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "print(notify('STATUS=full'))\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": notifications.address}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", (r.stdout, r.stderr)
