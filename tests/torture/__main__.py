"""`python -m tests.torture [smoke|full] [pytest args...]`: run the torture suite and write
docs/reliability.md from what it measured."""

from __future__ import annotations

import os
import sys

import pytest

import tests.torture as torture
from tests.torture import REPO


def main(argv: list[str]) -> int:
    size = "smoke"
    if argv and argv[0] in ("smoke", "full"):
        size, argv = argv[0], argv[1:]
    os.environ["OVERNIGHT_TORTURE"] = size
    torture.SIZE, torture.FULL = size, size == "full"  # the package was imported before the switch
    os.environ["OVERNIGHT_TORTURE_REPORT"] = str(REPO / "docs" / "reliability.md")
    os.environ["OVERNIGHT_TORTURE_COMMAND"] = "uv run python -m tests.torture" + (" full" if size == "full" else "")
    os.chdir(REPO)
    return pytest.main(["-q", "-p", "no:cacheprovider", "tests/torture", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
