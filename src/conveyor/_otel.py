"""`conveyor.OpenTelemetry`: spans and metrics through the OpenTelemetry API, as an observer.

An observer on the seam of ``_observe.py``; the pool knows nothing of OpenTelemetry. Only
``opentelemetry-api`` is needed (``pip install 'conveyor[otel]'``), imported when an
``OpenTelemetry`` is made, never by ``import conveyor``. Where the data goes (an exporter, a
Prometheus endpoint, nowhere) is the SDK's business: the application configures it.

Traces: one span per attempt (``conveyor.attempt``), a child of the span that was current
where the pool was opened (:meth:`Observer.opened` runs in the opening task, so the context
is captured there), or of the item's span (``conveyor.item``) with ``item_spans=True``. While
``fn`` runs, the attempt's span is the current span of the worker, so the spans ``fn`` makes
itself (an instrumented HTTP client, say) are its children.

Metrics: histograms of attempt durations and queue waits and a counter of retries by
exception type, fed by the events; counters of settled items and attempts and the counts of
outstanding items by state, read from the pool's stats when a reader collects (nothing per
item). Attributes on metrics are bounded: the pool's name, an outcome or a state, an
exception's type name. Items and messages never appear in attributes (items may be huge or
secret); on spans only the item's index does. An exception recorded on a span (the
``exception`` event) carries its message, as OpenTelemetry does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from ._observe import Attempt, Observer, PoolInfo
from ._options import check_bool, invalid

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Span, TracerProvider

    from ._records import Failed, Report, Succeeded, Unfinished
    from ._stats import Stats

__all__ = ["OpenTelemetry"]

#: The instrumentation scope's name (tracer and meter).
SCOPE = "conveyor"

MISSING_API = (
    "conveyor.OpenTelemetry needs the OpenTelemetry API (the package opentelemetry-api), "
    "which is not installed: pip install 'conveyor[otel]'"
)

# Attribute names, in the OpenTelemetry semantic-convention style.
POOL_NAME = "conveyor.pool.name"
ITEM_INDEX = "conveyor.item.index"
ITEM_OUTCOME = "conveyor.item.outcome"
ITEM_ATTEMPTS = "conveyor.item.attempts"
ITEM_STATE = "conveyor.item.state"
ATTEMPT_NUMBER = "conveyor.attempt.number"
ATTEMPT_OUTCOME = "conveyor.attempt.outcome"
ATTEMPT_QUEUE_WAIT = "conveyor.attempt.queue_wait"
RETRY_DELAY = "conveyor.retry.delay"
ERROR_TYPE = "error.type"  # the general semantic convention

# Span and event names.
ATTEMPT_SPAN = "conveyor.attempt"
ITEM_SPAN = "conveyor.item"
RETRY_EVENT = "conveyor.retry_scheduled"

# Outcomes of one attempt.
SUCCEEDED = "succeeded"  # fn returned
RETRIED = "retried"  # fn raised; the item is retried after a delay
FAILED = "failed"  # fn raised; no retry (the item gives up)
CANCELLED = "cancelled"  # the pool's stop cut it short (trio.Cancelled, Ctrl-C, ...)
ATTEMPT_OUTCOMES = (SUCCEEDED, RETRIED, FAILED, CANCELLED)
ITEM_OUTCOMES = ("succeeded", "failed", "unfinished")
ITEM_STATES = ("queued", "in_flight", "waiting_retry", "limited", "parked")
CUMULATIVE = (*ITEM_OUTCOMES, "attempts")  # Stats fields that only grow

# Seconds: the OpenTelemetry semantic conventions' advice for durations.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    30.0, 60.0, 300.0,
)  # fmt: skip

#: Seconds a metric reader in another thread (a periodic exporter's) waits for the pool's
#: thread to read its stats (trio is called only from its own thread); past that it reports
#: the last stats read, so a blocked event loop never blocks an exporter for long.
STATS_WAIT = 0.5
#: Seconds for which stats read for another thread serve again (one collection reads them
#: for several instruments).
STATS_FRESH = 0.1


def _error_type(error: BaseException) -> str:
    return type(error).__qualname__


class OpenTelemetry(Observer):
    """Spans and metrics of every pool it observes, through the OpenTelemetry API.

    ::

        otel = conveyor.OpenTelemetry()            # the global providers
        report = await conveyor.run(fetch, urls, observers=[otel])

    Args:
        tracer_provider: where spans go; None: the global one
            (``opentelemetry.trace.set_tracer_provider``).
        meter_provider: where metrics go; None: the global one.
        item_spans: also a span per item (``conveyor.item``) from its first attempt until it
            settles, its attempts' spans its children.
        traces: False: no spans at all (metrics only).
        metrics: False: no instruments (spans only).

    One ``OpenTelemetry`` serves any number of pools, also at once (make one per program:
    each creates its instruments). Span attributes hold the item's index, never the item;
    metric attributes hold the pool's name, outcomes, states and exception type names only,
    so their cardinality is bounded. Needs ``opentelemetry-api`` (``conveyor[otel]``).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        item_spans: bool = False,
        traces: bool = True,
        metrics: bool = True,
    ) -> None:
        for name, value in (("item_spans", item_spans), ("traces", traces), ("metrics", metrics)):
            check_bool(name, value, owner="OpenTelemetry")
        try:
            from opentelemetry import metrics as otel_metrics
            from opentelemetry import trace as otel_trace
        except ImportError as exc:
            raise ImportError(MISSING_API) from exc
        from . import __version__

        if tracer_provider is not None and not isinstance(
            tracer_provider, otel_trace.TracerProvider
        ):
            raise invalid(
                "tracer_provider", tracer_provider,
                "an opentelemetry.trace.TracerProvider, or None (the global one)",
                "tracer_provider=None", owner="OpenTelemetry", kind=TypeError,
            )
        if meter_provider is not None and not isinstance(
            meter_provider, otel_metrics.MeterProvider
        ):
            raise invalid(
                "meter_provider", meter_provider,
                "an opentelemetry.metrics.MeterProvider, or None (the global one)",
                "meter_provider=None", owner="OpenTelemetry", kind=TypeError,
            )
        if item_spans and not traces:
            raise invalid(
                "item_spans", item_spans, "False when traces=False (item spans are spans)",
                "item_spans=False", owner="OpenTelemetry",
            )
        self.item_spans = item_spans
        self._tracer = (
            otel_trace.get_tracer(SCOPE, __version__, tracer_provider) if traces else None
        )
        self._open: dict[int, _PoolTelemetry] = {}  # id -> pool, for the observable counts
        # pool name -> the final counts of its closed pools (cumulative counters never drop)
        self._closed: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()
        self._meter = None
        if metrics:
            meter = otel_metrics.get_meter(SCOPE, __version__, meter_provider)
            self._meter = meter
            # Counts the pool keeps anyway are read from its stats when collected: nothing
            # per item. The histograms' counts split the attempts by outcome.
            meter.create_observable_counter(
                "conveyor.items.settled",
                [self._observe_settled],
                "{item}",
                "Items settled, by outcome.",
            )
            meter.create_observable_counter(
                "conveyor.attempts",
                [self._observe_attempts],
                "{attempt}",
                "Attempts started, retries included.",
            )
            self._retries = meter.create_counter(
                "conveyor.retries", "{retry}", "Attempts that failed and were scheduled again."
            )
            self._duration = _histogram(
                meter, "conveyor.attempt.duration", "Duration of one attempt of fn."
            )
            self._queue_wait = _histogram(
                meter,
                "conveyor.queue.wait_time",
                "Time an item waited in the work channel before an attempt started.",
            )
            meter.create_observable_up_down_counter(
                "conveyor.item.count",
                [self._observe_counts],
                "{item}",
                "Items accepted and not settled yet, by state.",
            )
            meter.create_observable_gauge(
                "conveyor.adaptive.limit",
                [self._observe_adaptive],
                "{attempt}",
                "The current value of a pool's adaptive limit.",
            )

    def opened(self, info: PoolInfo) -> Observer | None:
        """A pool starts: returns the observer of its events (the parent span is the one
        current here, in the task that opened the pool)."""
        from opentelemetry import context

        if self._tracer is None and self._meter is None:
            return None
        pool: _PoolTelemetry
        if self.item_spans:
            pool = _PoolItemTelemetry(self, info, context.get_current())
        else:
            pool = _PoolTelemetry(self, info, context.get_current())
        if self._meter is not None:
            with self._lock:
                self._open[id(pool)] = pool
        return pool

    def _forget(self, pool: _PoolTelemetry, final: Stats) -> None:
        with self._lock:
            if self._open.pop(id(pool), None) is not None:
                closed = self._closed.setdefault(pool.name, Counter())
                for count in CUMULATIVE:
                    closed[count] += getattr(final, count)

    def _cumulative(self) -> dict[str, Counter[str]]:
        """The counts of every pool so far, by pool name: closed ones and open ones."""
        pools = self._pools()
        with self._lock:
            totals = {name: Counter(counts) for name, counts in self._closed.items()}
        for pool in pools:
            stats = pool.current_stats()
            if stats is not None:
                counts = totals.setdefault(pool.name, Counter())
                for count in CUMULATIVE:
                    counts[count] += getattr(stats, count)
        return totals

    def _observe_settled(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        return [
            Observation(counts[outcome], {POOL_NAME: name, ITEM_OUTCOME: outcome})
            for name, counts in self._cumulative().items()
            for outcome in ITEM_OUTCOMES
        ]

    def _observe_attempts(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        return [
            Observation(counts["attempts"], {POOL_NAME: name})
            for name, counts in self._cumulative().items()
        ]

    def _pools(self) -> list[_PoolTelemetry]:
        with self._lock:
            return list(self._open.values())

    def _observe_counts(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        totals: dict[tuple[str, str], int] = {}
        for pool in self._pools():
            stats = pool.current_stats()
            if stats is None:
                continue
            for state in ITEM_STATES:
                key = (pool.name, state)
                totals[key] = totals.get(key, 0) + getattr(stats, state)
        return [
            Observation(value, {POOL_NAME: name, ITEM_STATE: state})
            for (name, state), value in totals.items()
        ]

    def _observe_adaptive(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        limits: dict[str, int] = {}
        for pool in self._pools():
            stats = pool.current_stats()
            if stats is not None and stats.adaptive_limit is not None:
                limits[pool.name] = stats.adaptive_limit
        return [Observation(value, {POOL_NAME: name}) for name, value in limits.items()]


def _histogram(meter: Any, name: str, description: str) -> Any:
    try:  # the bucket advice is in opentelemetry-api >= 1.30
        return meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
    except TypeError:
        return meter.create_histogram(name, "s", description)


class _PoolTelemetry(Observer):
    """One pool's spans and metrics: the attempt events."""

    def __init__(self, owner: OpenTelemetry, info: PoolInfo, parent: Context) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Status, StatusCode

        self.name = info.name
        self._info = info
        self._parent = parent
        self._tracer = owner._tracer
        self._item_spans = owner.item_spans
        self._metrics = owner._meter is not None
        self._owner = owner
        self._thread = threading.get_ident()
        self._trio_token = trio.lowlevel.current_trio_token()
        self._stats: Stats | None = None  # the last stats read
        self._read_at = -math.inf  # when (time.monotonic())
        self._set_span_in_context = trace.set_span_in_context
        self._attach = context.attach
        self._detach = context.detach
        self._error_status = Status
        self._error_code = StatusCode.ERROR
        # index -> (attempt span, context token) of the attempt running now
        self._running: dict[int, tuple[Span, Token[Context] | None]] = {}
        self._items: dict[int, Span] = {}  # index -> item span (item_spans=True)
        self._retrying: set[int] = set()  # indexes whose running attempt will be retried
        pool = {POOL_NAME: info.name}
        self._pool_attrs = pool
        self._attempt_attrs = {o: {**pool, ATTEMPT_OUTCOME: o} for o in ATTEMPT_OUTCOMES}
        self._retry_attrs: dict[type[BaseException], dict[str, str]] = {}
        if self._metrics:
            self._retries_counter = owner._retries
            self._duration = owner._duration
            self._queue_wait = owner._queue_wait
            self._read_stats()

    # -- gauges ---------------------------------------------------------------------------

    def current_stats(self) -> Stats | None:
        """The pool's stats now, for a metric reader in any thread.

        In the pool's thread they are read at once. From another thread (a periodic
        exporter's) the pool's thread is asked to read them (``run_sync_soon``) and this
        waits up to :data:`STATS_WAIT` seconds for it; past that, or once the event loop
        has ended, it returns the last stats read.
        """
        if threading.get_ident() == self._thread:
            self._read_stats()
            return self._stats
        if time.monotonic() - self._read_at < STATS_FRESH:
            return self._stats  # one collection reads several instruments: ask once
        done = threading.Event()

        def read() -> None:
            try:
                self._read_stats()
            finally:
                done.set()

        try:
            self._trio_token.run_sync_soon(read)
        except trio.RunFinishedError:
            return self._stats
        if done.wait(STATS_WAIT):
            self._read_at = time.monotonic()
        return self._stats

    def _read_stats(self) -> None:
        try:
            self._stats = self._info.stats()
        except Exception:  # keep the last ones (the pool's stats should not raise)
            pass

    # -- one attempt ----------------------------------------------------------------------

    def attempt_started(self, attempt: Attempt) -> None:
        index = attempt.index
        if self._metrics:
            self._queue_wait.record(attempt.queued, self._pool_attrs)
        tracer = self._tracer
        if tracer is None:
            return
        parent = self._parent
        if self._item_spans:
            item = self._items.get(index)
            if item is None:
                item = tracer.start_span(
                    ITEM_SPAN, parent, attributes={POOL_NAME: self.name, ITEM_INDEX: index}
                )
                self._items[index] = item
            parent = self._set_span_in_context(item, parent)
        span = tracer.start_span(
            ATTEMPT_SPAN,
            parent,
            attributes={
                POOL_NAME: self.name,
                ITEM_INDEX: index,
                ATTEMPT_NUMBER: attempt.number,
                ATTEMPT_QUEUE_WAIT: attempt.queued,
            },
        )
        # The attempt's span is current in the worker while fn runs: fn's spans are its
        # children. (Not the API's invalid no-op span: no SDK, nothing to make current.)
        token = None
        if span.get_span_context().is_valid:
            token = self._attach(self._set_span_in_context(span))
        self._running[index] = (span, token)

    def retry_scheduled(self, attempt: Attempt, error: Exception, delay: float) -> None:
        self._retrying.add(attempt.index)
        if self._metrics:
            kind = type(error)
            attrs = self._retry_attrs.get(kind)
            if attrs is None:
                attrs = self._retry_attrs[kind] = {
                    **self._pool_attrs,
                    ERROR_TYPE: _error_type(error),
                }
            self._retries_counter.add(1, attrs)
        running = self._running.get(attempt.index)
        if running is not None:
            running[0].add_event(RETRY_EVENT, {RETRY_DELAY: delay})

    def attempt_ended(self, attempt: Attempt, error: BaseException | None, duration: float) -> None:
        index = attempt.index
        if error is None:
            outcome = SUCCEEDED
        elif index in self._retrying:
            self._retrying.discard(index)
            outcome = RETRIED
        elif isinstance(error, Exception):
            outcome = FAILED
        else:
            outcome = CANCELLED
        if self._metrics:
            self._duration.record(duration, self._attempt_attrs[outcome])
        running = self._running.pop(index, None)
        if running is None:
            return
        span, token = running
        if token is not None:
            self._detach(token)
        if span.is_recording():
            self._end_attempt(span, outcome, error)
        else:
            span.end()

    def _end_attempt(self, span: Span, outcome: str, error: BaseException | None) -> None:
        span.set_attribute(ATTEMPT_OUTCOME, outcome)
        if error is not None and outcome != CANCELLED:
            span.set_attribute(ERROR_TYPE, _error_type(error))
            span.record_exception(error)
            span.set_status(
                self._error_status(self._error_code, f"{type(error).__name__}: {error}")
            )
        span.end()

    # -- the end --------------------------------------------------------------------------

    def closed(self, report: Report) -> None:
        # Every attempt ends with attempt_ended; should one not have (a pool torn down
        # by something the seam did not see), its span still ends here: none is left open.
        for span, _token in self._running.values():
            self._end_attempt(span, CANCELLED, None)
        self._running.clear()
        for span in self._items.values():
            span.set_attribute(ITEM_OUTCOME, "unfinished")
            span.end()
        self._items.clear()
        self._stats = report.stats
        if self._metrics:
            self._owner._forget(self, report.stats)


class _PoolItemTelemetry(_PoolTelemetry):
    """With item spans: the items' settle events end them."""

    def succeeded(self, record: Succeeded[Any]) -> None:
        self._end_item(record.index, "succeeded", record.attempts, None)

    def failed(self, record: Failed) -> None:
        self._end_item(record.index, "failed", record.attempts, record.error)

    def unfinished(self, record: Unfinished) -> None:
        self._end_item(record.index, "unfinished", record.attempts, None)

    def _end_item(
        self, index: int, outcome: str, attempts: int, error: BaseException | None
    ) -> None:
        span = self._items.pop(index, None)
        if span is None:  # settled without an attempt: no span was started
            return
        span.set_attribute(ITEM_OUTCOME, outcome)
        span.set_attribute(ITEM_ATTEMPTS, attempts)
        if error is not None:
            span.set_attribute(ERROR_TYPE, _error_type(error))
            span.set_status(
                self._error_status(self._error_code, f"{type(error).__name__}: {error}")
            )
        span.end()
