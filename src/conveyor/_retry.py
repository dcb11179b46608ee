"""Retry policy: how many attempts, which errors deserve another one, and how long to wait.

A failed attempt that the policy retries is handed to the pool's retry scheduler, which
resends the item over the work channel once its delay has passed; no worker waits for it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Backoff", "Retry", "RetryAfter", "retry_after_hint"]

Jitter = Literal["full", "equal"] | None


class RetryAfter(Exception):
    """Raise this from a task to ask for a retry after ``delay`` seconds.

    It overrides the backoff for that retry, e.g. for an HTTP 429 or 503 with a
    ``Retry-After`` header. Any other exception with a numeric ``retry_after`` attribute
    is honoured the same way. Whether the error is retried at all is still decided by
    ``Retry.retry_on`` and ``Retry.attempts``.
    """

    def __init__(self, delay: float, message: str = "") -> None:
        if not (isinstance(delay, int | float) and math.isfinite(delay) and delay >= 0):
            raise ValueError(f"RetryAfter delay must be a finite number >= 0, got {delay!r}")
        super().__init__(message or f"retry after {delay} s")
        self.retry_after = float(delay)


def retry_after_hint(error: BaseException) -> float | None:
    """The retry-after delay an exception carries (its ``retry_after`` attribute), or None."""
    hint = getattr(error, "retry_after", None)
    if isinstance(hint, int | float) and not isinstance(hint, bool) and math.isfinite(hint):
        return max(0.0, float(hint))
    return None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with a cap and jitter.

    The n-th retry (n = 1 for the first) waits ``min(max, initial * factor ** (n - 1))``
    seconds, then jitter spreads it: ``"full"`` (the default) draws uniformly from
    ``[0, delay]``, ``"equal"`` from ``[delay / 2, delay]``, ``None`` keeps it exact.
    Full jitter keeps many items that failed together from retrying together
    (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).

    Args:
        initial: delay before the first retry, seconds (>= 0).
        factor: growth per retry (>= 1).
        max: cap on any one delay, seconds (>= initial; default 30 s, or ``initial``
            if that is larger).
        jitter: ``"full"``, ``"equal"`` or None.
        seed: seed of this policy's random source, for reproducible delays.
    """

    initial: float = 0.1
    factor: float = 2.0
    max: float | None = None  # None: 30 s, or initial if that is larger
    jitter: Jitter = "full"
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number("Backoff initial", self.initial, "a number >= 0", lambda v: v >= 0)
        _check_number("Backoff factor", self.factor, "a number >= 1", lambda v: v >= 1)
        if self.max is None:
            object.__setattr__(self, "max", max(30.0, self.initial))
        _check_number(
            "Backoff max", self.max, f"a number >= initial ({self.initial})",
            lambda v: v >= self.initial,
        )
        if self.jitter not in ("full", "equal", None):
            raise ValueError(f"Backoff jitter must be 'full', 'equal' or None, got {self.jitter!r}")
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1 for the first retry)."""
        exponent = max(0, retry - 1)
        try:
            raw = self.initial * self.factor**exponent
        except OverflowError:
            raw = math.inf
        cap = self.max if self.max is not None else math.inf
        delay = min(cap, raw)
        if self.jitter == "full":
            return self._rng.uniform(0.0, delay)
        if self.jitter == "equal":
            return self._rng.uniform(delay / 2, delay)
        return delay


RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]


@dataclass(frozen=True, slots=True)
class Retry:
    """How an item is retried.

    Args:
        attempts: the total number of attempts per item, the first included (>= 1).
            Counted per item, never shared between items.
        backoff: the delay between attempts; None resends a failed item at once.
        retry_on: which errors deserve another attempt: an exception class, a tuple of them,
            or a predicate ``f(exc) -> bool``. Errors it rejects fail at once. The default
            retries every :class:`Exception`. An exception whose ``retryable`` attribute is
            ``False`` (e.g. :class:`conveyor.NotPicklableError`: it would fail the same way
            every time) is never retried. ``BaseException`` that is not an
            ``Exception`` (``KeyboardInterrupt``, ``trio.Cancelled``...) is never retried.
    """

    attempts: int = 3
    backoff: Backoff | None = field(default_factory=Backoff)
    retry_on: RetryOn = Exception
    _check: Callable[[Exception], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"Retry attempts must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"Retry attempts must be >= 1 (the first attempt counts), "
                             f"got {self.attempts}")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise TypeError(f"Retry backoff must be a conveyor.Backoff or None, "
                            f"got {self.backoff!r}")
        object.__setattr__(self, "_check", _predicate(self.retry_on))

    def should_retry(self, error: Exception, attempts: int) -> bool:
        """Whether an item that failed with ``error`` after ``attempts`` attempts goes again."""
        return (
            attempts < self.attempts
            and getattr(error, "retryable", True) is not False
            and self._check(error)
        )

    def delay(self, error: Exception, attempts: int) -> float:
        """Seconds to wait before the next attempt: the error's hint, else the backoff."""
        hint = retry_after_hint(error)
        if hint is not None:
            return hint
        if self.backoff is None:
            return 0.0
        return self.backoff.delay(attempts)


def _predicate(retry_on: RetryOn) -> Callable[[Exception], bool]:
    if isinstance(retry_on, type):
        if not issubclass(retry_on, BaseException):
            raise TypeError(f"Retry retry_on must be exception classes or a predicate, "
                            f"got the class {retry_on.__name__}")
        kinds: type[BaseException] | tuple[type[BaseException], ...] = retry_on
    elif isinstance(retry_on, tuple):
        for kind in retry_on:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise TypeError(f"Retry retry_on must be exception classes or a predicate, "
                                f"got {kind!r} in the tuple")
        kinds = retry_on
    elif callable(retry_on):
        predicate = retry_on

        def check(error: Exception) -> bool:
            return bool(predicate(error))

        return check
    else:
        raise TypeError(f"Retry retry_on must be exception classes or a predicate, "
                        f"got {retry_on!r}")

    def is_kind(error: Exception) -> bool:
        return isinstance(error, kinds)

    return is_kind


def _check_number(
    name: str, value: object, valid: str, ok: Callable[[float], bool]
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    if math.isnan(value) or not ok(value):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
