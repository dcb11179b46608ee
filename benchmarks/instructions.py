"""`python -m benchmarks --instructions`: instructions per item, counted by callgrind.

Wall time on a shared machine moves with the load; the number of instructions a run executes
does not. Each measurement is one child process,

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -c SNIPPET N

whose stderr ends with callgrind's "Collected : <instructions>". Every case runs at two sizes,
and the cost per item is the difference divided by the difference of the sizes,
(I(large) - I(small)) / (large - small): the interpreter's start-up, the imports and the
event loop's set-up are the same in both runs and cancel out.

The cases: seed 000's asyncio retry queue (`benchmarks/_asyncio_seed.py`, the reference) and
`conveyor.run(fn, range(N), workers=20, retry=Retry(attempts=4))`, each with no-op items and
with one checkpoint per item (`asyncio.sleep(0)` / `trio.lowlevel.checkpoint()`); and
`conveyor.map` (same options) in the `async with` form and the bare `async for` form, no-op;
and `conveyor.run` no-op with a `conveyor.PrometheusMetrics` observer, and with a
`conveyor.OpenTelemetry` observer (the API with no SDK; the SDK with metrics only; the SDK
with spans and metrics, nothing exported). Ratios are to the asyncio queue with the same
work; the bare form is also given against the `async with` form, and the Prometheus and
OpenTelemetry cases against `conveyor.run` without them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = (10_000, 30_000)
SMOKE_SIZES = (200, 600)
WORKERS = 20
ATTEMPTS = 4
COLLECTED = re.compile(r"Collected\s*:\s*([\d,]+)")
NO_VALGRIND = (
    "instructions: skipped, valgrind is not installed (no `valgrind` on PATH); "
    "install it (e.g. `apt-get install valgrind`) to count instructions per item"
)

_ASYNCIO = f"""
import asyncio, sys
from benchmarks import _asyncio_seed
N = int(sys.argv[1])
{{work}}
out = asyncio.run(_asyncio_seed.main(work, range(N), num_workers={WORKERS}, attempts={ATTEMPTS}))
assert out.num_result == N and not out.giveups, out
"""

_CONVEYOR_RUN = f"""
import sys, trio, conveyor
N = int(sys.argv[1])
{{work}}
async def main():
    report = await conveyor.run(
        work, range(N), workers={WORKERS}, retry=conveyor.Retry(attempts={ATTEMPTS}))
    assert len(report.succeeded) == N and not report.failed and not report.unfinished
trio.run(main)
"""

_CONVEYOR_MAP = f"""
import sys, trio, conveyor
N = int(sys.argv[1])
{{work}}
async def main():
    count = 0
    stream = conveyor.map(
        work, range(N), workers={WORKERS}, retry=conveyor.Retry(attempts={ATTEMPTS}))
    {{loop}}
    assert count == N, count
trio.run(main)
"""

# conveyor.run as above, with a PrometheusMetrics observer (on a registry of its own): what
# the metrics cost per item (two histogram observations per attempt; counters and gauges
# are read from the pool's stats when scraped, so they cost nothing per item).
_CONVEYOR_RUN_PROMETHEUS = f"""
import sys, trio, conveyor, prometheus_client
N = int(sys.argv[1])
{{work}}
metrics = conveyor.PrometheusMetrics(prometheus_client.CollectorRegistry())
async def main():
    report = await conveyor.run(
        work, range(N), workers={WORKERS}, retry=conveyor.Retry(attempts={ATTEMPTS}),
        observers=[metrics])
    assert len(report.succeeded) == N and not report.failed and not report.unfinished
trio.run(main)
"""
# conveyor.run as above with a conveyor.OpenTelemetry observer: {otel} makes it.
_CONVEYOR_OTEL = f"""
import sys, trio, conveyor
N = int(sys.argv[1])
{{work}}
{{otel}}
async def main():
    report = await conveyor.run(
        work, range(N), workers={WORKERS}, retry=conveyor.Retry(attempts={ATTEMPTS}),
        observers=[otel])
    assert len(report.succeeded) == N and not report.failed and not report.unfinished
trio.run(main)
"""
# Three no-op stages, 20 workers each, 100 between stages (benchmarks/pipeline.py): the
# seed-001 recipe chained by hand in asyncio (three bounded queues, worker groups, join stage
# after stage, cancel), against conveyor.pipeline (one record per input, per-stage stats).
_ASYNCIO_PIPELINE = """
import asyncio, sys
N = int(sys.argv[1])
async def work(x):
    return x + 1
async def main():
    queues = [asyncio.Queue(100) for _ in range(3)]
    results = []
    async def worker(k):
        inbox = queues[k]
        outbox = queues[k + 1] if k + 1 < 3 else None
        while True:
            x = await inbox.get()
            try:
                y = await work(x)
                if outbox is not None:
                    await outbox.put(y)
                else:
                    results.append(y)
            finally:
                inbox.task_done()
    tasks = [asyncio.create_task(worker(k)) for k in range(3) for _ in range(20)]
    for i in range(N):
        await queues[0].put(i)
    for q in queues:
        await q.join()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(results) == N
asyncio.run(main())
"""
_CONVEYOR_PIPELINE = """
import sys, trio, conveyor
N = int(sys.argv[1])
async def work(x):
    return x + 1
pipe = conveyor.pipeline(*(
    conveyor.stage(work, name=f"s{{k}}", workers=20, buffer=100) for k in range(3)))
async def main():
    {body}
trio.run(main)
"""
PIPELINE_RUN = (
    "report = await pipe.run(range(N))\n"
    "    assert len(report.succeeded) == N and not report.failed and not report.unfinished"
)
PIPELINE_MAP = (
    "count = 0\n    async for _ in pipe.map(range(N)):\n        count += 1\n"
    "    assert count == N, count"
)
# The global providers, no SDK: the API's no-op spans and instruments.
OTEL_API = "otel = conveyor.OpenTelemetry()"
# The SDK, nothing exported: spans are made and dropped (an exporter's cost comes on top),
# metrics aggregated in memory.
OTEL_SDK = (
    "from opentelemetry.sdk.trace import TracerProvider\n"
    "from opentelemetry.sdk.metrics import MeterProvider\n"
    "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
    "otel = conveyor.OpenTelemetry(tracer_provider=TracerProvider(),\n"
    "    meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]){extra})"
)

NOOP = "async def work(x):\n    return x + 1"
ASYNCIO_CHECKPOINT = "async def work(x):\n    await asyncio.sleep(0)\n    return x + 1"
TRIO_CHECKPOINT = "async def work(x):\n    await trio.lowlevel.checkpoint()\n    return x + 1"
WITH_LOOP = "async with stream as records:\n        async for _ in records:\n            count += 1"
BARE_LOOP = "async for _ in stream:\n        count += 1"


@dataclass(frozen=True)
class InstrCase:
    """One program measured at two sizes; `reference` names the case its ratio is to."""

    name: str
    code: str
    reference: str | None = None  # None: this case is a reference
    also: str | None = None  # a second case to give a ratio to (the bare form: async with)


ASYNCIO_NOOP = "asyncio (seed 000), no-op"
ASYNCIO_CP = "asyncio (seed 000), 1 checkpoint"
MAP_WITH = "conveyor.map, async with, no-op"
RUN_NOOP = "conveyor.run, no-op"
ASYNCIO_PIPE = "asyncio pipeline by hand, 3 no-op stages"

CASES: tuple[InstrCase, ...] = (
    InstrCase(ASYNCIO_NOOP, _ASYNCIO.format(work=NOOP)),
    InstrCase(RUN_NOOP, _CONVEYOR_RUN.format(work=NOOP), ASYNCIO_NOOP),
    InstrCase(ASYNCIO_CP, _ASYNCIO.format(work=ASYNCIO_CHECKPOINT)),
    InstrCase("conveyor.run, 1 checkpoint", _CONVEYOR_RUN.format(work=TRIO_CHECKPOINT), ASYNCIO_CP),
    InstrCase(MAP_WITH, _CONVEYOR_MAP.format(work=NOOP, loop=WITH_LOOP), ASYNCIO_NOOP),
    InstrCase(
        "conveyor.map, bare async for, no-op",
        _CONVEYOR_MAP.format(work=NOOP, loop=BARE_LOOP),
        ASYNCIO_NOOP,
        also=MAP_WITH,
    ),
    InstrCase(
        "conveyor.run, no-op, Prometheus",
        _CONVEYOR_RUN_PROMETHEUS.format(work=NOOP),
        ASYNCIO_NOOP,
        also=RUN_NOOP,
    ),
    InstrCase(
        "conveyor.run, no-op, OpenTelemetry (API, no SDK)",
        _CONVEYOR_OTEL.format(work=NOOP, otel=OTEL_API),
        ASYNCIO_NOOP,
        also=RUN_NOOP,
    ),
    InstrCase(
        "conveyor.run, no-op, OpenTelemetry (SDK, metrics only)",
        _CONVEYOR_OTEL.format(work=NOOP, otel=OTEL_SDK.format(extra=", traces=False")),
        ASYNCIO_NOOP,
        also=RUN_NOOP,
    ),
    InstrCase(
        "conveyor.run, no-op, OpenTelemetry (SDK, spans + metrics)",
        _CONVEYOR_OTEL.format(work=NOOP, otel=OTEL_SDK.format(extra="")),
        ASYNCIO_NOOP,
        also=RUN_NOOP,
    ),
    InstrCase(ASYNCIO_PIPE, _ASYNCIO_PIPELINE),
    InstrCase(
        "conveyor.pipeline .run, 3 no-op stages",
        _CONVEYOR_PIPELINE.format(body=PIPELINE_RUN),
        ASYNCIO_PIPE,
    ),
    InstrCase(
        "conveyor.pipeline .map, bare async for, 3 no-op stages",
        _CONVEYOR_PIPELINE.format(body=PIPELINE_MAP),
        ASYNCIO_PIPE,
    ),
)


class MeasureError(RuntimeError):
    """A measured child process failed or callgrind's total was not in its output."""


def parse_collected(stderr: str) -> int:
    """The instruction total from callgrind's stderr ("==123== Collected : 919963017")."""
    found = COLLECTED.findall(stderr)
    if not found:
        raise MeasureError(f"no 'Collected : N' line in callgrind's output:\n{stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def count(code: str, n: int, *, python: str = sys.executable) -> int:
    """Instructions executed by `python -c code n` under callgrind."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            python,
            "-c",
            code,
            str(n),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise MeasureError(f"exit {done.returncode} at N={n}:\n{done.stderr[-3000:]}")
    return parse_collected(done.stderr)


@dataclass
class Result:
    """A case's two totals and what follows from them."""

    name: str
    small: int
    large: int
    sizes: tuple[int, int]
    reference: str | None
    also: str | None
    ratio: float | None = None
    also_ratio: float | None = None

    @property
    def per_item(self) -> float:
        return (self.large - self.small) / (self.sizes[1] - self.sizes[0])

    def as_json(self) -> dict[str, Any]:
        return {
            "case": self.name,
            "sizes": list(self.sizes),
            "instructions": [self.small, self.large],
            "per_item": round(self.per_item, 1),
            "reference": self.reference,
            "ratio": self.ratio,
            "ratio_to": self.also,
            "ratio_to_value": self.also_ratio,
        }


def measure(
    cases: Sequence[InstrCase] = CASES,
    sizes: tuple[int, int] = SIZES,
    *,
    jobs: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Count every case at both sizes (`jobs` child processes at a time: counts ignore load)."""
    if not 0 < sizes[0] < sizes[1]:
        raise ValueError(f"sizes must be two counts, small then large, got {sizes!r}")
    runs = [(c, n) for c in cases for n in sizes]

    def one(run: tuple[InstrCase, int]) -> int:
        case, n = run
        total = count(case.code, n)
        if progress is not None:
            progress(f"  {case.name}, N={n}: {total:,} instructions")
        return total

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        totals = list(pool.map(one, runs))
    results = [
        Result(c.name, totals[2 * i], totals[2 * i + 1], sizes, c.reference, c.also)
        for i, c in enumerate(cases)
    ]
    by_name = {r.name: r for r in results}
    for r in results:
        ref = by_name.get(r.reference) if r.reference else r
        if ref is not None and ref.per_item > 0:
            r.ratio = r.per_item / ref.per_item
        other = by_name.get(r.also) if r.also else None
        if other is not None and other.per_item > 0:
            r.also_ratio = r.per_item / other.per_item
    return results


def format_table(results: Sequence[Result]) -> str:
    """case, the two totals, instructions per item, ratio to asyncio, note."""
    if not results:
        return "(no cases)"
    small, large = results[0].sizes
    header = ("case", f"I(N={small:,})", f"I(N={large:,})", "instr/item", "ratio", "note")
    lines = []
    for r in results:
        ratio = "ref" if r.reference is None else f"{r.ratio:.2f}x" if r.ratio else "-"
        note = f"{r.also_ratio:.2f}x '{r.also}'" if r.also_ratio else ""
        lines.append(
            (r.name, f"{r.small:,}", f"{r.large:,}", f"{r.per_item:,.0f}", ratio, note)
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    out.extend(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    return "\n".join(out)


def has_valgrind() -> bool:
    """Whether `valgrind` is on PATH."""
    return shutil.which("valgrind") is not None
