"""Quota admission: send a Gemini request only when every window allows it.

Algorithm: exact sliding windows over the requests actually sent (not token buckets). The
ledger already holds one row per request with its time and tokens, so the windows are the
ledger itself: on start they are loaded from it (a restart in the middle of a minute keeps
its count), and each admitted request is reserved in memory before its request event is
appended. Sliding windows never let more than the limit through in any 60-second span,
which is what Gemini enforces; a token bucket would allow bursts at window edges.

- requests per minute: fewer than `rpm` requests in the last 60 s;
- input tokens per minute: the estimate plus the tokens of the last 60 s within `tpm`
  (reserved at the estimate, settled with the real count from the answer);
- requests per day: fewer than `rpd` since the last midnight in America/Los_Angeles
  (zoneinfo, so the daylight-saving changes are handled);
- a 429 sets a not-before time for the model (RetryInfo, or a backoff when it has none);
  a per-day 429 makes the run pause until the next Pacific midnight.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from events import EventStore

PACIFIC = ZoneInfo("America/Los_Angeles")
MINUTE = 60.0
Clock = Callable[[], float]


def day_start(now: float) -> float:
    """Unix time of the last midnight in America/Los_Angeles at or before `now`."""
    local = datetime.fromtimestamp(now, PACIFIC)
    return datetime.combine(local.date(), time(0), tzinfo=PACIFIC).timestamp()


@lru_cache(maxsize=4096)
def _pacific_date(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3600, PACIFIC).date().isoformat()


def pacific_day(ts: float) -> str:
    """The quota day of `ts`: its date in America/Los_Angeles (YYYY-MM-DD). Pacific time is
    a whole number of hours from UTC, so the date is the same for a whole UTC hour."""
    return _pacific_date(int(ts // 3600))


def next_day_start(now: float) -> float:
    local = datetime.fromtimestamp(now, PACIFIC)
    return datetime.combine(local.date() + timedelta(days=1), time(0), tzinfo=PACIFIC).timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Limits:
    """Per-model limits. Defaults are the Gemini free tier for Flash as seen in late 2025
    (conservative on purpose: raise them to what your project really has)."""

    rpm: int = 10
    rpd: int = 20
    tpm: int = 250_000
    tpd: int | None = None
    concurrency: int = 2

    def as_dict(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "rpd": self.rpd, "tpm": self.tpm, "tpd": self.tpd,
                "concurrency": self.concurrency}


def effective_limits(store: "EventStore", model: str, limits: Limits, explicit: Iterable[str] = (),
                     stated_at: str = "") -> Limits:
    """`limits` capped by the limits Gemini's 429 answers taught for `model` (quota_limits),
    except a limit the user stated explicitly (a flag or the config file) at `stated_at`, after
    it was learned: a new tier is the user's to declare, and if Gemini disagrees, its next 429
    teaches the limit again."""
    explicit = set(explicit)
    for metric, value, learned_at in store.query(
            "SELECT metric, value, learned_at FROM quota_limits WHERE model = ?", (model,)):
        if metric in explicit and learned_at < stated_at:
            continue
        current = getattr(limits, metric, None)
        if current is None or value < current:
            limits = replace(limits, **{metric: value})
    return limits


def run_limits(store: "EventStore", run_id: str, model: str, limits: Limits, explicit: Iterable[str]) -> Limits:
    """Run `run_id`'s `limits` capped by learned ones (see `effective_limits`): its explicit
    limits were stated when it started or when a resume last changed them."""
    stated_at = store.query("SELECT max(at) FROM events WHERE stream = ? AND type IN ('RunStarted', 'LimitsChanged')",
                            (f"run:{run_id}",))[0][0] or ""
    return effective_limits(store, model, limits, explicit, stated_at)


class DailyQuotaExhausted(Exception):
    """No request may be sent before `until` (unix time): the run should pause."""

    def __init__(self, until: float, reason: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason


@dataclass
class _Sent:
    at: float
    tokens: int


class Admission(NamedTuple):
    wait: float  # seconds before the request may go; 0 when admitted
    slot: _Sent | None  # the reservation when admitted
    why: str  # the limit that imposes the wait, for a person watching


class Scheduler:
    """Thread-safe admission for one model. `clock` returns unix seconds (injectable)."""

    def __init__(self, limits: Limits, clock: Clock, history: list[tuple[float, int]] = (),
                 rng: random.Random | None = None, margin: float = 0.0) -> None:
        self.limits = limits
        self.clock = clock
        # Seconds a request stays in the minute window beyond 60: Gemini counts a request when
        # it arrives and we when we admit it, so without a margin a request admitted at the
        # very edge of the window can arrive while an earlier one still counts there.
        self.window = MINUTE + margin
        self._lock = threading.Lock()
        self._minute: deque[_Sent] = deque()
        self._today: list[float] = []
        self._day = day_start(clock())
        self._not_before = 0.0
        self._backoff = 0
        # the run's last requests that failed alike, in a row: how (no answer: a 5xx, a timeout, a
        # connection; or refused with one status and message), and their plugins
        self._alike: tuple[str, list[str]] = ("", [])
        self._not_before_why = "the retry delay of a 429"
        self._rng = rng or random.Random()
        now = clock()
        for at, tokens in sorted(history):
            if at > now - self.window:
                self._minute.append(_Sent(at, tokens))
            if at >= self._day:
                self._today.append(at)

    # ------------------------------------------------------------------ admission

    def delay(self, est_tokens: int) -> float:
        """Seconds to wait before a request of `est_tokens` may go (0: now).
        Raises DailyQuotaExhausted when today's requests are used up."""
        with self._lock:
            return self._delay(self.clock(), est_tokens)[0]

    def _delay(self, now: float, est_tokens: int) -> tuple[float, str]:
        """The wait and the limit that imposes it (the longest wait when several do)."""
        self._expire(now)
        limits = self.limits
        if len(self._today) >= limits.rpd:
            until = next_day_start(now)
            raise DailyQuotaExhausted(until, f"{len(self._today)} of {limits.rpd} requests per day used")
        waits = [(self._not_before - now, self._not_before_why)]
        if len(self._minute) >= limits.rpm:
            waits.append((self._minute[-limits.rpm].at + self.window - now, f"requests per minute: {limits.rpm}"))
        used = sum(s.tokens for s in self._minute)
        if self._minute and used + est_tokens > limits.tpm:
            # Wait until enough of the window has expired to fit this request.
            why = f"tokens per minute: {limits.tpm:,}"
            excess = used + est_tokens - limits.tpm
            for sent in self._minute:
                excess -= sent.tokens
                if excess <= 0:
                    waits.append((sent.at + self.window - now, why))
                    break
            else:  # larger than tpm by itself: it may only go alone, once the window is empty
                waits.append((self._minute[-1].at + self.window - now, why))
        wait, why = max(waits)
        return (wait, why) if wait > 0 else (0.0, "")

    def try_admit(self, est_tokens: int) -> Admission:
        """Reserve a slot now if every window allows it: (0, slot, ""); else (wait, None, which limit)."""
        with self._lock:
            now = self.clock()
            wait, why = self._delay(now, est_tokens)
            if wait > 0:
                return Admission(wait, None, why)
            slot = _Sent(now, est_tokens)
            self._minute.append(slot)
            self._today.append(now)
            return Admission(0.0, slot, "")

    def settle(self, slot: _Sent, input_tokens: int | None) -> None:
        """Replace the estimate with the real input token count of the answer."""
        if input_tokens is not None:
            with self._lock:
                slot.tokens = input_tokens

    def _expire(self, now: float) -> None:
        while self._minute and self._minute[0].at <= now - self.window:
            self._minute.popleft()
        start = day_start(now)
        if start != self._day:
            self._day = start
            self._today = [t for t in self._today if t >= start]

    # -------------------------------------------------------------- learning

    def rate_limited(self, scope: str, retry_after: float | None) -> float:
        """Record a 429; returns the not-before time it implies for every request of the model.
        With RetryInfo the wait is exactly that; without it, an exponential backoff with
        jitter, so a storm of 429s never becomes a storm of requests."""
        with self._lock:
            now = self.clock()
            if retry_after is not None:
                wait = retry_after
                self._backoff = 0
            else:
                self._backoff += 1
                base = min(300.0, 5.0 * 2 ** min(self._backoff - 1, 16))  # 2**1024 overflows a float
                wait = base / 2 + self._rng.uniform(0, base / 2)
            if scope in ("day", "tokens_day"):
                wait = max(wait, next_day_start(now) - now)
            self._not_before = max(self._not_before, now + wait)
            self._not_before_why = "the retry delay of a 429"
            self._alike = ("", [])  # an answer: Gemini is there
            return self._not_before

    def succeeded(self) -> None:
        """An answer came (usable or not): Gemini is there."""
        with self._lock:
            self._backoff = 0
            self._alike = ("", [])

    def unanswered(self, plugin_id: str) -> tuple[int, int]:
        """Record a request of `plugin_id` that got no answer (a 5xx, a timeout, a failed
        connection); returns how many requests in a row have had none, and of how many plugins."""
        with self._lock:
            return self._in_a_row("unanswered", plugin_id)

    def refused(self, plugin_id: str, why: str) -> tuple[int, int]:
        """Record a request of `plugin_id` that Gemini refused (a 4xx), `why` its message (with
        the status); returns how many requests in a row it refused so, and of how many plugins."""
        with self._lock:
            self._backoff = 0  # an answer: Gemini is there
            return self._in_a_row(f"refused {why}", plugin_id)

    def _in_a_row(self, how: str, plugin_id: str) -> tuple[int, int]:
        if self._alike[0] != how:
            self._alike = (how, [])
        self._alike[1].append(plugin_id)
        return len(self._alike[1]), len(set(self._alike[1]))

    def hold(self, seconds: float) -> float:
        """Hold every request back for `seconds` (Gemini is down); returns the not-before time."""
        with self._lock:
            self._not_before = max(self._not_before, self.clock() + seconds)
            self._not_before_why = "no answer from Gemini lately (an outage?)"
            return self._not_before

    def learn(self, metric: str, value: int) -> bool:
        """Use a limit learned from a QuotaFailure (never above the configured one).
        Returns True when the effective limit changed."""
        if value < 1:
            return False  # a limit of zero would stop everything: trust the configuration
        with self._lock:
            current = getattr(self.limits, metric, None)
            if current is not None and current <= value:
                return False
            self.limits = replace(self.limits, **{metric: value})
            return True

    def set_limits(self, limits: Limits) -> None:
        with self._lock:
            self.limits = limits

    def recent(self) -> list[float]:
        """When the requests that the minute window still holds were admitted."""
        with self._lock:
            self._expire(self.clock())
            return [s.at for s in self._minute]

    def used(self) -> dict[str, int]:
        with self._lock:
            self._expire(self.clock())
            return {"minute_requests": len(self._minute), "minute_tokens": sum(s.tokens for s in self._minute),
                    "day_requests": len(self._today)}
