"""Targets that fork, mremap, drop and unmap memory mid-restore."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import HERE, DaemonHandle, MiB, finish

SIZE = 16 * MiB


@pytest.mark.parametrize("fill", [True, False], ids=["fill", "faults-only"])
@pytest.mark.parametrize("mode", ["fork", "forkchain", "mremap", "dontneed", "munmap"])
def test_address_space_changes(daemon: DaemonHandle, mode: str, fill: bool) -> None:
    image = daemon.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "event_target.py"), "--socket", str(daemon.socket), "--image", str(image),
         "--name", "img", "--size", str(SIZE), "--mode", mode, *([] if fill else ["--no-fill"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    rc, lines, err = finish(proc)
    assert rc == 0, (lines, err[-3000:])
    assert lines[-1]["ok"] is True
    if mode.startswith("fork"):
        forked = [x for x in daemon.log_lines() if x.get("event") == "target_forked"]
        assert len(forked) == (3 if mode == "forkchain" else 1), forked
