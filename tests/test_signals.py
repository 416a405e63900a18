"""Every signal a person (or the kernel) may send by habit to ``lazypaged
serve``: none ends the daemon without the ordered shutdown.

A ``keeps_uffd: false`` target (its uffd held by the daemon alone, as with
Firecracker) is mid-restore when the signal arrives; it must read every byte
right, and the daemon either keeps serving or stops in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import HERE, DaemonHandle, MiB, _needs_root, start_daemon, stop_daemon

SIZE = 4 * MiB

#: Signals the daemon notes in its log and otherwise ignores.
IGNORED = [
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
    signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSTKFLT, signal.SIGPWR, signal.SIGSYS,
    signal.SIGTRAP, signal.SIGABRT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
    signal.SIGRTMIN, signal.SIGRTMIN + 7, signal.SIGRTMAX,
]
#: Ignored without a log line: every write to a closed socket raises
#: SIGPIPE; SIGIO breaks read leases on source files (their code handles it).
SILENT = [signal.SIGPIPE, signal.SIGIO]
#: Signals that mean "stop": the ordered shutdown, as SIGTERM.
STOPPING = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT]


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def wait_log(d: DaemonHandle, event: str, after: int = 0, timeout: float = 30.0, **match: object) -> dict[str, object]:
    """The first ``event`` line past line ``after`` with these fields; fails
    fast if the daemon exits without writing it."""
    deadline = time.monotonic() + timeout
    while True:
        exited = d.proc.poll() is not None  # before reading: a last line comes before the exit
        for x in d.log_lines()[after:]:
            if x.get("event") == event and all(x.get(k) == v for k, v in match.items()):
                return x
        if exited:
            pytest.fail(f"daemon exited ({d.proc.returncode}) without logging {event} {match}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {event} {match} in the daemon log")
        time.sleep(0.02)  # polling the log file for the line, not a wait for time to pass


def no_keep_target(d: DaemonHandle, seconds: float = 1.0) -> subprocess.Popen[str]:
    """A target that closed its own uffd copy; returns once it was accepted."""
    d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reliability_target.py"), "--socket", str(d.socket), "--image",
         str(d.snapshots / "img"), "--name", "img", "--size", str(SIZE), "--no-keep", "--seconds", str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if "accepted" not in first:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"target not accepted: {first}{out}{err}")
    return proc


def check_target(proc: subprocess.Popen[str], what: str) -> None:
    out, err = proc.communicate(timeout=120)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert proc.returncode == 0, (what, proc.returncode, out, err[-2000:])
    assert lines[-1]["wrong_pages"] == 0, (what, out)


def test_habitual_signals_leave_the_daemon_serving(tmp_path: Path) -> None:
    _needs_root()
    d = start_daemon(tmp_path, session_config="fill = false")
    try:
        for sig in SILENT + IGNORED:  # a silent one first: the next line shows it did no harm
            mark = len(d.log_lines())
            proc = no_keep_target(d)
            try:
                d.proc.send_signal(sig)
                if sig not in SILENT:
                    wait_log(d, "signal_ignored", mark, signal=_name(sig))
                check_target(proc, _name(sig))
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
            assert d.alive(), f"{_name(sig)} ended the daemon"
        # SIGHUP is a reload, and the session in progress is served on.
        mark = len(d.log_lines())
        proc = no_keep_target(d)
        d.proc.send_signal(signal.SIGHUP)
        wait_log(d, "reloaded", mark)
        check_target(proc, "SIGHUP")
        assert d.alive()
    finally:
        rc = stop_daemon(d)
    assert rc == 0, d.log.read_text()[-3000:]
    assert not [x for x in d.log_lines() if x.get("event") == "session_bug"]


@pytest.mark.parametrize("sig", STOPPING, ids=_name)
def test_stop_signals_shut_down_in_order(tmp_path: Path, sig: int) -> None:
    _needs_root()
    d = start_daemon(tmp_path, session_config="fill = false")
    proc = no_keep_target(d)
    try:
        d.proc.send_signal(sig)
        check_target(proc, _name(sig))
        rc = d.proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        stop_daemon(d)
    events = [x.get("event") for x in d.log_lines()]
    assert rc == 0, d.log.read_text()[-3000:]
    assert {"stopping", "stopped"} <= set(events), events
    assert not d.socket.exists(), "the handoff socket is removed on the way out"


def test_a_second_signal_kills_targets_only_the_daemon_could_serve(tmp_path: Path) -> None:
    """Forced exit: the target whose uffd only the daemon holds is killed,
    and gone, before that uffd is closed; it never runs on zero pages."""
    _needs_root()
    d = start_daemon(tmp_path, session_config="fill = false")
    proc = no_keep_target(d, seconds=60)
    try:
        d.proc.send_signal(signal.SIGTERM)
        wait_log(d, "stopping")
        d.proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert d.proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        stop_daemon(d)
    events = [x.get("event") for x in d.log_lines()]
    assert {"second_signal", "killing_target", "stopped"} <= set(events), events


def _kill_helpers(target: int) -> None:
    """The re-hand helpers of ``target`` (they name it with --target)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"lazypaged.rehand" in argv and str(target).encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name), signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_forced_exit_kills_a_forked_child_it_alone_serves(tmp_path: Path) -> None:
    """A forked child's uffd came with the fork event, so only the daemon
    holds it, and the event does not name the child: on a forced exit the
    child is found among the target's descendants and killed, not left to
    read zeros."""
    _needs_root()
    d = start_daemon(tmp_path, session_config="fill = false")
    d.image("img", SIZE)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "reliability_fork_target.py"), "--socket", str(d.socket), "--image",
         str(d.snapshots / "img"), "--name", "img", "--size", str(SIZE), "--pause", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert "accepted" in json.loads(proc.stdout.readline())
        child = int(json.loads(proc.stdout.readline())["child"])
        wait_log(d, "target_forked")
        d.proc.send_signal(signal.SIGTERM)
        wait_log(d, "stopping")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 60
        while not _gone(child):
            assert time.monotonic() < deadline, "the child was not killed"
            time.sleep(0.02)  # polling the child's state
    finally:
        # The parent and its re-hand helper: its own uffd copy keeps it
        # blocked, and no daemon serves it any more.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # What the target printed is in the pipe by now (the child is gone);
        # its re-hand helper, in a session of its own, still holds the pipe
        # until its reconnect window ends: read without waiting for EOF.
        assert proc.stdout is not None
        assert proc.stderr is not None
        os.set_blocking(proc.stdout.fileno(), False)
        out = proc.stdout.read() or ""
        proc.stdout.close()
        proc.stderr.close()
        _kill_helpers(proc.pid)
        stop_daemon(d)
    results = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert not [r for r in results if "child_done" in r], results  # killed before it could read
    killed = [x for x in d.log_lines() if x.get("event") == "killing_target"]
    assert child in [x["pid"] for x in killed], killed


def test_every_signal_has_a_decided_meaning() -> None:
    """No catchable signal whose default ends the process is left undecided."""
    from lazypaged import daemon

    tested = {*IGNORED, *SILENT, *STOPPING, signal.SIGHUP}
    faults = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
    harmless = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGKILL, signal.SIGSTOP}
    rt = set(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))
    assert set(signal.valid_signals()) - rt == {*tested, *faults, *harmless} - rt
    assert set(daemon.ignored_signals()) == ({*IGNORED} | rt) - {*STOPPING, *SILENT, signal.SIGHUP}
