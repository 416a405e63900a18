"""Checks on a userfaultfd received from another process, shared by every
handoff listener (native, Firecracker, CRIU): is it a uffd, what was it
really negotiated with, can the daemon serve it."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

from . import uffd as _uffd

_abi = _uffd.abi


class Refused(Exception):
    """A request the daemon will not serve; ``code`` goes on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Every non-cooperative event (fork, remap, remove, unmap) is handled by the
# session (see session.py), so a restorer may negotiate any of them.
#: Features under which the daemon cannot serve at all: with SIGBUS the kernel
#: signals the target on a missing page instead of sending us the fault.
_UNSERVABLE = _abi.UFFD_FEATURE_SIGBUS
#: Kernel-internal bit that /proc fdinfo shows in a uffd's features once
#: UFFDIO_API has run on it (Linux 6.1 and later; see ``_api_done``).
_FEATURE_INITIALIZED = 1 << 31


def inspect_uffd(fd: int, declared: int, log: Any) -> tuple[int, bool | None]:
    """Check that ``fd`` is a userfaultfd we can serve; make it non-blocking.

    Returns the features it was really negotiated with (from the kernel when
    it says, else the ``declared`` ones) and whether UFFDIO_API ran on it
    (None when this kernel does not tell).
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise Refused("bad_fd", f"cannot inspect the attached fd: {e.strerror}") from None
    if target != "anon_inode:[userfaultfd]":
        raise Refused("bad_fd", f"the attached fd is {target!r}, not a userfaultfd")
    features, api_done = declared, None
    kernel = _fdinfo_features(fd)
    if kernel is not None:
        features = kernel & ~_FEATURE_INITIALIZED
        if _api_done_visible():
            api_done = bool(kernel & _FEATURE_INITIALIZED)
        if api_done is not False and features != declared:
            # Trust the kernel: serving with the wrong set would mishandle events.
            log.warning(
                "uffd_features_mismatch",
                declared=_abi.feature_names(declared),
                negotiated=_abi.feature_names(features),
            )
    unsupported = features & _UNSERVABLE
    if unsupported:
        raise Refused(
            "unsupported_feature",
            f"uffd features {_abi.feature_names(unsupported)} are not handled by this daemon",
        )
    # Every read of the uffd happens on the event loop: a blocking one would
    # stall the whole daemon at the first read with nothing queued. The flag
    # lives on the open file, so the restorer's copy turns non-blocking too.
    if os.get_blocking(fd):
        os.set_blocking(fd, False)
        log.info("uffd_made_nonblocking")
    return features, api_done


def _fdinfo_features(fd: int) -> int | None:
    """The features field of a uffd's ``API:`` line in /proc fdinfo, if any."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "API":
            parts = value.strip().split(":")
            with contextlib.suppress(IndexError, ValueError):
                return int(parts[1], 16)
    return None


@functools.cache
def _api_done_visible() -> bool:
    """Whether this kernel marks a uffd's fdinfo once UFFDIO_API has run.

    Probed once on a scratch uffd: older kernels show only the negotiated
    features, so there a missing mark says nothing.
    """
    try:
        with _uffd.Userfaultfd.create() as probe:
            probe.api(0)
            seen = _fdinfo_features(probe.fileno())
    except OSError:
        return False
    return seen is not None and bool(seen & _FEATURE_INITIALIZED)
