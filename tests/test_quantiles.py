"""Streaming estimators: accuracy against exact quantiles, bounded memory, edge cases."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor._quantiles import Quantiles, Throughput


def exact(values: list[float], q: float) -> float:
    """The "lower" quantile: the value of rank floor(q * (n - 1))."""
    return sorted(values)[math.floor(q * (len(values) - 1))]


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.floats(min_value=1e-6, max_value=1e4), min_size=1, max_size=500),
    st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
)
def test_quantile_within_relative_accuracy_of_the_exact_one(values: list[float], q: float) -> None:
    estimator = Quantiles(accuracy=0.01)
    for value in values:
        estimator.add(value)
    got = estimator.quantile(q)
    assert got is not None
    want = exact(values, q)
    assert abs(got - want) <= 0.01 * want * (1 + 1e-9)


def test_extremes_are_exact_and_mean_count_are_exact() -> None:
    estimator = Quantiles()
    for value in [0.25, 3.0, 0.001, 7.5]:
        estimator.add(value)
    assert estimator.quantiles(0.0, 1.0) == (0.001, 7.5)
    assert estimator.count == 4
    assert estimator.mean == pytest.approx((0.25 + 3.0 + 0.001 + 7.5) / 4)
    assert (estimator.min, estimator.max) == (0.001, 7.5)


def test_memory_is_bounded_whatever_the_number_and_range_of_values() -> None:
    estimator = Quantiles()
    rng = random.Random(7)
    for _ in range(200_000):
        estimator.add(10 ** rng.uniform(-12, 12))  # beyond the clamped range on both sides
    assert estimator.count == 200_000
    # ln(1e9 / 1e-9) / ln(1.01 / 0.99) ~ 2072 buckets at most, plus the zero bucket.
    assert estimator.buckets <= 2075
    p50, p99 = estimator.quantiles(0.5, 0.99)
    assert p50 is not None and p99 is not None
    assert 0.5 < p50 < 2  # log-uniform over 1e-12..1e12: the median is near 1


def test_zero_and_tiny_values_land_in_the_zero_bucket() -> None:
    estimator = Quantiles()
    for _ in range(9):
        estimator.add(0.0)
    estimator.add(2.0)
    assert estimator.quantiles(0.5, 0.9, 1.0) == (0.0, 0.0, 2.0)


def test_several_quantiles_in_any_order_and_empty() -> None:
    estimator = Quantiles()
    assert estimator.quantiles(0.5, 0.99) == (None, None)
    assert estimator.mean is None and estimator.min is None
    for i in range(1, 101):
        estimator.add(float(i))
    p99, p50 = estimator.quantiles(0.99, 0.5)
    assert p99 == pytest.approx(99, rel=0.01)
    assert p50 == pytest.approx(50, rel=0.01)


def test_merge_is_the_same_as_adding_everything_to_one() -> None:
    rng = random.Random(3)
    values = [rng.expovariate(10) for _ in range(5000)]
    one, a, b = Quantiles(), Quantiles(), Quantiles()
    for i, value in enumerate(values):
        one.add(value)
        (a if i % 2 else b).add(value)
    a.merge(b)
    assert a.quantiles(0.5, 0.9, 0.99) == one.quantiles(0.5, 0.9, 0.99)
    assert a.count == one.count
    with pytest.raises(ValueError, match="same accuracy"):
        a.merge(Quantiles(accuracy=0.05))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accuracy": 0}, r"accuracy must be in \(0, 1\), got 0"),
        ({"accuracy": 1.5}, r"accuracy must be in \(0, 1\)"),
        ({"smallest": 2.0, "largest": 1.0}, r"need 0 < smallest < largest"),
    ],
)
def test_quantiles_refuse_bad_input(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Quantiles(**kwargs)


def test_quantile_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"quantile must be within 0..1, got 1.5"):
        Quantiles().quantile(1.5)


def test_throughput_is_over_the_recent_window_not_since_the_start() -> None:
    meter = Throughput(window=10.0)
    count = 0
    rate = 0.0
    for tick in range(1, 301):  # 30 s at 100/s, observed every 0.1 s
        count += 10
        rate = meter.observe(tick / 10, count)
    assert rate == pytest.approx(100)
    for tick in range(301, 501):  # then 20 s at 10/s
        count += 1
        rate = meter.observe(tick / 10, count)
    assert rate == pytest.approx(10, rel=0.06)  # the window holds only the slow part now
    assert len(meter._samples) <= 22  # bounded: ~window / spacing samples


def test_throughput_before_a_whole_window_is_since_the_first_sample() -> None:
    meter = Throughput(window=10.0)
    assert meter.observe(0.0, 0) == 0.0
    assert meter.observe(2.0, 50) == 25.0
    with pytest.raises(ValueError, match=r"window must be > 0"):
        Throughput(window=0)
