"""``lazypaged criu-lazy-pages`` option handling: criu's spellings, usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lazypaged.criu.cli import normalize_argv


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["-D", "x", "-v4"], ["-D", "x", "--verbosity=4"]),
        (["-v"], ["--verbosity=3"]),
        (["-vv", "-D", "x"], ["-D", "x", "--verbosity=4"]),
        (["-v0"], ["--verbosity=0"]),
        (["-D", "-v"], ["-D", "--verbosity=3"]),
    ],
)
def test_criu_verbosity_spellings(argv: list[str], want: list[str]) -> None:
    assert normalize_argv(argv) == want


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazypaged", "criu-lazy-pages", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--page-server", "--address", "127.0.0.1"], "needs --address and --port"),
        (["--address", "127.0.0.1", "--port", "1"], "only make sense with --page-server"),
        (["-D", "/nonexistent/images"], "is not a directory"),
        (["--snapshot", "x.lzs", "--page-server", "--address", "a", "--port", "1"], "exclude each other"),
        (["--lazy-pages"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(args: list[str], words: str) -> None:
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr


def test_a_daemon_already_listening_is_not_replaced(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "lazy-pages.socket"))
        s.listen()
        r = _run("-D", str(tmp_path))
    assert r.returncode == 1
    assert "in use" in r.stderr
