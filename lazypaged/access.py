"""Who may hand memory to this daemon, and which snapshots each client may read.

A restore copies a snapshot's bytes into the client's memory: whoever can
restore an image can read it. So the handoff socket checks, in order:

1. the socket file itself: ``socket_mode`` (0660 by default) and an owning
   group (``[access] socket_group``) decide who can connect at all;
2. the connecting process's credentials (``SO_PEERCRED``, and its
   supplementary groups through ``SO_PEERGROUPS``) against ``allow_uids`` /
   ``allow_gids`` — both empty admits everyone who can connect; uid 0 is
   always admitted (it can read the images anyway);
3. each range's snapshot against the tenant rules: a rule names snapshot
   path globs (matched against the *resolved* path, so ``..`` and symlinks
   cannot dodge them; remote sources against their ``peer://`` name) and the
   uids/gids that may read them. A snapshot named by some rule is readable
   only by clients a matching rule admits; one named by none follows
   ``unmatched`` ("allow" or "deny");
4. the limits below, each a named setting with a documented default.

Every refusal is the handoff error ``forbidden`` (1–3) or ``limit`` (4) with
a message naming the setting, and a ``handoff_refused`` log line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import grp
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .received_uffd import Refused

if TYPE_CHECKING:
    from . import handoff_protocol as hp
    from .sessions import SessionTable
    from .sources.registry import SourceRegistry
    from .unixsock import PeerCred

#: Sessions one uid may have at once: enough for a host restoring a fleet of
#: its own processes, few enough that one tenant cannot take every slot of
#: ``max_sessions`` (256).
DEFAULT_MAX_SESSIONS_PER_CLIENT = 64
#: Ranges one restore may name: a CRIU-sized process has a few thousand VMAs
#: (the protocol's own ceiling is 4096).
DEFAULT_MAX_REGIONS_PER_SESSION = 4096
#: Bytes of memory under restore across all live sessions: bounds the state
#: the daemon keeps (one byte per page, ~256 MiB of page states at 1 TiB).
DEFAULT_MAX_INFLIGHT_BYTES = 1 << 40
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Supplementary groups read at first (NGROUPS_MAX is 65536; real users have
#: few); a longer list is read in a second call of the size the kernel asks.
_MAX_GROUPS = 1024


class AccessError(Exception):
    """Bad [access] configuration."""


@dataclass(frozen=True)
class TenantRule:
    """Snapshots matching ``snapshots`` may be read by ``uids``/``gids`` only."""

    snapshots: tuple[str, ...]
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()

    def names(self, target: str) -> bool:
        return any(fnmatch.fnmatchcase(target, g) for g in self.snapshots)

    def admits(self, who: Client) -> bool:
        return who.uid in self.uids or any(g in self.gids for g in who.gids)


@dataclass(frozen=True)
class AccessConfig:
    """[access]: who may connect, which snapshots each may read, per-client limits."""

    #: Group owning the handoff and control sockets (name or number); empty: unchanged.
    socket_group: str = ""
    #: Clients admitted by uid / by primary or supplementary gid; both empty: any.
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    #: Tenant rules (``[[access.tenants]]``), see the module doc.
    tenants: tuple[TenantRule, ...] = ()
    #: Snapshots no tenant rule names: "allow" (any admitted client) or "deny".
    unmatched: str = "allow"
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    max_regions_per_session: int = DEFAULT_MAX_REGIONS_PER_SESSION
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    #: Certificate identities (subject CN or a subjectAltName value) whose
    #: TLS clients may read this daemon's exports; empty: any certificate the
    #: export's CA signed.
    peer_identities: tuple[str, ...] = ()

    @classmethod
    def from_table(cls, table: dict[str, Any], section: str) -> AccessConfig:
        """Build from the parsed ``[access]`` TOML table; errors name the setting."""
        known = set(cls.__dataclass_fields__)
        out: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{section}{key}"
            if key not in known:
                raise AccessError(f"unknown setting {where}")
            if key in ("allow_uids", "allow_gids"):
                out[key] = _ids(where, value)
            elif key == "tenants":
                out[key] = tuple(_rule(f"{where}[{i}]", r) for i, r in enumerate(_list(where, value)))
            elif key == "peer_identities":
                names = _list(where, value)
                if not all(isinstance(v, str) and v for v in names):
                    raise AccessError(f"{where} must be a list of certificate names")
                out[key] = tuple(names)
            elif key in ("socket_group", "unmatched"):
                if not isinstance(value, str):
                    raise AccessError(f"{where} must be a string")
                out[key] = value
            else:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise AccessError(f"{where} must be a positive integer")
                out[key] = value
        cfg = cls(**out)
        if cfg.unmatched not in ("allow", "deny"):
            raise AccessError(f"{section}unmatched must be allow or deny, not {cfg.unmatched!r}")
        if cfg.socket_group:
            socket_gid(cfg.socket_group)
        return cfg


def _list(where: str, value: object) -> list[Any]:
    if not isinstance(value, list):
        raise AccessError(f"{where} must be a list")
    return value


def _ids(where: str, value: object) -> tuple[int, ...]:
    items = _list(where, value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in items):
        raise AccessError(f"{where} must be a list of numeric ids")
    return tuple(items)


def _rule(where: str, value: object) -> TenantRule:
    if not isinstance(value, dict):
        raise AccessError(f"{where} must be a table with snapshots, uids, gids")
    extra = set(value) - {"snapshots", "uids", "gids"}
    if extra:
        raise AccessError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
    globs = _list(f"{where}.snapshots", value.get("snapshots"))
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise AccessError(f"{where}.snapshots must be a non-empty list of path globs")
    return TenantRule(tuple(globs), _ids(f"{where}.uids", value.get("uids", [])),
                      _ids(f"{where}.gids", value.get("gids", [])))


def socket_gid(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise AccessError(f"access.socket_group: no group named {group!r}") from None


def own_socket(path: Path, group: str) -> None:
    """Give ``path`` to ``group`` (its mode stays what the listener set)."""
    if group:
        os.chown(path, -1, socket_gid(group))


@dataclass(frozen=True)
class Client:
    uid: int
    gid: int
    gids: tuple[int, ...]  # primary and supplementary

    def __str__(self) -> str:
        return f"uid {self.uid} (gids {', '.join(map(str, self.gids))})"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]


def peer_groups(conn: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (``SO_PEERGROUPS``), as of its connect().

    Through libc: socket.getsockopt caps its buffer at 1024 bytes, and a peer
    in more than 256 groups would be read as in none. The kernel answers
    ERANGE with the size it needs; one more call with that size."""
    size = 4 * _MAX_GROUPS
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = ctypes.c_uint32(size)
        if _libc.getsockopt(conn.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(n)) == 0:
            raw = buf.raw[: n.value // 4 * 4]
            return struct.unpack(f"{len(raw) // 4}I", raw)
        err = ctypes.get_errno()
        if err != errno.ERANGE or n.value <= size:
            raise OSError(err, f"SO_PEERGROUPS: {os.strerror(err)}")
        size = n.value
    raise OSError(errno.ERANGE, "SO_PEERGROUPS: the peer's group list keeps growing")


def client_of(conn: socket.socket, cred: PeerCred) -> Client:
    """The peer's identity: SO_PEERCRED plus its supplementary groups.

    Groups that cannot be read count as none: a client admitted only through
    one is refused, never the other way round."""
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):
        groups = peer_groups(conn)
    return Client(cred.uid, cred.gid, tuple(dict.fromkeys((cred.gid, *groups))))


class AccessControl:
    def __init__(self, cfg: AccessConfig, registry: SourceRegistry | None) -> None:
        self.cfg = cfg
        self.registry = registry
        self._owner: dict[str, int] = {}  # session id -> uid

    def admit(self, who: Client) -> None:
        c = self.cfg
        if who.uid == 0 or not (c.allow_uids or c.allow_gids):
            return
        if who.uid in c.allow_uids or any(g in c.allow_gids for g in who.gids):
            return
        raise Refused("forbidden", f"{who} may not hand off to this daemon (access.allow_uids / access.allow_gids)")

    def check_request(self, who: Client, req: hp.RestoreRequest, sessions: SessionTable) -> None:
        c = self.cfg
        if len(req.ranges) > c.max_regions_per_session:
            raise Refused("limit", f"{len(req.ranges)} ranges exceed access.max_regions_per_session "
                                   f"({c.max_regions_per_session})")
        mine = sum(1 for s in sessions if self._owner.get(s.id) == who.uid)
        if mine >= c.max_sessions_per_client:
            raise Refused("limit", f"uid {who.uid} already has {mine} sessions "
                                   f"(access.max_sessions_per_client = {c.max_sessions_per_client})")
        live = sum(m.end - m.start for s in sessions for m in s.mappings)
        asked = sum(r.length for r in req.ranges)
        if live + asked > c.max_inflight_bytes:
            raise Refused("limit", f"{asked} more bytes under restore would exceed access.max_inflight_bytes "
                                   f"({c.max_inflight_bytes}; {live} in use)")
        if who.uid == 0:
            return
        for name in sorted({r.source for r in req.ranges}):
            self.check_snapshot(who, name)

    def check_snapshot(self, who: Client, name: str) -> None:
        if who.uid == 0 or (not self.cfg.tenants and self.cfg.unmatched == "allow"):
            return
        target = name
        if "://" not in name and self.registry is not None:
            try:
                target = str(self.registry.resolve(name))
            except Exception:  # the source lookup reports a bad name itself, with its own code
                return
        self.check_path(who, name, target)

    def check_path(self, who: Client, name: str, target: str) -> None:
        """Tenant rules for a snapshot already resolved to ``target`` (a real
        path, or a ``peer://`` name); ``name`` is what the refusal quotes."""
        if who.uid == 0 or (not self.cfg.tenants and self.cfg.unmatched == "allow"):
            return
        rules = [t for t in self.cfg.tenants if t.names(target)]
        if any(t.admits(who) for t in rules):
            return
        if not rules and self.cfg.unmatched == "allow":
            return
        why = "no tenant rule admits it" if rules else "no tenant rule names it (access.unmatched = deny)"
        raise Refused("forbidden", f"{who} may not restore snapshot {name!r}: {why}")

    def note(self, session_id: str, who: Client) -> None:
        self._owner[session_id] = who.uid

    def forget(self, session_id: str) -> None:
        self._owner.pop(session_id, None)


class SocketOwner:
    """A daemon listener that hands an already-created socket file to ``socket_group``.

    Listed after the listener that creates the socket (the control socket)."""

    def __init__(self, path: Path, group: str) -> None:
        self.path = path
        self.group = group

    async def start(self) -> None:
        own_socket(self.path, self.group)

    def stop_accepting(self) -> None:
        pass

    async def close_connections(self) -> None:
        pass


def certificate_identities(cert: dict[str, Any]) -> set[str]:
    """The names a verified peer certificate proves: subject CN and subjectAltName values."""
    out = {str(v) for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"}
    out |= {str(v) for _, v in cert.get("subjectAltName", ())}
    return out
