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

from ._errors import RetryAfter
from ._options import (
    check_callable,
    check_choice,
    check_count,
    check_number,
    check_seconds,
    check_type,
    describe_callable,
    invalid,
    show,
)

__all__ = ["Backoff", "Retry", "RetryAfter", "retry_after_hint"]

logger = logging.getLogger("conveyor")

# The cap on retry-after hints when there is no backoff to take it from (Retry(backoff=None)).
DEFAULT_MAX_RETRY_AFTER = 30.0

Jitter = Literal["full", "equal"] | None


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
        owner = "Backoff"
        check_seconds("initial", self.initial, minimum=0, owner=owner, example="initial=0.1")
        check_number("factor", self.factor, minimum=1, owner=owner, example="factor=2.0")
        if self.max is None:
            object.__setattr__(self, "max", max(30.0, self.initial))
        check_seconds("max", self.max, minimum=self.initial, owner=owner,
                      expected=f"a finite number of seconds >= initial ({self.initial})",
                      example=f"max={max(30.0, self.initial)!r}")
        check_choice("jitter", self.jitter, ("full", "equal", None), owner=owner)
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise invalid("seed", self.seed, "an int or None", "seed=42", owner=owner,
                          kind=TypeError)
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
        owner = "Retry"
        check_count("attempts", self.attempts, minimum=1, owner=owner,
                    expected="an int >= 1 (the first attempt counts)")
        check_type("backoff", self.backoff, Backoff, "a conveyor.Backoff or None",
                   _backoff_example(self.backoff), allow_none=True, owner=owner)
        if self.max_retry_after is None:
            cap = DEFAULT_MAX_RETRY_AFTER if self.backoff is None else self.backoff.max
            object.__setattr__(self, "max_retry_after", cap)
        else:
            check_seconds("max_retry_after", self.max_retry_after, minimum=0, owner=owner,
                          expected="a finite number of seconds >= 0 (or None: the "
                          "backoff's max)", example="max_retry_after=60.0")
        check_seconds("budget", self.budget, above=0, allow_none=True, owner=owner,
                      expected="a finite number of seconds > 0 (or None: no limit)",
                      example="budget=300.0")
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
    kinds = exception_classes("retry_on", retry_on, "Retry",
                              "retry_on=(TimeoutError, ConnectionError)")
    if kinds is None:
        return plain_predicate(retry_on, "retry_on")  # type: ignore[arg-type]

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


def _backoff_example(value: object) -> str:
    """``backoff=2`` suggests ``backoff=conveyor.Backoff(initial=2)``."""
    if type(value) in (int, float) and 0 <= value <= 3600:  # type: ignore[operator]
        return f"backoff=conveyor.Backoff(initial={value!r})"
    return "backoff=conveyor.Backoff(initial=1.0)"


def exception_classes(
    name: str, value: object, owner: str, example: str
) -> type[BaseException] | tuple[type[BaseException], ...] | None:
    """Check an option that takes an exception class, a tuple of them, or a plain predicate
    ``f(exc) -> bool`` (``Retry.retry_on``, ``Adaptive.overload_on``): the class or the
    tuple, or None for a predicate."""
    valid = "an exception class, a tuple of them, or a predicate f(exc) -> bool"
    if isinstance(value, type):
        if not issubclass(value, BaseException):
            raise invalid(name, value, f"{valid} ({value.__name__} is not an exception class)",
                          example, owner=owner, kind=TypeError)
        return value
    if isinstance(value, tuple):
        if not value:
            raise invalid(name, value, f"{valid}, not an empty tuple", example + (
                " (for no retries: retry=conveyor.Retry(attempts=1), or retry=None)"
                if name == "retry_on" else ""), owner=owner)
        for kind in value:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise invalid(name, value, f"{valid} ({show(kind)} in the tuple is not an "
                              f"exception class)", example, owner=owner, kind=TypeError)
        return value
    check_callable(name, value, valid, example, owner=owner)
    return None
