"""Run budgets: stop cleanly once a run has spent what it was allowed (retries count too).

Spending starts from the run's totals in the quota ledger (so a resumed run remembers it)
and adds what this process spends; the check happens before a request is recorded, so a run never
sends the request that would go over a request budget, nor one that could go over a token or
cost budget, counting what the requests in flight are expected to take.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from statemachine.catalog import Usage
from statemachine.metrics import Prices


@dataclass(frozen=True)
class Budgets:
    max_requests: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"max_requests": self.max_requests, "max_tokens": self.max_tokens, "max_cost": self.max_cost}


class BudgetReached(Exception):
    def __init__(self, budget: str, limit: float, used: float) -> None:
        super().__init__(f"{budget} budget reached: {used:g} of {limit:g}"
                         + ("; the next request could take it past that" if used < limit else ""))
        self.budget = budget
        self.limit = limit
        self.used = used


Hold = tuple[int, int]  # the (input, output) tokens a request in flight is expected to take


class Spending:
    """Thread-safe running totals of one run, checked against its budgets.

    A request goes only if what was spent, what the requests in flight are expected to take and
    what it is expected to take all fit in the token and cost budgets: however many requests
    are under way at once, a run goes past one only by what the estimates missed (the estimate
    is the prompt's tokens and the average answer this log has seen). One that fits only once
    those under way have settled waits for them; one that does not fit even then stops the run."""

    def __init__(self, budgets: Budgets, prices: Prices, *, requests: int, input_tokens: int,
                 output_tokens: int, expected_output: dict[str, int]) -> None:
        """The counts start at what the run spent before (its ledger rows); `expected_output`
        is the output tokens of an answer per phase (plan, skill)."""
        self.budgets = budgets
        self.prices = prices
        self.expected_output = expected_output
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self.requests, self.input_tokens, self.output_tokens = requests, input_tokens, output_tokens
        self._held_input = self._held_output = 0

    def before_request(self, phase: str, est_input: int) -> Hold | None:
        """Count one more request and hold what it is expected to take until `settle` (or
        `release`). None: it fits only once requests under way have settled (`wait` for that);
        BudgetReached: it could take the run past a budget even then."""
        hold = (est_input, self.expected_output[phase])
        with self._lock:
            b = self.budgets
            if b.max_requests is not None and self.requests + 1 > b.max_requests:
                raise BudgetReached("requests", b.max_requests, self.requests)
            for held in (False, True):
                tokens_in = self.input_tokens + hold[0] + (self._held_input if held else 0)
                tokens_out = self.output_tokens + hold[1] + (self._held_output if held else 0)
                if b.max_tokens is not None and tokens_in + tokens_out > b.max_tokens:
                    if held:
                        return None
                    raise BudgetReached("tokens", b.max_tokens, self.input_tokens + self.output_tokens)
                if b.max_cost is not None and self.prices.cost(tokens_in, tokens_out) > b.max_cost:
                    if held:
                        return None
                    raise BudgetReached("cost", b.max_cost,
                                        round(self.prices.cost(self.input_tokens, self.output_tokens), 4))
            self.requests += 1
            self._held_input += hold[0]
            self._held_output += hold[1]
        return hold

    def wait(self, timeout: float) -> None:
        """Until a request under way settles, or `timeout` seconds."""
        with self._settled:
            self._settled.wait(timeout)

    def release(self, hold: Hold) -> None:
        """Un-count a request `before_request` counted but that was never sent."""
        with self._settled:
            self.requests -= 1
            self._held_input -= hold[0]
            self._held_output -= hold[1]
            self._settled.notify_all()

    def settle(self, hold: Hold, usage: Usage | None, *, billed: bool = False) -> None:
        """A sent request's answer (or failure) came: what it took replaces what it held. A
        failure with no usage that Gemini may still have billed (`billed`: no answer came in
        time, and Gemini goes on with it) counts at what it held, as a lost request does."""
        with self._settled:
            self._held_input -= hold[0]
            self._held_output -= hold[1]
            if usage is not None:
                self.input_tokens += usage.input_tokens
                self.output_tokens += usage.output_tokens + usage.thoughts_tokens
            elif billed:
                self.input_tokens += hold[0]
                self.output_tokens += hold[1]
            self._settled.notify_all()

    def reached(self, budget: str, limit: float) -> BudgetReached:
        """`budget`'s stop as it stands now that the workers are done (sent requests only)."""
        with self._lock:
            used = {"requests": self.requests, "tokens": self.input_tokens + self.output_tokens,
                    "cost": round(self.prices.cost(self.input_tokens, self.output_tokens), 4)}[budget]
        return BudgetReached(budget, limit, used)
