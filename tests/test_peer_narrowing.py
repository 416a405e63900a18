"""A peer's damaged frame under ``wait``: good pages next to it are served.

A fault-around read that reaches a page whose every copy arrives corrupted
fails for good; under ``wait`` its good pages are read again in pieces and
installed, and only the bad page waits for the retries (the same narrowing
that ``sigbus`` gets, tests/test_reliability_peer.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import IO, Any

from .peer_relay import FlipRange
from .test_reliability_peer import BAD, CHECK_TARGET, PAGE, SIZE, Loop, loop  # noqa: F401 (the fixture)


def _read_lines(stdout: IO[str], n: int, out: list[dict[str, Any]]) -> None:
    """Up to ``n`` JSON lines into ``out`` (in a thread: the caller bounds the wait)."""
    for _ in range(n):
        line = stdout.readline()
        if not line:
            return
        out.append(json.loads(line))



def test_wait_serves_good_pages_beside_a_bad_frame(loop: Loop) -> None:  # noqa: F811
    reader = loop.start(FlipRange(BAD, BAD + PAGE), "wait")
    assert loop.relay is not None
    url = f"peer://127.0.0.1:{loop.relay.port}/img"
    proc = subprocess.Popen(
        [sys.executable, str(CHECK_TARGET), "--socket", str(reader.socket), "--image", str(loop.image),
         "--name", url, "--size", str(SIZE), "--no-fill", "--skip", f"{BAD // PAGE}:1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: list[dict[str, Any]] = []
        t = threading.Thread(target=_read_lines, args=(stdout, 2, lines))
        t.start()
        t.join(timeout=60)  # accepted, then read_s: every page but the bad one read
        assert len(lines) == 2, ("a good page stayed blocked behind the bad one", lines)
        assert "read_s" in lines[1], lines
        failed = [e for e in reader.log_lines() if e.get("event") == "source_failed"]
        assert failed, "the bad page never failed a read"
        assert {e["policy"] for e in failed} == {"wait"}, failed
    finally:
        proc.kill()
        proc.communicate()
