"""`Stats`: a frozen snapshot of a pool's counters at one moment."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stats"]


@dataclass(frozen=True, slots=True)
class Stats:
    """A pool's counters at one moment (``pool.stats``, ``report.stats``).

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
        elapsed: seconds since the pool started (trio's clock).
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
        """Items settled per second since the pool started."""
        return self.settled / self.elapsed if self.elapsed > 0 else 0.0
