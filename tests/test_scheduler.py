"""The quota scheduler: sliding windows, Pacific days across daylight-saving changes, restarts
from the ledger, learned limits, 429 backoff; and the runner pacing a run over several
simulated days against the emulator. Every test runs on a fake clock: nothing really sleeps."""

from __future__ import annotations

import dataclasses
import random
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from statemachine.runner import WINDOW_MARGIN
from statemachine.scheduler import (
    PACIFIC, DailyQuotaExhausted, Limits, Scheduler, day_start, iso, next_day_start,
)

UTC = timezone.utc


def ts(*args: int) -> float:
    """Unix time of a UTC date and time."""
    return datetime(*args, tzinfo=UTC).timestamp()


def pacific(*args: int) -> float:
    """Unix time of a wall-clock time in America/Los_Angeles."""
    return datetime(*args, tzinfo=PACIFIC).timestamp()


class FakeClock:
    """A shared 'now' (unix seconds) that only moves forward; `sleep` advances it. Thread-safe."""

    def __init__(self, start: float) -> None:
        self._now = float(start)
        self._lock = threading.Lock()
        self.slept = 0.0

    def time(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            step = max(0.0, float(seconds))
            self._now += step
            self.slept += step

    def set(self, when: float) -> None:
        with self._lock:
            assert when >= self._now, "the fake clock never goes back"
            self._now = float(when)

    def advance(self, seconds: float) -> None:
        self.set(self.time() + seconds)

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)


T0 = pacific(2026, 6, 15, 10, 0, 0)  # a Monday morning in PDT, far from midnight


def scheduler(clock: FakeClock, **limits: int) -> Scheduler:
    defaults = {"rpm": 1000, "rpd": 100_000, "tpm": 10**9}
    return Scheduler(Limits(**{**defaults, **limits}), clock.time, rng=random.Random(1))


def admit(s: Scheduler, tokens: int = 100):
    wait, slot, _ = s.try_admit(tokens)
    assert wait == 0 and slot is not None, f"refused, wait {wait}"
    return slot


def refused(s: Scheduler, tokens: int = 100, why: str | None = None) -> float:
    wait, slot, reason = s.try_admit(tokens)
    assert slot is None and wait > 0, "admitted"
    assert why is None or reason == why, reason
    return wait


# ----------------------------------------------------------------- requests per minute


def test_rpm_the_extra_request_waits_exactly_until_the_oldest_leaves_the_window():
    clock = FakeClock(T0)
    s = scheduler(clock, rpm=3)
    for _ in range(3):
        admit(s)
        clock.advance(10)
    # t0, t0+10, t0+20 sent; now t0+30: the 4th waits until t0+60
    assert refused(s, why="requests per minute: 3") == 30
    assert s.delay(100) == 30  # asking does not reserve anything
    clock.set(T0 + 59.5)
    assert refused(s) == pytest.approx(0.5)
    clock.set(T0 + 60)
    admit(s)  # t0 left the window at exactly t0+60
    # window now t0+10, t0+20, t0+60: the next one waits for t0+10 to leave
    assert refused(s) == 10
    assert s.used()["minute_requests"] == 3


def test_rpm_a_refused_attempt_does_not_count():
    clock = FakeClock(T0)
    s = scheduler(clock, rpm=2)
    admit(s), admit(s)
    for _ in range(5):
        refused(s)
    assert s.used() == {"minute_requests": 2, "minute_tokens": 200, "day_requests": 2}
    clock.advance(60)
    admit(s), admit(s)
    assert s.used()["day_requests"] == 4


@pytest.mark.parametrize("rpm", [1, 3, 7])
def test_rpm_no_60_second_span_ever_holds_more_than_rpm_requests(rpm):
    """Greedy senders (always asking again as soon as told) at random moments."""
    rng = random.Random(rpm)
    clock = FakeClock(T0)
    s = scheduler(clock, rpm=rpm)
    sent: list[float] = []
    while len(sent) < 60:
        wait, slot, _ = s.try_admit(10)
        if slot is None:
            clock.advance(wait)
            # the wait was exact: now it goes, and it is the oldest of the window leaving
            admit(s, 10)
            sent.append(clock.time())
            assert sent[-1] == sent[-1 - rpm] + 60
        else:
            sent.append(clock.time())
        clock.advance(rng.choice([0, 0, 0.001, 1, 7.5, 30]))
    for i in range(len(sent) - rpm):
        assert sent[i + rpm] - sent[i] >= 60, (i, sent[i:i + rpm + 1])


# ------------------------------------------------------------- input tokens per minute


def test_tpm_reserves_the_estimate_and_settles_with_the_real_count():
    clock = FakeClock(T0)
    s = scheduler(clock, tpm=1000)
    first = admit(s, 600)                      # reserved at the estimate
    clock.advance(10)
    assert refused(s, 600) == 50               # 600 + 600 > 1000 until the first leaves
    s.settle(first, 300)                       # the answer said 300
    assert s.used()["minute_tokens"] == 300
    second = admit(s, 600)                     # 300 + 600 fits
    s.settle(second, None)                     # no usage in the answer: the estimate stays
    assert s.used()["minute_tokens"] == 900
    assert refused(s, 200) == 50               # 900 + 200: wait for the 300 to leave
    admit(s, 100)                              # exactly 1000 is allowed


def test_tpm_waits_only_for_as_much_of_the_window_as_needed():
    clock = FakeClock(T0)
    s = scheduler(clock, tpm=1000)
    for tokens in (400, 300, 200):             # at t0, t0+10, t0+20
        admit(s, tokens)
        clock.advance(10)
    assert refused(s, 500, why="tokens per minute: 1,000") == 30  # t0's 400 leaving is enough (at t0+60)
    assert refused(s, 600) == 40               # needs t0+10's 300 too (at t0+70)


def test_tpm_a_single_request_larger_than_tpm_goes_when_the_window_is_empty():
    clock = FakeClock(T0)
    s = scheduler(clock, tpm=1000)
    admit(s, 5000)                             # empty window: admitted, or it would never go
    clock.advance(1)
    assert refused(s, 10) == 59
    clock.advance(59)
    admit(s, 10)


def test_tpm_a_request_larger_than_tpm_waits_for_the_window_to_empty():
    """It may only go alone: while anything is in the window it must wait for all of it."""
    clock = FakeClock(T0)
    s = scheduler(clock, tpm=1000)
    admit(s, 100)                              # t0
    clock.advance(10)
    admit(s, 100)                              # t0+10
    clock.advance(10)
    assert refused(s, 5000) == 50              # until t0+10 leaves at t0+70
    clock.set(T0 + 70)
    admit(s, 5000)


# --------------------------------------------------------------------- requests per day


def test_rpd_exhausted_raises_until_the_next_pacific_midnight():
    clock = FakeClock(pacific(2026, 6, 15, 17, 30))
    s = scheduler(clock, rpd=3)
    for _ in range(3):
        admit(s)
        clock.advance(3600)
    with pytest.raises(DailyQuotaExhausted) as info:
        s.try_admit(100)
    midnight = ts(2026, 6, 16, 7, 0)           # 00:00 PDT
    assert info.value.until == midnight and iso(info.value.until) == "2026-06-16T07:00:00Z"
    assert "3 of 3" in info.value.reason
    with pytest.raises(DailyQuotaExhausted):
        s.delay(100)
    clock.set(midnight - 1)
    with pytest.raises(DailyQuotaExhausted):
        s.try_admit(100)
    clock.set(midnight)
    admit(s)
    assert s.used()["day_requests"] == 1


def test_rpd_in_winter_resets_at_08_utc():
    clock = FakeClock(pacific(2026, 1, 20, 23, 59, 59))
    s = scheduler(clock, rpd=1)
    admit(s)
    with pytest.raises(DailyQuotaExhausted) as info:
        s.try_admit(100)
    assert iso(info.value.until) == "2026-01-21T08:00:00Z"
    clock.advance(1)
    admit(s)


# ----------------------------------------------------------- Pacific days and DST changes


@pytest.mark.parametrize(("now", "start", "end"), [
    # spring forward, Sunday 2026-03-08 02:00 PST -> 03:00 PDT
    (pacific(2026, 3, 7, 12, 0), ts(2026, 3, 7, 8, 0), ts(2026, 3, 8, 8, 0)),
    (pacific(2026, 3, 8, 0, 0), ts(2026, 3, 8, 8, 0), ts(2026, 3, 9, 7, 0)),
    (ts(2026, 3, 8, 9, 59, 59), ts(2026, 3, 8, 8, 0), ts(2026, 3, 9, 7, 0)),   # 01:59:59 PST
    (ts(2026, 3, 8, 10, 0), ts(2026, 3, 8, 8, 0), ts(2026, 3, 9, 7, 0)),      # 03:00 PDT
    (pacific(2026, 3, 8, 23, 59, 59), ts(2026, 3, 8, 8, 0), ts(2026, 3, 9, 7, 0)),
    (pacific(2026, 3, 9, 0, 0), ts(2026, 3, 9, 7, 0), ts(2026, 3, 10, 7, 0)),
    (pacific(2026, 3, 9, 12, 0), ts(2026, 3, 9, 7, 0), ts(2026, 3, 10, 7, 0)),
    # fall back, Sunday 2026-11-01 02:00 PDT -> 01:00 PST
    (pacific(2026, 10, 31, 12, 0), ts(2026, 10, 31, 7, 0), ts(2026, 11, 1, 7, 0)),
    (pacific(2026, 11, 1, 0, 0), ts(2026, 11, 1, 7, 0), ts(2026, 11, 2, 8, 0)),
    (ts(2026, 11, 1, 8, 30), ts(2026, 11, 1, 7, 0), ts(2026, 11, 2, 8, 0)),   # 01:30 PDT
    (ts(2026, 11, 1, 9, 30), ts(2026, 11, 1, 7, 0), ts(2026, 11, 2, 8, 0)),   # 01:30 PST again
    (ts(2026, 11, 2, 7, 59, 59), ts(2026, 11, 1, 7, 0), ts(2026, 11, 2, 8, 0)),
    (pacific(2026, 11, 2, 0, 0), ts(2026, 11, 2, 8, 0), ts(2026, 11, 3, 8, 0)),
    (pacific(2026, 11, 2, 12, 0), ts(2026, 11, 2, 8, 0), ts(2026, 11, 3, 8, 0)),
])
def test_day_start_and_next_day_start_are_local_midnight_across_dst(now, start, end):
    assert day_start(now) == start
    assert next_day_start(now) == end
    assert day_start(start) == start and day_start(start - 1) < start   # midnight belongs to its day
    assert next_day_start(start - 1) == start


def test_the_day_of_a_dst_change_is_23_or_25_hours_long():
    spring = pacific(2026, 3, 8, 12, 0)
    fall = pacific(2026, 11, 1, 12, 0)
    assert next_day_start(spring) - day_start(spring) == 23 * 3600
    assert next_day_start(fall) - day_start(fall) == 25 * 3600
    for ordinary in (pacific(2026, 3, 7, 12, 0), pacific(2026, 3, 9, 12, 0),
                     pacific(2026, 10, 31, 12, 0), pacific(2026, 11, 2, 12, 0)):
        assert next_day_start(ordinary) - day_start(ordinary) == 24 * 3600


@pytest.mark.parametrize("first,same_day,midnight,next_midnight", [
    # spring: 00:30 PST on the 23-hour day; 23:30 PDT, same local day, only 22 h later
    (ts(2026, 3, 8, 8, 30), ts(2026, 3, 9, 6, 30), ts(2026, 3, 9, 7, 0), ts(2026, 3, 10, 7, 0)),
    # fall: 00:30 PDT on the 25-hour day; 23:30 PST, 24 h later and still the same local day
    (ts(2026, 11, 1, 7, 30), ts(2026, 11, 2, 7, 30), ts(2026, 11, 2, 8, 0), ts(2026, 11, 3, 8, 0)),
], ids=["spring", "fall"])
def test_the_daily_count_resets_exactly_at_midnight_on_a_dst_change(first, same_day, midnight, next_midnight):
    clock = FakeClock(first)
    s = scheduler(clock, rpd=2)
    admit(s)
    clock.set(same_day)
    admit(s)
    with pytest.raises(DailyQuotaExhausted) as info:
        s.try_admit(100)
    assert iso(info.value.until) == iso(midnight)
    clock.set(midnight - 1)
    with pytest.raises(DailyQuotaExhausted):
        s.try_admit(100)
    clock.set(midnight)                        # local 00:00
    admit(s)
    admit(s)
    with pytest.raises(DailyQuotaExhausted) as info:
        s.try_admit(100)
    assert iso(info.value.until) == iso(next_midnight)


# ----------------------------------------------------------------- restart from the ledger


def test_a_restart_in_the_middle_of_a_minute_keeps_its_count():
    clock = FakeClock(T0)
    old = scheduler(clock, rpm=3, tpm=1000)
    history = []
    for at, tokens in ((T0, 200), (T0 + 20, 300), (T0 + 40, 100)):
        clock.set(at)
        slot = admit(old, tokens)
        history.append((slot.at, slot.tokens))
    clock.set(T0 + 45)
    expected = old.delay(10)
    assert expected == 15
    new = Scheduler(old.limits, clock.time, history=list(reversed(history)))
    assert new.used() == old.used() == {"minute_requests": 3, "minute_tokens": 600, "day_requests": 3}
    assert refused(new, 10) == expected
    # tokens too: a fresh scheduler would admit 900 tokens, the restarted one may not
    clock.set(T0 + 60)
    assert refused(new, 900) == refused(old, 900) == 20
    clock.set(T0 + 80)                         # t0 and t0+20 have left
    admit(new, 900)


def test_a_restart_keeps_the_day_and_forgets_yesterday():
    clock = FakeClock(pacific(2026, 6, 15, 18, 0))
    earlier_today = [(pacific(2026, 6, 15, h, 0), 100) for h in (1, 9, 17)]
    yesterday = [(pacific(2026, 6, 14, h, 0), 100) for h in (12, 23)]
    s = Scheduler(Limits(rpm=10, rpd=3, tpm=10**9), clock.time, history=yesterday + earlier_today)
    assert s.used() == {"minute_requests": 0, "minute_tokens": 0, "day_requests": 3}
    with pytest.raises(DailyQuotaExhausted) as info:
        s.try_admit(100)
    assert iso(info.value.until) == "2026-06-16T07:00:00Z"
    s2 = Scheduler(Limits(rpm=10, rpd=4, tpm=10**9), clock.time, history=yesterday + earlier_today)
    admit(s2)


# --------------------------------------------------------------------------- learning


def test_learning_a_lower_limit_applies_it_and_a_higher_one_is_ignored():
    clock = FakeClock(T0)
    s = scheduler(clock, rpm=10)
    assert s.learn("rpm", 5) is True
    assert s.limits.rpm == 5
    for _ in range(5):
        admit(s)
    assert refused(s) == 60
    assert s.learn("rpm", 20) is False          # above the (learned) limit: nothing
    assert s.learn("rpm", 5) is False           # the same: nothing
    assert s.limits.rpm == 5
    assert refused(s) == 60
    fresh = scheduler(clock, rpm=10)
    assert fresh.learn("rpm", 50) is False and fresh.limits.rpm == 10
    assert fresh.learn("rpd", 2) is True and fresh.limits.rpd == 2
    assert fresh.learn("tpd", 1000) is True and fresh.limits.tpd == 1000  # none configured


# ----------------------------------------------------------------------------- 429s


def test_a_429_with_retry_info_blocks_every_request_for_exactly_that_long():
    clock = FakeClock(T0)
    s = scheduler(clock)
    assert s.rate_limited("minute", 30) == T0 + 30
    assert refused(s, why="the retry delay of a 429") == 30
    clock.advance(29)
    assert refused(s) == 1
    clock.advance(1)
    admit(s)
    admit(s)  # nothing else limits


def test_a_shorter_retry_info_never_shortens_an_earlier_not_before():
    clock = FakeClock(T0)
    s = scheduler(clock)
    s.rate_limited("minute", 30)
    clock.advance(5)
    assert s.rate_limited("minute", 2) == T0 + 30
    assert refused(s) == 25


def test_a_daily_429_blocks_until_the_next_pacific_midnight():
    clock = FakeClock(pacific(2026, 11, 1, 20, 0))   # evening of the 25-hour day
    s = scheduler(clock)
    until = s.rate_limited("day", 38)
    assert until == ts(2026, 11, 2, 8, 0)
    assert refused(s) == until - clock.time()


def test_a_storm_of_429s_without_retry_info_backs_off_exponentially_with_a_cap():
    clock = FakeClock(T0)
    s = scheduler(clock)                       # seeded rng
    gaps = []
    for _ in range(14):
        not_before = s.rate_limited("unknown", None)
        gap = not_before - clock.time()
        gaps.append(gap)
        # never admitted before the not-before time, admitted at it
        clock.set(not_before - 0.01)
        refused(s)
        clock.set(not_before)
        admit(s)
    bases = [min(300.0, 5.0 * 2 ** i) for i in range(14)]
    for gap, base in zip(gaps, bases):
        assert base / 2 <= gap <= base           # jitter within [base/2, base]
    assert all(a < b for a, b in zip(gaps[:7], gaps[1:7])), gaps   # grows until the cap
    assert max(gaps) <= 300 and min(gaps[6:]) >= 150, gaps          # then capped
    assert len(set(gaps)) == len(gaps)           # jittered, not lock-step
    # the same seed gives the same storm
    again = Scheduler(s.limits, FakeClock(T0).time, rng=random.Random(1))
    assert again.rate_limited("unknown", None) - T0 == gaps[0]


def test_429s_at_the_same_instant_never_move_the_not_before_earlier():
    clock = FakeClock(T0)
    s = scheduler(clock)
    seen = [s.rate_limited("unknown", None) for _ in range(10)]
    assert seen == sorted(seen) and seen[-1] <= T0 + 300


def test_a_success_or_a_retry_info_resets_the_backoff():
    clock = FakeClock(T0)
    s = scheduler(clock)
    for _ in range(6):
        clock.set(s.rate_limited("unknown", None))
    s.succeeded()
    assert s.rate_limited("unknown", None) - clock.time() <= 5
    clock.advance(10)
    for _ in range(6):
        clock.set(s.rate_limited("unknown", None))
    clock.set(s.rate_limited("minute", 3))
    assert s.rate_limited("unknown", None) - clock.time() <= 5


def test_a_very_long_storm_of_429s_keeps_backing_off_at_the_cap():
    """An outage answering bare 429s for days must not crash the scheduler (float overflow)."""
    clock = FakeClock(T0)
    s = scheduler(clock)
    for _ in range(1500):
        not_before = s.rate_limited("unknown", None)
        assert 150 <= not_before - clock.time() <= 300 or clock.time() < T0 + 1000
        clock.set(not_before)


# ------------------------------------------------- end to end: the runner on simulated days

KEY = "fake-key-SCHEDULER-51c2e0"
PLUGINS = [("widget", "tools"), ("gadget", "tools"), ("lint-helper", "devops"), ("notes", "writing")]


@pytest.fixture
def four(tmp_path) -> Path:
    """A marketplace of four small plugins (like test_run's `one`)."""
    from tests.marketplace_builder import manifest, plugin

    root = tmp_path / "four"
    manifest(root, [{"name": name, "source": f"./plugins/{cat}/{name}", "category": cat}
                    for name, cat in PLUGINS])
    for name, cat in PLUGINS:
        title = name.replace("-", " ").title()
        plugin(root, f"plugins/{cat}/{name}", name, description=f"Build and check {name}s.",
               files={"README.md": f"# {title}\n\nBuilds {name}s from specs and checks them.\n",
                      "commands/build.md": f"# /build\n\nBuild a {name} from a spec file.\n"})
    return root


def run_simulated(root: Path, clock: FakeClock, emu, *, wait: bool = True, resume: bool = False,
                  limit: int | None = None, **limits: int):
    """One in-process `overnight run` (or `resume` of the last run, waiting this time) whose
    every clock (runner, log, emulator) is `clock`."""
    from statemachine.gateway import Backend, GeminiSettings
    from statemachine.runner import RunOptions, Runner
    from statemachine.workspace import open_log

    options = RunOptions(gemini=GeminiSettings(base_url=emu.url, timeout_s=10),
                         limits=Limits(**{"tpm": 10**9, "concurrency": 1, **limits}),
                         backoff_s=0.01, wait=wait, limit=limit)
    with open_log(root, clock=clock.utc) as store:
        runner = Runner(store, root, backend=Backend(vertex=False, api_key=KEY),
                        clock=clock.time, sleep=clock.sleep)
        if resume:
            result = runner.resume(lambda recorded: dataclasses.replace(recorded, wait=True))
        else:
            result = runner.start(options)
        events = store.query("SELECT type, at, data FROM events WHERE stream LIKE 'run:%' ORDER BY seq")
        ledger = store.query("SELECT sent_at, outcome FROM quota_ledger ORDER BY sent_at")
        states = dict(store.query("SELECT plugin_id, state FROM plugins"))
    return result, events, ledger, states


def generate_calls(emu) -> list:
    return [r for r in emu.requests if r.method == "POST" and r.path.endswith(":generateContent")]


def test_a_run_paces_itself_over_several_pacific_days_across_the_spring_change(four):
    import msgspec

    from tests.emulator import Emulator

    # Saturday 2026-03-07 20:00 PST: day 1 ends at 08:00 UTC, day 2 (23 hours) at 07:00 UTC
    clock = FakeClock(pacific(2026, 3, 7, 20, 0))
    with Emulator(api_key=KEY, seed=7, clock=clock.time, rpm=2, rpd=3) as emu:
        result, events, ledger, states = run_simulated(four, clock, emu, rpm=2, rpd=3)
        calls = generate_calls(emu)
    assert result.outcome == "complete", (result, events)
    assert set(states.values()) == {"done"} and len(states) == 4
    # the emulator enforcing the same limits never had to refuse anything
    assert [r.fault for r in calls if r.fault] == []
    assert all(r.status == 200 for r in calls)
    assert [o for _, o in ledger] == ["ok"] * len(calls) and len(calls) >= 8
    # the log's times are the simulated ones, request for request
    assert [at for at, _ in ledger] == pytest.approx(sorted(r.time for r in calls), abs=1e-5)
    # never more than 3 a Pacific day, never more than 2 in any 60 s
    per_day: dict[float, int] = {}
    for at, _ in ledger:
        per_day[day_start(at)] = per_day.get(day_start(at), 0) + 1
    assert max(per_day.values()) == 3 and len(per_day) >= 3
    # the requests_per_day view a person queries in the sqlite3 shell counts the same Pacific
    # days (the first evening's requests are already the next day in UTC)
    import apsw
    conn = apsw.Connection(str(four / ".overnight" / "overnight.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        view = conn.execute("SELECT day_pacific, requests FROM requests_per_day").fetchall()
    finally:
        conn.close()
    assert view == [(datetime.fromtimestamp(day, PACIFIC).date().isoformat(), n) for day, n in sorted(per_day.items())]
    assert view[0][0] == "2026-03-07"
    sent = [at for at, _ in ledger]
    assert all(b - a >= 60 for a, b in zip(sent, sent[2:]))
    # paused at each daily limit until Pacific midnight, then resumed
    kinds = [t for t, _, _ in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    pauses = [msgspec.json.decode(d) for t, _, d in events if t == "RunPaused"]
    assert [p["until"] for p in pauses][:2] == ["2026-03-08T08:00:00Z", "2026-03-09T07:00:00Z"]
    assert len(pauses) == len(per_day) - 1 == kinds.count("RunResumed")
    for i, kind in enumerate(kinds):
        if kind == "RunPaused":
            assert kinds[i + 1] == "RunResumed"
    resumed_at = [datetime.fromisoformat(at).timestamp() for t, at, _ in events if t == "RunResumed"]
    assert resumed_at == [datetime.fromisoformat(p["until"]).timestamp() for p in pauses]
    # the first request after each pause went at midnight exactly (nothing else was waiting)
    for midnight in resumed_at:
        assert min(at for at in sent if at >= midnight) == pytest.approx(midnight, abs=1e-5)
    assert clock.time() < pacific(2026, 3, 10 + len(pauses), 0, 0)


def test_without_wait_a_run_at_the_daily_limit_returns_paused_and_resume_keeps_the_count(four):
    import msgspec

    from tests.emulator import Emulator

    clock = FakeClock(pacific(2026, 11, 1, 21, 0))     # the 25-hour day
    with Emulator(api_key=KEY, seed=7, clock=clock.time, rpm=2, rpd=3) as emu:
        result, events, ledger, states = run_simulated(four, clock, emu, wait=False, rpm=2, rpd=3)
        first = generate_calls(emu)
        assert result.outcome == "paused" and result.ok
        assert result.paused_until == "2026-11-02T08:00:00Z"
        assert [t for t, _, _ in events] == ["RunStarted", "RunPaused"]
        assert msgspec.json.decode(events[-1][2])["until"] == "2026-11-02T08:00:00Z"
        assert len(first) == len(ledger) == 3 and [r.fault for r in first if r.fault] == []
        assert clock.time() < ts(2026, 11, 2, 8, 0)    # it did not wait
        assert list(states.values()).count("done") < 4

        # resumed an hour later, before midnight: the recorded pause holds, so the resume
        # waits (this time it may) and sends nothing before Pacific midnight
        clock.advance(3600)
        result, events, ledger, states = run_simulated(four, clock, emu, resume=True)
        later = generate_calls(emu)[len(first):]
    assert result.outcome == "complete", result
    kinds = [t for t, _, _ in events]
    assert kinds[:3] == ["RunStarted", "RunPaused", "RunResumed"] and kinds[-1] == "RunFinished"
    assert events[2][1] == "2026-11-02T08:00:00.000000Z"
    assert min(r.time for r in later) == ts(2026, 11, 2, 8, 0)
    assert [r.fault for r in later if r.fault] == [] and set(states.values()) == {"done"}


def test_a_new_run_in_the_middle_of_a_minute_counts_the_requests_in_the_ledger(four):
    """The runner builds its scheduler from the ledger: a second run 30 s after one that
    sent 2 requests (rpm 2, rpd 3) waits out the minute, sends 1, and pauses for the day."""
    from tests.emulator import Emulator

    t0 = pacific(2026, 6, 15, 10, 0)
    clock = FakeClock(t0)
    with Emulator(api_key=KEY, seed=7, clock=clock.time, rpm=2, rpd=3) as emu:
        result, _, ledger, _ = run_simulated(four, clock, emu, limit=1, rpm=2, rpd=3)
        assert result.outcome == "complete" and [at for at, _ in ledger] == [t0, t0]
        clock.set(t0 + 30)
        result, events, ledger, states = run_simulated(four, clock, emu, wait=False, rpm=2, rpd=3)
        calls = generate_calls(emu)
    assert result.outcome == "paused" and result.paused_until == "2026-06-16T07:00:00Z"
    # the run keeps a request in the window WINDOW_MARGIN beyond 60 s (network jitter)
    assert [at for at, _ in ledger] == [t0, t0, t0 + 60 + WINDOW_MARGIN]
    assert [r.time for r in calls] == [t0, t0, t0 + 60 + WINDOW_MARGIN]
    assert [r.fault for r in calls if r.fault] == []


def test_a_margin_keeps_each_request_in_the_minute_window_that_much_longer():
    clock = FakeClock(T0)
    s = Scheduler(Limits(rpm=1, rpd=100, tpm=10**9), clock.time, margin=0.5)
    admit(s)
    clock.set(T0 + 60)
    assert refused(s) == 0.5
    clock.set(T0 + 60.5)
    admit(s)


@pytest.mark.parametrize("to_midnight", [30.0, 5 * 3600.0])
def test_the_quota_share_of_the_eta_is_the_same_just_before_pacific_midnight(to_midnight):
    """Requests that fit in today's room were counted at a plain rate, as if the minute had no
    requests in it, whenever their end fell after the next midnight: 90 s instead of 115 s."""
    from statemachine.metrics import eta

    now = next_day_start(datetime(2026, 11, 23, 12, tzinfo=timezone.utc).timestamp()) - to_midnight
    recent = [now - 10 + i * 0.5 for i in range(20)]  # this minute's 20 requests, sent 10 s to 0.5 s ago
    seconds = eta(Limits(rpm=20, rpd=1000), remaining=15, finished=0, requests=0, tokens_each=0, used_today=20,
                  now=now, dry_run=False, recent=recent, latency=0.0)
    # 30 requests: the next 20 as this minute's expire (the 10th at now - 5.5 + 60), the last 10 a minute later
    assert seconds == pytest.approx(114.5)
