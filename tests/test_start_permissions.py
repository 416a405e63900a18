"""``serve`` started by a user who may not create its sockets: one line that
names the path and what to change, exit 1, no traceback (before, only
``[Errno 13] Permission denied``). A snapshot dir it cannot read is said at
start, and the daemon serves on."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import _needs_root, wait_for_ready

NOBODY = 65534


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory uid 65534 can reach (pytest's tmp_path is root's 0700)."""
    _needs_root()
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    d = Path(tempfile.mkdtemp(prefix="lazypaged-perm-"))
    d.chmod(0o755)
    (d / "open").mkdir()
    os.chown(d / "open", NOBODY, NOBODY)
    (d / "snaps").mkdir(mode=0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _config(place: Path, socket_dir: Path, fmt: str, snaps: Path | None = None) -> Path:
    cfg = place / f"lazypaged-{fmt}.toml"
    cfg.write_text(
        f'[daemon]\nhandoff_socket = "{socket_dir / "handoff.sock"}"\n'
        f'snapshot_dirs = ["{snaps or place / "snaps"}"]\nstate_dir = "{place / "open" / "state"}"\n'
        f'log_format = "{fmt}"\n[control]\nsocket = "{place / "open" / "control.sock"}"\n'
    )
    cfg.chmod(0o644)
    return cfg


def _as_nobody(cfg: Path) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-m", "lazypaged", "serve", "--config", str(cfg)]


@pytest.mark.parametrize(("mode", "lacks"), [(0o755, "write"), (0o700, "search")])
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_socket_dir_not_writable_names_the_path_and_the_fix(place: Path, mode: int, lacks: str, fmt: str) -> None:
    locked = place / "locked"
    locked.mkdir()
    locked.chmod(mode)  # root's: uid 65534 may not create the handoff socket in it
    cfg = _config(place, locked, fmt)
    r = subprocess.run(_as_nobody(cfg), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    sock = str(locked / "handoff.sock")
    if fmt == "json":
        rec = json.loads(lines[0])
        assert rec["event"] == "cannot_start"
        assert rec["level"] == "error"
        assert rec["path"] == sock
        text = f"{rec['error']}: {rec['fix']}"
    else:
        text = lines[0]
        assert text.startswith("lazypaged: cannot start: ")
    assert f"permission denied on {sock}" in text
    assert f"{locked} is root:root mode {mode:04o}" in text
    assert "run the daemon as root" in text
    assert f"uid {NOBODY} has {lacks} permission" in text


def test_root_without_dac_override_is_told_to_chown(place: Path) -> None:
    """Under the unit the daemon is root without CAP_DAC_OVERRIDE: "run as
    root" would be no help there, the directory's owner or mode is."""
    theirs = place / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    cfg = _config(place, theirs, "json")
    r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all,+kill,+lease", sys.executable, "-m",
                        "lazypaged", "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    (line,) = r.stderr.splitlines()
    rec = json.loads(line)
    assert rec["path"] == str(theirs / "handoff.sock")
    assert f"{theirs} is {pwd.getpwuid(NOBODY).pw_name}:" in rec["fix"]
    assert "root without CAP_DAC_OVERRIDE" in rec["fix"]
    assert "chown it to root" in rec["fix"]


def test_unreadable_snapshot_dir_is_a_warning_and_the_daemon_serves(place: Path) -> None:
    hidden = place / "hidden"
    hidden.mkdir()
    hidden.chmod(0o700)
    cfg = _config(place, place / "open", "json", snaps=hidden)
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    name = f"lazypaged-perm-{os.getpid()}-{time.monotonic_ns()}"
    ready.bind("\0" + name)  # abstract: uid 65534 may send to it
    proc = subprocess.Popen(_as_nobody(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": "@" + name})
    try:
        wait_for_ready(ready, proc)  # type: ignore[arg-type]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        ready.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    seen = [json.loads(x) for x in err.splitlines()]
    (warn,) = [x for x in seen if x.get("event") == "snapshot_dir_unreadable"]
    assert warn["level"] == "warning"
    assert warn["path"] == str(hidden)
    assert f"{hidden} is root:root mode 0700" in str(warn["fix"])
    assert f"uid {NOBODY} has read permission" in str(warn["fix"])
    assert any(x.get("event") == "started" for x in seen)
