"""Prometheus metrics for pools: :class:`PrometheusMetrics`, an observer and a collector.

Install with ``pip install 'conveyor[prometheus]'`` (the official ``prometheus_client``).

How it is built, so that it costs little per item:

- **Counters and gauges cost nothing per item.** They are not counted here: the collector
  reads each running pool's :class:`~conveyor.Stats` (``PoolInfo.stats()``) when Prometheus
  scrapes, and the pool counts them anyway. A scrape from another thread (prometheus_client's
  HTTP server runs in one) asks the pool's trio thread for the snapshot
  (``trio.from_thread.run_sync``), because a pool's counters belong to its trio thread.
- **Per attempt**, only :meth:`~conveyor.Observer.attempt_ended`: two histogram
  observations (attempt duration, queue wait), each a ``bisect`` into the bucket bounds and
  two additions to a plain list, no lock (prometheus_client's own ``Histogram`` takes a lock
  and updates several objects per observation).
- **Per retry**, :meth:`~conveyor.Observer.retry_scheduled` counts it under its exception
  type's name (bounded: never the item, never the message).
- **Per pool**, :meth:`~conveyor.Observer.closed` folds the final counters (``report.stats``)
  into the pool name's totals.

Series are per pool name (the ``pool`` label; ``"pool"`` when the pool has no ``name=``).
A pool's series stay after it ends, at their final values; another pool with the same
name adds to the same counters and histograms (a job run twice counts both runs), and
the gauges are the sum over the running pools of that name.

Readers on other threads: a scrape copies the lists and dicts it reads (a copy of a list of
numbers or a dict of str is one step under the GIL), so it never sees a bucket count that
disagrees with the histogram's total.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import trio

from ._observe import Attempt, Observer, PoolInfo
from ._options import invalid
from ._stats import Stats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._records import Report

__all__ = ["DEFAULT_BUCKETS", "LABELS", "PrometheusMetrics"]

#: Bucket bounds (seconds) of both histograms, by default: from 1 ms to 5 minutes, for
#: attempts that are calls to services (and batch jobs' longer calls).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)

#: The labels of every series, in order. Pipelines will add ``"stage"`` here (and its value
#: in :func:`_label_values`), so that a stage's pool is told apart from another pipeline's.
LABELS: tuple[str, ...] = ("pool",)

_INSTALL = (
    "conveyor.PrometheusMetrics needs the prometheus_client package: "
    "pip install 'conveyor[prometheus]' (or pip install prometheus_client)"
)

# (metric name without _total, Stats attribute, help) of the counters read from Stats.
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("conveyor_items_submitted", "submitted", "Items accepted by the pool."),
    ("conveyor_items_succeeded", "succeeded", "Items settled as Succeeded."),
    ("conveyor_items_failed", "failed", "Items settled as Failed (gave up or refused)."),
    ("conveyor_items_unfinished", "unfinished",
     "Items settled as Unfinished (the pool stopped first)."),
    ("conveyor_attempts", "attempts", "Attempts started, retries included."),
)
# (metric name, Stats attribute, help) of the gauges read from Stats.
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("conveyor_items_in_flight", "in_flight", "Attempts running now."),
    ("conveyor_items_queued", "queued", "Items waiting for a worker."),
    ("conveyor_items_waiting_retry", "waiting_retry", "Items waiting for their backoff."),
    ("conveyor_items_limited", "limited",
     "Items a worker holds while it waits for a limit (limiter, adaptive, rate)."),
    ("conveyor_items_parked", "parked", "Items parked by a per_key limit."),
)
_RETRIES = ("conveyor_retries", "Failed attempts scheduled again, by exception type.")
_ADAPTIVE = ("conveyor_adaptive_limit", "The current value of the pool's adaptive limit.")
_LATENCY = ("conveyor_attempt_duration_seconds",
            "Time one attempt of the task function took (limits excluded).")
_WAIT = ("conveyor_queue_wait_seconds",
         "Time from entering the work channel (again, for a retry) to being taken by a worker.")


def _prometheus_client() -> Any:
    """The prometheus_client module, or an ImportError that says how to install it."""
    try:
        import prometheus_client
        import prometheus_client.metrics_core
        import prometheus_client.utils
    except ImportError as error:
        raise ImportError(_INSTALL, name="prometheus_client") from error
    return prometheus_client


def _label_values(info: PoolInfo) -> tuple[str, ...]:
    """The values of :data:`LABELS` for a pool (pipelines: its stage's name goes here)."""
    return (info.name,)


def _check_buckets(buckets: object) -> tuple[float, ...]:
    """The bucket bounds as floats, or a TypeError/ValueError naming what is wrong."""

    def refuse(kind: type[TypeError] | type[ValueError], problem: str) -> Exception:
        return invalid(
            "buckets", buckets,
            f"upper bounds in seconds, finite, > 0 and strictly increasing ({problem})",
            "buckets=(0.01, 0.1, 1, 10)", owner="PrometheusMetrics", kind=kind,
        )

    if isinstance(buckets, str | bytes) or not isinstance(buckets, Iterable):
        raise refuse(TypeError, "not a sequence")
    bounds = tuple(buckets)
    if not bounds:
        raise refuse(ValueError, "empty")
    if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds):
        raise refuse(TypeError, "not all numbers (a bool is not one)")
    if not all(math.isfinite(b) and b > 0 for b in bounds):
        raise refuse(ValueError, "not all finite and > 0; +Inf is always added")
    if any(a >= b for a, b in pairwise(bounds)):
        raise refuse(ValueError, "not strictly increasing")
    return tuple(float(b) for b in bounds)


class _Series:
    """Everything kept for one set of label values (one pool name)."""

    __slots__ = ("adaptive", "ended", "latency", "live", "retries", "wait")

    def __init__(self, buckets: int) -> None:
        # Counters of the pools of this name that have ended, in _COUNTERS' order.
        self.ended = [0] * len(_COUNTERS)
        # The last adaptive limit of an ended pool of this name (None: none had one).
        self.adaptive: int | None = None
        # Histograms: a count per bucket (the last one +Inf), then the sum. One list, so
        # that a scrape copies a consistent histogram in one step.
        self.latency: list[float] = [0] * (buckets + 1) + [0.0]
        self.wait: list[float] = [0] * (buckets + 1) + [0.0]
        self.retries: dict[str, int] = {}
        self.live: list[_PoolObserver] = []


class _PoolObserver(Observer):
    """One pool's observer: the histograms and retries of its events; its final counters."""

    __slots__ = ("_bounds", "_latency", "_retries", "_wait", "final", "info", "last",
                 "series", "thread", "token")

    def __init__(self, info: PoolInfo, series: _Series, bounds: tuple[float, ...]) -> None:
        self.info = info
        self.series = series
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.get_ident()
        self.final: Stats | None = None
        self.last: Stats | None = None
        self._bounds = bounds
        self._latency = series.latency
        self._wait = series.wait
        self._retries = series.retries

    def attempt_ended(
        self, attempt: Attempt, error: BaseException | None, duration: float
    ) -> None:
        latency = self._latency
        latency[bisect_left(self._bounds, duration)] += 1
        latency[-1] += duration
        wait = self._wait
        queued = attempt.queued
        wait[bisect_left(self._bounds, queued)] += 1
        wait[-1] += queued

    def retry_scheduled(self, attempt: Attempt, error: Exception, delay: float) -> None:
        retries = self._retries
        name = type(error).__name__
        retries[name] = retries.get(name, 0) + 1

    def closed(self, report: Report) -> None:
        # Set under the lock with the fold, so that a scrape counts this pool once: either
        # still live (and then read as `final`), or folded into `ended`.
        stats = report.stats
        with _LOCK:
            self.final = stats
            ended = self.series.ended
            for i, (_, attribute, _) in enumerate(_COUNTERS):
                ended[i] += getattr(stats, attribute)
            if stats.adaptive_limit is not None:
                self.series.adaptive = stats.adaptive_limit
            self.series.live.remove(self)

    def read(self) -> Stats:
        """This pool's counters now, from any thread."""
        final = self.final
        if final is not None:
            return final
        if threading.get_ident() == self.thread:
            stats = self.info.stats()
        else:
            try:
                stats = trio.from_thread.run_sync(self.info.stats, trio_token=self.token)
            except (trio.RunFinishedError, RuntimeError):
                # Its trio run ended in between (then `final` is set), or the scrape runs in
                # another trio thread, which must not block: the last snapshot read.
                stats = self.final or self.last or Stats()
        self.last = stats
        return stats


# One lock for every PrometheusMetrics: taken once per pool (at its end) and once per scrape.
_LOCK = threading.Lock()


class PrometheusMetrics(Observer):
    """Prometheus metrics of every pool it observes: ``observers=[metrics]``.

    Create one, for the whole program (it registers itself as a collector on ``registry``,
    by default prometheus_client's global ``REGISTRY``), and pass it to as many pools as
    you like; serve the registry as usual (``prometheus_client.start_http_server(port)``,
    or ``make_asgi_app()``)::

        metrics = conveyor.PrometheusMetrics()
        prometheus_client.start_http_server(9100)
        report = await conveyor.run(fetch, urls, name="fetch", observers=[metrics])

    Series are labelled ``pool`` (the pool's ``name=``). Counters (items submitted,
    succeeded, failed, unfinished; attempts) and gauges (in flight, queued, waiting for
    retry, limited, parked, the adaptive limit) are read from the pools' stats when
    scraped; only the two histograms (attempt duration, queue wait) and the retries by
    exception type are counted as attempts end. After a pool ends its series keep their
    final values; a later pool with the same name adds to them.

    Args:
        registry: the ``prometheus_client.CollectorRegistry`` to register on (default:
            the global ``REGISTRY``). One ``PrometheusMetrics`` per registry: a second one
            is refused, as its series would collide.
        buckets: upper bounds in seconds of both histograms' buckets (``+Inf`` is added),
            finite, > 0, strictly increasing. Default: :data:`DEFAULT_BUCKETS`, 1 ms to
            5 min.

    Raises:
        ImportError: prometheus_client is not installed (``conveyor[prometheus]``).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        prometheus_client = _prometheus_client()
        if registry is None:
            registry = prometheus_client.REGISTRY
        elif not isinstance(registry, prometheus_client.CollectorRegistry):
            raise invalid(
                "registry", registry,
                "a prometheus_client.CollectorRegistry, or None (the global REGISTRY)",
                "registry=prometheus_client.CollectorRegistry()", owner="PrometheusMetrics",
                kind=TypeError,
            )
        self._bounds = _check_buckets(buckets)
        self._series: dict[tuple[str, ...], _Series] = {}
        self.registry: CollectorRegistry = registry
        try:
            registry.register(self)
        except ValueError as error:
            taken = ", ".join(sorted(getattr(error, "duplicates", ()))[:2])
            raise invalid(
                "registry", registry,
                f"a registry without conveyor's series ({taken}, ...): another "
                f"PrometheusMetrics is registered there (use one per registry and pass it to "
                f"every pool, or call .unregister() on the other first)",
                "registry=prometheus_client.CollectorRegistry()", owner="PrometheusMetrics",
            ) from None

    def __repr__(self) -> str:
        return f"PrometheusMetrics(pools={sorted(n for n, in self._series)!r})"

    def opened(self, info: PoolInfo) -> Observer:
        """A pool starts: its series (created at zero if new) and its own observer."""
        labels = _label_values(info)
        with _LOCK:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = _Series(len(self._bounds))
            pool = _PoolObserver(info, series, self._bounds)
            series.live.append(pool)
        return pool

    def unregister(self) -> None:
        """Remove these metrics from their registry (another ``PrometheusMetrics`` can then
        register there). Pools already given this observer still update it."""
        self.registry.unregister(self)

    # --- the collector protocol (prometheus_client calls these) ---------------------------

    def describe(self) -> list[Metric]:
        """The metric families, without samples (prometheus_client's duplicate check)."""
        counters, gauges, *rest = self._families()
        return [*counters, *gauges, *rest]

    def collect(self) -> list[Metric]:
        """The metric families with their samples now (called by each scrape)."""
        with _LOCK:
            taken = [
                (labels, list(s.ended), s.adaptive, list(s.live), list(s.latency),
                 list(s.wait), dict(s.retries))
                for labels, s in self._series.items()
            ]
        counters, gauges, retries, adaptive, latency, wait = self._families()
        for labels, ended, last_adaptive, live, lat, wt, by_type in taken:
            values = list(labels)
            now = [pool.read() for pool in live]
            for family, (_, attribute, _), before in zip(counters, _COUNTERS, ended,
                                                         strict=True):
                family.add_metric(values, before + sum(getattr(s, attribute) for s in now))
            for family, (_, attribute, _) in zip(gauges, _GAUGES, strict=True):
                family.add_metric(values, sum(getattr(s, attribute) for s in now))
            for exception, count in sorted(by_type.items()):
                retries.add_metric([*values, exception], count)
            limits = [s.adaptive_limit for s in now if s.adaptive_limit is not None]
            if limits:
                adaptive.add_metric(values, sum(limits))
            elif last_adaptive is not None:
                adaptive.add_metric(values, last_adaptive)
            latency.add_metric(values, self._buckets(lat), lat[-1])
            wait.add_metric(values, self._buckets(wt), wt[-1])
        return [*counters, *gauges, retries, adaptive, latency, wait]

    def _families(self) -> tuple[list[Any], list[Any], Any, Any, Any, Any]:
        core = _prometheus_client().metrics_core
        labels = list(LABELS)
        counters = [core.CounterMetricFamily(name, doc, labels=labels)
                    for name, _, doc in _COUNTERS]
        gauges = [core.GaugeMetricFamily(name, doc, labels=labels) for name, _, doc in _GAUGES]
        retries = core.CounterMetricFamily(*_RETRIES, labels=[*labels, "exception"])
        adaptive = core.GaugeMetricFamily(*_ADAPTIVE, labels=labels)
        latency = core.HistogramMetricFamily(*_LATENCY, labels=labels)
        wait = core.HistogramMetricFamily(*_WAIT, labels=labels)
        return counters, gauges, retries, adaptive, latency, wait

    def _buckets(self, counts: list[float]) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs from per-bucket counts (the sum last, left out)."""
        go = _prometheus_client().utils.floatToGoString
        out = []
        total = 0.0
        for bound, count in zip([*self._bounds, math.inf], counts, strict=False):
            total += count
            out.append((go(bound), total))
        return out

