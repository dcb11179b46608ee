"""The progress line: its text, redraw on a terminal, plain lines elsewhere, on trio's clock."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

import conveyor
from conveyor._progress import Progress, format_duration, format_line


@dataclass
class FakeStats:
    succeeded: int = 0
    failed: int = 0
    unfinished: int = 0
    retried: int = 0
    in_flight: int = 0
    queued: int = 0
    submitted: int = 0
    elapsed: float = 0.0
    throughput: float = 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (3720, "1h02m"),
     (float("inf"), "?"), (-1, "?")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_line_with_a_known_total_shows_percent_rate_and_eta() -> None:
    stats = FakeStats(succeeded=1200, failed=34, retried=7, in_flight=20, queued=40,
                      submitted=1300, elapsed=4.0, throughput=308.5)
    assert format_line(stats, total=5000) == (
        "conveyor | 1,234/5,000 24.7% | 308/s | ETA 12s | in flight 20 | queued 40"
        " | retries 7 | failed 34 | elapsed 4s"
    )


def test_line_without_a_total_counts_what_was_accepted_and_shows_unfinished() -> None:
    stats = FakeStats(succeeded=5, unfinished=2, submitted=9, elapsed=61, throughput=0.125)
    assert format_line(stats) == (
        "conveyor | 7 done of 9 accepted | 0.12/s | in flight 0 | retries 0 | failed 0"
        " | unfinished 2 | elapsed 1m01s"
    )


def test_eta_unknown_while_nothing_has_finished() -> None:
    assert "ETA ?" in format_line(FakeStats(submitted=3), total=10)
    assert "ETA" not in format_line(FakeStats(succeeded=10, throughput=5.0), total=10)


async def test_plain_lines_every_interval_when_not_a_terminal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    progress = Progress(out, total=100)
    assert not progress.tty and progress.interval == 10.0
    stats = FakeStats()

    def snapshot() -> FakeStats:
        stats.succeeded = int(trio.current_time())
        stats.throughput = 1.0
        return stats

    with trio.move_on_after(35):
        await progress.run(snapshot)
    progress.finish(snapshot())
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == [
        "10/100 10.0%", "20/100 20.0%", "30/100 30.0%", "35/100 35.0%",
    ]
    assert "\r" not in out.getvalue()


async def test_redrawn_in_place_on_a_terminal_and_ended_with_a_newline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    assert progress.interval == 0.2
    with trio.move_on_after(1.1):
        await progress.run(lambda: FakeStats(succeeded=1))
    progress.finish(FakeStats(succeeded=2))
    text = out.getvalue()
    assert text.count("\r") == 6 and text.count("\x1b[K") == 6
    assert text.endswith("2 done of 0 accepted | 0.00/s | in flight 0 | retries 0 | failed 0"
                         " | elapsed 0s\x1b[K\n")
    assert text.count("\n") == 1


def test_a_closed_stream_is_not_an_error() -> None:
    out = io.StringIO()
    progress = Progress(out)
    out.close()
    progress.finish(FakeStats())
    assert progress.lines == 0


def test_default_stream_is_stderr_at_the_time_of_writing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Progress(tty=False).finish(FakeStats(succeeded=1, submitted=1))
    assert capsys.readouterr().err.startswith("conveyor | 1 done of 1 accepted")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"interval": 0}, r"progress interval must be a finite number > 0, got 0"),
     ({"total": -1}, r"progress total must be >= 0, got -1")],
)
def test_progress_refuses_bad_input(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Progress(io.StringIO(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {"interval": "1"}, TypeError,
         r"^progress interval must be a finite number of seconds > 0 or None, got '1'$"),
        ((), {"interval": True}, TypeError, r"^progress interval must be a finite number"),
        ((), {"interval": math.nan}, ValueError,
         r"^progress interval must be a finite number > 0, got nan$"),
        ((), {"interval": math.inf}, ValueError, r"^progress interval must be a finite number"),
        ((), {"interval": 10**400}, ValueError, r"^progress interval must be a finite number"),
        ((), {"interval": -1}, ValueError, r"^progress interval must be a finite number"),
        ((), {"total": "5"}, TypeError, r"^progress total must be an int >= 0 or None, got '5'$"),
        ((), {"total": 5.0}, TypeError, r"^progress total must be an int >= 0 or None, got 5.0$"),
        ((), {"total": True}, TypeError, r"^progress total must be an int >= 0 or None"),
        ((), {"tty": "yes"}, TypeError, r"^progress tty must be True, False or None, got 'yes'$"),
        ((5,), {}, TypeError,
         r"^progress stream must be a text stream \(e\.g\. sys\.stdout, an open text file\) or "
         r"None, got 5 \(the number of items goes in total=\.\.\.\)$"),
        (("out.txt",), {}, TypeError, r"^progress stream must be a text stream"),
        ((io.BytesIO(),), {}, TypeError, r"^progress stream must be a text stream"),
    ],
)
async def test_progress_refuses_bad_input_at_the_call_before_any_work(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Progress(*args, **kwargs)


async def test_the_advice_for_a_positional_count_works(autojump_clock: trio.testing.MockClock
                                                       ) -> None:
    out = io.StringIO()
    report = await conveyor.run(_work, range(5), progress=Progress(out, total=5))
    assert len(report.succeeded) == 5
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "5/5 100.0%"


async def _work(item: int) -> int:
    await trio.sleep(1)
    return item


async def test_a_reused_progress_shows_each_runs_own_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    await conveyor.run(_work, range(10), progress=progress)
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "10/10 100.0%"
    await conveyor.run(_work, range(50), progress=progress)
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "50/50 100.0%"  # not 50/10
    async with conveyor.map(_work, range(20), progress=progress) as records:
        assert len([r async for r in records]) == 20
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "20/20 100.0%"
    async with conveyor.open_pool(_work, progress=progress) as pool:  # its count is unknown
        for item in range(3):
            await pool.submit(item)
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "3 done of 3 accepted"
    assert progress.total is None


async def test_a_given_total_holds_for_every_run(autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    progress = Progress(out, total=100)
    await conveyor.run(_work, range(10), progress=progress)
    await conveyor.run(_work, range(30), progress=progress)
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "30/100 30.0%"
