"""`Stats`: a frozen snapshot of a pool's counters at one moment, and `Percentiles`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Percentiles", "Stats"]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """A distribution of durations in seconds (streaming estimate, within 1%).

    Attributes:
        count: how many durations were measured (each attempt while the pool is small;
            beyond the first 1,024 items, every 64th item, which keeps the hot path cheap).
        p50, p90, p99: the quantiles; None when nothing was measured yet.
        max: the longest measured duration; None when nothing was measured.
    """

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """A pool's counters at one moment (``pool.stats``, ``report.stats``).

    Every accepted item not settled yet is in exactly one of ``queued``, ``in_flight``,
    ``waiting_retry``, ``limited`` and ``parked``: together they are ``outstanding``.

    Attributes:
        submitted: items accepted (from ``items``, or ``submit()``).
        succeeded: items settled as ``Succeeded``.
        failed: items settled as ``Failed``.
        unfinished: items settled as ``Unfinished`` (the pool stopped first).
        retried: attempts that failed and were scheduled again.
        attempts: attempts started, retries included.
        in_flight: attempts running now.
        queued: accepted items waiting for a worker (in the work channel).
        waiting_retry: items waiting for their backoff to pass.
        limited: items a worker holds while it waits for a limit (``limiter``, ``adaptive``,
            ``rate``) before the attempt can start.
        parked: items parked by a ``per_key`` limit until their key has room.
        elapsed: seconds since the pool started (trio's clock).
        recent_throughput: items settled per second over the pool's recent window (10 s),
            or None in a snapshot that did not measure it; see :attr:`throughput`.
        queue_wait: time from entering the work channel (or re-entering it for a retry)
            to being taken by a worker.
        attempt_latency: time one attempt of the task function took (limits excluded).
        adaptive_limit: the current value of the pool's ``adaptive`` limit, or None.
    """

    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    unfinished: int = 0
    retried: int = 0
    attempts: int = 0
    in_flight: int = 0
    queued: int = 0
    waiting_retry: int = 0
    elapsed: float = 0.0
    limited: int = 0
    parked: int = 0
    recent_throughput: float | None = None
    queue_wait: Percentiles = field(default_factory=Percentiles)
    attempt_latency: Percentiles = field(default_factory=Percentiles)
    adaptive_limit: int | None = None

    @property
    def settled(self) -> int:
        """Items settled so far: succeeded + failed + unfinished."""
        return self.succeeded + self.failed + self.unfinished

    @property
    def outstanding(self) -> int:
        """Items accepted and not settled yet."""
        return self.submitted - self.settled

    @property
    def throughput(self) -> float:
        """Items settled per second: over the recent window when measured, else overall."""
        if self.recent_throughput is not None:
            return self.recent_throughput
        return self.overall_throughput

    @property
    def overall_throughput(self) -> float:
        """Items settled per second since the pool started."""
        return self.settled / self.elapsed if self.elapsed > 0 else 0.0
