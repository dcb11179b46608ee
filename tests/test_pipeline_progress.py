"""The progress line of a pipeline (``progress=`` on ``Pipeline.run``, ``map`` and ``open``).

One line for the whole pipeline: its inputs (done of the total when known) and each stage by
name with its own counts. Tested only through the public API: the lines written to a stream,
the report, ``report.stages``. Time is virtual (``autojump_clock``): snapshot times are exact.
"""

from __future__ import annotations

import gc
import io
import logging
import re
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor import Retry
from conveyor._progress import PIPELINE_DROP_ORDER, format_line
from tests._fixes import parts, suggested_fix


class Lines(io.StringIO):
    """A text stream that keeps each line written, and the trio time it was written at."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.times: list[float] = []

    def write(self, text: str) -> int:
        self.lines.append(text.rstrip("\n"))
        self.times.append(trio.current_time())
        return super().write(text)


class Kept(conveyor.Progress):
    """The progress line, keeping the report it was closed with (and how often)."""

    def __init__(self, stream: Lines, interval: float = 1.0) -> None:
        super().__init__(stream, interval=interval, tty=False)
        self.reports: list[conveyor.Report] = []
        self.infos: list[conveyor.PoolInfo] = []

    def opened(self, info: conveyor.PoolInfo) -> conveyor.Progress:
        self.infos.append(info)
        return super().opened(info)

    def closed(self, report: conveyor.Report) -> None:
        self.reports.append(report)
        super().closed(report)


STAGE_COUNT = re.compile(r"([\d,]+) (done|in flight|queued|retries|failed|unfinished)")


def stage_parts(line: str) -> dict[str, dict[str, int]]:
    """Each stage's counts as the line shows them, by name, in order (0 when left out)."""
    shown: dict[str, dict[str, int]] = {}
    for field in line.split(" | "):
        name, colon, rest = field.partition(": ")
        if colon:
            counts = dict.fromkeys(("done", "in flight", "queued", "retries", "failed",
                                    "unfinished"), 0)
            for number, what in STAGE_COUNT.findall(rest):
                counts[what] = int(number.replace(",", ""))
            shown[name] = counts
    return shown


def expected_parts(report: conveyor.Report) -> dict[str, dict[str, int]]:
    return {
        name: {
            "done": s.succeeded + s.failed + s.unfinished, "in flight": s.in_flight,
            "queued": s.queued, "retries": s.retried, "failed": s.failed,
            "unfinished": s.unfinished,
        }
        for name, s in report.stages.items()
    }


def check_final_line(progress: Kept, stream: Lines) -> conveyor.Report:
    """Closed once; the last line written is the final account: every stage by name, in
    order, with the counts of ``report.stages``; the inputs' counts those of the report."""
    (report,) = progress.reports
    final = stream.lines[-1]
    assert stage_parts(final) == expected_parts(report)
    assert list(stage_parts(final)) == list(report.stages)
    s = report.stats
    assert f"failed {s.failed:,}" in final
    assert (f"unfinished {s.unfinished:,}" in final) == (s.unfinished > 0)
    assert s.submitted == s.succeeded + s.failed + s.unfinished  # the ledger is complete
    return report


async def fetch(x: int) -> int:
    await trio.sleep(1)
    return x


async def parse(x: int) -> int:
    await trio.sleep(0.5)
    if x == 3:
        raise ValueError("three")
    return x


def two_stages() -> conveyor.Pipeline:
    return conveyor.pipeline(
        conveyor.stage(fetch, workers=2),
        conveyor.stage(parse, workers=1, retry=Retry(attempts=2, backoff=None)),
    )


# ------------------------------------------------------------------ the line, over time


async def test_snapshots_come_every_interval_and_the_final_line_once_at_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # fetch: 2 at a time, 1 s each (done at 1, 2, 3); parse: one at a time, 0.5 s each,
    # item 3 twice: busy from 1 to 4.5.
    stream = Lines()
    progress = Kept(stream, interval=1.25)
    report = await two_stages().run(range(6), progress=progress)
    assert trio.current_time() == 4.5
    assert stream.times == [1.25, 2.5, 3.75, 4.5]  # snapshots, then the final line once
    # At 1.25 s: fetch has done 0 and 1, runs 2 and 3, holds 4 and 5; parse runs 0, 1 waits.
    assert stream.lines[0].startswith("conveyor | 0/6 0.0% | ")
    assert stage_parts(stream.lines[0]) == {
        "fetch": {"done": 2, "in flight": 2, "queued": 2, "retries": 0, "failed": 0,
                  "unfinished": 0},
        "parse": {"done": 0, "in flight": 1, "queued": 1, "retries": 0, "failed": 0,
                  "unfinished": 0},
    }
    assert check_final_line(progress, stream) == report
    assert stream.lines[-1].startswith("conveyor | 6/6 100.0% | ")
    assert stage_parts(stream.lines[-1])["parse"] == {
        "done": 6, "in flight": 0, "queued": 0, "retries": 1, "failed": 1, "unfinished": 0,
    }
    # The progress line is the pipeline's alone: told once, with the whole pipeline.
    (info,) = progress.infos
    assert (info.name, info.total, info.workers, info.retry_attempts) == ("pipeline", 6, 3, 2)
    assert info.stages is not None and list(info.stages()) == ["fetch", "parse"]


async def test_the_total_is_the_inputs_when_known_else_the_count_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def items() -> Any:
        for x in range(4):
            yield x

    stream = Lines()
    progress = Kept(stream, interval=10)
    await two_stages().run(items(), progress=progress)
    assert stream.lines == [stream.lines[-1]]  # ended within 10 s: the final line only
    assert stream.lines[-1].startswith("conveyor | 4 done of 4 accepted | ")
    assert progress.infos[0].total is None


async def test_progress_true_writes_to_stderr(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    await two_stages().run(range(3), progress=True)
    err = capsys.readouterr().err
    assert "conveyor | 3/3 100.0%" in err and "fetch: 3 done" in err and "parse: 3 done" in err


# ------------------------------------------------------------------ however it ends


async def test_a_cancel_writes_the_final_line_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = Lines()
    progress = Kept(stream)
    with trio.move_on_after(2.25):
        await two_stages().run(range(10), progress=progress)
    assert stream.times == [1.0, 2.0, 2.25]
    report = check_final_line(progress, stream)
    assert report.stats.unfinished > 0 and report.stats.submitted > 0
    assert "unfinished" in stream.lines[-1]


async def test_breaking_out_of_async_with_map_writes_the_final_line_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = Lines()
    progress = Kept(stream, interval=0.75)
    got = []
    pipe_stream = two_stages().map(range(10), progress=progress)
    async with pipe_stream as records:
        async for record in records:
            got.append(record)
            if len(got) == 2:
                break  # at 2 s, the second record
    assert trio.current_time() == 2.0 and stream.times == [0.75, 1.5, 2.0]
    report = check_final_line(progress, stream)
    assert report.stats == pipe_stream.report().stats
    assert report.stats.unfinished > 0


async def test_breaking_out_of_a_bare_async_for_map_writes_the_final_line_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = Lines()
    progress = Kept(stream)
    pipe_stream = two_stages().map(range(10), progress=progress)
    async for _record in pipe_stream:
        break  # at t=1.5, the first record
    gc.collect()
    await trio.sleep(10)
    assert stream.times == [1.0, 1.5]  # the run stopped at once; no snapshot after it
    report = check_final_line(progress, stream)
    assert report.stats == pipe_stream.report().stats


async def test_open_writes_the_final_line_once_however_the_block_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Leaving the results loop early, then the block: the pipeline finishes what it holds.
    stream = Lines()
    progress = Kept(stream)
    async with two_stages().open(progress=progress) as p:
        for x in range(4):
            await p.submit(x)
        async for _record in p.results():
            break
    assert stream.times == [1.0, 2.0, 3.0, 3.5]  # parse: 0.5 s each from 1 s, 3 twice
    assert stream.lines[-1].startswith("conveyor | 4 done of 4 accepted")
    assert check_final_line(progress, stream) == p.report()

    # An error raised in the block: the run stops, the final line is still written once.
    stream = Lines()
    progress = Kept(stream)
    start = trio.current_time()
    with pytest.raises(LookupError):
        async with two_stages().open(progress=progress) as p:
            for x in range(4):
                await p.submit(x)
            await trio.sleep(1.25)
            raise LookupError("the caller's own")
    assert [t - start for t in stream.times] == [1.0, 1.25]
    report = check_final_line(progress, stream)
    assert report.stats.unfinished > 0 and report.stats == p.report().stats


# ------------------------------------------------------------------ an observer that raises


@pytest.mark.parametrize("event", ["opened", "snapshot", "closed", "write"])
async def test_a_progress_line_that_raises_loses_no_item(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, event: str,
) -> None:
    class Broken(conveyor.Progress):
        def opened(self, info: conveyor.PoolInfo) -> conveyor.Progress:
            if event == "opened":
                raise RuntimeError("broken opened")
            return super().opened(info)

        def snapshot(self, stats: Any) -> None:
            if event == "snapshot":
                raise RuntimeError("broken snapshot")
            super().snapshot(stats)

        def closed(self, report: conveyor.Report) -> None:
            if event == "closed":
                raise RuntimeError("broken closed")
            super().closed(report)

    class BrokenStream(io.StringIO):
        def write(self, text: str) -> int:
            raise RuntimeError("broken write")

    stream = BrokenStream() if event == "write" else io.StringIO()
    with caplog.at_level(logging.ERROR, logger="conveyor"):
        report = await two_stages().run(range(10), progress=Broken(stream, interval=0.5))
    s = report.stats
    assert (s.submitted, s.succeeded, s.failed, s.unfinished) == (10, 9, 1, 0)
    assert sorted(r.index for r in [*report.succeeded, *report.failed]) == list(range(10))
    raised = [r.getMessage().rpartition(" raised in ")[2].split()[0]
              for r in caplog.records if " raised in " in r.getMessage()]
    # Logged once per observer and event, however often it raised.
    assert raised == (["snapshot", "closed"] if event == "write" else [event])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("form", ["run", "map", "open"])
@pytest.mark.parametrize("bad", ["yes", 1, None, conveyor.LastReport()])
async def test_bad_progress_is_refused_at_the_call_with_a_fix_that_works(
    autojump_clock: trio.testing.MockClock, form: str, bad: object,
) -> None:
    calls: list[int] = []

    async def work(x: int) -> int:
        calls.append(x)
        return x

    pipe = conveyor.pipeline(work)

    async def call(progress: Any) -> conveyor.Report:
        if form == "run":
            return await pipe.run([1, 2], progress=progress)
        if form == "map":
            stream = pipe.map([1, 2], progress=progress)
            async with stream as records:
                assert len([r async for r in records]) == 2
            return stream.report()
        opened = pipe.open(progress=progress)
        async with opened as p:
            await p.submit(1)
            await p.submit(2)
        return p.report()

    with pytest.raises(TypeError) as caught:
        await call(bad)
    assert not calls  # refused before any work
    message = str(caught.value)
    assert parts(message)["param"] == "progress"
    fix = suggested_fix(message)
    assert fix is not None
    report = await call(fix["progress"])
    assert report.stats.succeeded == 2 and calls == [1, 2]


def test_pools_are_told_no_stages() -> None:
    """``PoolInfo.stages`` is None for a pool, and for each stage's own pool in a pipeline."""
    seen: list[conveyor.PoolInfo] = []

    class Watch(conveyor.Observer):
        def opened(self, info: conveyor.PoolInfo) -> None:
            seen.append(info)

    async def main() -> None:
        await conveyor.run(fetch, [1], observers=[Watch()])
        await two_stages().run([1], observers=[Watch()])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [(i.name, i.stages) for i in seen] == [
        ("pool", None), ("fetch", None), ("parse", None),
    ]


# ------------------------------------------------------------------ fitted to the terminal


def _stats(**counts: Any) -> conveyor.Stats:
    return conveyor.Stats(**counts)


INPUTS = _stats(submitted=5000, succeeded=1230, failed=4, elapsed=4.2, attempts=3000,
                recent_throughput=308.0)
STAGES = {
    "fetch": _stats(submitted=1400, succeeded=1299, failed=1, in_flight=20, queued=40,
                    retried=7),
    "parse": _stats(submitted=1299, succeeded=1245, failed=3, in_flight=4, queued=20),
    "store": _stats(submitted=1245, succeeded=1230, in_flight=2),
}


def test_the_full_line_shows_each_stage_in_order() -> None:
    line = format_line(INPUTS, 5000, stages=STAGES)
    assert line == (
        "conveyor | 1,234/5,000 24.7% | 308/s | ETA 12s | failed 4 | "
        "fetch: 1,300 done, 20 in flight, 40 queued, 7 retries, 1 failed | "
        "parse: 1,248 done, 4 in flight, 20 queued, 3 failed | "
        "store: 1,230 done, 2 in flight | elapsed 4s"
    )


def test_a_narrow_terminal_loses_the_stages_details_before_the_essentials() -> None:
    full = format_line(INPUTS, 5000, stages=STAGES).split(" | ")
    previous: list[str] | None = None
    for width in range(300, 0, -1):
        line = format_line(INPUTS, 5000, width, STAGES)
        assert len(line) <= max(width - 1, 0)
        fields = line.split(" | ")
        if len(fields) == 1 and line not in full:
            assert full[1].startswith(line)  # even the count is cut, not dropped
            continue
        assert fields[0 if fields[0] != "conveyor" else 1] == "1,234/5,000 24.7%"
        present = {
            "elapsed": "elapsed 4s" in fields,
            "stage_details": any("in flight" in f for f in fields),
            "label": "conveyor" in fields,
            "stage_failures": any(f.startswith("fetch: ") for f in fields),
            "rate": "308/s" in fields,
            "stages": any(f.startswith(("fetch: ", "fetch ")) for f in fields),
            "eta": "ETA 12s" in fields,
            "failed": "failed 4" in fields,
        }
        # Dropped in order: once one is gone, every one before it in the order is gone.
        kept = [present[name] for name in PIPELINE_DROP_ORDER if name in present]
        assert kept == sorted(kept), (width, line)
        if present["stages"]:  # every stage, in order, or none
            assert [f.partition(" ")[0].rstrip(":") for f in fields if f[0].isalpha()
                    and f.split()[0].rstrip(":") in STAGES] == list(STAGES)
        if previous is not None:  # narrower: nothing comes back
            assert len(fields) <= len(previous)
        previous = fields
    assert format_line(INPUTS, 5000, 161, STAGES) == (
        "conveyor | 1,234/5,000 24.7% | 308/s | ETA 12s | failed 4 | fetch: 1,300 done, "
        "1 failed | parse: 1,248 done, 3 failed | store: 1,230 done"
    )
    assert format_line(INPUTS, 5000, 100, STAGES) == (
        "1,234/5,000 24.7% | 308/s | ETA 12s | failed 4 | fetch 1,300 | parse 1,248 | "
        "store 1,230"
    )
    assert format_line(INPUTS, 5000, 60, STAGES) == "1,234/5,000 24.7% | ETA 12s | failed 4"


async def test_on_a_terminal_every_line_fits_its_width(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    stream = io.StringIO()
    await two_stages().run(range(6), progress=conveyor.Progress(stream, interval=1, tty=True))
    drawn = stream.getvalue()
    assert drawn.endswith("\x1b[K\n")  # the final line ends the redrawn line
    lines = [part.removesuffix("\x1b[K").removesuffix("\x1b[K\n")
             for part in drawn.split("\r") if part]
    assert len(lines) == 5  # snapshots at 1, 2, 3 and 4 s, the final line at 4.5 s
    assert all(len(line) <= 59 for line in lines)
    assert lines[-1] == "6/6 100.0% | 1.33/s | failed 1 | fetch 6 | parse 6"  # each: done


async def test_a_resumed_run_counts_the_inputs_left_to_run(tmp_path: Any) -> None:
    """With a journal that holds some inputs, the total is the inputs that will run (the
    journal's count), not ``len(items)``. Real clock: the journal's SQLite runs in a
    thread."""
    fail_three = True

    async def flaky(x: int) -> int:
        await trio.lowlevel.checkpoint()
        if x == 3 and fail_three:
            raise ValueError("three")
        return x

    async def store(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return x

    pipe = conveyor.pipeline(flaky, store)
    journal = tmp_path / "job.journal"
    stream = Lines()
    await pipe.run(range(6), journal=journal, progress=Kept(stream, interval=60))
    assert stream.lines[-1].startswith("conveyor | 6/6 100.0% | ")
    fail_three = False
    stream = Lines()
    progress = Kept(stream, interval=60)
    report = await pipe.run(range(6), journal=journal, progress=progress)
    assert progress.infos[0].total == 1  # 5 held as succeeded; only input 3 runs again
    assert stream.lines[-1].startswith("conveyor | 1/1 100.0% | ")
    assert stage_parts(stream.lines[-1]) == expected_parts(report)
