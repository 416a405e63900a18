"""``lazypaged criu-lazy-pages``: a drop-in for ``criu lazy-pages``.

    lazypaged criu-lazy-pages -D IMAGES [-W WORKDIR] [--page-server --address A --port P]
                              [--status-fd FD] [-d] [--pidfile FILE] [-o LOGFILE] [-v[N]]

serves one ``criu restore --lazy-pages`` and exits: 0 once every page of
every task is in (or the task exited), 1 when the restore or a session
failed, 2 on bad usage. Options not listed here are refused, not ignored.
With ``-d`` (as criu's) it goes to the background once it listens: the
command returns 0 then, or the child's status if it could not start.

Signals follow ``lazypaged serve`` (lazypaged/daemon.py): SIGTERM, SIGINT
and SIGQUIT stop it (unfinished targets are killed, never left to read
zeros); SIGHUP and every other signal that would end it by default are
logged (``signal_ignored``) and ignored, as there is nothing to reload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from .. import log as logsetup
from ..config import ConfigError, load
from ..sessions import SessionTable

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: criu's verbosity levels (-v0 … -v4; 2 is criu's default) as log levels.
_LEVELS = {0: "error", 1: "error", 2: "info", 3: "info"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "criu-lazy-pages",
        help="serve `criu restore --lazy-pages` in place of `criu lazy-pages`",
        description=(
            "Serve the lazy memory of one `criu restore --lazy-pages` from a CRIU image directory or from "
            "the page server of `criu dump --lazy-pages`, then exit (0: every page is in)."
        ),
    )
    p.add_argument("-D", "--images-dir", type=Path, default=Path("."), help="CRIU images directory (default .)")
    p.add_argument("-W", "--work-dir", type=Path, help="where lazy-pages.socket and the log go (default: images dir)")
    p.add_argument("--page-server", action="store_true", help="fetch pages from a page server (needs --address/--port)")
    p.add_argument("--address", help="page server address")
    p.add_argument("--port", type=int, help="page server port")
    p.add_argument(
        "--page-server-header",
        choices=["auto", "4.1", "4.2"],
        default="auto",
        help="page-server header layout of the dumping criu (auto: from the pagemap images)",
    )
    p.add_argument(
        "--snapshot",
        type=Path,
        help="serve the lazy pages from a lazypaged snapshot of these images (see docs/criu.md) instead",
    )
    p.add_argument("--status-fd", type=int, help="write one NUL byte to this fd once listening, then close it")
    p.add_argument("-d", "--daemon", action="store_true",
                   help="detach once listening (the command returns then; exit status is lost)")
    p.add_argument("--pidfile", help="write the serving process's pid here once listening (relative: work dir)")
    p.add_argument("-o", "--log-file", help="log file (relative names are in the work dir; default stderr)")
    p.add_argument("--verbosity", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="json")
    p.add_argument("--config", "-c", type=Path, help="lazypaged TOML for the [session] and [criu] settings")


def normalize_argv(argv: list[str]) -> list[str]:
    """criu's ``-v``, ``-vv`` and ``-v4`` spellings as ``--verbosity=N``."""
    out = []
    count = 0
    for a in argv:
        if m := re.fullmatch(r"-v(\d)", a):
            out.append(f"--verbosity={m.group(1)}")
        elif re.fullmatch(r"-v+", a):
            count += len(a) - 1
        else:
            out.append(a)
    if count:
        out.append(f"--verbosity={2 + count}")
    return out


def run(args: argparse.Namespace) -> int:
    from .server import LazyPagesServer, PageServer

    if args.page_server and (not args.address or not args.port):
        print("lazypaged criu-lazy-pages: --page-server needs --address and --port", file=sys.stderr)
        return EXIT_USAGE
    if args.snapshot and args.page_server:
        print("lazypaged criu-lazy-pages: --snapshot and --page-server exclude each other", file=sys.stderr)
        return EXIT_USAGE
    if (args.address or args.port) and not args.page_server:
        print("lazypaged criu-lazy-pages: --address/--port only make sense with --page-server", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"lazypaged: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    images = args.images_dir.resolve()
    work = (args.work_dir or images).resolve()
    if not images.is_dir() or not work.is_dir():
        bad = images if not images.is_dir() else work
        print(f"lazypaged criu-lazy-pages: {bad} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    pidfile = None
    if args.pidfile:
        pidfile = Path(args.pidfile) if Path(args.pidfile).is_absolute() else work / args.pidfile
    detached = _detach() if args.daemon else None
    level = _LEVELS.get(args.verbosity, "debug")
    stream: Any = sys.stderr
    if args.log_file:
        path = Path(args.log_file)
        stream = open(work / path if not path.is_absolute() else path, "a", buffering=1)  # noqa: SIM115
    logsetup.setup(args.log_format, level, stream)
    log = structlog.get_logger()
    ps = None
    if args.page_server:
        c = cfg.criu
        ps = PageServer(args.address, args.port, args.page_server_header, c.page_server_window)
    from ..daemon import ignore_signals, new_event_loop

    def listening() -> None:
        if pidfile is not None:
            _write_pidfile(pidfile, log)
        if detached is not None:
            _detached_ready(detached)

    ignore_signals()  # until the loop handles them: nothing may end it between here and there
    loop = new_event_loop()
    try:
        snap = args.snapshot.resolve() if args.snapshot else None
        main = _main(images, work, cfg.session, ps, snap, args.status_fd, log, LazyPagesServer, listening)
        rc = loop.run_until_complete(main)
    except FileExistsError as e:
        log.error("cannot_listen", error=str(e))
        print(f"lazypaged criu-lazy-pages: {e}", file=sys.stderr)
        rc = EXIT_FAIL
    finally:
        loop.close()
        if pidfile is not None:
            _remove_pidfile(pidfile)
        if stream is not sys.stderr:
            stream.close()
    # Everything is released; the daemon's exit is what tells the operator
    # (and benchmarks) that the restore is complete, and interpreter teardown
    # with all of lazypaged imported takes a fifth of a second: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _detach() -> tuple[int, int]:
    """Fork; the parent returns to the shell once the child listens (with
    0), or with the child's status when it could not start, so a script
    may start ``criu restore`` as soon as the command returns, as with
    ``criu lazy-pages -d``.

    The child runs in a new session with its standard streams on
    /dev/null from the start (whatever it spawns holds no pipe of the
    caller's open); until it listens, ``sys.stderr`` is still the caller's,
    so a failure to start is reported there. Returns the write end of the
    pipe the parent waits on and that stderr's descriptor."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            ready = f.read(1)
        if ready == b"\0":
            os._exit(EXIT_OK)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else EXIT_FAIL)
    os.close(r)
    os.setsid()
    err = os.dup(2)  # not inherited by anything spawned
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stderr = open(err, "w", buffering=1, closefd=False)  # noqa: SIM115
    return w, err


def _detached_ready(detached: tuple[int, int]) -> None:
    """Release the waiting parent and the caller's stderr (log lines meant
    for it go to /dev/null from now on; a log file given with -o stays)."""
    w, err = detached
    os.write(w, b"\0")
    os.close(w)
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, err, inheritable=False)
    os.close(null)


def _write_pidfile(path: Path, log: Any) -> None:
    """Whole or not at all: a reader never sees a half-written pid."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        tmp.rename(path)
    except OSError as e:
        log.warning("pidfile_failed", path=str(path), error=str(e))
        tmp.unlink(missing_ok=True)


def _remove_pidfile(path: Path) -> None:
    """Only while it still names this process (another run may own it now)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass


def _handle_signals(loop: asyncio.AbstractEventLoop, stop: Any, log: Any) -> list[int]:
    """The signal rules of ``lazypaged serve``: this process holds uffds of a
    half-restored task, so no signal may end it without the ordered stop.
    There is no configuration to reload: SIGHUP is noted and ignored."""
    from ..daemon import STOP_SIGNALS, ignored_signals, signal_name

    def ignored(sig: int) -> None:
        reason = (
            "criu-lazy-pages has no configuration to reload" if sig == signal.SIGHUP
            else "only SIGTERM, SIGINT and SIGQUIT (stop) mean something here"
        )
        log.warning("signal_ignored", signal=signal_name(sig), reason=reason)

    for stop_sig in STOP_SIGNALS:
        loop.add_signal_handler(stop_sig, stop)
    others = [int(signal.SIGHUP), *ignored_signals()]
    for sig in others:
        loop.add_signal_handler(sig, ignored, sig)
    return [*STOP_SIGNALS, *others]


async def _main(
    images: Path, work: Path, session_cfg: Any, ps: Any, snapshot: Path | None, status_fd: int | None, log: Any,
    server_cls: Any, on_listening: Callable[[], None] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    table = SessionTable()

    def finished(result: Any) -> None:
        if not done.done():
            done.set_result(bool(result.ok))

    def stop() -> None:
        log.warning("criu_lazy_pages_interrupted", action="unfinished targets are killed, never left to read zeros")
        if not done.done():
            done.set_result(False)

    server = server_cls(
        images, work, replace(session_cfg), table, page_server=ps, snapshot=snapshot, once=True, log=log,
        on_run_done=finished,
    )
    handled = _handle_signals(loop, stop, log)
    try:
        await server.start()
        if on_listening is not None:
            on_listening()  # the pid file before the status byte: whoever waits on it may read it
        if status_fd is not None:
            try:
                os.write(status_fd, b"\0")
                os.close(status_fd)
            except OSError as e:
                log.warning("status_fd_failed", fd=status_fd, error=str(e))
        ok = await done
    finally:
        try:
            server.stop_accepting()
            await server.close_connections()
        finally:
            from ..daemon import ignore_signals

            for sig in handled:
                loop.remove_signal_handler(sig)
            ignore_signals()  # removing a handler restores the default: not for these
        log.debug("criu_lazy_pages_closed")
    return EXIT_OK if ok else EXIT_FAIL
