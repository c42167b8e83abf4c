"""What a test needs from the machine; under ``CI=true`` a missing need fails.

On a developer's machine a test whose tools are absent skips; CI installs
everything (``make test`` bootstraps), so there a missing tool or /dev/fuse is
a broken set-up and must fail loudly instead of passing by skipping.
"""

from __future__ import annotations

import os
import shutil

import pytest


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}, and CI=true forbids skipping")
    pytest.skip(what)


def require_fuse() -> None:
    if not (os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)):
        _missing("/dev/fuse is not usable here")


def require_tools(*names: str) -> None:
    absent = [name for name in names if shutil.which(name) is None]
    if absent:
        _missing(f"missing tools: {', '.join(absent)}")


def require_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root")
