"""Admission budgets counted in units other than crops: request-body bytes in flight, decoded pixels held.

The pixel budget is reserved image by image as each starts decoding, from its header (an upper bound), and
shrunk to its working copy once decoded (`Reservation.shrink`): a request holds its working copies and at
most its decode share of headers, never all of its images' at once. All is released when the request settles.

A budget is a counter with a bound; `reserve` either takes the whole amount or refuses with 429
(`Overloaded`, with `Retry-After`), never blocks. One amount larger than the whole bound is still
admitted when nothing else is held, so a single legal image can always run on an idle server (the
per-image limits bound it). Everything runs on the event loop; no locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.core.errors import Overloaded


@dataclass
class Budget:
    """`limit` units in all; `held` now. `what` names the unit in the 429's message."""

    limit: int
    what: str
    retry_after_s: int = 1
    held: int = 0
    peak: int = field(default=0, repr=False)

    def check_room(self, amount: int) -> None:
        """429 unless `amount` more would fit now (or nothing is held): a check, nothing is taken."""
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount ({amount})")
        if self.held > 0 and self.held + amount > self.limit:
            raise Overloaded(f"the server holds too many {self.what} in flight ({self.held} of {self.limit}); "
                             "retry later", headers={"Retry-After": str(self.retry_after_s)})

    def reserve(self, amount: int) -> Reservation:
        self.check_room(amount)
        self.held += amount
        self.peak = max(self.peak, self.held)
        return Reservation(self, amount)


class Reservation:
    """What one request holds of a budget; `grow` adds to it (a streamed body), `release` is idempotent."""

    def __init__(self, budget: Budget, amount: int) -> None:
        self.budget = budget
        self.amount = amount

    def grow(self, amount: int) -> None:
        budget = self.budget
        if budget.held + amount > budget.limit and budget.held > self.amount:  # others hold some too
            raise Overloaded(f"the server holds too many {budget.what} in flight ({budget.held} of "
                             f"{budget.limit}); retry later", headers={"Retry-After": str(budget.retry_after_s)})
        budget.held += amount
        budget.peak = max(budget.peak, budget.held)
        self.amount += amount

    def shrink(self, amount: int) -> None:
        """Give back `amount` of what is held: an upper bound reserved first, corrected once known."""
        if not 0 <= amount <= self.amount:
            raise ValueError(f"cannot give back {amount} of a reservation of {self.amount}")
        self.budget.held -= amount
        self.amount -= amount

    def release(self) -> None:
        self.budget.held -= self.amount
        self.amount = 0
