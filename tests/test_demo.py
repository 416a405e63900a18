"""``lazypaged demo`` as a first-time user runs it: bad sizes are usage
errors, a daemon or target that cannot start ends the demo at once with one
line, and no run leaves its scratch directory (a 256 MiB image and its
``.ws`` working-set record by default) behind in the temp directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import _needs_root

#: Bound on each wait for the demo's exit; a hang is what these tests catch.
EXIT_TIMEOUT = 120.0


def _env(tmpdir: Path) -> dict[str, str]:
    """The caller's environment with the demo's scratch space pointed at ``tmpdir``."""
    return {**os.environ, "TMPDIR": str(tmpdir)}


def _demo(*args: str, tmpdir: Path, user: int | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "lazypaged", "demo", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.Popen(
        cmd, cwd=tmpdir, env=_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"demo did not exit within {EXIT_TIMEOUT} s; stderr:\n{err[-2000:]}")
    return proc.returncode, out, err


def _own_lines(err: str) -> list[str]:
    """The demo's own messages, without the daemon's JSON log lines."""
    return [line for line in err.splitlines() if line.startswith("lazypaged demo:")]


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "tmp"
    d.mkdir()
    return d


@pytest.mark.parametrize("size", ["-5", "0", "abc", "99999999"])
def test_bad_size_is_a_usage_error(scratch: Path, size: str) -> None:
    rc, _out, err = _finish(_demo("--size-mib", size, "--once", tmpdir=scratch))
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lazypaged demo:"), err
    assert "--size-mib" in err
    assert list(scratch.iterdir()) == []


def test_once_leaves_nothing_behind(scratch: Path) -> None:
    _needs_root()
    rc, out, err = _finish(_demo("--size-mib", "8", "--once", tmpdir=scratch))
    assert rc == 0, err
    assert ": correct" in out, out
    assert "working_set_recorded" in err  # the .ws record was written, then removed
    assert list(scratch.iterdir()) == []


def test_ctrl_c_while_serving_leaves_nothing_behind(scratch: Path) -> None:
    _needs_root()
    proc = _demo("--size-mib", "8", tmpdir=scratch)
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if "daemon still serving" in line:
            break
    else:
        proc.wait()
        pytest.fail("demo never reached serving:\n" + "".join(seen[-20:]))
    proc.send_signal(signal.SIGINT)
    rc, out, err = _finish(proc)
    assert rc == 0, err
    assert ": correct" in out
    assert list(scratch.iterdir()) == []


def test_daemon_that_cannot_start_ends_the_demo(tmp_path: Path) -> None:
    # A temp directory so deep that the daemon's socket path passes the
    # 108-byte AF_UNIX limit: bind fails for real.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    rc, _out, err = _finish(_demo("--size-mib", "4", tmpdir=deep))
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert "Task was destroyed" not in err, err
    assert any("the daemon could not start" in line for line in _own_lines(err)), err
    assert list(deep.iterdir()) == []


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp directory another user can write in (pytest's own is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="lazypaged-demo-test-"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_target_that_cannot_start_ends_the_demo(shared_tmp: Path) -> None:
    """Without root the target cannot create its userfaultfd (EPERM), or
    cannot even be executed where the interpreter sits in root's home; either
    way the demo must stop with one line, not serve on for ever."""
    _needs_root()  # to drop to another user
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "0":
        pytest.skip("unprivileged userfaultfd is allowed here: the target would start")
    # No --once: the old demo served on after its target failed.
    rc, _out, err = _finish(_demo("--size-mib", "4", tmpdir=shared_tmp, user=65534))
    assert rc == 1, err
    assert any("target process" in line for line in _own_lines(err)), err
    assert "daemon still serving" not in err
    assert list(shared_tmp.iterdir()) == []


def test_ctrl_c_while_writing_the_image_leaves_nothing_behind(scratch: Path) -> None:
    # 1 GiB takes long enough to write that the interrupt lands mid-image;
    # landing later (the daemon then handles it) must end the same way.
    proc = _demo("--size-mib", "1024", "--once", tmpdir=scratch)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "writing a 1024 MiB demo image" in line, line
    proc.send_signal(signal.SIGINT)
    rc, _out, err = _finish(proc)
    assert rc != 0 or ": correct" in _out, err
    assert "Traceback" not in err, err
    assert list(scratch.iterdir()) == []
