"""Two daemons on two "hosts" for the load and reliability tests.

Namespace A runs an exporter (``[export]`` over mutual TLS on the veth
pair), namespace B the daemon that restores from it. Targets may run in
either namespace or outside both: the handoff socket is a path, and path
sockets do not belong to a network namespace.

Nothing here owns cleanup: callers create :class:`netns.Hosts` in a fixture
or a ``try``/``finally`` and destroy it (which kills every process started
with :meth:`netns.Hosts.popen`, daemons included).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import trustme

from . import netns

PORT = 7070


@dataclass(frozen=True)
class Pki:
    ca: Path
    exporter: tuple[Path, Path]
    reader: tuple[Path, Path]


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for A's address and a client one for B."""
    d.mkdir(exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    pairs = []
    for name, ident in (("a", netns.ADDR_A), ("b", "node-b")):
        leaf = ca.issue_cert(ident)
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        pairs.append((d / f"{name}.crt", d / f"{name}.key"))
    return Pki(d / "ca.crt", pairs[0], pairs[1])


def _config(work: Path, name: str, snapshots: Path, daemon: str, rest: str) -> tuple[Path, Path, Path]:
    run = work / f"{name}-run"
    run.mkdir(exist_ok=True)
    sock = run / "handoff.sock"
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f'[daemon]\nhandoff_socket = "{sock}"\nsnapshot_dirs = ["{snapshots}"]\n'
        f'log_format = "json"\nlog_level = "debug"\nshutdown_grace = 5.0\n{daemon}\n'
        f"[working_set]\nenabled = false\n{rest}\n"
    )
    return cfg, sock, work / f"{name}.log"


def start_exporter(
    hosts: netns.Hosts, work: Path, snapshots: Path, exports: list[str], pki: Pki, port: int = PORT
) -> netns.NsDaemon:
    """A daemon in A exporting ``exports`` (names inside ``snapshots``) on ADDR_A:port."""
    crt, key = pki.exporter
    names = ", ".join(f'"{e}"' for e in exports)
    rest = (
        f'[export]\nlisten = "{netns.ADDR_A}:{port}"\nsnapshots = [{names}]\n'
        f'tls_cert = "{crt}"\ntls_key = "{key}"\ntls_ca = "{pki.ca}"\n'
    )
    cfg, sock, log = _config(work, "exporter", snapshots, "", rest)
    return netns.NsDaemon(hosts, "a", cfg, sock, log, exports=True).start()


def start_reader(
    hosts: netns.Hosts,
    work: Path,
    snapshots: Path,
    pki: Pki,
    *,
    stall: float = 1.0,
    deadline: float = 60.0,
    daemon: str = "",
    session: str = "",
) -> netns.NsDaemon:
    """A daemon in B with its own snapshots, reading ``peer://ADDR_A:…`` over TLS."""
    crt, key = pki.reader
    rest = (
        f'[remote]\ntls_cert = "{crt}"\ntls_key = "{key}"\ntls_ca = "{pki.ca}"\n'
        f"stall_timeout = {stall}\nreconnect_deadline = {deadline}\nbackoff_max = 0.25\nconnect_timeout = 2.0\n"
        f"[session]\n{session}\n"
    )
    cfg, sock, log = _config(work, "reader", snapshots, daemon, rest)
    return netns.NsDaemon(hosts, "b", cfg, sock, log).start()


def peer_url(name: str, port: int = PORT) -> str:
    return f"peer://{netns.ADDR_A}:{port}/{name}"


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` of a live process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
