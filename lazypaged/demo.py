"""A self-contained demo: make an image, serve it, restore a process from it.

``lazypaged demo`` needs nothing but root (for userfaultfd on kernel faults):
it writes a demo image into a scratch directory, starts the daemon on a
private socket, and runs a target process that maps memory, hands it over,
reads its first page at once and then checks every byte while the rest
streams in.
"""

from __future__ import annotations

import hashlib
import os
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


def run(size_mib: int = 256, *, keep_serving: bool = True) -> int:
    """Run the demo; with ``keep_serving`` the daemon stays up afterwards."""
    from .config import Config, SessionConfig
    from .daemon import Daemon, new_event_loop
    from .log import setup

    work = Path(tempfile.mkdtemp(prefix="lazypaged-demo-"))
    image = work / "snapshots" / "demo.img"
    image.parent.mkdir()
    size = size_mib << 20
    print(f"lazypaged demo: writing a {size_mib} MiB demo image to {image}", file=sys.stderr)
    make_image(image, size)
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
    result = {"rc": 1}

    async def restore_once() -> None:
        await daemon.ready.wait()
        proc = await __import__("asyncio").create_subprocess_exec(
            sys.executable, "-c", TARGET, str(cfg.handoff_socket), "demo.img", str(size), str(image)
        )
        result["rc"] = await proc.wait()
        if not keep_serving:
            daemon.request_stop()
        else:
            print(
                f"lazypaged demo: daemon still serving on {cfg.handoff_socket} (Ctrl-C to stop)",
                file=sys.stderr,
            )

    async def main() -> None:
        task = loop.create_task(restore_once())
        await daemon.run()
        task.cancel()

    t0 = time.monotonic()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        for p in (image, cfg.handoff_socket):
            p.unlink(missing_ok=True)
    print(f"lazypaged demo: done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return result["rc"]
