"""Retry policy: how many attempts, which errors deserve another one, and how long to wait.

A failed attempt that the policy retries is handed to the pool's retry scheduler, which
resends the item over the work channel once its delay has passed; no worker waits for it.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ._options import check_sync_callable, describe_callable

__all__ = ["Backoff", "Retry", "RetryAfter", "retry_after_hint"]

logger = logging.getLogger("conveyor")

# The cap on retry-after hints when there is no backoff to take it from (Retry(backoff=None)).
DEFAULT_MAX_RETRY_AFTER = 30.0

Jitter = Literal["full", "equal"] | None


class RetryAfter(Exception):
    """Raise this from a task to ask for a retry after ``delay`` seconds.

    It overrides the backoff for that retry, e.g. for an HTTP 429 or 503 with a
    ``Retry-After`` header. Any other exception with a numeric ``retry_after`` attribute
    is honoured the same way. Whether the error is retried at all is still decided by
    ``Retry.retry_on`` and ``Retry.attempts``, and the delay is capped by
    ``Retry.max_retry_after``.
    """

    def __init__(self, delay: float, message: str = "") -> None:
        _check_number("RetryAfter delay", delay, "a finite number of seconds >= 0",
                      lambda v: v >= 0)
        if not isinstance(message, str):
            raise TypeError(f"RetryAfter message must be a str, got {message!r:.60}")
        super().__init__(message or f"retry after {delay} s")
        self.retry_after = float(delay)


def retry_after_hint(error: BaseException) -> float | None:
    """The retry-after delay an exception carries (its ``retry_after`` attribute), or None.

    A number (not a bool, not NaN); negative counts as 0 and ``inf`` stays ``inf`` (the
    retry policy cuts it to its ``max_retry_after``).
    """
    try:
        hint = getattr(error, "retry_after", None)
    except Exception:  # a property of the user's exception class that raises: no hint
        return None
    if isinstance(hint, bool) or not isinstance(hint, int | float):
        return None
    try:
        hint = float(hint)
    except OverflowError:  # an int too large for a float
        return math.inf if hint > 0 else 0.0
    if math.isnan(hint):
        return None
    return max(0.0, hint)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with a cap and jitter.

    The n-th retry (n = 1 for the first) waits ``min(max, initial * factor ** (n - 1))``
    seconds, then jitter spreads it: ``"full"`` (the default) draws uniformly from
    ``[0, delay]``, ``"equal"`` from ``[delay / 2, delay]``, ``None`` keeps it exact.
    Full jitter keeps many items that failed together from retrying together
    (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).

    Args:
        initial: delay before the first retry, seconds (a finite number >= 0).
        factor: growth per retry (a finite number >= 1).
        max: cap on any one delay, seconds (a finite number >= initial; default 30 s, or
            ``initial`` if that is larger).
        jitter: ``"full"``, ``"equal"`` or None.
        seed: seed of this policy's random source (an int or None), for reproducible
            delays.
    """

    initial: float = 0.1
    factor: float = 2.0
    max: float | None = None  # None: 30 s, or initial if that is larger
    jitter: Jitter = "full"
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number("Backoff initial", self.initial, "a finite number of seconds >= 0",
                      lambda v: v >= 0)
        _check_number("Backoff factor", self.factor, "a finite number >= 1", lambda v: v >= 1)
        if self.max is None:
            object.__setattr__(self, "max", max(30.0, self.initial))
        _check_number(
            "Backoff max", self.max, f"a finite number of seconds >= initial ({self.initial})",
            lambda v: v >= self.initial,
        )
        if not (self.jitter is None or (isinstance(self.jitter, str)
                                        and self.jitter in ("full", "equal"))):
            raise ValueError(f"Backoff jitter must be 'full', 'equal' or None, got {self.jitter!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise TypeError(f"Backoff seed must be an int or None, got {self.seed!r:.60}")
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1 for the first retry), for every int."""
        cap = float(self.max) if self.max is not None else math.inf
        delay = _grown(float(self.initial), float(self.factor), max(0, retry - 1), cap)
        if self.jitter == "full":
            return self._rng.uniform(0.0, delay)
        if self.jitter == "equal":
            return self._rng.uniform(delay / 2, delay)
        return delay


def _grown(initial: float, factor: float, exponent: int, cap: float) -> float:
    """``min(cap, initial * factor ** exponent)``, exact where it can be, never overflowing."""
    if initial == 0 or factor == 1 or exponent == 0:
        return min(cap, initial)
    # initial > 0, factor > 1: compare in log space first, the power may be too big for a float.
    log_delay = math.log(initial) + exponent * math.log(factor)
    if log_delay >= math.log(cap):
        return cap
    try:
        return min(cap, initial * factor**exponent)
    except OverflowError:  # a tiny initial times a huge power, still below the cap
        return min(cap, math.exp(log_delay))


RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]


@dataclass(frozen=True, slots=True)
class Retry:
    """How an item is retried.

    Args:
        attempts: the total number of attempts per item, the first included (>= 1).
            Counted per item, never shared between items.
        backoff: the delay between attempts; None resends a failed item at once.
        retry_on: which errors deserve another attempt: an exception class, a tuple of them,
            or a predicate ``f(exc) -> bool`` (a plain function: an ``async def`` is
            refused). Errors it rejects fail at once. The default retries every
            :class:`Exception`. An exception whose ``retryable`` attribute is ``False``
            (e.g. :class:`conveyor.NotPicklableError`: it would fail the same way every
            time) is never retried. ``BaseException`` that is not an ``Exception``
            (``KeyboardInterrupt``, ``trio.Cancelled``...) is never retried. If the
            predicate raises (or returns an awaitable), the item is not retried: it fails
            with its own error, and a note on that error shows what the predicate raised.
        max_retry_after: the longest a retry-after hint (:class:`RetryAfter`, or an
            error's ``retry_after`` attribute) may make an item wait, in seconds (a finite
            number >= 0). A longer hint is cut to it, with a WARNING on the ``"conveyor"``
            logger naming the hint and the cap. Default: the backoff's ``max`` (30 s
            unless set), or 30 s with ``backoff=None``.
        budget: the total time an item may take, in seconds (a finite number > 0, or None
            for no limit), counted on trio's clock from the start of its first attempt:
            its attempts and the waits between them. An attempt still running when the
            budget ends is cut with :class:`conveyor.AttemptTimeout`; a retry that would
            start after it is not made, and the item fails with its last error (a note on
            it says why). Like tenacity's ``stop_after_delay`` and stamina's ``timeout``.
    """

    attempts: int = 3
    backoff: Backoff | None = field(default_factory=Backoff)
    retry_on: RetryOn = Exception
    max_retry_after: float | None = None
    budget: float | None = None
    _check: Callable[[Exception], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"Retry attempts must be an int >= 1, got {self.attempts!r:.60}")
        if self.attempts < 1:
            raise ValueError(f"Retry attempts must be >= 1 (the first attempt counts), "
                             f"got {self.attempts}")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise TypeError(f"Retry backoff must be a conveyor.Backoff or None, "
                            f"got {self.backoff!r:.60}")
        if self.max_retry_after is None:
            cap = DEFAULT_MAX_RETRY_AFTER if self.backoff is None else self.backoff.max
            object.__setattr__(self, "max_retry_after", cap)
        else:
            _check_number("Retry max_retry_after", self.max_retry_after,
                          "a finite number of seconds >= 0 (or None: the backoff's max)",
                          lambda v: v >= 0)
        if self.budget is not None:
            _check_number("Retry budget", self.budget,
                          "a finite number of seconds > 0 (or None: no limit)", lambda v: v > 0)
        object.__setattr__(self, "_check", _predicate(self.retry_on))

    def should_retry(self, error: Exception, attempts: int) -> bool:
        """Whether an item that failed with ``error`` after ``attempts`` attempts goes again.

        Never raises for a ``retry_on`` predicate that does: the answer is then no, and a
        note on ``error`` (shown in ``Failed.traceback``) says what the predicate raised.
        """
        if attempts >= self.attempts or getattr(error, "retryable", True) is False:
            return False
        try:
            return self._check(error)
        except Exception as predicate_error:
            _note_predicate_error(error, "retry_on", self.retry_on, predicate_error)
            return False

    def delay(self, error: Exception, attempts: int) -> float:
        """Seconds to wait before the next attempt: the error's hint (capped at
        ``max_retry_after``), else the backoff."""
        hint = retry_after_hint(error)
        if hint is not None:
            cap = self.max_retry_after
            assert cap is not None  # set in __post_init__
            if hint > cap:
                logger.warning(
                    "retry-after hint of %g s (%s: %s) cut to max_retry_after=%g s",
                    hint, type(error).__name__, error, cap,
                )
                return float(cap)
            return hint
        if self.backoff is None:
            return 0.0
        return self.backoff.delay(attempts)


def _note_predicate_error(
    error: BaseException, option: str, predicate: object, predicate_error: Exception
) -> None:
    """Record on ``error`` that the user's ``option`` predicate raised ``predicate_error``."""
    shown = "".join(traceback.format_exception(predicate_error, chain=False)).rstrip()
    error.add_note(
        f"conveyor: the {option} predicate {describe_callable(predicate)!r} raised on this "
        f"error ({type(predicate_error).__name__}: {predicate_error}), so it was not "
        f"retried:\n{shown}"
    )


def _predicate(retry_on: RetryOn) -> Callable[[Exception], bool]:
    valid = "exception classes or a predicate f(exc) -> bool"
    if isinstance(retry_on, type):
        if not issubclass(retry_on, BaseException):
            raise TypeError(f"Retry retry_on must be {valid}, got the class {retry_on.__name__}")
        kinds: type[BaseException] | tuple[type[BaseException], ...] = retry_on
    elif isinstance(retry_on, tuple):
        if not retry_on:
            raise ValueError(f"Retry retry_on must be {valid}, got an empty tuple "
                             f"(for no retries: Retry(attempts=1) or retry=None)")
        for kind in retry_on:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise TypeError(f"Retry retry_on must be {valid}, got {kind!r:.60} in the tuple")
        kinds = retry_on
    else:
        check_sync_callable("Retry retry_on", retry_on, valid)
        return plain_predicate(retry_on, "retry_on")

    def is_kind(error: Exception) -> bool:
        return isinstance(error, kinds)

    return is_kind


def plain_predicate(predicate: Callable[[Exception], object], option: str
                     ) -> Callable[[Exception], bool]:
    """``bool(predicate(error))``, refusing an awaitable answer (an async function in
    disguise, e.g. a lambda around an ``async def``), which would count as true."""

    def check(error: Exception) -> bool:
        answer = predicate(error)
        if answer is True or answer is False:
            return answer
        if inspect.isawaitable(answer):
            close = getattr(answer, "close", None)
            if close is not None:
                close()  # no "coroutine was never awaited" warning
            raise TypeError(
                f"the {option} predicate returned an awaitable ({type(answer).__name__}), "
                f"not a bool: it must be a plain function that answers at once"
            )
        return bool(answer)

    return check


def _check_number(
    name: str, value: object, valid: str, ok: Callable[[float], bool]
) -> None:
    """``value`` is an int or float (not a bool), finite, and ``ok``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {valid}, got {value!r:.60}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be {valid}, got {value!r:.60}") from None
    if not math.isfinite(number) or not ok(number):
        raise ValueError(f"{name} must be {valid}, got {value!r:.60}")
