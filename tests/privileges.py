"""Running the CLI as an ordinary user would: when the tests run as root, who reads and writes
through any file mode, a command prefix drops the two capabilities that let it."""

from __future__ import annotations

import os
import shutil

import pytest


def unprivileged() -> list[str]:
    """The prefix for a subprocess that must meet file permissions ([] when not root)."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


needs_permissions = pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                                       reason="as root, file permissions are only enforced through setpriv")
