"""``lazypaged serve``: the daemon's lifetime, from listening to shutdown.

Shutdown order (SIGTERM or SIGINT):

1. stop accepting handoffs (the socket file is removed);
2. let running sessions finish for ``shutdown_grace`` seconds — the fill keeps
   streaming, so most restores complete;
3. after the grace period, sessions whose restorer kept its own uffd copy
   (``keeps_uffd``, the default of the bundled client) are let go: the target
   keeps blocking on missing pages until a new daemon serves it, it never
   reads zeros. Sessions whose uffd only the daemon holds keep being served
   until they complete, because closing that fd would make the kernel fill
   the target's missing pages with zeros;
4. a second signal forces exit: targets of sessions that are still not
   complete and whose uffd only the daemon holds are killed with SIGKILL
   (through a pidfd), and waited for, *before* the fd is closed. A forked
   child's session usually learns the child's pid soon after the fork (the
   event does not name it); where it could not, the child is found among
   the target's descendants by its uffd-registered memory. A killed target is a clear
   failure; silently wrong memory is not an option.

Signals (every one that would end the process by default was decided on,
because a daemon that dies holding a uffd only it holds zero-fills that
target):

* SIGTERM, SIGINT, SIGQUIT: the ordered shutdown above; the second one forces.
* SIGHUP: reload (``systemctl reload``): the configuration file is read
  again and what can change safely is applied; one ``reloaded`` line says
  what changed and what needs a restart. A file that does not validate is
  refused (``reload_failed``) and the running configuration stays.
* SIGPIPE: ignored silently, as Python does: a write to a closed socket
  fails with EPIPE and the connection's own code handles that. SIGIO:
  ignored silently until the source lease code takes it over (a writer
  breaking a lease on a snapshot file).
* every other signal whose default is to end or stop the process (SIGUSR1/2,
  SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU, SIGXFSZ, SIGSTKFLT, SIGPWR,
  SIGSYS, SIGTRAP, SIGABRT, SIGTSTP/TTIN/TTOU, the real-time signals): noted
  in the log (``signal_ignored``) and otherwise ignored. The daemon sets no
  timers and no limits of its own, so none of these is meant for it.
* SIGSEGV, SIGBUS, SIGILL, SIGFPE keep their default: they report a fault in
  the process itself, and a handler that returns would run the faulting
  instruction again forever. Uffds the daemon alone holds are parked in
  systemd's fd store, so even such a crash zero-fills nothing there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from . import __version__
from . import log as logsetup
from .access import SocketOwner
from .adopt import Custody
from .config import Config, ConfigError
from .firecracker_server import FirecrackerServer
from .handoff_server import HandoffServer
from .notify import notify
from .operations import control_socket_path
from .operations import listeners as operator_listeners
from .session import RestoreSession
from .sessions import SessionTable
from .sources.registry import SourceRegistry
from .target_vmas import descendants, registered_at


class Listener(Protocol):
    """Anything the daemon starts and stops with itself: the handoff socket,
    other handoff dialects, control and metrics endpoints, peer exports."""

    async def start(self) -> None: ...

    def stop_accepting(self) -> None: ...

    async def close_connections(self) -> None: ...


@runtime_checkable
class Reloadable(Protocol):
    """A part of the daemon that takes a new configuration on SIGHUP, for
    what it does from then on (new connections, new sessions)."""

    def reload(self, cfg: Config) -> None: ...


#: Signals that ask for the ordered shutdown.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: Faults of the process itself: left at their default (see the module doc).
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
#: Default-ignored or continuing signals: nothing to decide (SIGCHLD also
#: belongs to the event loop's child watcher).
_HARMLESS_SIGNALS = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH}
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
#: Ignored without a log line: SIGPIPE comes with every write to a closed
#: socket; SIGIO is how the kernel breaks a source file's read lease, and the
#: lease code (lazypaged/sources/lease.py) installs its own handler for it.
_SILENT_SIGNALS = {signal.SIGPIPE, signal.SIGIO}


def ignored_signals() -> list[int]:
    """Signals noted and ignored: all that would end or stop the daemon by
    default and mean neither stop nor reload to it."""
    skip = {*STOP_SIGNALS, signal.SIGHUP, *_SILENT_SIGNALS, *_FAULT_SIGNALS, *_HARMLESS_SIGNALS, *_UNCATCHABLE}
    return sorted(int(s) for s in signal.valid_signals() if s not in skip)


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"


def ignore_signals() -> None:
    """Before and after the event loop handles them: ignore every signal
    that would otherwise end the daemon on its way up or down."""
    for sig in (*ignored_signals(), signal.SIGHUP, *_SILENT_SIGNALS):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN)


#: The settings a reload applies, each with the parts of the daemon that use
#: it; a key ending in "." stands for its whole section. A setting is applied
#: when every part that uses it (and runs) takes reloads; any other changed
#: setting is reported as needing a restart and keeps its running value.
RELOAD_USERS: dict[str, tuple[str, ...]] = {
    "log_level": ("daemon",),
    "shutdown_grace": ("daemon",),
    "snapshot_dirs": ("registry",),
    "source_linger": ("registry",),
    "request_timeout": ("handoff", "firecracker"),
    "max_message_bytes": ("handoff", "firecracker"),
    "max_sessions": ("handoff", "firecracker"),
    "session.": ("handoff", "firecracker", "criu"),
    "working_set.": ("handoff", "firecracker"),
    "access.allow_uids": ("handoff", "firecracker"),
    "access.allow_gids": ("handoff", "firecracker"),
    "access.tenants": ("handoff", "firecracker"),
    "access.unmatched": ("handoff", "firecracker"),
    "access.max_sessions_per_client": ("handoff", "firecracker"),
    "access.max_regions_per_session": ("handoff", "firecracker"),
    "access.max_inflight_bytes": ("handoff", "firecracker"),
    "access.peer_identities": ("export",),
    "export.snapshots": ("export",),
}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → value of a Config and its sections."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v) and not isinstance(v, type):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _with(obj: Any, key: str, value: Any) -> Any:
    head, dot, rest = key.partition(".")
    if not dot:
        return replace(obj, **{head: value})
    return replace(obj, **{head: _with(getattr(obj, head), rest, value)})


def _users(key: str) -> tuple[str, ...]:
    if key in RELOAD_USERS:
        return RELOAD_USERS[key]
    section = key.split(".")[0] + "."
    return RELOAD_USERS.get(section, ())


class Daemon:
    def __init__(self, cfg: Config, loader: Callable[[], Config] | None = None,
                 config_path: Path | None = None) -> None:
        self.cfg = cfg
        #: Only for the ``started`` line: None means the built-in defaults.
        self.config_path = config_path
        #: Builds the configuration again on SIGHUP: the file named at start
        #: plus the command line's overrides.
        self.loader = loader
        self.registry = SourceRegistry(cfg.snapshot_dirs, cfg.remote, linger=cfg.source_linger)
        self.sessions = SessionTable(self.registry)
        self.handoff = HandoffServer(cfg, self.registry, self.sessions)
        #: Started in this order after the handoff socket; stopped with it.
        #: Each optional listener is appended here when its config enables it.
        self.listeners: list[Listener] = []
        #: First: it re-adopts sessions of a killed predecessor and saves new ones.
        self.listeners.append(Custody(cfg, self.registry, self.sessions))
        if cfg.firecracker.socket:
            self.listeners.append(FirecrackerServer(cfg, self.sessions, self.registry))
        if cfg.criu.enabled:
            from .criu.server import CriuListener

            self.listeners.append(CriuListener(cfg.criu, cfg.session, self.sessions))
        if cfg.export.listen:
            from .peer_server import ExportServer

            self.listeners.append(ExportServer(cfg.export, self.registry, cfg.access.peer_identities))
        #: Monitor (STATUS=, watchdog), control socket, metrics, timelines.
        self.listeners += operator_listeners(self)
        #: Target pid of every session that has one, kept while the session or
        #: any of its forked children's sessions ("ID.1", "ID.1.2"…) lives: a
        #: child whose session could not tell its pid (forks racing, the
        #: parent gone first) is found by a forced exit among this process's
        #: descendants.
        self._roots: dict[str, int] = {}
        self.sessions.on_added.append(self._note_root)
        self.sessions.on_removed.append(self._forget_root)
        if cfg.access.socket_group:  # after the control listener has made its socket
            self.listeners.append(SocketOwner(control_socket_path(cfg), cfg.access.socket_group))
        self.log = structlog.get_logger()
        #: The handoff server and the listeners that did start, in order.
        self._started: list[Listener] = []
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.ready = asyncio.Event()
        #: What the listener being started binds, so a start failure without
        #: a file name in its error (bind(2) gives none) can still name it.
        self.starting: str | None = None

    def _note_root(self, s: RestoreSession) -> None:
        if s.pid:
            self._roots[s.id] = s.pid

    def _forget_root(self, s: RestoreSession) -> None:
        root = s.id.split(".")[0]
        if root in self._roots and not any(
            x is not s and (x.id == root or x.id.startswith(root + ".")) for x in self.sessions
        ):
            del self._roots[root]

    def _forked_child_pids(self, s: RestoreSession) -> list[int]:
        """Processes that may be the target of ``s``, a forked child's session:
        descendants of the root session's target whose memory at the
        session's first address is registered with a userfaultfd."""
        root = self._roots.get(s.id.split(".")[0])
        if root is None or not s.mappings:
            return []
        return [p for p in descendants(root) if registered_at(p, s.mappings[0].start)]

    def _parts(self) -> Iterator[tuple[str, object]]:
        """Every part a reload may reach, by the role RELOAD_USERS names."""
        from .criu.server import CriuListener
        from .peer_server import ExportServer

        yield "handoff", self.handoff
        yield "registry", self.registry
        for x in self.listeners:
            if isinstance(x, FirecrackerServer):
                yield "firecracker", x
            elif isinstance(x, CriuListener):
                yield "criu", x
            elif isinstance(x, ExportServer):
                yield "export", x
            else:
                yield type(x).__name__, x

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change safely."""
        if self._stop.is_set():
            self.log.warning("reload_ignored", reason="the daemon is stopping")
            return
        try:
            if self.loader is None:
                raise ConfigError("no configuration to read again")
            new = self.loader()
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), kept="the running configuration")
            return
        old_flat, new_flat = flatten(self.cfg), flatten(new)
        changed = [k for k in new_flat if new_flat[k] != old_flat.get(k)]
        parts = list(self._parts())
        present = {role for role, _ in parts} | {"daemon"}
        takes = {role for role, x in parts if isinstance(x, Reloadable)} | {"daemon"}
        applied: list[str] = []
        restart: list[str] = []
        for k in changed:
            users = [u for u in _users(k) if u in present]
            (applied if users and all(u in takes for u in users) else restart).append(k)
        # What runs keeps its running value for every setting that needs a restart.
        effective = new
        for k in restart:
            effective = _with(effective, k, old_flat[k])
        broken: set[str] = set()
        for role, x in parts:
            if isinstance(x, Reloadable):
                try:
                    x.reload(effective)
                except Exception as e:  # one part failing must not take the daemon down
                    broken.add(role)
                    self.log.error("reload_failed", part=role, error=f"{type(e).__name__}: {e}",
                                   kept="that part's running configuration")
        # A part that refused keeps its old settings (they are all or nothing):
        # what only it uses is reported as failed, not as changed.
        failed = [k for k in applied if (u := [x for x in _users(k) if x in present]) and set(u) <= broken]
        for k in failed:
            applied.remove(k)
            effective = _with(effective, k, old_flat[k])
        self.cfg = effective
        if logsetup.enabled("info") or not _admits_info(effective.log_level):
            # Said under the level that lets it through: the old one unless
            # only the new one shows info lines.
            self.log.info("reloaded", changed=applied, needs_restart=restart, failed=failed)
            logsetup.set_level(effective.log_level)
        else:
            logsetup.set_level(effective.log_level)
            self.log.info("reloaded", changed=applied, needs_restart=restart, failed=failed)

    def _signal(self, sig: int) -> None:
        self.log.warning("signal_ignored", signal=signal_name(sig),
                         reason="only SIGTERM, SIGINT, SIGQUIT (stop) and SIGHUP (reload) mean something here")

    def request_stop(self) -> None:
        if self._stop.is_set():
            self.log.warning("second_signal", action="forcing exit")
            self._force.set()
        else:
            self.log.info("stopping", grace_s=self.cfg.shutdown_grace)
            self._stop.set()

    async def run(self, on_ready: Callable[[], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        handled: list[int] = [*STOP_SIGNALS, signal.SIGHUP, *ignored_signals()]
        for stop in STOP_SIGNALS:
            loop.add_signal_handler(stop, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for other in ignored_signals():
            loop.add_signal_handler(other, self._signal, other)
        try:
            try:
                inherited = _inherited_socket()
                self.starting = None if inherited else str(self.cfg.handoff_socket)
                await self.handoff.start(inherited)
                self._started.append(self.handoff)
                for listener in self.listeners:
                    self.starting = _bind_path(listener)
                    await listener.start()
                    self._started.append(listener)
                self.starting = None
            except Exception as e:
                await self._start_failed(e)
                raise
            self._check_snapshot_dirs()
            self.log.info("started", version=__version__,
                          config=str(self.config_path) if self.config_path else "defaults",
                          listeners=self._addresses(inherited is not None))
            notify("READY=1\nSTATUS=listening")
            self.ready.set()
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            notify("STOPPING=1")
            await self.shutdown()
        finally:
            # Sources first, while every handler still stands: closing them
            # lets go of their read leases, which after ignore_signals() nobody
            # would release on SIGIO (a writer of a served file would wait out
            # the kernel's lease-break time).
            self.registry.close()
            for sig in handled:
                loop.remove_signal_handler(sig)
            ignore_signals()  # removing a handler restores the default: not for these
        return 0

    def _addresses(self, activated: bool) -> list[str]:
        """Where the started daemon can be reached, one entry per listener."""
        out = [f"handoff {self.cfg.handoff_socket}" + (" (socket activation)" if activated else "")]
        for x in self._started[1:]:
            if (where := _listener_address(x)) is not None:
                out.append(where)
        return out

    def _check_snapshot_dirs(self) -> None:
        """A snapshot dir the daemon cannot read fails every restore from
        it; said once at start, with what to change, rather than only in
        each refused request."""
        for d in self.cfg.snapshot_dirs:
            if d.is_dir() and not os.access(d, os.R_OK | os.X_OK, effective_ids=True):
                self.log.warning("snapshot_dir_unreadable", path=str(d), fix=access_fix(d, "read"))

    async def _start_failed(self, e: Exception) -> None:
        """A listener could not start after sessions were already adopted
        from a predecessor: exiting now would close their uffds, so they go
        through the ordered shutdown first."""
        if not len(self.sessions):
            return
        self.log.error("start_failed", error=str(e), sessions=[s.id for s in self.sessions],
                       action="finishing the adopted sessions in an ordered shutdown, then exiting")
        self._stop.set()
        notify("STOPPING=1")
        await self.shutdown()

    async def shutdown(self) -> None:
        started = self._started or [self.handoff, *self.listeners]
        for listener in started:
            listener.stop_accepting()
        deadline = asyncio.get_running_loop().time() + self.cfg.shutdown_grace
        while self.sessions.running():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            await self._wait_change(remaining)
            if self._force.is_set():
                break
        # Grace is over: let go of what is safe to let go of.
        for s in self.sessions:
            if s.keeps_uffd:
                s.abandon()
        while (held := [s.id for s in self.sessions]) and not self._force.is_set():
            self.log.warning(
                "waiting_for_sessions",
                sessions=held,
                reason="closing their uffd would zero-fill the targets; send the signal again to kill them",
            )
            await self._wait_change(5.0)
        dying: list[int] = []
        for s in self.sessions:
            pids = [s.pid] if s.pid else self._forked_child_pids(s)
            if not pids and not s.keeps_uffd:
                self.log.error("cannot_kill_target", session=s.id,
                               reason="a forked child whose process is not found; its uffd closes with the daemon")
            for pid in pids:
                self.log.error("killing_target", session=s.id, pid=pid, reason="forced exit before restore completed")
                if (pidfd := _kill(pid)) >= 0:
                    dying.append(pidfd)
        # SIGKILL lands asynchronously: a thread still running could touch a
        # missing page after its uffd is closed. Close once they are gone.
        await _exited(dying)
        for s in list(self.sessions):
            s.abandon()
        for listener in started:
            await listener.close_connections()
        self.log.info("stopped", finished_sessions=self.sessions.finished)

    async def _wait_change(self, seconds: float) -> None:
        waits = [asyncio.ensure_future(self.sessions.wait_changed()), asyncio.ensure_future(self._force.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _bind_path(listener: object) -> str | None:
    """The socket path a listener creates when it starts, if it has one."""
    path = getattr(listener, "path", None)
    return str(path) if isinstance(path, (str, Path)) else None


def _listener_address(x: object) -> str | None:
    """``kind address`` of a started listener; None for parts that listen nowhere."""
    from .control import ControlServer
    from .criu.server import CriuListener
    from .metrics import MetricsServer
    from .peer_server import ExportServer

    if isinstance(x, FirecrackerServer):
        return f"firecracker {x.path}"
    if isinstance(x, ControlServer):
        return f"control {x.path}"
    if isinstance(x, MetricsServer):
        return f"metrics {x.host or '*'}:{x.port}"
    if isinstance(x, ExportServer):
        host, port = x.address
        return f"export {host}:{port}"
    if isinstance(x, CriuListener):
        return f"criu {x._path}"
    return None


def _owner(st: os.stat_result) -> str:
    import grp
    import pwd

    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def _has_dac_override() -> bool:
    """Whether this process's effective capabilities include CAP_DAC_OVERRIDE."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 1))
    except (OSError, ValueError):
        pass
    return False


def blocking_path(path: Path, need: str) -> tuple[Path, str] | None:
    """The first directory on the way to ``path`` (or ``path`` itself) that
    this process may not use as it must, and the access it lacks: "search"
    on an ancestor, "write" on the directory a missing path is created in,
    ``need`` on an existing one."""
    path = Path(os.path.abspath(path))
    chain = [*reversed(path.parents), path]
    for i, p in enumerate(chain):
        if not p.exists():
            parent = chain[i - 1] if i else Path("/")
            if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
                return parent, "write"
            return None
        if p != path and not os.access(p, os.X_OK, effective_ids=True):
            return p, "search"
    mode = os.R_OK if need == "read" else os.W_OK
    if not os.access(path, mode, effective_ids=True):
        return path, need
    if need == "write" and not os.access(path.parent, os.W_OK | os.X_OK, effective_ids=True):
        return path.parent, "write"  # replacing a stale socket file unlinks it
    return None


def access_fix(path: Path, need: str) -> str:
    """What to change so the daemon may ``need`` (read or write) ``path``: one line."""
    found = blocking_path(path, need)
    if found is None:
        return f"check the owner and mode of {path} and of the directories above it"
    where, lacks = found
    try:
        st = where.stat()
        what = f"{where} is {_owner(st)} mode {stat.S_IMODE(st.st_mode):04o}"
    except OSError:
        what = str(where)
    me = os.geteuid()
    if me == 0 and not _has_dac_override():
        who = "root without CAP_DAC_OVERRIDE (as under the systemd unit)"
        how = f"chown it to root, or chmod it so others have {lacks} permission"
    elif me == 0:
        who = "root"
        how = "root itself is refused there: check the filesystem (a root-squashed mount, a security module)"
    else:
        who = f"uid {me}"
        how = f"run the daemon as root, or chown/chmod it so uid {me} has {lacks} permission"
    return f"{what} and the daemon runs as {who}: {how}"


def start_error(e: OSError, cfg: Config, starting: str | None) -> tuple[str, dict[str, str]]:
    """The one line ``serve`` prints when it cannot start, and its fields."""
    if not isinstance(e, PermissionError):
        return f"cannot start: {e}", {}
    name = e.filename if isinstance(e.filename, str) else starting
    if name is None:
        return f"cannot start: {e.strerror or e}: run as root or check the configured addresses", {}
    path = Path(name)
    mem = cfg.firecracker.mem_file
    read = (mem and path == Path(mem)) or any(path.is_relative_to(d) for d in cfg.snapshot_dirs)
    need = "read" if read else "write"
    fix = access_fix(path, need)
    return f"cannot start: permission denied on {path}", {"path": str(path), "fix": fix}


def _kill(pid: int) -> int:
    """SIGKILL ``pid``; its pidfd (to wait on, the caller closes it) or -1."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        os.close(fd)
        return -1
    return fd


#: Longest wait for killed targets to be gone before their uffds are closed anyway.
KILL_WAIT_S = 5.0


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _exited(pidfds: list[int]) -> None:
    """Until every process behind ``pidfds`` has exited (at most KILL_WAIT_S); closes them."""
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[None]] = []
    for fd in pidfds:
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _set, fut)
        waits.append(fut)
    try:
        if waits:
            await asyncio.wait(waits, timeout=KILL_WAIT_S)
    finally:
        for fd in pidfds:
            loop.remove_reader(fd)
            os.close(fd)


def _inherited_socket() -> socket.socket | None:
    """The handoff socket passed by systemd socket activation, if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for i in range(n):
        fd = 3 + i
        if i < len(names) and names[i] not in ("", "handoff", "lazypaged.socket"):
            continue
        return socket.socket(fileno=fd)
    return None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (it is a dependency); asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _raise_fd_limit() -> None:
    """Each session holds a uffd, a pidfd and a connection: lift the soft
    RLIMIT_NOFILE to the hard limit so max_sessions fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _admits_info(level: str) -> bool:
    return logsetup.level_number(level) <= logsetup.level_number("info")


def serve(cfg: Config, loader: Callable[[], Config] | None = None, config_path: Path | None = None) -> int:
    """Run the daemon; ``loader`` builds the configuration again on SIGHUP."""
    ignore_signals()
    logsetup.setup(cfg.log_format, cfg.log_level)
    _raise_fd_limit()
    loop = new_event_loop()
    daemon: Daemon | None = None
    try:
        daemon = Daemon(cfg, loader, config_path)
        return loop.run_until_complete(daemon.run())
    except OSError as e:  # a socket in use, a missing file, no permission: nothing was served yet
        line, fields_ = start_error(e, cfg, daemon.starting if daemon else None)
        # One line either way: plain for a person at a terminal, a log record otherwise.
        if logsetup.current_format() == "console":
            print(f"lazypaged: {line}" + (f": {fields_['fix']}" if "fix" in fields_ else ""), file=sys.stderr)
        else:
            structlog.get_logger().error("cannot_start", error=line, **fields_)
        return 1
    finally:
        loop.close()
