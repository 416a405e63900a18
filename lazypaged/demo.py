"""A self-contained demo: make an image, serve it, restore a process from it.

``lazypaged demo`` needs nothing but root (for userfaultfd on kernel faults):
it writes a demo image into a scratch directory, starts the daemon on a
private socket, and runs a target process that maps memory, hands it over,
reads its first page at once and then checks every byte while the rest
streams in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def page_pattern(index: int) -> bytes:
    """Deterministic content of page ``index`` of the demo image.

    Every 8th page is zero (served as a zero page); the others carry a hash
    chain, so a page served at the wrong offset never matches.
    """
    if index % 8 == 7:
        return bytes(PAGE)
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=64).digest()
    return seed * (PAGE // len(seed))


def make_image(path: Path, size: int) -> None:
    """Write a demo image of ``size`` bytes (sparse where pages are zero)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        for i in range(size // PAGE):
            p = page_pattern(i)
            if any(p[:64]):
                f.seek(i * PAGE)
                f.write(p)
    os.replace(tmp, path)


TARGET = r"""
import sys, time, mmap
from lazypaged.client import map_anonymous, restore
sock, name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
mem, addr = map_anonymous(size)
t0 = time.perf_counter()
h = restore(sock, [(addr, size, name, 0)])
t1 = time.perf_counter()
first = mem[:16]
t2 = time.perf_counter()
expected = open(sys.argv[4], "rb").read()
ok = mem[:] == expected
t3 = time.perf_counter()
done = h.wait(timeout=60)
print(f"handoff {1e3*(t1-t0):.2f} ms, first page {1e3*(t2-t1):.3f} ms, "
      f"all {size >> 20} MiB read and checked {1e3*(t3-t1):.0f} ms: {'correct' if ok else 'WRONG BYTES'}")
print(f"restore complete: {done.faults} faults, {done.bytes_copied >> 20} MiB copied, "
      f"{done.bytes_zero >> 20} MiB zero pages, {done.seconds*1e3:.0f} ms")
sys.exit(0 if ok else 1)
"""


#: Largest image the demo writes: it is written to the temp directory and
#: read whole into the target's memory besides, so a typo must not fill a disk.
MAX_SIZE_MIB = 65536


class DemoError(Exception):
    """A reason the demo cannot go on, printed as one line."""


def size_mib_arg(text: str) -> int:
    """Parse ``--size-mib`` so a bad value is a usage error, not a traceback."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    try:
        return check_size(value)
    except DemoError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_size(size_mib: int) -> int:
    """Refuse sizes the demo cannot serve (0 or less, or absurdly large)."""
    if size_mib < 1:
        raise DemoError(f"--size-mib must be at least 1 (got {size_mib})")
    if size_mib > MAX_SIZE_MIB:
        raise DemoError(f"--size-mib must be at most {MAX_SIZE_MIB} (got {size_mib})")
    return size_mib


def run(size_mib: int = 256, *, keep_serving: bool = True) -> int:
    """Run the demo; with ``keep_serving`` the daemon stays up afterwards.

    Returns 2 for a bad size, 1 when the daemon or its target fails (the
    demo then stops at once instead of serving on), and the target's exit
    status otherwise. The scratch directory, with the image and the
    working-set record the restore writes beside it, is removed on every
    exit path, Ctrl-C included.
    """
    try:
        check_size(size_mib)
    except DemoError as e:
        print(f"lazypaged demo: {e}", file=sys.stderr)
        return 2
    try:
        work = Path(tempfile.mkdtemp(prefix="lazypaged-demo-"))
    except OSError as e:
        print(f"lazypaged demo: cannot make a scratch directory: {e}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        rc = _run_in(work, size_mib, keep_serving)
    except DemoError as e:
        print(f"lazypaged demo: {e}", file=sys.stderr)
        rc = 1
    except OSError as e:
        # Setting up the daemon itself failed (its state directory, say).
        print(f"lazypaged demo: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        # Ctrl-C before the daemon's own handler is installed (while the
        # image is written): still a clean stop, with the directory removed.
        print("lazypaged demo: interrupted", file=sys.stderr)
        rc = 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"lazypaged demo: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


def _run_in(work: Path, size_mib: int, keep_serving: bool) -> int:
    """The demo inside its scratch directory; failures raise DemoError."""
    from .config import Config, SessionConfig
    from .daemon import Daemon, new_event_loop
    from .log import setup

    image = work / "snapshots" / "demo.img"
    image.parent.mkdir()
    size = size_mib << 20
    print(f"lazypaged demo: writing a {size_mib} MiB demo image to {image}", file=sys.stderr)
    try:
        make_image(image, size)
    except OSError as e:
        raise DemoError(f"cannot write the demo image {image}: {e}") from None
    cfg = Config(
        handoff_socket=work / "handoff.sock",
        snapshot_dirs=(image.parent,),
        shutdown_grace=5.0,
        log_format="console" if sys.stderr.isatty() else "json",
        session=SessionConfig(),
    ).validate()
    setup(cfg.log_format, cfg.log_level)
    loop = new_event_loop()
    daemon = Daemon(cfg)
    result: dict[str, int | str] = {"rc": 1}

    async def restore_once() -> None:
        try:
            await daemon.ready.wait()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", TARGET, str(cfg.handoff_socket), "demo.img", str(size), str(image)
                )
            except OSError as e:
                result["error"] = f"cannot start the target process ({sys.executable}): {e}"
                daemon.request_stop()
                return
            rc = await proc.wait()
            result["rc"] = rc
            if rc != 0:
                # A failed target is the end of the demo, whatever --once says:
                # serving on would only hide the failure behind a live daemon.
                how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
                result["error"] = f"the target process {how}; see its error above"
                daemon.request_stop()
            elif not keep_serving:
                daemon.request_stop()
            else:
                print(
                    f"lazypaged demo: daemon still serving on {cfg.handoff_socket} (Ctrl-C to stop)",
                    file=sys.stderr,
                )
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                result["error"] = f"demo failed: {e!r}"
                daemon.request_stop()
            raise

    async def main() -> None:
        task = loop.create_task(restore_once())
        try:
            await daemon.run()
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    try:
        loop.run_until_complete(main())
    except OSError as e:
        # The daemon could not start (its socket cannot be bound, say): one
        # line, not a traceback, and no wait for a target that never comes.
        raise DemoError(f"the daemon could not start: {e}") from None
    finally:
        loop.close()
    if "error" in result:
        raise DemoError(str(result["error"]))
    rc = result["rc"]
    assert isinstance(rc, int)
    return rc
