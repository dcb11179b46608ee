"""conveyor.OpenTelemetry: spans and metrics of real pools, read with the OpenTelemetry SDK's
in-memory exporter and reader (a real TracerProvider with a SimpleSpanProcessor, a real
MeterProvider), on trio's virtual clock."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import conveyor

ROOT = Path(__file__).resolve().parent.parent


class Tracked(SpanProcessor):
    """Every span started and every span ended: a span left open is in one, not the other."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.ended: list[int] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.started.append(span.context.span_id)

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span.context.span_id)


@dataclass
class Otel:
    """An SDK set up in memory, and an OpenTelemetry observer writing to it."""

    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    tracked: Tracked
    reader: InMemoryMetricReader
    meter_provider: MeterProvider

    def observer(self, **options: Any) -> conveyor.OpenTelemetry:
        return conveyor.OpenTelemetry(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for m in scope.metrics
            if m.name == metric
            for point in m.data.data_points
        ]

    def sums(self, metric: str, key: str) -> dict[str, float]:
        """A counter's values by one attribute."""
        return {p.attributes[key]: p.value for p in self.points(metric)}


@pytest.fixture
def otel() -> Iterator[Otel]:
    tracer_provider = TracerProvider()
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracked = Tracked()
    tracer_provider.add_span_processor(tracked)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(tracer_provider, exporter, tracked, reader, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


# Items 0-3 succeed at once; 4-5 fail once, then succeed; 6-7 always fail with ValueError
# (retried, then give up after 3 attempts); 8-9 raise KeyError, which is not retried.
ITEMS = list(range(10))
RETRY = conveyor.Retry(
    attempts=3,
    backoff=conveyor.Backoff(initial=2.0, factor=3.0, jitter=None),
    retry_on=ValueError,
)
DELAYS = {1: 2.0, 2: 6.0}  # the retry after attempt n waits this long (exact: no jitter)


def flaky() -> Any:
    calls: Counter[int] = Counter()

    async def work(item: int) -> int:
        calls[item] += 1
        await trio.sleep(1)
        if item in (4, 5) and calls[item] == 1:
            raise ValueError(f"item {item} first try")
        if item in (6, 7):
            raise ValueError(f"item {item} never works")
        if item in (8, 9):
            raise KeyError(item)
        return item * 10

    return work


async def test_attempt_spans_under_the_span_current_where_the_pool_was_opened(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request") as outer:
        report = await conveyor.run(
            flaky(), ITEMS, workers=3, retry=RETRY, observers=[otel.observer()]
        )
    assert len(report.succeeded) == 6 and len(report.failed) == 4

    attempts = otel.spans("conveyor.attempt")
    assert len(attempts) == report.stats.attempts == 4 + 2 * 2 + 2 * 3 + 2
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == outer.get_span_context().span_id
        assert span.context.trace_id == outer.get_span_context().trace_id
        assert span.attributes is not None
        assert span.attributes["conveyor.pool.name"] == "pool"
        assert set(span.attributes) <= {
            "conveyor.pool.name",
            "conveyor.item.index",
            "conveyor.attempt.number",
            "conveyor.attempt.outcome",
            "conveyor.attempt.queue_wait",
            "error.type",
        }, "only the index of an item goes into a span, never the item"

    by_index: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in attempts:
        assert span.attributes is not None
        by_index[int(span.attributes["conveyor.item.index"])].append(span)  # type: ignore[arg-type]
    expected_attempts = {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3, 8: 1, 9: 1}
    outcomes = {
        0: ["succeeded"],
        4: ["retried", "succeeded"],
        6: ["retried", "retried", "failed"],
        8: ["failed"],
    }
    for index, n in expected_attempts.items():
        spans = sorted(by_index[index], key=lambda s: s.attributes["conveyor.attempt.number"])  # type: ignore[index]
        assert [s.attributes["conveyor.attempt.number"] for s in spans] == list(range(1, n + 1))  # type: ignore[index]
        if index in outcomes:
            assert [s.attributes["conveyor.attempt.outcome"] for s in spans] == outcomes[index]  # type: ignore[index]
        for number, span in enumerate(spans, 1):
            assert span.attributes is not None
            outcome = span.attributes["conveyor.attempt.outcome"]
            exceptions = [e for e in span.events if e.name == "exception"]
            retries = [e for e in span.events if e.name == "conveyor.retry_scheduled"]
            if outcome == "succeeded":
                assert not exceptions and not retries
                assert span.status.status_code is StatusCode.UNSET
                continue
            error = "KeyError" if index in (8, 9) else "ValueError"
            assert span.status.status_code is StatusCode.ERROR
            assert span.status.description is not None
            assert span.status.description.startswith(f"{error}: ")
            assert span.attributes["error.type"] == error
            assert len(exceptions) == 1
            assert exceptions[0].attributes is not None
            assert exceptions[0].attributes["exception.type"] == error
            if outcome == "retried":
                assert len(retries) == 1
                assert retries[0].attributes == {"conveyor.retry.delay": DELAYS[number]}
            else:
                assert not retries


async def test_metrics_equal_the_report(otel: Otel, autojump_clock: trio.testing.MockClock) -> None:
    observer = otel.observer()
    report = await conveyor.run(
        flaky(), ITEMS, workers=3, retry=RETRY, observers=[observer], name="predict"
    )
    stats = report.stats
    assert otel.sums("conveyor.items.settled", "conveyor.item.outcome") == {
        "succeeded": stats.succeeded,
        "failed": stats.failed,
        "unfinished": 0,
    }
    assert [p.value for p in otel.points("conveyor.attempts")] == [stats.attempts]
    assert otel.sums("conveyor.retries", "error.type") == {"ValueError": stats.retried}
    durations = otel.points("conveyor.attempt.duration")
    by_outcome = {p.attributes["conveyor.attempt.outcome"]: p.count for p in durations}
    assert by_outcome == {"succeeded": 6, "retried": stats.retried, "failed": 4}
    assert sum(p.count for p in durations) == stats.attempts
    assert sum(p.sum for p in durations) == stats.attempts * 1.0  # each attempt sleeps 1 s
    waits = otel.points("conveyor.queue.wait_time")
    assert sum(p.count for p in waits) == stats.attempts
    for metric in ("conveyor.items.settled", "conveyor.attempts", "conveyor.retries"):
        for point in otel.points(metric):
            assert point.attributes["conveyor.pool.name"] == "predict"
            assert set(point.attributes) <= {
                "conveyor.pool.name",
                "conveyor.item.outcome",
                "conveyor.attempt.outcome",
                "error.type",
            }, "bounded attributes: never an item or a message"
    # After the pool: nothing outstanding is reported for it.
    assert all(p.value == 0 for p in otel.points("conveyor.item.count"))

    # A second pool of the same name adds to the same counters (they never go down).
    again = await conveyor.run(
        flaky(), ITEMS, workers=3, retry=RETRY, observers=[observer], name="predict"
    )
    assert otel.sums("conveyor.items.settled", "conveyor.item.outcome") == {
        "succeeded": stats.succeeded + again.stats.succeeded,
        "failed": stats.failed + again.stats.failed,
        "unfinished": 0,
    }
    assert [p.value for p in otel.points("conveyor.attempts")] == [
        stats.attempts + again.stats.attempts
    ]


async def test_item_spans_span_their_attempts(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request") as outer:
        report = await conveyor.run(
            flaky(), ITEMS, workers=3, retry=RETRY, observers=[otel.observer(item_spans=True)]
        )
    items = otel.spans("conveyor.item")
    assert len(items) == len(ITEMS)
    by_id = {s.context.span_id: s for s in items}
    attempts_of: Counter[int] = Counter()
    for span in otel.spans("conveyor.attempt"):
        assert span.parent is not None
        item = by_id[span.parent.span_id]
        assert item.attributes is not None and span.attributes is not None
        assert item.attributes["conveyor.item.index"] == span.attributes["conveyor.item.index"]
        assert item.start_time is not None and span.start_time is not None
        assert item.end_time is not None and span.end_time is not None
        assert item.start_time <= span.start_time and span.end_time <= item.end_time
        attempts_of[span.parent.span_id] += 1
    records = {r.index: r for r in [*report.succeeded, *report.failed]}
    for item in items:
        assert item.parent is not None and item.parent.span_id == outer.get_span_context().span_id
        assert item.attributes is not None
        record = records[int(item.attributes["conveyor.item.index"])]  # type: ignore[arg-type]
        assert item.attributes["conveyor.item.attempts"] == record.attempts
        assert attempts_of[item.context.span_id] == record.attempts
        if isinstance(record, conveyor.Failed):
            assert item.attributes["conveyor.item.outcome"] == "failed"
            assert item.status.status_code is StatusCode.ERROR
            assert item.attributes["error.type"] == type(record.error).__name__
        else:
            assert item.attributes["conveyor.item.outcome"] == "succeeded"
            assert item.status.status_code is StatusCode.UNSET


async def test_a_cancelled_run_ends_every_span_it_started(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    async def slow(item: int) -> int:
        await trio.sleep(10 if item % 2 else 1)
        if item % 4 == 2:
            raise ValueError(item)
        return item

    with trio.move_on_after(15):
        await conveyor.run(
            slow,
            range(100),
            workers=4,
            retry=conveyor.Retry(attempts=3, backoff=conveyor.Backoff(initial=3, jitter=None)),
            observers=[otel.observer(item_spans=True)],
        )
    assert otel.tracked.started, "the run started spans"
    assert sorted(otel.tracked.started) == sorted(otel.tracked.ended), "no span left open"
    attempts = otel.spans("conveyor.attempt")
    cut = [s for s in attempts if s.attributes["conveyor.attempt.outcome"] == "cancelled"]  # type: ignore[index]
    assert len(cut) == 4, "the attempts running at the cancel"
    for span in cut:
        assert span.status.status_code is StatusCode.UNSET
        assert not [e for e in span.events if e.name == "exception"]
    unfinished = [
        s
        for s in otel.spans("conveyor.item")
        if s.attributes["conveyor.item.outcome"] == "unfinished"  # type: ignore[index]
    ]
    assert len(unfinished) >= 4
    durations = otel.points("conveyor.attempt.duration")
    assert {p.attributes["conveyor.attempt.outcome"]: p.count for p in durations}["cancelled"] == 4


async def test_spans_made_by_fn_are_children_of_its_attempt(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    tracer = otel.tracer_provider.get_tracer("test")

    async def work(item: int) -> int:
        with tracer.start_as_current_span("inside"):
            await trio.sleep(1)
        return item

    await conveyor.run(work, range(5), workers=2, observers=[otel.observer()])
    attempts = {s.context.span_id: s for s in otel.spans("conveyor.attempt")}
    inside = otel.spans("inside")
    assert len(inside) == 5
    for span in inside:
        assert span.parent is not None
        attempt = attempts[span.parent.span_id]
        assert attempt.attributes is not None and attempt.attributes[
            "conveyor.item.index"
        ] in range(5)


async def test_outstanding_items_by_state_read_while_the_pool_runs(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    async def wait(item: int) -> int:
        await release.wait()
        return item

    def counts() -> dict[str, int]:
        return {
            p.attributes["conveyor.item.state"]: p.value
            for p in otel.points("conveyor.item.count")
            if p.attributes["conveyor.pool.name"] == "waiting"
        }

    async with conveyor.open_pool(
        wait, workers=3, buffer=10, observers=[otel.observer()], name="waiting"
    ) as pool:
        for i in range(8):
            await pool.submit(i)
        await trio.sleep(0.5)
        stats = pool.stats
        assert stats.in_flight == 3 and stats.queued == 5
        # A reader in the pool's thread reads the stats now.
        assert counts() == {
            "queued": 5,
            "in_flight": 3,
            "waiting_retry": 0,
            "limited": 0,
            "parked": 0,
        }
        # A reader in another thread (a periodic exporter's) has the pool's thread read
        # them: trio's stats are not read from outside trio.
        await pool.submit(8)
        assert await trio.to_thread.run_sync(counts) == {**counts(), "queued": 6}
        release.set()
        pool.close()
    assert pool.report().stats.succeeded == 9
    assert counts() == {}, "a closed pool is no longer reported"


async def test_a_broken_span_processor_loses_no_item(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    class Broken(SpanProcessor):
        def on_start(self, span: Span, parent_context: Context | None = None) -> None:
            raise RuntimeError("exporter down")

    otel.tracer_provider.add_span_processor(Broken())
    report = await conveyor.run(flaky(), ITEMS, workers=3, retry=RETRY, observers=[otel.observer()])
    assert report.stats.settled == len(ITEMS)
    assert len(report.succeeded) == 6 and len(report.failed) == 4


async def test_metrics_only_and_traces_only(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    await conveyor.run(flaky(), ITEMS, retry=RETRY, observers=[otel.observer(traces=False)])
    assert otel.exporter.get_finished_spans() == ()
    assert sum(otel.sums("conveyor.items.settled", "conveyor.item.outcome").values()) == 10
    await conveyor.run(flaky(), ITEMS, retry=RETRY, observers=[otel.observer(metrics=False)])
    assert len(otel.spans("conveyor.attempt")) == 16
    assert sum(otel.sums("conveyor.items.settled", "conveyor.item.outcome").values()) == 10


# -- the call ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["item_spans", "traces", "metrics"])
def test_flags_must_be_bools(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^OpenTelemetry: {name}=1 is not valid: expected "):
        conveyor.OpenTelemetry(**{name: 1})


def test_providers_are_checked() -> None:
    with pytest.raises(TypeError, match=r"tracer_provider=.* is not valid: expected an "
                                        r"opentelemetry\.trace\.TracerProvider, or None"):
        conveyor.OpenTelemetry(tracer_provider=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"meter_provider=.* is not valid: expected an "
                                        r"opentelemetry\.metrics\.MeterProvider, or None"):
        conveyor.OpenTelemetry(meter_provider=InMemoryMetricReader())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"item_spans=True is not valid: expected False when "
                                         r"traces=False \(item spans are spans\); e\.g\. "
                                         r"item_spans=False$"):
        conveyor.OpenTelemetry(item_spans=True, traces=False)
    conveyor.OpenTelemetry(item_spans=False, traces=False)  # the fix
    conveyor.OpenTelemetry(item_spans=True)  # or traces on


def test_without_the_api_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'conveyor\[otel\]'") as caught:
        conveyor.OpenTelemetry()
    assert "opentelemetry-api" in str(caught.value)


def test_the_extra_the_error_names_installs_the_api() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [d for d in extras["otel"] if d.startswith("opentelemetry-api")]
    assert [d for d in extras["dev"] if d.startswith("opentelemetry-sdk")]


def test_import_conveyor_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, conveyor\n"
        "assert conveyor.OpenTelemetry\n"
        "print([m for m in sys.modules if m.startswith('opentelemetry')])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"
