"""Streaming estimators with bounded memory and O(1) updates, for live stats.

`Quantiles`: a log-bucket histogram (the idea of DDSketch, Masson et al., VLDB 2019,
https://arxiv.org/abs/1908.10693). A positive value x goes to bucket ``ceil(log(x) / log(g))``
with ``g = (1 + a) / (1 - a)``; a bucket answers with the one value that is within relative
error ``a`` of everything it holds. With the default ``a = 1%`` and values clamped to
1 ns .. 1e9 s, there are at most ~2,100 buckets whatever the number of values, an insert is
one ``log`` and one dict update, and p50/p90/p99 are within 1% of the exact quantiles' values
(rank-exact: no interpolation between neighbours). No numpy.

`Throughput`: items per second over a recent window, from (time, count) samples taken when
someone looks (a stats read, a progress tick), so the hot path pays nothing for it.
"""

from __future__ import annotations

import math
from collections import deque
from math import ceil, log

__all__ = ["Quantiles", "Throughput"]


class Quantiles:
    """Streaming quantiles of non-negative values (latencies, waits), bounded memory.

    Args:
        accuracy: relative error of the answers, 0 < accuracy < 1 (default 1%).
        smallest: values at or below this (seconds) count as zero.
        largest: values above this are counted as this.
    """

    __slots__ = (
        "_buckets",
        "_count",
        "_gamma",
        "_inv_log_gamma",
        "_max",
        "_max_index",
        "_min",
        "_smallest",
        "_sum",
        "_zeros",
    )

    def __init__(
        self, accuracy: float = 0.01, smallest: float = 1e-9, largest: float = 1e9
    ) -> None:
        if not 0 < accuracy < 1:
            raise ValueError(f"accuracy must be in (0, 1), got {accuracy!r}")
        if not 0 < smallest < largest:
            raise ValueError(f"need 0 < smallest < largest, got {smallest!r}, {largest!r}")
        self._gamma = (1 + accuracy) / (1 - accuracy)
        self._inv_log_gamma = 1 / math.log(self._gamma)
        self._smallest = smallest
        self._max_index = math.ceil(math.log(largest) * self._inv_log_gamma)
        self._buckets: dict[int, int] = {}
        self._zeros = 0
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    def add(self, value: float) -> None:
        """Count one value. O(1)."""
        self._count += 1
        self._sum += value
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value
        if value <= self._smallest:
            self._zeros += 1
            return
        index = ceil(log(value) * self._inv_log_gamma)
        if index > self._max_index:
            index = self._max_index
        buckets = self._buckets
        buckets[index] = buckets.get(index, 0) + 1

    def merge(self, other: Quantiles) -> None:
        """Add every value ``other`` counted (same accuracy and range)."""
        if other._gamma != self._gamma or other._max_index != self._max_index:
            raise ValueError("can only merge Quantiles of the same accuracy and range")
        for index, n in other._buckets.items():
            self._buckets[index] = self._buckets.get(index, 0) + n
        self._zeros += other._zeros
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    @property
    def count(self) -> int:
        """How many values were added."""
        return self._count

    @property
    def mean(self) -> float | None:
        """The exact mean, or None if empty."""
        return self._sum / self._count if self._count else None

    @property
    def min(self) -> float | None:
        """The exact smallest value, or None if empty."""
        return self._min if self._count else None

    @property
    def max(self) -> float | None:
        """The exact largest value, or None if empty."""
        return self._max if self._count else None

    @property
    def buckets(self) -> int:
        """Buckets in use (memory; at most ~2,100 with the defaults)."""
        return len(self._buckets) + (1 if self._zeros else 0)

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` (0..1), within the relative accuracy; None if empty."""
        return self.quantiles(q)[0]

    def quantiles(self, *qs: float) -> tuple[float | None, ...]:
        """Several quantiles in one pass over the buckets (qs in any order)."""
        for q in qs:
            if not 0 <= q <= 1:
                raise ValueError(f"quantile must be within 0..1, got {q!r}")
        if not self._count:
            return tuple(None for _ in qs)
        # The value of rank floor(q * (n - 1)) among the n sorted values: the "lower" method.
        wanted = sorted((math.floor(q * (self._count - 1)), i) for i, q in enumerate(qs))
        answers: list[float] = [0.0] * len(qs)
        k = 0
        seen = self._zeros
        while k < len(wanted) and wanted[k][0] < seen:
            answers[wanted[k][1]] = max(self._min, 0.0)  # a value <= smallest
            k += 1
        gamma = self._gamma
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            while k < len(wanted) and wanted[k][0] < seen:
                estimate = 2 * gamma**index / (gamma + 1)
                answers[wanted[k][1]] = min(max(estimate, self._min), self._max)
                k += 1
            if k == len(wanted):
                break
        # The extremes are known exactly: answer them exactly.
        last = self._count - 1
        for rank, i in wanted:
            if rank == 0:
                answers[i] = self._min
            elif rank == last:
                answers[i] = self._max
        return tuple(answers)


class Throughput:
    """Items per second over the last ``window`` seconds, from samples of a running count.

    Call :meth:`observe` with the time and the count so far whenever you look; it keeps at
    most ~``resolution`` samples. Until the pool has run a whole window, the rate is over
    the time since the first sample.
    """

    __slots__ = ("_samples", "_spacing", "window")

    def __init__(self, window: float = 10.0, resolution: int = 20) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        self.window = window
        self._spacing = window / resolution
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, count: int) -> float:
        """Record (now, count) and return the rate over the recent window."""
        samples = self._samples
        if not samples or now - samples[-1][0] >= self._spacing:
            samples.append((now, count))
        # Keep one sample at or before the window's start as the base.
        while len(samples) >= 2 and samples[1][0] <= now - self.window:
            samples.popleft()
        t0, c0 = samples[0]
        if now <= t0:
            return 0.0
        return (count - c0) / (now - t0)
