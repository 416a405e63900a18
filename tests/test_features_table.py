"""The kernel versions ``lazypaged features`` can print are checked against
the running kernel: everything it offers must be dated no later than it."""

from __future__ import annotations

import os
import re

from lazypaged import features
from lazypaged.uffd import abi, kernel_features

from .conftest import _needs_root


def _running() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m is not None
    return int(m.group(1)), int(m.group(2))


def test_every_feature_has_a_kernel_version() -> None:
    assert set(features.SINCE) == set(abi.FEATURE_NAMES.values())


def test_offered_features_are_not_dated_after_this_kernel() -> None:
    _needs_root()
    offered, _ioctls = kernel_features()
    running = _running()
    for name in abi.feature_names(offered):
        assert features.SINCE[name][0] <= running, name
    lines = features.describe(offered)
    assert len(lines) == len(abi.FEATURE_NAMES)
    assert all(line.startswith("yes ") for line in lines if line.split()[1] in abi.feature_names(offered))
