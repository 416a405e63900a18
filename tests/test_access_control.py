"""Access control on the handoff socket: who may connect, which snapshots
each client may restore, per-client limits. Refusals are clear errors.

Clients run as uid/gid 65534 through setpriv(1), in a directory that user
can traverse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazypaged.demo import make_image

from .conftest import HERE, DaemonHandle, MiB, _needs_root, start_daemon, stop_daemon

CLIENT = HERE / "access_client.py"
NOBODY = 65534
SIZE = 2 * MiB


@pytest.fixture
def base() -> Iterator[Path]:
    _needs_root()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is needed to run a client as another user")
    d = Path(tempfile.mkdtemp(prefix="lazypaged-access-"))
    d.chmod(0o755)  # the unprivileged client must reach the socket
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def daemon(base: Path, access: str) -> DaemonHandle:
    d = start_daemon(base, extra_config=f'socket_mode = "0666"\n[access]\n{access}\n')
    for sub in ("a", "b"):
        (d.snapshots / sub).mkdir(exist_ok=True)
        make_image(d.snapshots / sub / "img", SIZE)
    return d


def as_user(uid: int, groups: tuple[int, ...] = ()) -> list[str]:
    """setpriv(1) prefix: uid and primary gid ``uid``, exactly ``groups`` as
    supplementary groups (setgroups(2))."""
    extra = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", *extra]


def run_client(d: DaemonHandle, name: str, *, uid: int | None = NOBODY, ranges: int = 1,
               groups: tuple[int, ...] = ()) -> dict[str, object]:
    cmd = [sys.executable, str(CLIENT), "--socket", str(d.socket), "--name", name, "--size", str(SIZE),
           "--ranges", str(ranges)]
    if uid is not None:
        cmd = [*as_user(uid, groups), *cmd]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert lines, out.stderr[-2000:]
    res: dict[str, object] = json.loads(lines[-1])
    return res


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(d: DaemonHandle, code: str) -> list[dict[str, object]]:
    return [x for x in d.log_lines() if x.get("event") == "handoff_refused" and x.get("code") == code]


def test_uid_not_on_the_allow_list_is_refused(base: Path) -> None:
    d = daemon(base, "allow_uids = [4242]")
    try:
        res = run_client(d, "a/img")
        assert res["code"] == "forbidden"
        assert "uid 65534" in str(res["message"])
        assert "allow_uids" in str(res["message"])
        assert refused(d, "forbidden")[0]["peer_uid"] == NOBODY
        # Root is admitted, and the daemon still serves.
        ok = run_client(d, "a/img", uid=None)
        assert ok["sha256"] == sha(d.snapshots / "a" / "img")
    finally:
        assert stop_daemon(d) == 0


def test_allowed_gid_is_admitted(base: Path) -> None:
    d = daemon(base, f"allow_gids = [{NOBODY}]")
    try:
        res = run_client(d, "a/img")
        assert res.get("ok") is True, res
        assert res["sha256"] == sha(d.snapshots / "a" / "img")
    finally:
        assert stop_daemon(d) == 0


def test_wrong_tenant_snapshot_is_refused(base: Path) -> None:
    snaps = base / "snapshots"
    rules = (
        f'[[access.tenants]]\nsnapshots = ["{snaps}/a/*"]\nuids = [{NOBODY}]\n'
        f'[[access.tenants]]\nsnapshots = ["{snaps}/b/*"]\nuids = [4242]\n'
    )
    d = daemon(base, rules)
    try:
        mine = run_client(d, "a/img")
        assert mine.get("ok") is True, mine
        assert mine["sha256"] == sha(snaps / "a" / "img")
        (snaps / "a" / "link").symlink_to("../b/img")  # a's name for b's image
        for name in ("b/img", "a/link"):
            other = run_client(d, name)
            assert other["code"] == "forbidden", other
            assert "may not restore snapshot" in str(other["message"])
            assert "no tenant rule admits it" in str(other["message"])
        assert len(refused(d, "forbidden")) == 2
        assert run_client(d, "a/../b/img")["code"] == "forbidden_source"
    finally:
        assert stop_daemon(d) == 0


def test_unmatched_snapshots_can_be_denied(base: Path) -> None:
    snaps = base / "snapshots"
    d = daemon(base, f'unmatched = "deny"\n[[access.tenants]]\nsnapshots = ["{snaps}/a/*"]\nuids = [{NOBODY}]\n')
    try:
        assert run_client(d, "a/img").get("ok") is True
        res = run_client(d, "b/img")
        assert res["code"] == "forbidden"
        assert "access.unmatched = deny" in str(res["message"])
    finally:
        assert stop_daemon(d) == 0


def test_limits_are_named_in_the_refusal(base: Path) -> None:
    d = daemon(base, "max_regions_per_session = 2\nmax_inflight_bytes = 3145728")
    try:
        res = run_client(d, "a/img", uid=None, ranges=4)
        assert res["code"] == "limit"
        assert "access.max_regions_per_session" in str(res["message"])
        # 2 MiB fits under 3 MiB in flight; the restore completes.
        assert run_client(d, "a/img", uid=None, ranges=2).get("ok") is True
    finally:
        assert stop_daemon(d) == 0


def test_sockets_get_the_configured_group_and_mode(base: Path) -> None:
    d = start_daemon(base, extra_config=f'[access]\nsocket_group = "{NOBODY}"\n')
    try:
        for name in ("handoff.sock", "control.sock"):
            st = os.stat(base / name)
            assert st.st_gid == NOBODY, name
            assert stat.S_IMODE(st.st_mode) == 0o660, name
        # Without group membership or the socket's owner, nobody cannot connect.
        (d.snapshots / "a").mkdir(exist_ok=True)
        make_image(d.snapshots / "a" / "img", SIZE)
        res = run_client(d, "a/img", uid=4242)
        assert res["code"] == "connect"
        assert "Permission denied" in str(res["message"])
    finally:
        assert stop_daemon(d) == 0


#: Groups nobody is not in: given to the client as supplementary groups only.
GROUP_IN, GROUP_OUT = 4243, 4244


def test_a_supplementary_group_is_seen(base: Path) -> None:
    """SO_PEERCRED carries only the primary gid; an allowed supplementary one must count too."""
    d = daemon(base, f"allow_gids = [{GROUP_IN}]")
    try:
        res = run_client(d, "a/img", groups=(GROUP_IN,))
        assert res.get("ok") is True, res
        assert res["sha256"] == sha(d.snapshots / "a" / "img")
        res = run_client(d, "a/img", groups=(GROUP_OUT,))
        assert res["code"] == "forbidden", res
        assert f"gids {NOBODY}, {GROUP_OUT}" in str(res["message"])
    finally:
        assert stop_daemon(d) == 0


def test_tenant_rules_by_supplementary_gid(base: Path) -> None:
    snaps = base / "snapshots"
    d = daemon(base, f'unmatched = "deny"\n[[access.tenants]]\nsnapshots = ["{snaps}/a/*"]\ngids = [{GROUP_IN}]\n')
    try:
        res = run_client(d, "a/img", groups=(GROUP_OUT, GROUP_IN))
        assert res.get("ok") is True, res
        res = run_client(d, "a/img", groups=(GROUP_OUT,))
        assert res["code"] == "forbidden", res
        assert "no tenant rule admits it" in str(res["message"])
    finally:
        assert stop_daemon(d) == 0


def test_a_long_group_list_is_read_whole(tmp_path: Path) -> None:
    """Past 256 groups the kernel wants a bigger buffer than socket.getsockopt offers."""
    _needs_root()
    from lazypaged.access import client_of
    from lazypaged.unixsock import peer_cred

    groups = list(range(5000, 7000))
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen(1)
        pid = os.fork()
        if pid == 0:  # the client: its groups, then connect
            try:
                os.setgroups(groups)
                with socket.socket(socket.AF_UNIX) as c:
                    c.connect(path)
                    c.recv(1)
            finally:
                os._exit(0)
        conn, _ = srv.accept()
        with conn:
            who = client_of(conn, peer_cred(conn))
            conn.send(b"x")
        os.waitpid(pid, 0)
    assert set(groups) <= set(who.gids)
