"""Scan of a copy of ../shared/corpus (272 plugins, about 5,000 files): cold, then warm.

Cold: a fresh log, every plugin discovered, hashed, analyzed (including the skills-ref
validator on every SKILL.md) and recorded. Warm: the same marketplace again, unchanged:
every plugin is hashed and compared, nothing is recorded. Both as `overnight scan` in a fresh
process (what a person waits for) and as the service alone.

    uv run python -m tests.bench.scan [--corpus ../shared/corpus]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from statemachine.scan import scan
from statemachine.workspace import open_log

DEFAULT_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def timed_cli(root: Path, db: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cli", "scan", str(root), "--db", str(db)],
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout.splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "marketplace"
        shutil.copytree(args.corpus, root)
        files = sum(1 for p in root.rglob("*") if p.is_file())
        print(f"corpus copy: {files:,} files")
        cold, line = timed_cli(root, Path(tmp) / "cli.db")
        print(f"overnight scan, cold:  {cold:5.2f} s   {line}")
        warm, line = timed_cli(root, Path(tmp) / "cli.db")
        print(f"overnight scan, warm:  {warm:5.2f} s   {line}")
        with open_log(root, Path(tmp) / "service.db") as store:
            start = time.perf_counter()
            report = scan(store, root)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            again = scan(store, root)
            warm = time.perf_counter() - start
        print(f"scan service, cold:    {cold:5.2f} s   ({cold / report.plugins * 1000:.1f} ms per plugin, "
              f"{report.events} events)")
        print(f"scan service, warm:    {warm:5.2f} s   ({warm / again.plugins * 1000:.1f} ms per plugin, "
              f"{again.events} events)")


if __name__ == "__main__":
    main()
