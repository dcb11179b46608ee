"""Retry policy units: backoff arithmetic, jitter bounds, retry_on forms, retry-after hints."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conveyor import Backoff, Retry, RetryAfter
from conveyor._retry import retry_after_hint


def test_exponential_capped_without_jitter() -> None:
    backoff = Backoff(initial=0.5, factor=3, max=10, jitter=None)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10, 10]
    assert Backoff(initial=1, jitter=None).delay(10_000) == 30.0  # no overflow
    assert Backoff(initial=100, jitter=None).max == 100


@given(st.integers(1, 50), st.floats(0, 5), st.floats(1, 4))
def test_jitter_bounds(retry: int, initial: float, factor: float) -> None:
    exact = Backoff(initial=initial, factor=factor, max=60, jitter=None).delay(retry)
    full = Backoff(initial=initial, factor=factor, max=60).delay(retry)
    equal = Backoff(initial=initial, factor=factor, max=60, jitter="equal").delay(retry)
    assert 0 <= full <= exact
    assert exact / 2 <= equal <= exact


def test_seeded_jitter_is_reproducible() -> None:
    a = Backoff(seed=7)
    b = Backoff(seed=7)
    assert [a.delay(n) for n in range(1, 10)] == [b.delay(n) for n in range(1, 10)]


def test_should_retry_counts_attempts_and_kinds() -> None:
    retry = Retry(attempts=3, retry_on=(ConnectionError, TimeoutError))
    assert retry.should_retry(ConnectionError(), 1)
    assert retry.should_retry(TimeoutError(), 2)
    assert not retry.should_retry(TimeoutError(), 3)
    assert not retry.should_retry(ValueError(), 1)
    assert not Retry(attempts=1).should_retry(ValueError(), 1)


def test_retry_after_hints() -> None:
    assert retry_after_hint(RetryAfter(2.5)) == 2.5
    err = ValueError()
    err.retry_after = 4  # type: ignore[attr-defined]
    assert retry_after_hint(err) == 4.0
    err.retry_after = "soon"  # type: ignore[attr-defined]
    assert retry_after_hint(err) is None
    err.retry_after = True  # type: ignore[attr-defined]
    assert retry_after_hint(err) is None
    assert Retry(backoff=None).delay(ValueError(), 1) == 0.0
    assert Retry(backoff=Backoff(initial=1, jitter=None)).delay(RetryAfter(9), 1) == 9.0


def test_retryable_false_is_never_retried() -> None:
    class Permanent(Exception):
        retryable = False

    retry = Retry(attempts=5)
    assert not retry.should_retry(Permanent(), 1)
    flagged = ValueError()
    flagged.retryable = False  # type: ignore[attr-defined]
    assert not Retry(attempts=5, retry_on=ValueError).should_retry(flagged, 1)
    assert retry.should_retry(ValueError(), 1)
