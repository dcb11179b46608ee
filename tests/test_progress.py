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


@dataclass
class Ended:
    """What ``closed`` reads of a report: its stats."""

    stats: FakeStats


async def observe_for(progress: Progress, snapshot: Any, seconds: float) -> None:
    """What a pool does with an observer that runs ``seconds``: ``snapshot()`` passed to
    ``progress.snapshot`` every ``snapshot_every`` (trio's clock), then ``closed``."""
    with trio.move_on_after(seconds):
        while True:
            await trio.sleep(progress.snapshot_every)
            progress.snapshot(snapshot())
    progress.closed(Ended(snapshot()))  # type: ignore[arg-type]


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

    await observe_for(progress, snapshot, 35)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == [
        "10/100 10.0%", "20/100 20.0%", "30/100 30.0%", "35/100 35.0%",
    ]
    assert "\r" not in out.getvalue()


async def test_redrawn_in_place_on_a_terminal_and_ended_with_a_newline(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    progress = Progress(out, tty=True)
    assert progress.interval == 0.2
    stats = iter([FakeStats(succeeded=1)] * 5 + [FakeStats(succeeded=2)])
    await observe_for(progress, lambda: next(stats), 1.1)
    text = out.getvalue()
    assert text.count("\r") == 6 and text.count("\x1b[K") == 6
    assert text.endswith("2 done of 0 accepted | 0.00/s | in flight 0 | retries 0 | failed 0"
                         " | elapsed 0s\x1b[K\n")
    assert text.count("\n") == 1


def test_a_closed_stream_is_not_an_error() -> None:
    out = io.StringIO()
    progress = Progress(out)
    out.close()
    progress.closed(Ended(FakeStats()))  # type: ignore[arg-type]
    assert progress.lines == 0


def test_default_stream_is_stderr_at_the_time_of_writing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Progress(tty=False).closed(Ended(FakeStats(succeeded=1, submitted=1)))  # type: ignore[arg-type]
    assert capsys.readouterr().err.startswith("conveyor | 1 done of 1 accepted")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"interval": 0}, r"^Progress: interval=0 is not valid: expected None or a finite number "
                       r"of seconds > 0; e\.g\. interval=1\.0$"),
     ({"total": -1}, r"^Progress: total=-1 is not valid: expected an int >= 0 or None; "
                     r"e\.g\. total=0$")],
)
def test_progress_refuses_bad_input(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Progress(io.StringIO(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((), {"interval": "1"}, TypeError,
         r"^Progress: interval='1' is not valid: expected None or a finite number of seconds > "
         r"0; e\.g\. interval=1\.0$"),
        ((), {"interval": True}, TypeError, r"^Progress: interval=True is not valid: expected"),
        ((), {"interval": math.nan}, ValueError,
         r"^Progress: interval=nan is not valid: expected None or a finite number of seconds"),
        ((), {"interval": math.inf}, ValueError, r"^Progress: interval=inf is not valid"),
        ((), {"interval": 10**400}, ValueError, r"^Progress: interval=10+\.\.\. is not valid"),
        ((), {"interval": -1}, ValueError, r"^Progress: interval=-1 is not valid"),
        ((), {"total": "5"}, TypeError,
         r"^Progress: total='5' is not valid: expected an int >= 0 or None; e\.g\. total=5$"),
        ((), {"total": 5.0}, TypeError,
         r"^Progress: total=5\.0 is not valid: expected an int >= 0 or None; e\.g\. total=5$"),
        ((), {"total": True}, TypeError, r"^Progress: total=True is not valid: expected an int"),
        ((), {"tty": "yes"}, TypeError,
         r"^Progress: tty='yes' is not valid: expected True, False or None; e\.g\. tty=True$"),
        ((5,), {}, TypeError,
         r"^Progress: stream=5 is not valid: expected a text stream \(e\.g\. sys\.stdout, an "
         r"open text file\) or None; e\.g\. stream=None, total=5 \(the number of items goes in "
         r"total=\)$"),
        (("out.txt",), {}, TypeError, r"^Progress: stream='out\.txt' is not valid: expected a "
                                      r"text stream .*; e\.g\. stream=sys\.stdout$"),
        ((io.BytesIO(),), {}, TypeError, r"^Progress: stream=<_io\.BytesIO object at .*> is not "
                                         r"valid: expected a text stream"),
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


# --- fitting the redrawn line to the terminal's width ---------------------------------------

BUSY = FakeStats(succeeded=1200, failed=34, retried=7, in_flight=20, queued=40, unfinished=3,
                 submitted=1300, elapsed=4.0, throughput=308.5)
FULL = ("conveyor | 1,237/5,000 24.7% | 308/s | ETA 12s | in flight 20 | queued 40"
        " | retries 7 | failed 34 | unfinished 3 | elapsed 4s")
# Each field of FULL, most important first (the reverse of DROP_ORDER).
IMPORTANCE = ["1,237/5,000 24.7%", "failed 34", "unfinished 3", "ETA 12s", "308/s",
              "in flight 20", "conveyor", "elapsed 4s", "retries 7", "queued 40"]


def test_importance_is_the_reverse_of_the_drop_order() -> None:
    from conveyor._progress import DROP_ORDER

    assert format_line(BUSY, total=5000) == FULL
    assert len(DROP_ORDER) == len(IMPORTANCE) - 1  # the count is never dropped


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
def test_fitted_line_never_reaches_the_last_column_and_keeps_the_most_important(
    width: int,
) -> None:
    line = format_line(BUSY, total=5000, width=width)
    assert len(line) <= width - 1
    kept = line.split(" | ")
    assert kept == [field for field in FULL.split(" | ") if field in kept]  # order unchanged
    # What is kept is a head of the importance list: nothing dropped before something lesser.
    assert set(kept) == set(IMPORTANCE[: len(kept)])
    assert "1,237/5,000 24.7%" in kept and "failed 34" in kept
    if width >= 60:
        assert "unfinished 3" in kept and "ETA 12s" in kept
    if width >= 80:
        assert "308/s" in kept and "in flight 20" in kept
    if width >= len(FULL) + 1:
        assert line == FULL


@pytest.mark.parametrize(
    ("width", "line"),
    [(40, "1,237/5,000 24.7% | failed 34"),
     (60, "1,237/5,000 24.7% | ETA 12s | failed 34 | unfinished 3"),
     (80, "1,237/5,000 24.7% | 308/s | ETA 12s | in flight 20 | failed 34 | unfinished 3"),
     (100, "conveyor | 1,237/5,000 24.7% | 308/s | ETA 12s | in flight 20 | failed 34"
           " | unfinished 3"),
     (125, FULL.replace(" | queued 40", "")),
     (126, FULL)],
)
def test_fitted_line_at_common_widths(width: int, line: str) -> None:
    assert format_line(BUSY, total=5000, width=width) == line


@pytest.mark.parametrize("width", [1, 2, 5, 12])
def test_a_very_narrow_terminal_gets_the_count_cut_never_a_wrap(width: int) -> None:
    line = format_line(BUSY, total=5000, width=width)
    assert line == "1,237/5,000 24.7%"[: width - 1]


@pytest.mark.parametrize("width", [40, 60, 80, 120, 200])
async def test_every_redraw_fits_the_columns(
    width: int, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    out = io.StringIO()
    progress = Progress(out, total=5000, tty=True)
    stats = FakeStats(submitted=5000, queued=100, in_flight=20, retried=999_999, failed=7)

    def snapshot() -> FakeStats:
        stats.succeeded += 196
        stats.elapsed += 0.2
        stats.throughput = 980.0
        return stats

    await observe_for(progress, snapshot, 4.9)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\x1b[K\n")
    redraws = text.removesuffix("\n").split("\r")[1:]
    assert len(redraws) == 25
    for redraw in redraws:
        line = redraw.removesuffix("\x1b[K")
        assert len(line) <= width - 1
        assert "/5,000 " in line and "failed 7" in line
    assert redraws[-1].startswith(("conveyor | 4,907/5,000 98.1%", "4,907/5,000 98.1%"))


async def test_plain_lines_are_never_fitted(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    out = io.StringIO()
    progress = Progress(out, total=5000, tty=False)
    await observe_for(progress, lambda: BUSY, 25)
    assert out.getvalue() == (FULL + "\n") * 3


@pytest.mark.parametrize(("columns", "width"), [("57", 57), ("", 80), ("0", 80), ("x", 80),
                                                 ("-3", 80)])
def test_width_from_columns_else_80_when_the_stream_is_not_a_terminal(
    columns: str, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor._progress import terminal_width

    monkeypatch.setenv("COLUMNS", columns)
    assert terminal_width(io.StringIO()) == width
    assert terminal_width(object()) == width


def _pty(columns: int) -> tuple[int, int]:
    import fcntl
    import os
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return master, slave


def test_width_of_the_terminal_behind_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from conveyor._progress import terminal_width

    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = _pty(63)
    try:
        with open(slave, "w", closefd=False) as stream:
            assert terminal_width(stream) == 63
            monkeypatch.setenv("COLUMNS", "101")  # the override, as shutil does
            assert terminal_width(stream) == 101
    finally:
        os.close(master)
        os.close(slave)


_SCRIPT = """
import trio, conveyor

async def work(item):
    await trio.sleep(0.01)
    return item

report = trio.run(lambda: conveyor.run(work, range(200), workers=2, progress=True))
assert len(report.succeeded) == 200
"""


@pytest.mark.parametrize("columns", [60, 80])
def test_on_a_real_terminal_the_line_is_redrawn_never_scrolled(columns: int) -> None:
    """A child process writes its progress line to a real pseudo-terminal of ``columns``."""
    import os
    import subprocess
    import sys

    master, slave = _pty(columns)
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    try:
        child = subprocess.Popen([sys.executable, "-c", _SCRIPT], stdin=subprocess.DEVNULL,
                                 stdout=slave, stderr=slave, env=env)
        os.close(slave)
        output = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child is gone and the terminal closed
                break
            if not chunk:
                break
            output += chunk
        assert child.wait(timeout=60) == 0, output
    finally:
        os.close(master)
    text = output.decode()
    assert text.endswith("\r\n")  # the terminal turns the final "\n" into "\r\n"
    assert text.count("\n") == 1  # one line on the screen: every redraw replaced the last
    redraws = [part for part in text.removesuffix("\r\n").split("\r") if part]
    assert redraws and redraws[-1].startswith(("conveyor | 200/200 100.0%", "200/200 100.0%"))
    for redraw in redraws:
        assert len(redraw.removesuffix("\x1b[K")) <= columns - 1, redraw


def test_the_readme_shows_what_80_and_60_columns_show() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    stats = FakeStats(succeeded=1231, failed=3, retried=7, in_flight=20, queued=40,
                      submitted=1300, elapsed=4.0, throughput=308.5)
    for width in (200, 80, 60):
        assert "\n" + format_line(stats, total=5000, width=width) + "\n" in readme


async def test_a_resumed_journal_run_shows_the_items_left_as_its_total(tmp_path: Any) -> None:
    journal = tmp_path / "job.journal"

    async def fails_past_60(item: int) -> int:
        if item >= 60:
            raise ValueError(item)
        return item

    await conveyor.run(fails_past_60, range(100), journal=journal, key=str)
    out = io.StringIO()
    await conveyor.run(_quick, range(100), journal=journal, key=str,
                       progress=Progress(out, tty=False))
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "40/40 100.0%"  # not 40/100


async def _quick(item: int) -> int:
    return item


async def test_a_journaled_run_shows_its_items_as_its_total(tmp_path: Any) -> None:
    """The journal feeds the pool through a generator (it skips what is done): the total is
    still the number of items."""
    out = io.StringIO()
    await conveyor.run(_quick, range(30), journal=tmp_path / "job.journal", key=str,
                       progress=Progress(out, tty=False))
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "30/30 100.0%"


# --- the progress line is an observer of the pool --------------------------------------------


def _info(total: int | None) -> conveyor.PoolInfo:
    return conveyor.PoolInfo(name="pool", workers=4, retry_attempts=1, total=total,
                             stats=conveyor.Stats)


def _report(stats: conveyor.Stats) -> conveyor.Report:
    return conveyor.Report(succeeded=[], failed=[], unfinished=[], stats=stats)


def test_progress_is_an_observer_of_snapshots_and_the_end_never_of_items() -> None:
    from conveyor._observe import overrides

    progress = Progress(io.StringIO(), interval=3)
    assert isinstance(progress, conveyor.Observer)
    assert progress.snapshot_every == progress.interval == 3
    assert Progress(io.StringIO()).snapshot_every == 10.0  # not a terminal
    assert Progress(io.StringIO(), tty=True).snapshot_every == 0.2
    per_item = ["attempt_started", "attempt_ended", "retry_scheduled", "succeeded", "failed",
                "unfinished"]
    assert [name for name in per_item if overrides(progress, name)] == []
    assert all(overrides(progress, name) for name in ("opened", "snapshot", "closed"))


def test_observer_events_write_the_line_with_the_pools_total_then_the_final_account() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    assert progress.opened(_info(total=8)) is progress
    progress.snapshot(conveyor.Stats(submitted=8, succeeded=2, failed=1, elapsed=3.0))
    progress.closed(_report(conveyor.Stats(submitted=8, succeeded=6, failed=2, elapsed=4.0)))
    assert [line.split(" | ")[1] for line in out.getvalue().splitlines()] == [
        "3/8 37.5%", "8/8 100.0%",
    ]
    assert out.getvalue().splitlines()[-1].endswith("| failed 2 | elapsed 4s")
    progress.opened(_info(total=None))  # a pool whose count is unknown: not the last one's
    progress.closed(_report(conveyor.Stats(submitted=3, succeeded=3)))
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "3 done of 3 accepted"


def test_a_given_total_wins_over_the_pools_count() -> None:
    out = io.StringIO()
    progress = Progress(out, total=100, tty=False)
    progress.opened(_info(total=8))
    progress.closed(_report(conveyor.Stats(submitted=8, succeeded=8)))
    assert out.getvalue().split(" | ")[1] == "8/100 8.0%"


def test_closed_ends_the_redrawn_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    progress = Progress(out, tty=True)
    progress.opened(_info(total=5000))
    progress.snapshot(BUSY)
    progress.closed(_report(conveyor.Stats(submitted=5000, succeeded=5000, elapsed=9.0)))
    assert out.getvalue() == (
        "\r1,237/5,000 24.7% | ETA 12s | failed 34 | unfinished 3\x1b[K"
        "\r5,000/5,000 100.0% | 556/s | in flight 0 | failed 0\x1b[K\n"
    )


async def _observed_run(fn: Any, items: Any, progress: Progress, workers: int = 10) -> None:
    """``conveyor.run(fn, items, observers=[progress])``."""
    await conveyor.run(fn, items, workers=workers, observers=[progress])


async def _slow(item: int) -> int:
    await trio.sleep(3.5)
    return item


async def test_as_an_observer_of_a_pool_a_line_every_interval_and_the_final_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    await _observed_run(_slow, range(10), Progress(out, tty=False), workers=1)
    # Items end at 3.5, 7, 10.5...; lines at 10, 20, 30 s, and the final one at 35 s.
    assert [line.split(" | ")[1] for line in out.getvalue().splitlines()] == [
        "2/10 20.0%", "5/10 50.0%", "8/10 80.0%", "10/10 100.0%",
    ]


async def test_as_an_observer_the_final_line_comes_after_a_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = io.StringIO()
    with trio.move_on_after(12):
        await _observed_run(_slow, range(10), Progress(out, tty=False), workers=1)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == ["2/10 20.0%", "10/10 100.0%"]
    assert "| failed 0 | unfinished 7 |" in lines[-1]  # 3 done, the 7 others unfinished


async def test_a_progress_reused_after_a_resumed_run_shows_the_next_runs_count(
    tmp_path: Any,
) -> None:
    journal = tmp_path / "job.journal"

    async def fails_past_60(item: int) -> int:
        if item >= 60:
            raise ValueError(item)
        return item

    await conveyor.run(fails_past_60, range(100), journal=journal, key=str)
    out = io.StringIO()
    progress = Progress(out, tty=False)
    await conveyor.run(_quick, range(100), journal=journal, key=str, progress=progress)
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "40/40 100.0%"
    await conveyor.run(_quick, range(10), progress=progress)
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "10/10 100.0%"  # not 10/40
