"""conveyor.PrometheusMetrics: the series a pool leaves in a registry, read the ways Prometheus
reads them (a scrape from the trio thread, from another thread, after the run).

Counters are checked against the pool's own report (retries, give-ups and a cancel in one
run), histograms against exact durations on trio's virtual clock, labels per pool name, and
the bad arguments refused at the call, each with its suggested fix tried.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import conveyor

ROOT = Path(__file__).resolve().parents[1]
COUNTERS = {
    "conveyor_items_submitted_total": "submitted",
    "conveyor_items_succeeded_total": "succeeded",
    "conveyor_items_failed_total": "failed",
    "conveyor_items_unfinished_total": "unfinished",
    "conveyor_attempts_total": "attempts",
}
GAUGES = {
    "conveyor_items_in_flight": "in_flight",
    "conveyor_items_queued": "queued",
    "conveyor_items_waiting_retry": "waiting_retry",
    "conveyor_items_limited": "limited",
    "conveyor_items_parked": "parked",
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"pool": "pool", **labels})


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The exposition text parsed back, as Prometheus would read it."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Flaky:
    """Items 0-9: fine. 10-14: a ValueError on their first attempt, then fine. 15-16: a
    KeyError every time (retried, then given up). 17: a TypeError (not retried). 18-19:
    never end (Unfinished at the cancel). Each attempt takes 0.1 s."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    async def __call__(self, n: int) -> int:
        self.seen[n] = self.seen.get(n, 0) + 1
        await trio.sleep(0.1)
        if 10 <= n < 15 and self.seen[n] == 1:
            raise ValueError(f"first try of {n}")
        if n in (15, 16):
            raise KeyError(f"item {n}")
        if n == 17:
            raise TypeError("secret message 17")
        if n >= 18:
            await trio.sleep_forever()
        return n


RETRY = conveyor.Retry(attempts=3, backoff=conveyor.Backoff(initial=1, jitter=None),
                       retry_on=(ValueError, KeyError))


async def run_flaky(metrics: conveyor.PrometheusMetrics, name: str = "pool") -> conveyor.Report:
    """The Flaky items through a pool, cancelled after 10 s (18 and 19 still running)."""
    with trio.move_on_after(10):
        async with conveyor.open_pool(Flaky(), workers=5, retry=RETRY, name=name,
                                      observers=[metrics]) as pool:
            for n in range(20):
                await pool.submit(n)
    return pool.report()


# ---------------------------------------------------------------------------------------------
# Counters against the report


async def test_counters_equal_the_report_for_a_run_with_retries_give_ups_and_a_cancel(
    registry: CollectorRegistry, autojump_clock: Any
) -> None:
    metrics = conveyor.PrometheusMetrics(registry)
    report = await run_flaky(metrics)
    stats = report.stats
    assert (len(report.failed), len(report.unfinished)) == (3, 2)  # 15, 16, 17; 18, 19
    assert stats.submitted == 20 and stats.retried == 5 + 2 * 2
    for name, attribute in COUNTERS.items():
        assert value(registry, name) == getattr(stats, attribute), name
    assert value(registry, "conveyor_items_succeeded_total") == 15
    assert value(registry, "conveyor_items_failed_total") == len(report.failed)
    assert value(registry, "conveyor_items_unfinished_total") == len(report.unfinished)
    # Retries by exception type: 5 ValueErrors (items 10-14), 2 x 2 KeyErrors (15, 16);
    # the TypeError was not retried, so it is no retry.
    assert value(registry, "conveyor_retries_total", exception="ValueError") == 5
    assert value(registry, "conveyor_retries_total", exception="KeyError") == 4
    assert value(registry, "conveyor_retries_total", exception="TypeError") is None
    # The pool has ended: nothing in flight, queued or waiting any more.
    for name in GAUGES:
        assert value(registry, name) == 0, name
    assert value(registry, "conveyor_adaptive_limit") is None  # no adaptive limit


async def test_the_exposition_reads_back_with_the_same_values_and_bounded_labels(
    registry: CollectorRegistry, autojump_clock: Any
) -> None:
    metrics = conveyor.PrometheusMetrics(registry)
    report = await run_flaky(metrics, name="flaky")
    samples = scrape(registry)
    pool = ("pool", "flaky")
    assert samples[("conveyor_items_submitted_total", frozenset({pool}))] == 20
    assert samples[("conveyor_items_failed_total", frozenset({pool}))] == len(report.failed)
    assert samples[("conveyor_retries_total",
                    frozenset({pool, ("exception", "KeyError")}))] == 4
    # Label values are pool names and exception type names only: never an item or a message.
    labels = {label for _, ls in samples for label in ls if label[0] != "le"}
    assert labels == {pool, ("exception", "ValueError"), ("exception", "KeyError")}
    text = generate_latest(registry).decode()
    assert "secret message" not in text and "first try" not in text and "item 15" not in text


# ---------------------------------------------------------------------------------------------
# Histograms


async def test_histograms_count_every_attempt_with_its_duration_and_queue_wait(
    registry: CollectorRegistry, autojump_clock: Any
) -> None:
    """One worker, 4 items of 0.3 s each, item 1 failing once (retried after 1 s): 5
    attempts; durations all 0.3 s; queue waits 0, 0.3, 0.6, 0.9 for the first attempts and
    0 for the retry (it waited its backoff, not the queue: the worker was idle by then)."""
    seen: set[int] = set()

    async def work(n: int) -> int:
        await trio.sleep(0.3)
        if n == 1 and n not in seen:
            seen.add(n)
            raise ValueError("once")
        return n

    metrics = conveyor.PrometheusMetrics(
        registry, buckets=(0.1, 0.25, 0.5, 1.0))
    report = await conveyor.run(
        work, range(4), workers=1, buffer=4, observers=[metrics],
        retry=conveyor.Retry(attempts=2, backoff=conveyor.Backoff(initial=1, jitter=None)),
    )
    assert report.stats.attempts == 5
    duration = "conveyor_attempt_duration_seconds"
    assert value(registry, f"{duration}_count") == 5
    assert value(registry, f"{duration}_sum") == pytest.approx(5 * 0.3)
    assert value(registry, f"{duration}_bucket", le="0.25") == 0
    assert value(registry, f"{duration}_bucket", le="0.5") == 5
    assert value(registry, f"{duration}_bucket", le="+Inf") == 5
    wait = "conveyor_queue_wait_seconds"
    assert value(registry, f"{wait}_count") == 5
    assert value(registry, f"{wait}_sum") == pytest.approx(0 + 0.3 + 0.6 + 0.9 + 0)
    assert value(registry, f"{wait}_bucket", le="0.1") == 2  # item 0 and the retry
    assert value(registry, f"{wait}_bucket", le="0.5") == 3
    assert value(registry, f"{wait}_bucket", le="1.0") == 5


# ---------------------------------------------------------------------------------------------
# Labels: pools by name; the same name again


async def test_two_pools_with_different_names_get_separate_series(
    registry: CollectorRegistry, autojump_clock: Any
) -> None:
    metrics = conveyor.PrometheusMetrics(registry)

    async def ok(n: int) -> int:
        await trio.sleep(0.1)
        return n

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: conveyor.run(ok, range(7), name="a", observers=[metrics]))
        nursery.start_soon(lambda: conveyor.run(ok, range(3), name="b", observers=[metrics]))
    assert value(registry, "conveyor_items_succeeded_total", pool="a") == 7
    assert value(registry, "conveyor_items_succeeded_total", pool="b") == 3
    assert value(registry, "conveyor_attempt_duration_seconds_count", pool="a") == 7
    assert value(registry, "conveyor_attempt_duration_seconds_count", pool="b") == 3
    assert value(registry, "conveyor_items_succeeded_total", pool="pool") is None


async def test_a_name_used_again_accumulates_and_ended_pools_keep_their_final_values(
    registry: CollectorRegistry, autojump_clock: Any
) -> None:
    metrics = conveyor.PrometheusMetrics(registry)

    async def ok(n: int) -> int:
        await trio.sleep(0.1)
        return n

    await conveyor.run(ok, range(4), name="job", observers=[metrics])
    assert value(registry, "conveyor_items_succeeded_total", pool="job") == 4
    await conveyor.run(ok, range(6), name="job", observers=[metrics])
    assert value(registry, "conveyor_items_succeeded_total", pool="job") == 10
    assert value(registry, "conveyor_attempt_duration_seconds_count", pool="job") == 10


def test_final_values_stay_after_the_trio_run_has_ended(registry: CollectorRegistry) -> None:
    metrics = conveyor.PrometheusMetrics(registry)

    async def ok(n: int) -> int:
        await trio.lowlevel.checkpoint()
        return n

    trio.run(lambda: conveyor.run(ok, range(5), observers=[metrics]))
    assert value(registry, "conveyor_items_submitted_total") == 5
    assert value(registry, "conveyor_items_succeeded_total") == 5


# ---------------------------------------------------------------------------------------------
# Gauges and counters of a running pool, scraped from the trio thread and from another


async def test_a_running_pool_is_read_live_from_its_thread_and_from_another_thread(
    registry: CollectorRegistry,
) -> None:
    metrics = conveyor.PrometheusMetrics(registry)
    release = trio.Event()

    async def held(n: int) -> int:
        await release.wait()
        return n

    async with conveyor.open_pool(held, workers=3, name="held", observers=[metrics]) as pool:
        for n in range(10):
            await pool.submit(n)
        await pool.wait_stats(lambda s: s.in_flight == 3)
        here = scrape(registry)
        elsewhere = await trio.to_thread.run_sync(scrape, registry)  # a scraper's own thread
        for samples in (here, elsewhere):
            assert samples[("conveyor_items_in_flight", frozenset({("pool", "held")}))] == 3
            assert samples[("conveyor_items_queued", frozenset({("pool", "held")}))] == 7
            assert samples[("conveyor_items_submitted_total",
                            frozenset({("pool", "held")}))] == 10
            assert samples[("conveyor_items_succeeded_total",
                            frozenset({("pool", "held")}))] == 0
        release.set()
    assert value(registry, "conveyor_items_succeeded_total", pool="held") == 10
    assert value(registry, "conveyor_items_in_flight", pool="held") == 0


async def test_the_adaptive_limit_gauge_follows_the_pool_and_keeps_its_last_value(
    registry: CollectorRegistry, autojump_clock: Any
) -> None:
    metrics = conveyor.PrometheusMetrics(registry)
    seen: list[tuple[float | None, int | None]] = []

    async def work(n: int) -> int:
        seen.append((value(registry, "conveyor_adaptive_limit"), pool.stats.adaptive_limit))
        await trio.sleep(0.1)
        if n % 7 == 3:
            raise OSError("overloaded")  # halves the limit
        return n

    adaptive = conveyor.Adaptive(overload_on=OSError, min=2, max=8)
    async with conveyor.open_pool(work, workers=8, adaptive=adaptive,
                                  observers=[metrics]) as pool:
        for n in range(60):
            await pool.submit(n)
    assert len(seen) == 60 and all(gauge == limit for gauge, limit in seen), seen
    assert len({limit for _, limit in seen}) > 1  # it moved, and the gauge with it
    assert value(registry, "conveyor_adaptive_limit") == pool.report().stats.adaptive_limit


# ---------------------------------------------------------------------------------------------
# Registries: the default one, one passed, one taken already


def test_the_default_registry_is_used_when_none_is_passed() -> None:
    metrics = conveyor.PrometheusMetrics()
    try:
        assert metrics.registry is prometheus_client.REGISTRY
        trio.run(lambda: conveyor.run(_noop, range(3), name="default", observers=[metrics]))
        assert prometheus_client.REGISTRY.get_sample_value(
            "conveyor_items_succeeded_total", {"pool": "default"}) == 3
    finally:
        metrics.unregister()
    assert prometheus_client.REGISTRY.get_sample_value(
        "conveyor_items_succeeded_total", {"pool": "default"}) is None


async def _noop(n: int) -> int:
    return n


def test_a_second_metrics_on_one_registry_is_refused_and_each_suggested_fix_works(
    registry: CollectorRegistry,
) -> None:
    first = conveyor.PrometheusMetrics(registry)
    with pytest.raises(ValueError, match=r"^PrometheusMetrics: registry=.* is not valid: "
                       r"expected a registry without conveyor's series \(conveyor_.*another "
                       r"PrometheusMetrics.*\.unregister\(\).*"
                       r"e\.g\. registry=prometheus_client\.CollectorRegistry\(\)$"):
        conveyor.PrometheusMetrics(registry)
    conveyor.PrometheusMetrics(registry=prometheus_client.CollectorRegistry())  # fix: another
    first.unregister()  # fix: unregister the other first
    second = conveyor.PrometheusMetrics(registry)
    assert second.registry is registry


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"registry": "default"}, TypeError, r"^PrometheusMetrics: registry='default' is not "
                                             r"valid: expected a prometheus_client\."
                                             r"CollectorRegistry, or None"),
        ({"registry": prometheus_client.Counter}, TypeError, r"registry=.* is not valid"),
        ({"buckets": 1.0}, TypeError, r"buckets=1.0 is not valid: expected upper bounds.*"
                                      r"\(not a sequence\); "
                                      r"e\.g\. buckets=\(0\.01, 0\.1, 1, 10\)$"),
        ({"buckets": "0.1"}, TypeError, r"buckets='0.1' is not valid: .*\(not a sequence\)"),
        ({"buckets": ()}, ValueError, r"buckets=\(\) is not valid: .*\(empty\)"),
        ({"buckets": (0.1, True)}, TypeError, r"buckets=.*\(not all numbers \(a bool"),
        ({"buckets": (0.1, "1")}, TypeError, r"buckets=.*\(not all numbers"),
        ({"buckets": (0.1, math.nan)}, ValueError, r"buckets=.*\(not all finite and > 0"),
        ({"buckets": (0.1, math.inf)}, ValueError, r"\+Inf is always added"),
        ({"buckets": (0, 1)}, ValueError, r"buckets=.*\(not all finite and > 0"),
        ({"buckets": (-1, 1)}, ValueError, r"buckets=.*\(not all finite and > 0"),
        ({"buckets": (1, 0.5)}, ValueError, r"buckets=.*\(not strictly increasing\)"),
        ({"buckets": (1, 1)}, ValueError, r"buckets=.*\(not strictly increasing\)"),
    ],
)
def test_bad_arguments_are_refused_at_the_call(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    registry = kwargs.pop("registry", None) or CollectorRegistry()
    with pytest.raises(error, match=match):
        conveyor.PrometheusMetrics(registry, **kwargs)
    if "buckets" in kwargs:
        conveyor.PrometheusMetrics(registry, buckets=(0.01, 0.1, 1, 10))  # the example works


def test_positional_buckets_are_refused() -> None:
    with pytest.raises(TypeError):
        conveyor.PrometheusMetrics(CollectorRegistry(), (0.1, 1))  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Without prometheus_client


def test_without_prometheus_client_creating_metrics_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ImportError) as caught:
        conveyor.PrometheusMetrics()
    assert str(caught.value) == (
        "conveyor.PrometheusMetrics needs the prometheus_client package: "
        "pip install 'conveyor[prometheus]' (or pip install prometheus_client)"
    )
    assert caught.value.name == "prometheus_client"
    monkeypatch.undo()  # the fix: installed (as it is here), it works
    conveyor.PrometheusMetrics(CollectorRegistry())


def test_conveyor_imports_without_prometheus_client_and_does_not_import_it() -> None:
    code = (
        "import sys\n"
        "import conveyor\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "sys.modules['prometheus_client'] = None  # as if not installed\n"
        "import importlib; importlib.reload(conveyor)\n"
        "print(conveyor.PrometheusMetrics.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0 and done.stdout.strip() == "PrometheusMetrics", done.stderr
