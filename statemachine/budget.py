"""Run budgets: stop cleanly once a run has spent what it was allowed (retries count too).

Spending starts from the run's totals in the quota ledger (so a resumed run remembers it)
and adds what this process spends; the check happens before a request is recorded, so a run never
sends the request that would go over a request budget.
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
        super().__init__(f"{budget} budget reached: {used:g} of {limit:g}")
        self.budget = budget
        self.limit = limit
        self.used = used


class Spending:
    """Thread-safe running totals of one run, checked against its budgets."""

    def __init__(self, budgets: Budgets, prices: Prices, *, requests: int, input_tokens: int,
                 output_tokens: int) -> None:
        """The counts start at what the run spent before (its ledger rows)."""
        self.budgets = budgets
        self.prices = prices
        self._lock = threading.Lock()
        self.requests, self.input_tokens, self.output_tokens = requests, input_tokens, output_tokens

    def before_request(self) -> None:
        """Raise BudgetReached if one more request would go over a budget; else count it."""
        with self._lock:
            b = self.budgets
            if b.max_requests is not None and self.requests + 1 > b.max_requests:
                raise BudgetReached("requests", b.max_requests, self.requests)
            tokens = self.input_tokens + self.output_tokens
            if b.max_tokens is not None and tokens >= b.max_tokens:
                raise BudgetReached("tokens", b.max_tokens, tokens)
            cost = self.prices.cost(self.input_tokens, self.output_tokens)
            if b.max_cost is not None and cost >= b.max_cost:
                raise BudgetReached("cost", b.max_cost, round(cost, 4))
            self.requests += 1

    def release(self) -> None:
        """Un-count a request `before_request` counted but that was never sent."""
        with self._lock:
            self.requests -= 1

    def reached(self, budget: str, limit: float) -> BudgetReached:
        """`budget`'s stop as it stands now that the workers are done (sent requests only)."""
        with self._lock:
            used = {"requests": self.requests, "tokens": self.input_tokens + self.output_tokens,
                    "cost": round(self.prices.cost(self.input_tokens, self.output_tokens), 4)}[budget]
        return BudgetReached(budget, limit, used)

    def add(self, usage: Usage | None) -> None:
        if usage is not None:
            with self._lock:
                self.input_tokens += usage.input_tokens
                self.output_tokens += usage.output_tokens + usage.thoughts_tokens
