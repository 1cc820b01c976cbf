"""The quality gates on a full-size SKILL.md (more than 12,000 bytes): how long `gates.check`
takes, the best and the median of many runs (goal: well under 5 ms, next to a Gemini call of
seconds).

    uv run python -m tests.bench.gates [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from statemachine.gates import check
from statemachine.skillmd import compose
from tests.test_gates import NAME, draft, good_body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    d = draft(good_body(padding=48))
    text = compose(NAME, d)
    timings = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        check(NAME, text, d.files, set())
        timings.append(time.perf_counter() - start)
    print(f"gates.check on a {len(text.encode()):,}-byte SKILL.md, {args.repeat} runs: "
          f"best {min(timings) * 1000:.2f} ms, median {statistics.median(timings) * 1000:.2f} ms  goal < 5 ms")


if __name__ == "__main__":
    main()
