"""A forked child's session runs under every option of its parent's request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .conftest import HERE, MiB, start_daemon, stop_daemon

TARGET = HERE / "fork_policy_target.py"
PAGE = os.sysconf("SC_PAGE_SIZE")
SIZE = 2 * MiB


def test_child_inherits_failure_policy(tmp_path: Path) -> None:
    """A child of a ``sigbus`` request gets SIGBUS (here EFAULT) for the
    pages its source lost, not the daemon's default policy (``wait``: the
    child would block for good)."""
    d = start_daemon(tmp_path)
    image = d.image("img", SIZE)
    ref = tmp_path / "img.ref"
    shutil.copyfile(image, ref)
    proc = subprocess.Popen(
        [sys.executable, str(TARGET), "--socket", str(d.socket), "--image", str(ref), "--name", "img",
         "--size", str(SIZE), "--policy", "sigbus"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = proc.stdout.readline()
        assert line.startswith("{"), line
        os.truncate(image, SIZE // 2)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        failed: list[dict[str, object]] = []
        while not failed and time.monotonic() < deadline:
            failed = [x for x in d.log_lines() if x.get("event") == "source_failed"]
            if not failed:
                time.sleep(0.02)  # polling the log for the event
        assert failed, "the child's source never failed"
        assert failed[0]["policy"] == "sigbus", failed[0]
        out, err = proc.communicate(timeout=30)
        result = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
        assert proc.returncode == 0, (out, err)
        assert result["wrong_pages"] == 0
        assert result["poisoned_pages"] == SIZE // 2 // PAGE
        forked = [x for x in d.log_lines() if x.get("event") == "target_forked"]
        assert forked
        child = forked[0]["child_session"]
        ended = [x for x in d.log_lines() if x.get("event") == "session_ended" and x.get("session") == child]
        assert ended, child
        assert ended[0]["failure_policy"] == "sigbus", ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert stop_daemon(d) == 0
