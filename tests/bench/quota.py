"""Quota pacing against the emulator enforcing the same limits: overnight's scheduler vs the old
fixed sleeps, and a run that exhausts its daily quota and continues at the simulated reset.

Scale: the real free tier this product was built for allowed 15 requests per minute; the
emulator and the scheduler here both get `--rpm` (600 by default, a factor of 40) and `--rpd`,
with 0.1-2 s of latency per request. The old pacing (45-60 s between plugins and a 5-minute
rest every 10 plugins; its audit showed ~0.7 requests/min against 15/min) is scaled by the
same factor.

At 600/min one copy of the corpus (about 544 requests) fits inside a single minute's quota,
so the per-minute limit would never bind; the marketplace for the overnight run is therefore
the corpus replicated `--copies` times (each copy listed under new names in marketplace.json).

1. overnight pacing: the whole (replicated) corpus through `Runner` with `--concurrency`
   workers. From the emulator's request log: the sustained rate over the middle of the run
   (60 s windows between the 10% and 90% points of the requests, by arrival at the emulator)
   as a fraction of rpm (goal >= 0.95), the most requests in any 60 s (by admission and by
   arrival), the lag from admission to the wire, and the 429s of the emulator's quotas (those
   are caused by our own pacing).
2. old pacing: one plugin at a time, the scaled fixed delay + jitter before each plugin and
   the scaled rest every 10 plugins, for `--old-budget` seconds; its rate and the projected
   time for the same marketplace.
3. daily exhaustion: a simulated clock shared by the runner, its log and the emulator; the
   daily quota here is `--daily-plugins` requests, half of what those plugins need. The run
   must pause until the next Pacific midnight, continue, and finish.

    uv run python -m tests.bench.quota [--corpus ../shared/corpus] [--copies 4] [--rpm 600]
        [--rpd 6000] [--latency 0.1,2.0] [--concurrency 24] [--plugins N] [--old-budget 75]
        [--daily-plugins 40]
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import statemachine.runner as runner_module
from statemachine.gateway import Backend, Gateway, GeminiSettings
from statemachine.pipeline import Interrupted
from statemachine.runner import RunOptions, RunResult, Runner
from statemachine.scheduler import PACIFIC, Limits, Scheduler
from statemachine.workspace import open_log
from tests.bench.scan import DEFAULT_CORPUS
from tests.emulator import Emulator, RequestRecord

KEY = "bench-key"
REAL_RPM = 15                      # the quota the old pacing was tuned against
OLD_DELAY = (45.0, 60.0)           # seconds between plugins, real scale
OLD_REST = 300.0                   # seconds of rest every OLD_REST_EVERY plugins, real scale
OLD_REST_EVERY = 10
CORPUS_PLUGINS = 272               # valid plugins in ../shared/corpus
OUR_QUOTA = ("quota_minute", "quota_day", "quota_tokens")
BIG_TPM = 10**9


# ---------------------------------------------------------------------------- corpus


def prepare(corpus: Path, dest: Path, copies: int) -> Path:
    """A copy of the corpus; with copies > 1 every listed plugin is copied again under a new
    directory and a new name (`<name>-x2`, ...) and listed in marketplace.json."""
    shutil.copytree(corpus, dest, symlinks=True)
    if copies <= 1:
        return dest
    manifest_path = dest / ".claude-plugin" / "marketplace.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    originals = list(manifest["plugins"])
    for k in range(2, copies + 1):
        for entry in originals:
            if not (dest / entry["source"]).is_dir():
                continue  # listed but missing: invalid in the original already
            source = entry["source"].rstrip("/") + f"-x{k}"
            shutil.copytree(dest / entry["source"], dest / source, symlinks=True)
            manifest["plugins"].append(dict(entry, name=f"{entry['name']}-x{k}", source=source))
    manifest_path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return dest


def generate_requests(emu: Emulator) -> list[RequestRecord]:
    return sorted((r for r in emu.requests if r.method == "POST" and r.path.endswith(":generateContent")),
                  key=lambda r: r.time)


def ours(records: list[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.status == 429 and r.fault in OUR_QUOTA]


# ---------------------------------------------------------------------------- measures


def peak(times: list[float]) -> int:
    """The most of `times` (sorted) in any 60 s window."""
    return max((bisect.bisect_left(times, t + 60.0) - i for i, t in enumerate(times)), default=0)


@dataclass
class Sustained:
    middle_s: float          # the span whose 60 s windows were averaged
    windows: int             # 60 s windows averaged (one per second)
    per_minute: float        # mean requests per 60 s window over the middle
    simple: float            # requests / span over the middle (the plain estimate)
    peak: int                # most requests in any 60 s window of the whole run


def sustained(times: list[float]) -> Sustained | None:
    """Requests per minute over the middle of a run, from send times.

    The middle runs from the 10% to the 90% request. A scheduler at an exact sliding-window
    limit repeats its first minute's burst pattern, so a rate over an arbitrary span depends
    on where the span starts in that pattern; every full 60 s window, though, holds exactly
    what the pacing allowed. The figure is the mean count of the 60 s windows (sampled once
    per second) that lie inside the middle."""
    n = len(times)
    if n < 20:
        return None
    lo, hi = times[n // 10], times[n - 1 - n // 10]
    simple = (n - 1 - 2 * (n // 10)) / (hi - lo) * 60.0 if hi > lo else 0.0
    counts = []
    end = lo + 60.0
    while end <= hi:
        counts.append(bisect.bisect_right(times, end) - bisect.bisect_right(times, end - 60.0))
        end += 1.0
    if not counts:
        return Sustained(hi - lo, 0, simple, simple, peak(times))
    return Sustained(hi - lo, len(counts), statistics.fmean(counts), simple, peak(times))


@dataclass
class Row:
    pacing: str
    plugins: int
    requests: int
    wall_s: float
    rate: float              # requests per minute over the measured span
    own_429: int
    projected_s: float       # for the overnight run's marketplace
    real_corpus_s: float     # one corpus (272 plugins) at the real 15/min, unscaled
    note: str = ""


def fmt_s(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


# ---------------------------------------------------------------------------- 1. overnight


def lags(records: list[RequestRecord], calls: dict[str, list[tuple[float, float]]]
         ) -> tuple[list[float], list[float]]:
    """Per request: seconds from the scheduler's admission to the gateway call, and to the
    request's arrival at the emulator (paired by request text, in order for repeats)."""
    to_call, to_arrival = [], []
    seen: dict[str, int] = {}
    for r in records:
        pairs = calls.get(r.text)
        i = seen.get(r.text, 0)
        if not pairs or i >= len(pairs):
            continue
        seen[r.text] = i + 1
        admitted, entered = pairs[i]
        to_call.append(entered - admitted)
        to_arrival.append(r.time - admitted)
    return to_call, to_arrival


def quantiles(values: list[float]) -> str:
    v = sorted(values)
    return (f"median {statistics.median(v) * 1000:.0f} ms, p95 {v[int(len(v) * 0.95) - 1] * 1000:.0f} ms, "
            f"max {v[-1] * 1000:.0f} ms")


def run_overnight(args: argparse.Namespace, tmp: Path) -> tuple[Row, int]:
    root = prepare(args.corpus, tmp / "overnight", args.copies)
    admitted: list[float] = []     # scheduler clock at each admission (the slot's time)
    local = threading.local()
    calls: dict[str, list[tuple[float, float]]] = {}   # request text -> (admitted, gateway entered)

    class RecordingScheduler(Scheduler):
        def try_admit(self, est_tokens):
            admission = super().try_admit(est_tokens)
            slot = admission.slot
            if slot is not None:
                admitted.append(slot.at)
                local.admitted = slot.at
            return admission

    class LagGateway(Gateway):
        def generate(self, system, prompt, schema):
            calls.setdefault(f"{system}\n{prompt}", []).append((local.admitted, time.time()))
            return super().generate(system, prompt, schema)

    runner_module.Scheduler = RecordingScheduler
    with Emulator(api_key=KEY, latency=args.latency, rpm=args.rpm, rpd=args.rpd, seed=1) as emu:
        options = RunOptions(gemini=GeminiSettings(base_url=emu.url, timeout_s=30),
                             limits=Limits(rpm=args.rpm, rpd=args.rpd, tpm=BIG_TPM,
                                           concurrency=args.concurrency),
                             backoff_s=0.2, limit=args.plugins)
        try:
            with open_log(root) as store:
                runner = Runner(store, root, backend=Backend(vertex=False, api_key=KEY),
                                gateway_factory=LagGateway)
                start = time.perf_counter()
                result = runner.start(options)
                wall = time.perf_counter() - start
                ledger = store.query("SELECT count(*) FROM quota_ledger")[0][0]
        finally:
            runner_module.Scheduler = Scheduler
        records = generate_requests(emu)
    times = [r.time for r in records]
    s = sustained(times)
    own = ours(records)
    kinds = {k: sum(1 for r in own if r.fault == k) for k in OUR_QUOTA}
    other = [r for r in records if r.status != 200 and r not in own]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    print(f"run: {result.outcome}; {result.selected} plugins selected "
          f"({args.copies} copies of the corpus); by state {result.counts}; "
          f"{len(result.invalid)} invalid (not processed)")
    print(f"wall {wall:.1f} s (scan included); generateContent requests {len(records)} "
          f"(log records {ledger}) over {span:.1f} s from first to last")
    if s is not None and not s.windows:
        print(f"the middle of the run ({s.middle_s:.0f} s) is shorter than 60 s: the per-minute limit cannot "
              f"bind; {s.simple:.0f} requests/min over it. Use more --copies or a lower --rpm.")
    elif s is not None:
        print(f"middle of the run (10%..90% of requests, {s.middle_s:.0f} s, {s.windows} windows): "
              f"mean per 60 s window {s.per_minute:.1f} = {s.per_minute / args.rpm:.3f} x rpm "
              f"(plain requests/span {s.simple:.1f}/min = {s.simple / args.rpm:.3f} x rpm)")
        print(f"most requests in any 60 s: {peak(sorted(admitted))} by the scheduler's admission time, "
              f"{s.peak} by arrival at the emulator (limit {args.rpm})")
    to_call, to_arrival = lags(records, calls)
    if to_arrival:
        print(f"from admission to the gateway call (log append): {quantiles(to_call)}; "
              f"from admission to arrival at the emulator: {quantiles(to_arrival)}")
    if len(times) > args.rpm:
        print(f"first minute: request {args.rpm} sent {times[args.rpm - 1] - times[0]:.1f} s after the first "
              f"(the burst is bounded by concurrency; the sliding window then repeats its shape)")
    print(f"429s from the emulator's quotas (caused by our pacing): {len(own)} {kinds}; "
          f"other non-200 answers: {len(other)}")
    if own:
        # Both sides count a request once: we at admission, the emulator on arrival. The
        # scheduler's window margin (statemachine.runner.WINDOW_MARGIN) is meant to absorb the
        # jitter between the two; 429s here mean it did not.
        print("  (the scheduler counts at admission, the emulator on arrival; the window margin did not "
              "absorb the jitter between them: see the lag figures above)")
    n_plugins = result.selected
    rate = s.per_minute if s is not None else (len(records) / span * 60 if span else 0.0)
    scale = args.rpm / REAL_RPM
    real_corpus = len(records) / max(n_plugins, 1) * CORPUS_PLUGINS / (rate / scale) * 60 if rate else 0.0
    row = Row("overnight scheduler", n_plugins, len(records), wall, rate, len(own), wall, real_corpus,
              note=f"concurrency {args.concurrency}")
    return row, n_plugins


# ---------------------------------------------------------------------------- 2. old pacing


def run_old(args: argparse.Namespace, tmp: Path, target_plugins: int) -> Row:
    scale = args.rpm / REAL_RPM
    delay = (OLD_DELAY[0] / scale, OLD_DELAY[1] / scale)
    rest = OLD_REST / scale
    print(f"old pacing scaled by {scale:g}: {delay[0]:.3f}-{delay[1]:.3f} s (uniform) before each "
          f"plugin, plus {rest:.2f} s every {OLD_REST_EVERY} plugins; concurrency 1; "
          f"budget {args.old_budget:.0f} s of wall time")
    root = prepare(args.corpus, tmp / "old", 1)
    rng = random.Random(7)
    started: dict[str, float] = {}
    paced: list[float] = []             # seconds slept by the old pacing
    state = {"first": None, "runner": None}
    original = runner_module.advance

    def old_advance(ctx, plugin_id):
        if plugin_id not in started:
            now = time.perf_counter()
            if state["first"] is not None and now - state["first"] >= args.old_budget:
                state["runner"].interrupt("budget")
                raise Interrupted()
            if started:
                pause = rng.uniform(*delay)
                if len(started) % OLD_REST_EVERY == 0:
                    pause += rest
                time.sleep(pause)
                paced.append(pause)
            started[plugin_id] = time.perf_counter()
            if state["first"] is None:
                state["first"] = started[plugin_id]
        return original(ctx, plugin_id)

    runner_module.advance = old_advance
    try:
        with Emulator(api_key=KEY, latency=args.latency, rpm=args.rpm, rpd=args.rpd, seed=2) as emu:
            options = RunOptions(gemini=GeminiSettings(base_url=emu.url, timeout_s=30),
                                 limits=Limits(rpm=args.rpm, rpd=args.rpd, tpm=BIG_TPM, concurrency=1),
                                 backoff_s=0.2)
            with open_log(root) as store:
                runner = Runner(store, root, backend=Backend(vertex=False, api_key=KEY))
                state["runner"] = runner
                result: RunResult = runner.start(options)
                end = time.perf_counter()
            records = generate_requests(emu)
    finally:
        runner_module.advance = original
    wall = end - (state["first"] or end)
    done = max(len(started), 1)  # the budget is checked before a plugin starts: each one started finished
    rate = len(records) / wall * 60 if wall else 0.0
    # Projection: the measured work per plugin plus the pacing's expected sleeps.
    work = (wall - sum(paced)) / done
    per_plugin = work + sum(delay) / 2 + rest / OLD_REST_EVERY
    outcome = "stopped at the budget" if result.outcome == "interrupted" else result.outcome
    print(f"run: {outcome}; {len(started)} plugins started, requests {len(records)} in {wall:.1f} s "
          f"of wall time; {rate:.1f} requests/min = {rate / args.rpm:.3f} x rpm")
    print(f"per plugin: {work:.2f} s of work (2 requests + overhead) + {sum(delay) / 2:.2f} s mean delay "
          f"+ {rest / OLD_REST_EVERY:.2f} s rest share = {per_plugin:.2f} s; at real scale "
          f"{per_plugin * scale:.0f} s/plugin, {2 / (per_plugin * scale) * 60:.2f} requests/min "
          f"against {REAL_RPM}/min (the audit: 180 s, ~0.7/min)")
    return Row("old fixed delay", len(started), len(records), wall, rate, len(ours(records)),
               per_plugin * target_plugins, per_plugin * scale * CORPUS_PLUGINS, note=f"budget {args.old_budget:.0f} s")


# ---------------------------------------------------------------------------- 3. daily


class SimClock:
    """Real time moved to a simulated start; a sleep of JUMP seconds or more advances the
    clock at once instead of waiting (so a pause until midnight takes no real time), shorter
    sleeps really sleep (so the workers' pacing still happens in real time)."""

    JUMP = 5.0

    def __init__(self, start: float) -> None:
        self._offset = start - time.time()
        self._lock = threading.Lock()
        self.jumped = 0.0

    def time(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), timezone.utc)

    def sleep(self, seconds: float) -> None:
        if seconds >= self.JUMP:
            with self._lock:
                self._offset += seconds
                self.jumped += seconds
        elif seconds > 0:
            time.sleep(seconds)


def pacific(ts: float) -> str:
    return datetime.fromtimestamp(ts, PACIFIC).strftime("%Y-%m-%d %H:%M:%S %Z")


def run_daily(args: argparse.Namespace, tmp: Path) -> Row:
    rpd = args.daily_plugins  # about half of the 2 requests per plugin the subset needs
    start = datetime(2025, 6, 2, 20, 0, tzinfo=PACIFIC).timestamp()
    sim = SimClock(start)
    root = prepare(args.corpus, tmp / "daily", 1)
    print(f"simulated clock starts {pacific(start)}; {args.daily_plugins} plugins; "
          f"rpm {args.rpm}, rpd {rpd} (emulator and scheduler); concurrency {args.concurrency}")
    with Emulator(api_key=KEY, latency=args.latency, rpm=args.rpm, rpd=rpd, seed=3, clock=sim.time) as emu:
        options = RunOptions(gemini=GeminiSettings(base_url=emu.url, timeout_s=30),
                             limits=Limits(rpm=args.rpm, rpd=rpd, tpm=BIG_TPM, concurrency=args.concurrency),
                             backoff_s=0.2, limit=args.daily_plugins)
        with open_log(root, clock=sim.now) as store:
            runner = Runner(store, root, backend=Backend(vertex=False, api_key=KEY),
                            clock=sim.time, sleep=sim.sleep)
            real = time.perf_counter()
            result = runner.start(options)
            real = time.perf_counter() - real
            run_events = store.query(
                "SELECT type, at, data FROM events WHERE stream LIKE 'run:%' ORDER BY seq")
        records = generate_requests(emu)
    print(f"run: {result.outcome}; by state {result.counts}; real time {real:.1f} s; "
          f"simulated time skipped by sleeping {sim.jumped / 3600:.2f} h")
    for kind, at, data in run_events:
        extra = ""
        if kind == "RunPaused":
            body = json.loads(data)
            until = datetime.fromisoformat(body["until"].replace("Z", "+00:00")).timestamp()
            extra = f" until {pacific(until)} ({body['reason']})"
        if kind == "RunFinished":
            extra = f" ({json.loads(data)['outcome']})"
        at_ts = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        print(f"  {pacific(at_ts)}  {kind}{extra}")
    days: dict[str, list[RequestRecord]] = {}
    for r in records:
        days.setdefault(datetime.fromtimestamp(r.time, PACIFIC).date().isoformat(), []).append(r)
    for day, recs in days.items():
        ok = sum(1 for r in recs if r.status == 200)
        print(f"  Pacific day {day}: {len(recs)} requests ({ok} answered, {len(ours(recs))} quota 429s) "
              f"from {pacific(recs[0].time)[11:19]} to {pacific(recs[-1].time)[11:19]}")
    return Row("daily exhaustion (sim)", result.selected, len(records), real, 0.0, len(ours(records)), 0.0, 0.0,
               note=f"{len(days)} Pacific days, outcome {result.outcome}")


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--copies", type=int, default=4,
                        help="copies of the corpus in the overnight run's marketplace")
    parser.add_argument("--plugins", type=int, default=None, help="plugins in the overnight run (default all)")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--rpd", type=int, default=6000)
    parser.add_argument("--latency", default="0.1,2.0", help="MIN,MAX seconds per request")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--old-budget", type=float, default=75.0, help="wall seconds for the old pacing")
    parser.add_argument("--daily-plugins", type=int, default=40)
    parser.add_argument("--skip", action="append", default=[], choices=("overnight", "old", "daily"))
    args = parser.parse_args()
    lo, _, hi = args.latency.partition(",")
    args.latency = (float(lo), float(hi or lo))
    print(f"limits: {args.rpm}/min, {args.rpd}/day (x{args.rpm / REAL_RPM:g} the real {REAL_RPM}/min); "
          f"latency {args.latency[0]}-{args.latency[1]} s per request", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        target = args.plugins or 272 * args.copies
        if "overnight" not in args.skip:
            print("\n-- overnight pacing (scheduler at the limits)", flush=True)
            row, target = run_overnight(args, tmp)
            rows.append(row)
        if "old" not in args.skip:
            print("\n-- old pacing (fixed delay + jitter, rest every 10 plugins)", flush=True)
            rows.append(run_old(args, tmp, target))
        if "daily" not in args.skip:
            print("\n-- daily exhaustion (simulated clock)", flush=True)
            rows.append(run_daily(args, tmp))
    print(f"\n{'pacing':<24} {'plugins':>7} {'requests':>8} {'wall':>8} {'req/min':>8} {'x rpm':>6} "
          f"{'own 429':>7} {'projected ' + str(target) + ' plugins':>22} {'272 at real 15/min':>18}  note")
    for r in rows:
        rate = f"{r.rate:8.1f} {r.rate / args.rpm:6.3f}" if r.rate else f"{'-':>8} {'-':>6}"
        projected = fmt_s(r.projected_s) if r.projected_s else "-"
        real = fmt_s(r.real_corpus_s) if r.real_corpus_s else "-"
        print(f"{r.pacing:<24} {r.plugins:>7} {r.requests:>8} {fmt_s(r.wall_s):>8} {rate} {r.own_429:>7} "
              f"{projected:>22} {real:>18}  {r.note}")


if __name__ == "__main__":
    main()
