"""Kernel binding for userfaultfd(2): ABI, ioctls, events, the fd object.

Nothing in this package knows about asyncio or sessions.
"""

from . import abi
from .errors import AlreadyPresent, Busy, NotSupported, RangeGone, TargetGone, UffdError
from .events import Event, Fork, IncompleteMessage, PageFault, Remap, Remove, UnknownEvent, Unmap, decode
from .fd import Userfaultfd, kernel_features

__all__ = [
    "AlreadyPresent",
    "Busy",
    "Event",
    "Fork",
    "IncompleteMessage",
    "NotSupported",
    "PageFault",
    "RangeGone",
    "Remap",
    "Remove",
    "TargetGone",
    "UffdError",
    "UnknownEvent",
    "Unmap",
    "Userfaultfd",
    "abi",
    "decode",
    "kernel_features",
]
