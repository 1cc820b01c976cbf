"""Memory of a long run: does `overnight run` hold steady as it goes, plugin after plugin?

Builds a marketplace of several copies of ../shared/corpus (each copy's plugins renamed, so none
is a duplicate), runs `overnight run` on it in a child process against the emulator, and reads
the child's anonymous resident memory (RssAnon, Linux) each time its progress names a finished
plugin. Prints it at a quarter, half, three quarters and the end of the run, and how much it
grew per plugin over the last three quarters (a leak, or a fragmenting heap, grows linearly;
a steady process levels off).

    uv run python -m tests.bench.memory [--copies 4] [--concurrency 64] [--corpus ../shared/corpus]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.scan import DEFAULT_CORPUS
from tests.emulator import Emulator

KEY = "bench-key"
FINISHED = re.compile(r"^(\d+)/(\d+) ")


def build(corpus: Path, root: Path, copies: int) -> None:
    for k in range(1, copies + 1):
        for top in sorted((corpus / "plugins").iterdir()):
            if top.is_dir():
                shutil.copytree(top, root / "plugins" / f"{top.name}-{k}", symlinks=True)
        for listing in (root / "plugins").glob(f"*-{k}/**/.claude-plugin/plugin.json"):
            try:
                manifest = json.loads(listing.read_text())
            except (ValueError, UnicodeDecodeError):
                continue  # the corpus's broken ones stay broken
            if isinstance(manifest, dict) and isinstance(manifest.get("name"), str):
                manifest["name"] += f"-{k}"
                listing.write_text(json.dumps(manifest, indent=2))


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp, Emulator(api_key=KEY, latency=(0.01, 0.05)) as emu:
        root = Path(tmp) / "market"
        build(args.corpus, root, args.copies)
        env = {**os.environ, "GOOGLE_API_KEY": KEY, "GEMINI_API_KEY": "", "GOOGLE_GENAI_USE_VERTEXAI": ""}
        command = [sys.executable, "-m", "cli", "run", str(root), "--base-url", emu.url, "--rpm", "100000",
                   "--rpd", "1000000", "--tpm", "1000000000", "--concurrency", str(args.concurrency)]
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[int, int]] = []  # (plugins finished, RssAnon KiB)
        total = 0
        assert child.stderr is not None
        for line in child.stderr:
            found = FINISHED.match(line)
            if found:
                total = int(found[2])
                try:
                    samples.append((int(found[1]), rss_anon_kib(child.pid)))
                except (FileNotFoundError, ProcessLookupError, StopIteration):
                    break
        child.wait()
        elapsed = time.perf_counter() - start
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not samples:
        sys.exit(f"the run finished no plugin (exit {child.returncode})")
    print(f"overnight run, {total} plugins selected, --concurrency {args.concurrency}, emulator answers in 10-50 ms; "
          f"exit {child.returncode}, {elapsed:.1f} s (CPU: {cpu.ru_utime:.1f} s user, {cpu.ru_stime:.1f} s system)")
    for share in (0.25, 0.5, 0.75, 1.0):
        finished, kib = min(samples, key=lambda s: abs(s[0] - share * samples[-1][0]))
        print(f"  after {finished:5d} plugins: RssAnon {kib / 1024:6.1f} MiB")
    (first, low), (last, high) = min(samples, key=lambda s: abs(s[0] - samples[-1][0] / 4)), samples[-1]
    if last > first:
        print(f"  growth over the last three quarters: {(high - low) / (last - first):.1f} KiB per plugin")


if __name__ == "__main__":
    main()
