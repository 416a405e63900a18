"""A registered range split into VMAs after the handoff (mprotect sends no event)."""

from __future__ import annotations

import mmap
import subprocess
import sys

import pytest

from .conftest import HERE, DaemonHandle, finish, kill
from .test_signals import wait_log

PAGE = mmap.PAGESIZE
PAGES = 64
#: 64 MiB: the fill is still streaming when the target splits the range.
FILL_PAGES = 16384
#: Seconds the target may take; it needs well under one, a hang is the bug.
BOUND = 30


@pytest.mark.parametrize("events", [True, False], ids=["events", "no-events"])
@pytest.mark.parametrize("protect", ["4:64", "4:60", "1:2", "60:63"])
def test_a_copy_across_a_vma_split_after_the_handoff(daemon: DaemonHandle, protect: str, events: bool) -> None:
    """Every page on both sides of each boundary reads its image bytes, the
    faulting thread is served, and each page's bytes are counted once."""
    image = daemon.image("img", PAGES * PAGE)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "vma_split_target.py"),
            "--socket",
            str(daemon.socket),
            "--image",
            str(image),
            "--name",
            "img",
            "--pages",
            str(PAGES),
            "--protect",
            protect,
            *([] if events else ["--no-events"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        rc, lines, err = finish(proc, timeout=BOUND)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail(f"the target hung: a fault across the new VMA boundary was never served (protect {protect})")
    assert rc == 0, (lines, err[-3000:])
    assert lines[-1]["ok"] is True, lines
    ended = wait_log(daemon, "session_ended")
    assert ended["outcome"] == "complete", ended
    # Every page once (holes as zero pages), none counted without its bytes.
    assert int(str(ended["bytes_copied"])) + int(str(ended["bytes_zero"])) == PAGES * PAGE, ended
    assert ended["pages_installed"] == PAGES, ended


@pytest.mark.parametrize("events", [True, False], ids=["events", "no-events"])
def test_the_fill_across_a_vma_split_after_the_handoff(daemon: DaemonHandle, events: bool) -> None:
    """The fill's copies meet boundaries made while it streams: every page
    still arrives once, and the restore completes."""
    pages = FILL_PAGES
    image = daemon.image("img", pages * PAGE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "vma_split_target.py"), "--socket", str(daemon.socket), "--image", str(image),
         "--name", "img", "--pages", str(pages), "--protect", f"{pages // 4 + 3}:{pages - 5}", "--fill",
         *([] if events else ["--no-events"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        rc, lines, err = finish(proc, timeout=BOUND)
    except subprocess.TimeoutExpired:
        kill(proc)
        pytest.fail("the restore never completed: the fill's copies across the new VMA boundaries")
    assert rc == 0, (lines, err[-3000:])
    assert lines[-1]["ok"] is True, lines
    ended = wait_log(daemon, "session_ended")
    assert ended["outcome"] == "complete", ended
    assert int(str(ended["bytes_copied"])) + int(str(ended["bytes_zero"])) == pages * PAGE, ended
