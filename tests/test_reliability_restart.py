"""SIGKILL the daemon mid-restore, start it again: every target ends with the right bytes.

Native targets keep their own copy of the uffd; their missing pages block
while no daemon runs, and the client hands the uffd to the next daemon.
The default run does a few rounds; ``pytest -m slow`` does the full 20
(docs/reliability.md has the figures).
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

from .conftest import HERE, DaemonHandle, MiB, _needs_root, start_daemon, stop_daemon, wait_for_socket

TARGET = HERE / "reliability_target.py"
SIZE = 16 * MiB
TARGETS_PER_ROUND = 2


def restart(d: DaemonHandle) -> None:
    """Start a new daemon on ``d``'s config, appending to its log."""
    with open(d.log, "ab") as lf:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "lazypaged", "serve", "--config", str(d.config)], stdout=lf, stderr=lf
        )
    wait_for_socket(d.socket, d.proc)


def spawn_target(d: DaemonHandle, name: str, seed: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TARGET), "--socket", str(d.socket), "--image", str(d.snapshots / name),
         "--name", name, "--size", str(SIZE), "--seed", str(seed), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def accepted(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith('{"accepted"'), (line, proc.stderr.read() if proc.stderr else "")


def result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=120)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert lines, f"target printed nothing (rc {proc.returncode}): {err[-2000:]}"
    res: dict[str, object] = lines[-1]
    res["rc"] = proc.returncode
    return res


def kill_rounds(tmp: Path, rounds: int, seed: int) -> list[dict[str, object]]:
    """``rounds`` times: targets start, the daemon is SIGKILLed at a random
    moment and restarted after a random outage. Returns every target's result."""
    rng = random.Random(seed)
    d = start_daemon(tmp)
    d.image("img", SIZE)
    results: list[dict[str, object]] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        for n in range(rounds):
            fill = ("--fill",) if n % 3 == 2 else ()
            procs = [spawn_target(d, "img", rng.randrange(1 << 30), *fill) for _ in range(TARGETS_PER_ROUND)]
            for p in procs:
                accepted(p)
            time.sleep(rng.uniform(0.0, 1.0))
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            time.sleep(rng.uniform(0.0, 0.5))  # the outage: targets block meanwhile
            restart(d)
            t0 = time.monotonic()
            results += [result(p) for p in procs]
            print(f"round {n}: targets done {time.monotonic() - t0:.1f} s after the restart")
            procs = []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
        assert stop_daemon(d) == 0
    return results


def check(results: list[dict[str, object]], rounds: int) -> None:
    assert len(results) == rounds * TARGETS_PER_ROUND
    bad = [r for r in results if not r["ok"] or r["rc"] != 0]
    assert not bad, bad
    assert all(r["wrong_pages"] == 0 for r in results)
    unfinished = [r for r in results if isinstance(r["complete"], dict) and "pages" not in r["complete"]]
    assert not unfinished, unfinished
    # Most kills land mid-restore (the touches last ~1 s): those re-handed.
    assert sum(1 for r in results if isinstance(r["rehandoffs"], int) and r["rehandoffs"] > 0) >= rounds


def test_sigkill_mid_restore_few(tmp_path: Path) -> None:
    _needs_root()
    check(kill_rounds(tmp_path, 3, seed=1), 3)


@pytest.mark.slow
def test_sigkill_mid_restore_20(tmp_path: Path) -> None:
    _needs_root()
    check(kill_rounds(tmp_path, 20, seed=2), 20)
