"""∫ value dt of a figure that only moves at known events: the exact time-average over any window.

A gauge scraped every few seconds sees the queue at a few instants. Its time integral, closed at every
event that can move the figure, sees all of it: the figure's time-average over a window [t0, t1] is
(total(t1) − total(t0)) / (t1 − t0), which is what PromQL's `increase(integral[w]) / w` computes from
the exported counter. The owner calls `changed()` after each such event, under the lock that guards
the figure, so a piece never straddles a change.
"""

from __future__ import annotations

from collections.abc import Callable


class TimeIntegral:
    """The integral of `read()` over `clock()` time, for a piecewise-constant, non-negative figure."""

    def __init__(self, read: Callable[[], float], clock: Callable[[], float]) -> None:
        self._read = read
        self._clock = clock
        self._since = clock()  # start of the open piece
        self._value = read()  # the figure's value over the open piece
        self._closed = 0.0  # the integral up to `_since`

    def changed(self) -> None:
        """The figure may have moved just now: close the open piece at its old value, start one at the new."""
        now = self._clock()
        self._closed += self._value * (now - self._since)
        self._since = now
        self._value = self._read()

    def total(self) -> float:
        """The integral from construction until now (the open piece counted up to now); never decreases."""
        return self._closed + self._value * (self._clock() - self._since)
